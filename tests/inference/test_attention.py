"""Reference paged attention equals plain causal attention computed densely in float64."""

from __future__ import annotations

import random

import pytest
import torch

from inference import attention
from inference.attention import paged_attention, write_kv
from inference.metadata import AttentionMetadata

BLOCK = 4
NUM_BLOCKS = 48


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """Attention of the last q.shape[0] positions of a ctx-long sequence, by the textbook formula in float64."""
    q_len, heads, _ = q.shape
    group = heads // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)  # [C, H, D]
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


def _batch(
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    seed: int,
    num_blocks: int = NUM_BLOCKS,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(q, kv_layer, meta, per-sequence full K/V) for sequences given as (context_len, query_len).

    Earlier positions' K/V are written into the cache directly; the new tokens' K/V go through write_kv.
    """
    gen = torch.Generator().manual_seed(seed)
    kv = torch.zeros(2, num_blocks, BLOCK, kv_heads, dim, dtype=dtype)
    free = list(range(1, num_blocks))
    random.Random(seed).shuffle(free)
    qs, new_k, new_v, slots, starts, tables, full = [], [], [], [], [0], [], []
    for ctx, q_len in seqs:
        k = torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, dim, generator=gen).to(dtype)
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        for p in range(ctx):
            slot = table[p // BLOCK] * BLOCK + p % BLOCK
            if p < ctx - q_len:
                kv[0].view(-1, kv_heads, dim)[slot] = k[p]
                kv[1].view(-1, kv_heads, dim)[slot] = v[p]
            else:
                slots.append(slot)
        new_k.append(k[ctx - q_len :])
        new_v.append(v[ctx - q_len :])
        qs.append(torch.randn(q_len, heads, dim, generator=gen).to(dtype))
        starts.append(starts[-1] + q_len)
        tables.append(table)
        full.append((k, v))
    width = max(len(t) for t in tables) + 1
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(q for _, q in seqs),
        max_context_len=max(c for c, _ in seqs),
        block_size=BLOCK,
    )
    write_kv(kv, torch.cat(new_k), torch.cat(new_v), meta.slot_mapping)
    return torch.cat(qs), kv, meta, full


CASES = {
    "decode_batch": [(1, 1), (9, 1), (17, 1), (4, 1)],
    # more sequences than one decode group, unsorted, with ties: exercises the grouped, cached decode plan
    "decode_many_groups": [(9, 1), (1, 1), (17, 1), (9, 1), (4, 1), (13, 1), (2, 1), (9, 1), (6, 1), (11, 1)],
    "decode_single_full": [(13, 1)],
    "prefill_batch": [(7, 7), (12, 12), (1, 1)],
    "chunked_prefill": [(20, 6), (9, 9)],
    "mixed": [(15, 1), (18, 5), (3, 3), (30, 1)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_matches_dense(case: str, heads: int, kv_heads: int) -> None:
    seqs = CASES[case]
    dim, scale = 16, 16**-0.5
    q, kv, meta, full = _batch(seqs, heads, kv_heads, dim, torch.float32, seed=len(case) + heads)
    out = paged_attention(q, kv, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    # Every layer of a step reuses the same metadata (and any per-step plan cached on it): same answer.
    torch.testing.assert_close(paged_attention(q, kv, meta, scale), out, atol=0, rtol=0)
    start = 0
    for (ctx, q_len), (k, v) in zip(seqs, full, strict=True):
        expected = _dense(q[start : start + q_len], k, v, ctx, scale)
        torch.testing.assert_close(out[start : start + q_len].double(), expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_bfloat16_close_to_float64() -> None:
    seqs = CASES["mixed"]
    q, kv, meta, full = _batch(seqs, 6, 2, 32, torch.bfloat16, seed=3)
    out = paged_attention(q, kv, meta, 32**-0.5)
    start = 0
    for (ctx, q_len), (k, v) in zip(seqs, full, strict=True):
        expected = _dense(q[start : start + q_len], k, v, ctx, 32**-0.5)
        torch.testing.assert_close(out[start : start + q_len].double(), expected, atol=3e-2, rtol=3e-2)
        start += q_len


def test_write_kv_puts_tokens_at_their_slots_and_padding_in_the_null_block() -> None:
    kv = torch.zeros(2, 4, BLOCK, 2, 3)
    k = torch.arange(3 * 6, dtype=torch.float32).view(3, 2, 3)
    v = -k
    slots = torch.tensor([2 * BLOCK + 1, 3 * BLOCK, 0])  # the last token is padding -> null block slot 0
    write_kv(kv, k, v, slots)
    assert torch.equal(kv[0, 2, 1], k[0]) and torch.equal(kv[1, 2, 1], v[0])
    assert torch.equal(kv[0, 3, 0], k[1]) and torch.equal(kv[1, 3, 0], v[1])
    assert torch.equal(kv[0, 0, 0], k[2])
    assert kv[:, 1].abs().sum() == 0  # untouched block stays empty


def test_layer_view_of_whole_cache_is_written_in_place() -> None:
    whole = torch.zeros(2, 3, 5, BLOCK, 2, 4)  # [2, layers, blocks, block_size, kv_heads, head_dim]
    k = torch.ones(1, 2, 4)
    write_kv(whole[:, 1], k, 2 * k, torch.tensor([3 * BLOCK + 2]))
    assert torch.equal(whole[0, 1, 3, 2], k[0]) and torch.equal(whole[1, 1, 3, 2], 2 * k[0])
    assert whole[:, 0].abs().sum() == 0 and whole[:, 2].abs().sum() == 0


# ---- decode on one thread --------------------------------------------------------------------------------------


def _spy_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records torch's thread count at each SDPA call (and still runs SDPA)."""
    seen: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return seen


DECODE_SHAPES = {
    "one_row": [(128, 1)],
    "one_row_long": [(2000, 1)],
    "rows_of_different_lengths": [(512, 1), (37, 1), (130, 1), (1, 1), (260, 1), (64, 1)],
}


@pytest.mark.parametrize("case", list(DECODE_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_decode_runs_on_one_thread_with_the_same_result(
    case: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    seqs = DECODE_SHAPES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # blocks come from a shuffled free list: every sequence's table is scattered, never contiguous
        q, kv, meta, full = _batch(
            seqs, 6, 2, 16, dtype, seed=7, num_blocks=sum(-(-c // BLOCK) for c, _ in seqs) + 2
        )
        monkeypatch.setattr(attention, "SERIAL_DECODE_PAIRS", -1)  # always the thread pool: the old path
        pooled = paged_attention(q, kv, meta, 0.25)
        monkeypatch.setattr(attention, "SERIAL_DECODE_PAIRS", 1 << 16)
        meta.backend_cache = None
        seen = _spy_threads(monkeypatch)
        serial = paged_attention(q, kv, meta, 0.25)
        assert seen and all(n == 1 for n in seen)  # every group is small here
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # the same kernel; its GEMMs may split a sum differently on one thread (the last bit)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(serial, pooled, atol=tol, rtol=tol)
    for i, ((ctx, _), (k, v)) in enumerate(zip(seqs, full, strict=True)):
        expected = _dense(q[i : i + 1], k, v, ctx, 0.25)
        torch.testing.assert_close(serial[i : i + 1].double(), expected, atol=tol, rtol=tol)


def test_large_decode_groups_keep_the_thread_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    seqs = [(300, 1), (290, 1)]
    q, kv, meta, _ = _batch(seqs, 8, 2, 16, torch.float32, seed=1, num_blocks=160)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(attention, "SERIAL_DECODE_PAIRS", 2 * 8 * 300 - 1)  # just below the group's pairs
        seen = _spy_threads(monkeypatch)
        paged_attention(q, kv, meta, 0.25)
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
