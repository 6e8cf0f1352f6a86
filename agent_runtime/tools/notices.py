"""What servers tell us besides results: their log messages (into structlog, bounded) and per-call progress.

Both arrive as notifications the SDK hands to one short task each, so a flooding server costs us a counter
increment per message past a rate bound, never a queue that grows or a callback that falls behind.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

from agent_runtime.config.types import DEFAULT_SERVER_LOG_LEVEL, McpLogLevel
from agent_runtime.logging import get_logger
from policies.secrets import redact

log = get_logger("agent_runtime.server_log")

# `notice` and the three levels above `error` have no structlog method of their own: they map to the nearest
# one, and the record keeps the server's level.
MCP_LEVELS: tuple[McpLogLevel, ...] = get_args(McpLogLevel)
_RANK: dict[str, int] = {name: i for i, name in enumerate(MCP_LEVELS)}
_METHOD = {
    "debug": "debug",
    "info": "info",
    "notice": "info",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
    "alert": "critical",
    "emergency": "critical",
}
MAX_LOG_CHARS = 2000  # of one message's data, after redaction
MAX_LOGGER_CHARS = 128
MAX_PROGRESS_MESSAGE_CHARS = 200
LOG_RATE = 50.0  # messages per second a server may log on average ...
LOG_BURST = 200  # ... and at once; past that they are dropped and counted


def level_at_least(level: str, minimum: str) -> bool:
    """Whether MCP level `level` is at or above `minimum` (an unknown level counts as `info`)."""
    return _RANK.get(level, 1) >= _RANK.get(minimum, 1)


def bounded_text(value: Any, limit: int, secrets: Iterable[str] = ()) -> str:
    """`value` as text (JSON for anything but a string), redacted, at most `limit` characters plus a note."""
    if isinstance(value, str):
        text = value[: limit * 4]
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)[: limit * 4]
        except (TypeError, ValueError, RecursionError):
            text = repr(value)[: limit * 4]
    # Redacted before it is cut, so a secret is never left half-visible at the cut.
    text = redact(text, secrets)
    if len(text) > limit:
        text = f"{text[:limit]}... (cut at {limit} characters)"
    return text


@dataclass(slots=True)
class NoticeCounters:
    """Per-server counts of notifications, across reconnects; shown in health, status and metrics."""

    log_messages: int = 0  # logged
    log_filtered: int = 0  # below the server's log_level (a server that ignores logging/setLevel)
    log_dropped: int = 0  # over the rate bound
    progress_dropped: int = 0  # superseded by a newer value before the callback could take it


@dataclass(slots=True, eq=False)
class ServerLogSink:
    """One server's `notifications/message` into structlog: level filtered and mapped, logger name kept, data
    redacted and cut, rate bounded (a token bucket) with counted drops and one warning per flood."""

    server: str
    minimum: str = DEFAULT_SERVER_LOG_LEVEL
    secrets: tuple[str, ...] = ()
    counters: NoticeCounters = field(default_factory=NoticeCounters)
    rate: float = LOG_RATE
    burst: int = LOG_BURST
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(default=-1.0)
    _last: float = 0.0
    _flooding: bool = False
    _dropped_in_flood: int = 0

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._last = self.clock()

    async def __call__(self, params: Any) -> None:
        """The SDK's logging callback: `params` is a LoggingMessageNotificationParams."""
        self.receive(str(getattr(params, "level", "info")), getattr(params, "logger", None), params.data)

    def receive(self, level: str, logger: str | None, data: Any) -> None:
        if not level_at_least(level, self.minimum):
            self.counters.log_filtered += 1
            return
        if not self._admit():
            self.counters.log_dropped += 1
            self._dropped_in_flood += 1
            if not self._flooding:
                self._flooding = True
                log.warning(
                    "server floods log messages; dropping them",
                    server=self.server,
                    rate=self.rate,
                    burst=self.burst,
                )
            return
        if self._flooding and self._tokens >= self.burst - 1:  # the bucket refilled: the flood is over
            self._flooding = False
            log.warning("server log flood ended", server=self.server, dropped=self._dropped_in_flood)
            self._dropped_in_flood = 0
        self.counters.log_messages += 1
        method = _METHOD.get(level, "info")
        fields: dict[str, Any] = {"server": self.server, "server_level": level}
        if logger:
            fields["logger"] = bounded_text(logger, MAX_LOGGER_CHARS, self.secrets)
        fields["data"] = bounded_text(data, MAX_LOG_CHARS, self.secrets)
        getattr(log, method)("server log", **fields)

    def _admit(self) -> bool:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None] | None]
"""`on_progress(progress, total, message)`: sync or async; called with the server's progress for one call."""


class ProgressRelay:
    """Hands one call's progress notifications to a callback, coalesced: while the callback runs, only the
    newest value waits (older ones are counted as dropped), so a flood never queues and a slow callback (a
    terminal redraw) never falls behind. Closed when the call ends: late notifications are ignored."""

    __slots__ = ("_busy", "_callback", "_closed", "_counters", "_pending", "_secrets")

    def __init__(
        self, callback: ProgressCallback, counters: NoticeCounters, secrets: tuple[str, ...] = ()
    ) -> None:
        self._callback = callback
        self._counters = counters
        self._secrets = secrets
        self._pending: tuple[float, float | None, str | None] | None = None
        self._busy = False
        self._closed = False

    def close(self) -> None:
        self._closed = True

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        """The SDK's progress callback (one task per notification)."""
        if self._closed or not math.isfinite(progress):
            return
        if total is not None and not math.isfinite(total):
            total = None
        if self._pending is not None:
            self._counters.progress_dropped += 1
        self._pending = (progress, total, message)
        if self._busy:
            return  # the task already delivering takes the newest value when it is done
        self._busy = True
        try:
            while self._pending is not None and not self._closed:
                (done, total, message), self._pending = self._pending, None
                if message is not None:  # only what is delivered pays for the redaction
                    message = bounded_text(message, MAX_PROGRESS_MESSAGE_CHARS, self._secrets)
                outcome = self._callback(done, total, message)
                if inspect.isawaitable(outcome):
                    await outcome
        finally:
            self._busy = False
