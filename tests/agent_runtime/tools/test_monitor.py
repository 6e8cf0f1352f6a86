"""The resource monitor: process stats of real servers, latency percentiles, stale-call cancellation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from agent_runtime.tools.monitor import STALE_GRACE, Monitor, percentile, render_table
from tests.agent_runtime.faulty_harness import harness

pytestmark = pytest.mark.anyio


def test_percentile() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.95) == 95 and percentile(values, 0.99) == 99
    assert percentile([], 0.5) is None and percentile([3.0], 0.99) == 3.0


async def test_sweep_cancels_and_counts_stale_calls() -> None:
    monitor = Monitor()
    cancelled = False

    async def call() -> None:
        nonlocal cancelled
        with anyio.CancelScope() as scope:
            entry = monitor.track("s", "t", anyio.current_time() - STALE_GRACE - 0.01, scope)
            await anyio.sleep(10)  # the stale call itself: only the sweep's cancellation ends it
        cancelled = scope.cancelled_caught
        assert monitor.untrack(entry)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()  # the call is tracked and waiting
        assert monitor.stats("s").in_flight == 1
        assert monitor.sweep() == 1
        assert monitor.sweep() == 0  # counted once
    assert cancelled and monitor.stats("s").stale_cancelled == 1 and monitor.stats("s").in_flight == 0


async def test_health_of_a_real_server(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for i in range(20):
            assert (await h.executor.execute("faulty__echo", {"text": str(i)})).ok
        await h.executor.execute("faulty__fail", {})
        await h.executor.execute("faulty__sleep", {"seconds": 5}, timeout=0.2)
        row = next(r for r in h.executor.health() if r.name == "faulty")
        assert (row.calls, row.errors, row.timeouts, row.in_flight) == (22, 1, 1, 0)
        assert row.state == "ready" and row.breaker == "closed" and row.restarts == 0
        assert row.pid == h.supervisor.server("faulty").pid
        assert row.rss_bytes is not None and row.rss_bytes > 10 * 2**20  # a Python process
        assert row.cpu_percent is not None and row.cpu_percent >= 0
        assert row.p50_ms is not None and row.p50_ms <= row.p95_ms <= row.p99_ms
        again = next(r for r in h.executor.health() if r.name == "faulty")  # CPU since the last look
        assert again.cpu_percent is not None
        console = Console(record=True, width=200)
        console.print(render_table(h.executor.health()))
        text = console.export_text()
        assert "faulty" in text and "ready" in text
        assert set(row.to_dict()) >= {"name", "state", "breaker", "p99_ms", "rss_bytes", "cpu_percent"}


async def test_calls_that_outlive_their_deadline_are_cancelled(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        real = h.supervisor.call_tool

        async def deaf_transport(
            server: str,
            tool: str,
            args: Any,
            *,
            timeout: float,  # noqa: ASYNC109
            progress: Any = None,
        ) -> Any:
            # A transport that does not honour its timeout: only the monitor can end this call.
            return await real(server, tool, args, timeout=60, progress=progress)

        h.supervisor.call_tool = deaf_transport  # type: ignore[method-assign]  # on purpose: a transport that ignores its timeout, for this test's harness only
        with anyio.fail_after(10):  # the sweep ends it, not the deaf transport's 60 s
            out = await h.executor.execute("faulty__hang", {}, timeout=0.3)
        assert out.kind == "timeout"
        row = next(r for r in h.executor.health() if r.name == "faulty")
        assert row.stale_cancelled == 1 and row.timeouts == 1 and row.in_flight == 0
