"""A bounded in-memory event store for resumable streamable HTTP (SSE priming, `retry`, Last-Event-ID replay),
kept apart per MCP session so one session can never replay another's events.

The SDK hands one store to every session and names streams by request id, which sessions share ("1", "2"...);
`SessionScope` (ASGI middleware) tells the store which session the current request or session task belongs
to, through a context variable the session's own tasks inherit from the request that opened it. A resumed
stream is fed from the store alone (replay, then each new event), never handed over to the SDK's live stream.
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import anyio
import structlog
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCError, JSONRPCMessage, JSONRPCResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger(__name__)

MAX_EVENTS_PER_STREAM = 256
MAX_EVENTS = 4096
TAIL_SECONDS = 30.0  # how long a resumed stream waits for new events before it ends (the host resumes again)
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
    replayed: int = 0  # events sent on resumed streams
    evicted: int = 0  # events dropped to stay within the bounds (a resume from one of them replays nothing)
    refused: int = 0  # resumptions naming an unknown event or another session's


@dataclass(slots=True)
class BoundedEventStore(EventStore):
    """Events kept per (session, stream), at most `per_stream` each and `total` in all; the oldest go first.

    Event ids are random (unguessable) tokens; a resumption sends the events of the named event's stream
    that came after it, then those stored later, until the request's response (or `tail_seconds`), and only
    when the resuming request belongs to the same session.
    """

    per_stream: int = MAX_EVENTS_PER_STREAM
    total: int = MAX_EVENTS
    tail_seconds: float = TAIL_SECONDS
    stats: StoreStats = field(default_factory=StoreStats)
    _events: OrderedDict[EventId, _Event] = field(default_factory=OrderedDict)
    _streams: dict[tuple[int, StreamId], deque[EventId]] = field(default_factory=dict)
    _arrivals: dict[tuple[int, StreamId], anyio.Event] = field(default_factory=dict)  # set on a new event

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
            stream.popleft()  # the oldest overall is its stream's oldest
            self._evict(oldest)
            if not stream:
                del self._streams[(event.session.number, event.stream)]
        if (arrived := self._arrivals.pop(key, None)) is not None:
            arrived.set()
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        event = self._events.get(last_event_id)
        if event is None or event.session is not _current.get():
            self.stats.refused += 1
            log.info("refused an SSE resumption", known=event is not None)
            return None
        key = (event.session.number, event.stream)
        cursor = last_event_id
        deadline = anyio.current_time() + self.tail_seconds
        # We are the resumed stream's live tail too: sending each event from the store as it is stored leaves
        # no gap between the replay and the live events (the SDK's own hand-over has one). Returning None
        # tells the SDK not to attach its tail; the stream ends with the request's response, or at the
        # deadline, and the host resumes again from the last id it got.
        while True:
            while (following := self._after(key, cursor)) is not None:
                message = self._events[following].message
                cursor = following
                if message is None:
                    continue
                self.stats.replayed += 1
                await send_callback(EventMessage(message, following))
                if isinstance(message, JSONRPCResponse | JSONRPCError):
                    return None
            if cursor not in self._events:
                return None  # evicted under us: nothing to continue from
            arrived = self._arrivals.setdefault(key, anyio.Event())
            with anyio.move_on_at(deadline):
                await arrived.wait()
            if anyio.current_time() >= deadline:
                return None

    def _after(self, key: tuple[int, StreamId], event_id: EventId) -> EventId | None:
        ids = self._streams.get(key)
        if not ids or event_id not in self._events:
            return None  # evicted meanwhile: the replay ends here
        at = ids.index(event_id) + 1
        return ids[at] if at < len(ids) else None

    def _evict(self, event_id: EventId) -> None:
        del self._events[event_id]
        self.stats.evicted += 1


class SessionScope:
    """ASGI middleware: runs each request with its MCP session's key set for `BoundedEventStore`.

    A request without `Mcp-Session-Id` may open a session: it gets a fresh key (the session's tasks, started
    from this request, inherit it) and the session id in its response is remembered for that key. A request
    naming a session id we never saw runs under a key of its own, so it can resume nothing.
    """

    def __init__(self, app: ASGIApp, *, max_sessions: int = MAX_SESSIONS) -> None:
        self.app = app
        self._keys: OrderedDict[bytes, _SessionKey] = OrderedDict()
        self._numbers = itertools.count(1)
        self._max = max_sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        sent_id = next((v for k, v in scope.get("headers", ()) if k.lower() == _SESSION_HEADER), None)
        key = self._keys.get(sent_id) if sent_id is not None else None
        if key is not None:
            self._keys.move_to_end(sent_id)  # type: ignore[arg-type]  # sent_id is bytes when a key was found
        opening = key is None
        key = key or _SessionKey(next(self._numbers))

        async def remember(message: Message) -> None:
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
