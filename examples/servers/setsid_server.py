"""A stdio MCP server that leaves processes behind, for the reaping tests.

    python examples/servers/setsid_server.py PIDFILE [--at-start] [--exit-on-eof]

Each "sleeper" it starts double-forks away from it: the middle process calls `setsid` (a new session and
process group, so a group kill misses it) and exits at once (so the sleeper is an orphan, no longer in the
server's process tree), and the sleeper ignores SIGTERM, closes the server's pipes and sleeps for ten
minutes. Its pid is appended to PIDFILE (one line each). `--at-start` starts one before the server even
answers `initialize`; the `spawn` tool starts one more per call. With `--exit-on-eof` the server exits
cleanly when stdin closes (the well-behaved case whose leftovers the SDK would never see).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def start_sleeper(pidfile: str) -> int:
    """Double fork + setsid; returns the sleeper's pid (read back from a pipe)."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process
        os.close(read_end)
        os.setsid()
        sleeper = os.fork()
        if sleeper == 0:  # the sleeper
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            with open(pidfile, "a", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.write(write_end, f"{os.getpid()}\n".encode())
            os.close(write_end)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            time.sleep(600)
            os._exit(0)
        os._exit(0)  # the middle exits at once: the sleeper is orphaned
    os.close(write_end)
    os.waitpid(middle, 0)
    with os.fdopen(read_end, "rb") as f:
        return int(f.readline() or b"0")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    pidfile = args[0]
    if "--at-start" in flags:
        start_sleeper(pidfile)  # before any thread or event loop exists: fork is safe here

    import anyio
    import mcp_types as types
    from mcp.server.mcpserver import MCPServer

    mcp = MCPServer("setsid", log_level="WARNING")

    @mcp.tool(annotations=types.ToolAnnotations(read_only_hint=True))
    def spawn() -> int:
        """Start one more sleeper that leaves this server's session; returns its pid."""
        return start_sleeper(pidfile)

    if "--exit-on-eof" not in flags:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server itself also needs SIGKILL
    anyio.run(mcp.run_stdio_async)
    os._exit(0)


if __name__ == "__main__":
    main()
