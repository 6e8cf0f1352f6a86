"""Sequential calls through Connection.call_tool and through the raw SDK Client on the same server: every call
answers its own request. The per-call p50 of each is printed, never asserted (`-s` shows it); the benchmark with
enough calls to compare them is `python -m benchmarks.tool_calls`.
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
CALLS = 100  # enough to show a p50 in the output; the benchmark's numbers come from benchmarks/
WARMUP = 10


async def _p50_ms(call: Callable[[str], Awaitable[str]]) -> tuple[float, int]:
    for i in range(WARMUP):
        assert await call(f"w{i}") == f"w{i}"
    samples: list[float] = []
    for i in range(CALLS):
        start = time.perf_counter()
        text = await call(f"m{i}")
        samples.append(time.perf_counter() - start)
        assert text == f"m{i}"  # each answer is its own request's, in order
    return statistics.median(samples) * 1000, len(samples)


async def _compare(label: str, ours_target: object, raw_server: object) -> tuple[float, float]:
    async with connect(ours_target, startup_timeout=20) as conn:  # type: ignore[arg-type]  # the callers pass a StdioTarget or an HttpTarget

        async def ours(text: str) -> str:
            result = await conn.call_tool("echo", {"text": text}, timeout=10)
            return result.content[0].text  # type: ignore[union-attr]  # the demo's echo answers in a text block

        ours_ms, ours_n = await _p50_ms(ours)
    async with mcp.Client(raw_server, mode="auto") as client:  # type: ignore[arg-type]  # the callers pass StdioServerParameters or a URL

        async def raw(text: str) -> str:
            result = await client.call_tool("echo", {"text": text}, read_timeout_seconds=10)
            return result.content[0].text  # type: ignore[union-attr]  # echo's text block, through the SDK's client

        raw_ms, raw_n = await _p50_ms(raw)
    print(
        f"\n[{label}] p50 of sequential echo calls: ours {ours_ms:.3f} ms ({ours_n} calls), "
        f"raw SDK {raw_ms:.3f} ms ({raw_n} calls), ratio {ours_ms / raw_ms:.2f}"
    )
    return ours_ms, raw_ms


async def test_overhead_stdio() -> None:
    await _compare("stdio", demo_target(), StdioServerParameters(command=PYTHON, args=[DEMO]))


async def test_overhead_streamable_http() -> None:
    with listening_demo("--transport", "http") as (_, url):
        await _compare("http", HttpTarget(url=url), url)
