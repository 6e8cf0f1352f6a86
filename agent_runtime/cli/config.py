"""`agent-runtime config check [FILE] [--json]`: validate a config file (its policies section and the launch
policy included) and print its normalised servers, with warnings about policies that may not confine what
their author meant."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# Heavy imports (pydantic, rich) happen inside run(): building the parser must stay cheap for every command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate a config file and print the normalised servers",
        description="Validate a config file (Claude Desktop, VS Code or mistral.rs format, plus our sections) "
        "and print the servers it defines. Exit 0 when valid, 2 when not.",
    )
    check.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="config file (default: ./MCP_CONFIG.json, else $AGENT_RUNTIME_CONFIG)",
    )
    check.add_argument("--json", action="store_true", help="print the normalised config as JSON")


def run(args: argparse.Namespace) -> int:
    from agent_runtime.config import default_config_path, load_config, redact_config
    from agent_runtime.config.policies import load_policies, policy_warnings
    from agent_runtime.errors import ConfigError

    path = args.file or default_config_path()
    if path is None:
        raise ConfigError(
            "no config file given and none found",
            "pass FILE, create ./MCP_CONFIG.json or set AGENT_RUNTIME_CONFIG (see docs/config.md)",
        )
    config = load_config(path)
    # The policies section too: its errors, and the launch policy applied to every stdio server (a refused
    # command is a config error here, exit 2, not only when something would be spawned).
    warnings = policy_warnings(config, load_policies(config))
    if args.json:
        _print_json(config, warnings)
    else:
        _print_table(config)
    for warning in warnings:
        print(f"warning: {redact_config(warning, config)}", file=sys.stderr)
    return 0


def _summary(config: Any) -> dict[str, Any]:
    from agent_runtime.config import redact_config, redacted_target

    def clean(text: str) -> str:
        return redact_config(text, config)

    servers = []
    for s in config.servers:
        t = s.timeouts
        servers.append(
            {
                "name": s.name,
                "source": s.source,
                "enabled": s.enabled,
                "tool_prefix": s.prefix,
                "trusted": s.trusted,
                "max_concurrent_calls": s.max_concurrent_calls,
                "target": redacted_target(s, clean),
                "timeouts": {
                    "startup_secs": t.startup,
                    "connect_secs": t.connect,
                    "request_secs": t.request,
                    "tool_secs": t.tool,
                    "per_tool": dict(t.per_tool),
                },
            }
        )
    r = config.runtime
    return {
        "file": str(config.path) if config.path else None,
        "servers": servers,
        "runtime": {
            "tool_timeout_secs": r.tool_timeout,
            "max_concurrent_calls": r.max_concurrent_calls,
            "max_concurrent_calls_global": r.max_concurrent_calls_global,
            "shutdown_timeout_secs": r.shutdown_timeout,
            "reconnect": {
                "initial_delay_secs": r.reconnect.initial_delay,
                "max_delay_secs": r.reconnect.max_delay,
                "multiplier": r.reconnect.multiplier,
                "jitter": r.reconnect.jitter,
            },
            "log_dir": str(r.log_dir) if r.log_dir else None,
            "max_message_bytes": r.max_message_bytes,
        },
        "sections": sorted(config.sections),
    }


def _print_json(config: Any, warnings: list[str]) -> None:
    import json

    from agent_runtime.config import redact_config

    # Secret fields are masked structurally; the final pass catches secrets embedded anywhere else (args, URLs).
    summary = _summary(config) | {"warnings": warnings}
    sys.stdout.write(redact_config(json.dumps(summary, indent=2), config) + "\n")


def _print_table(config: Any) -> None:
    import shlex

    from rich.console import Console
    from rich.table import Table

    from agent_runtime.config import redact_config

    summary = _summary(config)
    table = Table(
        title=f"{summary['file'] or 'config'}: {len(summary['servers'])} server(s)", title_justify="left"
    )
    for column in ("name", "transport", "target", "enabled", "prefix"):
        table.add_column(column, overflow="fold")
    for s in summary["servers"]:
        t = s["target"]
        if t["transport"] == "stdio":
            env = " ".join(f"{k}={v}" for k, v in t["env"].items())
            target = shlex.join([t["command"], *t["args"]])
            target = f"{env} {target}" if env else target
        else:
            target = t["url"]
        table.add_row(s["name"], t["transport"], target, "yes" if s["enabled"] else "no", s["tool_prefix"])
    console = Console(width=max(Console().width, 120), highlight=False, soft_wrap=False)
    with console.capture() as captured:
        console.print(table)
        sections = ", ".join(summary["sections"]) or "none"
        console.print(f"sections: {sections}")
    sys.stdout.write(redact_config(captured.get(), config))
