"""A demo MCP server with tools for tests and demos, over stdio, streamable HTTP, legacy SSE or WebSocket.

    python examples/servers/demo_server.py [--transport stdio|http|sse|ws] [--port N] [--stateless]

HTTP/SSE/WS print `LISTENING <url>` on stdout once bound (port 0 picks a free port). Misbehaviour flags for
tests: --garbage-stdout, --exit-during-init, --hang-in-init, --ignore-sigterm, --spawn-grandchild-and-exit,
--page-size N (paginate tools/list), --extra-tools N (register N filler tools), --calls-log PATH (append a
JSON line for each `sleep` call as it arrives, before sleeping: tests wait on it instead of guessing).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _misbehave_before_imports() -> None:
    """Init faults fire before the (slow) SDK imports so tests see them at once."""
    if "--ignore-sigterm" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--exit-during-init" in sys.argv:
        sys.stdin.buffer.readline()  # the client's first message arrives, then we die
        print("demo server: fatal: cannot load configuration (simulated)", file=sys.stderr, flush=True)
        os._exit(3)
    if "--hang-in-init" in sys.argv:
        print("demo server: hanging before the handshake", file=sys.stderr, flush=True)
        time.sleep(3600)
        os._exit(0)


if __name__ == "__main__":
    _misbehave_before_imports()

import anyio  # noqa: E402
import mcp_types as types  # noqa: E402
from mcp.server.mcpserver import Context, MCPServer  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

_PATTERN = "0123456789abcdefghijklmnopqrstuvwxyz"


def _spawn_sleeper() -> subprocess.Popen[bytes]:
    """A long-lived child that inherits our stdio (so it holds the pipes) and our process group."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def build_server(
    page_size: int | None = None, extra_tools: int = 0, calls_log: str | None = None
) -> MCPServer:
    mcp = MCPServer("demo", instructions="Demo tools for agent-runtime tests.")
    log = open(calls_log, "a", encoding="utf-8") if calls_log else None  # open as long as the server runs

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    async def sleep(seconds: float) -> str:
        """Sleep for the given number of seconds, then answer."""
        if log is not None:
            log.write(json.dumps({"tool": "sleep", "pid": os.getpid(), "seconds": seconds}) + "\n")
            log.flush()
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @mcp.tool()
    def big_output(n_bytes: int) -> str:
        """Return exactly n_bytes of ASCII text."""
        reps = n_bytes // len(_PATTERN) + 1
        return (_PATTERN * reps)[:n_bytes]

    @mcp.tool()
    def fail(message: str = "this tool always fails") -> str:
        """Always return a tool error."""
        raise ToolError(message)

    @mcp.tool()
    def rpc_error(code: int = -32000, message: str = "demo protocol error") -> str:
        """Answer with a JSON-RPC error instead of a result."""
        raise MCPError(code=code, message=message)

    @mcp.tool()
    def env(name: str) -> str:
        """The value of an environment variable in the server process, or '<unset>'."""
        return os.environ.get(name, "<unset>")

    @mcp.tool()
    def whoami() -> dict[str, Any]:
        """The server process's pid, working directory and process group."""
        return {"pid": os.getpid(), "cwd": os.getcwd(), "pgid": os.getpgid(0)}

    @mcp.tool()
    def pid() -> int:
        """The server's process id."""
        return os.getpid()

    @mcp.tool()
    def spawn_grandchild() -> int:
        """Start a long-lived child process and return its pid."""
        return _spawn_sleeper().pid

    @mcp.tool()
    def crash() -> str:
        """Exit the server process abruptly, mid-call."""
        os._exit(13)

    @mcp.tool(annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True))
    def lookup(key: str) -> str:
        """Read a value (read-only, idempotent)."""
        return f"value-of-{key}"

    @mcp.tool(annotations=types.ToolAnnotations(destructive_hint=True, read_only_hint=False))
    def delete_item(key: str) -> str:
        """Delete an item (destructive)."""
        return f"deleted {key}"

    @mcp.tool()
    async def register_tool(name: str, ctx: Context) -> str:
        """Register a new echo-like tool and announce tools/list_changed."""

        def dynamic(text: str) -> str:
            return f"{name}: {text}"

        mcp.add_tool(dynamic, name=name, description=f"dynamically registered tool {name}")
        if ctx.request_context.protocol_version in ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"):
            await ctx.request_context.session.send_tool_list_changed()
        else:
            await ctx.notify_tools_changed()
        return f"registered {name}"

    for i in range(extra_tools):
        mcp.add_tool(_filler(i), name=f"filler_{i:04d}", description=f"filler tool {i}")

    if page_size is not None:
        _paginate_tools(mcp, page_size)
    return mcp


def _filler(offset: int) -> Any:
    def filler(x: int = 0) -> int:
        return x + offset

    return filler


def _paginate_tools(mcp: MCPServer, page_size: int) -> None:
    """Replace tools/list with a version that serves `page_size` tools per page (cursor = offset)."""

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        tools = await mcp.list_tools()
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + page_size
        return types.ListToolsResult(
            tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
        )

    mcp._lowlevel_server.add_request_handler("tools/list", types.PaginatedRequestParams, list_tools)


class _GarbageWriter(io.TextIOBase):
    """Stdout that puts a non-JSON line before every message the server writes."""

    def __init__(self, inner: io.TextIOBase) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write("this line is not JSON-RPC\n" + text)
        return len(text)

    def flush(self) -> None:
        self._inner.flush()


def _bind(port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP. Without
    # it Nagle holds a JSON response body (written after its headers) until the client's delayed ACK, ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def _announce(url: str) -> None:
    print(f"LISTENING {url}", flush=True)


async def _serve_http(mcp: MCPServer, transport: str, port: int, stateless: bool) -> None:
    import uvicorn

    sock = _bind(port)
    bound = sock.getsockname()[1]
    if transport == "sse":
        app = mcp.sse_app()
        url = f"http://127.0.0.1:{bound}/sse"
    else:
        app = mcp.streamable_http_app(stateless_http=stateless)
        url = f"http://127.0.0.1:{bound}/mcp"
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await anyio.sleep(0.01)
        _announce(url)


async def _serve_stdio(mcp: MCPServer, garbage: bool) -> None:
    from mcp.server.stdio import stdio_server

    lowlevel = mcp._lowlevel_server
    if garbage:
        print("demo server starting (banner on stdout, not JSON)", flush=True)
        stdin = anyio.wrap_file(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8"))
        stdout = anyio.wrap_file(_GarbageWriter(io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8")))
        streams = stdio_server(stdin, stdout)  # type: ignore[arg-type]  # a wrapped writer that corrupts output on purpose
    else:
        streams = stdio_server()
    async with streams as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", choices=["stdio", "http", "sse", "ws"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stateless", action="store_true", help="stateless streamable HTTP")
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--extra-tools", type=int, default=0)
    parser.add_argument("--garbage-stdout", action="store_true")
    parser.add_argument("--exit-during-init", action="store_true")
    parser.add_argument("--hang-in-init", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-grandchild-and-exit", action="store_true")
    parser.add_argument("--calls-log", default=None)
    args = parser.parse_args(argv)

    _misbehave_before_imports()  # no-op when already done at import time
    if args.spawn_grandchild_and_exit:
        child = _spawn_sleeper()  # spawned before stdio_server diverts fd 1: it holds the real stdout pipe
        print(f"GRANDCHILD {child.pid}", file=sys.stderr, flush=True)

    mcp = build_server(page_size=args.page_size, extra_tools=args.extra_tools, calls_log=args.calls_log)
    if args.transport == "stdio":
        anyio.run(_serve_stdio, mcp, args.garbage_stdout)
    elif args.transport == "ws":
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: ws_server sits beside us
        from ws_server import serve_websocket

        anyio.run(lambda: serve_websocket(mcp._lowlevel_server, port=args.port, on_listening=_announce))
    else:
        anyio.run(_serve_http, mcp, args.transport, args.port, args.stateless)

    if args.ignore_sigterm:
        # Also ignore stdin EOF: only SIGKILL ends this server.
        print("demo server: ignoring EOF and SIGTERM", file=sys.stderr, flush=True)
        time.sleep(3600)
    sys.stdout.flush()
    # Exit without waiting for children (a --spawn-grandchild-and-exit server leaves its sleeper behind).
    os._exit(0)


if __name__ == "__main__":
    main()
