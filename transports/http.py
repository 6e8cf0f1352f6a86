"""HTTP transports: streamable HTTP (the SDK's client, tuned) and legacy HTTP+SSE (ours, for its event size cap).

Both send the target's headers and bearer token (or OAuth tokens, transports.oauth), use its connect/read timeouts and accept messages up to
target.max_message_bytes: an SSE event (the SDK defaults to 1 MiB, which breaks large tool results) or a
JSON response body (which the SDK would read whole, however large), cut while it streams in.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urljoin, urlparse

import anyio
import httpx2
import mcp_types as types
import structlog
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
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
_LOST = (httpx2.ConnectError, httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError)


class BodyTooLarge(httpx2.StreamError):
    """A JSON response body over max_message_bytes: raised while it streams in (the SDK turns a StreamError
    into an error reply for its request, and `connect` recognises the message)."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(too_large_reason(size, limit))


class _WatchedByteStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, on_lost: OnLost, limit: int | None = None) -> None:
        self._inner = inner
        self._on_lost = on_lost
        self._limit = limit  # a cap on the whole body (JSON responses; SSE events are capped per event)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        try:
            async for part in self._inner:
                seen += len(part)
                if self._limit is not None and seen > self._limit:
                    raise BodyTooLarge(None, self._limit)
                yield part
        except _LOST as exc:
            self._on_lost(f"{type(exc).__name__}: {exc}")
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class _WatchdogTransport(httpx2.AsyncBaseTransport):
    """Reports a dead server the moment any request or response stream fails at the network level.

    The SDK's streamable HTTP client retries a broken response stream (resumption) for seconds and never
    ends the session on its own; `on_lost` lets `connect` end it at once instead. A 404 to a request that
    carries a session id means the server forgot the session (it restarted): also lost.
    """

    def __init__(self, on_lost: OnLost, max_body: int | None = None) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._on_lost = on_lost
        self._max_body = max_body

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except _LOST as exc:
            self._on_lost(f"{type(exc).__name__}: {exc}")
            raise
        if response.status_code == 404 and "mcp-session-id" in request.headers:
            self._on_lost("the server no longer knows this session (HTTP 404)")
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        limit = None
        if response.headers.get("content-type", "").lower().startswith("application/json"):
            limit = self._max_body
        response.stream = _WatchedByteStream(response.stream, self._on_lost, limit)
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
