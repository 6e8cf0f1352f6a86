"""`agent-runtime run "task"`: run one agent on a task with a live view on stderr and the answer on stdout.

Exit codes: 0 on an answer, 1 when a budget or an error stopped the run, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio

from agent_runtime.cli.common import LiveView, add_common, make_console, open_agent, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="what the agent should do")
    add_common(parser)
    parser.add_argument("--json", action="store_true", help="print the whole transcript as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    return anyio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    console = make_console(args.quiet)
    async with open_agent(args, console) as agent:
        result = await run_task(agent, args.task, LiveView(console))
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False, indent=2, default=str) + "\n")
    elif result.answer is not None:
        sys.stdout.write(result.answer + "\n")
    else:
        sys.stderr.write(f"stopped: {result.stop_reason}: {result.detail}\n")
    sys.stdout.flush()
    return 0 if result.ok else 1
