"""Engine metrics: per-request latencies (TTFT, inter-token, queue wait) and per-step batch and KV figures,
kept in bounded windows and summarised into an `EngineMetrics` snapshot."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

WINDOW = 4096


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
            self.prompt_tokens += prompt_tokens

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
        )
