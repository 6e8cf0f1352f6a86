"""The OpenAI-compatible server against the real `openai` client and the packaged SmolLM2 engine."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx
import jsonschema
import openai
import psutil
import pytest

from agent_runtime.cli.common import bind_socket, url_of, uvicorn_server
from agent_runtime.server.app import OpenAIServer, ServerSettings, create_app

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_time",
        "description": "Get the current time in an IANA timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}


class ServerThread:
    """Runs an ASGI app under uvicorn on an ephemeral 127.0.0.1 port in a background thread (its own event
    loop). `factory` builds the app inside that loop (an async context manager yielding it) when the app
    needs loop-bound resources such as a Runtime."""

    def __init__(
        self, app: Any = None, *, factory: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    ) -> None:
        self.app = app
        self.factory = factory
        self.uv: Any = None
        self.failed: BaseException | None = None
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.thread = threading.Thread(target=lambda: anyio.run(self._main), daemon=True)

    async def _main(self) -> None:
        try:
            if self.factory is None:
                self.uv = uvicorn_server(self.app)
                await self.uv.serve([self.sock])
                return
            async with self.factory() as app:
                self.app = app
                self.uv = uvicorn_server(app)
                await self.uv.serve([self.sock])
        except BaseException as exc:
            self.failed = exc
            raise

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.uv is None or not self.uv.started:
            assert self.failed is None, f"server failed: {self.failed!r}"
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def engine(serving_engine: Any) -> Any:
    return serving_engine  # the session's serving engine (tests/agent_runtime/conftest.py)


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[tuple[OpenAIServer, str]]:
    srv = create_app(engine, model_id=MODEL)
    with ServerThread(srv.app) as st:
        yield srv, st.url


@pytest.fixture(scope="module")
def client(server: tuple[OpenAIServer, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(engine: Any, timeout: float = 20.0) -> Any:
    """Poll the engine until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        m = engine.metrics()
        if m.requests_running == 0 and m.requests_waiting == 0 and m.kv_blocks_used == 0:
            return m
        assert time.monotonic() < deadline, (
            f"engine not idle: {m.requests_running} running, {m.kv_blocks_used} blocks"
        )
        time.sleep(0.02)


def wait_released(srv: OpenAIServer, timeout: float = 5.0) -> None:
    """Poll until every capacity slot is back (released as each response closes)."""
    deadline = time.monotonic() + timeout
    while srv.capacity.in_flight:
        assert time.monotonic() < deadline, f"{srv.capacity.in_flight} capacity slots leaked"
        time.sleep(0.01)


def greedy(engine: Any, prompt: Any, max_tokens: int) -> str:
    """The in-process engine's greedy answer (through its async front, like the server)."""
    from inference.params import SamplingParams

    async def run() -> str:
        text = ""
        async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
            text = out.text
        return text

    return anyio.run(run)


def test_models_lists_the_engine_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_plain_chat_matches_the_engine(client: openai.OpenAI, engine: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]  # plain dicts for the SDK's message TypedDicts; greedy() reads the same list
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(engine, messages, 12)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_sends_deltas_and_usage_last(client: openai.OpenAI, engine: Any) -> None:
    messages = [{"role": "user", "content": "Count from one to ten."}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(engine, messages, 16)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3  # streamed token by token, not buffered
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_framed_as_sse_and_ends_with_done(server: tuple[OpenAIServer, str]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def _server_end(port: int, client_addr: tuple[str, int]) -> socket.socket:
    """The server's socket of one connection (the server runs in this process), found by its two addresses."""
    (conn,) = [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.raddr and tuple(c.raddr) == tuple(client_addr)
    ]
    return socket.socket(fileno=os.dup(conn.fd))


def test_keep_alive_streams_are_not_delayed(server: tuple[OpenAIServer, str]) -> None:
    """On a reused connection each small SSE chunk leaves at once: the server's end of the connection has Nagle's
    algorithm off, so no chunk waits for the client's delayed ACK (~40 ms). Checked on the socket, not timed."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    port = int(server[1].rsplit(":", 1)[1])
    clients = []
    with httpx.Client(timeout=60) as http:
        for _ in range(2):
            with http.stream("POST", server[1] + "/v1/chat/completions", json=body) as r:
                clients.append(r.extensions["network_stream"].get_extra_info("client_addr"))
                lines = list(r.iter_lines())  # read to the end so the connection is reused
            assert any('"content":"' in line and '"content":""' not in line for line in lines), lines
        assert clients[0] == clients[1]  # the second stream went over the same, kept-alive connection
        with _server_end(port, clients[0]) as end:
            assert end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_client_side_tools_give_valid_tool_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[TIME_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_current_time"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TIME_TOOL["function"]["parameters"])  # type: ignore[index]  # TIME_TOOL infers as dict[str, Collection[str]]; its "function" entry is a dict


def test_tool_calls_stream_and_round_trip(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What time is it in Paris?"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_current_time"}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == "get_current_time"
    args = json.loads(calls[0].function.arguments)
    assert isinstance(args["timezone"], str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    # The client runs the tool and sends the result back: the follow-up is a plain answer or another call.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].id,
                    "type": "function",
                    "function": {"name": "get_current_time", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"datetime": "2026-01-01T09:00:00+01:00"}'},
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]  # plain dicts (one holds the tool_calls) for the SDK's TypedDicts
        tools=[TIME_TOOL],  # type: ignore[list-item]  # a plain dict for the SDK's ChatCompletionFunctionToolParam
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length")
    if choice.finish_reason == "tool_calls":
        assert json.loads(choice.message.tool_calls[0].function.arguments)  # type: ignore[index, union-attr]  # finish_reason is tool_calls, so tool_calls is set; ours are function calls
    elif choice.finish_reason == "stop":
        assert choice.message.content


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        # Bounded, so the grammar ends the object within max_tokens whatever the model's numerics (in float32 it
        # goes on writing digits of an unbounded integer).
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the largest city of Japan and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_sampling_parameters_are_applied(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": 12,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 1234,
    }
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b  # seeded sampling is reproducible
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
        max_tokens=30,
        temperature=0,
        stop=["5"],
    )
    assert "5" not in (r.choices[0].message.content or "")
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == r.usage.completion_tokens  # type: ignore[union-attr]  # the server reports usage on every non-streamed reply
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.content)


def test_logit_bias_is_applied_and_checked(client: openai.OpenAI, engine: Any) -> None:
    forced = engine.tokenizer.encode(" banana")[-1]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert r.choices[0].message.content == engine.tokenizer.decode([forced] * 3)
    for bad in ({"banana": 1}, {str(forced): 101}, {"99999999": 1}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, logit_bias=bad
            )


def test_completions_endpoint(client: openai.OpenAI, engine: Any) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    assert r.choices[0].text == greedy(engine, "The capital of France is", 5)
    assert r.choices[0].logprobs is not None and len(r.choices[0].logprobs.tokens or []) == 5
    chunks = list(
        client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello")


def test_errors_in_openai_shape(client: openai.OpenAI, server: tuple[OpenAIServer, str]) -> None:
    url = server[1]
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=2)
    assert "context" in too_long.value.message
    r = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (5 * 2**20))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code", "request_id"}
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405


def test_32_concurrent_streams(server: tuple[OpenAIServer, str], engine: Any) -> None:
    client = openai.AsyncOpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
    results: dict[int, tuple[str, str | None]] = {}

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say the number {i}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        text, reason = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
        results[i] = (text, reason)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)
        await client.close()

    anyio.run(main)
    assert len(results) == 32
    assert all(reason in ("stop", "length") and text for text, reason in results.values())
    m = wait_idle(engine)
    assert m.max_running_seqs > 1  # the streams were batched together, not served one by one


def test_disconnect_cancels_generation_and_frees_blocks(
    server: tuple[OpenAIServer, str], engine: Any
) -> None:
    srv, url = server
    wait_idle(engine)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
        assert engine.metrics().requests_running == 1
    # closing the connection mid-stream aborts the request: no running request, every block released
    wait_idle(engine, timeout=10)
    wait_released(srv)
    # the same for a non-streamed request that is still generating
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=1.5)
    wait_idle(engine, timeout=10)
    wait_released(srv)


def test_over_capacity_is_429(engine: Any) -> None:
    srv = create_app(engine, model_id=MODEL, settings=ServerSettings(max_concurrent_requests=1))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        ServerThread(srv.app) as st,
        httpx.stream("POST", st.url + "/v1/chat/completions", json=body, timeout=60) as r,
    ):
        lines = r.iter_lines()  # keep the iterator: collecting it would close the stream
        assert next(lines).startswith("data: ")
        client = openai.OpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        assert err.value.response.headers["retry-after"] == "1"
    wait_idle(engine)


def test_health_and_metrics(client: openai.OpenAI, server: tuple[OpenAIServer, str]) -> None:
    url = server[1]
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/v1/nothing").status_code == 404  # counted under route="other", not its own path
    text = httpx.get(url + "/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    ok = 'agent_runtime_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    assert samples[ok] >= 1
    assert samples[f'agent_runtime_time_to_first_token_seconds_count{{model="{MODEL}"}}'] >= 1
    assert samples[f'agent_runtime_inter_token_latency_seconds_count{{model="{MODEL}"}}'] >= 1
    assert samples[f'agent_runtime_generation_tokens_total{{model="{MODEL}"}}'] >= 3
    assert f'agent_runtime_kv_cache_usage_ratio{{model="{MODEL}"}}' in samples
    assert f'agent_runtime_prefix_cache_hit_rate{{model="{MODEL}"}}' in samples
    assert f'agent_runtime_engine_preemptions_total{{model="{MODEL}"}}' in samples
    assert f'agent_runtime_engine_queue_wait_seconds{{model="{MODEL}",quantile="0.5"}}' in samples
    assert samples['agent_runtime_http_requests_total{method="GET",route="other",status="404"}'] >= 1
    assert "agent_runtime_event_loop_lag_seconds_bucket" in text
