"""Batched sampler: equal to a per-row reference, seeded draws independent of the batch, truncation support,
the exponential race against the softmax distribution, incremental penalty state, batched hooks."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch

from inference.params import SamplingParams
from inference.sampler import PenaltyState, Sampler, SampleRequest

V = 50


def reference_logits(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """The pre-batching sampler's per-row pipeline up to the point where it sampled (processed logits)."""
    p = req.params
    row = logits.clone()
    if p.logits_processor is not None:
        row = p.logits_processor(req.output_token_ids, row)
    if p.repetition_penalty != 1.0:
        seen = torch.as_tensor(
            list(req.prompt_token_ids) + list(req.output_token_ids), dtype=torch.long
        ).unique()
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(req.output_token_ids):
        out = torch.as_tensor(list(req.output_token_ids), dtype=torch.long)
        counts = torch.bincount(out, minlength=row.shape[-1])[: row.shape[-1]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


def reference_probs(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """The distribution the pre-batching sampler drew from with `multinomial` (not renormalised)."""
    p = req.params
    row = reference_logits(logits, req) / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill((cum - sorted_probs) >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def step_logits(step: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed * 1000 + step)) * 2.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class BanEvenAfterFirst:
    """A per-row hook (no apply_batch): after the first output token, even ids are banned."""

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if output_ids:
            logits[0::2] = float("-inf")
        return logits


def chi_square(counts: Counter[int], probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens with expected count >= 5 (the rest pooled), and its degrees of freedom."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for tok, p in enumerate(probs.tolist()):
        exp = p * n
        if exp >= 5:
            stat += (counts.get(tok, 0) - exp) ** 2 / exp
            cells += 1
        else:
            pooled_obs += counts.get(tok, 0)
            pooled_exp += exp
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        cells += 1
    return stat, cells - 1


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (z = 3.09), by the Wilson-Hilferty approximation
    (within 3% of the exact value, on the generous side, for df >= 1). Fixed seeds make every run identical."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_greedy_rows_with_penalties_and_hooks_equal_the_per_row_reference() -> None:
    rng = random.Random(0)
    kinds = [
        SamplingParams(temperature=0, repetition_penalty=1.7),
        SamplingParams(temperature=0, presence_penalty=0.8),
        SamplingParams(temperature=0, frequency_penalty=0.6),
        SamplingParams(temperature=0, repetition_penalty=0.7, presence_penalty=-0.5, frequency_penalty=1.1),
        SamplingParams(temperature=0, logits_processor=BanEvenAfterFirst()),
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=0),
    ]
    reqs = [
        SampleRequest(kinds[i % len(kinds)], [rng.randrange(V) for _ in range(rng.randint(1, 9))], [], None)
        for i in range(14)
    ]
    sampler = Sampler(seed=0)
    for step in range(25):  # the penalty state is carried between steps and extended with each new token
        logits = step_logits(step, len(reqs))
        expected = [int(reference_logits(logits[i], r).argmax()) for i, r in enumerate(reqs)]
        res = sampler(logits.clone(), reqs)
        assert res.token_ids == expected, step
        for r, t in zip(reqs, res.token_ids, strict=True):
            r.output_token_ids.append(t)  # type: ignore[attr-defined]  # SampleRequest types it Sequence; these requests were given lists
    for r in reqs:  # only rows with penalties keep device state
        penalised = (
            r.params.repetition_penalty != 1 or r.params.presence_penalty or r.params.frequency_penalty
        )
        assert isinstance(r.sampler_state, PenaltyState) if penalised else r.sampler_state is None
        if penalised:
            # counted up to the previous step's output (the last token is folded in on the next step)
            assert r.sampler_state.num_output == 24
            assert int(r.sampler_state.output_counts.sum()) == 24


def test_penalty_state_is_rebuilt_when_history_shrinks() -> None:
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 1.0, 0.5
    req = SampleRequest(params, [1], [5], None)
    assert Sampler()(logits.clone(), [req]).token_ids == [6]  # 1.0 - 2.0 < 0.5
    req.output_token_ids = []  # a replay from an earlier point (never done by the engine, allowed here)
    assert Sampler()(logits.clone(), [req]).token_ids == [5]
    assert req.sampler_state.num_output == 0


def test_seeded_request_draws_the_same_tokens_alone_and_in_a_mixed_batch() -> None:
    target = SamplingParams(
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.3,
        frequency_penalty=0.2,
        logprobs=3,
    )
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_p=0.5),  # unseeded: the sampler's shared generator
        SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5),
        SamplingParams(temperature=1.2, logits_processor=BanEvenAfterFirst()),
        SamplingParams(temperature=0.7, top_k=5, min_p=0.1),
        SamplingParams(temperature=1.0, logprobs=5),
    ]

    def run(batched: bool) -> tuple[list[int], list[Any]]:
        me = SampleRequest(target, [3, 4, 5], [], gen(1234))
        mates = [SampleRequest(p, [7, 8], [], gen(50 + k) if k % 2 else None) for k, p in enumerate(others)]
        sampler = Sampler(seed=9)
        tokens, lps = [], []
        for step in range(40):
            mine = step_logits(step, seed=1)
            if batched:
                pos = step % (len(mates) + 1)  # the target moves through the batch
                rows = [*mates[:pos], me, *mates[pos:]]
                logits = torch.cat(
                    [
                        step_logits(step, len(mates), seed=2)[:pos],
                        mine,
                        step_logits(step, len(mates), seed=2)[pos:],
                    ]
                )
                res = sampler(logits, rows)
                tok, lp = res.token_ids[pos], res.logprobs[pos]
                for r, t in zip(rows, res.token_ids, strict=True):
                    r.output_token_ids.append(t)  # type: ignore[attr-defined]  # SampleRequest types it Sequence; these requests were given lists
            else:
                res = sampler(mine, [me])
                tok, lp = res.token_ids[0], res.logprobs[0]
                me.output_token_ids.append(tok)  # type: ignore[attr-defined]  # SampleRequest types it Sequence; these requests were given lists
            tokens.append(tok)
            lps.append(lp)
        return tokens, lps

    alone, alone_lp = run(False)
    mixed, mixed_lp = run(True)
    assert alone == mixed
    assert alone_lp == mixed_lp
    assert len(set(alone)) > 5  # really sampling, not collapsing to argmax


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=7),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05, presence_penalty=0.4),
    ],
    ids=["top_k", "top_p", "min_p", "combined"],
)
def test_draws_stay_inside_the_allowed_set(params: SamplingParams) -> None:
    logits = step_logits(0, seed=7)[0]
    out = [1, 2, 2, 9]
    probe = SampleRequest(params, [0], out, None)
    allowed = reference_probs(logits, probe)
    support = set(torch.nonzero(allowed).flatten().tolist())
    assert 1 < len(support) < V
    n = 3000
    # unseeded rows (one batched noise draw) and seeded rows (a generator each) in the same call
    reqs = [SampleRequest(params, [0], list(out), gen(i) if i % 3 == 0 else None) for i in range(n)]
    got = Sampler(seed=1)(logits.expand(n, V).clone(), reqs).token_ids
    assert set(got) <= support
    likely = {t for t in support if allowed[t] > 0.01}
    assert likely <= set(got)  # and it really samples across the set


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6, top_k=6),
        SamplingParams(temperature=1.5, top_p=0.7, min_p=0.02),
    ],
    ids=["plain", "top_k", "top_p_min_p"],
)
def test_exponential_race_matches_the_softmax_distribution(params: SamplingParams) -> None:
    logits = torch.randn(1, V, generator=gen(11)) * 1.5
    probs = reference_probs(logits[0], SampleRequest(params, [0], [], None))
    # batched rows sharing the sampler's generator
    n = 20000
    reqs = [SampleRequest(params, [0], [], None) for _ in range(n)]
    counts = Counter(Sampler(seed=2024)(logits.expand(n, V).clone(), reqs).token_ids)
    stat, df = chi_square(counts, probs, n)
    assert stat < chi2_critical(df), (stat, df)
    # one seeded request drawing step after step from its own generator
    n = 3000
    req = SampleRequest(params, [0], [], gen(77))
    sampler = Sampler()
    counts = Counter(sampler(logits.clone(), [req]).token_ids[0] for _ in range(n))
    stat, df = chi_square(counts, probs, n)
    assert stat < chi2_critical(df), (stat, df)


def test_unseeded_draws_follow_the_sampler_seed() -> None:
    logits = step_logits(3, 8)
    reqs = [SampleRequest(SamplingParams(temperature=1.0), [0], [], None) for _ in range(8)]
    a = [Sampler(seed=5)(logits.clone(), reqs).token_ids for _ in range(2)]
    b = Sampler(seed=6)(logits.clone(), reqs).token_ids
    assert a[0] == a[1] and a[0] != b


class CountingBatchProcessor:
    """A hook with a batched form: allows only token `allowed`; records how it was called."""

    batch_calls: ClassVar[list[int]] = []
    row_calls: ClassVar[int] = 0

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.seen: list[list[int]] = []

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        CountingBatchProcessor.row_calls += 1
        self.seen.append(list(output_ids))
        keep = logits[self.allowed].clone()
        logits.fill_(float("-inf"))
        logits[self.allowed] = keep
        return logits

    @staticmethod
    def apply_batch(
        processors: Sequence[CountingBatchProcessor], outputs: Sequence[Sequence[int]], logits: torch.Tensor
    ) -> torch.Tensor:
        CountingBatchProcessor.batch_calls.append(len(processors))
        assert logits.shape == (len(processors), V)
        mask = torch.full_like(logits, float("-inf"))
        for row, (proc, out) in enumerate(zip(processors, outputs, strict=True)):
            proc.seen.append(list(out))
            mask[row, proc.allowed] = 0.0
        return logits + mask


def test_hooks_with_apply_batch_run_once_per_step_for_their_rows() -> None:
    CountingBatchProcessor.batch_calls = []
    CountingBatchProcessor.row_calls = 0
    procs = [CountingBatchProcessor(a) for a in (11, 22, 33)]
    lone = BanEvenAfterFirst()
    reqs = [
        SampleRequest(SamplingParams(temperature=0), [0], [1], None),
        SampleRequest(SamplingParams(temperature=0, logits_processor=procs[0]), [0], [4], None),
        SampleRequest(SamplingParams(temperature=0.9, logits_processor=lone), [0], [5], gen(3)),
        SampleRequest(SamplingParams(temperature=0.7, logits_processor=procs[1]), [0], [6, 7], gen(4)),
        SampleRequest(SamplingParams(temperature=0, logits_processor=procs[2], logprobs=1), [0], [], None),
    ]
    res = Sampler(seed=0)(step_logits(0, len(reqs)), reqs)
    assert CountingBatchProcessor.batch_calls == [3] and CountingBatchProcessor.row_calls == 0
    assert res.token_ids[1] == 11 and res.token_ids[3] == 22 and res.token_ids[4] == 33
    assert res.token_ids[2] % 2 == 1  # the per-row hook ran too
    assert [p.seen for p in procs] == [[[4]], [[6, 7]], [[]]]
    # logprobs stay those of the raw distribution, not of the masked one
    raw = torch.log_softmax(step_logits(0, len(reqs))[4], -1)
    assert res.logprobs[4]["logprob"] == pytest.approx(float(raw[33]))
    # a lone processor of a batch-capable class runs through its per-row call
    Sampler()(
        step_logits(1, 1),
        [SampleRequest(SamplingParams(temperature=0, logits_processor=procs[0]), [0], [], None)],
    )
    assert CountingBatchProcessor.batch_calls == [3] and CountingBatchProcessor.row_calls == 1


def test_logprobs_of_sampled_rows_describe_the_sampled_token() -> None:
    logits = step_logits(0, 3, seed=4)
    reqs = [
        SampleRequest(SamplingParams(temperature=1.0, logprobs=4), [0], [], gen(1)),
        SampleRequest(SamplingParams(temperature=0), [0], [], None),
        SampleRequest(SamplingParams(temperature=0.5, logprobs=0, top_k=3), [0], [], gen(2)),
    ]
    res = Sampler()(logits.clone(), reqs)
    for i in (0, 2):
        lp = torch.log_softmax(logits[i], -1)
        entry = res.logprobs[i]
        assert entry["token_id"] == res.token_ids[i]
        assert entry["logprob"] == pytest.approx(float(lp[res.token_ids[i]]))
    assert [t for t, _ in res.logprobs[0]["top"]] == torch.topk(
        torch.log_softmax(logits[0], -1), 4
    ).indices.tolist()
    assert res.logprobs[2]["top"] == [] and res.logprobs[1] is None


def test_cpu_partial_nucleus_equals_the_full_sort() -> None:
    from inference.sampler import _TOP_P_PARTIAL, _top_p, _top_p_sorted

    vocab = 4 * _TOP_P_PARTIAL
    g = gen(5)
    peaked = torch.softmax(torch.randn(3, vocab, generator=g) * 3.0, dim=-1)  # nucleus within the partial top
    flat = torch.softmax(torch.randn(2, vocab, generator=g) * 0.1, dim=-1)  # needs most of the vocabulary
    for probs, top_p in (
        (peaked, torch.tensor([[0.9], [0.5], [0.95]])),  # every row fits the partial top
        (flat, torch.tensor([[0.9], [0.3]])),
        (torch.cat([peaked[:2], flat[:1], peaked[2:]]), torch.tensor([[0.9], [0.5], [0.9], [0.99]])),  # mixed
    ):
        got, want = _top_p(probs, top_p), _top_p_sorted(probs, top_p)
        assert torch.equal(got, want)
        assert ((got > 0).sum(-1) > 1).all()  # a real nucleus, not just the top token
    assert int((_top_p(peaked, torch.tensor([[0.9]] * 3)) > 0).sum()) < 3 * _TOP_P_PARTIAL
    # and a seeded row draws the same tokens whether its batch mates take the partial path or not
    req = SampleRequest(SamplingParams(temperature=1.0, top_p=0.9), [0], [], gen(8))
    mate = SampleRequest(SamplingParams(temperature=1.0, top_p=0.9), [0], [], gen(9))
    logits_peak = torch.log(peaked[:1])
    logits_flat = torch.log(flat[:1])
    alone = [Sampler()(logits_peak.clone(), [req]).token_ids[0] for _ in range(10)]
    req.generator = gen(8)
    mixed = [Sampler()(torch.cat([logits_flat, logits_peak]), [mate, req]).token_ids[1] for _ in range(10)]
    assert alone == mixed and len(set(alone)) > 1
