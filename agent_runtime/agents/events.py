"""What an agent run reports: the events it streams step by step, and the result it ends with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from inference.formats import Message

StopReason = Literal["max_steps", "max_tool_calls", "timeout", "model_error", "cancelled"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    model_seconds: float = 0.0
    tool_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps: int = 0
    tool_calls: int = 0

    @property
    def loop_seconds(self) -> float:
        """Time spent in the loop itself: wall time minus model and tool time."""
        return max(0.0, self.wall_seconds - self.model_seconds - self.tool_seconds)

    def add(self, other: Usage) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class _Event:
    type: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(slots=True)
class StepStarted(_Event):
    type: ClassVar[Literal["step_start"]] = "step_start"
    step: int


@dataclass(slots=True)
class ToolsRouted(_Event):
    """The tools a guided run offers the model (the routed few) and the routing scores behind them."""

    type: ClassVar[Literal["tools_routed"]] = "tools_routed"
    step: int
    tools: list[str]
    routing: dict[str, Any]


@dataclass(slots=True)
class TokenDelta(_Event):
    type: ClassVar[Literal["token"]] = "token"
    step: int
    text: str


@dataclass(slots=True)
class ToolCallStarted(_Event):
    type: ClassVar[Literal["tool_call"]] = "tool_call"
    step: int
    call_id: str
    name: str
    arguments: dict[str, Any]
    server: str | None


@dataclass(slots=True)
class ToolCallProgress(_Event):
    """A server's progress report for a call that is still running (`total` None: unknown; coalesced when
    the server reports faster than the events are read)."""

    type: ClassVar[Literal["tool_progress"]] = "tool_progress"
    step: int
    call_id: str
    name: str
    server: str | None
    progress: float
    total: float | None
    message: str | None


@dataclass(slots=True)
class ToolCallFinished(_Event):
    type: ClassVar[Literal["tool_result"]] = "tool_result"
    step: int
    call_id: str
    name: str
    server: str | None
    outcome: str  # result | tool_error | denied | timeout | breaker_open | transport_failure | ...
    duration: float
    observation: str
    is_error: bool
    truncated: bool


@dataclass(slots=True)
class ModelReplyInvalid(_Event):
    type: ClassVar[Literal["invalid_reply"]] = "invalid_reply"
    step: int
    text: str
    error: str


@dataclass(slots=True)
class AnswerUnverified(_Event):
    """The answer states values that neither the task nor any tool result contains; with `retrying` the model
    is asked once more, else the answer stands, marked unverified in the result."""

    type: ClassVar[Literal["answer_unverified"]] = "answer_unverified"
    step: int
    answer: str
    values: list[str]
    retrying: bool


@dataclass(slots=True)
class FinalAnswer(_Event):
    type: ClassVar[Literal["final_answer"]] = "final_answer"
    step: int
    answer: str


@dataclass(slots=True)
class Stopped(_Event):
    type: ClassVar[Literal["stopped"]] = "stopped"
    step: int
    reason: str
    detail: str


@dataclass(slots=True)
class UsageReport(_Event):
    type: ClassVar[Literal["usage"]] = "usage"
    usage: Usage


@dataclass(slots=True)
class RunFinished(_Event):
    type: ClassVar[Literal["finished"]] = "finished"
    result: AgentResult

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "result": self.result.to_dict()}


AgentEvent = (
    StepStarted
    | ToolsRouted
    | TokenDelta
    | ToolCallStarted
    | ToolCallProgress
    | ToolCallFinished
    | ModelReplyInvalid
    | AnswerUnverified
    | FinalAnswer
    | Stopped
    | UsageReport
    | RunFinished
)


@dataclass(slots=True)
class ToolCallRecord:
    step: int
    call_id: str
    name: str
    server: str | None
    arguments: dict[str, Any]
    outcome: str
    observation: str
    is_error: bool
    truncated: bool
    duration: float


@dataclass(slots=True)
class StepRecord:
    index: int
    model_text: str
    thought: str | None
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    answer: str | None = None
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    model_seconds: float = 0.0
    tool_seconds: float = 0.0


@dataclass(slots=True)
class AgentResult:
    """How a run ended: `outcome` is `answer` or `stopped` (then `stop_reason` says which budget or error)."""

    agent: str
    task: str
    outcome: Literal["answer", "stopped"]
    answer: str | None
    stop_reason: str | None
    detail: str | None
    steps: list[StepRecord]
    usage: Usage
    messages: list[Message]
    # guided runs: the tools offered and the routing scores (None when the run offered every tool)
    routing: dict[str, Any] | None = None
    # whether the answer's values were found in the task or the observations (None: not checked)
    verified: bool | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "answer"

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        return [c for s in self.steps for c in s.tool_calls]

    def to_dict(self) -> dict[str, Any]:
        def msg(m: Message) -> dict[str, Any]:
            out = dict(m)
            if out.get("tool_calls"):
                out["tool_calls"] = [dataclasses.asdict(c) for c in out["tool_calls"]]
            return out

        return {
            "agent": self.agent,
            "task": self.task,
            "outcome": self.outcome,
            "answer": self.answer,
            "stop_reason": self.stop_reason,
            "detail": self.detail,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "tool_calls": [dataclasses.asdict(c) for c in self.tool_calls],
            "usage": {**dataclasses.asdict(self.usage), "loop_seconds": self.usage.loop_seconds},
            "messages": [msg(m) for m in self.messages],
            "routing": self.routing,
            "verified": self.verified,
        }
