"""Retries: when a failed call is safe to repeat, and a tenacity loop bounded by the call's deadline.

A failure before the request left this process is always safe to retry. After it left, only a tool known
to be safe (config says so, or a trusted server marks it read-only or idempotent) may be repeated; a
destructive or unannotated tool never is.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from policies.deadlines import Deadline

if TYPE_CHECKING:  # tenacity is imported only when a call is retried (most calls succeed at once)
    from tenacity import RetryCallState

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 3  # first try included
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.1  # seconds of uniform jitter added to each wait

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")
        if self.jitter < 0:
            raise ValueError("jitter must be >= 0")


def tool_is_safe(
    *,
    configured: bool | None,
    trusted: bool,
    read_only_hint: bool | None,
    idempotent_hint: bool | None,
) -> bool:
    """Whether repeating a call that may have reached the server is harmless.

    Config wins (True or False). Otherwise annotations count only from a trusted server: the spec calls
    them hints, and an untrusted server could mark a destructive tool read-only.
    """
    if configured is not None:
        return configured
    return trusted and (read_only_hint is True or idempotent_hint is True)


def may_retry(*, sent: bool, tool_safe: bool) -> bool:
    return not sent or tool_safe


class RetryableFailure(Exception):
    """Raised inside the retry loop for a failed attempt; `retry` says whether another attempt is safe."""

    def __init__(self, cause: BaseException, *, retry: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry = retry


def backoff(attempt: int, settings: RetrySettings, rng: random.Random | None = None) -> float:
    """Wait before attempt `attempt + 1` (attempt counts from 1): capped exponential plus jitter."""
    base = min(settings.max_backoff, settings.initial_backoff * settings.multiplier ** (attempt - 1))
    return base + (rng or random).uniform(0.0, settings.jitter)


class _wait_capped:
    """Tenacity wait: the backoff after attempt `attempt_number + offset` (the first try ran outside it)."""

    def __init__(self, settings: RetrySettings, rng: random.Random | None, offset: int) -> None:
        self.settings = settings
        self.rng = rng
        self.offset = offset

    def __call__(self, retry_state: RetryCallState) -> float:
        return backoff(retry_state.attempt_number + self.offset, self.settings, self.rng)


class _stop_at_deadline:
    """Tenacity stop: after `max_attempts` tries, or when the next wait would reach the deadline (a retry
    must have time left to run)."""

    def __init__(self, max_attempts: int, deadline: Deadline, min_attempt: float) -> None:
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.min_attempt = min_attempt

    def __call__(self, retry_state: RetryCallState) -> bool:
        return (
            retry_state.attempt_number >= self.max_attempts
            or self.deadline.remaining() <= retry_state.upcoming_sleep + self.min_attempt
        )


async def call_with_retries(
    attempt: Callable[[int], Awaitable[T]],
    *,
    settings: RetrySettings,
    deadline: Deadline,
    min_attempt: float = 0.01,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    first_failure: RetryableFailure | None = None,
) -> tuple[T, int]:
    """Run `attempt(n)` until it returns; it raises RetryableFailure(retry=...) for a failed try.

    Returns (value, attempts). Raises the last failure's cause when attempts, safety or the deadline run
    out; other exceptions (cancellation included) pass through untouched. The first attempt runs outside
    tenacity: most calls succeed and should not pay for the loop. A caller that ran the first attempt
    itself passes its failure as `first_failure` and the loop goes on from attempt 2.
    `on_retry(next_attempt, cause, wait)` is called before each wait.
    """
    failure = first_failure
    if failure is None:
        try:
            return await attempt(1), 1
        except RetryableFailure as exc:
            failure = exc
    if not failure.retry or settings.max_attempts <= 1:
        raise failure.cause from None
    first = failure.cause
    wait = backoff(1, settings, rng)
    if deadline.remaining() <= wait + min_attempt:
        raise first
    if on_retry is not None:
        on_retry(2, first, wait)
    await sleep(wait)

    def _before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            cause = exc.cause if isinstance(exc, RetryableFailure) else exc
            if cause is not None:
                on_retry(state.attempt_number + 2, cause, state.upcoming_sleep)

    from tenacity import AsyncRetrying, retry_if_exception

    retrying = AsyncRetrying(
        sleep=sleep,
        stop=_stop_at_deadline(settings.max_attempts - 1, deadline, min_attempt),
        wait=_wait_capped(settings, rng, offset=1),
        retry=retry_if_exception(lambda e: isinstance(e, RetryableFailure) and e.retry),
        before_sleep=_before_sleep,
        reraise=True,
    )
    number = 1
    value: Any = None
    try:
        async for state in retrying:
            with state:
                number = state.retry_state.attempt_number + 1
                value = await attempt(number)
    except RetryableFailure as failure:
        raise failure.cause from None
    return value, number
