"""The sampler's batched hook path with the real grammar processor: several constrained rows are masked by one
`GrammarLogitsProcessor.apply_batch` per step and decode exactly as the same requests do one by one."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from inference.grammar import GrammarCompilerCache, GrammarLogitsProcessor, ToolSchema
from inference.params import SamplingParams
from inference.sampler import Sampler, SampleRequest

pytestmark = pytest.mark.smollm2

# bounded values only (no free strings or unbounded numbers), so that random decoding always ends
TOOLS = [
    ToolSchema("time__now", {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}}),
    ToolSchema(
        "calc__add",
        {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"],
        },
    ),
]


@pytest.fixture(scope="module")
def cache(smollm2_fp32: Any) -> GrammarCompilerCache:
    return GrammarCompilerCache(smollm2_fp32.tokenizer.hf, smollm2_fp32.config.vocab_size)


def test_batched_grammar_rows_decode_like_single_rows(
    cache: GrammarCompilerCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled, _ = cache.compile_actions(TOOLS, "required", max_parallel=2)
    vocab = cache.vocab_size
    stops = set(cache.stop_token_ids)
    # favour structural tokens so that random decoding finishes well within the step limit
    bias = torch.zeros(vocab)
    wanted = {b'"', b"}", b"]", b",", b"0", b"1", b" ", b"{", b"["}
    bias[[i for i, tok in enumerate(cache.info.decoded_vocab) if tok in wanted] + sorted(stops)] = 4.0
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0)]

    def run(batched: bool) -> tuple[list[list[int]], int]:
        procs = [GrammarLogitsProcessor(compiled, vocab, cache.stop_token_ids) for _ in params]
        reqs = [
            SampleRequest(
                SamplingParams(temperature=p.temperature, logits_processor=proc),
                [1],
                [],
                torch.Generator().manual_seed(i) if p.temperature else None,
            )
            for i, (p, proc) in enumerate(zip(params, procs, strict=True))
        ]
        calls = 0
        original = GrammarLogitsProcessor.apply_batch

        def counting(*args: object, **kwargs: object) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]  # counting takes objects: it passes apply_batch's own arguments through

        monkeypatch.setattr(GrammarLogitsProcessor, "apply_batch", staticmethod(counting))
        sampler = Sampler(seed=0)
        live = list(range(len(reqs)))
        gen = torch.Generator().manual_seed(99)
        for _step in range(200):
            if not live:
                break
            logits = torch.randn(len(reqs), vocab, generator=gen) + bias
            if batched:
                res = sampler(logits[live].clone(), [reqs[i] for i in live]).token_ids
            else:
                res = [sampler(logits[i : i + 1].clone(), [reqs[i]]).token_ids[0] for i in live]
            for i, tok in zip(list(live), res, strict=True):
                if tok in stops:
                    live.remove(i)
                else:
                    reqs[i].output_token_ids.append(tok)  # type: ignore[attr-defined]  # SampleRequest types it Sequence; these requests were given lists
        monkeypatch.setattr(GrammarLogitsProcessor, "apply_batch", original)
        assert not live, "random decoding did not finish: the test lost its power"
        assert all(p.stats.rejected_tokens == 0 for p in procs)
        return [list(r.output_token_ids) for r in reqs], calls

    batched, batch_calls = run(True)
    single, single_calls = run(False)
    assert batched == single
    assert batch_calls > 0 and single_calls == 0
    vocab_bytes = cache.info.decoded_vocab
    for ids in batched:
        json.loads(b"".join(vocab_bytes[i] for i in ids).decode("utf-8"))  # every reply is one JSON value


def test_a_broken_grammar_row_is_forced_to_stop_alone_and_in_a_batch(cache: GrammarCompilerCache) -> None:
    compiled, _ = cache.compile_actions(TOOLS, "required")
    vocab = cache.vocab_size
    stops = sorted(set(cache.stop_token_ids))
    letter = cache.info.decoded_vocab.index(
        b"a"
    )  # a reply must start with `{` or `[`: "a" breaks the grammar

    def make() -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(compiled, vocab, cache.stop_token_ids)

    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3))
    logits[:, stops[0]] = float("-inf")  # a masked stop token becomes finite (0): one of them must be certain
    broken, live = make(), make()
    reqs = [
        SampleRequest(SamplingParams(temperature=0, logits_processor=broken), [1], [letter], None),
        SampleRequest(SamplingParams(temperature=0, logits_processor=live), [1], [], None),
    ]
    for batch in ([reqs[0]], reqs):  # alone (__call__), then batched (apply_batch)
        x = logits[: len(batch)].clone()
        token = Sampler()(x, batch).token_ids[0]
        assert broken.broken and broken.stats.rejected_tokens == 1
        assert token in stops
        finite = torch.isfinite(x[0]).nonzero().flatten().tolist()
        assert finite == stops
        assert float(x[0, stops[0]]) == 0.0
        for s in stops[1:]:
            assert float(x[0, s]) == float(logits[0, s])  # the model's preference among stop tokens is kept
    assert not live.broken and live.stats.masked_steps == 1
