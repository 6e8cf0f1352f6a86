"""`agent-runtime prompts list|get`: the prompt templates the configured servers offer.

Exit codes as for `resources`: 0 success, 1 the request failed, 2 usage/config error (unknown server or prompt,
an argument the prompt does not declare or a required one missing, a server without prompts).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from agent_runtime.cli.common import add_server_source_arguments, open_runtime, run_with_signals
from agent_runtime.cli.resources import list_catalog, request_failed, server_config
from agent_runtime.errors import ConfigError
from agent_runtime.tools.resources import RequestRefused
from agent_runtime.tools.supervisor import ServerUnavailable

if TYPE_CHECKING:
    from mcp_types import GetPromptResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prompts_action", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="list the prompts of every ready server")
    lst.add_argument("--server", metavar="NAME", help="only the prompts of this server")
    add_server_source_arguments(lst)
    get = sub.add_parser("get", help="get a prompt's messages")
    get.add_argument("name", help="the prompt's name")
    get.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="a prompt argument (repeatable)"
    )
    get.add_argument("--server", metavar="NAME", help="the server offering it (when several do)")
    add_server_source_arguments(get)


def run(args: argparse.Namespace) -> int:
    if args.prompts_action == "get":
        return _get(args)
    return list_catalog(args, "prompts")


def _parse_pairs(pairs: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--arg {pair!r} is not KEY=VALUE", "e.g. --arg city=Oslo")
        found[key] = value
    return found


def _get(args: argparse.Namespace) -> int:
    arguments = _parse_pairs(args.arg)  # a usage error before any server starts
    config = server_config(args)

    async def main() -> int:
        from transports import TransportError
        from transports.errors import CapabilityMissing

        async with open_runtime(config, args) as rt:
            try:
                result = await rt.get_prompt(args.name, arguments, server=args.server)
            except CapabilityMissing:
                raise
            except (ServerUnavailable, TransportError, RequestRefused) as exc:
                return request_failed(exc, args.json)
        _print_prompt(result, as_json=args.json)
        return 0

    return run_with_signals(main)


def _print_prompt(result: GetPromptResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
        return
    if result.description:
        print(f"# {result.description}")
    for m in result.messages:
        c = m.content
        text = getattr(c, "text", None)
        if text is None:
            resource = getattr(c, "resource", None)
            text = getattr(resource, "text", None) if resource is not None else None
        print(f"[{m.role}] {text if text is not None else '[' + c.type + ']'}")
