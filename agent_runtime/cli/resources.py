"""`agent-runtime resources list|templates|read`: the resources the configured servers offer beside tools.

Exit codes: 0 success, 1 the request failed (server error, timeout, server unavailable, policy refusal),
2 usage/config error (unknown server, resource or prompt, bad arguments, a server without the capability).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_runtime.cli.common import (
    add_server_source_arguments,
    config_from_args,
    open_runtime,
    run_with_signals,
)
from agent_runtime.errors import ConfigError
from agent_runtime.tools.resources import RequestRefused
from agent_runtime.tools.supervisor import ServerUnavailable

if TYPE_CHECKING:
    from mcp_types import ReadResourceResult

    from agent_runtime.config import RuntimeConfig
    from agent_runtime.tools.catalog import PromptEntry, ResourceEntry, TemplateEntry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="resources_action", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="list the resources of every ready server")
    lst.add_argument("--server", metavar="NAME", help="only the resources of this server")
    add_server_source_arguments(lst)
    tpl = sub.add_parser("templates", help="list the resource templates of every ready server")
    tpl.add_argument("--server", metavar="NAME", help="only the templates of this server")
    add_server_source_arguments(tpl)
    read = sub.add_parser("read", help="read one resource: text to stdout, binary to -o FILE or a summary")
    read.add_argument(
        "uri", help="the resource's URI (as `resources list` shows it, or one a template makes)"
    )
    read.add_argument(
        "--server", metavar="NAME", help="the server to read it from (when several, or none, list it)"
    )
    read.add_argument("-o", "--output", metavar="FILE", help="write the contents (text or binary) to FILE")
    add_server_source_arguments(read)


def run(args: argparse.Namespace) -> int:
    if args.resources_action == "read":
        return _read(args)
    return list_catalog(args, "resources" if args.resources_action == "list" else "templates")


def server_config(args: argparse.Namespace) -> RuntimeConfig:
    config = config_from_args(args)
    if args.server is not None and all(s.name != args.server for s in config.servers):
        known = ", ".join(s.name for s in config.servers) or "none"
        raise ConfigError(f"no server named {args.server!r}", f"configured servers: {known}")
    return config


# -- listings ----------------------------------------------------------------------------------------------


def list_catalog(args: argparse.Namespace, what: str) -> int:
    config = server_config(args)

    async def main() -> int:
        async with open_runtime(config, args) as rt:
            if what == "resources":
                rows = [_resource_row(e) for e in rt.resources(args.server)]
            elif what == "templates":
                rows = [_template_row(e) for e in rt.resource_templates(args.server)]
            else:
                rows = [_prompt_row(e) for e in rt.prompts(args.server)]
            down = [s for s in rt.servers() if s.enabled and s.state != "ready"]
        if args.json:
            print(json.dumps({what: rows}, indent=2))
        else:
            _table(what, rows)
        for s in down:
            if args.server is None or s.name == args.server:
                print(f"warning: server {s.name!r} is {s.state}: {s.last_error or ''}", file=sys.stderr)
        return 0

    return run_with_signals(main)


def _resource_row(e: ResourceEntry) -> dict[str, Any]:
    r = e.resource
    return {
        "uri": r.uri,
        "server": e.server,
        "name": r.name,
        "mime_type": r.mime_type,
        "size": r.size,
        "description": r.description,
    }


def _template_row(e: TemplateEntry) -> dict[str, Any]:
    t = e.template
    return {
        "uri_template": t.uri_template,
        "server": e.server,
        "name": t.name,
        "mime_type": t.mime_type,
        "description": t.description,
    }


def _prompt_row(e: PromptEntry) -> dict[str, Any]:
    p = e.prompt
    arguments = [
        {"name": a.name, "required": bool(a.required), "description": a.description}
        for a in p.arguments or []
    ]
    return {"name": p.name, "server": e.server, "description": p.description, "arguments": arguments}


_COLUMNS = {
    "resources": ("uri", "server", "mime_type", "description"),
    "templates": ("uri_template", "server", "mime_type", "description"),
    "prompts": ("name", "server", "arguments", "description"),
}


def _table(what: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console  # ~0.1 s: --json never needs it
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(rows)} {what}")
    columns = _COLUMNS[what]
    for i, column in enumerate(columns):
        table.add_column(column.replace("_", " "), no_wrap=i == 0, overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if column == "arguments":
                value = ", ".join(a["name"] + ("" if a["required"] else "?") for a in value)
            elif column == "description":
                lines = (value or "").strip().splitlines()
                value = lines[0] if lines else ""
            cells.append(escape(str(value or "")))  # server text is shown as text, never as markup
        table.add_row(*cells)
    Console().print(table)


# -- read / get --------------------------------------------------------------------------------------------


def _read(args: argparse.Namespace) -> int:
    config = server_config(args)

    async def main() -> int:
        from transports import TransportError
        from transports.errors import CapabilityMissing, ResourceTooLarge

        async with open_runtime(config, args) as rt:
            try:
                result = await rt.read_resource(args.uri, server=args.server)
            except (CapabilityMissing, ResourceTooLarge):
                raise  # the user asked the wrong server or for too much: a usage error (exit 2)
            except (ServerUnavailable, TransportError, RequestRefused) as exc:
                return request_failed(exc, args.json)
        return _print_contents(result, args)

    return run_with_signals(main)


def _print_contents(result: ReadResourceResult, args: argparse.Namespace) -> int:
    if args.json:
        doc = {
            "contents": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.contents]
        }
        if args.output:
            Path(args.output).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        else:
            print(json.dumps(doc, indent=2))
        return 0
    out = Path(args.output).open("wb") if args.output else None
    try:
        for c in result.contents:
            text = getattr(c, "text", None)
            if text is not None:
                if out is not None:
                    out.write(text.encode())
                else:
                    print(text)
                continue
            try:
                data = base64.b64decode(getattr(c, "blob", ""), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{c.uri}: the server sent a blob that is not valid base64") from None
            if out is not None:
                out.write(data)
            else:
                print(
                    f"[binary {c.uri}, {c.mime_type or 'application/octet-stream'}, {len(data)} bytes: use -o FILE]"
                )
    finally:
        if out is not None:
            out.close()
    return 0


def request_failed(exc: BaseException, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": type(exc).__name__, "reason": str(exc)}))
    print(f"error: {exc}", file=sys.stderr)
    return 1
