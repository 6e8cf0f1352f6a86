"""Deadlines and the timeout cascade: one deadline per call, carried through retries, never extended."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from policies.clock import Clock, monotonic

DEFAULT_TOOL_TIMEOUT = 30.0  # seconds, as mistral.rs


@dataclass(frozen=True, slots=True)
class Deadline:
    at: float  # clock time
    clock: Clock = monotonic

    @classmethod
    def after(cls, seconds: float, clock: Clock = monotonic) -> Deadline:
        return cls(clock() + max(0.0, seconds), clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at

    def earliest(self, other: Deadline | None) -> Deadline:
        return self if other is None or self.at <= other.at else other


@dataclass(frozen=True, slots=True)
class TimeoutPlan:
    """Seconds for one call: connect <= attempt <= total (the cascade holds by construction)."""

    connect: float
    attempt: float  # bound of one request on the wire
    total: float  # the call's deadline, retries and waits for a slot included


def plan_timeouts(
    tool: str,
    *,
    connect: float,
    request: float,
    tool_default: float = DEFAULT_TOOL_TIMEOUT,
    per_tool: Mapping[str, float] | None = None,
    policy_override: float | None = None,
    caller: float | None = None,
    budget_left: float | None = None,
) -> TimeoutPlan:
    """Resolve the effective timeouts of one call.

    Precedence for the total: policy per-tool override, then the server's per-tool timeout, then the
    server's tool default. A caller's timeout and an agent's remaining wall clock can only shorten it.
    """
    total = policy_override if policy_override is not None else (per_tool or {}).get(tool, tool_default)
    for bound in (caller, budget_left):
        if bound is not None:
            total = min(total, bound)
    total = max(0.0, total)
    attempt = min(request, total) if request > 0 else total
    return TimeoutPlan(connect=min(connect, attempt), attempt=attempt, total=total)


def cascade_problems(connect: float, request: float, tool: float) -> list[str]:
    """Explain settings that break the cascade (each timeout must leave room for the one it contains)."""
    problems = []
    if connect <= 0 or request <= 0 or tool <= 0:
        problems.append("timeouts must be positive")
    if connect >= request:
        problems.append(f"connect timeout {connect}s must be shorter than the request timeout {request}s")
    if connect >= tool:
        problems.append(f"connect timeout {connect}s must be shorter than the tool timeout {tool}s")
    return problems
