"""The audit log's file writer: one JSON line per record, arguments digested, never stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.tools import audit
from agent_runtime.tools.audit import AuditLog
from policies.audit import argument_digest, call_record, decision_record


def test_a_calls_two_records_share_one_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision and the outcome of a call carry the same arguments: digested once per flush, not per record;
    equal arguments of different calls still get their own (equal) digest."""
    digests: list[object] = []

    def counting(arguments: object) -> str:
        digests.append(arguments)
        return argument_digest(arguments)  # type: ignore[arg-type]  # it stands in for argument_digest: the audit log passes it a call's arguments

    monkeypatch.setattr(audit, "argument_digest", counting)
    log = AuditLog(tmp_path / "audit.jsonl")
    first, second = {"path": "/etc/passwd", "n": 1}, {"path": "/etc/passwd", "n": 1}
    for args in (first, second):
        common = {"agent": "a", "server": "fs", "tool": "fs__read", "digest": args}
        log.write(
            decision_record(**common, allowed=True, reason=None),
            call_record(**common, outcome="result", reason=None, duration=0.01, attempts=1, truncated=False),
        )
    log.close()
    assert digests == [first, second]
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["decision", "call", "decision", "call"]
    assert {x["args"] for x in lines} == {argument_digest(first)}
    assert "/etc/passwd" not in (tmp_path / "audit.jsonl").read_text()
