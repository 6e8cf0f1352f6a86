"""Circuit breakers: a count-based sliding window per server (optionally per tool) that opens on failures.

Closed -> open when, over the last `window_size` calls (at least `minimum_calls`), the failure rate or the
slow-call rate reaches its threshold. Open calls fail fast; after the open duration (growing with each
consecutive trip, capped) a limited number of half-open probes go through: all succeeding closes the
breaker, any failing re-opens it. Callers classify outcomes: transport failures and our own timeouts are
failures, tool results with `is_error` and caller cancellations are neutral.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from policies.clock import Clock, monotonic
from policies.errors import BreakerOpenError

Outcome = Literal["success", "failure", "neutral"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    window_size: int = 20  # calls kept in the sliding window
    failure_rate: float = 0.5  # open when failures / calls >= this
    minimum_calls: int = 5  # no decision before this many calls are in the window
    slow_call_seconds: float = 10.0  # a success slower than this counts as slow
    slow_call_rate: float = 1.0  # open when slow / calls >= this (1.0: only when every call is slow)
    open_seconds: float = 2.0  # first open duration
    open_multiplier: float = 2.0  # growth per consecutive trip
    open_max_seconds: float = 60.0  # cap of the open duration
    half_open_probes: int = 1  # calls let through while half-open; all must succeed to close

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.minimum_calls < 1 or self.half_open_probes < 1:
            raise ValueError("window_size, minimum_calls and half_open_probes must be >= 1")
        if not 0.0 < self.failure_rate <= 1.0 or not 0.0 < self.slow_call_rate <= 1.0:
            raise ValueError("failure_rate and slow_call_rate must be in (0, 1]")
        if self.open_seconds <= 0 or self.open_max_seconds < self.open_seconds or self.open_multiplier < 1:
            raise ValueError("need 0 < open_seconds <= open_max_seconds and open_multiplier >= 1")


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A state change, for the monitor and the logs."""

    name: str
    old: BreakerState
    new: BreakerState
    at: float  # clock time of the change
    reason: str
    retry_at: float | None = None  # when an open breaker lets the next probe through


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    name: str
    state: BreakerState
    calls: int  # in the window
    failures: int
    slow: int
    trips: int  # consecutive trips without a close
    retry_in: float | None  # seconds until a probe is allowed, when open


@dataclass(slots=True)
class Permit:
    """Proof that a call was let through; hand it back to `record` exactly once."""

    probe: bool
    started: float
    generation: int  # a permit from before a state change must not decide the new state
    done: bool = False


@dataclass(slots=True)
class CircuitBreaker:
    name: str
    settings: BreakerSettings = field(default_factory=BreakerSettings)
    clock: Clock = monotonic
    on_change: Callable[[BreakerEvent], None] | None = None
    _state: BreakerState = BreakerState.CLOSED
    _window: deque[tuple[bool, bool]] = field(default_factory=deque)  # (failed, slow)
    _failures: int = 0
    _slow: int = 0
    _trips: int = 0
    _opened_at: float = 0.0
    _retry_at: float = 0.0
    _probes_out: int = 0
    _probes_ok: int = 0
    _generation: int = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() >= self._retry_at:
            self._transition(BreakerState.HALF_OPEN, "open duration elapsed")
        return self._state

    def retry_in(self) -> float | None:
        if self.state is not BreakerState.OPEN:
            return None
        return max(0.0, self._retry_at - self.clock())

    def acquire(self) -> Permit:
        """Let a call through or raise BreakerOpenError at once (never waits)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(probe=False, started=self.clock(), generation=self._generation)
        if (
            state is BreakerState.HALF_OPEN
            and self._probes_out + self._probes_ok < self.settings.half_open_probes
        ):
            self._probes_out += 1
            return Permit(probe=True, started=self.clock(), generation=self._generation)
        # Open, or half-open with every probe slot taken: the probes decide, everyone else fails fast.
        retry = self._retry_at - self.clock() if state is BreakerState.OPEN else 0.0
        raise BreakerOpenError(self.name, max(0.0, retry))

    def record(self, permit: Permit, outcome: Outcome, duration: float | None = None) -> None:
        if permit.done:
            raise RuntimeError("a breaker permit was recorded twice")
        permit.done = True
        if duration is None:
            duration = self.clock() - permit.started
        if permit.generation != self._generation:
            return  # the breaker changed state while this call ran; its verdict belongs to the old state
        if permit.probe:
            self._record_probe(outcome)
            return
        if outcome == "neutral":
            return
        failed = outcome == "failure"
        slow = not failed and duration >= self.settings.slow_call_seconds
        self._push(failed, slow)
        if self._state is BreakerState.CLOSED:
            self._maybe_trip()

    def force_open(self, reason: str) -> None:
        """Open now (e.g. the supervisor saw the server die); counts as a trip."""
        self._trip(reason)

    def reset(self) -> None:
        self._clear_window()
        self._trips = 0
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED, "reset")

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        return BreakerSnapshot(
            name=self.name,
            state=state,
            calls=len(self._window),
            failures=self._failures,
            slow=self._slow,
            trips=self._trips,
            retry_in=max(0.0, self._retry_at - self.clock()) if state is BreakerState.OPEN else None,
        )

    def _record_probe(self, outcome: Outcome) -> None:
        self._probes_out -= 1
        if outcome == "failure":
            self._trip("half-open probe failed")
        elif outcome == "success":
            self._probes_ok += 1
            if self._probes_ok >= self.settings.half_open_probes:
                self._trips = 0
                self._clear_window()
                self._transition(BreakerState.CLOSED, "half-open probes succeeded")
        # neutral: the slot is free again for another probe

    def _push(self, failed: bool, slow: bool) -> None:
        if len(self._window) >= self.settings.window_size:
            old_failed, old_slow = self._window.popleft()
            self._failures -= old_failed
            self._slow -= old_slow
        self._window.append((failed, slow))
        self._failures += failed
        self._slow += slow

    def _maybe_trip(self) -> None:
        calls = len(self._window)
        if calls < self.settings.minimum_calls:
            return
        if self._failures / calls >= self.settings.failure_rate:
            self._trip(f"{self._failures} of the last {calls} calls failed")
        elif self._slow / calls >= self.settings.slow_call_rate:
            self._trip(
                f"{self._slow} of the last {calls} calls were slower than {self.settings.slow_call_seconds}s"
            )

    def _trip(self, reason: str) -> None:
        s = self.settings
        duration = min(s.open_max_seconds, s.open_seconds * s.open_multiplier**self._trips)
        self._trips += 1
        self._opened_at = self.clock()
        self._retry_at = self._opened_at + duration
        self._clear_window()
        self._transition(BreakerState.OPEN, reason)

    def _clear_window(self) -> None:
        self._window.clear()
        self._failures = self._slow = 0
        self._probes_out = self._probes_ok = 0

    def _transition(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        if new is BreakerState.HALF_OPEN:
            self._probes_out = self._probes_ok = 0
        # Re-opening an open breaker is an event too: its retry time moved.
        if self.on_change is not None and (old is not new or new is BreakerState.OPEN):
            retry_at = self._retry_at if new is BreakerState.OPEN else None
            self.on_change(BreakerEvent(self.name, old, new, self.clock(), reason, retry_at))


@dataclass(slots=True)
class BreakerSet:
    """The breakers of a runtime: one per server, plus one per tool where the settings ask for it."""

    clock: Clock = monotonic
    on_change: Callable[[BreakerEvent], None] | None = None
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def get(self, name: str, settings: BreakerSettings) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, settings, self.clock, self._emit)
            self._breakers[name] = breaker
        return breaker

    def find(self, name: str) -> CircuitBreaker | None:
        return self._breakers.get(name)

    def snapshots(self) -> list[BreakerSnapshot]:
        return [b.snapshot() for b in self._breakers.values()]

    def _emit(self, event: BreakerEvent) -> None:
        if self.on_change is not None:
            self.on_change(event)
