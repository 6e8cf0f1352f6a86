"""agent-runtime: tool-using agents on a local model, with MCP servers kept alive behind policies.

The public API (`__all__`): `Runtime` starts and supervises the configured MCP servers and calls their tools
through the policy pipeline; `AgentHost` runs the configured agents on them; `load_config` reads a config file.

    from agent_runtime import AgentHost, Runtime

    async with Runtime.from_config("MCP_CONFIG.json") as rt, AgentHost(rt) as agents:
        result = await agents.agent("default").run("What time is it in Tokyo?")

Packages, lowest first (each imports only those before it): `config`, `tools`, `agents`, `server`, `cli`; any
of them may use `policies` and `transports`, `agents` and `server` may use `inference`. Names load on first use
(PEP 562), so `agent-runtime tools ...` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agent_runtime.agents.context import ContextError
    from agent_runtime.agents.events import AgentEvent, AgentResult
    from agent_runtime.agents.host import AgentHost
    from agent_runtime.agents.llm import LLMBackend, LocalEngineBackend
    from agent_runtime.agents.loop import Agent, AgentError, AgentSession
    from agent_runtime.agents.openai_backend import OpenAIChatBackend, RemoteLLMError
    from agent_runtime.config import RuntimeConfig, adhoc_config, load_config, parse_config, redact_config
    from agent_runtime.errors import AgentRuntimeError, ConfigError
    from agent_runtime.tools.catalog import (
        PromptEntry,
        ResourceEntry,
        ResourceSubscription,
        ResourceUpdate,
        TemplateEntry,
    )
    from agent_runtime.tools.client_features import (
        ElicitationAnswer,
        ElicitationRequest,
        SamplingRequest,
        SamplingResult,
    )
    from agent_runtime.tools.executor import ToolCallRefused, ToolOutcome
    from agent_runtime.tools.local import LocalToolError
    from agent_runtime.tools.resources import (
        AmbiguousName,
        PromptArgumentError,
        RequestRefused,
        UnknownPrompt,
        UnknownResource,
    )
    from agent_runtime.tools.runtime import Runtime, UnknownTool
    from agent_runtime.tools.supervisor import ServerUnavailable

# name -> the module that defines it (imported on first access: the agent side pulls in torch)
_EXPORTS = {
    "Agent": "agent_runtime.agents.loop",
    "AgentError": "agent_runtime.agents.loop",
    "AgentEvent": "agent_runtime.agents.events",
    "AgentHost": "agent_runtime.agents.host",
    "AgentResult": "agent_runtime.agents.events",
    "AgentRuntimeError": "agent_runtime.errors",
    "AgentSession": "agent_runtime.agents.loop",
    "AmbiguousName": "agent_runtime.tools.resources",
    "ConfigError": "agent_runtime.errors",
    "ContextError": "agent_runtime.agents.context",
    "ElicitationAnswer": "agent_runtime.tools.client_features",
    "ElicitationRequest": "agent_runtime.tools.client_features",
    "LLMBackend": "agent_runtime.agents.llm",
    "LocalEngineBackend": "agent_runtime.agents.llm",
    "LocalToolError": "agent_runtime.tools.local",
    "OpenAIChatBackend": "agent_runtime.agents.openai_backend",
    "PromptArgumentError": "agent_runtime.tools.resources",
    "PromptEntry": "agent_runtime.tools.catalog",
    "RemoteLLMError": "agent_runtime.agents.openai_backend",
    "RequestRefused": "agent_runtime.tools.resources",
    "ResourceEntry": "agent_runtime.tools.catalog",
    "ResourceSubscription": "agent_runtime.tools.catalog",
    "ResourceUpdate": "agent_runtime.tools.catalog",
    "Runtime": "agent_runtime.tools.runtime",
    "RuntimeConfig": "agent_runtime.config",
    "SamplingRequest": "agent_runtime.tools.client_features",
    "SamplingResult": "agent_runtime.tools.client_features",
    "ServerUnavailable": "agent_runtime.tools.supervisor",
    "TemplateEntry": "agent_runtime.tools.catalog",
    "ToolCallRefused": "agent_runtime.tools.executor",
    "ToolOutcome": "agent_runtime.tools.executor",
    "UnknownPrompt": "agent_runtime.tools.resources",
    "UnknownResource": "agent_runtime.tools.resources",
    "UnknownTool": "agent_runtime.tools.runtime",
    "adhoc_config": "agent_runtime.config",
    "load_config": "agent_runtime.config",
    "parse_config": "agent_runtime.config",
    "redact_config": "agent_runtime.config",
}

__all__ = [
    "Agent",
    "AgentError",
    "AgentEvent",
    "AgentHost",
    "AgentResult",
    "AgentRuntimeError",
    "AgentSession",
    "AmbiguousName",
    "ConfigError",
    "ContextError",
    "ElicitationAnswer",
    "ElicitationRequest",
    "LLMBackend",
    "LocalEngineBackend",
    "LocalToolError",
    "OpenAIChatBackend",
    "PromptArgumentError",
    "PromptEntry",
    "RemoteLLMError",
    "RequestRefused",
    "ResourceEntry",
    "ResourceSubscription",
    "ResourceUpdate",
    "Runtime",
    "RuntimeConfig",
    "SamplingRequest",
    "SamplingResult",
    "ServerUnavailable",
    "TemplateEntry",
    "ToolCallRefused",
    "ToolOutcome",
    "UnknownPrompt",
    "UnknownResource",
    "UnknownTool",
    "__version__",
    "adhoc_config",
    "load_config",
    "parse_config",
    "redact_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agent_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
