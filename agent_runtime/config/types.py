"""The normalised configuration the runtime works from, whatever file format it came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from policies.elicitation import ElicitationMode
from policies.roots import Root
from policies.sampling import SamplingPolicy
from transports.targets import DEFAULT_MAX_MESSAGE_BYTES, Target

PinningMode = Literal["tofu", "strict", "off"]
# MCP's log levels (RFC 5424), ascending: a server's `log_level` is the lowest it sends us and we log.
McpLogLevel = Literal["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
DEFAULT_SERVER_LOG_LEVEL: McpLogLevel = "info"
# Defaults of the policies section that start-up reads, so a file without the section never imports pydantic.
DEFAULT_PINNING: PinningMode = "tofu"
DEFAULT_APPROVAL_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ServerTimeouts:
    """Seconds. They cascade: connect < request < tool; startup bounds spawn + initialize + first tools/list."""

    startup: float = 30.0
    connect: float = 10.0
    request: float = 60.0  # non-tool requests (tools/list, ping)
    tool: float = 30.0  # default per tool call, as mistral.rs
    per_tool: Mapping[str, float] = field(default_factory=dict)  # tool name (un-namespaced) -> seconds


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2  # fraction of the delay, uniformly +/-


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str  # normalised: [A-Za-z0-9_.-], unique
    target: Target
    enabled: bool = True
    tool_prefix: str | None = None  # None means f"{name}__"
    timeouts: ServerTimeouts = field(default_factory=ServerTimeouts)
    max_concurrent_calls: int | None = None  # None means the runtime default
    trusted: bool = False  # trust the server's read-only/idempotent annotations for retries
    secrets: tuple[str, ...] = ()  # literal secret values (tokens, env values) to redact from every output
    source: str = "mcpServers"  # which config dialect it came from
    log_level: McpLogLevel = DEFAULT_SERVER_LOG_LEVEL  # the server's log messages at this level and above
    sampling: SamplingPolicy = field(default_factory=SamplingPolicy)  # off by default
    elicitation: ElicitationMode = "decline"  # non-interactive by default
    roots: tuple[Root, ...] | None = None  # None: the runtime's roots

    @property
    def prefix(self) -> str:
        return self.tool_prefix if self.tool_prefix is not None else f"{self.name}__"


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    tool_timeout: float = 30.0
    max_concurrent_calls: int = 5  # per server
    max_concurrent_calls_global: int = 64
    shutdown_timeout: float = 10.0
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    log_dir: Path | None = None  # server stderr logs go here when set
    max_message_bytes: int = (
        DEFAULT_MAX_MESSAGE_BYTES  # the transports' per-message cap (servers may override)
    )
    roots: tuple[Root, ...] = ()  # advertised to servers that configure none of their own


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    servers: tuple[ServerConfig, ...]
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    path: Path | None = None
    # Sections owned by later layers (policies, model, agents), kept raw here and validated by their owners
    # through `agent_runtime.config.section_error` so errors still name the file and JSON path.
    sections: Mapping[str, Any] = field(default_factory=dict)

    def server(self, name: str) -> ServerConfig:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)
