"""LLMEngine on a tiny real model: batching/preemption/prefix-cache/chunking invariance, stop rules, errors."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import KVBudgetError, RequestError
from inference.loader import load_model
from inference.params import SamplingParams
from tests.inference.test_hf_equivalence import build_tiny_model

NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder, "llama", seed=1)
    return load_model(str(folder), dtype="float32")


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


TARGET = prompt_ids(70, 0)


def test_same_tokens_alone_in_batch_chunked(tiny: Any) -> None:
    alone = LLMEngine(tiny, EngineConfig(num_blocks=128)).generate([TARGET], greedy())[0].token_ids
    rng = random.Random(5)
    batch = [prompt_ids(rng.randint(3, 200), 100 + i) for i in range(31)]
    batch.insert(13, TARGET)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24), ignore_eos=True) for _ in batch]
    params[13] = greedy()
    engine = LLMEngine(tiny, EngineConfig(num_blocks=600, max_num_batched_tokens=256))
    outs = engine.generate(batch, params)
    assert outs[13].token_ids == alone
    m = engine.metrics()
    assert m.batch_size_max > 16 and m.preemptions == 0
    assert [o.completion_tokens for o in outs] == [p.max_tokens for p in params]
    # chunked prefill: a 70-token prompt prefilled 16 tokens at a time
    chunked = LLMEngine(tiny, EngineConfig(num_blocks=128, max_num_batched_tokens=16))
    assert chunked.generate([TARGET], greedy())[0].token_ids == alone
    assert chunked.metrics().steps >= 5 + NEW - 1


def test_same_tokens_after_preemption(tiny: Any) -> None:
    alone = LLMEngine(tiny, EngineConfig(num_blocks=128)).generate([TARGET], greedy(40))[0].token_ids
    # 13 usable blocks of 16 tokens cannot hold four 110-token sequences at once
    engine = LLMEngine(tiny, EngineConfig(num_blocks=14, max_model_len=200))
    prompts = [TARGET, prompt_ids(70, 1), prompt_ids(70, 2), prompt_ids(70, 3)]
    outs = engine.generate(prompts, greedy(40))
    m = engine.metrics()
    assert m.preemptions > 0
    assert outs[0].token_ids == alone
    roomy = EngineConfig(num_blocks=128)
    for p, o in zip(prompts[1:], outs[1:], strict=True):
        assert o.token_ids == LLMEngine(tiny, roomy).generate([p], greedy(40))[0].token_ids
    assert engine.block_manager.num_free_blocks == 13


def test_same_tokens_with_prefix_cache_hit(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128))
    first = engine.generate([TARGET], greedy())[0]
    assert engine.metrics().prefix_cache_hit_tokens == 0
    second = engine.generate([TARGET], greedy())[0]
    m = engine.metrics()
    assert m.prefix_cache_hit_tokens == 64  # 4 full blocks; the 70th token is recomputed
    assert second.token_ids == first.token_ids
    # a different suffix after a shared prefix also hits, and matches a cold engine
    other = TARGET[:48] + prompt_ids(20, 9)
    warm = engine.generate([other], greedy())[0].token_ids
    assert engine.metrics().prefix_cache_hit_tokens == 64 + 48
    uncached = EngineConfig(num_blocks=128, enable_prefix_caching=False)
    cold = LLMEngine(tiny, uncached).generate([other], greedy())[0].token_ids
    assert warm == cold


def test_seeded_sampling_is_batch_independent(tiny: Any) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=NEW, seed=1234, ignore_eos=True)
    alone = LLMEngine(tiny, EngineConfig(num_blocks=128)).generate([TARGET], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=8, seed=i) for i in range(5)]
    outs = LLMEngine(tiny, EngineConfig(num_blocks=256)).generate(
        [prompt_ids(30, 50 + i) for i in range(5)] + [TARGET], [*others, params]
    )
    assert outs[-1].token_ids == alone
    unseeded = LLMEngine(tiny, EngineConfig(num_blocks=128)).generate([TARGET], greedy())[0].token_ids
    assert alone != unseeded


def test_stop_strings_and_stop_tokens(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128))
    full = engine.generate([TARGET], greedy(24))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    engine.add_request(
        "s", TARGET, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,))
    )
    streamed, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.delta_text
            last = out
    assert last is not None and last.finished and last.finish_reason == "stop"
    expected = full.text[: full.text.find(stop)]
    assert last.text == expected and streamed == expected
    # stop token ids end the output at (and including) the first occurrence
    tok = full.token_ids[5]
    out = engine.generate(
        [TARGET], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=(tok,))
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


def test_eos_stops_unless_ignored(tiny: Any) -> None:
    eos = tiny.tokenizer.eos_token_ids[0]

    def force_eos(_ids: Any, logits: Any) -> Any:
        logits[eos] = 1e9
        return logits

    engine = LLMEngine(tiny, EngineConfig(num_blocks=128))
    stopped = engine.generate(
        [TARGET], SamplingParams(temperature=0, max_tokens=8, logits_processor=force_eos)
    )[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == [eos]
    ignored = engine.generate(
        [TARGET], SamplingParams(temperature=0, max_tokens=8, logits_processor=force_eos, ignore_eos=True)
    )[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == [eos] * 8


def test_logprobs_and_deltas(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128))
    engine.add_request("lp", TARGET, SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True))
    deltas: list[int] = []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            deltas += out.delta_token_ids
            final = out
    assert final is not None and final.logprobs is not None and len(final.logprobs) == 6
    assert deltas == final.token_ids
    for tok, entry in zip(final.token_ids, final.logprobs, strict=True):
        assert entry["token_id"] == tok and entry["top"][0][0] == tok and entry["logprob"] <= 0


def test_bad_requests_fail_alone(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128, max_model_len=256))
    engine.add_request("good", TARGET, greedy(4))
    for prompt, params in [
        ("", greedy()),
        ([], greedy()),
        ([1] * 256, greedy()),
        ([10**6], greedy()),
        (TARGET, SamplingParams(max_tokens=0)),
        (TARGET, SamplingParams(top_p=2.0)),
        (TARGET, SamplingParams(logit_bias={10**6: 1.0})),  # an id outside the vocabulary
    ]:
        with pytest.raises(RequestError):
            engine.add_request(None, prompt, params)
    with pytest.raises(RequestError):
        engine.add_request("good", TARGET, greedy())
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == "good" and outs[-1].completion_tokens == 4


def test_length_capped_by_context(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128, max_model_len=80))
    out = engine.generate([TARGET], greedy(100))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 80 - len(TARGET)


def test_abort_frees_blocks(tiny: Any) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=80))
    free0 = engine.block_manager.num_free_blocks
    engine.add_request("a", TARGET, greedy(50))
    engine.add_request("b", prompt_ids(40, 3), greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < free0
    assert engine.abort("a") and engine.abort("b") and not engine.abort("missing")
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"} and all(o.finish_reason == "abort" for o in outs)
    assert engine.block_manager.num_free_blocks == free0 and not engine.has_unfinished()


def test_kv_budget_error(tiny: Any) -> None:
    with pytest.raises(KVBudgetError) as info:
        LLMEngine(tiny, EngineConfig(kv_cache_memory=4096, max_model_len=1024))
    assert info.value.hint
    # a fraction of free memory works
    engine = LLMEngine(tiny, EngineConfig(kv_cache_memory=0.001, max_model_len=256))
    assert engine.block_manager.num_usable_blocks >= 16


def test_attention_backend_choice_and_its_errors(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.attention_backends import AttentionBackendError

    engine = LLMEngine(tiny, EngineConfig(num_blocks=96, attention_backend="reference"))
    assert engine.runner.attention.name == "reference"
    assert engine.runner.attention.layer_ops.name == "eager"
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'flash'") as info:
        LLMEngine(tiny, EngineConfig(num_blocks=96, attention_backend="flash"))
    assert info.value.user_facing and "reference" in (info.value.hint or "")
    if not torch.cuda.is_available():  # Triton on the CPU only runs under the interpreter, for tests
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        from inference import attention_backends

        attention_backends._resolve.cache_clear()
        try:
            with pytest.raises(AttentionBackendError, match="does not run on cpu"):
                LLMEngine(tiny, EngineConfig(num_blocks=96, attention_backend="triton"))
        finally:
            attention_backends._resolve.cache_clear()
