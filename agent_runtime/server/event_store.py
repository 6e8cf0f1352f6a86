"""A bounded in-memory event store for resumable streamable HTTP (SSE priming, `retry`, Last-Event-ID replay),
kept apart per MCP session so one session can never replay another's events.

The SDK hands one store to every session and names streams by request id, which sessions share ("1", "2"...);
`SessionScope` (ASGI middleware) tells the store which session the current request or session task belongs
to, through a context variable the session's own tasks inherit from the request that opened it.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import structlog
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage

log = structlog.get_logger(__name__)

MAX_EVENTS_PER_STREAM = 256
MAX_EVENTS = 4096
MAX_SESSIONS = 1024  # session ids remembered by SessionScope (the SDK's own default cap is lower)
_SESSION_HEADER = b"mcp-session-id"


@dataclass(slots=True, eq=False)
class _SessionKey:
    """Identity of one MCP session as the store sees it (compared by identity)."""

    number: int


_NO_SESSION = _SessionKey(0)  # stdio-less direct use (tests, a single-session app)
_current: contextvars.ContextVar[_SessionKey] = contextvars.ContextVar(
    "mcp_event_session", default=_NO_SESSION
)


@dataclass(slots=True)
class _Event:
    session: _SessionKey
    stream: StreamId
    message: JSONRPCMessage | None  # None: a priming event (its id only marks a place to resume from)


@dataclass(slots=True)
class StoreStats:
    stored: int = 0
    replayed: int = 0
    evicted: int = 0  # events dropped to stay within the bounds (a resume from one of them replays nothing)
    refused: int = 0  # resumptions naming an unknown event or another session's


@dataclass(slots=True)
class BoundedEventStore(EventStore):
    """Events kept per (session, stream), at most `per_stream` each and `total` in all; the oldest go first.

    Event ids are random (unguessable) tokens; a replay sends the events of the named event's stream that
    came after it, and only when the resuming request belongs to the same session.
    """

    per_stream: int = MAX_EVENTS_PER_STREAM
    total: int = MAX_EVENTS
    stats: StoreStats = field(default_factory=StoreStats)
    _events: OrderedDict[EventId, _Event] = field(default_factory=OrderedDict)
    _streams: dict[tuple[int, StreamId], deque[EventId]] = field(default_factory=dict)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        session = _current.get()
        event_id = secrets.token_urlsafe(12)
        key = (session.number, stream_id)
        ids = self._streams.setdefault(key, deque())
        ids.append(event_id)
        self._events[event_id] = _Event(session, stream_id, message)
        self.stats.stored += 1
        if len(ids) > self.per_stream:
            self._evict(ids.popleft())
        while len(self._events) > self.total:
            oldest, event = next(iter(self._events.items()))
            stream = self._streams[(event.session.number, event.stream)]
            stream.remove(oldest)  # the oldest overall is its stream's oldest: at the left, O(1)
            self._evict(oldest)
            if not stream:
                del self._streams[(event.session.number, event.stream)]
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        event = self._events.get(last_event_id)
        if event is None or event.session is not _current.get():
            self.stats.refused += 1
            log.info("refused an SSE resumption", known=event is not None)
            return None
        ids = self._streams.get((event.session.number, event.stream), deque())
        after = list(itertools.dropwhile(lambda i: i != last_event_id, ids))[1:]
        for event_id in after:
            message = self._events[event_id].message
            if message is not None:
                self.stats.replayed += 1
                await send_callback(EventMessage(message, event_id))
        return event.stream

    def _evict(self, event_id: EventId) -> None:
        del self._events[event_id]
        self.stats.evicted += 1


class SessionScope:
    """ASGI middleware: runs each request with its MCP session's key set for `BoundedEventStore`.

    A request without `Mcp-Session-Id` may open a session: it gets a fresh key (the session's tasks, started
    from this request, inherit it) and the session id in its response is remembered for that key. A request
    naming a session id we never saw runs under a key of its own, so it can resume nothing.
    """

    def __init__(self, app: Any, *, max_sessions: int = MAX_SESSIONS) -> None:
        self.app = app
        self._keys: OrderedDict[bytes, _SessionKey] = OrderedDict()
        self._numbers = itertools.count(1)
        self._max = max_sessions

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        sent_id = next((v for k, v in scope.get("headers", ()) if k.lower() == _SESSION_HEADER), None)
        key = self._keys.get(sent_id) if sent_id is not None else None
        if key is not None:
            self._keys.move_to_end(sent_id)  # type: ignore[arg-type]  # sent_id is bytes when a key was found
        opening = key is None
        key = key or _SessionKey(next(self._numbers))

        async def remember(message: dict[str, Any]) -> None:
            if opening and message.get("type") == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == _SESSION_HEADER:
                        self._keys[bytes(value)] = key
                        while len(self._keys) > self._max:
                            self._keys.popitem(last=False)
            await send(message)

        token = _current.set(key)
        try:
            await self.app(scope, receive, remember)
        finally:
            _current.reset(token)
