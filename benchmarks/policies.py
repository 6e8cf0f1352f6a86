"""Cost and reaction time of the policy pipeline, against a bare session call on the same server.

    python -m benchmarks.policies [--calls N] [--kills K]

1. Overhead per call: executor.execute (allow/deny, schema, path/URL checks, limits, breaker, retry
   wrapper, deadline, output cap, audit to a file, pinning) versus supervisor.call_tool, interleaved on
   one stdio server (target: under 5% at p50).
2. Time from a server dying (SIGKILL) to its breaker opening, with callers running, at default settings
   (target: under 5 s, the figure mistral.rs claims for its MCP client).
3. Fail-fast latency while the breaker is open (target: under 1 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from agent_runtime.config.types import RuntimeConfig, RuntimeSettings, ServerConfig
from agent_runtime.tools.executor import Executor
from agent_runtime.tools.registry import ToolRegistry
from agent_runtime.tools.supervisor import Supervisor
from policies.breaker import BreakerState
from transports.targets import StdioTarget

FAULTY = str(Path(__file__).resolve().parent.parent / "examples" / "servers" / "faulty_server.py")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(calls: int, kills: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    config = RuntimeConfig(
        servers=(ServerConfig(name="faulty", target=StdioTarget(sys.executable, (FAULTY,))),),
        runtime=RuntimeSettings(),
        path=tmp / "MCP_CONFIG.json",
        sections={"policies": {"audit_path": "audit.jsonl"}},  # audit on: it is part of the pipeline
    )
    registry = ToolRegistry()
    async with Supervisor(config, registry) as sup:
        if not await sup.wait_ready(60):
            raise SystemExit(f"server did not start: {sup.servers()}")
        ex = Executor(sup, registry, config)
        async with anyio.create_task_group() as bg:
            bg.start_soon(ex.serve)  # the audit flusher and stale-call sweep, as the runtime runs them
            out = await _run(sup, ex, calls, kills)
            bg.cancel_scope.cancel()
        ex.close()
    return out


async def _run(sup: Supervisor, ex: Executor, calls: int, kills: int) -> dict[str, object]:
    out: dict[str, object] = {}
    if True:
        args = {"text": "hello"}
        for _ in range(200):  # warm both paths
            await sup.call_tool("faulty", "echo", args, timeout=30)
            await ex.execute("faulty__echo", args)
        bare: list[float] = []
        full: list[float] = []
        for i in range(calls):
            # Interleaved, alternating which goes first, so drift on a shared machine hits both alike.
            order = (True, False) if i % 2 else (False, True)
            for through_pipeline in order:
                t0 = time.perf_counter()
                if through_pipeline:
                    outcome = await ex.execute("faulty__echo", args)
                    full.append(time.perf_counter() - t0)
                    assert outcome.ok, outcome
                else:
                    await sup.call_tool("faulty", "echo", args, timeout=30)
                    bare.append(time.perf_counter() - t0)
        out["bare"], out["full"] = bare, full

        # Time from SIGKILL to the breaker opening, with 4 callers running.
        to_open: list[float] = []
        fail_fast: list[float] = []
        breaker = ex.breakers.get("faulty", ex.policies.for_tool("faulty", "echo").breaker)
        for _ in range(kills):
            with anyio.fail_after(60):
                while sup.server("faulty").state != "ready" or breaker.state is not BreakerState.CLOSED:
                    await ex.execute("faulty__echo", args)
                    await anyio.sleep(0.05)
            opened = anyio.Event()
            unsubscribe_at = ex.breakers.on_change

            def on_change(event, _prev=unsubscribe_at, _opened=opened):  # type: ignore[no-untyped-def]  # defaults bind loop values
                if _prev is not None:
                    _prev(event)
                if event.new is BreakerState.OPEN:
                    _opened.set()

            ex.breakers.on_change = on_change
            stop = anyio.Event()

            async def caller(stop: anyio.Event = stop) -> None:
                while not stop.is_set():
                    await ex.execute("faulty__echo", args)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(caller)
                await anyio.sleep(0.2)
                pid = sup.server("faulty").pid
                assert pid is not None
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                with anyio.fail_after(30):
                    await opened.wait()
                to_open.append(time.perf_counter() - t0)
                stop.set()
            ex.breakers.on_change = unsubscribe_at
            for _ in range(500):
                if breaker.state is not BreakerState.OPEN:
                    break
                t0 = time.perf_counter()
                outcome = await ex.execute("faulty__echo", args)
                elapsed = time.perf_counter() - t0
                if outcome.kind == "breaker_open":
                    fail_fast.append(elapsed)
        out["to_open"], out["fail_fast"] = to_open, fail_fast
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    from agent_runtime.logging import configure_logging

    configure_logging("warning")  # as the CLI does: debug/info logging is off on the call path
    r = anyio.run(measure, args.calls, args.kills)
    bare, full = r["bare"], r["full"]
    to_open, fail_fast = r["to_open"], r["fail_fast"]
    assert isinstance(bare, list) and isinstance(full, list)
    assert isinstance(to_open, list) and isinstance(fail_fast, list)

    table = Table(title=f"policy pipeline vs bare session call (stdio, {len(full)} calls each, interleaved)")
    for col in ("measure", "bare session", "full pipeline", "ratio", "target", "met"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    for label, q in (("p50 latency", 0.5), ("p95 latency", 0.95), ("p99 latency", 0.99)):
        b, f = pct(bare, q), pct(full, q)
        target = "< 5% overhead" if q == 0.5 else ""
        met = ("yes" if f / b < 1.05 else "no") if q == 0.5 else ""
        table.add_row(label, f"{b * 1e3:.3f} ms", f"{f * 1e3:.3f} ms", f"{f / b:.3f}x", target, met)
    over = (pct(full, 0.5) - pct(bare, 0.5)) * 1e6
    table.add_row("p50 overhead per call", "", f"{over:.0f} µs", "", "", "")
    # Each pipeline call next to the bare call of the same iteration: robust to load drift on the machine.
    paired = statistics.median(f - b for f, b in zip(full, bare, strict=True)) * 1e6
    table.add_row(
        "median paired overhead",
        "",
        f"{paired:.0f} µs",
        f"{paired / (pct(bare, 0.5) * 1e6):.3f} of bare p50",
        "< 5%",
        "yes" if paired < 0.05 * pct(bare, 0.5) * 1e6 else "no",
    )
    if to_open:
        worst = max(to_open)
        table.add_row(
            "server death -> breaker open",
            "",
            f"median {statistics.median(to_open):.3f} s, max {worst:.3f} s (n={len(to_open)})",
            f"{worst / 5.0:.3f}x of 5 s",
            "< 5 s (mistral.rs)",
            "yes" if worst < 5.0 else "no",
        )
    if fail_fast:
        table.add_row(
            "fail-fast while open",
            "",
            f"p50 {pct(fail_fast, 0.5) * 1e6:.0f} µs, p99 {pct(fail_fast, 0.99) * 1e6:.0f} µs (n={len(fail_fast)})",
            "",
            "< 1 ms",
            "yes" if pct(fail_fast, 0.99) < 1e-3 else "no",
        )
    Console(width=150).print(table)
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
