"""Per-call overhead of Connection.call_tool versus the raw SDK Client on the same server (printed, not asserted).

Run with `-s` to see the numbers; the full benchmark lives in benchmarks/.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

import mcp
import pytest
from mcp.client.stdio import StdioServerParameters

from tests.conftest import PYTHON
from tests.transports.conftest import DEMO, demo_target, listening_demo
from transports import HttpTarget, connect

pytestmark = pytest.mark.anyio
CALLS = 500
WARMUP = 20
BUDGET_S = (
    8.0  # per side: on a loaded 2-core box HTTP calls can be slow; stop early rather than stall the suite
)


async def _p50_ms(call: Callable[[str], Awaitable[str]]) -> tuple[float, int]:
    for i in range(WARMUP):
        assert await call(f"w{i}") == f"w{i}"
    samples: list[float] = []
    deadline = time.perf_counter() + BUDGET_S
    for i in range(CALLS):
        if time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        text = await call(f"m{i}")
        samples.append(time.perf_counter() - start)
        assert text == f"m{i}"
    return statistics.median(samples) * 1000, len(samples)


async def _compare(label: str, ours_target: object, raw_server: object) -> tuple[float, float]:
    async with connect(ours_target, startup_timeout=20) as conn:  # type: ignore[arg-type]

        async def ours(text: str) -> str:
            result = await conn.call_tool("echo", {"text": text}, timeout=10)
            return result.content[0].text  # type: ignore[union-attr]

        ours_ms, ours_n = await _p50_ms(ours)
    async with mcp.Client(raw_server, mode="auto") as client:  # type: ignore[arg-type]

        async def raw(text: str) -> str:
            result = await client.call_tool("echo", {"text": text}, read_timeout_seconds=10)
            return result.content[0].text  # type: ignore[union-attr]

        raw_ms, raw_n = await _p50_ms(raw)
    print(
        f"\n[{label}] p50 of sequential echo calls: ours {ours_ms:.3f} ms ({ours_n} calls), "
        f"raw SDK {raw_ms:.3f} ms ({raw_n} calls), ratio {ours_ms / raw_ms:.2f}"
    )
    return ours_ms, raw_ms


async def test_overhead_stdio() -> None:
    ours, raw = await _compare("stdio", demo_target(), StdioServerParameters(command=PYTHON, args=[DEMO]))
    assert ours > 0 and raw > 0


async def test_overhead_streamable_http() -> None:
    with listening_demo("--transport", "http") as (_, url):
        ours, raw = await _compare("http", HttpTarget(url=url), url)
    assert ours > 0 and raw > 0
