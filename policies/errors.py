"""Errors the policies raise to their users: each carries a one-line reason and a hint."""

from __future__ import annotations


class PolicyError(Exception):
    """Base of the policy errors; same shape as agent_runtime.errors.AgentRuntimeError."""

    user_facing = True

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return self.reason if not self.hint else f"{self.reason} (hint: {self.hint})"


class BreakerOpenError(PolicyError):
    """The circuit breaker of a server (or tool) is open: the call failed fast without being sent."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(
            f"circuit breaker for {name} is open; next attempt allowed in {retry_in:.1f}s",
            "the server failed repeatedly; check `agent-runtime servers status` and its logs",
        )
        self.name = name
        self.retry_in = retry_in
