"""Approval decisions, agent budgets and audit records."""

from __future__ import annotations

import json

from policies.approval import approval_reason, is_destructive
from policies.audit import argument_digest, call_record, decision_record, redact
from policies.clock import ManualClock
from policies.limits import AgentBudget


def test_destructive_defaults_follow_the_spec() -> None:
    assert is_destructive(None, None)  # unannotated
    assert not is_destructive(True, None)
    assert not is_destructive(None, False)
    assert is_destructive(False, True)


def test_approval_modes() -> None:
    assert approval_reason("never", read_only_hint=None, destructive_hint=None) is None
    assert "unannotated" in (approval_reason("destructive", read_only_hint=None, destructive_hint=None) or "")
    assert "destructive" in (
        approval_reason("destructive", read_only_hint=False, destructive_hint=True) or ""
    )
    assert approval_reason("destructive", read_only_hint=True, destructive_hint=None) is None
    assert approval_reason("always", read_only_hint=True, destructive_hint=False) is not None


def test_budget_steps_per_tool_and_wall_clock() -> None:
    clock = ManualClock()
    b = AgentBudget(max_steps=3, max_calls_per_tool=2, per_tool={"special": 1}, wall_clock=10, clock=clock)
    assert b.exhausted("a") is None
    b.charge("a")
    b.charge("a")
    assert "calls to a" in (b.exhausted("a") or "")
    assert b.exhausted("special") is None
    b.charge("special")
    assert "step budget" in (b.exhausted("b") or "")
    b2 = AgentBudget(wall_clock=5, clock=clock)
    b2.start()
    clock.advance(4)
    assert b2.remaining_time() == 1
    clock.advance(2)
    assert "wall-clock" in (b2.exhausted("x") or "")
    b3 = AgentBudget(max_steps=1)
    b3.step()
    assert b3.exhausted("x") is not None


def test_redaction() -> None:
    text = (
        "failed with token=abc123def key AKIAIOSFODNN7EXAMPLE auth Bearer eyJhbGciOi.x.y "
        "ghp_abcdefghijklmnopqrstuvwxyz012345 sk-abcdefghijklmnopqrstuv and literal hunter22"
    )
    out = redact(text, ["hunter22"])
    for secret in ["abc123def", "AKIAIOSFODNN7EXAMPLE", "eyJhbGciOi", "ghp_abcdef", "sk-abcdef", "hunter22"]:
        assert secret not in out, secret
    assert out.startswith("failed with")


def test_records_are_json_lines_without_arguments() -> None:
    digest = argument_digest({"b": 1, "a": "secret payload"})
    assert digest == argument_digest({"a": "secret payload", "b": 1}) and digest.startswith("sha256:")
    d = decision_record(agent="ag", server="s", tool="t", digest=digest, allowed=False, reason="password=x")
    line = json.loads(d.to_json())
    assert line["event"] == "decision" and line["decision"] == "deny" and "password=x" not in line["reason"]
    assert "secret payload" not in d.to_json()
    c = call_record(
        agent=None,
        server="s",
        tool="t",
        digest=digest,
        outcome="result",
        reason=None,
        duration=0.0123456789,
        attempts=2,
        truncated=False,
    )
    line = json.loads(c.to_json())
    assert line["outcome"] == "result" and line["attempts"] == 2 and line["duration"] == 0.012346
    assert "agent" not in line and line["time"].endswith("Z")
