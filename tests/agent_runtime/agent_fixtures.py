"""Shared pieces of the agent tests: the time-server config with worked examples, and a fp32 SmolLM2 engine."""

from __future__ import annotations

import json
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
