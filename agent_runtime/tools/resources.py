"""Reads of resources, prompts and completions, through the policies that apply to them as to tool calls.

Each request names its server (or finds it in the catalog), is judged by the `policies` allow/deny lists under
its method name (`resources/read`, `prompts/get`, `completion/complete`, `resources/subscribe`, so `server/*`
patterns cover it, and `notes/resources/*` denies the reads of one server), waits for one of the server's call slots, runs under the server's request deadline, and
leaves one audit record with its outcome. Listings come from the catalog the supervisor keeps.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from agent_runtime.errors import AgentRuntimeError
from agent_runtime.logging import get_logger
from agent_runtime.tools.catalog import DEFAULT_MAX_QUEUED, Catalog, PromptEntry, ResourceSubscription
from agent_runtime.tools.supervisor import LIVE_STATES, ServerUnavailable, Supervisor, describe_error
from policies.audit import call_record, decision_record
from policies.secrets import redact
from transports.errors import CallTimeout

if TYPE_CHECKING:
    from mcp_types import CompleteResult, GetPromptResult, ReadResourceResult

    from agent_runtime.tools.executor import Executor
    from transports import Connection

log = get_logger(__name__)

_T = TypeVar("_T")
UNSUBSCRIBE_BOUND = 5.0  # seconds an unsubscribe may take when a subscriber leaves (shielded)


class UnknownResource(AgentRuntimeError):
    """No server lists the URI (or a template producing it), or more than one does and none was named."""

    def __init__(self, uri: str, reason: str, hint: str) -> None:
        super().__init__(reason, hint)
        self.uri = uri


class UnknownPrompt(AgentRuntimeError):
    def __init__(self, name: str, suggestions: list[str]) -> None:
        hint = (
            f"did you mean {', '.join(repr(s) for s in suggestions)}?"
            if suggestions
            else "`agent-runtime prompts list` shows the available prompts"
        )
        super().__init__(f"no prompt named {name!r}", hint)
        self.name = name


class PromptArgumentError(AgentRuntimeError):
    """Arguments the prompt does not declare, or required ones missing: refused before the request is sent."""


class AmbiguousName(AgentRuntimeError):
    """More than one server offers the URI or prompt and the caller named none."""


class RequestRefused(AgentRuntimeError):
    """The policies' allow/deny lists refuse this resource/prompt request for the server."""


class ResourceAccess:
    """The resource/prompt/completion side of a runtime; `Runtime` delegates to it."""

    def __init__(self, supervisor: Supervisor, catalog: Catalog, executor: Executor) -> None:
        self.supervisor = supervisor
        self.catalog = catalog
        self.executor = executor

    # -- server resolution ------------------------------------------------------------------------------

    def server_for_uri(self, uri: str, server: str | None = None) -> str:
        """The server to read `uri` from: the one named, else the only one listing it (or a template of it)."""
        if server is not None:
            self.supervisor.server(server)  # raises UnknownServer
            return server
        found = self.catalog.servers_for_uri(uri)
        if len(found) == 1:
            return found[0]
        if found:
            _ambiguous("resource", uri, found)
        live = [s.name for s in self.supervisor.servers() if s.state in LIVE_STATES]
        raise UnknownResource(
            uri,
            f"no server lists the resource {uri!r}",
            "`agent-runtime resources list` shows them; name the server (--server) for a URI none lists"
            + (f" (live servers: {', '.join(live)})" if live else ""),
        )

    def prompt_entry(self, name: str, server: str | None = None) -> PromptEntry:
        if server is not None:
            self.supervisor.server(server)
        entries = [e for e in self.catalog.prompts(server) if e.prompt.name == name]
        if len(entries) == 1:
            return entries[0]
        if entries:
            _ambiguous("prompt", name, sorted(e.server for e in entries))
        names = sorted({e.prompt.name for e in self.catalog.prompts(server)})
        raise UnknownPrompt(name, difflib.get_close_matches(name, names, n=3, cutoff=0.5))

    # -- requests ---------------------------------------------------------------------------------------

    async def read(
        self,
        uri: str,
        *,
        server: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - shortens the server's request deadline
        agent: str | None = None,
    ) -> ReadResourceResult:
        name = self.server_for_uri(uri, server)

        async def send(conn: Connection, seconds: float) -> ReadResourceResult:
            return await conn.read_resource(uri, timeout=seconds)

        return await self._request(name, "resources/read", {"uri": uri}, send, timeout, agent)

    async def get_prompt(
        self,
        name: str,
        arguments: Mapping[str, str] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        agent: str | None = None,
    ) -> GetPromptResult:
        entry = self.prompt_entry(name, server)
        args = {str(k): str(v) for k, v in (arguments or {}).items()}
        declared = {a.name: a for a in entry.prompt.arguments or []}
        unknown = sorted(set(args) - set(declared))
        missing = sorted(a for a, d in declared.items() if d.required and a not in args)
        if unknown or missing:
            problems = ([f"unknown argument(s) {', '.join(unknown)}"] if unknown else []) + (
                [f"missing required argument(s) {', '.join(missing)}"] if missing else []
            )
            raise PromptArgumentError(
                f"prompt {name!r} of {entry.server}: " + "; ".join(problems),
                f"it takes: {', '.join(declared) or 'no arguments'}",
            )

        async def send(conn: Connection, seconds: float) -> GetPromptResult:
            return await conn.get_prompt(name, args, timeout=seconds)

        return await self._request(entry.server, "prompts/get", {"name": name, **args}, send, timeout, agent)

    async def complete(
        self,
        argument: str,
        value: str,
        *,
        prompt: str | None = None,
        template: str | None = None,
        context: Mapping[str, str] | None = None,
        server: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> CompleteResult:
        """Completions for `argument` of a prompt (by name) or a resource template (by its URI template)."""
        import mcp_types as types  # the SDK's types only once a request is made

        if (prompt is None) == (template is None):
            raise AgentRuntimeError("complete needs exactly one of prompt= or template=")
        ref: types.PromptReference | types.ResourceTemplateReference
        if prompt is not None:
            server = self.prompt_entry(prompt, server).server
            ref = types.PromptReference(name=prompt)
        else:
            assert template is not None
            offered = sorted(
                {e.server for e in self.catalog.templates(server) if e.template.uri_template == template}
            )
            if not offered:
                raise UnknownResource(
                    template,
                    f"no server offers the resource template {template!r}",
                    "`agent-runtime resources templates` shows them",
                )
            if len(offered) > 1:
                _ambiguous("resource template", template, offered)
            server = offered[0]
            ref = types.ResourceTemplateReference(uri=template)

        async def send(conn: Connection, seconds: float) -> CompleteResult:
            return await conn.complete(
                ref, {"name": argument, "value": value}, dict(context) if context else None, timeout=seconds
            )

        return await self._request(server, "completion/complete", {"argument": argument}, send, timeout, None)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, uri: str, *, server: str | None = None, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> AsyncIterator[ResourceSubscription]:
        """Updates of `uri` while the block runs; the server is subscribed for the first subscriber and
        unsubscribed after the last (shielded, bounded). Subscriptions are re-sent after a reconnection."""
        name = self.server_for_uri(uri, server)
        sub = self.catalog.add_subscriber(name, uri, max_queued)
        try:
            # Only the first subscriber of a URI sends resources/subscribe; the others share its notifications.
            if self.catalog.subscribers_of(name, uri) == 1:

                async def send(conn: Connection, seconds: float) -> None:
                    await conn.subscribe_resource(uri, timeout=seconds)

                await self._request(name, "resources/subscribe", {"uri": uri}, send, None, None)
            yield sub
        finally:
            if self.catalog.remove_subscriber(sub):
                await self._unsubscribe(name, uri)

    async def _unsubscribe(self, server: str, uri: str) -> None:
        conn = self.supervisor.connection(server)
        if conn is None or conn.closed.is_set():
            return  # the session is gone, and the subscription with it
        with anyio.CancelScope(shield=True), anyio.move_on_after(UNSUBSCRIBE_BOUND):
            try:
                await conn.unsubscribe_resource(uri, timeout=UNSUBSCRIBE_BOUND)
            except Exception as exc:
                log.debug("unsubscribe failed", server=server, error=describe_error(exc))

    # -- the shared path --------------------------------------------------------------------------------

    async def _request(
        self,
        server: str,
        method: str,
        args: Mapping[str, Any],
        send: Callable[[Connection, float], Awaitable[_T]],
        timeout: float | None,  # noqa: ASYNC109 - shortens the server's request deadline
        agent: str | None,
    ) -> _T:
        executor = self.executor
        secrets = executor.secrets
        denial = executor.policies.for_tool(server, method).filter.denial(server, method)
        if denial is not None:
            executor.audit.write(
                decision_record(
                    agent=agent,
                    server=server,
                    tool=method,
                    digest=args,
                    allowed=False,
                    reason=f"denied: {denial}",
                    secrets=secrets,
                )
            )
            raise RequestRefused(
                f"{method} on {server}: {denial}", "see the `policies` section of the config"
            )
        conn = self._live(server)
        cfg = self.supervisor.config.server(server)
        seconds = cfg.timeouts.request if timeout is None else min(timeout, cfg.timeouts.request)
        start = time.perf_counter()
        outcome, reason = "result", None
        try:
            with anyio.fail_after(seconds):  # the slot wait counts against the deadline too
                async with executor.server_limiter(server):
                    left = max(0.05, seconds - (time.perf_counter() - start))
                    return await send(conn, left)
        except TimeoutError:
            outcome, reason = "timeout", f"{method}: no reply within {seconds:g}s"
            raise CallTimeout(reason, "raise the server's request timeout") from None
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome = "cancelled"
            else:
                outcome = "timeout" if isinstance(exc, CallTimeout) else "failed"
            reason = describe_error(exc)
            raise
        finally:
            executor.audit.write(
                call_record(
                    agent=agent,
                    server=server,
                    tool=method,
                    digest=args,
                    outcome=outcome,
                    reason=redact(reason, secrets) if reason else None,
                    duration=time.perf_counter() - start,
                    attempts=1,
                    truncated=False,
                    secrets=secrets,
                )
            )

    def _live(self, server: str) -> Connection:
        status = self.supervisor.server(server)
        conn = self.supervisor.connection(server)
        if conn is None or status.state not in LIVE_STATES or conn.closed.is_set():
            raise ServerUnavailable(server, status.state, status.last_error)
        return conn


def _ambiguous(what: str, name: str, servers: list[str]) -> None:
    raise AmbiguousName(
        f"the {what} {name!r} is offered by {', '.join(servers)}", "name the server (--server)"
    )
