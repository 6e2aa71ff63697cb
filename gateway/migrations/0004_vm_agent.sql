-- The guest agent as the VM's node last reported it in a heartbeat (JSON: ready, version,
-- detail), so vm_list can show which VMs' agents answer without asking every node. NULL
-- until a heartbeat has reported the VM running.
ALTER TABLE vms ADD COLUMN agent TEXT;
