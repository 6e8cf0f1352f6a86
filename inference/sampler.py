"""Turns each sequence's last-token logits into its next token as batched tensor ops on the logits' device
(hooks, penalties, logit bias, temperature, top-k/p, min-p, seeded per-request draws, logprobs), then copies the ids to
the host once. An all-greedy batch is one argmax."""

from __future__ import annotations

import random
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from inference.params import SamplingParams

# Floor of the exponential race's noise: exponential_() may return exactly 0, and p / 0 must not win for p = 0.
_TINY = torch.finfo(torch.float32).tiny


class SampleInput(Protocol):
    """What the sampler reads from a request (an engine `Sequence` or a `SampleRequest`).

    `sampler_state` belongs to the sampler: it keeps the request's penalty statistics on the device between
    steps there (None until the sampler sets it).
    """

    sampler_state: Any

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
    sampler_state: Any = None


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[str, Any] | None]


@dataclass(slots=True)
class PenaltyState:
    """One request's token statistics on the device, extended each step by the tokens generated since."""

    prompt_mask: torch.Tensor  # [vocab] bool: the token occurs in the prompt
    output_counts: torch.Tensor  # [vocab] int32: occurrences in the output so far
    num_output: int  # output tokens already counted


class Sampler:
    """Batched over the rows that need each stage; randomness comes from each request's own generator, so a
    seeded request draws the same tokens whatever else is in the batch. Requests without a generator share
    one per device (seeded from `seed`, else from the OS)."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: SequenceT[SampleInput]) -> SampleResult:
        if logits.dtype != torch.float32:
            logits = logits.float()
        params = [r.params for r in requests]
        full = [i for i, p in enumerate(params) if p.needs_full_sampler]
        if not full:
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(requests))
        return self._full(logits, requests, params, full)

    # ---- the full path -----------------------------------------------------------------------------------
    def _full(
        self,
        x: torch.Tensor,
        requests: SequenceT[SampleInput],
        params: list[SamplingParams],
        full: list[int],
    ) -> SampleResult:
        """Modifies `x` (this step's logits, owned by the sampler) in place."""
        device, vocab = x.device, x.shape[-1]
        ints, floats = _Pack(), _Pack()

        # Plan on the host: which rows each stage touches and their per-row values, uploaded in two copies.
        lp_rows = [i for i in full if params[i].logprobs is not None]
        ints.add("lp", lp_rows)
        singles, groups = _processor_groups(requests, params, full)
        for key, rows in groups.items():
            ints.add(key, rows)
        pen_rows = [
            i
            for i in full
            if params[i].repetition_penalty != 1.0
            or params[i].presence_penalty
            or params[i].frequency_penalty
        ]
        pen_plan = _PenaltyPlan.build(requests, pen_rows, vocab, device, ints, floats) if pen_rows else None
        biases = [(i, bias) for i in full if (bias := params[i].logit_bias)]
        if biases:
            ints.add("bias_rows", [i for i, bias in biases for _ in bias])
            ints.add("bias_toks", [t for _, bias in biases for t in bias])
            floats.add("bias", [b for _, bias in biases for b in bias.values()])
        samp_rows = [i for i in full if not params[i].greedy]
        samp_plan = _SamplePlan.build(params, samp_rows, vocab, ints, floats) if samp_rows else None
        dev_i = ints.upload(torch.long, device)
        dev_f = floats.upload(torch.float32, device)

        # Logprobs are of the raw model distribution (before hooks, penalties and temperature), as vLLM's default.
        raw_lp = torch.log_softmax(x.index_select(0, dev_i["lp"]), dim=-1) if lp_rows else None
        for i in singles:
            row = x[i]
            out = params[i].logits_processor(requests[i].output_token_ids, row)  # type: ignore[misc]  # singles have a hook
            if out is not row:
                row.copy_(out)
        for key, rows in groups.items():
            procs = [params[i].logits_processor for i in rows]
            idx = dev_i[key]
            sub = type(procs[0]).apply_batch(  # type: ignore[union-attr]  # grouped: classes with apply_batch
                procs, [requests[i].output_token_ids for i in rows], x.index_select(0, idx)
            )
            x.index_copy_(0, idx, sub)
        if pen_plan is not None:
            pen_plan.apply(x, requests, dev_i, dev_f)
        if biases:
            # after the hooks: a grammar's -inf stays -inf, a bias cannot bring back a refused token
            x.index_put_((dev_i["bias_rows"], dev_i["bias_toks"]), dev_f["bias"], accumulate=True)
        tokens = x.argmax(dim=-1)  # greedy rows (after hooks and penalties); sampled rows are overwritten
        if samp_plan is not None:
            idx = dev_i["samp"]
            drawn = samp_plan.draw(
                x.index_select(0, idx) if samp_plan.subset else x, requests, dev_i, dev_f, self
            )
            tokens = tokens.index_copy(0, idx, drawn) if samp_plan.subset else drawn

        fetch = [tokens]
        top_n = max((params[i].logprobs or 0 for i in lp_rows), default=0)
        if raw_lp is not None:
            fetch.append(raw_lp.gather(1, tokens.index_select(0, dev_i["lp"]).unsqueeze(1)).squeeze(1))
            if top_n:
                top = torch.topk(raw_lp, top_n, dim=-1)
                fetch += [top.indices, top.values]
        host = _to_host(fetch)  # the step's only device -> host synchronisation
        token_ids: list[int] = host[0].tolist()
        logprobs: list[dict[str, Any] | None] = [None] * len(requests)
        if lp_rows:
            chosen = host[1].tolist()
            top_ids = host[2].tolist() if top_n else None
            top_vals = host[3].tolist() if top_n else None
            for j, i in enumerate(lp_rows):
                n = params[i].logprobs or 0
                pairs = (
                    list(zip(top_ids[j][:n], top_vals[j][:n], strict=True)) if top_ids and top_vals else []
                )
                logprobs[i] = {"token_id": token_ids[i], "logprob": chosen[j], "top": pairs}
        return SampleResult(token_ids, logprobs)

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of requests that have none of their own (one per device, created on first use)."""
        gen = self._shared.get(device)
        if gen is None:
            seed = self._seed if self._seed is not None else random.SystemRandom().getrandbits(63)
            gen = self._shared[device] = torch.Generator(device=device).manual_seed(seed)
        return gen


# ---- stages ------------------------------------------------------------------------------------------------


def _processor_groups(
    requests: SequenceT[SampleInput], params: list[SamplingParams], full: list[int]
) -> tuple[list[int], dict[str, list[int]]]:
    """Rows whose hook runs alone, and rows grouped by hook class for classes with a batched `apply_batch`
    (e.g. grammar masks: one bitmask fill over all matchers). A lone row of such a class runs alone too."""
    singles: list[int] = []
    by_class: dict[type, list[int]] = {}
    for i in full:
        proc = params[i].logits_processor
        if proc is None:
            continue
        if callable(getattr(type(proc), "apply_batch", None)):
            by_class.setdefault(type(proc), []).append(i)
        else:
            singles.append(i)
    groups: dict[str, list[int]] = {}
    for n, rows in enumerate(by_class.values()):
        if len(rows) == 1:
            singles.extend(rows)
        else:
            groups[f"hook{n}"] = rows
    singles.sort()
    return singles, groups


@dataclass(slots=True)
class _PenaltyPlan:
    """Repetition (transformers' rule, over prompt + output) and presence/frequency (OpenAI's, over output)."""

    rows: list[int]
    subset: bool  # not every row of the batch: gather them, penalise, scatter back
    states: list[PenaltyState | None]  # None: a new state, built from the prompt this step
    num_outputs: list[int]
    any_repetition: bool
    any_additive: bool
    num_prompt_tokens: int
    num_output_tokens: int

    @staticmethod
    def build(
        requests: SequenceT[SampleInput],
        rows: list[int],
        vocab: int,
        device: torch.device,
        ints: _Pack,
        floats: _Pack,
    ) -> _PenaltyPlan:
        states: list[PenaltyState | None] = []
        num_outputs: list[int] = []
        prompt_rows: list[int] = []
        prompt_toks: list[int] = []
        out_rows: list[int] = []
        out_toks: list[int] = []
        for j, i in enumerate(rows):
            req = requests[i]
            out = req.output_token_ids
            st = req.sampler_state
            fresh = (
                not isinstance(st, PenaltyState)
                or st.num_output > len(out)
                or st.output_counts.device != device
                or st.output_counts.shape[0] != vocab
            )
            if fresh:
                prompt = list(req.prompt_token_ids)
                prompt_rows += [j] * len(prompt)
                prompt_toks += prompt
                new = list(out)
                states.append(None)
            else:
                new = list(out[st.num_output :])
                states.append(st)
            out_rows += [j] * len(new)
            out_toks += new
            num_outputs.append(len(out))
        ints.add("pen", rows)
        ints.add("pen_prompt_rows", prompt_rows)
        ints.add("pen_prompt_toks", prompt_toks)
        ints.add("pen_out_rows", out_rows)
        ints.add("pen_out_toks", out_toks)
        ps = [requests[i].params for i in rows]
        floats.add("rep", [p.repetition_penalty for p in ps])
        floats.add("pres", [p.presence_penalty for p in ps])
        floats.add("freq", [p.frequency_penalty for p in ps])
        return _PenaltyPlan(
            rows=rows,
            subset=len(rows) != len(requests),
            states=states,
            num_outputs=num_outputs,
            any_repetition=any(p.repetition_penalty != 1.0 for p in ps),
            any_additive=any(p.presence_penalty or p.frequency_penalty for p in ps),
            num_prompt_tokens=len(prompt_toks),
            num_output_tokens=len(out_toks),
        )

    def apply(
        self,
        x: torch.Tensor,
        requests: SequenceT[SampleInput],
        dev_i: dict[str, torch.Tensor],
        dev_f: dict[str, torch.Tensor],
    ) -> None:
        vocab, device = x.shape[-1], x.device
        zero_mask = zero_counts = None
        if any(st is None for st in self.states):
            zero_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            zero_counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        mask = torch.stack([st.prompt_mask if st is not None else zero_mask for st in self.states])  # type: ignore[misc]  # zero_* are set when a state is None
        counts = torch.stack([st.output_counts if st is not None else zero_counts for st in self.states])  # type: ignore[misc]  # zero_* are set when a state is None
        if self.num_prompt_tokens:
            mask.index_put_(
                (dev_i["pen_prompt_rows"], dev_i["pen_prompt_toks"]),
                torch.ones((), dtype=torch.bool, device=device),
            )
        if self.num_output_tokens:
            counts.index_put_(
                (dev_i["pen_out_rows"], dev_i["pen_out_toks"]),
                torch.ones(self.num_output_tokens, dtype=torch.int32, device=device),
                accumulate=True,
            )
        for j, i in enumerate(self.rows):
            # views into this step's stacked tensors: the next step stacks (copies) them again
            requests[i].sampler_state = PenaltyState(mask[j], counts[j], self.num_outputs[j])
        idx = dev_i["pen"]
        xs = x.index_select(0, idx) if self.subset else x
        if self.any_repetition:
            rep = dev_f["rep"].unsqueeze(1)
            seen = mask | (counts > 0)
            # shrink positive logits, push negative ones further down; a factor of 1 leaves a row exact
            xs = torch.where(seen, torch.where(xs > 0, xs / rep, xs * rep), xs)
        if self.any_additive:
            c = counts.to(xs.dtype)
            xs = xs - (dev_f["freq"].unsqueeze(1) * c + dev_f["pres"].unsqueeze(1) * (c > 0).to(xs.dtype))
        if self.subset:
            x.index_copy_(0, idx, xs)
        elif xs is not x:
            x.copy_(xs)


@dataclass(slots=True)
class _SamplePlan:
    """Temperature -> top-k -> softmax -> top-p -> min-p -> an exponential race with per-row noise."""

    rows: list[int]
    subset: bool
    topk_rows: list[int] | None  # positions within `rows`; None when no row truncates by top-k
    topk_max: int
    topp_rows: list[int] | None
    any_min_p: bool

    @staticmethod
    def build(
        params: list[SamplingParams], rows: list[int], vocab: int, ints: _Pack, floats: _Pack
    ) -> _SamplePlan:
        ps = [params[i] for i in rows]
        topk = [j for j, p in enumerate(ps) if 0 < p.top_k < vocab]
        topp = [j for j, p in enumerate(ps) if p.top_p < 1.0]
        ints.add("samp", rows)
        ints.add("topk_rows", topk)
        ints.add("topp_rows", topp)
        floats.add("temp", [p.temperature for p in ps])
        floats.add("top_k", [float(ps[j].top_k) for j in topk])
        floats.add("top_p", [ps[j].top_p for j in topp])
        floats.add("min_p", [p.min_p for p in ps])
        return _SamplePlan(
            rows=rows,
            subset=len(rows) != len(params),
            topk_rows=topk or None,
            topk_max=max((ps[j].top_k for j in topk), default=0),
            topp_rows=topp or None,
            any_min_p=any(p.min_p > 0.0 for p in ps),
        )

    def draw(
        self,
        x: torch.Tensor,
        requests: SequenceT[SampleInput],
        dev_i: dict[str, torch.Tensor],
        dev_f: dict[str, torch.Tensor],
        sampler: Sampler,
    ) -> torch.Tensor:
        """Sampled ids (`[rows]` on the device) from `x`, the sampled rows' logits."""
        z = x / dev_f["temp"].unsqueeze(1)
        if self.topk_rows is not None:
            every = len(self.topk_rows) == len(self.rows)
            idx = dev_i["topk_rows"]
            zk = z if every else z.index_select(0, idx)
            kth = torch.topk(zk, self.topk_max, dim=-1).values.gather(
                1, dev_f["top_k"].long().sub(1).unsqueeze(1)
            )
            zk = zk.masked_fill(zk < kth, float("-inf"))
            z = zk if every else z.index_copy(0, idx, zk)
        probs = torch.softmax(z, dim=-1)
        if self.topp_rows is not None:
            every = len(self.topp_rows) == len(self.rows)
            idx = dev_i["topp_rows"]
            pp = probs if every else probs.index_select(0, idx)
            pp = _top_p(pp, dev_f["top_p"].unsqueeze(1))
            probs = pp if every else probs.index_copy(0, idx, pp)
        if self.any_min_p:
            floor = dev_f["min_p"].unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        # argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p): categorical sampling without
        # a host round trip, and each row's noise comes from its own generator.
        noise = torch.empty_like(probs)
        own = [(j, requests[i].generator) for j, i in enumerate(self.rows)]
        if any(g is None for _, g in own):
            noise.exponential_(generator=sampler.shared_generator(probs.device))
        for j, g in own:
            if g is None:
                continue
            if g.device == probs.device:
                noise[j].exponential_(generator=g)
            else:  # a caller's generator on another device: draw there, copy over
                noise[j].copy_(torch.empty(probs.shape[-1], device=g.device).exponential_(generator=g))
        return probs.div_(noise.clamp_(min=_TINY)).argmax(dim=-1)


# Top-p on the CPU first tries the largest this-many probabilities of each row: sorting a whole 50k-150k
# vocabulary costs a few ms per row there, and a real model's nucleus is almost always far smaller.
_TOP_P_PARTIAL = 1024


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside each row's nucleus: in descending order, a token is dropped when the mass
    before it already reaches `top_p` (`[rows, 1]`), so the top token always survives."""
    if probs.device.type == "cpu" and probs.shape[-1] > 2 * _TOP_P_PARTIAL:
        vals, order = torch.topk(probs, _TOP_P_PARTIAL, dim=-1)  # sorted, descending
        cum = vals.cumsum(dim=-1)
        # where the partial mass reaches top_p, every kept token is among these (the next one is dropped);
        # decided per row, so a row's result never depends on the rest of the batch
        fits = (cum[:, -1:] >= top_p).squeeze(1)
        n_fit = int(fits.sum())
        if n_fit == probs.shape[0]:
            return torch.zeros_like(probs).scatter_(1, order, vals.masked_fill((cum - vals) >= top_p, 0.0))
        if n_fit:
            out = torch.empty_like(probs)
            rows, rest = fits.nonzero().squeeze(1), (~fits).nonzero().squeeze(1)
            v, c = vals[rows], cum[rows]
            kept = v.masked_fill((c - v) >= top_p[rows], 0.0)
            out[rows] = torch.zeros_like(probs[rows]).scatter_(1, order[rows], kept)
            out[rest] = _top_p_sorted(probs[rest], top_p[rest])
            return out
    return _top_p_sorted(probs, top_p)


def _top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # stable: ties keep index order, so a row's result never depends on the rest of the batch
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    sorted_p = sorted_p.masked_fill((cum - sorted_p) >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


# ---- host <-> device ---------------------------------------------------------------------------------------


class _Pack:
    """Named lists of host values that travel to the device in one copy (pinned and asynchronous on CUDA)."""

    __slots__ = ("spans", "values")

    def __init__(self) -> None:
        self.values: list[float] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, name: str, values: SequenceT[float]) -> None:
        start = len(self.values)
        self.values.extend(values)
        self.spans[name] = (start, len(self.values))

    def upload(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.values:
            empty = torch.empty(0, dtype=dtype, device=device)
            return dict.fromkeys(self.spans, empty)
        if device.type == "cuda":
            host = torch.tensor(self.values, dtype=dtype, pin_memory=True)
            flat = host.to(device, non_blocking=True)
        else:
            flat = torch.tensor(self.values, dtype=dtype, device=device)
        return {name: flat[a:b] for name, (a, b) in self.spans.items()}


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy results to the host with one synchronisation (async copies into pinned memory on CUDA)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host
