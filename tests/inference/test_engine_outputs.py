"""RequestOutput kinds on SmolLM2's real tokenizer: DELTA and FINAL_ONLY outputs add up to exactly what CUMULATIVE
outputs carry (multi-byte characters, stop strings, logprobs), finals carry the totals, and aborted or failed
requests still end with a final output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import LLMEngine, RequestOutput
from inference.errors import RequestError
from inference.loader import load_model
from inference.params import OutputKind, SamplingParams

# A dummy model with SmolLM2's vocabulary: the loader gives it SmolLM2's tokenizer, and a logits processor makes
# it "generate" the tokens of TEXT, so the outputs hold real multi-byte text.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
TEXT = "Hi 👋 there 🌍! 你好，世界。東京の天気 — “quotes” STOP ünïcödé\n\n### the end 🧑‍💻 and more words"
PROMPT = [17, 250, 3000, 42, 9]
KINDS = list(OutputKind)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("smol-vocab")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return load_model(str(folder / "config.json"), load_format="dummy", dtype="float32")


@pytest.fixture(scope="module")
def script(smol: Any) -> list[int]:
    ids = smol.tokenizer.encode(TEXT)
    assert smol.tokenizer.decode(ids) == TEXT
    # the test means something only if some tokens are parts of characters
    assert any("\ufffd" in smol.tokenizer.decode([i]) for i in ids)
    return ids


class Scripted:
    """Forces the next token of a script (greedy then picks it)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, output_token_ids: Any, logits: torch.Tensor) -> torch.Tensor:
        logits.fill_(-1e9)
        logits[self.ids[len(output_token_ids) % len(self.ids)]] = 0.0
        return logits


def params(script: list[int], kind: OutputKind, **kw: Any) -> SamplingParams:
    base: dict[str, Any] = {"temperature": 0.0, "max_tokens": len(script), "ignore_eos": True}
    base.update(kw)
    return SamplingParams(**base, logits_processor=Scripted(script), output_kind=kind)


def run_all(engine: LLMEngine, requests: dict[str, SamplingParams]) -> dict[str, list[RequestOutput]]:
    for rid, p in requests.items():
        engine.add_request(rid, PROMPT, p)
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def check_kinds(outs: dict[str, list[RequestOutput]], want_text: str, want_reason: str) -> None:
    """`outs` holds one request per kind, all given the same script and stop rules."""
    cum, delta, final = outs["cumulative"], outs["delta"], outs["final_only"]
    # CUMULATIVE: every output's totals are its deltas so far
    text, ids, lps = "", [], []
    for out in cum:
        text += out.delta_text
        ids += out.delta_token_ids
        lps += out.delta_logprobs or []
        assert out.text == text and out.token_ids == ids and out.completion_tokens == len(ids)
        assert (out.logprobs or []) == lps
    last = cum[-1]
    assert last.finished and last.finish_reason == want_reason and last.text == want_text
    # DELTA: the same deltas, step by step; totals only on the final output
    assert [(o.delta_text, o.delta_token_ids, o.delta_logprobs) for o in delta] == [
        (o.delta_text, o.delta_token_ids, o.delta_logprobs) for o in cum
    ]
    for out in delta[:-1]:
        assert not out.finished and out.text == "" and out.token_ids == [] and out.logprobs is None
    assert [o.completion_tokens for o in delta] == [o.completion_tokens for o in cum]
    end = delta[-1]
    assert end.finished and (end.text, end.token_ids, end.logprobs, end.finish_reason) == (
        last.text,
        last.token_ids,
        last.logprobs,
        last.finish_reason,
    )
    # FINAL_ONLY: one output, whose delta is everything
    assert len(final) == 1
    only = final[0]
    assert only.finished and (only.text, only.token_ids, only.logprobs, only.finish_reason) == (
        last.text,
        last.token_ids,
        last.logprobs,
        last.finish_reason,
    )
    assert only.delta_text == only.text and only.delta_token_ids == only.token_ids
    assert only.delta_logprobs == only.logprobs
    assert only.prompt_tokens == last.prompt_tokens == len(PROMPT)
    assert only.completion_tokens == last.completion_tokens == len(last.token_ids)


@pytest.mark.parametrize(
    ("stop", "logprobs"),
    [
        ((), None),
        (("世界",), None),  # a multi-byte stop string
        (("\n\n###", "STOP ü"), 2),  # the earliest of two, logprobs along
        (("STOPX", "🧑‍💻 and"), None),  # a near miss held back, then a multi-codepoint emoji sequence
        (("never there",), 1),  # held-back text that never turns out to be a stop string
    ],
)
def test_every_kind_adds_up_to_the_same_text(
    smol: Any, script: list[int], stop: tuple[str, ...], logprobs: int | None
) -> None:
    engine = LLMEngine(smol, EngineConfig(num_blocks=64))
    outs = run_all(engine, {k.value: params(script, k, stop=stop, logprobs=logprobs) for k in KINDS})
    hits = [TEXT.find(s) for s in stop if s in TEXT]
    want = TEXT[: min(hits)] if hits else TEXT
    check_kinds(outs, want, "stop" if hits else "length")
    if not hits:
        assert outs["cumulative"][-1].token_ids == script
    if logprobs is not None:
        entries = outs["final_only"][0].logprobs
        assert entries is not None and [e["token_id"] for e in entries] == outs["final_only"][0].token_ids


def test_output_kind_is_validated_and_accepts_its_name(smol: Any, script: list[int]) -> None:
    p = SamplingParams(output_kind="delta")  # type: ignore[arg-type]  # on purpose: validate() accepts an OutputKind's name
    p.validate()
    assert p.output_kind is OutputKind.DELTA
    with pytest.raises(RequestError, match="output_kind"):
        SamplingParams(output_kind="deltas").validate()  # type: ignore[arg-type]  # on purpose: an unknown name must be refused


def test_generate_returns_totals_whatever_the_kind(smol: Any, script: list[int]) -> None:
    engine = LLMEngine(smol, EngineConfig(num_blocks=64))
    got = engine.generate([PROMPT] * 3, [params(script, k) for k in KINDS])
    assert [o.text for o in got] == [TEXT] * 3 and [o.token_ids for o in got] == [script] * 3


def test_aborted_requests_end_with_their_totals(smol: Any, script: list[int]) -> None:
    engine = LLMEngine(smol, EngineConfig(num_blocks=64))
    kinds = {k.value: params(script, k, stop=("never there",)) for k in KINDS}
    for rid, p in kinds.items():
        engine.add_request(rid, PROMPT, p)
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in kinds}
    for _ in range(9):
        for out in engine.step():
            outs[out.request_id].append(out)
    for rid in kinds:
        assert engine.abort(rid)
    for out in engine.step():
        outs[out.request_id].append(out)
    assert not engine.has_unfinished()
    check_kinds(outs, outs["cumulative"][-1].text, "abort")
    final = outs["final_only"][0]
    assert final.token_ids == script[:9] and final.text == TEXT[: len(final.text)]
    assert "".join(o.delta_text for o in outs["delta"]) == final.text


@pytest.mark.anyio
async def test_a_failed_step_ends_every_stream_with_a_final_output(smol: Any, script: list[int]) -> None:
    engine = LLMEngine(smol, EngineConfig(num_blocks=64))
    run = engine.runner.run
    calls = 0

    def flaky(items: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise RuntimeError("device fell over")
        return run(items)

    engine.runner.run = flaky  # type: ignore[method-assign]  # on purpose: a runner step that fails once, for this engine only
    got: dict[str, list[RequestOutput]] = {}

    async def consume(kind: OutputKind) -> None:
        got[kind.value] = [o async for o in eng.generate(PROMPT, params(script, kind), request_id=kind.value)]

    async with AsyncEngine(engine) as eng:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for kind in KINDS:
                    tg.start_soon(consume, kind)
    for kind in KINDS:
        outs = got[kind.value]
        assert outs and outs[-1].finished and outs[-1].finish_reason == "error"
        assert sum(o.finished for o in outs) == 1
    delta, final = got["delta"], got["final_only"]
    assert len(final) == 1
    assert "".join(o.delta_text for o in delta) == delta[-1].text == final[0].text
    assert [t for o in delta for t in o.delta_token_ids] == delta[-1].token_ids == final[0].token_ids
