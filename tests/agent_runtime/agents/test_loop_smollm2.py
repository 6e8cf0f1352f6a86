"""The agent loop on the real engine with the packaged SmolLM2 (fp32, greedy) and real MCP servers over stdio."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from pydantic import Field

from agent_runtime import AgentHost, ConfigError, LocalEngineBackend, Runtime
from agent_runtime.agents.events import RunFinished, ToolCallRecord
from agent_runtime.config.agents import AgentConfig
from tests.agent_runtime.agent_fixtures import faulty_server, time_agent, time_server, write_config

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(smollm2_fp32: Any) -> Iterator[Any]:
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig
    from inference.engine import LLMEngine

    eng = AsyncEngine(LLMEngine(smollm2_fp32, EngineConfig(max_num_seqs=32)))
    yield eng
    eng.close()


def _host(rt: Runtime, engine: Any) -> AgentHost:
    """The runtime's agents on the module's engine (shared, not owned: the host leaves it running)."""
    return AgentHost(rt, backend=LocalEngineBackend(engine, owns_engine=False))


@pytest.mark.anyio
async def test_tokyo_calls_get_current_time_and_answers_from_the_result(tmp_path: Path, engine: Any) -> None:
    cfg = write_config(tmp_path, {"time": time_server()}, {"default": time_agent()})
    async with Runtime.from_config(cfg) as rt:
        result = await _host(rt, engine).agent("default").run("What time is it in Tokyo?")
    assert result.ok, result.to_dict()
    calls = result.tool_calls
    assert calls[0].name == "time__get_current_time" and calls[0].server == "time"
    assert calls[0].arguments == {"timezone": "Asia/Tokyo"}
    assert calls[0].outcome == "result"
    returned = re.search(r"datetime: (\S+)", calls[0].observation)  # a guided run shows JSON as lines
    assert returned is not None
    assert returned.group(1) == "2026-03-14T14:26:53+09:00"  # the test server's frozen clock, in Tokyo
    assert returned.group(1) in result.answer or "14:26" in result.answer, (result.answer, returned.group(1))
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage.steps == 2 and result.usage.tool_calls == 1


# Eight agents batch as sixteen did, for half the sequential reference runs (the test's cost). Here the model's
# Toronto call is a tool error (it asks for Canada/Toronto) and its Dubai reply runs to max_tokens: the batch mixes
# both kinds of step with plain calls.
CITIES = ["Tokyo", "London", "Sydney", "Cairo", "Toronto", "Dubai", "Singapore", "Seoul"]


@pytest.mark.anyio
async def test_eight_agents_at_once_equal_one_by_one_and_batch(tmp_path: Path, engine: Any) -> None:
    # One step each (the tool call) keeps the sequential runs short.
    cfg = write_config(tmp_path, {"time": time_server()}, {"default": time_agent(max_steps=1, max_tokens=40)})
    async with Runtime.from_config(cfg) as rt:
        host = _host(rt, engine)
        agent = host.agent("default")
        tasks = [f"What time is it in {c}?" for c in CITIES]
        sequential = [await agent.run(t) for t in tasks]
        before = engine.metrics().steps
        concurrent: list[Any] = [None] * len(tasks)

        async def one(i: int) -> None:
            concurrent[i] = await host.agent("default").run(tasks[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(tasks)):
                tg.start_soon(one, i)
        metrics = engine.metrics()
    for seq, conc in zip(sequential, concurrent, strict=True):
        assert conc.stop_reason == "max_steps"
        assert [s.model_text for s in conc.steps] == [s.model_text for s in seq.steps]
        assert [(c.name, c.arguments) for c in conc.tool_calls] == [
            (c.name, c.arguments) for c in seq.tool_calls
        ]
    assert metrics.batch_size_max >= len(tasks) // 2, metrics.batch_size_max
    concurrent_steps = metrics.steps - before
    sequential_tokens = sum(r.usage.completion_tokens for r in sequential)
    assert concurrent_steps < sequential_tokens / 2, (concurrent_steps, sequential_tokens)


def _results(result: Any) -> list[ToolCallRecord]:
    return [c for c in result.tool_calls]


async def _forced_run(rt: Runtime, engine: Any, tool: str, **overrides: Any) -> Any:
    host = _host(rt, engine)
    host.agents["forced"] = AgentConfig(
        name="forced", tools=["faulty__*"], tool_choice=tool, max_steps=2, max_tokens=48, **overrides
    )
    return await host.agent("forced").run(f"Use the {tool} tool.")


@pytest.mark.anyio
async def test_faults_reach_the_model_as_observations(tmp_path: Path, engine: Any) -> None:
    cfg = write_config(
        tmp_path,
        {"faulty": faulty_server()},
        policies={
            "deny": ["*delete*"],
            "breaker": {"minimum_calls": 1, "window_size": 2, "open_seconds": 30},
        },
    )
    async with Runtime.from_config(cfg) as rt:
        cases = {
            "faulty__fail": ("tool_error", {}),
            "faulty__delete": ("denied", {}),
            "faulty__hang": ("timeout", {"tool_timeout_secs": 1.0}),
            "faulty__echo": ("breaker_open", {}),  # the hang above opened the server's breaker
        }
        for tool, (kind, extra) in cases.items():
            result = await _forced_run(rt, engine, tool, **extra)
            first = result.tool_calls[0]
            assert first.name == tool and first.outcome == kind, (tool, first)
            assert first.is_error and first.observation.startswith("Error:")
            # The model's next turn saw it: the observation is in the transcript it was prompted with.
            tool_msgs = [m for m in result.messages if m["role"] == "tool"]
            assert tool_msgs[0]["content"] == first.observation
            assert len(result.steps) == 2  # the loop went on after the fault


@pytest.mark.anyio
async def test_server_down_mid_call_is_an_observation(tmp_path: Path, engine: Any) -> None:
    cfg = write_config(tmp_path, {"faulty": faulty_server()})
    async with Runtime.from_config(cfg) as rt:
        result = await _forced_run(rt, engine, "faulty__crash")
    first = result.tool_calls[0]
    assert first.outcome == "transport_failure", first
    assert first.is_error and "could not be reached" in first.observation


@pytest.mark.anyio
async def test_stuck_model_stops_at_max_tool_calls(tmp_path: Path, engine: Any) -> None:
    agents = {"stuck": time_agent(tool_choice="required", max_tool_calls=3, max_steps=10, max_tokens=40)}
    cfg = write_config(tmp_path, {"time": time_server()}, agents)
    async with Runtime.from_config(cfg) as rt:
        events = [e async for e in _host(rt, engine).agent("stuck").stream("What time is it in Tokyo?")]
    result = events[-1].result
    assert isinstance(events[-1], RunFinished)
    assert result.outcome == "stopped" and result.stop_reason == "max_tool_calls"
    assert len(result.tool_calls) == 3 and result.answer is None
    assert [e.type for e in events if e.type == "stopped"] == ["stopped"]
    assert result.messages[0] == {"role": "user", "content": "What time is it in Tokyo?"}


@pytest.mark.anyio
async def test_local_python_tool_next_to_mcp_tools(tmp_path: Path, engine: Any) -> None:
    seen: list[tuple[int, int]] = []

    def add(
        a: Annotated[int, Field(description="first number")],
        b: Annotated[int, Field(description="second number")],
    ) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    agents = {"calc": {"tools": ["add", "time__*"], "tool_choice": "add", "max_steps": 2, "max_tokens": 40}}
    cfg = write_config(tmp_path, {"time": time_server()}, agents)
    async with Runtime.from_config(cfg) as rt:
        rt.register_tool(add)
        result = await _host(rt, engine).agent("calc").run("What is 2 plus 3?")
    call = result.tool_calls[0]
    assert call.name == "add" and call.server is None and call.outcome == "result"
    assert seen == [(call.arguments["a"], call.arguments["b"])]
    assert call.observation == str(sum(seen[0]))


@pytest.mark.anyio
async def test_session_keeps_history(tmp_path: Path, engine: Any) -> None:
    cfg = write_config(tmp_path, {"time": time_server()}, {"default": time_agent(max_tokens=60)})
    async with Runtime.from_config(cfg) as rt:
        session = _host(rt, engine).agent("default").session()
        first = await session.send("What time is it in Tokyo?")
        second = await session.send("And in Paris?")
    assert first.ok
    # The second turn's transcript starts with the whole first turn.
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[len(first.messages)] == {"role": "user", "content": "And in Paris?"}


@pytest.mark.anyio
async def test_config_errors_for_agents(tmp_path: Path, engine: Any) -> None:
    bad2 = write_config(tmp_path, {"time": time_server()}, {"a": {"max_steps": 0}})
    with pytest.raises(ConfigError, match=r"agents\.a\.max_steps"):
        AgentHost(Runtime.from_config(bad2))
    bad3 = write_config(tmp_path, {"time": time_server()}, {"a": {"tools": []}})
    with pytest.raises(ConfigError, match="at least one tool glob"):
        AgentHost(Runtime.from_config(bad3))
    unknown = write_config(tmp_path, {"time": time_server()}, {"a": {"tools": ["time__*", "nosuch__*"]}})
    async with Runtime.from_config(unknown) as rt:
        host = _host(rt, engine)
        with pytest.raises(ConfigError, match=r"agents\.a\.tools\[1\].*'nosuch__\*' matches no tool"):
            host.agent("a")
        with pytest.raises(Exception, match="no agent named 'b'"):
            host.agent("b")


def test_copy_bias_lifts_the_word_tokens_of_a_result(engine: Any) -> None:
    backend = LocalEngineBackend(engine, owns_engine=False)
    text = "item,category,amount\nMonitor,hardware,329.50"
    bias = backend._copy_bias(text, 2.0)
    assert bias is not None and set(bias.values()) == {2.0}
    decoded = {engine.tokenizer.decode([t]) for t in bias}
    assert any("Monitor" in d for d in decoded) and any("3" in d for d in decoded)
    assert not any(d.strip() in {",", ".", ""} for d in decoded)  # punctuation and spaces stay the model's
    assert backend._copy_bias(text, 0.0) is None and backend._copy_bias("", 2.0) is None
    focused = backend._copy_bias(text, 1.0, focus="329.50")
    assert focused is not None
    doubled = {engine.tokenizer.decode([t]) for t, b in focused.items() if b == 2.0}
    assert doubled and all(d.strip() and d.strip() in "329.50" for d in doubled)
    assert any("Monitor" in engine.tokenizer.decode([t]) for t, b in focused.items() if b == 1.0)
