"""The agent loop streams a server's progress reports as `tool_progress` events while the tool runs, and a run
abandoned mid-call cancels the call on the server. The model is a scripted backend (the loop, the runtime and
the notify server are real): what is under test is the loop's handling of a running call, not a model."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

from agent_runtime.agents.events import RunFinished, ToolCallFinished, ToolCallProgress
from agent_runtime.agents.host import AgentHost
from agent_runtime.tools.runtime import Runtime
from tests.agent_runtime.agent_fixtures import ScriptedBackend
from tests.agent_runtime.tools.test_notices import notify_config
from tests.transports.test_cancellation import marked

pytestmark = pytest.mark.anyio


async def test_progress_events_stream_while_the_tool_runs() -> None:
    call = {"tool": "notify__progress", "arguments": {"steps": 3, "delay": 0.05}}
    backend = ScriptedBackend([call, {"answer": "done 3"}])
    async with Runtime(notify_config()) as rt, AgentHost(rt, backend=backend) as host:
        events = [e async for e in host.agent().stream("report progress")]
    kinds = [e.type for e in events]
    progress = [e for e in events if isinstance(e, ToolCallProgress)]
    assert [(p.progress, p.total, p.message) for p in progress] == [
        (1.0, 3.0, "step 1 of 3"),
        (2.0, 3.0, "step 2 of 3"),
        (3.0, 3.0, "step 3 of 3"),
    ]
    assert {(p.step, p.call_id, p.name, p.server) for p in progress} == {
        (1, "call_1_0", "notify__progress", "notify")
    }
    # Between the call's start and its result, in order.
    assert kinds.index("tool_call") < kinds.index("tool_progress") < kinds.index("tool_result")
    assert progress[0].to_dict()["type"] == "tool_progress"
    final = events[-1]
    assert isinstance(final, RunFinished) and final.result.answer == "done 3"


async def test_a_run_cancelled_mid_call_cancels_the_call_on_the_server(tmp_path: Path) -> None:
    marker = tmp_path / "slow.txt"
    call = {"tool": "notify__slow", "arguments": {"seconds": 30, "marker": str(marker)}}
    async with Runtime(notify_config()) as rt, AgentHost(rt, backend=ScriptedBackend([call])) as host:

        async def read_events() -> None:
            async with aclosing(host.agent().stream("sleep")) as events:
                async for event in events:
                    assert not isinstance(event, ToolCallFinished)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_events)
            await marked(marker, "started")
            tg.cancel_scope.cancel()  # the caller goes away (Ctrl-C, a client that disconnected)
        await marked(marker, "cancelled")
        assert rt.health()[0].in_flight == 0


async def test_a_reader_that_stops_reading_mid_call_ends_the_call() -> None:
    call = {"tool": "notify__progress", "arguments": {"steps": 100, "delay": 0.1}}
    async with Runtime(notify_config()) as rt, AgentHost(rt, backend=ScriptedBackend([call])) as host:
        with anyio.fail_after(5):  # the call would take 10 s: closing the stream must end it at once
            async with aclosing(host.agent().stream("progress")) as events:
                async for event in events:
                    if isinstance(event, ToolCallProgress):
                        break
        assert rt.health()[0].in_flight == 0
