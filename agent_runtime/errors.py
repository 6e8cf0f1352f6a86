"""Errors a user can meet: each carries a one-line reason and a hint; the CLI prints them and exits 2."""

from __future__ import annotations


class AgentRuntimeError(Exception):
    """Base of the errors the runtime raises to its users.

    Other packages (transports, policies, inference) define their own bases with the same shape:
    `user_facing = True`, a `reason` and a `hint`. The CLI treats any such exception alike.
    """

    user_facing = True

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return self.reason if not self.hint else f"{self.reason} (hint: {self.hint})"


class ConfigError(AgentRuntimeError):
    """The configuration file or an ad-hoc server flag is invalid."""

    def __init__(
        self,
        reason: str,
        hint: str | None = None,
        *,
        file: str | None = None,
        json_path: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        where = ""
        if file:
            where = file
            if line is not None:
                where += f":{line}" + (f":{column}" if column is not None else "")
        if json_path:
            where = f"{where} at {json_path}" if where else json_path
        super().__init__(f"{where}: {reason}" if where else reason, hint)
        self.file = file
        self.json_path = json_path
        self.line = line
        self.column = column


def is_user_facing(exc: BaseException) -> bool:
    """True for errors meant to be shown to a user as one line (no traceback)."""
    return bool(getattr(exc, "user_facing", False))
