"""Interop: the official Python MCP SDK (from PyPI) against the real `moat` binary.

Runs over stdio and Streamable HTTP, each in the handshake era (2025-11-25,
sessions) and the stateless era (2026-07-28). Needs MOAT_BIN pointing at the
built `moat` binary; `.ci/test` sets it.
"""

import pytest
from conftest import MOAT_BIN, expected_tools, private_env
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

MODES = ["legacy", "2026-07-28"]
EXPECTED_VERSION = {"legacy": "2025-11-25", "2026-07-28": "2026-07-28"}


def stdio_target(home):
    return StdioServerParameters(command=MOAT_BIN, args=["serve"], env=private_env(home))


async def exercise(client, mode, transport):
    tools = await client.list_tools()
    names = [t.name for t in tools.tools]
    # stdio is the operator (cluster-admin, every tool); HTTP is an agent.
    expected = expected_tools(admin=transport == "stdio")
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
