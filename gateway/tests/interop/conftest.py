"""Shared by the interop tests: the moat binary, a private state directory, an HTTP server with
an agent key, and the tools each role should list (written here independently of moat's own
catalog, so a tool that appears or vanishes by accident fails the tests)."""

import os
import re
import shutil
import subprocess
import tempfile
import threading

import pytest

MOAT_BIN = os.environ.get("MOAT_BIN", "")


def private_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOAT_", "XDG_"))}
    env["HOME"] = home
    env["MOAT_LOG"] = "info"
    return env


@pytest.fixture
def home():
    if not os.access(MOAT_BIN, os.X_OK):
        pytest.fail(f"MOAT_BIN={MOAT_BIN!r} is not an executable moat binary; build it and set MOAT_BIN")
    d = tempfile.mkdtemp(prefix="moat-interop-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def create_key(home, name, role):
    out = subprocess.run(
        [MOAT_BIN, "keys", "create", "--name", name, "--role", role],
        env=private_env(home), capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def http_url(home):
    proc = subprocess.Popen(
        [MOAT_BIN, "serve", "--http", "127.0.0.1:0"],
        env=private_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = None
    for line in proc.stderr:
        m = re.search(r"moat listening url=(\S+)", line)
        if m:
            url = m.group(1)
            break
    assert url, "moat did not report its URL"
    # Keep draining stderr so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    yield url, create_key(home, "py-agent", "agent")
    proc.terminate()
    assert proc.wait(timeout=15) == 0, "moat should exit 0 on SIGTERM"


def expected_tools(admin):
    """The tools `tools/list` shows, in order: every tool for the operator (cluster-admin on
    stdio, `admin`), an agent's otherwise."""
    vm_tools = ["vm_create", "vm_start", "vm_stop", "vm_delete", "vm_list", "vm_inspect", "vm_logs",
                "vm_exec", "vm_exec_start", "vm_exec_status", "vm_exec_output", "vm_exec_kill",
                "vm_file_read", "vm_file_write", "vm_file_delete", "vm_file_list"]
    image_tools = ["image_list", "image_inspect"] + (["image_import", "image_delete"] if admin else [])
    workspace_tools = ["workspace_create", "workspace_fork", "workspace_list", "workspace_inspect", "workspace_delete"]
    # Agents use networks but do not make or remove them; groups and forwards are their own.
    network_tools = ((["network_create"] if admin else []) + ["network_list", "network_inspect"]
                     + (["network_delete"] if admin else [])
                     + ["security_group_create", "security_group_update", "security_group_delete",
                        "security_group_list", "security_group_inspect",
                        "port_forward_create", "port_forward_delete", "port_forward_list"])
    # Git service VMs are admins'; repositories and credentials are everyone's own.
    git_tools = ((["git_service_ensure", "git_service_list", "git_service_inspect", "git_service_delete"]
                  if admin else [])
                 + ["git_repo_create", "git_repo_list", "git_repo_delete", "git_repo_log", "git_repo_branches",
                    "git_repo_push", "git_credential_set", "git_credential_delete", "git_credential_list"])
    agent_tools = ["agent_create", "agent_list", "agent_inspect", "agent_delete"]
    disk_tools = ["disk_list", "disk_layout_plan", "disk_layout_apply", "disk_layout_list", "disk_layout_status",
                  "disk_layout_delete"] if admin else []
    # An agent has no audit log, no image import, no network create or delete, no git services,
    # no host disks.
    return (["whoami", "node_list", "node_inspect"] + (["audit_query"] if admin else []) + vm_tools
            + image_tools + workspace_tools + network_tools + git_tools + agent_tools + disk_tools)
