"""Shared pieces of the agent tests: the time-server config with worked examples, and a fp32 SmolLM2 engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.conftest import EXAMPLES, PYTHON

FIXED_CLOCK_TIME_SERVER = Path(__file__).with_name("fixed_clock_time_server.py")

TIME_EXAMPLES: list[dict[str, Any]] = [
    {
        "task": "When it is 16:30 in New York, what time is it in London?",
        "calls": [
            {
                "tool": "time__convert_time",
                "arguments": {
                    "source_timezone": "America/New_York",
                    "time": "16:30",
                    "target_timezone": "Europe/London",
                },
                "result": json.dumps(
                    {
                        "source": {
                            "timezone": "America/New_York",
                            "datetime": "2024-05-06T16:30:00-04:00",
                            "day_of_week": "Monday",
                            "is_dst": True,
                        },
                        "target": {
                            "timezone": "Europe/London",
                            "datetime": "2024-05-06T21:30:00+01:00",
                            "day_of_week": "Monday",
                            "is_dst": True,
                        },
                        "time_difference": "+5.0h",
                    }
                ),
            }
        ],
        "answer": "When it is 16:30 in New York, it is 21:30 in London (2024-05-06T21:30:00+01:00).",
    },
    {
        "task": "What time is it in Berlin?",
        "calls": [
            {
                "tool": "time__get_current_time",
                "arguments": {"timezone": "Europe/Berlin"},
                "result": json.dumps(
                    {
                        "timezone": "Europe/Berlin",
                        "datetime": "2024-05-06T09:41:00+02:00",
                        "day_of_week": "Monday",
                        "is_dst": True,
                    }
                ),
            }
        ],
        "answer": "The current time in Berlin is 2024-05-06T09:41:00+02:00 (Monday).",
    },
]


def time_server() -> dict[str, Any]:
    """The real mcp-server-time with a frozen clock: an answer read back from it is the same at every hour."""
    return {"command": PYTHON, "args": [str(FIXED_CLOCK_TIME_SERVER), "--local-timezone", "UTC"]}


def faulty_server(*args: str) -> dict[str, Any]:
    return {"command": PYTHON, "args": [str(EXAMPLES / "servers" / "faulty_server.py"), *args]}


def write_config(
    folder: Path, servers: dict[str, Any], agents: dict[str, Any] | None = None, **sections: Any
) -> Path:
    body: dict[str, Any] = {"mcpServers": servers, **sections}
    if agents is not None:
        body["agents"] = agents
    path = folder / "MCP_CONFIG.json"
    path.write_text(json.dumps(body, indent=2))
    return path


def time_agent(**overrides: Any) -> dict[str, Any]:
    return {"tools": ["time__*"], "examples": TIME_EXAMPLES, **overrides}


class ScriptedBackend:
    """Stands in for the model where the model is not under test: answers each turn with the next scripted
    reply (our JSON action format), then `{"answer": "done N"}` (N: the turn), and records every request, which
    is what the model would have been shown."""

    name = "scripted"

    def __init__(self, replies: list[dict[str, object]] | None = None) -> None:
        from agent_runtime.agents.llm import BackendStats  # torch: only for the tests that build a backend

        self.replies = [json.dumps(r) for r in replies or []]
        self.stats = BackendStats()
        self.requests: list[Any] = []

    def tool_format(self) -> str:
        return "json"

    @property
    def supports_grammar(self) -> bool:
        return False

    @property
    def supports_prefix(self) -> bool:
        return False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        from agent_runtime.agents.llm import GenerationChunk

        self.requests.append(request)
        text = self.replies.pop(0) if self.replies else json.dumps({"answer": f"done {len(self.requests)}"})
        yield GenerationChunk(text, text, True, "stop")

    async def score(self, request: Any, continuations: list[str]) -> list[float]:
        return [0.0] * len(continuations)

    async def aclose(self) -> None:
        return None
