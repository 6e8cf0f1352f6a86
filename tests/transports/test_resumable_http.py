"""Streamable HTTP resumption through `connect`: a response stream that breaks after an event with an id is
resumed (GET with Last-Event-ID after the server's `retry`) and its result arrives exactly once; a server
that cannot be resumed still ends as ConnectionLost within a bound.

The server is the SDK's low-level server with our bounded event store, served by uvicorn on 127.0.0.1 in
this process; a TCP proxy in front of it breaks connections on demand the way a network does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
from anyio.abc import SocketAttribute, SocketStream
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.responses import PlainTextResponse

from agent_runtime.cli.common import bind_socket, uvicorn_server
from agent_runtime.server.event_store import BoundedEventStore, SessionScope
from transports import ConnectionLost, HttpTarget, connect
from transports.http import RetryCap

pytestmark = pytest.mark.anyio
RETRY_MS = 1500  # above the SDK's 1 s default, so a wait this long shows the server's `retry` was honoured


class Proxy:
    """A TCP proxy on 127.0.0.1: `cut()` closes every open connection mid-stream; `stop()` closes the listener too (connections are then refused). `primed` is set once
    an SSE event with `retry` (the server's priming event) has been passed on to the client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._links: set[anyio.CancelScope] = set()
        self._listening = anyio.CancelScope()
        self.primed = anyio.Event()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started()
        with self._listening:
            async with listener:
                await listener.serve(self._link)

    async def _link(self, client: SocketStream) -> None:
        async with client:
            async with await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream:
                with anyio.CancelScope() as scope:
                    self._links.add(scope)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, upstream)
                            tg.start_soon(self._pipe, upstream, client)
                    finally:
                        self._links.discard(scope)

    async def _pipe(self, src: SocketStream, dst: SocketStream) -> None:
        try:
            async for chunk in src:
                await dst.send(chunk)
                if b"retry:" in chunk:
                    self.primed.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass

    def cut(self) -> None:
        for scope in list(self._links):
            scope.cancel()

    def stop(self) -> None:
        self._listening.cancel()
        self.cut()


@dataclass
class Seen:
    """What the server saw: tool runs, resumption GETs (time, Last-Event-ID) and response bodies sent."""

    calls: int = 0
    started: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    resumed: anyio.Event = field(default_factory=anyio.Event)
    resumes: list[tuple[float, str]] = field(default_factory=list)
    answers: int = 0  # SSE data carrying the slow tool's answer, over every connection
    refuse_resumptions: bool = False
    close_now: anyio.Event | None = None  # set: the tool closes its own SSE stream when this fires
    modern: bool = False  # serve 2026-07-28 too (by default the server is 2025-11-25 only)
    closed: anyio.Event = field(default_factory=anyio.Event)


def _app(seen: Seen, store: BoundedEventStore) -> Any:
    async def list_tools(ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name="slow", input_schema={"type": "object"})])

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        seen.calls += 1
        seen.started.set()
        if seen.close_now is not None:  # the polling flow: the server ends the stream itself, mid-call
            await seen.close_now.wait()
            assert ctx.close_sse_stream is not None  # offered with an event store to 2025-11-25 clients
            await ctx.close_sse_stream()
            seen.closed.set()
        await seen.release.wait()
        return types.CallToolResult(content=[types.TextContent(text="answer-7f3a")])

    server: Server[Any] = Server("resumable", on_list_tools=list_tools, on_call_tool=call_tool)
    inner = SessionScope(server.streamable_http_app(event_store=store, retry_interval=RETRY_MS))

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers", ()))
        if not seen.modern and headers.get(b"mcp-protocol-version", b"").decode() in MODERN_PROTOCOL_VERSIONS:
            # A 2025-11-25 server, as TypeScript servers are: the 2026-07-28 era has no event ids to resume
            # from, so the client must fall back to the era that has them.
            await PlainTextResponse("unsupported protocol version", status_code=400)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "GET":
            if b"last-event-id" in headers:
                seen.resumes.append((time.monotonic(), headers[b"last-event-id"].decode()))
                seen.resumed.set()
                if seen.refuse_resumptions:
                    await PlainTextResponse("events lost", status_code=503)(scope, receive, send)
                    return

        async def counting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                seen.answers += message.get("body", b"").count(b"answer-7f3a")
            await send(message)

        await inner(scope, receive, counting)

    return recording


@asynccontextmanager
async def resumable_server(seen: Seen, store: BoundedEventStore) -> AsyncIterator[Proxy]:
    sock = bind_socket("127.0.0.1", 0)  # listening already: clients queue until uvicorn accepts
    uv = uvicorn_server(_app(seen, store), drain_seconds=1.0)
    proxy = Proxy(sock.getsockname()[1])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: uv.serve(sockets=[sock]))
        await tg.start(proxy.serve)
        try:
            yield proxy
        finally:
            seen.release.set()
            proxy.stop()
            uv.should_exit = True


def _target(proxy: Proxy) -> HttpTarget:
    return HttpTarget(url=f"http://127.0.0.1:{proxy.port}/mcp", connect_timeout=5.0, read_timeout=30.0)


@pytest.mark.parametrize("how", ["cut", "close"])
async def test_broken_stream_is_resumed_and_answered_once(how: str) -> None:
    """`cut`: the network breaks the call's stream; `close`: the server ends it (the polling flow)."""
    seen, store = Seen(), BoundedEventStore()
    if how == "close":
        seen.close_now = anyio.Event()
    async with resumable_server(seen, store) as proxy:
        async with connect(_target(proxy), startup_timeout=20) as conn:
            proxy.primed = anyio.Event()  # initialize's stream was primed too: wait for the call's
            results: list[types.CallToolResult] = []

            async def call() -> None:
                results.append(await conn.call_tool("slow", {}, timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    await seen.started.wait()
                    await proxy.primed.wait()  # the POST stream has carried its priming event (id + retry)
                cut_at = time.monotonic()
                if seen.close_now is not None:
                    seen.close_now.set()
                    with anyio.fail_after(10):
                        await seen.closed.wait()
                else:
                    proxy.cut()
                with anyio.fail_after(10):
                    await seen.resumed.wait()
                assert not conn.closed.is_set()  # a resumable break is not a lost connection
                seen.release.set()
            (result,) = results
            assert result.content[0].text == "answer-7f3a"  # type: ignore[union-attr]  # our tool answers one text block
            # run once, answered once: nothing lost or duplicated
            assert seen.calls == 1 and seen.answers == 1
            at, last_event_id = seen.resumes[0]
            assert last_event_id and at - cut_at >= RETRY_MS / 1000  # the server's retry, not the 1 s default
            assert store.stats.stored >= 2 and store.stats.refused == 0
            assert not conn.closed.is_set()
            seen.calls, seen.started, seen.release, seen.close_now = 0, anyio.Event(), anyio.Event(), None
            seen.release.set()
            again = await conn.call_tool("slow", {}, timeout=10)  # the connection is still good
            assert not again.is_error and seen.calls == 1


@pytest.mark.parametrize("how", ["refuse", "stop"])
async def test_server_that_never_comes_back_is_connection_lost(how: str) -> None:
    """`refuse`: the server is up but answers every resumption with 503 (it lost its events), so the SDK's
    two attempts run out; `stop`: nothing listens any more, and a connect error is a lost connection at
    once."""
    seen, store = Seen(), BoundedEventStore()
    async with resumable_server(seen, store) as proxy:
        async with connect(_target(proxy), startup_timeout=20) as conn:
            proxy.primed = anyio.Event()  # initialize's stream was primed too: wait for the call's
            errors: list[ConnectionLost] = []

            async def call() -> None:
                try:
                    await conn.call_tool("slow", {}, timeout=60)
                except ConnectionLost as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    await seen.started.wait()
                    await proxy.primed.wait()
                cut_at = time.monotonic()
                if how == "refuse":
                    seen.refuse_resumptions = True
                    proxy.cut()
                else:
                    proxy.stop()
                with anyio.fail_after(2 * RETRY_MS / 1000 + 5):  # two waits of `retry`, well short of 60 s
                    await conn.closed.wait()
            assert len(errors) == 1 and errors[0].sent
            waited = time.monotonic() - cut_at
            if how == "refuse":
                assert len(seen.resumes) == 2  # both of the SDK's attempts were made, each after `retry`
                assert waited >= 2 * RETRY_MS / 1000
            else:
                assert waited < 2 * RETRY_MS / 1000  # one failed connect is enough


async def test_store_bounds_and_sessions() -> None:
    """Per-stream and total bounds evict the oldest (counted); a replay sends only what followed the id."""
    store = BoundedEventStore(per_stream=3, total=5, tail_seconds=0)
    note = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/message", params={"n": 0})

    def message(n: int) -> types.JSONRPCNotification:
        return note.model_copy(update={"params": {"n": n}})

    ids = [await store.store_event("1", None)] + [
        await store.store_event("1", message(n)) for n in range(1, 5)
    ]
    assert store.stats.evicted == 2  # the priming event and n=1 went: three per stream
    got: list[Any] = []

    async def collect(event: Any) -> None:
        got.append(event.message.params["n"])

    await store.replay_events_after(ids[2], collect)
    assert got == [3, 4]
    await store.replay_events_after(ids[0], collect)  # evicted: nothing to resume from
    assert got == [3, 4] and store.stats.refused == 1
    for n in range(3):
        await store.store_event("2", message(10 + n))
    assert store.stats.evicted == 2 + 1  # five in all: the oldest (n=2 of stream "1") went
    got.clear()
    await store.replay_events_after(ids[3], collect)
    assert got == [4]


async def test_resumed_stream_tails_the_store_until_the_response() -> None:
    """A resumption sends what is stored after its id, then each event as it is stored, and ends with the
    request's response; a resumption from another session's event gets nothing."""
    store = BoundedEventStore(tail_seconds=10)
    primed = await store.store_event("7", None)
    await store.store_event("7", types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress"))
    got: list[Any] = []

    async def collect(event: Any) -> None:
        got.append(event.message)

    async def later() -> None:
        await store.store_event("7", types.JSONRPCNotification(jsonrpc="2.0", method="notifications/message"))
        await store.store_event("7", types.JSONRPCResponse(jsonrpc="2.0", id=7, result={}))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            assert await store.replay_events_after(primed, collect) is None  # the SDK attaches no tail
    assert [getattr(m, "method", "response") for m in got] == [
        "notifications/progress",
        "notifications/message",
        "response",
    ]
    assert store.stats.replayed == 3 and store.stats.refused == 0


async def test_sessions_cannot_resume_each_other() -> None:
    """Through SessionScope, a stream stored under one session is not replayed to another."""
    store = BoundedEventStore(tail_seconds=0)
    ids: dict[str, str] = {}
    replayed: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/open":
            ids[scope["query_string"].decode()] = await store.store_event("1", None)
            await store.store_event(
                "1", types.JSONRPCNotification(jsonrpc="2.0", method="notifications/message")
            )
            sid = scope["query_string"]
            await send({"type": "http.response.start", "status": 200, "headers": [(b"mcp-session-id", sid)]})
        else:

            async def collect(event: Any) -> None:
                replayed.append(scope["query_string"].decode())

            await store.replay_events_after(ids["a"], collect)
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scoped = SessionScope(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=scoped), base_url="http://t") as http:
        await http.get("/open?a")
        await http.get("/open?b")
        await http.get("/resume?b", headers={"mcp-session-id": "b"})
        assert replayed == [] and store.stats.refused == 1
        await http.get("/resume?a", headers={"mcp-session-id": "a"})
        assert replayed == ["a"]


async def test_2026_era_stream_break_is_not_resumed() -> None:
    """2026-07-28 is stateless: no event ids, nothing to resume; a broken call fails as sent and the
    connection is declared lost at once (the supervisor reconnects), with no GET ever made."""
    seen, store = Seen(modern=True), BoundedEventStore()
    async with resumable_server(seen, store) as proxy:
        async with connect(_target(proxy), startup_timeout=20) as conn:
            assert conn.protocol_version == "2026-07-28"
            errors: list[ConnectionLost] = []

            async def call() -> None:
                try:
                    await conn.call_tool("slow", {}, timeout=30)
                except ConnectionLost as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    await seen.started.wait()
                proxy.cut()
                with anyio.fail_after(5):
                    await conn.closed.wait()
            assert len(errors) == 1 and errors[0].sent
            assert seen.resumes == [] and store.stats.stored == 0


def test_retry_cap_rewrites_only_long_retry_fields_at_any_chunk_split() -> None:
    """A hostile `retry` is cut to the cap wherever the chunks split the stream; nothing else changes."""
    stream = (
        b"id: a1\r\nretry: 999999999\r\ndata: \r\n\r\n"
        b'event: message\r\nid: a2\r\ndata: {"retry: 999999999": 1}\r\n\r\n'
        b"retry:500\n\nretry: 70000\n"
    )
    expected = (
        b"id: a1\r\nretry: 60000\r\ndata: \r\n\r\n"
        b'event: message\r\nid: a2\r\ndata: {"retry: 999999999": 1}\r\n\r\n'
        b"retry:500\n\nretry: 60000\n"
    )
    for split in range(len(stream) + 1):
        for second in (split, min(split + 3, len(stream))):
            cap = RetryCap(60_000)
            parts = (stream[:split], stream[split:second], stream[second:])
            out = b"".join(cap.feed(p) for p in parts) + cap.flush()
            assert out == expected, (split, second)
