"""An MCP server (the SDK's MCPServer, stdio) whose tools ask the client for sampling, elicitation and roots.

    python examples/servers/client_features_server.py

Its tools ask through the SDK's resolvers (`Sample`, `Elicit`, `ListRoots`), which follow the negotiated era:
standalone server-to-client requests on 2025-11-25, input-required rounds on 2026-07-28. Tools:
`summarize(text)` samples a one-line summary, `ask_contact()` elicits a flat form, `ask_oversized()` elicits
a form with more properties than a client should accept, `list_client_roots()` reports the client's roots.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import (
    Elicit,
    ElicitationResult,
    ListRoots,
    MCPServer,
    Resolve,
    Sample,
)
from mcp_types import ListRootsResult, ModelHint, ModelPreferences, SamplingMessage, TextContent
from pydantic import BaseModel, Field, create_model


class Contact(BaseModel):
    name: str = Field(description="your name", max_length=40)
    age: int = Field(ge=0, le=150, description="your age")
    newsletter: bool = Field(default=False, description="subscribe to the newsletter")


# More properties than the spec's flat forms should carry (clients bound them; ours at 32).
Oversized = create_model("Oversized", **{f"field_{i}": (str, ...) for i in range(40)})  # type: ignore[call-overload]


def summary(text: str, max_tokens: int, stop: list[str] | None) -> Sample:
    return Sample(
        [
            SamplingMessage(
                role="user", content=TextContent(type="text", text=f"Summarize in one line: {text}")
            )
        ],
        max_tokens=max_tokens,
        system_prompt="You write one-line summaries.",
        stop_sequences=stop,
        model_preferences=ModelPreferences(hints=[ModelHint(name="claude-3-haiku")], speed_priority=0.9),
    )


def contact() -> Elicit[Contact]:
    return Elicit("Who are you?", Contact)


def oversized() -> Elicit[Any]:
    return Elicit("Fill in forty fields", Oversized)


def roots() -> ListRoots:
    return ListRoots()


# Resolvers and tools live at module level: the SDK evaluates their (string) annotations in this namespace.
mcp = MCPServer("client-features")


@mcp.tool()
def summarize(
    text: str,
    max_tokens: int = 400,
    stop: list[str] | None = None,
    result: Annotated[Any, Resolve(summary)] = None,
) -> str:
    """Ask the client's model for a one-line summary of `text` (ending before any of `stop`)."""
    return json.dumps(
        {
            "text": getattr(result.content, "text", ""),
            "model": result.model,
            "stop_reason": result.stop_reason,
        }
    )


@mcp.tool()
def ask_contact(answer: Annotated[ElicitationResult[Contact], Resolve(contact)]) -> str:
    """Ask the person for their contact details; reports the action and what was given."""
    data = answer.data.model_dump() if answer.action == "accept" else None
    return json.dumps({"action": answer.action, "data": data})


@mcp.tool()
def ask_oversized(answer: Annotated[ElicitationResult[Any], Resolve(oversized)]) -> str:
    """Ask for a form with 40 properties."""
    return json.dumps({"action": answer.action})


@mcp.tool()
def list_client_roots(result: Annotated[ListRootsResult, Resolve(roots)]) -> str:
    """The client's roots, as it answered roots/list."""
    return json.dumps([{"uri": str(r.uri), "name": r.name} for r in result.roots])


if __name__ == "__main__":
    mcp.run("stdio")
