"""Deadlines and the timeout cascade."""

from __future__ import annotations

from policies.clock import ManualClock
from policies.deadlines import Deadline, cascade_problems, plan_timeouts


def test_deadline_counts_down_and_expires() -> None:
    clock = ManualClock()
    d = Deadline.after(2.0, clock)
    assert d.remaining() == 2.0 and not d.expired
    clock.advance(2.5)
    assert d.remaining() == 0.0 and d.expired
    other = Deadline.after(1.0, clock)
    assert d.earliest(other) is d and other.earliest(d) is d and other.earliest(None) is other


def test_plan_defaults_to_30s_and_keeps_the_cascade() -> None:
    p = plan_timeouts("t", connect=10, request=60)
    assert p.total == 30.0 and p.attempt == 30.0 and p.connect == 10
    p = plan_timeouts("t", connect=10, request=5, tool_default=30)
    assert (p.connect, p.attempt, p.total) == (5, 5, 30)


def test_plan_precedence_and_shortening() -> None:
    per_tool = {"slow": 120.0}
    assert plan_timeouts("slow", connect=1, request=200, per_tool=per_tool).total == 120.0
    assert plan_timeouts("slow", connect=1, request=200, per_tool=per_tool, policy_override=7).total == 7
    # the caller and an agent's remaining wall clock can only shorten
    assert plan_timeouts("slow", connect=1, request=200, per_tool=per_tool, caller=500).total == 120.0
    assert plan_timeouts("slow", connect=1, request=200, per_tool=per_tool, caller=3).total == 3
    p = plan_timeouts("x", connect=1, request=200, budget_left=0.5)
    assert (p.connect, p.attempt, p.total) == (0.5, 0.5, 0.5)


def test_cascade_problems() -> None:
    assert cascade_problems(1, 10, 30) == []
    assert len(cascade_problems(10, 5, 30)) == 1
    assert len(cascade_problems(40, 50, 30)) == 1
    assert cascade_problems(0, 1, 1)
