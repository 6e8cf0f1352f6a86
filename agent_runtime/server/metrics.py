"""Prometheus metrics for `/metrics`: HTTP requests, streaming latencies, the engine's snapshot, MCP servers and
event-loop lag, in one registry per server (so several apps in one process never share counters)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent_runtime.tools.monitor import WAIT_BUCKETS

if TYPE_CHECKING:
    from agent_runtime.tools.audit import AuditLog
    from agent_runtime.tools.monitor import Monitor

NS = "agent_runtime"

# Buckets sized for a local engine: sub-millisecond HTTP overhead up to minute-long agent runs.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# Breaker-facing view of the supervisor's server states (numeric so Grafana can colour thresholds).
STATE_CODES = {"ready": 0, "degraded": 1, "open": 2, "starting": 3, "failed": 4, "stopped": 5}
BREAKER_CODES = {"ready": 0, "degraded": 1, "open": 2}  # closed, half-open/failing, open


class ServerMetrics:
    """All metrics of one API server. HTTP and streaming figures are observed as requests run; the engine
    and MCP figures are read from their snapshots at scrape time (no background polling)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            f"{NS}_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            f"{NS}_http_request_duration_seconds",
            "HTTP request latency (to the last byte) by route, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            f"{NS}_http_requests_in_flight", "HTTP requests being served", ["route"], registry=r
        )
        self.rejected = Counter(
            f"{NS}_http_rejected_requests",
            "Requests refused before running (capacity, auth, limits)",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{NS}_time_to_first_token_seconds",
            "From request arrival to the first generated token, as the client sees it",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{NS}_inter_token_latency_seconds",
            "Time between consecutive token outputs of one stream",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{NS}_generation_duration_seconds",
            "From arrival to the last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prep = Histogram(
            f"{NS}_request_preprocess_seconds",
            "From arrival to submission to the engine (parsing, templating, grammar compilation)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{NS}_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter(f"{NS}_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter(
            f"{NS}_requests_finished", "Generations by finish reason", ["model", "finish_reason"], registry=r
        )
        self.event_loop_lag = Histogram(
            f"{NS}_event_loop_lag_seconds",
            "How late the event loop wakes a sleeper (time lost to blocking work on the loop)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.event_loop_lag_last = Gauge(
            f"{NS}_event_loop_lag_last_seconds", "The latest event-loop lag sample", registry=r
        )

    # -- sources read at scrape time ----------------------------------------------------------------------

    def attach_engine(self, model: str, metrics: Callable[[], Any]) -> None:
        """Export the engine snapshot returned by `metrics()` (an inference.metrics.EngineMetrics)."""
        self.registry.register(_EngineCollector(model, metrics))

    def attach_servers(self, servers: Callable[[], list[Any]], stats: Monitor | None = None) -> None:
        """Export per-MCP-server state from `servers()` (ServerStatus list) and, when given, the per-server
        call statistics the `stats` monitor keeps (agent_runtime.tools.monitor)."""
        self.registry.register(_McpCollector(servers, stats))

    def attach_audit(self, audit: AuditLog) -> None:
        """Export the audit log's failure counters (agent_runtime.tools.audit)."""
        self.registry.register(_AuditCollector(audit))

    # -- observations ---------------------------------------------------------------------------------------

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_latency.labels(*labels).observe(seconds)

    async def watch_event_loop(self, interval: float = 0.25) -> None:
        """Sample event-loop lag forever (run it in a task group; cancel to stop)."""
        while True:
            start = time.perf_counter()
            await anyio.sleep(interval)
            lag = max(0.0, time.perf_counter() - start - interval)
            self.event_loop_lag.observe(lag)
            self.event_loop_lag_last.set(lag)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StreamTimer:
    """Per-request TTFT / inter-token / end-to-end observations, fed from the stream of engine outputs."""

    __slots__ = ("_itl", "_last", "_m", "_model", "arrival", "first")

    def __init__(self, metrics: ServerMetrics, model: str, arrival: float) -> None:
        self._m = metrics
        self._model = model
        self._itl = metrics.itl.labels(model)  # looked up once: observed for every token
        self.arrival = arrival
        self.first: float | None = None
        self._last: float | None = None

    def submitted(self) -> None:
        self._m.prep.labels(self._model).observe(time.perf_counter() - self.arrival)

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.perf_counter()
        if self.first is None:
            self.first = t
            self._m.ttft.labels(self._model).observe(t - self.arrival)
        elif self._last is not None:
            # Several tokens in one output (a detokenizer hold-back) share the gap evenly.
            gap = (t - self._last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self._last = t

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        m = self._m
        m.e2e.labels(self._model).observe(time.perf_counter() - self.arrival)
        m.prompt_tokens.labels(self._model).inc(prompt_tokens)
        m.generation_tokens.labels(self._model).inc(completion_tokens)
        m.finished.labels(self._model, reason).inc()


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", doc, labels=labels)


def _add_buckets(
    family: HistogramMetricFamily,
    labels: list[str],
    bounds: tuple[float, ...],
    counts: list[int],
    total: float,
) -> None:
    """One histogram series from per-bucket counts (the last past every bound), as Prometheus' cumulative
    `le` buckets."""
    cum: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip(bounds, counts, strict=False):
        acc += n
        cum.append((floatToGoString(bound), acc))
    cum.append(("+Inf", acc + sum(counts[len(bounds) :])))
    family.add_metric(labels, cum, total)


class _EngineCollector(Collector):
    def __init__(self, model: str, metrics: Callable[[], Any]) -> None:
        self.model = model
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self.metrics()
        m = [self.model]
        simple = [
            (
                "engine_tokens_per_second",
                "Generation throughput while the engine has work",
                s.generation_tokens_per_s,
            ),
            ("engine_requests_running", "Requests in the running batch", s.requests_running),
            ("engine_requests_waiting", "Requests queued for admission", s.requests_waiting),
            ("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", s.kv_usage),
            ("kv_cache_blocks_used", "KV-cache blocks in use", s.kv_blocks_used),
            ("kv_cache_blocks_total", "KV-cache blocks available", s.kv_blocks_total),
            (
                "prefix_cache_hit_rate",
                "Cached prompt tokens / prompt tokens looked up",
                s.prefix_cache_hit_rate,
            ),
            ("engine_batch_size_mean", "Mean sequences per engine step (recent window)", s.batch_size_mean),
        ]
        for name, doc, value in simple:
            g = _gauge(name, doc, ["model"])
            g.add_metric(m, float(value))
            yield g
        for name, doc, value in [
            (
                "engine_preemptions",
                "Sequences preempted (recomputed later) for lack of KV blocks",
                s.preemptions,
            ),
            ("engine_steps", "Engine steps run", s.steps),
            ("engine_prompt_tokens", "Prompt tokens admitted by the engine", s.prompt_tokens),
            ("engine_generation_tokens", "Tokens generated by the engine", s.generation_tokens),
            (
                "engine_prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache",
                s.prefix_cache_hit_tokens,
            ),
        ]:
            c = CounterMetricFamily(f"{NS}_{name}", doc, labels=["model"])
            c.add_metric(m, float(value))
            yield c
        # The engine keeps windows of raw latencies; quantile gauges carry them without double-counting.
        for name, doc, stats in [
            (
                "engine_queue_wait_seconds",
                "Arrival to admission into the batch (waiting, not computing)",
                s.queue_wait,
            ),
            ("engine_ttft_seconds", "Engine-side time to first token", s.ttft),
            ("engine_inter_token_latency_seconds", "Engine-side time between tokens", s.inter_token_latency),
        ]:
            g = _gauge(name, doc, ["model", "quantile"])
            for q, v in (("0.5", stats.p50), ("0.95", stats.p95), ("1", stats.max)):
                g.add_metric([*m, q], float(v))
            yield g
        # Every wait since the engine started, as histograms (rates, quantiles over any range, aggregation).
        for name, doc, hist in [
            (
                "engine_admission_wait_seconds",
                "Arrival to first admission into the batch (the engine's queue)",
                s.queue_wait_histogram,
            ),
            (
                "engine_kv_wait_seconds",
                "Preempted for lack of KV blocks until re-admitted into the batch",
                s.kv_wait_histogram,
            ),
            (
                "engine_step_wait_seconds",
                "Submitted through the async front until the step thread takes the request (the step in "
                "progress ends first)",
                s.step_wait_histogram,
            ),
        ]:
            h = HistogramMetricFamily(f"{NS}_{name}", doc, labels=["model"])
            _add_buckets(h, m, hist.bounds, hist.counts, hist.sum)
            yield h


class _McpCollector(Collector):
    """Per-server state from the supervisor and call statistics from the monitor (agent_runtime.tools.monitor).

    The monitor keeps counters and a window of recent latencies; the latency histogram folds in the samples
    recorded since the previous scrape, so it stays cumulative as Prometheus requires.
    """

    def __init__(self, servers: Callable[[], list[Any]], monitor: Monitor | None) -> None:
        self.servers = servers
        self.monitor = monitor
        self._seen: dict[str, int] = {}  # latency-bearing calls already folded in, per server
        self._buckets: dict[str, list[int]] = {}
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        up = _gauge("mcp_server_up", "1 when the server has a live session", ["server"])
        state = _gauge(
            "mcp_server_state",
            "Server state: 0 ready, 1 degraded, 2 open, 3 starting, 4 failed, 5 stopped",
            ["server"],
        )
        breaker = _gauge(
            "mcp_server_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["server"]
        )
        tools = _gauge("mcp_server_tools", "Tools the server offers", ["server"])
        restarts = CounterMetricFamily(
            f"{NS}_mcp_server_restarts", "Reconnect attempts after the first start", labels=["server"]
        )
        notices = CounterMetricFamily(
            f"{NS}_mcp_server_notifications_dropped",
            "Server notifications dropped: log messages over the rate bound, progress reports superseded",
            labels=["server", "kind"],
        )
        statuses = self.servers()
        for st in statuses:
            code = str(st.state)
            up.add_metric([st.name], 1.0 if code in BREAKER_CODES else 0.0)
            state.add_metric([st.name], float(STATE_CODES.get(code, 4)))
            breaker.add_metric([st.name], float(self._breaker(st.name, code)))
            tools.add_metric([st.name], float(st.tool_count))
            restarts.add_metric([st.name], float(st.restarts))
            counted = getattr(st, "notices", None)  # a ServerStatus has them; other status rows may not
            if counted is not None:
                notices.add_metric([st.name, "log"], float(counted.log_dropped))
                notices.add_metric([st.name, "progress"], float(counted.progress_dropped))
        yield from (up, state, breaker, tools, restarts, notices)
        if self.monitor is None:
            return
        calls = CounterMetricFamily(
            f"{NS}_mcp_calls", "Tool calls by server and outcome", labels=["server", "outcome"]
        )
        errors = CounterMetricFamily(
            f"{NS}_mcp_errors", "Tool calls that failed (transport failure or timeout)", labels=["server"]
        )
        in_flight = _gauge("mcp_calls_in_flight", "Tool calls in flight", ["server"])
        hist = HistogramMetricFamily(
            f"{NS}_mcp_call_duration_seconds", "Tool call latency by server", labels=["server"]
        )
        slot_wait = HistogramMetricFamily(
            f"{NS}_mcp_call_slot_wait_seconds",
            "Time a tool call waited for one of its server's concurrency slots (0 when one was free)",
            labels=["server"],
        )
        approval_wait = HistogramMetricFamily(
            f"{NS}_mcp_approval_wait_seconds",
            "Time a tool call waited for the approver's answer (calls that need approval)",
            labels=["server"],
        )
        for st in statuses:
            s = self.monitor.stats(st.name)
            for outcome, value in (
                ("result", s.results),
                ("tool_error", s.tool_errors),
                ("transport_failure", s.failures),
                ("timeout", s.timeouts),
                ("breaker_open", s.breaker_open),
                ("denied", s.denied),
            ):
                calls.add_metric([st.name, outcome], float(value))
            errors.add_metric([st.name], float(s.failures + s.timeouts))
            in_flight.add_metric([st.name], float(s.in_flight))
            self._fold(st.name, s.results + s.tool_errors + s.failures + s.timeouts, list(s.latencies))
            cum, acc = [], 0
            for bound, n in zip(LATENCY_BUCKETS, self._buckets[st.name], strict=False):
                acc += n
                cum.append((floatToGoString(bound), acc))
            cum.append(("+Inf", self._count[st.name]))
            hist.add_metric([st.name], cum, self._sum[st.name])
            _add_buckets(slot_wait, [st.name], WAIT_BUCKETS, s.slot_wait.counts, s.slot_wait.sum)
            _add_buckets(approval_wait, [st.name], WAIT_BUCKETS, s.approval_wait.counts, s.approval_wait.sum)
        global_wait = HistogramMetricFamily(
            f"{NS}_mcp_global_call_slot_wait_seconds",
            "Time a tool call waited for a slot of the global concurrency limit (only while that limit binds)",
        )
        g = self.monitor.global_slot_wait
        _add_buckets(global_wait, [], WAIT_BUCKETS, g.counts, g.sum)
        yield from (calls, errors, in_flight, hist, slot_wait, approval_wait, global_wait)

    def _breaker(self, name: str, state_code: str) -> int:
        breakers = getattr(self.monitor, "breakers", None)
        found = breakers.find(name) if breakers is not None else None
        if found is not None:
            return {"closed": 0, "half_open": 1, "open": 2}.get(str(found.snapshot().state), 1)
        return BREAKER_CODES.get(state_code, 0)

    def _fold(self, name: str, total: int, window: list[float]) -> None:
        if name not in self._buckets:
            self._buckets[name] = [0] * (len(LATENCY_BUCKETS) + 1)
            self._sum[name], self._count[name], self._seen[name] = 0.0, 0, 0
        new = max(0, total - self._seen[name])
        self._seen[name] = total
        for v in window[len(window) - min(new, len(window)) :] if new else []:
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if v <= b), len(LATENCY_BUCKETS))
            self._buckets[name][i] += 1
            self._sum[name] += v
            self._count[name] += 1


class _AuditCollector(Collector):
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def collect(self) -> Iterator[Metric]:
        a = self.audit
        for name, doc, value in [
            (
                "audit_write_failures",
                "Writes of the audit log file that failed (disk full, permissions)",
                a.write_failures,
            ),
            ("audit_records_lost", "Audit records lost in failed writes", a.records_lost),
            ("audit_encode_failures", "Audit records that could not be encoded (dropped)", a.encode_failures),
        ]:
            c = CounterMetricFamily(f"{NS}_{name}", doc)
            c.add_metric([], float(value))
            yield c
