"""Round trips of one MCP tool call over a stdio MCP server, as a client sees them.

usage: python3 mcp_rtt.py N TOOL COMMAND [ARG...]

Spawns COMMAND, initializes, then makes 10 warm-up calls of TOOL (no arguments) and N measured
ones, one at a time (each waits for its answer). Prints one JSON line: p50/p99/mean in µs and
the first answer's structured content. Standard library only: it runs on the host and inside a
Debian guest alike, so both sides of a comparison use the same client code.
"""

import json
import subprocess
import sys
import time


def main():
    n, tool, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    out = proc.stdout

    def send(message):
        proc.stdin.write((json.dumps(message) + "\n").encode())

    def answer(want):
        while True:
            line = out.readline()
            if not line:
                sys.exit(f"the server closed the session; exit {proc.wait()}")
            message = json.loads(line)
            if message.get("id") == want:
                if "error" in message:
                    sys.exit(f"error: {message['error']}")
                return message["result"]

    send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "mcp_rtt", "version": "1"}}})
    answer(0)
    send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    times, first = [], None
    for i in range(1, n + 11):
        t = time.perf_counter_ns()
        send({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
        result = answer(i)
        elapsed = time.perf_counter_ns() - t
        if result.get("isError"):
            sys.exit(f"{tool} failed: {result}")
        first = first or result.get("structuredContent")
        if i > 10:
            times.append(elapsed / 1000)
    proc.stdin.close()
    proc.wait(timeout=30)
    times.sort()
    pick = lambda p: times[round((len(times) - 1) * p)]
    print(json.dumps({"n": n, "p50_us": pick(0.5), "p99_us": pick(0.99),
                      "mean_us": sum(times) / len(times), "answer": first}))


main()
