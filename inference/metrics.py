"""Engine metrics: per-request latencies (TTFT, inter-token, queue wait) and per-step batch and KV figures,
kept in bounded windows and summarised into an `EngineMetrics` snapshot; the waits (admission, KV blocks, the
step thread) also as cumulative histograms, which Prometheus can aggregate over time and across processes."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

WINDOW = 4096
# Upper bounds (seconds) of the wait histograms: sub-millisecond hand-offs up to minutes in a queue.
WAIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0,
)  # fmt: skip


@dataclass(slots=True)
class WaitHistogram:
    """Counts of waits per bucket: `counts[i]` waits in (bounds[i-1], bounds[i]], the last one past every bound
    (Prometheus' `le` buckets are their running sums). Not thread-safe by itself: the collector's lock guards it."""

    bounds: tuple[float, ...] = WAIT_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> WaitHistogram:
        return WaitHistogram(self.bounds, list(self.counts), self.sum)


@dataclass(slots=True)
class LatencyStats:
    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    max: float = 0.0

    @classmethod
    def of(cls, values: deque[float] | list[float]) -> LatencyStats:
        if not values:
            return cls()
        s = sorted(values)
        n = len(s)
        return cls(n, sum(s) / n, s[(n - 1) // 2], s[min(n - 1, int(0.95 * (n - 1) + 0.5))], s[-1])


@dataclass(slots=True)
class EngineMetrics:
    """A point-in-time snapshot; latencies in seconds over the last few thousand requests/steps."""

    steps: int
    requests_finished: int
    requests_running: int
    requests_waiting: int
    prompt_tokens: int
    generation_tokens: int
    generation_tokens_per_s: float  # over time spent with work in the engine
    ttft: LatencyStats
    inter_token_latency: LatencyStats
    queue_wait: LatencyStats
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float
    kv_peak_blocks_used: int
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens looked up
    prefix_cache_hit_tokens: int
    preemptions: int
    batch_size_mean: float
    batch_size_max: int
    batched_tokens_mean: float
    max_running_seqs: int
    batch_sizes: list[int] = field(default_factory=list)  # sequences per step, most recent window
    # every wait since the engine started: arrival to first admission into the batch; preempted (for lack of
    # KV blocks) to re-admission; submitted through the async front to taken by the step thread
    queue_wait_histogram: WaitHistogram = field(default_factory=WaitHistogram)
    kv_wait_histogram: WaitHistogram = field(default_factory=WaitHistogram)
    step_wait_histogram: WaitHistogram = field(default_factory=WaitHistogram)


class MetricsCollector:
    """Fed by the engine's step loop (single thread); `snapshot` may be called from any thread."""

    def __init__(self) -> None:
        self.steps = 0
        self.requests_finished = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.busy_time = 0.0
        self.ttft: deque[float] = deque(maxlen=WINDOW)
        self.itl: deque[float] = deque(maxlen=WINDOW)
        self.queue_wait: deque[float] = deque(maxlen=WINDOW)
        self.batch_sizes: deque[int] = deque(maxlen=WINDOW)
        self.batched_tokens: deque[int] = deque(maxlen=WINDOW)
        self.kv_peak_blocks = 0
        self.max_running = 0
        self.queue_wait_hist = WaitHistogram()
        self.kv_wait_hist = WaitHistogram()
        self.step_wait_hist = WaitHistogram()
        # the step thread records while other threads take snapshots; held only for O(1) updates and copies
        self._lock = threading.Lock()

    def record_step(
        self, num_seqs: int, num_tokens: int, duration: float, kv_used: int, running: int
    ) -> None:
        with self._lock:
            self._record_step(num_seqs, num_tokens, duration, kv_used, running)

    def _record_step(
        self, num_seqs: int, num_tokens: int, duration: float, kv_used: int, running: int
    ) -> None:
        self.steps += 1
        self.busy_time += duration
        self.batch_sizes.append(num_seqs)
        self.batched_tokens.append(num_tokens)
        self.kv_peak_blocks = max(self.kv_peak_blocks, kv_used)
        self.max_running = max(self.max_running, running)

    def record_tokens(self, count: int, ttfts: list[float], itls: list[float]) -> None:
        """One step's `count` sampled tokens: the first tokens' times to first token and the others' inter-token
        latencies (one lock per step, not per token)."""
        with self._lock:
            self.generation_tokens += count
            self.ttft.extend(ttfts)
            self.itl.extend(itls)

    def record_admitted(self, queue_wait: float, prompt_tokens: int) -> None:
        with self._lock:
            self.queue_wait.append(queue_wait)
            self.queue_wait_hist.observe(queue_wait)
            self.prompt_tokens += prompt_tokens

    def record_readmitted(self, kv_wait: float) -> None:
        """A preempted sequence is back in the batch after waiting `kv_wait` seconds for KV blocks."""
        with self._lock:
            self.kv_wait_hist.observe(kv_wait)

    def record_step_wait(self, seconds: float) -> None:
        """A request submitted through the async front waited `seconds` for the step thread to take it (the
        step in progress ends first)."""
        with self._lock:
            self.step_wait_hist.observe(seconds)

    def record_finished(self) -> None:
        with self._lock:
            self.requests_finished += 1

    def snapshot(
        self,
        *,
        running: int,
        waiting: int,
        kv_total: int,
        kv_used: int,
        prefix_query: int,
        prefix_hit: int,
        preemptions: int,
    ) -> EngineMetrics:
        with self._lock:
            sizes = list(self.batch_sizes)
            toks = list(self.batched_tokens)
            ttft, itl, wait = list(self.ttft), list(self.itl), list(self.queue_wait)
            waits = (self.queue_wait_hist.copy(), self.kv_wait_hist.copy(), self.step_wait_hist.copy())
            counts = (
                self.steps,
                self.requests_finished,
                self.prompt_tokens,
                self.generation_tokens,
                self.busy_time,
            )
        steps, finished, prompt_tokens, gen_tokens, busy = counts
        return EngineMetrics(
            steps=steps,
            requests_finished=finished,
            requests_running=running,
            requests_waiting=waiting,
            prompt_tokens=prompt_tokens,
            generation_tokens=gen_tokens,
            generation_tokens_per_s=gen_tokens / busy if busy else 0.0,
            ttft=LatencyStats.of(ttft),
            inter_token_latency=LatencyStats.of(itl),
            queue_wait=LatencyStats.of(wait),
            kv_blocks_total=kv_total,
            kv_blocks_used=kv_used,
            kv_usage=kv_used / kv_total if kv_total else 0.0,
            kv_peak_blocks_used=self.kv_peak_blocks,
            prefix_cache_hit_rate=prefix_hit / prefix_query if prefix_query else 0.0,
            prefix_cache_hit_tokens=prefix_hit,
            preemptions=preemptions,
            batch_size_mean=sum(sizes) / len(sizes) if sizes else 0.0,
            batch_size_max=max(sizes, default=0),
            batched_tokens_mean=sum(toks) / len(toks) if toks else 0.0,
            max_running_seqs=self.max_running,
            batch_sizes=sizes,
            queue_wait_histogram=waits[0],
            kv_wait_histogram=waits[1],
            step_wait_histogram=waits[2],
        )
