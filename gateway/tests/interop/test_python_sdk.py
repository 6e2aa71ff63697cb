"""Interop: the official Python MCP SDK (from PyPI) against the real `moat` binary.

Runs over stdio and Streamable HTTP, each in the handshake era (2025-11-25,
sessions) and the stateless era (2026-07-28). Needs MOAT_BIN pointing at the
built `moat` binary; `.ci/test` sets it.
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading

import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

MOAT_BIN = os.environ.get("MOAT_BIN", "")
MODES = ["legacy", "2026-07-28"]
EXPECTED_VERSION = {"legacy": "2025-11-25", "2026-07-28": "2026-07-28"}


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


def stdio_target(home):
    return StdioServerParameters(command=MOAT_BIN, args=["serve"], env=private_env(home))


async def exercise(client, mode, transport):
    tools = await client.list_tools()
    names = [t.name for t in tools.tools]
    vm_tools = ["vm_create", "vm_start", "vm_stop", "vm_delete", "vm_list", "vm_inspect", "vm_logs",
                "vm_exec", "vm_exec_start", "vm_exec_status", "vm_exec_output", "vm_exec_kill",
                "vm_file_read", "vm_file_write", "vm_file_delete", "vm_file_list"]
    admin_only = transport == "stdio"
    image_tools = ["image_list", "image_inspect"] + (["image_import", "image_delete"] if admin_only else [])
    workspace_tools = ["workspace_create", "workspace_fork", "workspace_list", "workspace_inspect", "workspace_delete"]
    # Agents use networks but do not make or remove them; groups and forwards are their own.
    network_tools = ((["network_create"] if admin_only else []) + ["network_list", "network_inspect"]
                     + (["network_delete"] if admin_only else [])
                     + ["security_group_create", "security_group_update", "security_group_delete",
                        "security_group_list", "security_group_inspect",
                        "port_forward_create", "port_forward_delete", "port_forward_list"])
    # Git service VMs are admins'; repositories and credentials are everyone's own.
    git_tools = ((["git_service_ensure", "git_service_list", "git_service_inspect", "git_service_delete"]
                  if admin_only else [])
                 + ["git_repo_create", "git_repo_list", "git_repo_delete", "git_repo_log", "git_repo_branches",
                    "git_repo_push", "git_credential_set", "git_credential_delete", "git_credential_list"])
    # stdio is the operator (cluster-admin, every tool); HTTP is an agent (no audit log, no image
    # import, no network create or delete, no git services).
    expected = (["whoami", "node_list", "node_inspect"] + (["audit_query"] if admin_only else []) + vm_tools
                + image_tools + workspace_tools + network_tools + git_tools)
    assert names == expected, names
    assert all(t.output_schema for t in tools.tools)

    result = await client.call_tool("whoami", {})
    assert not result.is_error, result
    me = result.structured_content
    assert me["transport"] == transport, me
    assert me["protocol_version"] == EXPECTED_VERSION[mode], me
    if transport == "stdio":
        assert (me["principal"], me["role"]) == ("operator", "cluster-admin"), me
    else:
        assert (me["principal"], me["role"]) == ("py-agent", "agent"), me

    listed = await client.call_tool("vm_list", {})
    assert not listed.is_error and listed.structured_content == {"vms": []}, listed
    missing = await client.call_tool("vm_inspect", {"vm": "ghost"})
    assert missing.is_error and "no vm named `ghost`" in missing.content[0].text, missing

    with pytest.raises(MCPError) as bad:
        await client.call_tool("node_inspect", {"node": "Not A Label"})
    assert bad.value.code == -32602
    assert "arguments/node" in bad.value.message, bad.value.message

    with pytest.raises(MCPError) as unknown:
        await client.call_tool("no_such_tool", {})
    assert "unknown tool" in unknown.value.message

    nodes = (await client.call_tool("node_list", {})).structured_content["nodes"]
    assert nodes and nodes[0]["reachable"], nodes

    prompts = await client.list_prompts()
    assert {"choose_node", "getting_started"} <= {p.name for p in prompts.prompts}
    rendered = await client.get_prompt("choose_node", {"vcpus": "2", "memory_mib": "512"})
    assert "It needs 2 vCPUs" in rendered.messages[0].content.text
    with pytest.raises(MCPError) as missing:
        await client.get_prompt("choose_node", {"vcpus": "2"})
    assert "memory_mib" in missing.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_stdio(home, mode):
    async with Client(stdio_target(home), mode=mode) as client:
        await exercise(client, mode, "stdio")


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_http(http_url, mode):
    url, key = http_url
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        await exercise(client, mode, "http")
        # An agent never sees cluster tools; calling one answers like an unknown tool.
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("audit_query", {})
        assert "unknown tool `audit_query`" in hidden.value.message


@pytest.mark.anyio
async def test_http_without_a_key_is_refused(http_url):
    url, _ = http_url
    with pytest.raises(Exception) as refused:
        async with Client(url, mode="legacy") as client:
            await client.list_tools()
    # The SDK surfaces moat's 401 body: a JSON-RPC error that says what to do.
    assert "no API key" in repr(refused.value) and "moat keys create" in repr(refused.value), repr(refused.value)


@pytest.fixture
def anyio_backend():
    return "asyncio"
