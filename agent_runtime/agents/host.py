"""What the agents of one runtime share: their configs, the runtime's tools and one lazily loaded LLM backend
(one engine for every agent, so their requests batch together)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from agent_runtime.agents.examples import CallMemory
from agent_runtime.agents.grounding import evidence
from agent_runtime.agents.llm import LLMBackend, LocalEngineBackend
from agent_runtime.agents.loop import Agent, AgentError
from agent_runtime.agents.openai_backend import OpenAIBackendSettings, OpenAIChatBackend
from agent_runtime.agents.routing import Embedder, Routing, plan_route
from agent_runtime.agents.sampling import backend_sampler
from agent_runtime.config import section_error
from agent_runtime.config.agents import ModelSettings, load_agents, load_model_settings
from agent_runtime.errors import ConfigError

if TYPE_CHECKING:
    from agent_runtime.tools.registry import ToolEntry
    from agent_runtime.tools.runtime import Runtime
    from inference.formats import ToolSpec


class AgentHost:
    """The agents of one `Runtime`: `host.agent(name)` builds a configured agent on the runtime's tools.

    Use it as an async context manager (`async with AgentHost(rt) as agents:`); leaving it releases the
    backends it loaded (the engine and its thread). The runtime also releases them when it shuts down, so a
    host that is never entered cannot outlive its runtime. Pass `backend` to share an engine the caller owns
    (`LocalEngineBackend(engine, owns_engine=False)`) or a remote one, and `embedder` to share the routing
    encoder between hosts (it loads on a host's first guided run otherwise, when its package is installed).
    """

    def __init__(
        self, runtime: Runtime, *, backend: LLMBackend | None = None, embedder: Embedder | None = None
    ) -> None:
        self.runtime = runtime
        self.agents = load_agents(runtime.config)  # validates the sections before any server starts
        self.model: ModelSettings = load_model_settings(runtime.config)
        self.model_override: str | None = None
        self.progress = False
        self._backends: dict[str | None, LLMBackend] = {}
        if backend is not None:
            self._backends[None] = backend
        self._lock = anyio.Lock()
        # the sentence encoder routing uses; False: not looked for yet, None: not installed
        self._embedder: Embedder | bool | None = embedder if embedder is not None else False
        # successful calls remembered as worked examples for later runs (agents with `learn_examples`);
        # None: neither recalled nor remembered
        self.examples: CallMemory | None = CallMemory.default()
        # Servers allowed to sample (their `sampling` policy) get this host's model, unless the caller
        # installed a sampler of its own on the runtime.
        self._sampler = backend_sampler(self)
        if runtime.sampler is None:
            runtime.set_sampler(self._sampler)
        runtime.on_close(self.aclose)

    async def __aenter__(self) -> AgentHost:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def mcp_entries(self) -> list[ToolEntry]:
        """The MCP tools agents may see: quarantined ones (awaiting approval) are not offered."""
        return self.runtime.offered_tools()

    def quarantined_names(self) -> list[str]:
        offered = {e.name for e in self.mcp_entries()}
        return [e.name for e in self.runtime.tools() if e.name not in offered]

    def all_tool_names(self) -> list[str]:
        return [e.name for e in self.mcp_entries()] + self.runtime.local_tools.names()

    def configured_prefixes(self) -> list[str]:
        return [s.prefix for s in self.runtime.config.servers if s.enabled]

    def live_prefixes(self) -> list[str]:
        names = {e.server for e in self.runtime.tools()}
        return [s.prefix for s in self.runtime.config.servers if s.name in names]

    def config_error(self, json_path: str, reason: str, hint: str | None = None) -> ConfigError:
        return section_error(self.runtime.config, json_path, reason, hint)

    async def backend(self, source: str | None = None) -> LLMBackend:
        """The shared backend for `source` (None: the `model` section or the override), loaded once."""
        existing = self._backends.get(source)
        if existing is not None:
            return existing
        async with self._lock:
            existing = self._backends.get(source)
            if (
                existing is None
                and source is None
                and self.model_override is None
                and self.model.backend == "openai"
            ):
                # `model: {backend: "openai", base_url, api_key, model}`: the loop drives a remote server.
                raw: Any = self.runtime.config.sections.get("model") or {}
                settings = OpenAIBackendSettings.from_section(raw, self.runtime.config)
                existing = self._backends[source] = OpenAIChatBackend(settings)
            if existing is None:
                existing = await LocalEngineBackend.load(
                    self.model, source=source or self.model_override, progress=self.progress
                )
                self._backends[source] = existing
        return existing

    async def route(self, query: str, tools: Sequence[ToolSpec]) -> Routing:
        """Score `tools` for `query` (lexical, plus the packaged sentence encoder when installed), off the loop."""
        if self._embedder is False:
            async with self._lock:
                if self._embedder is False:
                    self._embedder = await anyio.to_thread.run_sync(Embedder.installed)
        embedder = self._embedder if isinstance(self._embedder, Embedder) else None
        return await anyio.to_thread.run_sync(plan_route, query, tools, embedder, evidence)

    def agent(self, name: str = "default") -> Agent:
        """A configured agent; raises AgentError for an unknown name and ConfigError for tools it cannot have."""
        cfg = self.agents.get(name)
        if cfg is None:
            raise AgentError(
                f"no agent named {name!r}", f"configured agents: {', '.join(sorted(self.agents))}"
            )
        agent = Agent(self, cfg)
        agent.check_tools()
        return agent

    async def aclose(self) -> None:
        """Release every backend this host loaded (idempotent; shielded, so it completes when cancelled)."""
        with anyio.CancelScope(shield=True):
            if self.runtime.sampler is self._sampler:
                self.runtime.set_sampler(None)  # its backends are going away
            backends, self._backends = list(self._backends.values()), {}
            for backend in backends:
                await backend.aclose()
