"""Sampler: greedy fast path, penalties, truncation, per-request seeds independent of the batch, logprobs."""

from __future__ import annotations

import pytest
import torch

from inference.errors import RequestError
from inference.params import SamplingParams
from inference.sampler import Sampler, SampleRequest

V = 50


def req(params: SamplingParams, prompt=(1, 2), out=(), seed: int | None = None) -> SampleRequest:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return SampleRequest(params, list(prompt), list(out), gen)


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed))


def test_all_greedy_is_argmax() -> None:
    logits = logits_rows(5)
    res = Sampler()(logits, [req(SamplingParams(temperature=0)) for _ in range(5)])
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs == [None] * 5


def test_seeded_sampling_is_independent_of_batch() -> None:
    logits = logits_rows(4, seed=3)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=30, seed=7)
    alone = [Sampler()(logits[2:3], [req(params, seed=7)]).token_ids[0] for _ in range(1)]
    batch_reqs = [req(SamplingParams(temperature=1.0), seed=i) for i in range(4)]
    batch_reqs[2] = req(params, seed=7)
    in_batch = Sampler()(logits, batch_reqs).token_ids[2]
    assert alone[0] == in_batch
    # a sequence of draws with the same seed repeats
    g1 = req(params, seed=11)
    g2 = req(params, seed=11)
    seq1 = [Sampler()(logits[:1], [g1]).token_ids[0] for _ in range(20)]
    seq2 = [Sampler()(logits[:1], [g2]).token_ids[0] for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = logits_rows(1, seed=5)
    best = int(logits[0].argmax())
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        got = {Sampler()(logits.clone(), [req(params, seed=s)]).token_ids[0] for s in range(10)}
        assert got == {best}


def test_min_p_excludes_unlikely_tokens() -> None:
    logits = torch.full((1, V), -10.0)
    logits[0, 3] = 5.0
    logits[0, 4] = 4.5
    params = SamplingParams(temperature=1.0, min_p=0.5)
    got = {Sampler()(logits.clone(), [req(params, seed=s)]).token_ids[0] for s in range(40)}
    assert got == {3, 4}


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 2.0  # seen in the prompt
    logits[0, 9] = 1.5
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(logits.clone(), [req(params, prompt=(2,))]).token_ids == [9]
    assert Sampler()(logits.clone(), [req(SamplingParams(temperature=0))]).token_ids == [2]


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.8
    params = SamplingParams(temperature=0, frequency_penalty=0.15)
    # one earlier 5: 1.0 - 0.15 > 0.8 ; two earlier 5s: 0.7 < 0.8
    assert Sampler()(logits.clone(), [req(params, out=(5,))]).token_ids == [5]
    assert Sampler()(logits.clone(), [req(params, out=(5, 5))]).token_ids == [6]
    params = SamplingParams(temperature=0, presence_penalty=0.3)
    assert Sampler()(logits.clone(), [req(params, out=(5,))]).token_ids == [6]


def test_logits_processor_hook_sees_outputs() -> None:
    seen: list[list[int]] = []

    def only_seven(output_ids, logits):
        seen.append(list(output_ids))
        mask = torch.full_like(logits, float("-inf"))
        mask[7] = 0
        return logits + mask

    params = SamplingParams(temperature=0.8, logits_processor=only_seven)
    res = Sampler()(logits_rows(1), [req(params, out=(4, 4), seed=1)])
    assert res.token_ids == [7] and seen == [[4, 4]]


def test_logprobs_top_n() -> None:
    logits = logits_rows(2)
    params = SamplingParams(temperature=0, logprobs=3)
    res = Sampler()(logits.clone(), [req(params), req(SamplingParams(temperature=0))])
    lp = torch.log_softmax(logits[0], -1)
    entry = res.logprobs[0]
    assert entry["token_id"] == int(lp.argmax())
    assert entry["logprob"] == pytest.approx(float(lp.max()))
    assert [t for t, _ in entry["top"]] == torch.topk(lp, 3).indices.tolist()
    assert res.logprobs[1] is None


def test_logit_bias_moves_greedy_and_sampled_rows_alike() -> None:
    logits = logits_rows(3, seed=9)
    worst = [int(r.argmin()) for r in logits]
    greedy = SamplingParams(temperature=0, logit_bias={worst[0]: 100.0})
    sampled = SamplingParams(temperature=1.0, logit_bias={worst[1]: 100.0})
    banned = int(logits[2].argmax())
    res = Sampler()(
        logits.clone(),
        [req(greedy), req(sampled, seed=1), req(SamplingParams(temperature=0, logit_bias={banned: -100.0}))],
    )
    assert res.token_ids[:2] == worst[:2]
    assert res.token_ids[2] == int(logits[2].topk(2).indices[1])  # the best is banned: the runner-up wins


def test_logit_bias_cannot_bring_back_a_token_a_hook_refused() -> None:
    def only_seven(output_ids, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[7] = 0
        return logits + mask

    params = SamplingParams(temperature=0, logits_processor=only_seven, logit_bias={3: 100.0})
    assert Sampler()(logits_rows(1), [req(params)]).token_ids == [7]


def test_logit_bias_is_additive_and_exact() -> None:
    logits = logits_rows(1, seed=4)
    top2 = logits[0].topk(2).indices.tolist()
    gap = float(logits[0, top2[0]] - logits[0, top2[1]])
    # just under the gap keeps the winner, just over it swaps them
    under = SamplingParams(temperature=0, logit_bias={top2[1]: gap - 1e-3})
    over = SamplingParams(temperature=0, logit_bias={top2[1]: gap + 1e-3})
    assert Sampler()(logits.clone(), [req(under)]).token_ids == [top2[0]]
    assert Sampler()(logits.clone(), [req(over)]).token_ids == [top2[1]]


@pytest.mark.parametrize(
    "bad",
    [
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {3: 101.0}},
        {"logit_bias": {3: float("inf")}},
        {"logit_bias": {"3": 1.0}},
        {"logit_bias": dict.fromkeys(range(2000), 1.0)},
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": 0},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"logprobs": 100},
        {"stop": ("",)},
        {"temperature": float("nan")},
    ],
)
def test_validate_rejects(bad: dict) -> None:
    with pytest.raises(RequestError):
        SamplingParams(**bad).validate()


def test_validate_accepts_single_stop_string() -> None:
    p = SamplingParams(stop="###")  # type: ignore[arg-type]  # on purpose: validate() turns a single stop string into a tuple
    p.validate()
    assert p.stop == ("###",)
