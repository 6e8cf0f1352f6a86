"""The public Python API: `async with Runtime.from_config(...) as rt:` starts the servers; tools and calls go through it."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from agent_runtime.config import default_config_path, load_config, secret_values
from agent_runtime.config.types import RuntimeConfig
from agent_runtime.errors import AgentRuntimeError, ConfigError
from agent_runtime.tools.catalog import (
    DEFAULT_MAX_QUEUED,
    Catalog,
    PromptEntry,
    ResourceEntry,
    ResourceSubscription,
    TemplateEntry,
)
from agent_runtime.tools.client_features import ClientFeatures, ElicitationHandler, RootSpec, Sampler
from agent_runtime.tools.executor import ApprovalHook, Executor, ToolOutcome, outcome_error
from agent_runtime.tools.local import LocalTool, LocalToolset
from agent_runtime.tools.notices import ProgressCallback
from agent_runtime.tools.registry import ToolEntry, ToolRegistry
from agent_runtime.tools.resources import ResourceAccess
from agent_runtime.tools.supervisor import (
    LIVE_STATES,
    ServerStatus,
    ServerUnavailable,
    Supervisor,
    UnknownServer,
)
from policies.roots import RootError

if TYPE_CHECKING:
    from mcp.types import CallToolResult, CompleteResult, GetPromptResult, ReadResourceResult

    from agent_runtime.tools.monitor import ServerHealth
    from policies.limits import AgentBudget


class UnknownTool(AgentRuntimeError):
    """No visible tool has that namespaced name (misspelt, or its server never listed it)."""

    def __init__(self, name: str, suggestions: list[str]) -> None:
        hint = (
            f"did you mean {', '.join(repr(s) for s in suggestions)}?"
            if suggestions
            else "`agent-runtime tools list` shows the available tools"
        )
        super().__init__(f"no tool named {name!r}", hint)
        self.name = name
        self.suggestions = suggestions


class Runtime:
    """Owns a supervisor and its registry; an async context manager (start, wait for readiness, shut down)."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        ready_timeout: float | None = None,
        approval_hook: ApprovalHook | None = None,
        elicitation_handler: ElicitationHandler | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.config = config
        self.registry = ToolRegistry()
        self.catalog = Catalog()  # resources, templates and prompts of the live servers
        self.supervisor = Supervisor(config, self.registry, catalog=self.catalog)
        # Every tool call goes through the policy pipeline (DESIGN.md, "The path of one tool call").
        self.executor: Executor = Executor(
            self.supervisor, self.registry, config, approval_hook=approval_hook
        )
        self.access = ResourceAccess(self.supervisor, self.catalog, self.executor)
        # What servers may ask of us (sampling, elicitation, roots): audited like calls, approved like them.
        self.features = ClientFeatures(
            config,
            audit=self.executor.audit,
            approve=self.executor.ask_approval,
            sampler=sampler,
            elicitation_handler=elicitation_handler,
            secrets=tuple(secret_values(config)),
        )
        self.supervisor.features = self.features
        self.local_tools = LocalToolset()  # Python functions offered to agents beside the MCP tools
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        self._stack: contextlib.AsyncExitStack | None = None
        # Readiness is bounded by the slowest server's startup timeout: a hung server ends up `failed`
        # (and keeps retrying in the background) rather than blocking the runtime.
        enabled = [s.timeouts.startup for s in config.servers if s.enabled]
        self.ready_timeout = ready_timeout if ready_timeout is not None else (max(enabled, default=0.0) + 1.0)

    @classmethod
    def from_config(
        cls,
        config: str | Path | RuntimeConfig | None = None,
        *,
        ready_timeout: float | None = None,
        elicitation_handler: ElicitationHandler | None = None,
    ) -> Runtime:
        """A runtime for a config file path, a RuntimeConfig, or the default config file when None."""
        if not isinstance(config, RuntimeConfig):
            path = Path(config) if config is not None else default_config_path()
            if path is None:
                raise ConfigError(
                    "no config file: ./MCP_CONFIG.json does not exist and $AGENT_RUNTIME_CONFIG is not set",
                    "pass a path or a RuntimeConfig to Runtime.from_config",
                )
            config = load_config(path)
        return cls(config, ready_timeout=ready_timeout, elicitation_handler=elicitation_handler)

    async def __aenter__(self) -> Runtime:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self._lifespan())
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(*exc_info)

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        """Servers, then the executor's background work (stale-call sweep, audit flusher), then readiness.

        Written as one structured block so a cancellation at any point (SIGTERM during startup) unwinds
        every scope in order, in this task."""
        async with self.supervisor:  # servers always stop, whatever happens below
            body_error: BaseException | None = None
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.executor.serve, name="executor")
                    await self.supervisor.wait_ready(self.ready_timeout)
                    try:
                        yield
                    except BaseException as exc:  # re-raised below as itself, not in an ExceptionGroup
                        body_error = exc
                    finally:
                        with anyio.CancelScope(shield=True):
                            for close in reversed(self._on_close):
                                await close()
                        tg.cancel_scope.cancel()  # its tasks only sleep and flush: they end at once
            finally:
                self.executor.close()
            if body_error is not None:
                raise body_error

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        agent: str | None = None,
        budget: AgentBudget | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - shortens the tool's deadline
        on_progress: ProgressCallback | None = None,
    ) -> ToolOutcome:
        """Call a tool through the policy pipeline; never raises for a failed call (see ToolOutcome).
        `on_progress(progress, total, message)` (sync or async) gets the server's progress reports."""
        return await self.executor.execute(
            name, arguments, agent=agent, budget=budget, timeout=timeout, on_progress=on_progress
        )

    def register_tool(
        self, fn: Callable[..., Any] | LocalTool, *, name: str | None = None, description: str | None = None
    ) -> LocalTool:
        """Offer a Python function to this runtime's agents as a tool (schema from its type hints)."""
        return self.local_tools.register(fn, name=name, description=description)

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await `callback` when the runtime shuts down, before its servers stop (last registered, first
        called; shielded from cancellation). Agent hosts release their engine this way."""
        self._on_close.append(callback)

    def set_sampler(self, sampler: Sampler | None) -> None:
        """Install the model that answers servers' sampling requests (None: decline them). Each server's
        `sampling` policy still decides; AgentHost installs its engine here."""
        self.features.sampler = sampler

    @property
    def sampler(self) -> Sampler | None:
        return self.features.sampler

    def set_elicitation_handler(self, handler: ElicitationHandler | None) -> None:
        """Install who answers servers' questions (servers with `"elicitation": "ask"`); None declines."""
        self.features.elicitation_handler = handler

    def roots(self, server: str) -> list[str]:
        """The file:// URIs advertised to `server` as its roots (UnknownServer for a name not configured)."""
        self.supervisor.server(server)
        return [r.uri for r in self.features.roots(server)]

    async def set_roots(self, roots: Sequence[RootSpec], *, server: str | None = None) -> None:
        """Replace the roots advertised to every server without its own (or to `server` only), and tell the
        live servers whose roots changed (`notifications/roots/list_changed`). Paths become file:// URIs."""
        try:
            changed = self.features.set_roots(roots, server)
        except RootError as exc:
            raise ConfigError(exc.reason, exc.hint) from None
        except ValueError as exc:
            raise ConfigError(str(exc), "advertise fewer roots") from None
        except KeyError:
            raise UnknownServer(str(server), [s.name for s in self.config.servers]) from None
        await self.supervisor.notify_roots_changed(changed)

    def health(self) -> list[ServerHealth]:
        """Per-server state, breaker, in-flight calls, counts, latency percentiles and process RSS/CPU."""
        return self.executor.health()

    def tools(self, server: str | None = None) -> list[ToolEntry]:
        """Every listed tool (quarantined ones included: `tools list` shows them, flagged)."""
        return self.registry.list(server)

    def offered_tools(self, server: str | None = None) -> list[ToolEntry]:
        """The tools a model or an MCP host may be shown: listed and not quarantined (a changed description
        must not reach a prompt before a user approved it)."""
        return [e for e in self.registry.list(server) if not self.executor.quarantined(e)]

    def servers(self) -> list[ServerStatus]:
        return self.supervisor.servers()

    def resolve(self, name: str) -> ToolEntry:
        """The registry entry for a namespaced tool name, or a typed error saying why there is none."""
        entry = self.registry.get(name)
        if entry is not None:
            return entry
        # A tool of a server that is down is "unavailable", not "unknown": say so, and why.
        for status in self.supervisor.servers():
            cfg = self.config.server(status.name)
            if name.startswith(cfg.prefix) and status.state not in LIVE_STATES:
                raise ServerUnavailable(status.name, status.state, status.last_error)
        names = [e.name for e in self.registry.list()]
        raise UnknownTool(name, difflib.get_close_matches(name, names, n=3, cutoff=0.5))

    def tool_timeout(self, entry: ToolEntry) -> float:
        timeouts = self.config.server(entry.server).timeouts
        return timeouts.per_tool.get(entry.tool_name, timeouts.tool)

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per-request deadline for the transport
        on_progress: ProgressCallback | None = None,
    ) -> CallToolResult:
        """Call a tool by namespaced name through the executor; tool errors come back as results with
        is_error set, every other failure raises a typed error (UnknownTool, ServerUnavailable,
        CallTimeout, ConnectionLost, ToolCallRefused). `on_progress` as for `execute`."""
        outcome = await self.executor.execute(name, arguments, timeout=timeout, on_progress=on_progress)
        if outcome.result is not None:
            return outcome.result
        if outcome.kind == "unknown_tool" or (outcome.kind == "transport_failure" and outcome.attempts == 0):
            self.resolve(name)  # raises UnknownTool (with suggestions) or ServerUnavailable (with why)
        raise outcome_error(outcome)

    # -- resources, prompts, completion -------------------------------------------------------------------

    def resources(self, server: str | None = None) -> list[ResourceEntry]:
        """Resources the live servers list (those advertising the resources capability)."""
        return self.catalog.resources(server)

    def resource_templates(self, server: str | None = None) -> list[TemplateEntry]:
        return self.catalog.templates(server)

    def prompts(self, server: str | None = None) -> list[PromptEntry]:
        return self.catalog.prompts(server)

    async def read_resource(
        self,
        uri: str,
        *,
        server: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - shortens the server's request deadline
    ) -> ReadResourceResult:
        """Read `uri` from `server`, or from the only server that lists it (or a template producing it).
        Raises UnknownResource, AmbiguousName, RequestRefused, ServerUnavailable, CapabilityMissing,
        ResourceTooLarge (contents over 8 MiB), CallTimeout, ServerRequestError."""
        return await self.access.read(uri, server=server, timeout=timeout)

    async def get_prompt(
        self,
        name: str,
        arguments: Mapping[str, str] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> GetPromptResult:
        """A prompt's messages; arguments are checked against the prompt's declared ones before sending
        (PromptArgumentError), an unlisted name raises UnknownPrompt."""
        return await self.access.get_prompt(name, arguments, server=server, timeout=timeout)

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
        """Completion values for `argument` (typed so far: `value`) of a prompt or a resource template."""
        return await self.access.complete(
            argument, value, prompt=prompt, template=template, context=context, server=server, timeout=timeout
        )

    def subscribe(
        self, uri: str, *, server: str | None = None, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> contextlib.AbstractAsyncContextManager[ResourceSubscription]:
        """`async with rt.subscribe(uri) as updates: async for update in updates: ...`; at most `max_queued`
        unread updates are kept, the rest are dropped and counted in `updates.dropped`."""
        return self.access.subscribe(uri, server=server, max_queued=max_queued)
