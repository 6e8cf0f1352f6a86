"""`agent-runtime run "task"`: run one agent on a task with a live view on stderr and the answer on stdout.

Exit codes: 0 on an answer, 1 when a budget or an error stopped the run, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent_runtime.agent import Agent, AgentEvent, AgentResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="what the agent should do")
    add_common(parser)
    parser.add_argument("--json", action="store_true", help="print the whole transcript as JSON on stdout")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="config file (default ./MCP_CONFIG.json)")
    parser.add_argument(
        "--agent", "-a", default="default", help="agent name from the config (default: default)"
    )
    parser.add_argument("--model", default=None, help="model source overriding the config's `model` section")
    from agent_runtime.commands.serve_cmd import add_device_argument

    add_device_argument(parser)
    parser.add_argument("--quiet", "-q", action="store_true", help="no live view, only the answer")


def run(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_main, args)


async def open_agent(args: argparse.Namespace, console: Any) -> tuple[Any, Agent]:
    """Start the runtime of the config, load the model (with progress on a terminal) and build the agent.

    Returns the entered runtime context manager (the caller exits it) and the agent.
    """
    from agent_runtime.agent import host_for
    from agent_runtime.runtime import Runtime

    rt = Runtime.from_config(args.config)
    host = host_for(rt)  # validates the agents and model sections before any server starts
    host.model_override = args.model
    if getattr(args, "device", None) is not None:
        host.model = host.model.model_copy(update={"device": args.device})
    if args.agent not in host.agents:
        host.agent(args.agent)  # raises the typed "no agent named ..." error
    live = console is not None and console.is_terminal
    if live:
        with console.status("starting MCP servers..."):
            await rt.__aenter__()
    else:
        await rt.__aenter__()
    try:
        agent = host.agent(args.agent)
        host.progress = live
        if live:
            with console.status(f"loading model {args.model or agent.config.model or host.model.source}..."):
                await host.backend(agent.config.model)
        else:
            await host.backend(agent.config.model)
    except BaseException as exc:
        await rt.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    return rt, agent


class LiveView:
    """Steps, tool calls and results as they happen, on stderr (rich); nothing when not a terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._text = ""

    def show(self, event: AgentEvent) -> None:
        from rich.markup import escape

        c = self.console
        if c is None:
            return
        t = event.type
        if t == "step_start":
            c.print(f"[bold cyan]step {event.step}[/]")  # type: ignore[union-attr]
        elif t == "tool_call":
            args = json.dumps(event.arguments, ensure_ascii=False)  # type: ignore[union-attr]
            server = f" [dim]({event.server})[/]" if event.server else ""  # type: ignore[union-attr]
            c.print(f"  [yellow]→ {escape(event.name)}[/]{server} {escape(args)}")  # type: ignore[union-attr]
        elif t == "tool_result":
            style = "red" if event.is_error else "green"  # type: ignore[union-attr]
            body = event.observation  # type: ignore[union-attr]
            short = body if len(body) <= 300 else body[:300] + "…"
            c.print(
                f"  [{style}]← {event.outcome}[/] [dim]{event.duration * 1000:.0f} ms[/] {escape(short)}"  # type: ignore[union-attr]
            )
        elif t == "invalid_reply":
            c.print(f"  [red]invalid reply:[/] {escape(event.error)}")  # type: ignore[union-attr]
        elif t == "stopped":
            c.print(f"[bold red]stopped: {event.reason}[/] {escape(event.detail)}")  # type: ignore[union-attr]
        elif t == "usage":
            u = event.usage  # type: ignore[union-attr]
            c.print(
                f"[dim]{u.steps} steps, {u.tool_calls} tool calls, {u.prompt_tokens}+{u.completion_tokens} tokens, "
                f"model {u.model_seconds:.2f} s, tools {u.tool_seconds:.2f} s, total {u.wall_seconds:.2f} s[/]"
            )


def make_console(quiet: bool) -> Any:
    if quiet:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


async def run_task(agent: Agent, task: str, view: LiveView, *, history: Any = None) -> AgentResult:
    from agent_runtime.agent import RunFinished

    result = None
    events = agent.stream(task) if history is None else history.stream(task)
    async for event in events:
        if isinstance(event, RunFinished):
            result = event.result
        else:
            view.show(event)
    assert result is not None
    return result


async def _main(args: argparse.Namespace) -> int:
    console = make_console(args.quiet)
    rt, agent = await open_agent(args, console)
    try:
        result = await run_task(agent, args.task, LiveView(console))
    except BaseException as exc:
        await rt.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await rt.__aexit__(None, None, None)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False, indent=2, default=str) + "\n")
    elif result.answer is not None:
        sys.stdout.write(result.answer + "\n")
    else:
        sys.stderr.write(f"stopped: {result.stop_reason}: {result.detail}\n")
    sys.stdout.flush()
    return 0 if result.ok else 1
