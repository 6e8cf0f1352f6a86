"""Approvals: which calls need a human yes, and the fail-closed rules for asking.

The spec's annotation defaults make an unannotated tool destructive (`destructiveHint` defaults to true,
`readOnlyHint` to false), so "destructive" mode asks for every tool that does not say otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ApprovalMode = Literal["never", "destructive", "always"]


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """What the approval hook is shown; arguments are the caller's, to display (not to log)."""

    agent: str | None
    server: str
    tool: str
    arguments: Mapping[str, Any]
    destructive: bool
    reason: str  # why approval is needed


def is_destructive(read_only_hint: bool | None, destructive_hint: bool | None) -> bool:
    """Per the MCP spec defaults: read-only tools are not destructive; otherwise destructive unless said."""
    if read_only_hint is True:
        return False
    return destructive_hint is not False


def approval_reason(
    mode: ApprovalMode, *, read_only_hint: bool | None, destructive_hint: bool | None
) -> str | None:
    """Why the call needs approval under `mode`, or None when it does not."""
    if mode == "always":
        return "policy requires approval for every call of this tool"
    if mode == "destructive" and is_destructive(read_only_hint, destructive_hint):
        if read_only_hint is None and destructive_hint is None:
            return "the tool is unannotated, which the MCP spec says to treat as destructive"
        return "the tool is marked destructive"
    return None
