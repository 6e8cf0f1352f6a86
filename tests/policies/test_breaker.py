"""Circuit breaker state machine under a manual clock."""

from __future__ import annotations

import pytest

from policies.breaker import BreakerEvent, BreakerSet, BreakerSettings, BreakerState, CircuitBreaker
from policies.clock import ManualClock
from policies.errors import BreakerOpenError


def make(**kw: object) -> tuple[CircuitBreaker, ManualClock, list[BreakerEvent]]:
    clock = ManualClock()
    events: list[BreakerEvent] = []
    settings = BreakerSettings(**{"minimum_calls": 4, "window_size": 10, **kw})  # type: ignore[arg-type]  # kw: BreakerSettings fields, ints and floats as each field wants
    return CircuitBreaker("srv", settings, clock, events.append), clock, events


def call(b: CircuitBreaker, outcome: str, duration: float | None = 0.01) -> None:
    b.record(b.acquire(), outcome, duration)  # type: ignore[arg-type]  # outcome: "success", "failure" or "neutral" in every caller


def test_opens_after_failure_rate_reached_with_minimum_calls() -> None:
    b, _, events = make()
    for _ in range(3):
        call(b, "failure")
    assert b.state is BreakerState.CLOSED  # below minimum_calls
    call(b, "failure")
    assert b.state is BreakerState.OPEN
    assert [e.new for e in events] == [BreakerState.OPEN]
    assert events[0].retry_at == pytest.approx(events[0].at + 2.0)


def test_below_threshold_stays_closed_and_window_slides() -> None:
    b, _, _ = make(failure_rate=0.5)
    for _ in range(10):
        call(b, "success")
    for _ in range(4):
        call(b, "failure")  # 4/10
    assert b.state is BreakerState.CLOSED
    call(b, "failure")  # 5/10 after the oldest success slid out
    assert b.state is BreakerState.OPEN


def test_neutral_outcomes_do_not_count() -> None:
    b, _, _ = make()
    for _ in range(20):
        call(b, "neutral")
    assert b.snapshot().calls == 0
    assert b.state is BreakerState.CLOSED


def test_open_fails_fast_with_typed_error_naming_server_and_retry() -> None:
    b, clock, _ = make()
    for _ in range(4):
        call(b, "failure")
    clock.advance(0.5)
    before = b.snapshot()
    with pytest.raises(BreakerOpenError) as info:
        b.acquire()  # synchronous: it cannot wait for the breaker to close, only refuse
    # Refused without letting anything through: no permit, the window and the state untouched.
    assert b.snapshot() == before and b.state is BreakerState.OPEN
    assert info.value.name == "srv"
    assert info.value.retry_in == pytest.approx(1.5)
    assert "srv" in info.value.reason and "1.5s" in info.value.reason


def test_half_open_probe_success_closes() -> None:
    b, clock, events = make(half_open_probes=2)
    for _ in range(4):
        call(b, "failure")
    clock.advance(2.0)
    assert b.state is BreakerState.HALF_OPEN
    p1, p2 = b.acquire(), b.acquire()
    with pytest.raises(BreakerOpenError):
        b.acquire()  # probes exhausted: others still fail fast
    b.record(p1, "success", 0.01)
    assert b.state is BreakerState.HALF_OPEN
    b.record(p2, "success", 0.01)
    assert b.state is BreakerState.CLOSED
    assert [e.new for e in events] == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert b.snapshot().trips == 0


def test_half_open_probe_failure_reopens_with_growing_capped_duration() -> None:
    b, clock, _ = make(open_seconds=1.0, open_multiplier=3.0, open_max_seconds=5.0)
    for _ in range(4):
        call(b, "failure")
    durations = []
    for _ in range(4):
        durations.append(b.retry_in())
        clock.advance(b.retry_in() or 0)
        assert b.state is BreakerState.HALF_OPEN
        call(b, "failure")
        assert b.state is BreakerState.OPEN
    durations.append(b.retry_in())
    assert durations == [1.0, 3.0, 5.0, 5.0, 5.0]


def test_neutral_probe_frees_its_slot() -> None:
    b, clock, _ = make()
    for _ in range(4):
        call(b, "failure")
    clock.advance(2.0)
    b.record(b.acquire(), "neutral", 0.01)  # e.g. caller cancelled
    assert b.state is BreakerState.HALF_OPEN
    call(b, "success")
    assert b.state is BreakerState.CLOSED


def test_slow_calls_trip_the_breaker() -> None:
    b, _, events = make(slow_call_seconds=1.0, slow_call_rate=0.75)
    for _ in range(3):
        call(b, "success", 2.0)
    call(b, "success", 0.1)
    assert b.state is BreakerState.OPEN  # 3/4 slow
    assert "slower" in events[-1].reason


def test_stale_permit_from_before_a_trip_does_not_decide() -> None:
    b, clock, _ = make()
    slow = b.acquire()
    for _ in range(4):
        call(b, "failure")
    clock.advance(2.0)
    assert b.state is BreakerState.HALF_OPEN
    b.record(slow, "success")  # issued while closed: must not close the half-open breaker
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(RuntimeError):
        b.record(slow, "success")


def test_force_open_and_reset() -> None:
    b, _, events = make()
    b.force_open("server process exited")
    assert b.state is BreakerState.OPEN and events[-1].reason == "server process exited"
    b.reset()
    assert b.state is BreakerState.CLOSED


def test_breaker_set_shares_breakers_and_events() -> None:
    events: list[BreakerEvent] = []
    clock = ManualClock()
    bs = BreakerSet(clock, events.append)
    s = BreakerSettings(minimum_calls=1)
    assert bs.get("a", s) is bs.get("a", s)
    bs.get("a", s).record(bs.get("a", s).acquire(), "failure")
    assert events and events[0].name == "a"
    assert [x.state for x in bs.snapshots()] == [BreakerState.OPEN]


@pytest.mark.parametrize(
    "kw",
    [
        {"window_size": 0},
        {"failure_rate": 0},
        {"open_seconds": 10, "open_max_seconds": 1},
        {"open_multiplier": 0.5},
    ],
)
def test_invalid_settings_rejected(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**kw)  # type: ignore[arg-type]  # kw: dict[str, float] holds int fields too; the values are meant to be refused
