"""The supervisor: one owner task per MCP server keeps its session alive, reconnects it, and feeds the registry.

Each owner task enters and exits `transports.connect` itself; other tasks reach the server only through
the live `Connection`, and shutdown is a signal (an Event, or a cancel scope owned by the owner task).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from agent_runtime.config import secret_values
from agent_runtime.config.types import ReconnectPolicy, RuntimeConfig, ServerConfig
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.logging import get_logger, register_secrets
from agent_runtime.tools.catalog import Catalog
from agent_runtime.tools.notices import NoticeCounters, ProgressCallback, ProgressRelay, ServerLogSink
from agent_runtime.tools.registry import ToolRegistry
from policies.secrets import redact
from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget

if TYPE_CHECKING:  # the transports package pulls in the MCP SDK (~0.8 s); imported when a server starts
    from mcp.client.session import MessageHandlerFnT
    from mcp.types import CallToolResult

    from agent_runtime.tools.client_features import ClientFeatures
    from transports import Connection

log = get_logger(__name__)  # structlog, imported on the first record that passes the level


class ServerState(enum.StrEnum):
    STARTING = "starting"  # connecting, or waiting to reconnect after a crash (restarts > 0)
    READY = "ready"
    DEGRADED = "degraded"  # live, but failing calls (set by the breaker)
    OPEN = "open"  # live, calls refused by the breaker
    STOPPED = "stopped"  # disabled in config, or shut down
    FAILED = "failed"  # the last attempt to start failed; retried with backoff


LIVE_STATES = frozenset({ServerState.READY, ServerState.DEGRADED, ServerState.OPEN})


@dataclass(slots=True)
class ServerStatus:
    """A snapshot of one server, for `servers status`, the monitor and the API."""

    name: str
    transport: str  # stdio, http, sse, ws
    state: ServerState
    since: float  # wall-clock time (time.time()) of the last state change
    enabled: bool = True
    last_error: str | None = None  # redacted
    pid: int | None = None
    restarts: int = 0  # reconnect attempts after the first start
    protocol_version: str | None = None
    tool_count: int = 0
    retry_at: float | None = None  # wall-clock time of the next connection attempt while backing off
    stderr_tail: list[str] = field(default_factory=list)
    notices: NoticeCounters = field(default_factory=NoticeCounters)  # server logs and progress, counted

    @property
    def reconnecting(self) -> bool:
        return self.state is ServerState.STARTING and self.restarts > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": self.transport,
            "state": str(self.state),
            "since": self.since,
            "enabled": self.enabled,
            "reconnecting": self.reconnecting,
            "last_error": self.last_error,
            "pid": self.pid,
            "restarts": self.restarts,
            "protocol_version": self.protocol_version,
            "tool_count": self.tool_count,
            "retry_at": self.retry_at,
            "stderr_tail": list(self.stderr_tail),
            "log_messages": self.notices.log_messages,
            "log_dropped": self.notices.log_dropped,
            "log_filtered": self.notices.log_filtered,
            "progress_dropped": self.notices.progress_dropped,
        }


class ServerUnavailable(AgentRuntimeError):
    """The server has no live session: the request was never sent (always safe to retry later)."""

    def __init__(self, server: str, state: ServerState, last_error: str | None) -> None:
        reason = f"server {server!r} is {state}" + (f": {last_error}" if last_error else "")
        super().__init__(reason, "`agent-runtime servers status` shows why; it reconnects on its own")
        self.server = server
        self.state = state
        self.last_error = last_error


class UnknownServer(AgentRuntimeError):
    def __init__(self, server: str, known: list[str]) -> None:
        super().__init__(f"no server named {server!r}", f"configured servers: {', '.join(known) or 'none'}")
        self.server = server


def transport_kind(target: Target) -> str:
    if isinstance(target, StdioTarget):
        return "stdio"
    if isinstance(target, HttpTarget):
        return "sse" if target.kind == "sse" else "http"
    if isinstance(target, WebSocketTarget):
        return "ws"
    raise TypeError(f"unknown target {target!r}")


def backoff_delay(policy: ReconnectPolicy, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect `attempt` (1-based): capped exponential, +/- jitter, never over the cap."""
    base = policy.initial_delay
    for _ in range(max(0, attempt - 1)):  # stepwise, so huge attempt counts cannot overflow a float power
        if base >= policy.max_delay:
            break
        base *= policy.multiplier
    base = min(policy.max_delay, base)
    jittered = base * (1.0 + policy.jitter * (2.0 * rand() - 1.0))
    return max(0.0, min(policy.max_delay, jittered))


def describe_error(exc: BaseException) -> str:
    """One line for a failure, preferring the user-facing error inside an ExceptionGroup."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if getattr(inner, "user_facing", False):
                return describe_error(inner)
        return describe_error(exc.exceptions[0]) if exc.exceptions else repr(exc)
    if getattr(exc, "user_facing", False):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True, eq=False)
class _Slot:
    """Mutable per-server state; written only by the owner task (and `stop`, which only signals)."""

    config: ServerConfig
    status: ServerStatus
    conn: Connection | None = None
    stop: anyio.Event = field(default_factory=anyio.Event)
    attempt_scope: anyio.CancelScope | None = None  # cancelled by `stop` while connecting
    refresh: anyio.Event = field(default_factory=anyio.Event)  # set by list_changed notifications
    catalog_refresh: anyio.Event = field(default_factory=anyio.Event)  # resources/prompts list_changed
    settled: bool = False  # ready once, or failed once: what `wait_ready` waits for
    done: anyio.Event = field(default_factory=anyio.Event)  # the owner task has finished
    logs: ServerLogSink | None = None  # the server's log messages into structlog (kept across reconnects)


class Supervisor:
    """Starts every enabled server concurrently and keeps it connected until `aclose` / context exit."""

    def __init__(
        self,
        config: RuntimeConfig,
        registry: ToolRegistry | None = None,
        *,
        rand: Callable[[], float] = random.random,
        client_name: str = "agent-runtime",
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else ToolRegistry()
        self.catalog = catalog if catalog is not None else Catalog()  # resources, templates, prompts
        self._rand = rand  # injectable so the jitter of reconnect delays is reproducible in tests
        self._client_name = client_name
        self._slots: dict[str, _Slot] = {}
        for server in config.servers:
            state = ServerState.STARTING if server.enabled else ServerState.STOPPED
            status = ServerStatus(
                server.name, transport_kind(server.target), state, time.time(), server.enabled
            )
            self._slots[server.name] = _Slot(server, status)
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        # Every secret of the config (servers' and sections'), longest first: what server stderr, errors and
        # log records must never show. Registered with logging so records from any module are redacted.
        self._secrets = tuple(secret_values(config))
        register_secrets(self._secrets)
        for slot in self._slots.values():
            slot.logs = ServerLogSink(
                slot.config.name, slot.config.log_level, self._secrets, slot.status.notices
            )
        # Sampling, elicitation and roots answers for the servers (the runtime sets it before start).
        self.features: ClientFeatures | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        if self._tg is not None:
            raise RuntimeError("Supervisor already started")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for slot in self._slots.values():
            if slot.config.enabled:
                self._tg.start_soon(self._own, slot, name=f"mcp-server:{slot.config.name}")
            else:
                slot.done.set()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg = self._tg
        assert tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        finally:
            self._tg = None
            # The body's own exception propagates as itself (not wrapped in an ExceptionGroup): the owner
            # tasks are finished or cancelled by now, so the group only waits for them.
            await tg.__aexit__(None, None, None)

    async def _shutdown(self) -> None:
        """Signal every owner; give them shutdown_timeout to close cleanly, then cancel them."""
        self._closing = True
        for slot in self._slots.values():
            self._signal_stop(slot)
        timeout = self.config.runtime.shutdown_timeout
        with anyio.move_on_after(timeout) as scope:
            for slot in self._slots.values():
                await slot.done.wait()
        if scope.cancelled_caught:
            log.warning("shutdown timed out; cancelling server tasks", timeout=timeout)
            assert self._tg is not None
            self._tg.cancel_scope.cancel()

    def _signal_stop(self, slot: _Slot) -> None:
        slot.stop.set()
        if slot.attempt_scope is not None:
            slot.attempt_scope.cancel()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - returns False instead of raising
        """Wait until every enabled server is ready, or has failed / is backing off; True if all settled."""
        return await self.wait_for(
            lambda: all(s.settled or not s.config.enabled for s in self._slots.values()), timeout
        )

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (at most `timeout` s) for any state change that makes `predicate()` true."""
        with anyio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return predicate()

    # -- queries ----------------------------------------------------------------------------------------

    def servers(self) -> list[ServerStatus]:
        return [self._snapshot(slot) for slot in self._slots.values()]

    def server(self, name: str) -> ServerStatus:
        return self._snapshot(self._slot(name))

    def connection(self, name: str) -> Connection | None:
        """The live connection of `name`, or None; for callers that need more than call_tool."""
        return self._slot(name).conn

    def _snapshot(self, slot: _Slot) -> ServerStatus:
        st = slot.status
        tail = (
            slot.conn.stderr.tail(20)
            if slot.conn is not None and slot.conn.stderr is not None
            else st.stderr_tail
        )
        return ServerStatus(
            st.name,
            st.transport,
            st.state,
            st.since,
            st.enabled,
            st.last_error,
            st.pid,
            st.restarts,
            st.protocol_version,
            self.registry.count(st.name),
            st.retry_at,
            [redact(line, self._secrets) for line in tail],
            dataclasses.replace(st.notices),
        )

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise UnknownServer(name, list(self._slots)) from None

    # -- calls ------------------------------------------------------------------------------------------

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None,
        *,
        timeout: float,  # noqa: ASYNC109 - a per-request deadline handed to the transport
        progress: ProgressCallback | None = None,
    ) -> CallToolResult:
        """Call `tool` (its un-namespaced name) on `server`; the one entry point every tool call goes through.

        Raises ServerUnavailable (never sent) when there is no live session; ConnectionLost, CallTimeout and
        ServerRequestError from the transport pass through unchanged. Tool errors are returned (is_error).
        `progress(progress, total, message)` gets the server's progress reports for this call (coalesced).
        """
        slot = self._slot(server)
        conn = slot.conn
        if conn is None or slot.status.state not in LIVE_STATES:
            raise ServerUnavailable(server, slot.status.state, slot.status.last_error)
        if conn.closed.is_set():  # the owner task has not noticed yet; it is about to reconnect
            raise ServerUnavailable(server, ServerState.STARTING, "connection lost")
        if progress is None:
            return await conn.call_tool(tool, dict(arguments or {}), timeout=timeout)
        relay = ProgressRelay(progress, slot.status.notices, self._secrets)
        try:
            return await conn.call_tool(tool, dict(arguments or {}), timeout=timeout, progress=relay)
        finally:
            relay.close()

    async def notify_roots_changed(self, servers: list[str]) -> None:
        """Send `notifications/roots/list_changed` to those of `servers` that are live (2025-era sessions;
        2026-07-28 servers read the roots with each request). A failed send is logged, never raised."""
        for name in servers:
            conn = self._slot(name).conn
            if conn is None:
                continue  # it reads the new roots when it connects
            try:
                await conn.send_roots_list_changed(timeout=self._slot(name).config.timeouts.request)
            except Exception as exc:
                log.warning("roots list_changed not sent", server=name, error=describe_error(exc))

    def set_health(self, server: str, state: ServerState, reason: str | None = None) -> None:
        """Let the breaker mark a live server degraded/open, or ready again; ignored when not live."""
        if state not in LIVE_STATES:
            raise ValueError(f"set_health takes ready/degraded/open, not {state}")
        slot = self._slot(server)
        if slot.conn is not None and slot.status.state in LIVE_STATES and slot.status.state is not state:
            self._set_state(slot, state, error=reason if reason is not None else slot.status.last_error)

    # -- the owner task ---------------------------------------------------------------------------------

    def _set_state(self, slot: _Slot, state: ServerState, *, error: str | None = None) -> None:
        st = slot.status
        if error is not None:
            error = redact(error, self._secrets)
        if st.state is not state or st.last_error != error:
            if st.state is not state:
                st.since = time.time()
                log.info("server state", server=st.name, state=str(state), error=error)
            st.state = state
            st.last_error = error
        self._changed.set()
        self._changed = anyio.Event()

    async def _own(self, slot: _Slot) -> None:
        name = slot.config.name
        attempt = 0
        try:
            while not slot.stop.is_set():
                reached_ready = await self._attempt(slot)
                if slot.stop.is_set():
                    break
                attempt = 1 if reached_ready else attempt + 1
                if not reached_ready:  # a lost session was counted when it was noticed
                    slot.status.restarts += 1
                delay = backoff_delay(self.config.runtime.reconnect, attempt, self._rand)
                slot.status.retry_at = time.time() + delay
                log.info("server reconnect scheduled", server=name, delay=round(delay, 3), attempt=attempt)
                with anyio.move_on_after(delay):
                    await slot.stop.wait()
                slot.status.retry_at = None
        finally:
            slot.status.retry_at = None
            slot.status.pid = None
            self.registry.remove_server(name)
            self.catalog.remove_server(name)
            self._set_state(slot, ServerState.STOPPED, error=slot.status.last_error)
            slot.done.set()

    async def _attempt(self, slot: _Slot) -> bool:
        """One connection: connect, list tools, serve until the transport closes or stop. True if it got ready."""
        from transports.connection import connect

        cfg = slot.config
        st = slot.status
        reached_ready = False
        if st.state is not ServerState.FAILED:  # a failed start stays `failed` while it is retried
            self._set_state(slot, ServerState.STARTING, error=st.last_error)
        slot.refresh = anyio.Event()
        slot.catalog_refresh = anyio.Event()
        handler = self._message_handler(slot)
        try:
            with anyio.CancelScope() as scope:
                slot.attempt_scope = scope
                if slot.stop.is_set():
                    scope.cancel()
                deadline = anyio.current_time() + cfg.timeouts.startup
                async with connect(
                    cfg.target,
                    startup_timeout=cfg.timeouts.startup,
                    message_handler=handler,
                    client_name=self._client_name,
                    redact=functools.partial(redact, known=self._secrets),
                    logging_callback=slot.logs,
                    log_level=cfg.log_level,
                    **(self.features.callbacks(cfg) if self.features is not None else {}),
                ) as conn:
                    st.pid = conn.pid
                    st.protocol_version = conn.protocol_version
                    remaining = max(0.05, deadline - anyio.current_time())
                    rejected: list[tuple[str, str]] = []
                    tools = await conn.list_all_tools(timeout=remaining, rejected=rejected)
                    await self._set_log_level(cfg, conn, deadline)
                    left = max(0.05, deadline - anyio.current_time())
                    await self._list_catalog(slot, conn, left, resubscribe=True)
                    slot.attempt_scope = None  # from here on, stop is graceful: leave `connect` normally
                    if scope.cancel_called:
                        return reached_ready
                    self.registry.set_server_tools(cfg.name, cfg.prefix, tools, rejected)
                    slot.conn = conn
                    reached_ready = True
                    slot.settled = True
                    self._set_state(slot, ServerState.READY)
                    log.info(
                        "server ready",
                        server=cfg.name,
                        pid=conn.pid,
                        protocol=conn.protocol_version,
                        tools=len(tools),
                    )
                    await self._serve(slot, conn)
                    # Drop the tools before the transport closes so nobody picks a dying server.
                    slot.conn = None
                    self.registry.remove_server(cfg.name)
                    self.catalog.remove_server(cfg.name)
                    if not slot.stop.is_set():
                        tail = conn.stderr.tail(5) if conn.stderr is not None else []
                        st.stderr_tail = list(tail)
                        self._lost(
                            slot, "connection lost" + (f"; server stderr: {' | '.join(tail)}" if tail else "")
                        )
        except Exception as exc:
            err = describe_error(exc)
            if isinstance(exc, BaseExceptionGroup) or not getattr(exc, "user_facing", False):
                log.debug("server attempt failed", server=cfg.name, exc_info=True)
            exc_tail = getattr(exc, "stderr_tail", None)
            if exc_tail:
                st.stderr_tail = list(exc_tail)[-20:]
            slot.conn = None
            self.registry.remove_server(cfg.name)
            self.catalog.remove_server(cfg.name)
            if not slot.stop.is_set():
                slot.settled = True
                if reached_ready:
                    if st.state is not ServerState.STARTING:  # not already counted as lost
                        self._lost(slot, err)
                else:
                    previous = st.last_error
                    self._set_state(slot, ServerState.FAILED, error=err)
                    # Retries of a server that keeps failing the same way are not news.
                    if st.last_error != previous:
                        log.warning("server failed", server=cfg.name, error=st.last_error)
        finally:
            slot.attempt_scope = None
            slot.conn = None
            st.pid = None
        if not slot.stop.is_set() and not reached_ready and st.state is ServerState.STARTING:
            # Cancelled/ended during start without an exception: count it as a failed start.
            slot.settled = True
            self._set_state(slot, ServerState.FAILED, error=st.last_error or "ended during startup")
        return reached_ready

    async def _set_log_level(self, cfg: ServerConfig, conn: Connection, deadline: float) -> None:
        """Ask a 2025-era server with the logging capability for cfg.log_level and above (within the startup
        deadline). A server that refuses still starts: the sink filters its messages by level anyway."""
        from transports import TransportError

        try:
            await conn.set_log_level(cfg.log_level, timeout=max(0.05, deadline - anyio.current_time()))
        except TransportError as exc:
            log.warning("logging/setLevel failed", server=cfg.name, level=cfg.log_level, error=str(exc))

    def _lost(self, slot: _Slot, error: str) -> None:
        """A ready session ended on its own: reconnecting from now on (state starting, restarts counted)."""
        slot.status.restarts += 1
        slot.status.pid = None
        self._set_state(slot, ServerState.STARTING, error=error)

    async def _serve(self, slot: _Slot, conn: Connection) -> None:
        """Keep a ready session: refresh tools on list_changed, return when the transport closes or on stop."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresher, slot, conn)
            tg.start_soon(self._catalog_refresher, slot, conn)

            async def stop_when(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when, conn.closed)
            tg.start_soon(stop_when, slot.stop)

    async def _refresher(self, slot: _Slot, conn: Connection) -> None:
        cfg = slot.config
        while True:
            await slot.refresh.wait()
            slot.refresh = anyio.Event()  # notifications arriving during the fetch trigger one more fetch
            rejected: list[tuple[str, str]] = []
            try:
                tools = await conn.list_all_tools(timeout=cfg.timeouts.request, rejected=rejected)
            except Exception as exc:
                # The session stays up; a dead transport is noticed through conn.closed.
                log.warning("tool list refresh failed", server=cfg.name, error=describe_error(exc))
                continue
            change = self.registry.set_server_tools(cfg.name, cfg.prefix, tools, rejected)
            log.info(
                "tools refreshed",
                server=cfg.name,
                added=len(change.added),
                removed=len(change.removed),
                changed=len(change.changed),
            )
            self._set_state(slot, slot.status.state, error=slot.status.last_error)

    async def _list_catalog(
        self,
        slot: _Slot,
        conn: Connection,
        timeout: float,  # noqa: ASYNC109 - the rest of the startup deadline, or the request timeout
        *,
        resubscribe: bool = False,
    ) -> None:
        """List what the server advertises beside tools (resources, templates, prompts); on a new session,
        also send the subscriptions somebody holds. Failures are logged, not fatal: its tools still serve."""
        cfg = slot.config
        caps = conn.client.server_capabilities
        resources = templates = prompts = None
        try:
            with anyio.fail_after(timeout):
                if caps.resources is not None:
                    resources = await conn.list_resources(timeout=timeout)
                    templates = await conn.list_resource_templates(timeout=timeout)
                if caps.prompts is not None:
                    prompts = await conn.list_prompts(timeout=timeout)
                for uri in self.catalog.subscribed(cfg.name) if resubscribe else ():
                    await conn.subscribe_resource(uri, timeout=timeout)
        except Exception as exc:
            log.warning("resource/prompt listing failed", server=cfg.name, error=describe_error(exc))
        self.catalog.set_server(cfg.name, resources=resources, templates=templates, prompts=prompts)

    async def _catalog_refresher(self, slot: _Slot, conn: Connection) -> None:
        while True:
            await slot.catalog_refresh.wait()
            slot.catalog_refresh = anyio.Event()  # a notification during the fetch triggers one more
            await self._list_catalog(slot, conn, slot.config.timeouts.request)
            log.info("resources and prompts refreshed", server=slot.config.name)
            self._set_state(slot, slot.status.state, error=slot.status.last_error)

    def _message_handler(self, slot: _Slot) -> MessageHandlerFnT:
        async def handle(message: Any) -> None:
            # Both eras arrive here: 2025-era servers notify unprompted, and on 2026-07-28 sessions
            # `connect` keeps a subscriptions/listen stream open whose events the SDK tees to this handler.
            method = getattr(message, "method", None)
            if method == "notifications/tools/list_changed":
                slot.refresh.set()
            elif method in ("notifications/resources/list_changed", "notifications/prompts/list_changed"):
                slot.catalog_refresh.set()
            elif method == "notifications/resources/updated":
                self.catalog.updated(slot.config.name, str(message.params.uri))
            elif isinstance(message, Exception):
                log.debug("transport message", server=slot.config.name, error=describe_error(message))
            await anyio.lowlevel.checkpoint()

        return handle
