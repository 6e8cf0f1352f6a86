"""An MCP server that sends notifications, for tests of server logs, progress and cancellation (stdio or HTTP).

    python examples/servers/notify_server.py [--transport stdio|http] [--port N] [--legacy]

Tools: `log_levels` (one log message per level), `progress` (reports each step), `flood` (a burst of log or
progress notifications), `slow` (sleeps; writes `started` to its marker file, and `cancelled` when the client
cancels it). It answers `logging/setLevel` and filters its messages by that level (2025-era clients;
2026-07-28 clients choose a level per request). `--legacy` serves only the 2025-11-25 handshake era (stdio: the
handshake-only loop; HTTP: `server/discover` refused, so clients fall back). HTTP prints `LISTENING <url>` once bound.
"""

from __future__ import annotations

import argparse
import os
import socket
import warnings
from pathlib import Path
from typing import Any, get_args

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

# The logging capability is deprecated in the 2026-07-28 era; this server exists to exercise it.
warnings.simplefilter("ignore", MCPDeprecationWarning)

LEVELS: tuple[types.LoggingLevel, ...] = get_args(types.LoggingLevel)  # severity ascending (RFC 5424)


def build_server() -> MCPServer:
    mcp = MCPServer("notify", instructions="Tools that send log, progress and cancellation notifications.")
    minimum: list[types.LoggingLevel] = ["debug"]  # what the client asked for with logging/setLevel

    def wanted(level: types.LoggingLevel) -> bool:
        return LEVELS.index(level) >= LEVELS.index(minimum[0])

    async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        minimum[0] = params.level
        return types.EmptyResult()

    mcp._lowlevel_server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)

    @mcp.tool()
    async def log_levels(ctx: Context, text: str = "hello", logger: str = "notify.app") -> str:
        """Send one log message at each level (those below the client's level are not sent)."""
        sent = 0
        for level in LEVELS:
            if wanted(level):
                await ctx.log(level, {"level": level, "text": text}, logger_name=logger)
                sent += 1
        return f"sent {sent}"

    @mcp.tool()
    async def progress(ctx: Context, steps: int = 3, delay: float = 0.0) -> str:
        """Report progress after each of `steps` steps, `delay` seconds apart."""
        for i in range(1, steps + 1):
            if delay:
                await anyio.sleep(delay)
            await ctx.report_progress(i, steps, f"step {i} of {steps}")
        return f"done {steps}"

    @mcp.tool()
    async def flood(ctx: Context, count: int = 1000, kind: str = "log", size: int = 16) -> str:
        """Send `count` log (`kind="log"`) or progress (`kind="progress"`) notifications as fast as possible."""
        payload = "x" * size
        for i in range(count):
            if kind == "progress":
                await ctx.report_progress(i + 1, count, payload)
            else:
                await ctx.log("warning", f"flood {i} {payload}", logger_name="notify.flood")
        return f"flooded {count}"

    @mcp.tool()
    async def slow(ctx: Context, seconds: float, marker: str) -> str:
        """Sleep `seconds`; the marker file gets `started`, then `cancelled` if the client cancels the call."""
        _mark(marker, f"started {os.getpid()}")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            _mark(marker, "cancelled")  # the SDK cancels a handler on the client's notifications/cancelled
            raise
        _mark(marker, "finished")
        return f"slept {seconds}"

    return mcp


def _mark(marker: str, line: str) -> None:
    """Append a line to the marker file (a few bytes: the test that reads it runs in another process)."""
    with Path(marker).open("a", encoding="utf-8") as out:
        out.write(line + "\n")


async def _serve_http(mcp: MCPServer, port: int, legacy: bool) -> None:
    import uvicorn

    if legacy:  # a refused probe sends the client to the initialize handshake, each HTTP request stands alone

        async def no_discover(ctx: Any, params: types.RequestParams) -> types.EmptyResult:
            raise MCPError(code=types.METHOD_NOT_FOUND, message="Method not found: server/discover")

        mcp._lowlevel_server.add_request_handler("server/discover", types.RequestParams, no_discover)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    server = uvicorn.Server(uvicorn.Config(mcp.streamable_http_app(), log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await anyio.sleep(0.01)
        print(f"LISTENING {url}", flush=True)


async def _serve_stdio(mcp: MCPServer, legacy: bool) -> None:
    from mcp.server.runner import serve_loop
    from mcp.server.stdio import stdio_server

    lowlevel = mcp._lowlevel_server
    async with stdio_server() as (read_stream, write_stream):
        if not legacy:  # both eras: the client's first request picks one
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
            return
        async with lowlevel.lifespan(lowlevel) as state:  # the handshake-only loop: 2025-11-25 and before
            await serve_loop(
                lowlevel,
                read_stream,
                write_stream,
                lifespan_state=state,
                init_options=lowlevel.create_initialization_options(),
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--legacy", action="store_true", help="serve the 2025-11-25 handshake era only")
    args = parser.parse_args(argv)
    mcp = build_server()
    if args.transport == "stdio":
        anyio.run(_serve_stdio, mcp, args.legacy)
    else:
        anyio.run(_serve_http, mcp, args.port, args.legacy)


if __name__ == "__main__":
    main()
