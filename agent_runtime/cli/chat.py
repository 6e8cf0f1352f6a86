"""`agent-runtime chat`: a REPL with one agent; each turn sees the conversation so far (`/reset` clears it)."""

from __future__ import annotations

import argparse
import sys

import anyio

from agent_runtime.cli.common import LiveView, add_common, make_console, open_agent, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    console = make_console(args.quiet)
    view = LiveView(console)
    prompt = "you> " if sys.stdin.isatty() else ""
    async with open_agent(args, console) as agent:
        session = agent.session()
        while True:
            line = await anyio.to_thread.run_sync(_read_line, prompt)
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                sys.stderr.write("(history cleared)\n")
                continue
            result = await run_task(agent, text, view, history=session)
            if result.answer is not None:
                sys.stdout.write(result.answer + "\n")
            else:
                sys.stdout.write(f"(stopped: {result.stop_reason}: {result.detail})\n")
            sys.stdout.flush()
    return 0


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None
