"""`agent-runtime mcp-server` beyond tools: logging/setLevel with filtered log notifications, progress per
agent step, cancellation of a running agent by the host, and on --http the SSE polling flow (a priming event
with an id and `retry`, the response on the POST stream, resumption with Last-Event-ID).

The agents run on a remote OpenAI-compatible backend served by this test on 127.0.0.1 (the smallest model
path: nothing is loaded); it answers, or holds a reply open until released, so a run can be cancelled mid-way.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent_runtime.cli.common import bind_socket, url_of, uvicorn_server
from agent_runtime.server.agents import AgentChunk
from agent_runtime.server.mcp_server import RETRY_MS, AgentMCPServer
from tests.agent_runtime.server.test_mcp_server import write_config
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.anyio
ANSWER = "Done: I read the clock."  # no figures: the agent checks answers against tool results
CALL = json.dumps({"tool": "time__get_current_time", "arguments": {"timezone": "UTC"}})
FINAL = json.dumps({"answer": ANSWER})


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()


CALL = json.dumps({"tool": "time__get_current_time", "arguments": {"timezone": "UTC"}})
FINAL = json.dumps({"answer": ANSWER})


@dataclass
class Model:
    """An OpenAI-compatible chat endpoint: a turn after a tool result gets FINAL, any other CALL, except the
    requests (numbered from 1) that `script` names: "fail" (HTTP 400) or "hold" (kept open until `release`, or until the client hangs
    up: `hung_up`)."""

    script: dict[int, str] = field(default_factory=dict)
    requests: int = 0
    holding: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    hung_up: anyio.Event = field(default_factory=anyio.Event)

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests += 1
        number = self.requests
        reply = FINAL if body["messages"][-1]["role"] == "tool" else CALL
        if self.script.get(number) == "fail":
            return JSONResponse({"error": {"message": "the model is broken"}}, status_code=400)

        async def events() -> AsyncIterator[bytes]:
            try:
                if self.script.get(number) == "hold":
                    self.holding.set()
                    await self.release.wait()
                for delta, finish in (({"content": reply}, None), ({}, "stop")):
                    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            except anyio.get_cancelled_exc_class():
                self.hung_up.set()  # starlette cancels the body when the client disconnects
                raise

        return StreamingResponse(events(), media_type="text/event-stream")


@asynccontextmanager
async def model_server(model: Model) -> AsyncIterator[str]:
    """Serve `model` on 127.0.0.1 in this event loop; yields its base URL (…/v1)."""
    app = Starlette(routes=[Route("/v1/chat/completions", model.completions, methods=["POST"])])
    sock = bind_socket("127.0.0.1", 0)
    uv = uvicorn_server(app, drain_seconds=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: uv.serve(sockets=[sock]))
        try:
            yield f"{url_of(sock)}/v1"
        finally:
            model.release.set()
            uv.should_exit = True


def remote_config(tmp: Path, base_url: str) -> Path:
    return write_config(
        tmp, {"model": {"backend": "openai", "base_url": base_url, "model": "m", "max_retries": 0}}
    )


def server_command(config: Path, *flags: str) -> list[str]:
    return [PYTHON, "-m", "agent_runtime", "mcp-server", "--config", str(config), *flags]


def stdio_params(config: Path) -> StdioServerParameters:
    [cmd, *args] = server_command(config)
    return StdioServerParameters(
        command=cmd, args=args, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


async def test_stdio_logging_progress_and_cancel(tmp_path: Path) -> None:
    """Over stdio, as a 2025-era host: info logs and progress per step; after setLevel(warning) only
    warnings and errors; a run cancelled mid-way stops (its model request is dropped) and the server answers
    the next call."""
    model = Model(script={5: "fail", 6: "hold"})
    logs: list[tuple[str, Any]] = []
    progress: list[tuple[float, str | None]] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append((params.level, params.data))

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with model_server(model) as base:
        params = stdio_params(remote_config(tmp_path, base))
        async with Client(params, read_timeout_seconds=60, logging_callback=on_log, mode="legacy") as client:
            assert client.server_capabilities.logging is not None
            run = await client.call_tool(
                "run_agent", {"task": "what time is it?"}, progress_callback=on_progress
            )
            assert not run.is_error and run.structured_content is not None
            assert run.structured_content["steps"] == 2
            assert [v for v, _ in progress] == [1, 2]
            assert progress[0][1] and "calling time__get_current_time" in progress[0][1]
            assert [level for level, _ in logs] == ["info"] * 3  # default level info: two steps, the finish
            assert [d["step"] for _, d in logs] == [1, 2, 2] and "finished" in logs[-1][1]["message"]
            assert logs[0][1]["message"] == progress[0][1]

            logs.clear()
            await client.set_logging_level("warning")
            run = await client.call_tool("run_agent", {"task": "what time is it?"})
            assert not run.is_error and logs == []  # info lines are below the level now
            failed = await client.call_tool("run_agent", {"task": "what time is it?"})
            assert failed.is_error
            assert [level for level, _ in logs] == ["error"] and "broken" in logs[0][1]["message"]

            logs.clear()
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:

                    async def doomed() -> None:
                        await client.call_tool("run_agent", {"task": "what time is it?"})

                    tg.start_soon(doomed)
                    await model.holding.wait()  # the run is mid-way: its second model request is open
                    tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled for the call
                await model.hung_up.wait()  # the agent stopped: its model request was dropped
                listed = await client.call_tool("list_agents", {})  # and the server is still healthy
            assert listed.structured_content == {"agents": [{"name": "default", "description": ANY_TEXT}]}
            assert [d["step"] for _, d in logs] == []  # nothing was sent for the cancelled run
            assert model.requests == 6


@dataclass
class Sse:
    id: str | None = None
    retry: int | None = None
    data: str = ""

    @property
    def message(self) -> dict[str, Any] | None:
        return json.loads(self.data) if self.data else None


async def sse_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """The SSE events of a streamed response, as they arrive."""
    event = Sse()
    async for line in response.aiter_lines():
        if not line:
            yield event
            event = Sse()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event.id = value
        elif name == "retry":
            event.retry = int(value)
        elif name == "data":
            event.data += value


@asynccontextmanager
async def http_server(config: Path) -> AsyncIterator[str]:
    """`agent-runtime mcp-server --http 0` as a subprocess; yields its URL once it listens."""
    command = server_command(config, "--http", "0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        try:
            line = b""
            with anyio.fail_after(60):
                while not line.endswith(b"\n"):
                    line += await proc.stdout.receive(1)
            assert line.startswith(b"LISTENING "), line
            yield line.split()[1].decode()
        finally:
            proc.terminate()
            with anyio.fail_after(30):
                await proc.wait()


HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}


async def open_session(http: httpx.AsyncClient, url: str) -> str:
    """Initialize a 2025-11-25 session (its response stream is primed too); returns the session id."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    async with http.stream("POST", url, json=init, headers=HEADERS) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e async for e in sse_events(r)]
    assert events[0].id and events[0].retry == RETRY_MS and events[0].data == ""  # the priming event
    assert events[-1].message is not None and "serverInfo" in events[-1].message["result"]
    session = r.headers["mcp-session-id"]
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    accepted = await http.post(url, json=done, headers={**HEADERS, "Mcp-Session-Id": session})
    assert accepted.status_code == 202
    return session


async def test_http_polling_flow_resumes_a_run_after_a_disconnect(tmp_path: Path) -> None:
    """--http: a run_agent POST stream opens with a priming event (id + retry); the host drops it mid-run and
    resumes with Last-Event-ID: the step logs and the answer arrive, once; another session cannot resume it."""
    model = Model(script={1: "hold"})
    async with model_server(model) as base, http_server(remote_config(tmp_path, base)) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            session = await open_session(http, url)
            headers = {**HEADERS, "Mcp-Session-Id": session}
            call = {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "run_agent", "arguments": {"task": "time?"}},
            }
            async with http.stream("POST", url, json=call, headers=headers) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                priming = await anext(sse_events(r))
            # the stream is closed here, mid-run: the model holds its first reply
            assert priming.id and priming.retry == RETRY_MS and priming.data == ""
            with anyio.fail_after(30):
                await model.holding.wait()
            model.release.set()

            # As a host does: resume from the last id seen until the answer arrives (a resumed stream may
            # also end early, e.g. when it came before the server noticed the old one was gone).
            resumed: list[Sse] = []
            last_id = priming.id
            with anyio.fail_after(30):
                for _attempt in range(5):
                    async with http.stream("GET", url, headers={**headers, "Last-Event-ID": last_id}) as r:
                        assert r.status_code == 200
                        async for event in sse_events(r):
                            last_id = event.id or last_id
                            if event.data:
                                resumed.append(event)
                            if (event.message or {}).get("id") == 2:
                                break  # the answer ends the request's stream for the host
                    if any((e.message or {}).get("id") == 2 for e in resumed):
                        break
            messages = [e.message for e in resumed]
            assert all(e.id for e in resumed)  # every event can be resumed from in turn
            answers = [m for m in messages if m and m.get("id") == 2]
            assert len(answers) == 1 and answers[0]["result"]["structuredContent"]["answer"] == ANSWER
            logs = [m["params"] for m in messages if m and m.get("method") == "notifications/message"]
            assert [p["data"]["step"] for p in logs] == [1, 2, 2] and {p["level"] for p in logs} == {"info"}

            other = await open_session(http, url)
            with anyio.fail_after(30):
                resume = {**HEADERS, "Mcp-Session-Id": other, "Last-Event-ID": priming.id}
                async with http.stream("GET", url, headers=resume) as r:
                    stolen = [e async for e in sse_events(r) if e.data]
            assert stolen == []  # another session's events are not replayed

        # The SDK client over --http, on a session of its own with a level of its own.
        levels: list[str] = []

        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            levels.append(params.level)

        async with Client(url, mode="legacy", logging_callback=on_log) as client:
            await client.set_logging_level("warning")
            run = await client.call_tool("run_agent", {"task": "time?"})
            assert not run.is_error and run.structured_content is not None
            assert run.structured_content["steps"] == 2 and levels == []

        # A host cancels a run over HTTP: 2025-era by notifications/cancelled (a POST), 2026-era by closing
        # the request's stream. Either way the run stops: its model request is dropped.
        for mode, hold_at in (("legacy", 5), ("auto", 6)):
            model.script[hold_at] = "hold"
            model.holding, model.release, model.hung_up = anyio.Event(), anyio.Event(), anyio.Event()
            async with Client(url, mode=mode) as client:  # type: ignore[arg-type]  # mode: a ConnectMode literal
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:

                        async def doomed() -> None:
                            await client.call_tool("run_agent", {"task": "time?"})

                        tg.start_soon(doomed)
                        await model.holding.wait()
                        tg.cancel_scope.cancel()
                    await model.hung_up.wait()
                    assert (await client.call_tool("list_agents", {})).structured_content is not None


class FailingHost:
    """An agent host whose agent takes one step, then fails."""

    def names(self) -> list[str]:
        return ["flaky"]

    def describe(self, name: str) -> str:
        return "fails after one step"

    async def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncIterator[AgentChunk]:
        yield AgentChunk("step", text="step 1: calling a tool")
        text = "(no answer: error: the model broke, key sk-live0123456789abcdefXYZ)"
        yield AgentChunk("final", text=text, data={"finish_reason": "error"})


@pytest.mark.parametrize("opt_in", ["info", "error", None])
async def test_2026_era_logs_only_what_the_request_opted_into(opt_in: str | None) -> None:
    """On 2026-07-28 (no logging/setLevel) a request gets log notifications only at or above the level its
    `_meta` asked for, and none without one."""
    server = AgentMCPServer(FailingHost())  # type: ignore[arg-type]  # FailingHost.stream: an async generator
    logs: list[str] = []
    messages: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.level)
        messages.append(params.data["message"])

    async with Client(server.server, logging_callback=on_log, log_level=opt_in) as client:  # type: ignore[arg-type]  # opt_in: a LoggingLevel or None
        assert client.protocol_version == "2026-07-28"
        result = await client.call_tool("run_agent", {"task": "go"})
        assert result.is_error
    expected = {"info": ["info", "error"], "error": ["error"], None: []}[opt_in]
    assert logs == expected
    if opt_in is not None:  # the failure is told, its secret is not
        assert "the model broke" in messages[-1] and "sk-live" not in messages[-1]


class EngineHost:
    """An agent host whose agent streams a long generation from a real engine, one step per output."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def names(self) -> list[str]:
        return ["writer"]

    def describe(self, name: str) -> str:
        return "writes at length"

    async def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncIterator[AgentChunk]:
        from inference.params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        async for out in self.engine.generate(messages[-1]["content"], params):
            yield AgentChunk("step", text=f"{len(out.token_ids)} tokens")
        yield AgentChunk("final", text="done", data={"finish_reason": "stop"})


async def test_host_cancel_frees_the_engine_sequence(tmp_path: Path) -> None:
    """notifications/cancelled for a run_agent on a local engine: the run's engine request is aborted and its
    KV blocks freed; the server answers the next call."""
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from tests.inference.test_hf_equivalence import build_tiny_model

    build_tiny_model(tmp_path, "qwen3", seed=2)
    config = EngineConfig(num_blocks=200, max_model_len=512)
    async with AsyncEngine(LLMEngine(load_model(str(tmp_path), dtype="float32"), config)) as engine:
        blocks = engine.engine.block_manager
        free = blocks.num_free_blocks
        server = AgentMCPServer(EngineHost(engine))  # type: ignore[arg-type]  # EngineHost.stream: an async generator
        steps = 0
        running = anyio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            nonlocal steps
            steps += 1
            if steps == 3:
                running.set()

        async with Client(server.server, mode="legacy") as client:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:

                    async def doomed() -> None:
                        await client.call_tool(
                            "run_agent", {"task": "Paged attention keeps"}, progress_callback=on_progress
                        )

                    tg.start_soon(doomed)
                    await running.wait()
                    assert blocks.num_free_blocks < free  # the run holds KV blocks
                    tg.cancel_scope.cancel()
                while engine.engine.has_unfinished() or blocks.num_free_blocks != free:  # noqa: ASYNC110 - the step thread's state
                    await anyio.sleep(0.01)
                listed = await client.call_tool("list_agents", {})
        assert listed.structured_content == {
            "agents": [{"name": "writer", "description": "writes at length"}]
        }
        assert steps < 400  # stopped mid-way, not run to the end
