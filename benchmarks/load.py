"""Load test: `agent-runtime serve` (its own process on 127.0.0.1) under N concurrent clients with open-loop
arrivals; throughput, TTFT and latency percentiles, errors, and what the server used (CPU, memory, engine queue,
KV cache), with a PNG plot of latency over load.

Run `python -m benchmarks.load [--clients 1 4 16 64] [--max-tokens 16]`. Each of the N clients sends streaming
chat completions at Poisson-distributed times, at `--per-client-rate` requests/s each (default: one over the
latency of a single request on the idle server, measured first, so that N clients offer about N requests in
flight if the server did not slow down). Arrivals do not wait for earlier answers (open loop): when the server
saturates, the queue and the latencies grow instead of the offered load shrinking. Every level is bounded: at
most `--requests` requests (default 2 per client, at least 8, at most 128) and `--level-seconds` seconds; what is
still running then is cancelled and counted as an error. SmolLM2-135M, greedy, EOS ignored (every request
generates exactly `--max-tokens`). Prints a table, writes runs/load.json and runs/load.png; exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import MODEL, launch_serve, stream_chat

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs"


@dataclass(slots=True)
class Level:
    clients: int
    rate: float  # offered requests/s, all clients together
    requests: int = 0  # sent
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0  # first arrival to last answer
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    server_cpu: float = 0.0  # percent of one core, server process and its children
    client_cpu: float = 0.0  # percent of one core, this process (it shares the machine)
    server_rss_peak: int = 0
    waiting_peak: int = 0  # requests queued for admission in the engine
    running_peak: int = 0
    kv_usage_peak: float = 0.0
    admission_wait_mean: float = 0.0  # from the engine's histogram, this level only

    @property
    def req_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def engine_figures(text: str) -> dict[str, float]:
    """The engine's queue, batch and KV figures and its admission-wait histogram totals from /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (
                "agent_runtime_engine_requests_waiting",
                "agent_runtime_engine_requests_running",
                "agent_runtime_kv_cache_usage_ratio",
                "agent_runtime_engine_admission_wait_seconds_sum",
                "agent_runtime_engine_admission_wait_seconds_count",
            ):
                out[s.name.removeprefix("agent_runtime_")] = s.value
    return out


class Sampler:
    """Samples the server's memory and the engine's figures every `interval` seconds while a level runs."""

    def __init__(self, server: psutil.Process, client: httpx.AsyncClient, interval: float = 0.25) -> None:
        self.server = server
        self.client = client
        self.interval = interval

    def processes(self) -> list[psutil.Process]:
        return [self.server, *self.server.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    async def run(self, level: Level) -> None:
        while True:
            rss = 0
            for p in self.processes():
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            level.server_rss_peak = max(level.server_rss_peak, rss)
            try:
                r = await self.client.get("/metrics", timeout=5)
                figures = engine_figures(r.text)
                level.waiting_peak = max(level.waiting_peak, int(figures.get("engine_requests_waiting", 0)))
                level.running_peak = max(level.running_peak, int(figures.get("engine_requests_running", 0)))
                level.kv_usage_peak = max(level.kv_usage_peak, figures.get("kv_cache_usage_ratio", 0.0))
            except httpx.HTTPError:
                pass  # a saturated server may answer late: the next sample tries again
            await anyio.sleep(self.interval)


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float, float, int]:
    """One streaming chat completion on the client's server: (TTFT, latency, completion tokens)."""
    return await stream_chat(client, "/v1/chat/completions", i, max_tokens)


async def run_level(
    client: httpx.AsyncClient,
    sampler: Sampler,
    clients: int,
    per_client_rate: float,
    requests: int,
    max_tokens: int,
    level_seconds: float,
    seed: int,
) -> Level:
    level = Level(clients, clients * per_client_rate)
    rng = random.Random(seed)
    before = engine_figures((await client.get("/metrics")).text)
    cpu0, me0, t0 = sampler.cpu_seconds(), time.process_time(), time.perf_counter()
    errors: Counter[str] = Counter()
    last_done = t0

    async def request(i: int) -> None:
        nonlocal last_done
        try:
            ttft, latency, tokens = await one_request(client, seed * 100_000 + i, max_tokens)
        except httpx.HTTPStatusError as exc:
            errors[f"http {exc.response.status_code}"] += 1
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
        else:
            level.ok += 1
            level.tokens += tokens
            level.ttfts.append(ttft)
            level.latencies.append(latency)
        last_done = time.perf_counter()

    with anyio.move_on_after(level_seconds) as bounded:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run, level)
            async with anyio.create_task_group() as arrivals:
                # the N clients' Poisson arrivals merge into one Poisson process at N times the rate
                for i in range(requests):
                    arrivals.start_soon(request, i)
                    level.requests += 1
                    if i < requests - 1:
                        await anyio.sleep(rng.expovariate(level.rate))
            tg.cancel_scope.cancel()  # every request answered: stop sampling
    if bounded.cancelled_caught:
        unanswered = level.requests - level.ok - sum(errors.values())
        errors["cut at the level's time bound"] += unanswered
        last_done = time.perf_counter()
    level.seconds = last_done - t0
    level.errors = dict(errors)
    level.server_cpu = 100 * (sampler.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    level.client_cpu = 100 * (time.process_time() - me0) / (time.perf_counter() - t0)
    after = engine_figures((await client.get("/metrics")).text)
    count = after.get("engine_admission_wait_seconds_count", 0) - before.get(
        "engine_admission_wait_seconds_count", 0
    )
    total = after.get("engine_admission_wait_seconds_sum", 0) - before.get(
        "engine_admission_wait_seconds_sum", 0
    )
    level.admission_wait_mean = total / count if count else math.nan
    return level


def start_server(tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    options = ["--kv-cache-memory", args.kv_cache_memory, "--max-model-len", "1024",
               "--max-num-seqs", str(args.max_num_seqs), "--max-concurrent", str(args.max_concurrent)]  # fmt: skip
    return launch_serve(tmp, options)


async def measure(url: str, pid: int, args: argparse.Namespace) -> tuple[float, list[Level]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(args.level_seconds, connect=10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        sampler = Sampler(psutil.Process(pid), client)
        # warm-up (code paths, the system prompt's prefix cache), then the idle single-request latency
        for i in range(3):
            await one_request(client, -1 - i, args.max_tokens)
        idle = []
        for i in range(3):
            idle.append((await one_request(client, -10 - i, args.max_tokens))[1])
        per_client = args.per_client_rate or 1 / statistics.median(idle)
        levels = []
        for n, clients in enumerate(args.clients):
            requests = args.requests or min(128, max(8, 2 * clients))
            levels.append(
                await run_level(
                    client, sampler, clients, per_client, requests, args.max_tokens, args.level_seconds, n + 1
                )
            )
        return statistics.median(idle), levels


def plot(levels: list[Level], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[load]')")
        return False
    x = [lv.clients for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for q, style in ((50, "-o"), (95, "--s"), (99, ":^")):
        ax1.plot(x, [pct(lv.latencies, q) for lv in levels], style, label=f"latency p{q}")
    ax1.plot(x, [pct(lv.ttfts, 95) for lv in levels], "-.d", label="TTFT p95")
    ax1.plot(x, [pct(lv.ttfts, 50) for lv in levels], "-x", label="TTFT p50")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent clients (open loop)", ylabel="seconds")
    ax1.set_title("latency over load")
    ax1.set_xticks(x, [str(v) for v in x])
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(x, [lv.tok_per_s for lv in levels], "-o", label="generated tokens/s")
    ax2.set(xscale="log", xlabel="concurrent clients (open loop)", ylabel="tokens/s")
    ax2.set_xticks(x, [str(v) for v in x])
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(x, [lv.server_cpu for lv in levels], "--s", color="tab:red", label="server CPU %")
    ax3.set_ylabel("server CPU, % of one core")
    ax3.set_ylim(0, 100 * (psutil.cpu_count() or 1) * 1.05)
    ax2.set_title("throughput and CPU")
    lines = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
    ax2.legend(lines, [str(h.get_label()) for h in lines], fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="levels of concurrency"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--requests", type=int, default=0, help="per level (default 2 per client, 8..128)")
    parser.add_argument("--level-seconds", type=float, default=90, help="time bound of each level")
    parser.add_argument(
        "--per-client-rate", type=float, default=0, help="requests/s per client (default: 1 / idle latency)"
    )
    parser.add_argument("--kv-cache-memory", default="256MiB", help="the server's KV cache budget")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's batch size")
    parser.add_argument("--max-concurrent", type=int, default=256, help="the server's 429 threshold")
    parser.add_argument("--out", type=Path, default=OUT, help="where load.json and load.png go")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.clients) or args.level_seconds <= 0 or args.max_tokens < 1:
        parser.error("clients, --max-tokens and --level-seconds must be positive")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    cores = psutil.cpu_count()
    console.print(
        f"[bold]load test[/]: {MODEL}, greedy, {args.max_tokens} tokens/request, clients {args.clients}, "
        f"{cores} CPU cores, load average {psutil.getloadavg()[0]:.1f} before the run"
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, url = start_server(Path(tmp), args)
        load_seconds = time.perf_counter() - started
        try:
            idle, levels = anyio.run(measure, url, proc.pid, args)
        finally:
            proc.terminate()
            proc.wait(60)

    title = (
        f"agent-runtime serve under load ({MODEL}, {cores} CPU cores, {args.max_tokens} tokens/request, "
        f"idle latency {idle * 1000:.0f} ms)"
    )
    console.print(f"[bold]{title}[/]")
    base = levels[0].tok_per_s if levels else 0.0

    def ms(v: float) -> str:
        return "-" if math.isnan(v) else f"{v * 1000:.0f} ms"

    tables = {
        "throughput": ["clients", "offered req/s", "sent", "ok", "errors", "req/s", "tok/s", "x 1 client"],
        "latency (client side)": [
            "clients", "TTFT p50", "TTFT p95", "TTFT p99", "latency p50", "latency p95", "latency p99",
        ],
        "where the time goes (server side)": [
            "clients", "queue wait", "waiting max", "running max", "KV max", "server CPU", "server RSS",
            "client CPU",
        ],
    }  # fmt: skip
    rows: dict[str, list[list[str]]] = {name: [] for name in tables}
    for lv in levels:
        rows["throughput"].append(
            [
                str(lv.clients), f"{lv.rate:.1f}", str(lv.requests), str(lv.ok), str(sum(lv.errors.values())),
                f"{lv.req_per_s:.2f}", f"{lv.tok_per_s:.0f}", f"{lv.tok_per_s / base:.2f}" if base else "-",
            ]
        )  # fmt: skip
        rows["latency (client side)"].append(
            [str(lv.clients)] + [ms(pct(lv.ttfts, q)) for q in (50, 95, 99)]
            + [ms(pct(lv.latencies, q)) for q in (50, 95, 99)]
        )  # fmt: skip
        rows["where the time goes (server side)"].append(
            [
                str(lv.clients), ms(lv.admission_wait_mean), str(lv.waiting_peak), str(lv.running_peak),
                f"{lv.kv_usage_peak:.0%}", f"{lv.server_cpu:.0f}%", f"{lv.server_rss_peak / 2**20:.0f} MiB",
                f"{lv.client_cpu:.0f}%",
            ]
        )  # fmt: skip
    for name, columns in tables.items():
        table = Table(title=name)
        for col in columns:
            table.add_column(col, justify="right")
        for row in rows[name]:
            table.add_row(*row)
        console.print(table)
    for lv in levels:
        if lv.errors:
            console.print(f"errors at {lv.clients} clients: {lv.errors}")
    console.print(
        f"server start to ready: {load_seconds:.1f} s; queue wait = mean engine admission wait (arrival to "
        "first admission into the batch); KV max = peak KV-cache usage; CPU in % of one core"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": MODEL,
        "cores": cores,
        "max_tokens": args.max_tokens,
        "idle_latency_s": idle,
        "levels": [
            {
                **asdict(lv),
                "ttfts": None,
                "latencies": None,
                **{f"ttft_p{q}": pct(lv.ttfts, q) for q in (50, 95, 99)},
                **{f"latency_p{q}": pct(lv.latencies, q) for q in (50, 95, 99)},
                "req_per_s": lv.req_per_s,
                "tok_per_s": lv.tok_per_s,
            }
            for lv in levels
        ],
    }
    (args.out / "load.json").write_text(json.dumps(record, indent=2, allow_nan=True))
    if plot(levels, args.out / "load.png", title):
        console.print(f"plot: {args.out / 'load.png'}; figures: {args.out / 'load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
