"""Python functions as tools: schema from type hints, validation, errors and timeouts as outcomes."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
import pytest
from pydantic import Field

from agent_runtime.tools.local import LocalToolError, LocalToolset, tool_from_function


def forecast(
    city: Annotated[str, Field(description="city name")], days: int = 3, unit: Literal["C", "F"] = "C"
) -> dict:
    """Weather forecast for a city.

    More details that the model does not need.
    """
    if city == "boom":
        raise ValueError("no such city")
    return {"city": city, "days": days, "unit": unit}


def test_schema_from_type_hints() -> None:
    tool = tool_from_function(forecast)
    assert tool.name == "forecast" and tool.description == "Weather forecast for a city."
    p = tool.parameters
    assert p["required"] == ["city"]
    assert p["properties"]["city"] == {"type": "string", "description": "city name"}
    assert p["properties"]["days"]["type"] == "integer" and p["properties"]["days"]["default"] == 3
    assert p["properties"]["unit"]["enum"] == ["C", "F"]


def test_untyped_and_bad_names_are_refused() -> None:
    def untyped(x):
        return x

    with pytest.raises(LocalToolError, match="no type hint"):
        tool_from_function(untyped)
    with pytest.raises(LocalToolError, match="not a valid tool name"):
        tool_from_function(forecast, name="bad name")
    tools = LocalToolset()
    tools.register(forecast)
    with pytest.raises(LocalToolError, match="already registered"):
        tools.register(forecast)


@pytest.mark.anyio
async def test_calls_validate_and_report_failures() -> None:
    tools = LocalToolset()
    tools.register(forecast)

    async def slow(seconds: float) -> str:
        """Sleep."""
        await anyio.sleep(seconds)  # a tool that must be slow: the timeout below cuts it
        return "done"

    tools.register(slow)
    ok = await tools.call("forecast", {"city": "Oslo"}, timeout=5)
    assert ok.kind == "result" and ok.text == '{"city": "Oslo", "days": 3, "unit": "C"}'
    bad = await tools.call("forecast", {"city": "Oslo", "unit": "K"}, timeout=5)
    assert bad.kind == "invalid_arguments" and "unit" in (bad.reason or "")
    err = await tools.call("forecast", {"city": "boom"}, timeout=5)
    assert err.kind == "tool_error" and "no such city" in err.text
    late = await tools.call("slow", {"seconds": 5}, timeout=0.1)
    assert late.kind == "timeout"
    missing = await tools.call("nope", {}, timeout=1)
    assert missing.kind == "unknown_tool"
