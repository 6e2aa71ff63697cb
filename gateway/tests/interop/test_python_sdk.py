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
    yield url
    proc.terminate()
    assert proc.wait(timeout=15) == 0, "moat should exit 0 on SIGTERM"


def stdio_target(home):
    return StdioServerParameters(command=MOAT_BIN, args=["serve"], env=private_env(home))


async def exercise(client, mode, transport):
    tools = await client.list_tools()
    names = [t.name for t in tools.tools]
    assert names == ["whoami", "node_list", "node_inspect"], names
    assert all(t.output_schema for t in tools.tools)

    result = await client.call_tool("whoami", {})
    assert not result.is_error, result
    me = result.structured_content
    assert me["transport"] == transport, me
    assert me["protocol_version"] == EXPECTED_VERSION[mode], me
    if transport == "stdio":
        assert (me["principal"], me["role"]) == ("operator", "cluster-admin"), me

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
    async with Client(http_url, mode=mode) as client:
        await exercise(client, mode, "http")


@pytest.fixture
def anyio_backend():
    return "asyncio"
