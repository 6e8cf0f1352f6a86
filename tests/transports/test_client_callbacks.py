"""connect() forwards the sampling, elicitation and roots callbacks: advertised as capabilities and called in
both eras (server-everything on 2025-11-25 requests; the SDK's MCPServer on 2026-07-28 input-required rounds)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
import pytest

from tests.conftest import EXAMPLES, PYTHON
from tests.transports.conftest import EVERYTHING, needs_everything
from transports import ServerRequestError, StdioTarget, connect

pytestmark = pytest.mark.anyio

CLIENT_FEATURES = str(EXAMPLES / "servers" / "client_features_server.py")


class Answers:
    """Callbacks that answer like a client would, and remember what they were asked."""

    def __init__(self) -> None:
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[Any] = []
        self.roots_asked = 0
        self.roots_event = anyio.Event()  # set on each roots/list

    async def sampling(
        self, context: Any, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        self.sampled.append(params)
        text = types.TextContent(type="text", text="a sampled line")
        return types.CreateMessageResult(
            role="assistant", content=text, model="test-model", stop_reason="endTurn"
        )

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult:
        self.elicited.append(params)
        if params.mode == "url":
            return types.ElicitResult(action="accept")
        return types.ElicitResult(action="accept", content={"name": "Ada", "age": 36})

    async def list_roots(self, context: Any) -> types.ListRootsResult:
        self.roots_asked += 1
        self.roots_event.set()
        self.roots_event = anyio.Event()
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/project", name="project")])

    def kwargs(self) -> dict[str, Any]:
        return {
            "sampling_callback": self.sampling,
            "elicitation_callback": self.elicitation,
            "list_roots_callback": self.list_roots,
        }


@needs_everything
async def test_capabilities_are_advertised_only_with_callbacks_on_the_2025_era() -> None:
    # server-everything registers its sampling/elicitation/roots tools only for clients that advertise them.
    target = StdioTarget(command="node", args=(str(EVERYTHING), "stdio"))
    async with connect(target, startup_timeout=30) as bare:
        names = {t.name for t in await bare.list_all_tools(timeout=15)}
        assert "trigger-sampling-request" not in names and "get-roots-list" not in names
    answers = Answers()
    async with connect(target, startup_timeout=30, **answers.kwargs()) as conn:
        assert conn.protocol_version.startswith("2025")
        names = {t.name for t in await conn.list_all_tools(timeout=15)}
        assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= names
        assert "trigger-url-elicitation" in names  # url mode is advertised too

        sampled = await conn.call_tool(
            "trigger-sampling-request", {"prompt": "hi", "maxTokens": 7}, timeout=15
        )
        assert "a sampled line" in sampled.content[0].text  # type: ignore[union-attr]  # a text block
        assert answers.sampled[-1].max_tokens == 7

        roots = await conn.call_tool("get-roots-list", {}, timeout=15)
        assert "file:///srv/project" in roots.content[0].text  # type: ignore[union-attr]  # a text block
        assert answers.roots_asked >= 1

        url = await conn.call_tool("trigger-url-elicitation", {"url": "https://example.com/x"}, timeout=15)
        assert not url.is_error
        assert answers.elicited[-1].mode == "url" and answers.elicited[-1].url == "https://example.com/x"

        asked, event = answers.roots_asked, answers.roots_event
        assert await conn.send_roots_list_changed() is True
        with anyio.fail_after(10):  # the server asks for the roots again when told they changed
            await event.wait()
        assert answers.roots_asked == asked + 1


async def test_callbacks_answer_input_required_rounds_on_the_2026_era() -> None:
    answers = Answers()
    target = StdioTarget(command=PYTHON, args=(CLIENT_FEATURES,))
    async with connect(target, startup_timeout=30, **answers.kwargs()) as conn:
        assert conn.protocol_version == "2026-07-28"
        summary = await conn.call_tool("summarize", {"text": "long text", "max_tokens": 9}, timeout=15)
        assert json.loads(summary.content[0].text) == {  # type: ignore[union-attr]  # a text block
            "text": "a sampled line",
            "model": "test-model",
            "stop_reason": "endTurn",
        }
        assert answers.sampled[-1].max_tokens == 9

        contact = await conn.call_tool("ask_contact", {}, timeout=15)
        assert json.loads(contact.content[0].text)["data"]["name"] == "Ada"  # type: ignore[union-attr]  # a text block

        roots = await conn.call_tool("list_client_roots", {}, timeout=15)
        assert json.loads(roots.content[0].text) == [{"uri": "file:///srv/project", "name": "project"}]  # type: ignore[union-attr]  # a text block
        # No client notifications in the 2026 era: nothing is sent, the server reads roots per request.
        assert await conn.send_roots_list_changed() is False


async def test_without_callbacks_the_2026_server_is_told_the_capability_is_missing() -> None:
    target = StdioTarget(command=PYTHON, args=(CLIENT_FEATURES,))
    async with connect(target, startup_timeout=30) as conn:
        with pytest.raises(ServerRequestError) as missing:
            await conn.call_tool("summarize", {"text": "x"}, timeout=15)
        assert "sampling" in str(missing.value).lower()
