"""HTTP transports: streamable HTTP (the SDK's client, tuned) and legacy HTTP+SSE (ours, for its event size cap).

Both send the target's headers and bearer token (or OAuth tokens, transports.oauth), use its connect/read timeouts and accept messages up to
target.max_message_bytes: an SSE event (the SDK defaults to 1 MiB, which breaks large tool results) or a
JSON response body (which the SDK would read whole, however large), cut while it streams in.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urljoin, urlparse

import anyio
import httpx2
import mcp_types as types
import structlog
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import LAST_EVENT_ID, MAX_RECONNECTION_ATTEMPTS, streamable_http_client
from mcp.shared._httpx_utils import request_within_origin, sse_within_origin
from mcp.shared.message import SessionMessage

from transports.errors import ConnectError, too_large_reason
from transports.oauth import server_auth
from transports.targets import HttpTarget

log = structlog.get_logger(__name__)

# The SDK's transport streams: its own streamable HTTP client yields context-aware wrappers, ours yield
# anyio memory streams; both satisfy these protocols.
Streams = TransportStreams
OnLost = Callable[[str], None]

# Errors that mean the server (or the network path to it) is gone; timeouts are not among them, since an
# idle SSE stream may legitimately hit the read timeout.
MAX_RETRY_MS = 60_000  # the longest SSE `retry` a server may make us wait before resuming a stream
_LOST = (httpx2.ConnectError, httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError)


class BodyTooLarge(httpx2.StreamError):
    """A JSON response body over max_message_bytes: raised while it streams in (the SDK turns a StreamError
    into an error reply for its request, and `connect` recognises the message)."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(too_large_reason(size, limit))


class RetryCap:
    """Rewrites SSE `retry:` fields above `cap_ms` down to it, across chunk boundaries; the rest passes as is.

    The SDK sleeps whatever `retry` a server sends before resuming a stream (a hostile one could send days);
    capped, every wait stays bounded. Only a line that may still turn out to be a `retry:` field is held
    back while it is incomplete, so events are not delayed.
    """

    __slots__ = ("_cap", "_carry", "_line_start")
    _FIELD = re.compile(rb"([\r\n])retry: ?(\d+)")

    def __init__(self, cap_ms: int) -> None:
        self._cap = cap_ms
        self._carry = b""
        self._line_start = True

    def feed(self, part: bytes) -> bytes:
        data = self._carry + part
        self._carry = b""
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        tail = data[cut:]
        if (cut > 0 or self._line_start) and b"retry:".startswith(tail[:6]) and len(tail) < 32:
            self._carry, data = tail, data[:cut]  # may be an unfinished `retry:` line: hold it
        if b"retry:" in data:
            data = self._FIELD.sub(self._capped, (b"\n" if self._line_start else b"x") + data)[1:]
        if data:
            self._line_start = data.endswith((b"\n", b"\r"))
        return data

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest

    def _capped(self, match: re.Match[bytes]) -> bytes:
        if int(match.group(2)) <= self._cap:
            return match.group(0)
        return match.group(1) + b"retry: " + str(self._cap).encode()


class _WatchedByteStream(httpx2.AsyncByteStream):
    """A response body that reports how it broke: `on_broken(saw_event_id)` on a network-level failure.

    For an SSE body it notes whether any event carried an `id:` field (scanned at line starts, across chunk
    boundaries): a stream that did can be resumed with Last-Event-ID, one that did not cannot; and it caps
    the server's `retry` (RetryCap).
    """

    def __init__(
        self,
        inner: httpx2.AsyncByteStream,
        on_broken: Callable[[bool], None],
        limit: int | None = None,
        *,
        sse: bool = False,
    ) -> None:
        self._inner = inner
        self._on_broken = on_broken
        self._limit = limit  # a cap on the whole body (JSON responses; SSE events are capped per event)
        self._retry = RetryCap(MAX_RETRY_MS) if sse else None
        self.saw_event_id = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        tail = b"\n"  # the previous chunk's last bytes, so a field split across chunks is still found
        try:
            async for part in self._inner:
                seen += len(part)
                if self._limit is not None and seen > self._limit:
                    raise BodyTooLarge(None, self._limit)
                if self._retry is not None:
                    if not self.saw_event_id:
                        window = tail + part
                        self.saw_event_id = b"\nid:" in window or b"\rid:" in window
                        tail = window[-3:]
                    part = self._retry.feed(part)
                    if not part:
                        continue
                yield part
            if self._retry is not None and (rest := self._retry.flush()):
                yield rest
        except _LOST:
            self._on_broken(self.saw_event_id)
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Resumptions:
    """Failed resumptions per broken SSE stream, keyed by the Last-Event-ID they resume from.

    The SDK retries one broken stream MAX_RECONNECTION_ATTEMPTS times with the same Last-Event-ID (waiting
    the server's `retry` before each) and then gives up on it; at the same count we declare the connection
    lost. Bounded: a long session breaks many streams.
    """

    __slots__ = ("_failures",)
    _KEEP = 256

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}

    def failed(self, last_event_id: str) -> bool:
        """Count one failed attempt; True once the stream has used up its attempts."""
        count = self._failures.pop(last_event_id, 0) + 1
        self._failures[last_event_id] = count  # re-inserted: the dict's order is recency
        while len(self._failures) > self._KEEP:
            del self._failures[next(iter(self._failures))]
        return count >= MAX_RECONNECTION_ATTEMPTS


class _WatchdogTransport(httpx2.AsyncBaseTransport):
    """Reports a dead server as soon as the network says so, but lets the SDK resume what can be resumed.

    Lost at once: a connect error; any network failure of a request, or of a POST's response body that is
    not a resumable SSE stream; a 404 to a request that carries a session id (the server forgot the
    session: it restarted). Not lost: an SSE response body that broke after an event with an id, since the
    SDK resumes it with a GET carrying Last-Event-ID after the server's `retry` (within the call's own
    deadline); only when the resumptions of one stream keep failing (MAX_RECONNECTION_ATTEMPTS, the SDK's
    own bound) is the connection lost. A broken standalone GET stream is reopened by the SDK, so how the
    reopening goes decides. The 2026-07-28 era is stateless: servers send no event ids (nor response
    headers before the first event), so nothing is resumable and a broken response stream is lost as before.
    """

    def __init__(self, on_lost: OnLost, max_body: int | None = None) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._on_lost = on_lost
        self._max_body = max_body
        self._resumptions = _Resumptions()

    def _resumption_failed(self, last_event_id: str, why: str) -> None:
        log.info("SSE stream resumption failed", reason=why)
        if self._resumptions.failed(last_event_id):
            self._on_lost(f"could not resume a broken SSE stream ({why})")

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        # A GET carrying Last-Event-ID is the SDK resuming a broken stream.
        resuming = request.headers.get(LAST_EVENT_ID) if request.method == "GET" else None
        try:
            response = await self._inner.handle_async_request(request)
        except httpx2.ConnectError as exc:
            self._on_lost(f"ConnectError: {exc}")
            raise
        except _LOST as exc:
            if resuming is not None:
                self._resumption_failed(resuming, f"{type(exc).__name__}: {exc}")
            else:
                self._on_lost(f"{type(exc).__name__}: {exc}")
            raise
        if response.status_code == 404 and "mcp-session-id" in request.headers:
            self._on_lost("the server no longer knows this session (HTTP 404)")
        elif resuming is not None and response.status_code >= 400:
            self._resumption_failed(resuming, f"HTTP {response.status_code}")
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        content_type = response.headers.get("content-type", "").lower()
        limit = self._max_body if content_type.startswith("application/json") else None

        def on_broken(saw_event_id: bool) -> None:
            if resuming is not None:
                self._resumption_failed(resuming, "the resumed stream broke")
            elif saw_event_id or request.method == "GET":
                # The SDK resumes the one (Last-Event-ID) and reopens the other (the standalone stream, which
                # carries no request): how that goes decides.
                log.info("SSE stream broke; the client resumes or reopens it", url=str(request.url))
            else:
                self._on_lost("a response stream broke before any resumable event")

        response.stream = _WatchedByteStream(
            response.stream, on_broken, limit, sse=content_type.startswith("text/event-stream")
        )
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def request_headers(headers: Mapping[str, str], bearer_token: str | None) -> dict[str, str]:
    """The target's headers plus `Authorization: Bearer` when a token is set (the token wins)."""
    merged = dict(headers)
    if bearer_token:
        for key in [k for k in merged if k.lower() == "authorization"]:
            del merged[key]
        merged["Authorization"] = f"Bearer {bearer_token}"
    return merged


def _http_client(
    target: HttpTarget, on_lost: OnLost | None = None, auth: httpx2.Auth | None = None
) -> httpx2.AsyncClient:
    timeout = httpx2.Timeout(target.connect_timeout, read=target.read_timeout)
    return httpx2.AsyncClient(
        headers=request_headers(target.headers, target.bearer_token),
        timeout=timeout,
        auth=auth,
        transport=_WatchdogTransport(on_lost, target.max_message_bytes) if on_lost is not None else None,
    )


@contextlib.asynccontextmanager
async def streamable_http_transport(
    target: HttpTarget, on_lost: OnLost | None = None
) -> AsyncIterator[Streams]:
    """The SDK's streamable HTTP client with our headers, timeouts and SSE event cap.

    `on_lost(reason)` is called (possibly more than once) when the server is found gone.
    """
    async with (
        server_auth(target) as auth,
        _http_client(target, on_lost, auth) as http,
        streamable_http_client(
            target.url,
            http_client=http,
            max_sse_event_size=target.max_message_bytes,
        ) as streams,
    ):
        yield streams


@contextlib.asynccontextmanager
async def sse_transport(target: HttpTarget) -> AsyncIterator[Streams]:
    """Legacy HTTP+SSE: a GET event stream for server messages, POSTs to the announced endpoint for ours.

    The SDK's sse_client hard-codes a 1 MiB event cap, hence this version. A POST that fails at the HTTP
    level answers its request with a JSON-RPC error; a broken connection ends the session.
    """
    async with server_auth(target) as auth, _http_client(target, auth=auth) as http:
        try:
            source_cm = sse_within_origin(http, target.url, max_event_size=target.max_message_bytes)
            event_source = await source_cm.__aenter__()
        except httpx2.HTTPError as exc:
            raise ConnectError(f"could not open SSE stream at {target.url}: {exc}", "check the URL") from exc
        try:
            response = event_source.response
            if response.status_code != 200:
                if auth is not None and auth.failure is not None:
                    raise auth.failure
                raise ConnectError(
                    f"SSE endpoint {target.url} answered HTTP {response.status_code}",
                    "check the URL and credentials",
                )
            read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

            async def sse_reader(*, task_status: anyio.abc.TaskStatus[str]) -> None:
                started = False
                try:
                    async with read_writer:
                        async for sse in event_source:
                            if sse.event == "endpoint":
                                endpoint = urljoin(target.url, sse.data)
                                base, ep = urlparse(target.url), urlparse(endpoint)
                                if (base.scheme, base.netloc) != (ep.scheme, ep.netloc):
                                    raise ConnectError(
                                        f"SSE endpoint origin differs from {target.url}: {endpoint}",
                                        "the server announced a foreign message endpoint",
                                    )
                                if not started:
                                    started = True
                                    task_status.started(endpoint)
                            elif sse.event == "message" and sse.data:
                                try:
                                    message = types.jsonrpc_message_adapter.validate_json(
                                        sse.data, by_name=False
                                    )
                                except ValueError:
                                    log.warning("skipped a non-JSON-RPC SSE event", url=target.url)
                                    continue
                                await read_writer.send(SessionMessage(message))
                except (
                    httpx2.HTTPError,
                    httpx2.SSEError,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                ) as exc:
                    log.info("SSE stream ended", url=target.url, error=str(exc))
                if not started:
                    raise ConnectError(f"SSE stream at {target.url} closed before announcing an endpoint")

            async def post(endpoint: str, session_message: SessionMessage) -> None:
                message = session_message.message
                try:
                    response = await request_within_origin(
                        http,
                        "POST",
                        endpoint,
                        json=message.model_dump(by_alias=True, mode="json", exclude_unset=True),
                    )
                except httpx2.HTTPError as exc:
                    log.info("SSE POST failed; connection lost", url=endpoint, error=str(exc))
                    read_writer.close()
                    return
                if response.status_code >= 400 and isinstance(message, types.JSONRPCRequest):
                    error = types.JSONRPCError(
                        jsonrpc="2.0",
                        id=message.id,
                        error=types.ErrorData(
                            code=types.INTERNAL_ERROR, message=f"HTTP {response.status_code} from {endpoint}"
                        ),
                    )
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await read_writer.send(SessionMessage(error))

            async def post_writer(endpoint: str) -> None:
                async with write_reader, anyio.create_task_group() as posts:
                    async for session_message in write_reader:
                        # Concurrent POSTs: a slow request must not hold back the next one.
                        posts.start_soon(post, endpoint, session_message)

            async with anyio.create_task_group() as tg:
                endpoint = await tg.start(sse_reader)
                tg.start_soon(post_writer, endpoint)
                try:
                    yield read_stream, write_stream
                finally:
                    tg.cancel_scope.cancel()
                    write_stream.close()
                    read_stream.close()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(target.connect_timeout):
                await source_cm.__aexit__(None, None, None)
