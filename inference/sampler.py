"""Turns each sequence's last-token logits into its next token: penalties, hook, temperature, top-k/p,
min-p, seeded per-request sampling and top-n logprobs. An all-greedy batch is one batched argmax."""

from __future__ import annotations

from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from inference.params import SamplingParams


class SampleInput(Protocol):
    """What the sampler reads from a request (an engine `Sequence` or a `SampleRequest`)."""

    @property
    def params(self) -> SamplingParams: ...
    @property
    def prompt_token_ids(self) -> SequenceT[int]: ...
    @property
    def output_token_ids(self) -> SequenceT[int]: ...
    @property
    def generator(self) -> torch.Generator | None: ...


@dataclass(slots=True)
class SampleRequest:
    """What the sampler needs from one sequence: its params, token history and private generator."""

    params: SamplingParams
    prompt_token_ids: SequenceT[int]
    output_token_ids: SequenceT[int]
    generator: torch.Generator | None


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[str, Any] | None]


class Sampler:
    """Stateless; all randomness comes from the per-request generators so results do not depend on batching."""

    def __call__(self, logits: torch.Tensor, requests: SequenceT[SampleInput]) -> SampleResult:
        if logits.dtype != torch.float32:
            logits = logits.float()
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        logprobs: list[dict[str, Any] | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            if not req.params.needs_full_sampler:
                continue
            row = logits[i]
            want_lp = req.params.logprobs is not None
            tokens[i] = sample_one(row.clone() if want_lp else row, req)
            if want_lp:
                logprobs[i] = _logprobs(row, tokens[i], req.params.logprobs or 0)
        return SampleResult(tokens, logprobs)


def sample_one(logits: torch.Tensor, req: SampleInput) -> int:
    """Sample one token from a `[vocab]` float32 row (modified in place)."""
    p = req.params
    if p.logits_processor is not None:
        logits = p.logits_processor(req.output_token_ids, logits)
    if p.repetition_penalty != 1.0:
        seen = torch.as_tensor(list(req.prompt_token_ids) + list(req.output_token_ids), dtype=torch.long)
        if seen.numel():
            seen = seen.unique()
            vals = logits[seen]
            # the transformers convention: shrink positive logits, push negative ones further down
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(req.output_token_ids):
        out = torch.as_tensor(list(req.output_token_ids), dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # drop a token when the mass before it already reaches top_p; the top token always survives
        drop = (cum - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=req.generator))


def _logprobs(raw_logits: torch.Tensor, token: int, top_n: int) -> dict[str, Any]:
    """Logprobs of the model's raw distribution (before penalties and temperature), like vLLM's default."""
    lp = torch.log_softmax(raw_logits, dim=-1)
    entry: dict[str, Any] = {"token_id": token, "logprob": float(lp[token]), "top": []}
    if top_n:
        vals, ids = torch.topk(lp, top_n)
        entry["top"] = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return entry
