"""Retry safety rules and the deadline-bounded tenacity loop (a manual clock drives the sleeps)."""

from __future__ import annotations

import random

import pytest

from policies.clock import ManualClock
from policies.deadlines import Deadline
from policies.retry import (
    RetryableFailure,
    RetrySettings,
    backoff,
    call_with_retries,
    may_retry,
    tool_is_safe,
)


def test_safety_rules() -> None:
    # config wins either way
    assert tool_is_safe(configured=True, trusted=False, read_only_hint=None, idempotent_hint=None)
    assert not tool_is_safe(configured=False, trusted=True, read_only_hint=True, idempotent_hint=True)
    # annotations only from a trusted server
    assert tool_is_safe(configured=None, trusted=True, read_only_hint=True, idempotent_hint=None)
    assert tool_is_safe(configured=None, trusted=True, read_only_hint=None, idempotent_hint=True)
    assert not tool_is_safe(configured=None, trusted=False, read_only_hint=True, idempotent_hint=True)
    # unannotated: unknown, never safe
    assert not tool_is_safe(configured=None, trusted=True, read_only_hint=None, idempotent_hint=None)
    assert may_retry(sent=False, tool_safe=False)
    assert not may_retry(sent=True, tool_safe=False)
    assert may_retry(sent=True, tool_safe=True)


def test_backoff_is_capped_exponential_with_bounded_jitter() -> None:
    s = RetrySettings(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.05)
    rng = random.Random(1)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        w = backoff(attempt, s, rng)
        assert base <= w <= base + 0.05


class Script:
    """An attempt function that fails as scripted, advancing the manual clock by each attempt's cost."""

    def __init__(self, clock: ManualClock, failures: list[bool], cost: float = 0.0) -> None:
        self.clock, self.failures, self.cost = clock, failures, cost
        self.calls: list[int] = []
        self.sleeps: list[float] = []

    async def attempt(self, n: int) -> str:
        self.calls.append(n)
        self.clock.advance(self.cost)
        if self.failures and self.failures.pop(0):
            raise RetryableFailure(ConnectionError(f"attempt {n}"), retry=True)
        return f"ok after {n}"

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)


@pytest.mark.anyio
async def test_retries_until_success_and_counts_attempts() -> None:
    clock = ManualClock()
    s = Script(clock, [True, True])
    settings = RetrySettings(max_attempts=5, initial_backoff=0.1, jitter=0.0)
    value, attempts = await call_with_retries(
        s.attempt, settings=settings, deadline=Deadline.after(10, clock), sleep=s.sleep
    )
    assert (value, attempts) == ("ok after 3", 3)
    assert s.calls == [1, 2, 3]
    assert s.sleeps == [pytest.approx(0.1), pytest.approx(0.2)]


@pytest.mark.anyio
async def test_stops_at_max_attempts_and_raises_the_cause() -> None:
    clock = ManualClock()
    s = Script(clock, [True] * 10)
    seen: list[int] = []
    with pytest.raises(ConnectionError, match="attempt 3"):
        await call_with_retries(
            s.attempt,
            settings=RetrySettings(max_attempts=3, jitter=0.0),
            deadline=Deadline.after(100, clock),
            sleep=s.sleep,
            on_retry=lambda n, exc, wait: seen.append(n),
        )
    assert s.calls == [1, 2, 3]
    assert seen == [2, 3]


@pytest.mark.anyio
async def test_unsafe_failure_is_not_retried() -> None:
    clock = ManualClock()
    calls = []

    async def attempt(n: int) -> str:
        calls.append(n)
        raise RetryableFailure(TimeoutError("sent, not safe"), retry=False)

    with pytest.raises(TimeoutError):
        await call_with_retries(attempt, settings=RetrySettings(), deadline=Deadline.after(10, clock))
    assert calls == [1]


@pytest.mark.anyio
async def test_retries_never_extend_the_deadline() -> None:
    clock = ManualClock()
    s = Script(clock, [True] * 20, cost=0.3)
    settings = RetrySettings(max_attempts=20, initial_backoff=0.2, max_backoff=0.2, jitter=0.0)
    deadline = Deadline.after(1.0, clock)
    with pytest.raises(ConnectionError):
        await call_with_retries(s.attempt, settings=settings, deadline=deadline, sleep=s.sleep)
    # 0.3 + 0.2 + 0.3 = 0.8; the next wait (0.2) would end at the deadline: stop there.
    assert s.calls == [1, 2]
    assert clock() <= deadline.at


@pytest.mark.anyio
async def test_other_exceptions_pass_through_untouched() -> None:
    clock = ManualClock()

    async def attempt(n: int) -> str:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await call_with_retries(attempt, settings=RetrySettings(), deadline=Deadline.after(10, clock))


@pytest.mark.anyio
async def test_default_sleep_is_anyio_sleep_and_real_backoff_elapses() -> None:
    clock = ManualClock()
    s = Script(clock, [True])
    value, attempts = await call_with_retries(
        s.attempt,
        settings=RetrySettings(initial_backoff=0.001, jitter=0.0),
        deadline=Deadline.after(5, clock),
    )
    assert attempts == 2 and value == "ok after 2"


@pytest.mark.anyio
async def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        RetrySettings(max_attempts=0)
    with pytest.raises(ValueError):
        RetrySettings(initial_backoff=2, max_backoff=1)
