"""One entry point for every transport: `connect(target)` yields a live, initialized `Connection`.

The SDK client and its transport live in a holder task we own, so a transport that dies cannot cancel the
caller; `closed` is set the moment the read side ends, and every failure surfaces as a typed TransportError.

Tool-list changes reach `message_handler` as `mcp_types.ToolListChangedNotification` in both eras: 2025-era
servers send `notifications/tools/list_changed` unprompted; 2026-07-28 servers only send it on a
`subscriptions/listen` stream, which `connect` keeps open for the connection's life when the server
advertises `tools.listChanged` (the SDK tees the stream's events to `message_handler`). The supervisor
only has to re-run `list_all_tools` when it sees that notification. The same stream asks for resources and
prompts list_changed where advertised; resource subscriptions of that era ride a second listen stream
(`_listen_resources`), re-opened whenever the set of subscribed URIs changes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import mcp
import mcp_types as types
import structlog
from mcp.client.session import ElicitationFnT, ListRootsFnT, LoggingFnT, MessageHandlerFnT, SamplingFnT
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from transports.errors import (
    CallTimeout,
    CapabilityMissing,
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    ResourceTooLarge,
    ServerRequestError,
    StartupTimeout,
    TransportError,
    is_too_large,
    too_large_reason,
)
from transports.http import sse_transport, streamable_http_transport
from transports.stdio import StderrRing, StdioTransport
from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget
from transports.websocket import websocket_transport

log = structlog.get_logger(__name__)

PAGE_CAP = 1000  # list pages (tools, resources, templates, prompts) followed before we call the server broken
# What one resources/read may keep (decoded text + base64 blob characters): a read feeds prompts and files, and
# max_message_bytes (32 MiB) is a transport bound, not a useful size for one resource.
DEFAULT_MAX_RESOURCE_BYTES = 8 * 1024 * 1024
_TIMEOUT_BACKSTOP = 2.0  # extra seconds past the SDK's own per-request timeout before we cut the call
_LISTEN_RETRY = 1.0  # seconds between subscriptions/listen attempts when a stream drops
_CLOSE_BOUND_NET = 10.0  # seconds allowed for closing a network transport (stdio computes its own)

try:
    _VERSION = importlib.metadata.version("agent-runtime")
except importlib.metadata.PackageNotFoundError:  # running from a source tree without an install
    _VERSION = "0"


class _ReceiveStream(Protocol):
    """What a transport's read stream offers (anyio's memory stream, or our own for WebSocket/stdio)."""

    async def receive(self) -> SessionMessage | Exception: ...

    async def aclose(self) -> None: ...


class _WatchedReadStream:
    """The transport's read stream, setting `closed` when it ends (EOF or closed under the reader).

    `lose()` ends it from outside: the dispatcher sees EOF and fails every pending request with
    CONNECTION_CLOSED at once, which is how a transport that would otherwise linger is declared dead.
    """

    __slots__ = ("_closed", "_inner", "_lost", "_scope", "rejected")

    def __init__(self, inner: _ReceiveStream, closed: anyio.Event) -> None:
        self._inner = inner
        self._closed = closed
        self._lost = False
        self._scope: anyio.CancelScope | None = None
        self.rejected: list[tuple[str, str]] = []  # malformed tools dropped from listings: (name, why)

    def lose(self) -> None:
        self._lost = True
        if self._scope is not None:
            self._scope.cancel()

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        if not self._lost:
            with anyio.CancelScope() as scope:
                self._scope = scope
                try:
                    item = await self._inner.receive()
                    if type(item) is SessionMessage and type(item.message) is types.JSONRPCResponse:
                        tools = item.message.result.get("tools")
                        if type(tools) is list:  # a tools/list page: keep its well-formed tools
                            item.message.result["tools"] = _salvage_tools(tools, self.rejected)
                    return item
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    self._closed.set()
                    raise
                finally:
                    self._scope = None
        self._closed.set()
        raise anyio.EndOfStream

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _salvage_tools(tools: list[Any], rejected: list[tuple[str, str]]) -> list[Any]:
    """The well-formed entries of a tools/list page; each malformed one is reported in `rejected` with the
    field at fault (one bad definition must not cost the server its other tools)."""
    kept = []
    for i, raw in enumerate(tools):
        try:
            types.Tool.model_validate(raw)
        except ValidationError as exc:
            name = raw.get("name") if isinstance(raw, dict) else None
            shown = name if isinstance(name, str) else f"#{i}"
            errors = exc.errors(include_url=False, include_input=False)
            fields = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'definition'}: {e['msg']}" for e in errors[:3]
            )
            rejected.append((shown[:128], f"tools[{i}] ({shown[:128]!r}) is malformed: {fields}"))
            continue
        kept.append(raw)
    return kept


class _WatchedTransport:
    """Wraps any SDK-shaped transport so the client's read stream reports its end on `closed`."""

    def __init__(self, closed: anyio.Event) -> None:
        self.inner: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._closed = closed
        self._read: _WatchedReadStream | None = None
        self._lost_before_open = False
        self.rejected: list[tuple[str, str]] = []

    def lose(self, reason: str) -> None:
        if not self._closed.is_set():
            log.info("transport declared lost", reason=reason)
        if self._read is not None:
            self._read.lose()
        else:
            self._lost_before_open = True

    async def __aenter__(self) -> tuple[Any, Any]:
        assert self.inner is not None
        read_stream, write_stream = await self.inner.__aenter__()
        self._read = _WatchedReadStream(read_stream, self._closed)
        self._read.rejected = self.rejected
        if self._lost_before_open:
            self._read.lose()
        return self._read, write_stream

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self.inner is not None
        try:
            return await self.inner.__aexit__(*exc_info)
        finally:
            self._closed.set()


@dataclass(slots=True, eq=False)
class Connection:
    """A live MCP session to one server. Methods may be called from any task while `connect` is entered."""

    target: Target
    client: mcp.Client
    pid: int | None
    stderr: StderrRing | None
    closed: anyio.Event = field(default_factory=anyio.Event)
    rejected: list[tuple[str, str]] | None = None  # where the read stream reports malformed listed tools
    # 2026-07-28 resource subscriptions: the URIs a subscriptions/listen stream (`_listen_resources`) covers
    listen_uris: set[str] = field(default_factory=set)
    listen_changed: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) when they change
    listen_honored: frozenset[str] = frozenset()  # what the server acknowledged for the open stream
    listen_settled: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) after each (re)open

    @property
    def protocol_version(self) -> str:
        return self.client.protocol_version

    async def send_roots_list_changed(self, *, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Tell a 2025-era server its roots changed; False when nothing was sent. A 2026-07-28 session has no
        client notifications: there the server reads the roots on each request, so there is nothing to send."""
        if self.closed.is_set() or self.client.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return False
        with self._errors("notifications/roots/list_changed", timeout), anyio.fail_after(timeout):
            await self.client.session.send_notification(types.RootsListChangedNotification())
        return True

    # The per-call `timeout` is the supervisor's contract (it owns deadlines per call), hence ASYNC109.
    async def list_all_tools(
        self,
        *,
        timeout: float,  # noqa: ASYNC109
        rejected: list[tuple[str, str]] | None = None,
    ) -> list[types.Tool]:
        """Every well-formed tool, following next_cursor to the end (at most PAGE_CAP pages), within `timeout`
        overall; malformed entries are left out and, when given, reported in `rejected` as (name, why)."""
        if self.rejected is not None:
            self.rejected.clear()
        try:
            return await self._list_all_tools(timeout)
        finally:
            if rejected is not None and self.rejected is not None:
                seen = {name for name, _ in rejected}
                rejected.extend(r for r in self.rejected if r[0] not in seen)

    async def _list_all_tools(self, timeout: float) -> list[types.Tool]:  # noqa: ASYNC109
        tools: list[types.Tool] = []
        cursor: str | None = None
        seen: set[str] = set()
        with self._errors("tools/list", timeout):
            with anyio.fail_after(timeout):
                for _ in range(PAGE_CAP):
                    page = await self.client.list_tools(cursor=cursor, cache_mode="bypass")
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if cursor is None:
                        return tools
                    if cursor in seen:
                        raise ServerRequestError(
                            types.INTERNAL_ERROR, f"tools/list repeated cursor {cursor!r}"
                        )
                    seen.add(cursor)
        raise ServerRequestError(types.INTERNAL_ERROR, f"tools/list did not end within {PAGE_CAP} pages")

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109
        progress: ProgressFnT | None = None,
    ) -> types.CallToolResult:
        """Call a tool. Tool errors (`is_error`) are returned; transport and protocol failures raise.

        `progress(progress, total, message)` receives the server's progress notifications for this call (a
        progress token is sent only when it is given); they extend nothing: `timeout` stays the deadline.
        Whichever way the call is abandoned (the SDK's read timeout, our backstop, the caller cancelled), the
        SDK sends the server `notifications/cancelled` for it.
        """
        # The hot path: the error mapping and the backstop are inline here, not context-manager generators.
        if self.closed.is_set():
            raise self._closed_error(f"tools/call {name}")
        backstop = anyio.CancelScope(deadline=anyio.current_time() + timeout + _TIMEOUT_BACKSTOP)
        try:
            with backstop:
                return await self.client.call_tool(
                    name, arguments, read_timeout_seconds=timeout, progress_callback=progress
                )
        except (MCPError, TimeoutError, ValidationError, RuntimeError) as exc:
            mapped = self._map_error(f"tools/call {name}", timeout, exc)
            if mapped is None:
                raise
            raise mapped from None
        # Only the backstop's deadline ends up here: the SDK did not honour its own read timeout.
        raise CallTimeout(f"tools/call {name}: no reply within {timeout:g}s", "raise the timeout")

    async def set_log_level(self, level: types.LoggingLevel, *, timeout: float) -> bool:  # noqa: ASYNC109
        """Send `logging/setLevel` when the session needs it: a 2025-era server with the logging capability.
        False when not sent (2026-07-28 sessions carry the level on each request, set by `connect`)."""
        caps = self.client.server_capabilities
        if self.protocol_version in MODERN_PROTOCOL_VERSIONS or caps.logging is None:
            return False
        # The request itself, not Client.set_logging_level: that one warns (deprecated in the 2026 era, which
        # this session is not on), and silencing a warning means changing process-wide filters.
        request = types.SetLevelRequest(params=types.SetLevelRequestParams(level=level))
        with self._errors("logging/setLevel", timeout), anyio.fail_after(timeout):
            await self.client.session.send_request(request, types.EmptyResult)
        return True

    # -- resources, prompts, completion (each bounded by `timeout`, errors mapped as for call_tool) -----

    def _require(self, capability: str, what: str) -> None:
        caps = self.client.server_capabilities
        present = {
            "resources": caps.resources is not None,
            "prompts": caps.prompts is not None,
            "completions": caps.completions is not None,
            "subscribe": caps.resources is not None and bool(caps.resources.subscribe),
        }[capability]
        if not present:
            raise CapabilityMissing(
                f"{what}: {_describe(self.target)} does not offer {capability}",
                "the server did not advertise this capability at initialization",
            )

    async def _all_pages(self, method: str, fetch: Callable[[str | None], Any], timeout: float) -> list[Any]:  # noqa: ASYNC109
        """Every item of a paginated listing (at most PAGE_CAP pages, no cursor twice), within `timeout`."""
        items: list[Any] = []
        cursor: str | None = None
        seen: set[str] = set()
        with self._errors(method, timeout), anyio.fail_after(timeout):
            for _ in range(PAGE_CAP):
                page_items, cursor = await fetch(cursor)
                items.extend(page_items)
                if cursor is None:
                    return items
                if cursor in seen:
                    raise ServerRequestError(types.INTERNAL_ERROR, f"{method} repeated cursor {cursor!r}")
                seen.add(cursor)
        raise ServerRequestError(types.INTERNAL_ERROR, f"{method} did not end within {PAGE_CAP} pages")

    async def list_resources(self, *, timeout: float) -> list[types.Resource]:  # noqa: ASYNC109
        self._require("resources", "resources/list")

        async def fetch(cursor: str | None) -> tuple[list[types.Resource], str | None]:
            page = await self.client.list_resources(cursor=cursor, cache_mode="bypass")
            return page.resources, page.next_cursor

        return await self._all_pages("resources/list", fetch, timeout)

    async def list_resource_templates(self, *, timeout: float) -> list[types.ResourceTemplate]:  # noqa: ASYNC109
        self._require("resources", "resources/templates/list")

        async def fetch(cursor: str | None) -> tuple[list[types.ResourceTemplate], str | None]:
            page = await self.client.list_resource_templates(cursor=cursor, cache_mode="bypass")
            return page.resource_templates, page.next_cursor

        return await self._all_pages("resources/templates/list", fetch, timeout)

    async def list_prompts(self, *, timeout: float) -> list[types.Prompt]:  # noqa: ASYNC109
        self._require("prompts", "prompts/list")

        async def fetch(cursor: str | None) -> tuple[list[types.Prompt], str | None]:
            page = await self.client.list_prompts(cursor=cursor, cache_mode="bypass")
            return page.prompts, page.next_cursor

        return await self._all_pages("prompts/list", fetch, timeout)

    async def read_resource(
        self,
        uri: str,
        *,
        timeout: float,  # noqa: ASYNC109
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> types.ReadResourceResult:
        """Read `uri`; contents larger than `max_bytes` in all (text characters as UTF-8, blobs as their
        base64 text) raise ResourceTooLarge instead of being kept."""
        what = f"resources/read {uri}"
        self._require("resources", what)
        with self._errors(what, timeout), anyio.fail_after(timeout):
            # Bypass the SDK's response cache: a read after resources/updated must see the new contents.
            result = await self.client.read_resource(uri, cache_mode="bypass")
        size = 0
        for item in result.contents:
            size += (
                len(item.text.encode()) if isinstance(item, types.TextResourceContents) else len(item.blob)
            )
        if size > max_bytes:
            raise ResourceTooLarge(
                f"{what}: {size} bytes of contents exceed the limit of {max_bytes} bytes",
                "read a smaller resource: one read keeps no more than this",
            )
        return result

    async def subscribe_resource(self, uri: str, *, timeout: float) -> None:  # noqa: ASYNC109
        """Ask for notifications/resources/updated of `uri`; they reach message_handler. 2025-era sessions send
        resources/subscribe; on 2026-07-28 the connection's subscriptions/listen stream is re-opened with the
        URI, and this returns once the server acknowledged it."""
        what = f"resources/subscribe {uri}"
        self._require("subscribe", what)
        if self.protocol_version in MODERN_PROTOCOL_VERSIONS:
            self.listen_uris.add(uri)
            _signal(self, "listen_changed")
            with self._errors(what, timeout), anyio.fail_after(timeout):
                while uri not in self.listen_honored:
                    if uri not in self.listen_uris:  # unsubscribed meanwhile
                        return
                    await self.listen_settled.wait()
            return
        with self._errors(what, timeout), anyio.fail_after(timeout):
            # Sent as a plain request: the SDK's helper warns that the method is gone in the 2026 era.
            request = types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
            await self.client.session.send_request(request, types.EmptyResult)

    async def unsubscribe_resource(self, uri: str, *, timeout: float) -> None:  # noqa: ASYNC109
        what = f"resources/unsubscribe {uri}"
        self._require("subscribe", what)
        if self.protocol_version in MODERN_PROTOCOL_VERSIONS:
            self.listen_uris.discard(uri)
            _signal(self, "listen_changed")  # the stream re-opens without it; nothing to wait for
            return
        with self._errors(what, timeout), anyio.fail_after(timeout):
            request = types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri))
            await self.client.session.send_request(request, types.EmptyResult)

    async def get_prompt(
        self,
        name: str,
        arguments: dict[str, str] | None = None,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> types.GetPromptResult:
        what = f"prompts/get {name}"
        self._require("prompts", what)
        with self._errors(what, timeout), anyio.fail_after(timeout):
            return await self.client.get_prompt(name, arguments)

    async def complete(
        self,
        ref: types.ResourceTemplateReference | types.PromptReference,
        argument: dict[str, str],
        context_arguments: dict[str, str] | None = None,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> types.CompleteResult:
        what = "completion/complete"
        self._require("completions", what)
        with self._errors(what, timeout), anyio.fail_after(timeout):
            return await self.client.complete(ref, argument, context_arguments)

    @contextlib.contextmanager
    def _errors(self, what: str, timeout: float) -> Any:
        """Map SDK failures to our typed errors; `sent` is False only when the transport was already gone."""
        if self.closed.is_set():
            raise self._closed_error(what)
        try:
            yield
        except (MCPError, TimeoutError, ValidationError, RuntimeError) as exc:
            mapped = self._map_error(what, timeout, exc)
            if mapped is None:
                raise
            raise mapped from None

    def _closed_error(self, what: str) -> ConnectionLost:
        return ConnectionLost(f"{what}: connection to {_describe(self.target)} is closed", sent=False)

    def _map_error(self, what: str, timeout: float, exc: Exception) -> TransportError | None:
        """The typed error for an SDK failure, or None for an exception that is not ours to map."""
        if isinstance(exc, MCPError):
            if is_too_large(exc.message):
                # Our stdio/WebSocket readers, our HTTP body cap (through the SDK) or httpx's SSE event cap
                # dropped the reply while it streamed in: a typed failure, not the tool's error.
                at = exc.message.find("a message")
                detail = (
                    exc.message[at:] if at >= 0 else too_large_reason(None, self.target.max_message_bytes)
                )
                return MessageTooLarge(
                    f"{what}: {detail}", "raise max_message_bytes for this server, or ask the tool for less"
                )
            if exc.code == types.CONNECTION_CLOSED:
                return ConnectionLost(
                    f"{what}: connection to {_describe(self.target)} lost",
                    self._hint(),
                    sent=True,  # conservative: it may have reached the server before the transport died
                )
            if exc.code == types.REQUEST_TIMEOUT:
                return CallTimeout(f"{what}: no reply within {timeout:g}s", "raise the timeout")
            return ServerRequestError(exc.code, exc.message, exc.error.data)
        if isinstance(exc, TimeoutError):
            return CallTimeout(f"{what}: no reply within {timeout:g}s", "raise the timeout")
        if isinstance(exc, ValidationError):
            return ServerRequestError(
                types.INTERNAL_ERROR, f"{what}: malformed result: {exc.error_count()} errors"
            )
        # The SDK raises RuntimeError once the client context has been exited.
        if self.closed.is_set() or "context manager" in str(exc):
            return self._closed_error(what)
        return None

    def _hint(self) -> str | None:
        if self.stderr is not None and (tail := self.stderr.tail(3)):
            return "server stderr: " + " | ".join(tail)
        return None


def _signal(conn: Connection, name: str) -> None:
    """Set the named event of `conn` and put a fresh one in its place (waiters re-check their condition)."""
    event: anyio.Event = getattr(conn, name)
    setattr(conn, name, anyio.Event())
    event.set()


def _describe(target: Target) -> str:
    if isinstance(target, StdioTarget):
        return target.command
    return target.url


def _open_transport(
    target: Target, on_lost: Callable[[str], None], redact: Callable[[str], str] | None = None
) -> tuple[contextlib.AbstractAsyncContextManager[Any], StdioTransport | None]:
    if isinstance(target, StdioTarget):
        stdio = StdioTransport(target, redact=redact)
        return stdio, stdio
    if isinstance(target, HttpTarget):
        if target.kind == "sse":
            return sse_transport(target), None
        return streamable_http_transport(target, on_lost), None
    if isinstance(target, WebSocketTarget):
        return websocket_transport(target), None
    raise TypeError(f"unknown target type: {type(target).__name__}")


def _first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (the SDK wraps everything escaping its task groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _connect_error(target: Target, exc: BaseException, stdio: StdioTransport | None) -> TransportError:
    leaf = _first_error(exc)
    if isinstance(leaf, TransportError):
        if stdio is not None and isinstance(leaf, ConnectError) and not leaf.stderr_tail:
            return ConnectError(leaf.reason, leaf.hint, stderr_tail=stdio.stderr.tail())
        return leaf
    tail = stdio.stderr.tail() if stdio is not None else None
    if isinstance(leaf, MCPError):
        if leaf.code == types.CONNECTION_CLOSED:
            exited = (
                f" (exit code {stdio.returncode})"
                if stdio is not None and stdio.returncode is not None
                else ""
            )
            reason = f"{_describe(target)} closed the connection during initialization{exited}"
        else:
            reason = f"{_describe(target)} rejected initialization: {leaf.message} (code {leaf.code})"
        return ConnectError(reason, "run the server by hand to see why it fails", stderr_tail=tail)
    return ConnectError(
        f"could not connect to {_describe(target)}: {type(leaf).__name__}: {leaf}",
        "check that the server is running and reachable",
        stderr_tail=tail,
    )


async def _listen_tools_changed(client: mcp.Client, closed: anyio.Event) -> None:
    """Keep a 2026-era list_changed subscription (tools, and resources/prompts where the server advertises
    their listChanged) open; its events reach message_handler by the SDK's tee."""
    caps = client.server_capabilities
    tools = caps.tools is not None and bool(caps.tools.list_changed)
    resources = caps.resources is not None and bool(caps.resources.list_changed)
    prompts = caps.prompts is not None and bool(caps.prompts.list_changed)
    while not closed.is_set():
        try:
            async with client.listen(
                tools_list_changed=tools, resources_list_changed=resources, prompts_list_changed=prompts
            ) as subscription:
                async for _event in subscription:
                    pass
        except ListenNotSupportedError:
            return
        except (MCPError, SubscriptionLost, TimeoutError, RuntimeError) as exc:
            log.debug("tools list_changed subscription ended", error=str(exc))
        with anyio.move_on_after(_LISTEN_RETRY):
            await closed.wait()


async def _drain(subscription: Any, ended: anyio.Event, scope: anyio.CancelScope) -> None:
    """Read a listen stream's events until it ends (they were teed to message_handler already)."""
    try:
        async for _event in subscription:
            pass
    except (MCPError, SubscriptionLost) as exc:
        log.debug("resource subscription stream lost", error=str(exc))
    ended.set()
    scope.cancel()


async def _listen_resources(conn: Connection) -> None:
    """Serve 2026-07-28 resource subscriptions: one subscriptions/listen stream for `conn.listen_uris`, opened
    again whenever they change or the stream drops. Its events reach message_handler by the SDK's tee; the
    iterator is drained here so the SDK's backlog of pending events stays empty."""
    while not conn.closed.is_set():
        uris = sorted(conn.listen_uris)
        changed = conn.listen_changed
        if not uris:
            conn.listen_honored = frozenset()
            _signal(conn, "listen_settled")
            await changed.wait()
            continue
        try:
            async with conn.client.listen(resource_subscriptions=uris) as subscription:
                conn.listen_honored = frozenset(subscription.honored.resource_subscriptions or ())
                _signal(conn, "listen_settled")
                ended = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_drain, subscription, ended, tg.cancel_scope)
                    await changed.wait()
                    tg.cancel_scope.cancel()
                if not ended.is_set():
                    continue  # the URIs changed: re-open at once with the new set
        except (MCPError, SubscriptionLost, TimeoutError, RuntimeError) as exc:
            log.debug("resource subscription stream ended", error=str(exc))
        conn.listen_honored = frozenset()
        _signal(conn, "listen_settled")
        with anyio.move_on_after(_LISTEN_RETRY):
            await changed.wait()


@contextlib.asynccontextmanager
async def connect(
    target: Target,
    *,
    startup_timeout: float,
    message_handler: MessageHandlerFnT | None = None,
    client_name: str = "agent-runtime",
    redact: Callable[[str], str] | None = None,
    logging_callback: LoggingFnT | None = None,
    log_level: types.LoggingLevel | None = None,
    sampling_callback: SamplingFnT | None = None,
    sampling_capabilities: types.SamplingCapability | None = None,
    elicitation_callback: ElicitationFnT | None = None,
    list_roots_callback: ListRootsFnT | None = None,
) -> AsyncIterator[Connection]:
    """Spawn/open, negotiate (2026-07-28 where supported, else 2025-11-25) and yield a Connection.

    Enter and exit in one task. Raises ConnectError / StartupTimeout on entry; exit closes everything
    within a bound (stdio: eof_grace + term_grace + a few seconds). `redact` cleans every stderr line of a
    stdio server before it is kept, logged or written to its log file. `logging_callback` receives the
    server's `notifications/message`; `log_level` asks 2026-07-28 servers for that level and above on every
    request (2025-era servers take it through `Connection.set_log_level`).

    The sampling, elicitation and roots callbacks answer the server's requests to the client; each one given
    is advertised as a capability (in `initialize` on 2025-era sessions, in every request's `_meta` on
    2026-07-28 ones, whose input-required rounds the SDK routes to the same callbacks). What they decide is
    the caller's business: this layer only forwards them.
    """
    closed = anyio.Event()
    stop = anyio.Event()
    holder_done = anyio.Event()
    watched = _WatchedTransport(closed)
    watched.inner, stdio = _open_transport(target, watched.lose, redact)
    client = mcp.Client(
        watched,
        mode="auto",
        message_handler=message_handler,
        logging_callback=logging_callback,
        log_level=log_level,
        client_info=types.Implementation(name=client_name, version=_VERSION),
        sampling_callback=sampling_callback,
        sampling_capabilities=sampling_capabilities,
        elicitation_callback=elicitation_callback,
        list_roots_callback=list_roots_callback,
    )

    startup_error: list[TransportError] = []

    async def hold(*, task_status: anyio.abc.TaskStatus[Connection | None]) -> None:
        # Never raises: errors before startup are handed back through `startup_error` (raising from a task
        # group would wrap them in an ExceptionGroup); after startup they end the connection via `closed`.
        started = False
        try:
            async with client:
                conn = Connection(
                    target=target,
                    client=client,
                    pid=stdio.pid if stdio is not None else None,
                    stderr=stdio.stderr if stdio is not None else None,
                    closed=closed,
                    rejected=watched.rejected,
                )
                caps = client.server_capabilities
                modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
                watch = modern and any(
                    cap is not None and bool(cap.list_changed)
                    for cap in (caps.tools, caps.resources, caps.prompts)
                )
                started = True
                task_status.started(conn)
                async with anyio.create_task_group() as tg:
                    if watch:
                        tg.start_soon(_listen_tools_changed, client, closed)
                    if modern and caps.resources is not None and caps.resources.subscribe:
                        tg.start_soon(_listen_resources, conn)
                    await stop.wait()
                    tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:
            leaf = _first_error(exc)
            if isinstance(leaf, anyio.get_cancelled_exc_class()):
                raise
            if not isinstance(exc, Exception) and not isinstance(leaf, Exception):
                raise
            if not started:
                startup_error.append(_connect_error(target, exc, stdio))
                task_status.started(None)
            else:
                # After startup the transport's death is reported through `closed`, not by crashing the owner.
                log.info("connection ended", server=_describe(target), error=str(leaf))
        finally:
            closed.set()
            holder_done.set()

    close_bound = (
        target.eof_grace + target.term_grace + 5.0 if isinstance(target, StdioTarget) else _CLOSE_BOUND_NET
    )
    # Exceptions are carried out of the task group and raised after it, so neither ours nor the caller's
    # arrive wrapped in an ExceptionGroup.
    pending: BaseException | None = None
    async with anyio.create_task_group() as tg:
        conn: Connection | None = None
        try:
            with anyio.fail_after(startup_timeout):
                conn = await tg.start(hold)
        except TimeoutError:
            tail = stdio.stderr.tail() if stdio is not None else None
            pending = StartupTimeout(
                f"{_describe(target)} did not finish initializing within {startup_timeout:g}s",
                "raise the startup timeout or check the server",
                stderr_tail=tail,
            )
        if conn is None:
            pending = pending or (startup_error[0] if startup_error else ConnectError("connection failed"))
        else:
            try:
                yield conn
            except BaseException as exc:
                pending = exc
            finally:
                stop.set()
                with anyio.CancelScope(shield=True), anyio.move_on_after(close_bound):
                    await holder_done.wait()
                tg.cancel_scope.cancel()
    if pending is not None:
        raise pending
