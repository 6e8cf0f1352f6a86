"""An agent's `resources` reach the model's prompt and its `prompt` seeds the conversation: a real runtime with
our resources server, the real loop, and a backend that records what the model is shown (not a model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent_runtime.agents.context import ContextError
from agent_runtime.agents.host import AgentHost
from agent_runtime.agents.llm import GenerationRequest
from agent_runtime.tools.runtime import Runtime
from tests.agent_runtime.agent_fixtures import ScriptedBackend, write_config
from tests.conftest import EXAMPLES, PYTHON

pytestmark = pytest.mark.anyio

NO_EXAMPLES = {"examples": [], "learn_examples": False}  # no worked-example turns around the conversation
SERVER = {"command": PYTHON, "args": [str(EXAMPLES / "servers" / "resources_server.py"), "--legacy"]}


def _system(request: GenerationRequest) -> str:
    return str(request.messages[0]["content"])


def _turns(request: GenerationRequest) -> list[tuple[str, str]]:
    return [(m["role"], str(m["content"])) for m in request.messages[1:]]


async def test_resources_reach_the_system_prompt_and_the_prompt_seeds_the_conversation(
    tmp_path: Path,
) -> None:
    agents: dict[str, Any] = {
        "reader": {
            **NO_EXAMPLES,
            "tools": ["notes__*"],
            "resources": ["note://1", {"uri": "note://blob", "server": "notes"}],
            "prompt": {"name": "greet", "arguments": {"name": "Ada", "style": "formal"}},
        },
        "plain": {**NO_EXAMPLES, "tools": ["notes__*"]},
    }
    path = write_config(tmp_path, {"notes": SERVER}, agents, policies={"audit_path": "audit.jsonl"})
    backend = ScriptedBackend()
    async with Runtime.from_config(path) as rt, AgentHost(rt, backend=backend) as host:  # type: ignore[arg-type]  # a recording backend
        session = host.agent("reader").session()
        first = await session.send("Say hello.")
        assert first.answer == "done 1"
        system = _system(backend.requests[0])
        assert '<resource uri="note://1">\nnote 1: the launch code is 1111\n</resource>' in system
        assert "[binary note://blob, application/octet-stream, 256 bytes]" in system
        assert _turns(backend.requests[0]) == [
            ("user", "Write a formal greeting for Ada."),
            ("assistant", '{"answer": "Of course."}'),  # the JSON protocol shows assistant turns as answers
            ("user", "Say hello."),
        ]
        await session.send("Again.")  # the prompt opens the conversation once, not every turn
        later = _turns(backend.requests[1])
        assert later[:2] == _turns(backend.requests[0])[:2]
        assert later.count(("user", "Write a formal greeting for Ada.")) == 1 and later[-1] == (
            "user",
            "Again.",
        )

        await host.agent("plain").run("Say hello.")  # without the keys: the config's system prompt as is
        plain = backend.requests[2]
        assert "<resource" not in _system(plain) and _turns(plain) == [("user", "Say hello.")]
        rt.executor.audit.flush()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    reads = [(r["tool"], r["agent"]) for r in records if r["event"] == "call"]
    assert reads[:3] == [
        ("resources/read", "reader"),
        ("resources/read", "reader"),
        ("prompts/get", "reader"),
    ]


async def test_context_is_bounded_and_failures_are_typed(tmp_path: Path) -> None:
    big = {"command": PYTHON, "args": [*SERVER["args"], "--big-bytes", "50000"]}
    agents: dict[str, Any] = {
        "bounded": {
            "tools": ["notes__*"],
            "resources": ["note://big", "note://1"],
            "resources_max_chars": 1000,
        },
        "missing": {"tools": ["notes__*"], "resources": ["note://404"]},
        "bad_prompt": {"tools": ["notes__*"], "prompt": {"name": "greet", "arguments": {"who": "x"}}},
    }
    backend = ScriptedBackend()
    path = write_config(tmp_path, {"notes": big}, agents)
    async with Runtime.from_config(path) as rt, AgentHost(rt, backend=backend) as host:  # type: ignore[arg-type]  # a recording backend
        await host.agent("bounded").run("Go.")
        system = _system(backend.requests[0])
        assert "x" * 1000 + "\n[truncated: the agent's resources_max_chars was reached]" in system
        assert "x" * 1001 not in system
        assert '<resource uri="note://1">[truncated' in system  # nothing left for the second one
        with pytest.raises(ContextError, match="resource 'note://404' could not be read"):
            await host.agent("missing").run("Go.")
        with pytest.raises(ContextError, match=r"unknown argument\(s\) who"):
            await host.agent("bad_prompt").run("Go.")
        assert len(backend.requests) == 1  # neither failed run reached the model
