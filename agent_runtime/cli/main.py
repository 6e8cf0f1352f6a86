"""The `agent-runtime` command line: builds the parser from the command modules and maps errors to exit codes.

Each command module defines `add_arguments(parser)` and `run(args) -> int` and imports heavy packages (torch,
the MCP SDK) only inside `run`, so `agent-runtime tools ...` never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from agent_runtime import __version__
from agent_runtime.cli import (
    adapters,
    auth,
    chat,
    generate,
    mcp_server,
    prompts,
    resources,
    run,
    serve,
    servers,
    tools,
)
from agent_runtime.cli import config as config_command
from agent_runtime.errors import is_user_facing
from agent_runtime.logging import configure_logging

# (command name, its module, one-line help)
COMMANDS: tuple[tuple[str, ModuleType, str], ...] = (
    ("config", config_command, "validate a config file and print the normalised servers"),
    ("servers", servers, "start the configured MCP servers and show their state"),
    ("tools", tools, "list, call and approve tools of the configured MCP servers"),
    ("auth", auth, "log in to OAuth-protected servers, show and delete their stored tokens"),
    (
        "resources",
        resources,
        "list, read and list the templates of the resources of the configured MCP servers",
    ),
    ("prompts", prompts, "list and get the prompts of the configured MCP servers"),
    ("generate", generate, "generate text with the local inference engine"),
    ("run", run, "run an agent on a task"),
    ("chat", chat, "chat with an agent in a REPL"),
    ("serve", serve, "serve the OpenAI-compatible HTTP API"),
    ("mcp-server", mcp_server, "serve agents to MCP hosts (Claude Desktop) over stdio or HTTP"),
    ("adapters", adapters, "list, load and unload the LoRA adapters of a running server"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-runtime", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agent-runtime {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning (default) or error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(cmd)
        cmd.set_defaults(command_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command_module", None) is None:
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.log_level)
    try:
        return int(args.command_module.run(args))
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
