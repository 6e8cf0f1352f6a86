"""Audit records: one per policy decision and one per call, with arguments digested and secrets redacted."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from policies.secrets import redact

# Built once: json.dumps with non-default options constructs a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode
_LINE = json.JSONEncoder(ensure_ascii=False).encode


def argument_digest(arguments: Mapping[str, Any] | None) -> str:
    """SHA-256 of the canonical JSON of the arguments: correlates calls without storing their content.

    Never raises: arguments JSON cannot encode (nested past the interpreter's recursion limit, integers of
    4300+ digits, cycles) are recorded as unhashed rather than taking the audit writer down."""
    try:
        payload = _CANONICAL(arguments or {})
    except Exception as exc:  # RecursionError, ValueError (digits, cycles), a default=str that raises
        return f"unhashed: {type(exc).__name__}"
    return "sha256:" + hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)  # not frozen: frozen dataclasses pay object.__setattr__ per field, per call
class AuditRecord:
    event: Literal["decision", "call", "sampling", "elicitation"]
    time: float  # epoch seconds; written as UTC ISO 8601 with milliseconds
    agent: str | None
    server: str | None
    tool: str
    args: str | Mapping[str, Any]  # the digest, or the arguments to digest when the record is written
    decision: Literal["allow", "deny"]
    reason: str | None
    duration: float | None = None  # seconds, for call records
    outcome: str | None = None  # the ToolOutcome kind, for call records
    attempts: int | None = None
    truncated: bool | None = None
    tokens: int | None = None  # sampling: tokens generated
    answer: Mapping[str, Any] | None = None  # elicitation: the accepted content, redacted

    def to_json(self) -> str:
        # Fields are flat scalars: read them directly (dataclasses.asdict deep-copies, 10x slower).
        fields = {k: v for k in _FIELDS if (v := getattr(self, k)) is not None}
        fields["time"] = utc_iso(self.time)
        if not isinstance(self.args, str):
            fields["args"] = argument_digest(self.args)
        return _LINE(fields)


_FIELDS = tuple(f.name for f in fields(AuditRecord))


_second: list[Any] = [-1, ""]  # strftime is slow; the second's prefix changes once a second


def utc_iso(t: float) -> str:
    whole = int(t)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((t - whole) * 1000):03d}Z"


def decision_record(
    *,
    agent: str | None,
    server: str | None,
    tool: str,
    digest: str | Mapping[str, Any],
    allowed: bool,
    reason: str | None,
    secrets: Iterable[str] = (),
    at: float | None = None,  # epoch seconds of the decision (default: now)
) -> AuditRecord:
    return AuditRecord(
        event="decision",
        time=time.time() if at is None else at,
        agent=agent,
        server=server,
        tool=tool,
        args=digest,
        decision="allow" if allowed else "deny",
        reason=redact(reason, secrets) if reason else None,
    )


def call_record(
    *,
    agent: str | None,
    server: str | None,
    tool: str,
    digest: str | Mapping[str, Any],
    outcome: str,
    reason: str | None,
    duration: float,
    attempts: int,
    truncated: bool,
    secrets: Iterable[str] = (),
    at: float | None = None,  # epoch seconds of the outcome (default: now)
) -> AuditRecord:
    return AuditRecord(
        event="call",
        time=time.time() if at is None else at,
        agent=agent,
        server=server,
        tool=tool,
        args=digest,
        decision="allow",
        reason=redact(reason, secrets) if reason else None,
        duration=round(duration, 6),
        outcome=outcome,
        attempts=attempts,
        truncated=truncated,
    )


def request_record(
    *,
    event: Literal["sampling", "elicitation"],
    server: str,
    method: str,
    digest: str | Mapping[str, Any],
    allowed: bool,
    reason: str | None,
    outcome: str,
    duration: float,
    tokens: int | None = None,
    answer: Mapping[str, Any] | None = None,
    secrets: Iterable[str] = (),
    at: float | None = None,
) -> AuditRecord:
    """A server's request to the client (sampling, elicitation): what was decided and how it ended. `answer`
    must already be redacted (policies.elicitation.audit_answer)."""
    return AuditRecord(
        event=event,
        time=time.time() if at is None else at,
        agent=None,
        server=server,
        tool=method,
        args=digest,
        decision="allow" if allowed else "deny",
        reason=redact(reason, secrets) if reason else None,
        duration=round(duration, 6),
        outcome=outcome,
        tokens=tokens,
        answer=answer,
    )
