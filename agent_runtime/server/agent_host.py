"""Agents for the servers: starts the MCP runtime for a config, binds its agents (agent_runtime.agents.loop) to the
shared engine or the remote backend, and runs them as `AgentChunk` streams for agent-as-model requests and
MCP `run_agent`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from agent_runtime.agents.events import (
    FinalAnswer,
    ModelReplyInvalid,
    RunFinished,
    Stopped,
    ToolCallFinished,
    ToolCallStarted,
)
from agent_runtime.agents.host import AgentHost
from agent_runtime.agents.llm import LLMBackend, LocalEngineBackend
from agent_runtime.agents.openai_backend import OpenAIChatBackend
from agent_runtime.server.agents import AgentChunk
from agent_runtime.server.errors import bad_request
from agent_runtime.tools.runtime import Runtime

if TYPE_CHECKING:
    from agent_runtime.config.types import RuntimeConfig
    from agent_runtime.server.metrics import ServerMetrics

log = structlog.get_logger(__name__)

# How a run that ended without an answer is reported as an OpenAI finish reason.
_FINISH = {"max_steps": "length", "max_tool_calls": "length", "timeout": "length", "cancelled": "length"}


class RuntimeAgents:
    """The configured agents of one runtime (implements `server.agents.ServedAgents`)."""

    def __init__(self, runtime: Runtime, host: AgentHost) -> None:
        self.runtime = runtime
        self.host = host

    def names(self) -> list[str]:
        return list(self.host.agents)

    def describe(self, name: str) -> str:
        cfg = self.host.agents[name]
        return cfg.description or f"agent {name!r} (tools: {', '.join(cfg.tools)})"

    async def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncGenerator[AgentChunk, None]:
        """Run `name` with the last user message as the task and the earlier turns as history."""
        task_index = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if task_index < 0:
            raise bad_request("an agent needs a user message as its task", param="messages")
        task = str(messages[task_index]["content"])
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in messages[:task_index]
            if m["role"] in ("user", "assistant")  # the agent writes its own system turn
        ]
        agent = self.host.agent(name)
        async with aclosing(agent.stream(task, history=history)) as events:
            async for event in events:
                if isinstance(event, ToolCallStarted):
                    args = json.dumps(event.arguments, ensure_ascii=False)
                    yield AgentChunk("step", text=f"step {event.step}: calling {event.name}({args})")
                elif isinstance(event, ToolCallFinished):
                    yield AgentChunk(
                        "step",
                        text=f"step {event.step}: {event.name} -> {event.outcome}: {event.observation[:300]}",
                        data={"outcome": event.outcome, "duration": event.duration},
                    )
                elif isinstance(event, ModelReplyInvalid):
                    yield AgentChunk("step", text=f"step {event.step}: invalid model reply ({event.error})")
                elif isinstance(event, Stopped):
                    yield AgentChunk("step", text=f"stopped: {event.reason}: {event.detail}")
                elif isinstance(event, FinalAnswer):
                    yield AgentChunk("text", text=event.answer)
                elif isinstance(event, RunFinished):
                    r = event.result
                    finish = "stop" if r.ok else _FINISH.get(r.stop_reason or "", "error")
                    text = (
                        r.answer
                        if r.ok and r.answer is not None
                        else f"(no answer: {r.stop_reason}: {r.detail})"
                    )
                    yield AgentChunk(
                        "final",
                        text=text,
                        data={
                            "finish_reason": finish,
                            "outcome": r.outcome,
                            "stop_reason": r.stop_reason,
                            "tool_calls": [
                                {"name": c.name, "arguments": c.arguments, "outcome": c.outcome}
                                for c in r.tool_calls
                            ],
                            "usage": dataclasses.asdict(r.usage),
                        },
                        prompt_tokens=r.usage.prompt_tokens,
                        completion_tokens=r.usage.completion_tokens,
                    )


def _backend_for(engine: Any, model: Any) -> LLMBackend | None:
    """The agents' LLM backend: the server's own engine (shared, not owned), the remote server, or None to let
    the agent layer load the configured model on first use."""
    if engine is not None:
        return LocalEngineBackend(engine, owns_engine=False)
    if getattr(model, "backend", None) == "openai":
        return OpenAIChatBackend(model)
    return None


@asynccontextmanager
async def open_agent_host(
    config: RuntimeConfig | None,
    *,
    engine: Any = None,
    model: Any = None,
    metrics: ServerMetrics | None = None,
    preload: bool = False,
) -> AsyncIterator[RuntimeAgents | None]:
    """Start the MCP servers of `config` and yield its agents (None without a config).

    `engine` (an AsyncEngine) is shared with the agents; otherwise `model` (validated settings: local
    ModelSettings or OpenAIBackendSettings) decides, and with `preload` a local model starts loading in the
    background at once, so the first run does not pay for it (the MCP handshake is not held up either).
    """
    if config is None:
        yield None
        return
    if getattr(model, "backend", None) == "openai":
        # The model section is ours to interpret here; the agent layer only knows local models.
        config = dataclasses.replace(
            config, sections={k: v for k, v in config.sections.items() if k != "model"}
        )
    async with Runtime(config) as runtime:
        if metrics is not None:
            metrics.attach_servers(runtime.servers, runtime.executor.monitor)
            metrics.attach_audit(runtime.executor.audit)
        host = AgentHost(runtime, backend=_backend_for(engine, model))
        if model is not None and getattr(model, "backend", "local") != "openai" and engine is None:
            host.model = model  # command-line overrides of the model section
        async with host, anyio.create_task_group() as tg:
            if preload and engine is None:
                tg.start_soon(_preload, host)
            yield RuntimeAgents(runtime, host)
            tg.cancel_scope.cancel()


async def _preload(host: AgentHost) -> None:
    try:
        await host.backend()
    except Exception as exc:  # the first run reports it to its caller; here it is only logged
        log.warning("model preload failed", error=str(exc))
