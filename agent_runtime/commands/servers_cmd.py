"""`agent-runtime servers status`: start the configured (or ad-hoc) MCP servers and show their state.

Also holds what every server-using command shares: the server-source flags and the signal-aware runner.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent_runtime.config_types import RuntimeConfig
    from agent_runtime.runtime import Runtime
    from agent_runtime.supervisor import ServerStatus


def add_server_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--config F, or repeatable ad-hoc --stdio/--url/--sse/--ws flags (not both), plus readiness and --json."""
    src = parser.add_argument_group("servers")
    src.add_argument("--config", metavar="FILE", help="config file (default: the user config file)")
    src.add_argument(
        "--stdio", action="append", default=[], metavar="CMD", help="ad-hoc stdio server command"
    )
    src.add_argument(
        "--url", action="append", default=[], metavar="URL", help="ad-hoc streamable HTTP server"
    )
    src.add_argument(
        "--sse", action="append", default=[], metavar="URL", help="ad-hoc legacy HTTP+SSE server"
    )
    src.add_argument("--ws", action="append", default=[], metavar="URL", help="ad-hoc WebSocket server")
    src.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for servers to start (default: the largest startup timeout)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    from agent_runtime.config import adhoc_config, default_config_path, load_config
    from agent_runtime.errors import ConfigError

    adhoc = bool(args.stdio or args.url or args.sse or args.ws)
    if adhoc and args.config:
        raise ConfigError(
            "--config cannot be combined with --stdio/--url/--sse/--ws",
            "use either a config file or ad-hoc flags",
        )
    if adhoc:
        return adhoc_config(stdio=args.stdio, url=args.url, sse=args.sse, ws=args.ws)
    path = args.config or default_config_path()
    if path is None:
        raise ConfigError(
            "no config file: ./MCP_CONFIG.json does not exist and $AGENT_RUNTIME_CONFIG is not set",
            "pass --config FILE, or ad-hoc servers with --stdio CMD / --url URL / --sse URL / --ws URL",
        )
    return load_config(path)


def run_with_signals(main: Callable[[], Awaitable[int]]) -> int:
    """Run `main` under anyio; SIGINT/SIGTERM cancel it, so the runtime shuts its servers down (bounded)."""
    import signal

    import anyio

    async def runner() -> int:
        result = 0
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal result
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                        result = 128 + signum
                        tg.cancel_scope.cancel()
                        return

            async def body() -> None:
                nonlocal result
                result = await main()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_signals)
            tg.start_soon(body)
        return result

    return anyio.run(runner)


def open_runtime(config: RuntimeConfig, args: argparse.Namespace) -> Runtime:
    from agent_runtime.executor import terminal_approver
    from agent_runtime.runtime import Runtime

    # Calls that policy says need approval are asked on the terminal; with no terminal they are denied.
    return Runtime(config, ready_timeout=args.ready_timeout, approval_hook=terminal_approver())


def status_rows(statuses: list[ServerStatus]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in statuses]


def print_status_table(statuses: list[ServerStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MCP servers")
    for col in ("server", "transport", "state", "tools", "pid", "protocol", "restarts"):
        table.add_column(col, no_wrap=True)
    table.add_column("last error", overflow="fold", min_width=20)
    colours = {"ready": "green", "degraded": "yellow", "open": "red", "failed": "red", "starting": "cyan"}
    for s in statuses:
        state = str(s.state) + (" (reconnecting)" if s.reconnecting else "")
        colour = colours.get(str(s.state), "dim")
        table.add_row(
            s.name,
            s.transport,
            f"[{colour}]{state}[/]",
            str(s.tool_count),
            str(s.pid or ""),
            s.protocol_version or "",
            str(s.restarts),
            s.last_error or "",
        )
    Console().print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="servers_action", metavar="ACTION", required=True)
    status = sub.add_parser("status", help="start the servers, wait until ready or failed, print their state")
    add_server_source_arguments(status)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    async def main() -> int:
        async with open_runtime(config, args) as rt:
            statuses = rt.servers()
            health = rt.health()
        if args.json:
            print(
                json.dumps(
                    {"servers": status_rows(statuses), "health": [h.to_dict() for h in health]}, indent=2
                )
            )
        else:
            from rich.console import Console

            from agent_runtime.monitor import render_table

            print_status_table(statuses)
            console = Console()
            if not console.is_terminal:  # piped: no terminal width to respect, keep every column whole
                console = Console(width=200)
            console.print(render_table(health))
        ready = all(s.state == "ready" for s in statuses if s.enabled)
        return 0 if ready else 1

    return run_with_signals(main)
