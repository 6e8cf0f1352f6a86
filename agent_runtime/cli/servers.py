"""`agent-runtime servers status`: start the configured (or ad-hoc) MCP servers and show their state."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from agent_runtime.cli.common import (
    add_server_source_arguments,
    config_from_args,
    open_runtime,
    run_with_signals,
    status_rows,
)
from agent_runtime.tools.monitor import render_table

if TYPE_CHECKING:
    from agent_runtime.tools.supervisor import ServerStatus


def print_status_table(statuses: list[ServerStatus]) -> None:
    from rich.console import Console  # ~0.1 s: only tables need it
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
            from rich.console import Console  # ~0.1 s: only tables need it

            print_status_table(statuses)
            console = Console()
            if not console.is_terminal:  # piped: no terminal width to respect, keep every column whole
                console = Console(width=200)
            console.print(render_table(health))
        ready = all(s.state == "ready" for s in statuses if s.enabled)
        return 0 if ready else 1

    return run_with_signals(main)
