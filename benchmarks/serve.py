"""Serving benchmark: `agent-runtime serve` (HTTP + SSE, its own process) against the in-process AsyncEngine on
the same workload: throughput at 1, 16 and 64 concurrent streams and the TTFT overhead at p50.

Run `python -m benchmarks.serve [--quick]`. SmolLM2-135M, greedy, EOS ignored (every request generates exactly
`--max-tokens`), one engine per peer with the same settings, measured measured alternately
(best of `--rounds` per level) so background load hits both alike. Targets: server
throughput >= 90% of in-process, TTFT overhead p50 < 10 ms. Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from inference.config import EngineConfig

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
# the in-process engine and the served one (command-line flags) get the same settings
ENGINE = EngineConfig(kv_cache_memory=256 * 2**20, max_model_len=2048, max_num_seqs=64)


@dataclass(slots=True)
class Run:
    concurrency: int
    requests: int
    tokens: int = 0
    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts) if self.ttfts else float("nan")


def messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Request {i}: write a few sentences about the number {i}."},
    ]


async def drive(concurrency: int, requests: int, one: Callable[[int], Awaitable[tuple[float, int]]]) -> Run:
    """`concurrency` workers take request indices until `requests` are done; wall time covers them all."""
    run = Run(concurrency, requests)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            ttft, tokens = await one(i)
            run.ttfts.append(ttft)
            run.tokens += tokens

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    run.seconds = time.perf_counter() - start
    return run


# ---- peers --------------------------------------------------------------------------------------------------


def in_process(engine: Any, max_tokens: int) -> Callable[[int], Awaitable[tuple[float, int]]]:
    from inference.params import OutputKind, SamplingParams

    async def one(i: int) -> tuple[float, int]:
        # deltas, as the server asks for its streams
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=OutputKind.DELTA
        )
        start = time.perf_counter()
        ttft = None
        tokens = 0
        async for out in engine.generate(messages(i), params):
            if ttft is None and out.delta_text:  # as the server's first content chunk
                ttft = time.perf_counter() - start
            tokens = out.completion_tokens
        return ttft or 0.0, tokens

    return one


def chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    """Request `i` of the workload as a streamed, greedy chat completion of exactly `max_tokens` tokens."""
    return {
        "model": MODEL,
        "messages": messages(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(
    client: httpx.AsyncClient, url: str, i: int, max_tokens: int
) -> tuple[float, float, int]:
    """Request `i` streamed from `url` (a chat completions endpoint): (TTFT, latency, completion tokens), TTFT
    NaN when no content arrived; a non-200 answer raises httpx.HTTPStatusError."""
    start = time.perf_counter()
    ttft = math.nan
    tokens = 0
    async with client.stream("POST", url, json=chat_body(i, max_tokens)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if math.isnan(ttft) and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - start, tokens


def over_http(
    client: httpx.AsyncClient, url: str, max_tokens: int
) -> Callable[[int], Awaitable[tuple[float, int]]]:
    async def one(i: int) -> tuple[float, int]:
        ttft, _, tokens = await stream_chat(client, url + "/v1/chat/completions", i, max_tokens)
        return (0.0 if math.isnan(ttft) else ttft), tokens

    return one


def launch_serve(tmp: Path, options: list[str]) -> tuple[subprocess.Popen[str], str]:
    """`agent-runtime serve` with no MCP servers and the engine `options`, on a free loopback port: the process
    and its URL once it announces LISTENING (the model is loaded then)."""
    config = tmp / "empty.json"
    config.write_text('{"mcpServers": {}}')
    cmd = [sys.executable, "-m", "agent_runtime", "serve", "--config", str(config), "--host", "127.0.0.1",
           "--port", "0", *options]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split()[1]


def start_server(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    return launch_serve(
        tmp,
        ["--kv-cache-memory", str(ENGINE.kv_cache_memory), "--max-model-len", str(ENGINE.max_model_len),
         "--max-num-seqs", str(ENGINE.max_num_seqs)],
    )  # fmt: skip


async def measure(
    url: str, engine: Any, levels: list[tuple[int, int]], max_tokens: int, rounds: int, ttft_pairs: int
) -> tuple[list[Run], list[Run], list[tuple[float, float]]]:
    """Both peers level by level, alternating (server, in-process) for `rounds` rounds so that background
    load hits both alike; per level the best round's throughput and all rounds' TTFTs are kept."""
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        served, local = over_http(client, url, max_tokens), in_process(engine, max_tokens)
        await drive(2, 4, served)  # warm-up: connections, code paths, the system prompt's prefix cache
        await drive(2, 4, local)
        # TTFT overhead: single requests, server and in-process alternating request by request, so drift
        # in background load cancels out in the paired differences.
        pairs: list[tuple[float, float]] = []
        for i in range(ttft_pairs):
            s_ttft, _ = await over_http(client, url, 1)(10_000 + i)
            l_ttft, _ = await in_process(engine, 1)(20_000 + i)
            pairs.append((s_ttft, l_ttft))
        server_runs, local_runs = [], []
        for concurrency, requests in levels:
            best: dict[str, Run] = {}
            ttfts: dict[str, list[float]] = {"server": [], "local": []}
            for _ in range(rounds):
                for name, one in (("server", served), ("local", local)):
                    run = await drive(concurrency, requests, one)
                    ttfts[name] += run.ttfts
                    if name not in best or run.tokens_per_s > best[name].tokens_per_s:
                        best[name] = run
            for name, out in (("server", server_runs), ("local", local_runs)):
                best[name].ttfts = ttfts[name]
                out.append(best[name])
        return server_runs, local_runs, pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per level (best is kept)")
    parser.add_argument(
        "--ttft-pairs", type=int, default=20, help="paired single requests for the TTFT overhead"
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from inference.async_engine import AsyncEngine

    console = Console()
    scale = 1 if args.quick else 2
    levels = [(1, 2 * scale), (16, 16 * scale), (64, 64)]
    console.print(
        f"[bold]serve benchmark[/]: {MODEL}, greedy, {args.max_tokens} tokens per request, levels {levels}"
    )

    engine = AsyncEngine.from_model(MODEL, ENGINE)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = start_server(Path(tmp))
            try:
                server_runs, local_runs, pairs = anyio.run(
                    measure, url, engine, levels, args.max_tokens, args.rounds, args.ttft_pairs
                )
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        engine.close()

    table = Table(
        title=f"agent-runtime serve vs in-process engine ({MODEL}, CPU, {args.max_tokens} tokens/request)"
    )
    for col in (
        "streams",
        "requests",
        "in-process tok/s",
        "server tok/s",
        "ratio",
        "TTFT p50 in-proc",
        "TTFT p50 server",
    ):
        table.add_column(col, justify="right")
    for local, served in zip(local_runs, server_runs, strict=True):
        ratio = served.tokens_per_s / local.tokens_per_s if local.tokens_per_s else float("nan")
        table.add_row(
            str(local.concurrency),
            str(local.requests),
            f"{local.tokens_per_s:.1f}",
            f"{served.tokens_per_s:.1f}",
            f"[{'green' if ratio >= 0.9 else 'red'}]{ratio:.2f}[/]",
            f"{local.ttft_p50 * 1000:.1f} ms",
            f"{served.ttft_p50 * 1000:.1f} ms",
        )
    console.print(table)
    diffs = [(srv - loc) * 1000 for srv, loc in pairs]
    overhead = statistics.median(diffs)
    ttft = Table(title=f"TTFT overhead, {len(pairs)} paired single requests (server, then in-process)")
    for col in ("TTFT p50 in-proc", "TTFT p50 server", "overhead p50 (paired)", "overhead p90"):
        ttft.add_column(col, justify="right")
    ttft.add_row(
        f"{statistics.median(p[1] for p in pairs) * 1000:.1f} ms",
        f"{statistics.median(p[0] for p in pairs) * 1000:.1f} ms",
        f"[{'green' if overhead < 10 else 'red'}]{overhead:+.1f} ms[/]",
        f"{sorted(diffs)[int(0.9 * (len(diffs) - 1))]:+.1f} ms",
    )
    console.print(ttft)
    console.print("targets: throughput ratio >= 0.90 at every level; TTFT overhead at p50 < 10 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
