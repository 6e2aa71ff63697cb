-- A workspace's ancestors (workspace ids, oldest first; its image is `image`), written when it
-- is made, so its lineage stays whole when an ancestor is deleted. JSON array of strings.
ALTER TABLE workspaces ADD COLUMN lineage TEXT NOT NULL DEFAULT '[]';
