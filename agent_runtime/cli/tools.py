"""`agent-runtime tools list|call`: list the namespaced tools of the configured servers, or call one.

Exit codes: 0 success, 1 the call failed (error result, timeout, server unavailable, policy refusal),
2 usage/config error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent_runtime.cli import approve
from agent_runtime.cli.common import (
    add_server_source_arguments,
    config_from_args,
    open_runtime,
    run_with_signals,
    status_rows,
)
from agent_runtime.config import RuntimeConfig
from agent_runtime.errors import ConfigError
from agent_runtime.tools.executor import ToolCallRefused
from agent_runtime.tools.pins import tool_flags
from agent_runtime.tools.supervisor import ServerUnavailable

if TYPE_CHECKING:
    from mcp.types import CallToolResult

    from agent_runtime.tools.notices import ProgressCallback
    from agent_runtime.tools.registry import RegistryProblem, ToolEntry
    from agent_runtime.tools.runtime import Runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tools_action", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="list the namespaced tools of every ready server")
    lst.add_argument("--server", metavar="NAME", help="only the tools of this server")
    add_server_source_arguments(lst)
    call = sub.add_parser("call", help="call one tool and print its result")
    call.add_argument(
        "name",
        help="namespaced tool name, e.g. time__get_current_time (the bare tool name when only one server has it)",
    )
    call.add_argument(
        "arguments",
        nargs="?",
        default="{}",
        help="arguments as a JSON object (default {}); @FILE reads them from a file, - from stdin",
    )
    call.add_argument(
        "--timeout", type=_seconds, default=None, metavar="S", help="per-call timeout in seconds (> 0)"
    )
    add_server_source_arguments(call)
    approve.add_arguments(sub.add_parser("approve", help="approve new or changed tool definitions (pinning)"))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the timeout must be a positive, finite number of seconds"
        )
    return value


def run(args: argparse.Namespace) -> int:
    if args.tools_action == "list":
        return _list(args)
    if args.tools_action == "approve":
        return approve.run(args)
    return _call(args)


# -- list ------------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.server is not None and all(s.name != args.server for s in config.servers):
        known = ", ".join(s.name for s in config.servers) or "none"
        raise ConfigError(f"no server named {args.server!r}", f"configured servers: {known}")

    async def main() -> int:
        async with open_runtime(config, args) as rt:
            entries = rt.tools(args.server)
            flags = {e.name: tool_flags(rt.executor.pins, e) for e in entries}
            problems = rt.registry.problems(args.server)
            statuses = [s for s in rt.servers() if args.server is None or s.name == args.server]
        if args.json:
            doc = {
                "tools": [_entry_dict(e) | {"flags": flags[e.name]} for e in entries],
                "problems": [_problem_dict(p) for p in problems],
                "servers": status_rows(statuses),
            }
            print(json.dumps(doc, indent=2))
        else:
            _print_tools_table(entries, flags)
            for name, tool_flag_list in flags.items():
                for flag in tool_flag_list:
                    print(f"warning: {name}: {flag}", file=sys.stderr)
            for p in problems:
                print(f"warning: {p.server}: {p.detail}", file=sys.stderr)
            for s in statuses:
                if s.enabled and s.state != "ready":
                    print(f"warning: server {s.name!r} is {s.state}: {s.last_error or ''}", file=sys.stderr)
        return 0

    return run_with_signals(main)


def _entry_dict(e: ToolEntry) -> dict[str, Any]:
    d = e.definition
    return {
        "name": e.name,
        "server": e.server,
        "tool_name": e.tool_name,
        "title": d.title,
        "description": d.description,
        "input_schema": d.input_schema,
        "output_schema": d.output_schema,
        "annotations": d.annotations.model_dump(mode="json", exclude_none=True) if d.annotations else None,
    }


def _problem_dict(p: RegistryProblem) -> dict[str, Any]:
    return {"kind": p.kind, "name": p.name, "server": p.server, "tool_name": p.tool_name, "detail": p.detail}


def _print_tools_table(entries: list[ToolEntry], flags: dict[str, list[str]]) -> None:
    from rich.console import Console  # ~0.1 s: `tools list --json` never needs it
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(entries)} tools")
    table.add_column("tool", no_wrap=True)
    table.add_column("server")
    table.add_column("flags")
    table.add_column("description", overflow="fold")
    for e in entries:
        desc = (e.definition.description or "").strip().splitlines()
        marks = flags.get(e.name, [])
        shown = [
            "quarantined" if any(f.startswith("quarantined") for f in marks) else "",
            "suspicious" if any(f.startswith("suspicious") for f in marks) else "",
        ]
        # Server text is shown as text: rich markup in a description must not style (or hide) anything.
        table.add_row(
            escape(e.name), escape(e.server), " ".join(m for m in shown if m), escape(desc[0] if desc else "")
        )
    Console().print(table)


# -- call ------------------------------------------------------------------------------------------------


_EXAMPLE = """pass a JSON object, e.g. '{"timezone": "Asia/Tokyo"}'"""
MAX_INT_DIGITS = 300


def _read_arguments(text: str) -> str:
    """The argument text itself, or that of `@FILE` / `-` (stdin): argv caps one argument at 128 KiB."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read tool arguments from {path!r}: {exc}", "@FILE names a JSON file"
            ) from None
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range for a double")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_arguments(text: str) -> dict[str, Any]:
    """Strict JSON: NaN, Infinity, numbers that overflow a double and integers of more than 300 digits are
    usage errors (they would be sent as null, or cannot be encoded again), as is nesting JSON cannot parse."""
    text = _read_arguments(text)
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"tool arguments are not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", _EXAMPLE
        ) from None
    except RecursionError:
        raise ConfigError("tool arguments are nested too deeply to parse", _EXAMPLE) from None
    except ValueError as exc:
        raise ConfigError(f"tool arguments are not valid: {exc}", _EXAMPLE) from None
    if not isinstance(value, dict):
        raise ConfigError(f"tool arguments must be a JSON object, not {type(value).__name__}", _EXAMPLE)
    return value


def _servers_for(config: RuntimeConfig, name: str) -> RuntimeConfig:
    """Only the servers whose prefix could own `name` (all of them when none could, for the hint)."""
    owners = tuple(s for s in config.servers if s.enabled and name.startswith(s.prefix))
    return dataclasses.replace(config, servers=owners) if owners else config


def _call(args: argparse.Namespace) -> int:
    arguments = _parse_arguments(args.arguments)  # bad JSON is a usage error: before any server starts
    config = _servers_for(config_from_args(args), args.name)

    async def main() -> int:
        from transports import TransportError  # the MCP SDK: loaded by the runtime's connections anyway

        rt: Runtime
        async with open_runtime(config, args) as rt:
            name = _qualified(rt, args.name)
            try:
                with _progress_bar(name) as on_progress:
                    result = await rt.call_tool(
                        name, arguments, timeout=args.timeout, on_progress=on_progress
                    )
            except (ServerUnavailable, TransportError, ToolCallRefused) as exc:
                # The call failed (never sent, lost, timed out, refused by a policy): exit 1, not a usage error.
                if args.json:
                    print(json.dumps({"is_error": True, "error": type(exc).__name__, "reason": str(exc)}))
                print(f"error: {exc}", file=sys.stderr)
                return 1
        _print_result(result, as_json=args.json)
        return 1 if result.is_error else 0

    return run_with_signals(main)


@contextlib.contextmanager
def _progress_bar(name: str) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr for the call's progress reports when stderr is a terminal (it goes away
    when the call ends); None otherwise, so that piped output stays exactly the result."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:g}/{task.fields[shown_total]}"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        auto_refresh=False,  # redrawn on each report (the relay coalesces floods): no refresh thread
    )
    task = bar.add_task(escape(name), total=None, shown_total="?", note="")

    def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(
            task,
            completed=progress,
            total=total,
            shown_total=f"{total:g}" if total is not None else "?",
            note=escape(message or ""),
        )
        bar.refresh()

    try:
        yield on_progress
    finally:
        if bar.live.is_started:
            bar.stop()


def _qualified(rt: Runtime, name: str) -> str:
    """`name` as given when some tool has it; else the one namespaced tool whose server calls it `name`
    (`tools call --stdio CMD echo`); unchanged when none or several do (the call then says so)."""
    if rt.registry.get(name) is not None:
        return name
    owners = {e.name for e in rt.tools() if e.tool_name == name}
    owners |= {p.name for p in rt.registry.problems() if p.tool_name == name and p.kind != "collision"}
    return owners.pop() if len(owners) == 1 else name


def _print_result(result: CallToolResult, *, as_json: bool) -> None:
    texts = [c.text for c in result.content if c.type == "text"]
    if as_json:
        doc = {
            "is_error": bool(result.is_error),
            "text": "\n".join(texts),
            "structured_content": result.structured_content,
            "content": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content],
        }
        print(json.dumps(doc, indent=2))
        return
    out = sys.stderr if result.is_error else sys.stdout
    for c in result.content:
        if c.type == "text":
            print(c.text, file=out)
        elif c.type == "image" or c.type == "audio":
            print(f"[{c.type} {c.mime_type}, {len(c.data) * 3 // 4} bytes]", file=out)
        elif c.type == "resource_link":
            print(f"[resource link {c.uri}]", file=out)
        elif c.type == "resource":
            res = c.resource
            text = getattr(res, "text", None)
            print(
                text if text is not None else f"[resource {res.uri}, {res.mime_type or 'binary'}]", file=out
            )
    if result.structured_content is not None and not _text_is(texts, result.structured_content):
        print(json.dumps(result.structured_content, indent=2), file=out)
    if result.is_error:
        print("error: the tool reported an error", file=sys.stderr)


def _text_is(texts: list[str], structured: Any) -> bool:
    """True when the text content already is the structured content serialised (servers often send both)."""
    if len(texts) != 1:
        return False
    try:
        value = json.loads(texts[0])
    except json.JSONDecodeError:
        return structured == {"result": texts[0]}
    # MCPServer wraps non-object return values as {"result": value}.
    return value == structured or structured == {"result": value}
