"""The remote (OpenAI-compatible) LLM backend against our own server, and its retries and timeouts against
a misbehaving server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent_runtime.agents.openai_backend import OpenAIBackend, OpenAIBackendSettings, RemoteLLMError
from agent_runtime.errors import ConfigError
from agent_runtime.server.app import create_app
from tests.agent_runtime.server.test_app import MODEL, TIME_TOOL, ServerThread
from tests.conftest import EXAMPLES, PYTHON

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def engine(serving_engine: Any) -> Any:
    return serving_engine  # the session's serving engine (tests/agent_runtime/conftest.py)


@pytest.fixture(scope="module")
def base_url(engine: Any) -> Iterator[str]:
    with ServerThread(create_app(engine, model_id=MODEL).app) as st:
        yield st.url + "/v1"


async def local_greedy(engine: Any, messages: list[dict[str, Any]], max_tokens: int) -> str:
    from inference.params import SamplingParams

    text = ""
    async for out in engine.generate(messages, SamplingParams(max_tokens=max_tokens, temperature=0)):
        text = out.text
    return str(text)


PROMPTS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write the first line of a poem about rain."}],
]


@pytest.mark.smollm2
@pytest.mark.parametrize("streamed", [False, True])
async def test_same_answers_as_the_local_engine(base_url: str, engine: Any, streamed: bool) -> None:
    settings = OpenAIBackendSettings(base_url=base_url, model=MODEL)  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
    async with OpenAIBackend(settings) as backend:
        assert await backend.models() == [MODEL]
        for messages in PROMPTS:
            if streamed:
                result = await backend.collect(messages, max_tokens=20, temperature=0)
                assert result.ttft is not None and result.ttft > 0
            else:
                result = await backend.chat(messages, max_tokens=20, temperature=0)
            assert result.text == await local_greedy(engine, messages, 20)
            assert result.completion_tokens > 0 and result.prompt_tokens > 0


@pytest.mark.smollm2
async def test_tool_calls_through_the_backend(base_url: str) -> None:
    settings = OpenAIBackendSettings(base_url=base_url, model=MODEL)  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    async with OpenAIBackend(settings) as backend:
        plain = await backend.chat(
            messages, tools=[TIME_TOOL], tool_choice="required", max_tokens=60, temperature=0
        )
        streamed = await backend.collect(
            messages, tools=[TIME_TOOL], tool_choice="required", max_tokens=60, temperature=0
        )
    for result in (plain, streamed):
        assert result.finish_reason == "tool_calls"
        (call,) = result.tool_calls
        assert call.name == "get_current_time"
        assert isinstance(call.arguments["timezone"], str)
    assert plain.tool_calls[0].arguments == streamed.tool_calls[0].arguments


@pytest.mark.smollm2
async def test_remote_errors_are_typed(base_url: str) -> None:
    settings = OpenAIBackendSettings(base_url=base_url, model="no-such-model", max_retries=3)  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
    async with OpenAIBackend(settings) as backend:
        with pytest.raises(RemoteLLMError) as err:
            await backend.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.status == 404  # not retried: a 4xx other than 408/409/425/429 is final
    assert "does not exist" in err.value.reason and err.value.hint


class Flaky:
    """A scripted OpenAI-compatible server: answers 429/503 a given number of times, or stalls."""

    def __init__(self, failures: list[int], stall: float = 0.0) -> None:
        self.failures = failures
        self.stall = stall
        self.calls = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        self.calls += 1
        body = json.loads(await request.body())
        if self.failures:
            status = self.failures.pop(0)
            headers = {"retry-after": "0"} if status == 429 else {}
            return JSONResponse(
                {"error": {"message": f"scripted {status}"}}, status_code=status, headers=headers
            )
        if self.stall:
            await anyio.sleep(self.stall)  # a server that must be slow: the client's timeout is under test
        if body.get("stream"):

            async def events() -> Any:
                for piece in ("Hel", "lo"):
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
                done = {
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                }
                yield f"data: {json.dumps(done)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }
        )


async def test_retries_429_and_5xx_with_backoff() -> None:
    flaky = Flaky([429, 503, 502])
    with ServerThread(flaky.app) as st:
        settings = OpenAIBackendSettings(
            base_url=st.url + "/v1",  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
            model="m",
            max_retries=3,
            backoff_initial=0.01,
        )
        async with OpenAIBackend(settings) as backend:
            result = await backend.chat([{"role": "user", "content": "hi"}])
            assert result.text == "Hello" and flaky.calls == 4
            flaky.failures = [503]
            streamed = await backend.collect([{"role": "user", "content": "hi"}])
            assert streamed.text == "Hello" and streamed.completion_tokens == 2 and flaky.calls == 6
            flaky.failures = [500, 500, 500, 500]
            with pytest.raises(RemoteLLMError, match="after 4 attempts"):
                await backend.chat([{"role": "user", "content": "hi"}])


async def test_timeout_and_unreachable_server() -> None:
    flaky = Flaky([], stall=5.0)
    with ServerThread(flaky.app) as st:
        settings = OpenAIBackendSettings(
            base_url=st.url + "/v1",  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
            model="m",
            timeout=0.3,
            max_retries=1,
            backoff_initial=0.01,
        )
        async with OpenAIBackend(settings) as backend:
            with anyio.fail_after(5):
                with pytest.raises(RemoteLLMError, match="failed after 2 attempts"):
                    await backend.chat([{"role": "user", "content": "hi"}])
    settings = OpenAIBackendSettings(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0)  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl (nothing listens on port 9)
    async with OpenAIBackend(settings) as backend:
        with pytest.raises(RemoteLLMError, match="ConnectError"):
            await backend.chat([{"role": "user", "content": "hi"}])


def test_settings_validation() -> None:
    ok = OpenAIBackendSettings.from_section(
        {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    )
    assert ok.timeout == 120.0 and ok.max_retries == 3
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIBackendSettings.from_section({"backend": "openai", "base_url": "not a url", "model": "m"})
    with pytest.raises(ConfigError, match="unknown_key"):
        OpenAIBackendSettings.from_section(
            {"backend": "openai", "base_url": "http://h/v1", "model": "m", "unknown_key": 1}
        )


@pytest.mark.smollm2
async def test_agent_on_the_remote_backend_matches_the_local_one(
    base_url: str, engine: Any, tmp_path: Path
) -> None:
    """The same agent run, greedy, on the in-process engine and through our own server: same tool calls, same
    arguments, same answer."""
    from agent_runtime.config import load_config
    from agent_runtime.server.agent_host import open_agent_host

    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": {"command": PYTHON, "args": [str(EXAMPLES / "servers" / "demo_server.py")]}
                },
                # guided off: the remote model cannot continue a partial turn, so compare single-stage runs
                "agents": {
                    "calc": {
                        "tools": ["demo__add", "demo__echo"],
                        "max_steps": 3,
                        "max_tokens": 96,
                        "guided": False,
                    }
                },
            }
        )
    )
    config = load_config(path)
    remote = OpenAIBackendSettings(base_url=base_url, model=MODEL)  # type: ignore[arg-type]  # pydantic validates the str into an HttpUrl
    runs = []
    for kwargs in ({"engine": engine}, {"model": remote}):
        async with open_agent_host(config, **kwargs) as host:
            assert host is not None and "calc" in host.names()
            chunks = [
                c async for c in host.stream("calc", [{"role": "user", "content": "What is 17 plus 25?"}])
            ]
        runs.append(chunks)
    local, served = runs
    assert [c.kind for c in local] == [c.kind for c in served]
    assert [c.text for c in local if c.kind != "step"] == [c.text for c in served if c.kind != "step"]
    assert local[-1].data["tool_calls"] == served[-1].data["tool_calls"]
    assert local[-1].data["tool_calls"], "the agent should have called a demo tool"
    assert local[-1].text and local[-1].data["outcome"] == served[-1].data["outcome"]


@pytest.mark.smollm2
async def test_model_section_with_openai_backend_drives_runtime_agents(
    base_url: str, engine: Any, tmp_path: Path
) -> None:
    """`model: {backend: "openai", ...}` in the config file: the agents run on the remote server and give the
    same greedy tool calls and answer as the in-process engine."""
    from agent_runtime import AgentHost, LocalEngineBackend, OpenAIChatBackend, Runtime

    servers = {"demo": {"command": PYTHON, "args": [str(EXAMPLES / "servers" / "demo_server.py")]}}
    # guided off: a remote model cannot continue a partial turn, so the local run must be single-stage too
    agents = {"calc": {"tools": ["demo__add"], "max_steps": 3, "max_tokens": 96, "guided": False}}
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": servers,
                "agents": agents,
                "model": {"backend": "openai", "base_url": base_url, "model": MODEL},
            }
        )
    )
    task = "What is 17 plus 25?"
    async with Runtime.from_config(path) as rt, AgentHost(rt) as host:
        remote = await host.agent("calc").run(task)
        assert isinstance(await host.backend(), OpenAIChatBackend)
    local_path = tmp_path / "local.json"
    local_path.write_text(json.dumps({"mcpServers": servers, "agents": agents}))
    async with (
        Runtime.from_config(local_path) as rt,
        AgentHost(rt, backend=LocalEngineBackend(engine, owns_engine=False)) as host,
    ):
        local = await host.agent("calc").run(task)
    assert [(c.name, c.arguments) for c in remote.tool_calls] == [
        (c.name, c.arguments) for c in local.tool_calls
    ]
    assert remote.tool_calls, "the agent should have called demo__add"
    assert remote.outcome == local.outcome and remote.answer == local.answer


@pytest.mark.smollm2
@pytest.mark.anyio
async def test_a_servers_sampling_request_goes_to_the_remote_backend(
    tmp_path: Path, base_url: str, engine: Any
) -> None:
    """With `model.backend: "openai"`, a server allowed to sample gets the remote model's answer."""
    from agent_runtime import AgentHost, Runtime

    server = {
        "command": PYTHON,
        "args": [str(EXAMPLES / "servers" / "client_features_server.py")],
        "sampling": {"allow": True, "max_tokens": 10},
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {"cf": server},
                "model": {"backend": "openai", "base_url": base_url, "model": MODEL},
            }
        )
    )
    async with Runtime.from_config(path) as rt, AgentHost(rt):
        result = await rt.call_tool("cf__summarize", {"text": "Rain fell on the quiet town all night."})
    reply = json.loads(result.content[0].text)  # type: ignore[union-attr]  # the tool answers in a text block
    expected = await local_greedy(
        engine,
        [
            {"role": "system", "content": "You write one-line summaries."},
            {"role": "user", "content": "Summarize in one line: Rain fell on the quiet town all night."},
        ],
        10,
    )
    assert reply["text"] == expected and reply["model"] == MODEL
