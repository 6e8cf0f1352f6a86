"""A server's sampling request answered by our own engine through AgentHost (packaged SmolLM2, fp32, greedy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_runtime import AgentHost, LocalEngineBackend, Runtime
from agent_runtime.agents.llm import GenerationRequest
from policies.audit import AuditRecord
from tests.conftest import EXAMPLES, PYTHON

pytestmark = [pytest.mark.smollm2, pytest.mark.slow, pytest.mark.anyio]

SERVER = str(EXAMPLES / "servers" / "client_features_server.py")


@pytest.fixture(scope="module")
def engine(smollm2_fp32: Any) -> Iterator[Any]:
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig
    from inference.engine import LLMEngine

    eng = AsyncEngine(LLMEngine(smollm2_fp32, EngineConfig(max_num_seqs=8)))
    yield eng
    eng.close()


def write_config(tmp_path: Path, sampling: dict[str, Any]) -> Path:
    doc = {"mcpServers": {"cf": {"command": PYTHON, "args": [SERVER], "sampling": sampling}}}
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    return path


async def test_a_server_samples_our_engine_with_the_chat_template(tmp_path: Path, engine: Any) -> None:
    backend = LocalEngineBackend(engine, owns_engine=False)
    async with Runtime.from_config(write_config(tmp_path, {"allow": True, "max_tokens": 12})) as rt:
        records: list[AuditRecord] = []
        rt.executor.audit.listeners.append(records.append)
        async with AgentHost(rt, backend=backend) as host:
            assert rt.sampler is not None  # the host installed its engine
            text = "The quick brown fox jumps over the lazy dog, then sleeps all afternoon in the sun."
            result = await rt.call_tool("cf__summarize", {"text": text, "max_tokens": 200})
            reply = json.loads(result.content[0].text)  # type: ignore[union-attr]  # the tool answers in a text block

            # The same prompt through the backend directly (greedy): the server got exactly the model's answer.
            expected = ""
            request = GenerationRequest(
                messages=[
                    {"role": "system", "content": "You write one-line summaries."},
                    {"role": "user", "content": f"Summarize in one line: {text}"},
                ],
                max_tokens=12,  # the policy's cap, not the 200 the server asked for
            )
            async for chunk in backend.generate(request):
                expected = chunk.text
                finish = chunk.finish_reason

            # A stop sequence from the middle of that answer ends it there.
            stop = expected.split()[len(expected.split()) // 2]
            args = {"text": text, "max_tokens": 200, "stop": [stop]}
            cut = json.loads((await rt.call_tool("cf__summarize", args)).content[0].text)  # type: ignore[union-attr]  # a text block
        assert rt.sampler is None  # removed with the host: its engine is gone
    assert reply["text"] == expected and expected.strip()
    assert reply["model"] == host.model.source
    assert reply["stop_reason"] == ("maxTokens" if finish == "length" else "endTurn")
    assert cut["text"] == expected[: expected.index(stop)] and cut["stop_reason"] == "stopSequence"
    record, _stopped = [r for r in records if r.event == "sampling"]
    assert record.decision == "allow" and record.outcome == "result"
    assert record.tokens is not None and 0 < record.tokens <= 12
