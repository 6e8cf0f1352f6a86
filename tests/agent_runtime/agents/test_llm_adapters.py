"""The local backend runs an agent's model turns under its LoRA adapter (`GenerationRequest.adapter`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from agent_runtime.agents.llm import GenerationChunk, GenerationRequest, LocalEngineBackend
from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import UnknownAdapterError
from inference.loader import load_model
from inference.params import SamplingParams
from tests.inference.test_lora import make_adapter
from tests.inference.test_models import _hf_model, save_tiny_tokenizer

pytest.importorskip("peft")
pytestmark = pytest.mark.anyio

SETTINGS = EngineConfig(block_size=4, max_model_len=64, num_blocks=128)
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


async def test_backend_generates_under_the_requests_adapter(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(str(tmp_path / "base"))
    save_tiny_tokenizer(tmp_path / "base")
    tok_config = tmp_path / "base" / "tokenizer_config.json"
    raw = json.loads(tok_config.read_text())
    raw["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok_config.write_text(json.dumps(raw))
    make_adapter("llama", tmp_path / "tools", 5, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    loaded = load_model(tmp_path / "base", dtype=torch.float32)
    sync = LLMEngine(loaded, SETTINGS, adapters={"tools": tmp_path / "tools"})
    ids = sync.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = {
        a: sync.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, adapter=a))[0].text
        for a in ("tools", None)
    }
    assert expected["tools"] != expected[None]
    engine = AsyncEngine(LLMEngine(loaded, SETTINGS, adapters={"tools": tmp_path / "tools"}))
    backend = LocalEngineBackend(engine)
    try:
        for adapter in ("tools", None):
            request = GenerationRequest(MESSAGES, max_tokens=8, adapter=adapter)
            chunks = [c async for c in backend.generate(request)]
            assert chunks[-1].finished and chunks[-1].text == expected[adapter]
        with pytest.raises(UnknownAdapterError, match="'sql'"):
            async for _ in backend.generate(GenerationRequest(MESSAGES, max_tokens=8, adapter="sql")):
                pass
    finally:
        await backend.aclose()


class _Scripted:
    """Replies with one scripted continuation per stage and records each request (not a model)."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        text = self.replies[len(self.requests) - 1]
        yield GenerationChunk(text, text, True, "stop")


async def test_both_stages_of_a_guided_turn_run_under_the_agents_adapter() -> None:
    from agent_runtime.agents.grounding import GroundingContext
    from agent_runtime.agents.guided import guided_turn
    from inference.formats import ToolSpec

    tool = ToolSpec("t__echo", "Echo a text.", {"type": "object", "properties": {}}, "t", True)
    backend = _Scripted(['tool": "t__echo"', "{}}"])
    base = GenerationRequest(MESSAGES, max_tokens=8, adapter="tools")
    turn = guided_turn(
        backend,  # type: ignore[arg-type]  # scripted: only generate() is used
        base,
        [tool],
        ["t__echo"],
        GroundingContext(),
        allow_answer=False,
        deadline=time.monotonic() + 30,
    )
    last = [p async for p in turn][-1]
    assert json.loads(last.text) == {"tool": "t__echo", "arguments": {}}
    assert [r.adapter for r in backend.requests] == ["tools", "tools"]  # the decision and the arguments
