"""Tool-call overhead of the runtime against the raw SDK `mcp.Client`, and concurrent start-up of 9 servers.

    python -m benchmarks.tool_calls [--calls 2000] [--callers 50] [--servers 9]

Same server program (examples/servers/demo_server.py, tool `echo`) for both sides, over stdio and streamable
HTTP, measured in the same run with alternating blocks so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent_runtime.config.types import RuntimeConfig, RuntimeSettings, ServerConfig, ServerTimeouts
from agent_runtime.logging import configure_logging
from agent_runtime.tools.runtime import Runtime
from transports.targets import HttpTarget, StdioTarget

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "examples" / "servers" / "demo_server.py")
PAYLOAD = {"text": "x" * 64}

Call = Callable[[], Awaitable[Any]]


@dataclasses.dataclass(slots=True)
class Latency:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        q = statistics.quantiles(samples, n=100, method="inclusive")
        return cls(q[49], q[94], q[98])


async def sequential(
    call: Call, n: int, samples: list[float], until: float, progress: Callable[[int], None]
) -> None:
    for _ in range(n):
        if time.perf_counter() > until:
            return
        t = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t)
        progress(1)


async def throughput(call: Call, total: int, callers: int, progress: Callable[[int], None]) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()
            progress(1)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(worker)
    return total / (time.perf_counter() - t)


@dataclasses.dataclass(slots=True)
class Result:
    raw: Latency
    ours: Latency
    samples: int  # sequential calls per side (fewer than asked when the time budget ran out)
    raw_tp: float
    our_tp: float


async def compare(
    label: str, raw: Call, ours: Call, calls: int, callers: int, budget: float, prog: Progress
) -> Result:
    for _ in range(50):  # warm-up: imports, caches, pipe and socket buffers
        await raw()
        await ours()
    task = prog.add_task(f"{label}: {calls} sequential calls x2 (at most {budget:g}s)", total=2 * calls)
    step = lambda k: prog.advance(task, k)  # noqa: E731
    raw_s: list[float] = []
    our_s: list[float] = []
    block = 100
    deadline = time.perf_counter() + 2 * budget
    for start in range(0, calls, block):  # alternate blocks so drift and noise hit both sides alike
        if time.perf_counter() > deadline:
            break
        before = len(raw_s)
        await sequential(raw, min(block, calls - start), raw_s, deadline, step)
        await sequential(ours, len(raw_s) - before, our_s, math.inf, step)
    half = max(callers, calls // 2)
    task2 = prog.add_task(f"{label}: {callers} concurrent callers x2", total=4 * half)
    step2 = lambda k: prog.advance(task2, k)  # noqa: E731
    raw_tp: list[float] = []
    our_tp: list[float] = []
    for _ in range(2):
        raw_tp.append(await throughput(raw, half, callers, step2))
        our_tp.append(await throughput(ours, half, callers, step2))
    return Result(Latency.of(raw_s), Latency.of(our_s), len(our_s), max(raw_tp), max(our_tp))


def runtime_for(servers: list[ServerConfig], callers: int = 50) -> Runtime:
    # The raw client has no concurrency cap; lift the executor's per-server default (5) to the caller
    # count so the throughput rows compare transports and pipeline, not a configured limit.
    settings = RuntimeSettings(max_concurrent_calls=callers, max_concurrent_calls_global=max(64, callers))
    return Runtime(RuntimeConfig(servers=tuple(servers), runtime=settings), ready_timeout=60)


async def bench_stdio(calls: int, callers: int, budget: float, prog: Progress) -> Result:
    params = StdioServerParameters(command=sys.executable, args=[DEMO])
    server = ServerConfig("demo", StdioTarget(sys.executable, (DEMO,)))
    async with mcp.Client(params) as client, runtime_for([server], callers) as rt:
        return await compare(
            "stdio",
            lambda: client.call_tool("echo", PAYLOAD),
            lambda: rt.call_tool("demo__echo", PAYLOAD),
            calls,
            callers,
            budget,
            prog,
        )


def start_http_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, DEMO, "--transport", "http", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise RuntimeError(f"demo HTTP server did not start: {line!r}")
    return proc, line.split()[1]


def stop_http_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def bench_http(calls: int, callers: int, budget: float, prog: Progress) -> Result:
    proc, url = await anyio.to_thread.run_sync(start_http_server)
    try:
        server = ServerConfig("demo", HttpTarget(url))
        async with mcp.Client(url) as client, runtime_for([server], callers) as rt:
            return await compare(
                "http",
                lambda: client.call_tool("echo", PAYLOAD),
                lambda: rt.call_tool("demo__echo", PAYLOAD),
                calls,
                callers,
                budget,
                prog,
            )
    finally:
        await anyio.to_thread.run_sync(stop_http_server, proc)


async def bench_startup(n: int, prog: Progress) -> tuple[float, float]:
    """Seconds until n stdio servers are initialized with tools listed: one after another vs the supervisor."""
    task = prog.add_task(f"start-up of {n} stdio servers, sequential then supervised", total=2 * n)
    params = StdioServerParameters(command=sys.executable, args=[DEMO])
    t = time.perf_counter()
    async with AsyncExitStack() as stack:
        for _ in range(n):
            client = await stack.enter_async_context(mcp.Client(params))
            await client.list_tools()
            prog.advance(task)
        seq = time.perf_counter() - t
    servers = [
        ServerConfig(f"s{i}", StdioTarget(sys.executable, (DEMO,)), timeouts=ServerTimeouts(startup=60))
        for i in range(n)
    ]
    rt = runtime_for(servers)
    t = time.perf_counter()
    async with rt:
        concurrent = time.perf_counter() - t
        ready = sum(1 for s in rt.servers() if s.state == "ready")
        prog.advance(task, n)
    if ready != n:
        raise RuntimeError(f"only {ready} of {n} supervised servers got ready")
    return seq, concurrent


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def ratio(ours: float, raw: float, target: str) -> str:
    return f"{ours / raw:.2f} ({target})"


async def main(calls: int, callers: int, servers: int, budget: float) -> None:
    configure_logging("error")
    console = Console()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as prog:
        stdio = await bench_stdio(calls, callers, budget, prog)
        http = await bench_http(calls, callers, budget, prog)
        seq, conc = await bench_startup(servers, prog)

    table = Table(title="tool calls: agent-runtime vs raw mcp.Client (demo_server echo, same run)")
    for col in ("transport", "metric", "raw SDK", "runtime", "runtime/raw (target)"):
        table.add_column(col, justify="right" if col not in ("transport", "metric") else "left")
    for label, r in (("stdio", stdio), ("http", http)):
        table.add_row(
            label,
            f"p50 ms ({r.samples} seq.)",
            ms(r.raw.p50),
            ms(r.ours.p50),
            ratio(r.ours.p50, r.raw.p50, "<= 1.10"),
        )
        table.add_row(label, "p95 ms", ms(r.raw.p95), ms(r.ours.p95), f"{r.ours.p95 / r.raw.p95:.2f}")
        table.add_row(label, "p99 ms", ms(r.raw.p99), ms(r.ours.p99), f"{r.ours.p99 / r.raw.p99:.2f}")
        table.add_row(
            label,
            f"calls/s, {callers} callers",
            f"{r.raw_tp:.0f}",
            f"{r.our_tp:.0f}",
            ratio(r.our_tp, r.raw_tp, ">= 0.90"),
            end_section=True,
        )
    table.add_row(
        "stdio",
        f"ready: {servers} servers, s",
        f"{seq:.2f} one by one",
        f"{conc:.2f} supervisor",
        ratio(conc, seq, "<= 0.60"),
    )
    console.print(table)


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--servers", type=int, default=9)
    parser.add_argument(
        "--budget", type=float, default=15.0, help="seconds per side, about, for the sequential calls"
    )
    args = parser.parse_args()
    anyio.run(main, args.calls, args.callers, args.servers, args.budget)


if __name__ == "__main__":
    cli()
