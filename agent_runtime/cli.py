"""The `agent-runtime` command line: builds the parser from command modules and maps errors to exit codes.

Command modules are imported lazily by name so that `agent-runtime tools ...` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from agent_runtime import __version__
from agent_runtime.errors import is_user_facing

# (command name, module under agent_runtime.commands, one-line help). Each module defines
# `add_arguments(parser)` and `run(args) -> int`, and imports heavy packages only inside `run`.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("config", "config_cmd", "validate a config file and print the normalised servers"),
    ("servers", "servers_cmd", "start the configured MCP servers and show their state"),
    ("tools", "tools_cmd", "list, call and approve tools of the configured MCP servers"),
    ("generate", "generate_cmd", "generate text with the local inference engine"),
    ("run", "run_cmd", "run an agent on a task"),
    ("chat", "chat_cmd", "chat with an agent in a REPL"),
    ("serve", "serve_cmd", "serve the OpenAI-compatible HTTP API"),
    ("mcp-server", "mcp_server_cmd", "serve agents to MCP hosts (Claude Desktop) over stdio or HTTP"),
)


def _available_commands() -> list[tuple[str, str, str]]:
    found = []
    for name, module, help_text in COMMANDS:
        if importlib.util.find_spec(f"agent_runtime.commands.{module}") is not None:
            found.append((name, module, help_text))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agent-runtime {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning (default) or error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in _available_commands():
        mod = importlib.import_module(f"agent_runtime.commands.{module}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(cmd)
        cmd.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from agent_runtime.logging import configure_logging

    configure_logging(args.log_level)
    try:
        return int(args._module.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # ExceptionGroups from task groups wrap the user-facing error
        err = _user_facing_in(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _user_facing_in(exc: BaseException) -> BaseException | None:
    if is_user_facing(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_facing_in(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
