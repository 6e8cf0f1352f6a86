"""What the HTTP and MCP servers need from the agent layer: the configured agents and a run that streams its
steps and answer. `RuntimeAgents` (agent_host.py) implements it on the real agent loop."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(slots=True)
class AgentChunk:
    """One thing an agent run produced: a step (tool call, observation) to report as progress, a piece of
    the final answer's text, or the end of the run (`final`, carrying the whole answer)."""

    kind: Literal["step", "text", "final"]
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ServedAgents(Protocol):
    def names(self) -> list[str]: ...

    def describe(self, name: str) -> str: ...

    def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncGenerator[AgentChunk, None]:
        """Run agent `name` on a conversation (the last user message is the task). Cancelling the consumer
        cancels the run, its model requests and its in-flight tool calls."""
        ...
