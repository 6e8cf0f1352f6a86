"""The resource monitor: per-server call statistics, breaker state, in-flight calls and child process
RSS/CPU; it also cancels in-flight calls that outlive their deadline (and counts them).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from agent_runtime.logging import get_logger
from agent_runtime.tools.supervisor import ServerState
from policies.breaker import BreakerEvent, BreakerSet, BreakerState

if TYPE_CHECKING:
    from agent_runtime.tools.supervisor import Supervisor

log = get_logger(__name__)  # structlog, imported on the first record that passes the level

LATENCY_SAMPLES = 2048  # per server, most recent
STALE_GRACE = 0.5  # seconds past its deadline before an in-flight call is cancelled by the sweep
# Upper bounds (seconds) of the wait histograms: a slot freed by a call finishing now, up to minutes of
# approval prompt. The same bounds as the engine's waits (inference.metrics.WAIT_BUCKETS), which this layer
# may not import (it must not load torch).
WAIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0,
)  # fmt: skip


class Waits:
    """A histogram of waits: `counts[i]` waits in (WAIT_BUCKETS[i-1], WAIT_BUCKETS[i]], the last past every
    bound. Fed on the event loop only; a call that finds a slot free costs one increment (`free`)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(WAIT_BUCKETS) + 1)
        self.sum = 0.0

    def free(self) -> None:
        self.counts[0] += 1

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True, eq=False)  # identity-hashed: tracked in a set
class _InFlight:
    server: str
    tool: str
    deadline: float  # anyio.current_time() based
    scope: anyio.CancelScope
    stale: bool = False


@dataclass(slots=True)
class _Stats:
    calls: int = 0
    results: int = 0
    tool_errors: int = 0
    failures: int = 0  # transport failures
    timeouts: int = 0
    denied: int = 0
    breaker_open: int = 0
    stale_cancelled: int = 0
    retries: int = 0
    in_flight: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    slot_wait: Waits = field(default_factory=Waits)  # for one of the server's call slots
    approval_wait: Waits = field(default_factory=Waits)  # for the approver's answer


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """One row of `servers status`, also returned by `Runtime.health()`."""

    name: str
    state: str
    breaker: str
    breaker_retry_in: float | None
    in_flight: int
    calls: int
    errors: int  # tool errors (is_error results)
    failures: int  # transport failures
    timeouts: int
    denied: int
    breaker_rejections: int
    stale_cancelled: int
    retries: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    restarts: int
    last_error: str | None
    pid: int | None
    rss_bytes: int | None  # the server process and its descendants
    cpu_percent: float | None  # since the previous snapshot, all cores summed
    log_messages: int = 0  # the server's log messages that reached our log
    log_dropped: int = 0  # ... dropped by the rate bound (a flooding server)
    progress_dropped: int = 0  # progress reports superseded before the caller's callback took them

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


class Monitor:
    """Fed by the executor (call start/end) and the breakers (state changes); read by the CLI and API."""

    def __init__(self, supervisor: Supervisor | None = None, breakers: BreakerSet | None = None) -> None:
        self.supervisor = supervisor
        self.breakers = breakers
        self._stats: dict[str, _Stats] = {}
        self._in_flight: set[_InFlight] = set()
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (wall time, cpu seconds)
        self.sweeping = False  # `run` is sweeping: in-flight calls past deadline + grace get cancelled
        self.global_slot_wait = Waits()  # for a slot of the global limit (only while that limit binds)

    # -- fed by the executor ----------------------------------------------------------------------------

    def stats(self, server: str) -> _Stats:
        s = self._stats.get(server)
        if s is None:
            s = self._stats[server] = _Stats()
        return s

    def track(self, server: str, tool: str, deadline: float, scope: anyio.CancelScope) -> _InFlight:
        entry = _InFlight(server, tool, deadline, scope)
        self._in_flight.add(entry)
        self.stats(server).in_flight += 1
        return entry

    def untrack(self, entry: _InFlight) -> bool:
        """Forget an in-flight call; True when the sweep cancelled it for outliving its deadline."""
        if entry in self._in_flight:
            self._in_flight.discard(entry)
            self.stats(entry.server).in_flight -= 1
        return entry.stale

    def record(self, server: str, kind: str, duration: float, reason: str | None, attempts: int = 1) -> None:
        s = self.stats(server)
        s.calls += 1
        s.retries += max(0, attempts - 1)
        if kind == "result":
            s.results += 1
        elif kind == "tool_error":
            s.tool_errors += 1
        elif kind == "transport_failure":
            s.failures += 1
        elif kind == "timeout":
            s.timeouts += 1
        elif kind == "breaker_open":
            s.breaker_open += 1
        elif kind in ("denied", "invalid_arguments", "budget_exhausted"):
            s.denied += 1
        if kind in ("result", "tool_error", "transport_failure", "timeout"):
            s.latencies.append(duration)
        if kind in ("transport_failure", "timeout") and reason:
            s.last_error, s.last_error_at = reason, time.time()

    # -- stale calls ------------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Cancel in-flight calls past deadline + grace; returns how many were cancelled now."""
        now = anyio.current_time() if now is None else now
        cancelled = 0
        for entry in list(self._in_flight):
            if not entry.stale and now > entry.deadline + STALE_GRACE:
                entry.stale = True
                entry.scope.cancel()
                self.stats(entry.server).stale_cancelled += 1
                cancelled += 1
                log.warning("stale call cancelled", server=entry.server, tool=entry.tool)
        return cancelled

    async def run(self, interval: float = 0.25) -> None:
        """Sweep forever; run it in a task group that owns it (the runtime's)."""
        self.sweeping = True
        try:
            while True:
                await anyio.sleep(interval)
                self.sweep()
        finally:
            self.sweeping = False

    # -- fed by the breakers ----------------------------------------------------------------------------

    def on_breaker_event(self, event: BreakerEvent) -> None:
        """Breaker state changes become server health (open/degraded/ready) and a log line."""
        server = event.name.split("/", 1)[0]
        emit = log.warning if event.new is BreakerState.OPEN else log.info
        emit("breaker state", breaker=event.name, old=str(event.old), new=str(event.new), reason=event.reason)
        if self.supervisor is None or "/" in event.name:
            return

        state = {
            BreakerState.OPEN: ServerState.OPEN,
            BreakerState.HALF_OPEN: ServerState.DEGRADED,
            BreakerState.CLOSED: ServerState.READY,
        }[event.new]
        try:
            self.supervisor.set_health(
                server, state, event.reason if event.new is not BreakerState.CLOSED else None
            )
        except (KeyError, ValueError, LookupError):
            pass  # an unknown server (a name from a test) or one that is not live: nothing to mark

    # -- read side --------------------------------------------------------------------------------------

    def snapshot(self) -> list[ServerHealth]:
        statuses = self.supervisor.servers() if self.supervisor is not None else []
        names = [s.name for s in statuses] + [n for n in self._stats if n not in {s.name for s in statuses}]
        by_name = {s.name: s for s in statuses}
        rows = []
        for name in names:
            st = by_name.get(name)
            s = self.stats(name)
            lat = sorted(s.latencies)
            breaker = self.breakers.find(name) if self.breakers is not None else None
            snap = breaker.snapshot() if breaker is not None else None
            rss, cpu = self._process(st.pid if st is not None else None)
            p50, p95, p99 = (percentile(lat, q) for q in (0.5, 0.95, 0.99))
            rows.append(
                ServerHealth(
                    name=name,
                    state=str(st.state) if st is not None else "unknown",
                    breaker=str(snap.state) if snap is not None else str(BreakerState.CLOSED),
                    breaker_retry_in=snap.retry_in if snap is not None else None,
                    in_flight=s.in_flight,
                    calls=s.calls,
                    errors=s.tool_errors,
                    failures=s.failures,
                    timeouts=s.timeouts,
                    denied=s.denied,
                    breaker_rejections=s.breaker_open,
                    stale_cancelled=s.stale_cancelled,
                    retries=s.retries,
                    p50_ms=None if p50 is None else p50 * 1000,
                    p95_ms=None if p95 is None else p95 * 1000,
                    p99_ms=None if p99 is None else p99 * 1000,
                    restarts=st.restarts if st is not None else 0,
                    last_error=s.last_error or (st.last_error if st is not None else None),
                    pid=st.pid if st is not None else None,
                    rss_bytes=rss,
                    cpu_percent=cpu,
                    log_messages=st.notices.log_messages if st is not None else 0,
                    log_dropped=st.notices.log_dropped if st is not None else 0,
                    progress_dropped=st.notices.progress_dropped if st is not None else 0,
                )
            )
        return rows

    def _process(self, pid: int | None) -> tuple[int | None, float | None]:
        """RSS and CPU of a server process tree; CPU is the share since the last look at this pid."""
        if pid is None:
            return None, None
        import psutil  # ~15 ms to import: only health snapshots of live servers need it

        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            rss = 0
            cpu_seconds = 0.0
            for p in procs:
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        cpu_seconds += t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None, None
        now = time.monotonic()
        previous = self._cpu.get(pid)
        self._cpu[pid] = (now, cpu_seconds)
        if previous is None:
            # First look: average since the process started, so the first `status` still says something.
            elapsed = max(1e-6, time.time() - root.create_time())
            return rss, 100.0 * cpu_seconds / elapsed
        elapsed = max(1e-6, now - previous[0])
        return rss, max(0.0, 100.0 * (cpu_seconds - previous[1]) / elapsed)


def render_table(rows: list[ServerHealth]) -> Any:
    """A rich Table of the health rows, for `servers status`."""
    from rich.table import Table

    table = Table(title="MCP servers")
    for col in (
        "server",
        "state",
        "breaker",
        "in-flight",
        "calls",
        "err",
        "fail",
        "t/o",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "restarts",
        "rss MiB",
        "cpu %",
    ):
        table.add_column(
            col, no_wrap=True, justify="right" if col not in ("server", "state", "breaker") else "left"
        )
    table.add_column("last error", overflow="fold", min_width=20)

    def ms(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    for r in rows:
        breaker = r.breaker + (f" ({r.breaker_retry_in:.1f}s)" if r.breaker_retry_in is not None else "")
        table.add_row(
            r.name,
            r.state,
            breaker,
            str(r.in_flight),
            str(r.calls),
            str(r.errors),
            str(r.failures),
            str(r.timeouts),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            str(r.restarts),
            "" if r.rss_bytes is None else f"{r.rss_bytes / 2**20:.1f}",
            "" if r.cpu_percent is None else f"{r.cpu_percent:.1f}",
            r.last_error or "",
        )
    return table
