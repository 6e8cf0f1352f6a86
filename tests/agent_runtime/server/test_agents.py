"""Agents as models over the HTTP API: listing, plain and streamed answers, and failures mid-stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest

from agent_runtime.server.agents import AgentChunk
from agent_runtime.server.app import OpenAIServer, create_app
from tests.agent_runtime.server.test_app import ServerThread


class ScriptedHost:
    """Agents whose runs are fixed: `echo` streams the task back in two pieces; `broken` fails mid-run."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, Any]]] = []

    def names(self) -> list[str]:
        return ["echo", "broken"]

    def describe(self, name: str) -> str:
        return f"{name} agent"

    async def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncIterator[AgentChunk]:
        self.seen.append(messages)
        task = messages[-1]["content"]
        yield AgentChunk("step", text="tool call: nothing")
        if name == "broken":
            raise RuntimeError("tool layer exploded")
        half = len(task) // 2
        yield AgentChunk("text", text=task[:half])
        yield AgentChunk("text", text=task[half:])
        yield AgentChunk(
            "final", text=task, data={"finish_reason": "stop"}, prompt_tokens=5, completion_tokens=7
        )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[OpenAIServer, ScriptedHost, str]]:
    host = ScriptedHost()
    srv = create_app(None, agents=host)
    with ServerThread(srv.app) as st:
        yield srv, host, st.url


def test_agents_are_listed_as_models(server: tuple[OpenAIServer, ScriptedHost, str]) -> None:
    client = openai.OpenAI(base_url=server[2] + "/v1", api_key="unused", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["echo", "broken"]
    assert all(m.model_extra and m.model_extra["kind"] == "agent" for m in models)


def test_agent_answers_plain_and_streamed(server: tuple[OpenAIServer, ScriptedHost, str]) -> None:
    _, host, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello agent"}]
    r = client.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]  # plain dicts for the SDK's message TypedDicts; host.seen is compared with the same list
    assert r.choices[0].message.content == "hello agent" and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert host.seen[-1] == messages
    chunks = list(
        client.chat.completions.create(
            model="echo",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["hello", " agent"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="echo",
            messages=messages,  # type: ignore[arg-type]  # the same plain dicts; the server refuses the request for its tools anyway
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="echo", prompt="hi")


def test_agent_failure_is_an_error_not_a_cut_stream(server: tuple[OpenAIServer, ScriptedHost, str]) -> None:
    srv, _, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    stream = client.chat.completions.create(
        model="broken", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError, match="Internal server error"):
        list(stream)
    deadline = time.monotonic() + 5  # the slot is released as the response closes, just after [DONE]
    while srv.capacity.in_flight:
        assert time.monotonic() < deadline, "capacity slot leaked"
        time.sleep(0.01)


# -- the real agent loop over MCP servers ----------------------------------------------------------------------


def time_config(tmp: Any) -> Any:
    import json
    from pathlib import Path

    from agent_runtime.config import load_config
    from tests.conftest import PYTHON

    path = tmp / "MCP_CONFIG.json"
    time_server = str(Path(PYTHON).parent / "mcp-server-time")
    path.write_text(
        json.dumps({"mcpServers": {"time": {"command": time_server, "args": ["--local-timezone", "UTC"]}}})
    )
    return load_config(path)


@pytest.fixture(scope="module")
def engine(serving_engine: Any) -> Any:
    return serving_engine  # the session's serving engine (tests/agent_runtime/conftest.py)


@pytest.fixture(scope="module")
def agent_server(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenAIServer, str]]:
    from contextlib import asynccontextmanager

    from agent_runtime.server.agent_host import open_agent_host
    from agent_runtime.server.metrics import ServerMetrics

    config = time_config(tmp_path_factory.mktemp("agents"))
    holder: dict[str, OpenAIServer] = {}

    @asynccontextmanager
    async def factory() -> AsyncIterator[Any]:
        metrics = ServerMetrics()
        async with open_agent_host(config, engine=engine, metrics=metrics) as host:
            srv = create_app(engine, agents=host, metrics=metrics, model_id="smollm2-135m-instruct")
            holder["srv"] = srv
            yield srv.app

    with ServerThread(factory=factory) as st:
        yield holder["srv"], st.url


@pytest.mark.smollm2
def test_agent_as_model_calls_mcp_server_time(agent_server: tuple[OpenAIServer, str]) -> None:
    import httpx

    _, url = agent_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m-instruct", "default"]
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What time is it in Tokyo?"}]
    )
    assert r.model == "default" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens > 0
    # the agent ran server-side and called the MCP time server (any outcome counts: the model picks arguments)
    metrics = httpx.get(url + "/metrics").text
    calls = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("agent_runtime_mcp_calls_total{") and 'server="time"' in line
    ]
    assert sum(calls) >= 1, metrics
    chunks = list(
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "What time is it in Paris?"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
