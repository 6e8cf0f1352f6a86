"""Per-agent budgets: steps, calls per tool and wall clock, checked before every call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from policies.clock import Clock, monotonic


@dataclass(slots=True)
class AgentBudget:
    """Mutable: one per agent run, passed to every call it makes. A None limit is unlimited.

    `max_steps` bounds the tool calls of the run (the agent loop may also `step()` on its own turns);
    `max_calls_per_tool` bounds each tool, with `per_tool` overriding it by tool name.
    """

    max_steps: int | None = None
    max_calls_per_tool: int | None = None
    per_tool: Mapping[str, int] = field(default_factory=dict)
    wall_clock: float | None = None  # seconds from the first use
    clock: Clock = monotonic
    steps: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    started_at: float | None = None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = self.clock()

    def remaining_time(self) -> float | None:
        if self.wall_clock is None:
            return None
        self.start()
        assert self.started_at is not None
        return max(0.0, self.started_at + self.wall_clock - self.clock())

    def exhausted(self, tool: str) -> str | None:
        """Why a call of `tool` is over budget now, or None."""
        left = self.remaining_time()
        if left is not None and left <= 0:
            return f"wall-clock budget of {self.wall_clock}s is used up"
        if self.max_steps is not None and self.steps >= self.max_steps:
            return f"step budget of {self.max_steps} is used up"
        limit = self.per_tool.get(tool, self.max_calls_per_tool)
        if limit is not None and self.calls.get(tool, 0) >= limit:
            return f"budget of {limit} calls to {tool} is used up"
        return None

    def charge(self, tool: str) -> None:
        self.start()
        self.steps += 1
        self.calls[tool] = self.calls.get(tool, 0) + 1

    def step(self) -> None:
        """Count a step that is not a tool call (an agent turn)."""
        self.start()
        self.steps += 1
