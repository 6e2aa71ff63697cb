"""Interop: OpenClaw (from npm) as a third-party MCP client of the real `moat` binary.

`openclaw mcp add` probes a server before saving it; `openclaw mcp probe --json` connects and
lists what it offers. Both run against `moat serve` over stdio (the operator: every tool) and
over Streamable HTTP with an agent's bearer key (an agent's tools); a bad key is refused at
`add` and nothing is saved. OpenClaw's config lives in a private HOME per test.

Needs OPENCLAW_BIN and OPENCLAW_NODE_DIR (the directory of a Node 24 `node`): `.ci/setup`
installs both under target/ci/openclaw and `.ci/test` sets them; without them the tests fail
under CI=true and are skipped elsewhere.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import MOAT_BIN, expected_tools

OPENCLAW_BIN = os.environ.get("OPENCLAW_BIN", "")
# OpenClaw's helpers for resources and prompts, listed beside the server's own tools.
HELPERS = {"prompts_get", "prompts_list", "resources_list", "resources_read"}


@pytest.fixture
def openclaw():
    if not os.access(OPENCLAW_BIN, os.X_OK):
        why = f"OPENCLAW_BIN={OPENCLAW_BIN!r} is not an executable openclaw (.ci/setup --test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    home = tempfile.mkdtemp(prefix="moat-openclaw-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOAT_", "XDG_", "OPENCLAW_"))}
    env["HOME"] = home
    # OpenClaw's launcher is a node script and needs Node 24: its own node first in PATH.
    node_dir = os.environ.get("OPENCLAW_NODE_DIR")
    if node_dir:
        env["PATH"] = node_dir + os.pathsep + env.get("PATH", "")

    def run(*args, check=True):
        out = subprocess.run([OPENCLAW_BIN, *args], env=env, capture_output=True, text=True, timeout=180)
        if check:
            assert out.returncode == 0, f"openclaw {' '.join(args)}: {out.stdout}\n{out.stderr}"
        return out

    yield run
    shutil.rmtree(home, ignore_errors=True)


def probed_tools(run, server):
    """The server's tools as `openclaw mcp probe --json` lists them, without OpenClaw's prefix and
    helpers; and the server's own entry."""
    report = json.loads(run("mcp", "probe", server, "--json").stdout)
    names = {t.removeprefix(f"{server}__") for t in report["tools"] if t.startswith(f"{server}__")}
    return names - HELPERS, report["servers"][server]


def test_openclaw_adds_and_probes_moat_over_stdio(openclaw, home):
    added = openclaw("mcp", "add", "moat", "--command", MOAT_BIN, "--arg", "serve",
                     "--env", f"HOME={home}", "--env", "MOAT_LOG=info")
    assert "Saved MCP server \"moat\"" in added.stdout + added.stderr, added
    tools, server = probed_tools(openclaw, "moat")
    want = expected_tools(admin=True)
    assert tools == set(want), sorted(tools ^ set(want))
    assert (server["tools"], server["resources"], server["prompts"]) == (len(want), True, True), server


def test_openclaw_adds_and_probes_moat_over_http_with_a_bearer_key(openclaw, http_url):
    url, key = http_url
    openclaw("mcp", "add", "moat", "--url", url, "--transport", "streamable-http",
             "--header", f"Authorization=Bearer {key}")
    tools, server = probed_tools(openclaw, "moat")
    want = expected_tools(admin=False)
    assert tools == set(want), sorted(tools ^ set(want))
    assert "audit_query" not in tools and server["tools"] == len(want), server

    # A bad key: the probe before saving fails, and nothing is saved.
    bad = openclaw("mcp", "add", "bad", "--url", url, "--transport", "streamable-http",
                   "--header", "Authorization=Bearer moat_deadbeef_0000", check=False)
    assert bad.returncode != 0, bad
    assert "probe failed" in (bad.stdout + bad.stderr).lower(), bad
    listed = openclaw("mcp", "list").stdout
    assert "- moat" in listed and "- bad" not in listed, listed
