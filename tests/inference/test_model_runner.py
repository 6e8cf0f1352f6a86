"""The model runner's host side: flattening a scheduled batch into arrays, and moving them to the device."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from inference.metadata import AttentionMetadata, HostBatch
from inference.model_runner import (
    BlockTableCache,
    HostStager,
    StepInputs,
    build_host_batch,
    zero_copy_inputs,
)
from inference.params import SamplingParams
from inference.sequence import Sequence


def make_seq(rng: random.Random, name: str, prompt: int, computed: int, generated: int) -> Sequence:
    seq = Sequence(name, [rng.randrange(1000) for _ in range(prompt)], SamplingParams())
    seq.token_ids += [rng.randrange(1000) for _ in range(generated)]
    seq.num_computed_tokens = computed
    return seq


def naive_batch(items: list[tuple[Sequence, int]], bs: int) -> dict[str, list]:
    """The step spelled out token by token: what build_host_batch must produce."""
    ids, pos, slots, qsl, ctx, sample = [], [], [], [0], [], []
    for seq, n in items:
        a = seq.num_computed_tokens
        for p in range(a, a + n):
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
        ctx.append(a + n)
        if a + n == seq.num_tokens:
            sample.append(qsl[-1] - 1)
    return {"ids": ids, "pos": pos, "slots": slots, "qsl": qsl, "ctx": ctx, "sample": sample}


def random_items(seed: int, bs: int, decode_only: bool) -> list[tuple[Sequence, int]]:
    rng = random.Random(seed)
    free = list(range(1, 400))
    rng.shuffle(free)
    items = []
    for i in range(rng.randint(1, 9)):
        prompt = rng.randint(1, 40)
        if decode_only or rng.random() < 0.4:
            generated = rng.randint(0, 12)
            computed = prompt + generated - 1
            n = 1
        else:  # a prefill chunk, the last one (samples) or not
            generated, computed = 0, rng.randint(0, prompt - 1)
            n = rng.randint(1, prompt - computed)
        seq = make_seq(rng, f"s{i}", prompt, computed, generated)
        need = -(-(computed + n) // bs) + rng.randint(0, 1)  # sometimes a block allocated ahead
        seq.block_table = [free.pop() for _ in range(need)]
        items.append((seq, n))
    return items


@pytest.mark.parametrize("decode_only", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_host_batch_matches_the_naive_flattening(seed: int, decode_only: bool) -> None:
    bs = 4
    items = random_items(seed, bs, decode_only)
    host, sample_seqs = build_host_batch(items, bs)
    want = naive_batch(items, bs)
    assert host.input_ids.tolist() == want["ids"] and host.input_ids.dtype == np.int64
    assert host.positions.tolist() == want["pos"] and host.positions.dtype == np.int64
    assert host.slot_mapping.tolist() == want["slots"] and host.slot_mapping.dtype == np.int64
    assert host.query_start_loc.tolist() == want["qsl"] and host.query_start_loc.dtype == np.int32
    assert host.context_lens.tolist() == want["ctx"] and host.context_lens.dtype == np.int32
    assert host.sample_indices.tolist() == want["sample"]
    width = max(len(s.block_table) for s, _ in items)
    assert host.block_tables.shape == (len(items), width) and host.block_tables.dtype == np.int32
    for row, (seq, _) in zip(host.block_tables.tolist(), items, strict=True):
        assert row == seq.block_table + [0] * (width - len(seq.block_table))
    assert host.max_query_len == max(n for _, n in items)
    assert host.max_context_len == max(want["ctx"])
    assert [s.request_id for s in sample_seqs] == [
        s.request_id for s, n in items if s.num_computed_tokens + n == s.num_tokens
    ]


def test_the_block_table_cache_gives_the_flattened_tables_step_after_step() -> None:
    """Steady decoding (tables growing a block at a time), finished and new sequences, a table freed and
    reallocated (a new list), one shrunk in place, the widest one leaving: the cached build equals a fresh
    flattening at every step, and never rewrites an array it returned (it may be a zero-copy model input)."""
    rng = random.Random(3)
    bs = 4
    next_block = iter(range(1, 100_000))
    seqs = [make_seq(rng, f"s{i}", rng.randint(1, 30), 0, 0) for i in range(12)]
    for seq in seqs:
        seq.block_table = [next(next_block) for _ in range(-(-seq.num_tokens // bs))]
    cache = BlockTableCache()
    returned: list[tuple[np.ndarray, np.ndarray]] = []
    for step in range(60):
        for seq in seqs:  # one decode token each; a new block when the last one is full
            seq.token_ids.append(rng.randrange(1000))
            seq.num_computed_tokens = seq.num_tokens - 1
            if len(seq.block_table) * bs < seq.num_tokens:
                seq.block_table.append(next(next_block))
        if step % 7 == 3:  # one finishes, one arrives
            seqs.pop(rng.randrange(len(seqs)))
            new = make_seq(rng, f"n{step}", rng.randint(1, 60), 0, 1)
            new.num_computed_tokens = new.num_tokens - 1
            new.block_table = [next(next_block) for _ in range(-(-new.num_tokens // bs))]
            seqs.insert(rng.randrange(len(seqs) + 1), new)
        if step % 11 == 5:  # freed and reallocated (preemption then readmission): a new list, new blocks
            victim = rng.choice(seqs)
            victim.block_table = [next(next_block) for _ in range(len(victim.block_table))]
        if step % 13 == 8:  # shrunk in place: not something the engine does, but never served stale
            victim = rng.choice(seqs)
            victim.block_table[:] = [next(next_block) for _ in range(len(victim.block_table))]
            del victim.block_table[len(victim.block_table) // 2 :]
            victim.token_ids[:] = victim.token_ids[: len(victim.block_table) * bs]
            victim.num_computed_tokens = victim.num_tokens - 1
        if step == 40:  # the widest table leaves: the batch's width shrinks
            seqs.remove(max(seqs, key=lambda s: len(s.block_table)))
        if step % 17 == 0:
            rng.shuffle(seqs)
        items = [(seq, 1) for seq in seqs]
        cached, _ = build_host_batch(items, bs, cache)
        fresh, _ = build_host_batch(items, bs)
        assert cached.block_tables.dtype == np.int32
        assert np.array_equal(cached.block_tables, fresh.block_tables), step
        assert np.array_equal(cached.slot_mapping, fresh.slot_mapping), step
        returned.append((cached.block_tables, cached.block_tables.copy()))
    for got, snapshot in returned:
        assert np.array_equal(got, snapshot)


def test_one_token_prefill_chunks_read_the_token_at_their_position() -> None:
    """A step of single tokens is not always decodes: a 1-token prefill chunk feeds the token it computes."""
    rng = random.Random(0)
    decode = make_seq(rng, "d", 5, 7, 3)  # 8 tokens, 7 computed: the last one is new
    chunk = make_seq(rng, "c", 10, 3, 0)  # prompt of 10, 3 computed: a 1-token chunk feeds token 3
    decode.block_table, chunk.block_table = [1, 2], [3]
    host, sample_seqs = build_host_batch([(decode, 1), (chunk, 1)], 4)
    assert host.input_ids.tolist() == [decode.token_ids[7], chunk.token_ids[3]]
    assert host.positions.tolist() == [7, 3]
    assert host.slot_mapping.tolist() == [2 * 4 + 3, 3 * 4 + 3]
    assert host.is_decode_only and sample_seqs == [decode]


def assert_same_inputs(got: StepInputs, want: StepInputs) -> None:
    for name in ("input_ids", "positions", "sample_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("slot_mapping", "query_start_loc", "context_lens", "block_tables"):
        g, w = getattr(got.meta, name), getattr(want.meta, name)
        assert g.dtype == w.dtype and torch.equal(g, w), name
    assert (got.meta.max_query_len, got.meta.max_context_len, got.meta.block_size) == (
        want.meta.max_query_len,
        want.meta.max_context_len,
        want.meta.block_size,
    )
    assert got.samples_every_row == want.samples_every_row
    assert got.sample_seqs == want.sample_seqs


def meta_tensors(meta: AttentionMetadata) -> list[torch.Tensor]:
    return [meta.slot_mapping, meta.query_start_loc, meta.context_lens, meta.block_tables]


def test_staged_upload_packs_the_same_tensors_as_zero_copy() -> None:
    """The CUDA upload path (two packed copies from reused staging) on the CPU, unpinned: same tensors, which stay
    intact while later steps reuse and grow the staging buffers."""
    stager = HostStager(torch.device("cpu"), pin=False)
    kept: list[tuple[StepInputs, StepInputs]] = []
    for seed in range(8):
        items = random_items(seed, 4, decode_only=seed % 2 == 0)
        if seed == 5:  # a batch past the initial staging capacity forces a regrowth
            items = random_items(99, 4, False)
            seq = make_seq(random.Random(1), "big", 1500, 0, 0)
            seq.block_table = list(range(1, 376))
            items.append((seq, 1500))
        host, sample_seqs = build_host_batch(items, 4)
        got = stager.upload(host, sample_seqs, 4)
        want = zero_copy_inputs(host, sample_seqs, 4)
        assert_same_inputs(got, want)
        # packed fields each start 16-byte aligned (Triton specialises kernels on pointer alignment)
        fields = [got.input_ids, got.positions, got.sample_indices, *meta_tensors(got.meta)]
        assert all(f.data_ptr() % 16 == 0 for f in fields if f.numel())
        kept.append((got, want))
    for got, want in kept:  # no step's tensors alias a staging buffer that a later step rewrote
        assert_same_inputs(got, want)


def test_zero_copy_inputs_share_memory_with_the_host_arrays() -> None:
    items = random_items(3, 4, decode_only=True)
    host, sample_seqs = build_host_batch(items, 4)
    inputs = zero_copy_inputs(host, sample_seqs, 4)
    assert inputs.input_ids.data_ptr() == host.input_ids.ctypes.data
    assert inputs.meta.block_tables.data_ptr() == host.block_tables.ctypes.data
    assert isinstance(host, HostBatch) and inputs.samples_every_row
