"""Agent loop benchmark on SmolLM2 and the real mcp-server-time: loop overhead per step (excluding model and tool
time), constrained-decoding cost per token versus unconstrained, and 16 concurrent agents versus one by one.

    python -m benchmarks.agent [--dtype bfloat16|float32] [--agents 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

CITIES = ["Tokyo", "London", "Paris", "Sydney", "Berlin", "Moscow", "Madrid", "Rome",
          "Cairo", "Toronto", "Chicago", "Dubai", "Singapore", "Lisbon", "Vienna", "Seoul"]  # fmt: skip


def _config(folder: Path) -> Path:
    from tests.agent_runtime.agent_fixtures import time_agent, time_server, write_config

    return write_config(folder, {"time": time_server()}, {"default": time_agent()})


async def _timed_tokens(backend: Any, request: Any) -> tuple[int, float]:
    """(completion tokens, seconds per token after the first) for one request."""
    stamps: list[float] = []
    n = 0
    async for chunk in backend.generate(request):
        stamps.append(time.perf_counter())
        n = chunk.completion_tokens
    if len(stamps) < 3:
        return n, float("nan")
    return n, (stamps[-1] - stamps[0]) / max(1, n - 1)


async def bench(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    from agent_runtime import AgentHost, LocalEngineBackend, Runtime
    from agent_runtime.agents.llm import GenerationRequest
    from agent_runtime.config.agents import ModelSettings
    from inference.formats import make_format

    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp))
        async with Runtime.from_config(cfg) as rt:
            backend = await LocalEngineBackend.load(ModelSettings(dtype=args.dtype, max_num_seqs=32))
            host = AgentHost(rt, backend=backend)
            agent = host.agent("default")
            await agent.run("What time is it in Oslo?")  # warm up: prefix cache, grammar compile

            # 1. loop overhead per step
            overheads: list[float] = []
            for i in range(args.repeats):
                r = await agent.run(f"What time is it in {CITIES[i % len(CITIES)]}?")
                overheads.append(r.usage.loop_seconds / max(1, r.usage.steps))
            loop_ms = statistics.median(overheads) * 1000
            rows.append(
                (
                    "loop overhead per step",
                    f"{loop_ms:.2f} ms",
                    "model + tool time excluded",
                    "< 5 ms",
                    "ok" if loop_ms < 5 else "MISS",
                )
            )

            # 2. constrained vs unconstrained decoding per token (same prompt, same token count)
            fmt = make_format("json")
            tools = agent.tools()
            msgs, _ = fmt.messages(
                agent.config.system_prompt,
                tools,
                agent.config.examples or [],
                [{"role": "user", "content": "What time is it in Tokyo?"}],
            )
            spec = fmt.grammar(tools, "auto", thoughts=False, max_parallel=agent.config.parallel_tool_calls)
            cons, free = [], []
            for _ in range(args.repeats):
                n, c = await _timed_tokens(backend, GenerationRequest(msgs, None, spec, max_tokens=64))
                _, u = await _timed_tokens(backend, GenerationRequest(msgs, None, None, max_tokens=n))
                cons.append(c)
                free.append(u)
            c_ms, u_ms = statistics.median(cons) * 1000, statistics.median(free) * 1000
            over = (c_ms / u_ms - 1) * 100
            rows.append(
                (
                    "decode per token, constrained",
                    f"{c_ms:.2f} ms",
                    f"unconstrained {u_ms:.2f} ms: {over:+.1f}%",
                    "< +10%",
                    "ok" if over < 10 else "MISS",
                )
            )

            # 3. N concurrent agents vs one by one
            tasks = [f"What time is it in {c}?" for c in CITIES[: args.agents]]
            t0 = time.perf_counter()
            seq = [await agent.run(t) for t in tasks]
            seq_s = time.perf_counter() - t0
            before = backend.metrics().batch_size_max
            results: list[Any] = [None] * len(tasks)

            async def one(i: int) -> None:
                results[i] = await agent.run(tasks[i])

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(len(tasks)):
                    tg.start_soon(one, i)
            conc_s = time.perf_counter() - t0
            ratio = conc_s / seq_s * 100
            ok = sum(r.ok for r in results)
            rows.append((
                f"{len(tasks)} agents concurrent", f"{conc_s:.2f} s",
                f"one by one {seq_s:.2f} s: {ratio:.0f}% (answers {ok}/{len(tasks)}, max batch {max(before, backend.metrics().batch_size_max)})",
                "<= 35%", "ok" if ratio <= 35 else "MISS",
            ))  # fmt: skip
            _ = seq
            await backend.aclose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    rows = anyio.run(bench, args)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent loop on SmolLM2-135M ({args.dtype}, CPU) with mcp-server-time")
    for col in ("measure", "value", "versus peer (same run)", "target", ""):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
