"""Reference paged attention (gather + SDPA): the CPU default backend and the oracle for faster backends."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference.cpu_threads import one_thread
from inference.metadata import AttentionMetadata


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K and V ([T, kv_heads, head_dim]) at their slots in one layer's cache.

    `kv_layer` is `[2, num_blocks, block_size, kv_heads, head_dim]`; padding slots point into the null block 0,
    where duplicate writes are harmless.
    """
    num_blocks, block_size, kv_heads, head_dim = kv_layer.shape[1:]
    k_flat = kv_layer[0].view(num_blocks * block_size, kv_heads, head_dim)
    v_flat = kv_layer[1].view(num_blocks * block_size, kv_heads, head_dim)
    k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of the blocks in `block_ids` ([..., n]) as [..., kv_heads, length, head_dim]."""
    block_size, kv_heads, head_dim = cache.shape[1], cache.shape[2], cache.shape[3]
    # index_select on the flat id list is several times faster on CPU than advanced indexing with a 2-D index;
    # the result is contiguous [n_ids, block_size, kv_heads, head_dim]
    gathered = cache.index_select(0, block_ids.reshape(-1))
    # one view instead of view + slice + transpose (called twice per layer and step)
    lead = tuple(block_ids.shape[:-1])
    token, row = kv_heads * head_dim, block_ids.shape[-1] * block_size * kv_heads * head_dim
    lead_strides = tuple(row * math.prod(lead[i + 1 :]) for i in range(len(lead)))
    return gathered.as_strided((*lead, kv_heads, length, head_dim), (*lead_strides, head_dim, token, 1))


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of the new queries `q` ([T, heads, head_dim]) over each sequence's cached K/V -> [T, heads, head_dim].

    The new tokens' K/V must already be in the cache (see write_kv). Query i of a sequence with context length C
    and query length Q sits at position C - Q + i and sees keys 0 .. C - Q + i.
    """
    if meta.is_decode_only:
        return _decode(q, kv_layer, meta, scale)
    return _varlen(q, kv_layer, meta, scale)


# Sequences per SDPA call in batched decode. Attention over a paged cache is bound by copying K/V out of the
# blocks: sorting the batch by context length and gathering a few sequences at a time pads each group only to its
# own longest context and keeps the copy in cache while SDPA reads it (about 3x less CPU time than one padded call
# over 48 sequences of 40-700 tokens, measured here in bf16).
DECODE_CHUNK = 4

# On the CPU a decode group with at most this many query-key pairs (rows x query heads x keys) runs on one thread.
# SDPA's CPU kernel splits every call over the intra-op pool, and for one query row per head the fork and join cost
# more than the split saves: one row of 9 heads over 128 keys took 70 us on one thread against 233 us on two, one
# row of 32 heads over 2000 keys 1.1 ms against 1.3 ms (bf16, 2 shared cores at load 4); 1.05-1.22x less at load
# 1.8 (`python -m benchmarks.decode_attention`). Larger groups (batched decode over long contexts) keep the pool.
SERIAL_DECODE_PAIRS = 1 << 16


@dataclass(slots=True)
class _DecodeGroup:
    start: int  # first row of the group in the length-sorted batch
    end: int
    length: int  # longest context in the group: K/V are gathered up to here
    block_ids: torch.Tensor  # [n * blocks] int64, the group's block tables flattened
    mask: torch.Tensor | None  # [n, 1, 1, length] bool; None when every context in the group is `length` long


@dataclass(slots=True)
class _DecodePlan:
    # [S] int64: the batch rows sorted by context length, longest first; None when the batch is already sorted
    order: torch.Tensor | None
    groups: list[_DecodeGroup]


def _decode_plan(
    meta: AttentionMetadata, num_seqs: int, block_size: int, device: torch.device
) -> _DecodePlan:
    """Group the batch by context length once per step; every layer reuses the plan (it depends on no layer)."""
    cache = meta.backend_cache
    if cache is None:
        cache = meta.backend_cache = {}
    key = ("reference_decode", num_seqs, block_size)
    cached: _DecodePlan | None = cache.get(key)
    if cached is not None:
        return cached
    lens = meta.context_lens[:num_seqs].long().cpu()
    order = torch.argsort(lens, descending=True, stable=True)
    sorted_lens = lens[order]
    tables = meta.block_tables[:num_seqs].cpu()[order]
    groups = []
    for a in range(0, num_seqs, DECODE_CHUNK):
        b = min(a + DECODE_CHUNK, num_seqs)
        group_lens = sorted_lens[a:b]
        length = int(group_lens[0])
        n_blocks = -(-length // block_size)
        block_ids = tables[a:b, :n_blocks].long().reshape(-1).to(device)
        mask = None
        if int(group_lens[-1]) != length:
            mask = (torch.arange(length)[None, :] < group_lens[:, None]).view(b - a, 1, 1, length).to(device)
        groups.append(_DecodeGroup(a, b, length, block_ids, mask))
    identity = bool(torch.equal(order, torch.arange(num_seqs)))
    plan = _DecodePlan(None if identity else order.to(device), groups)
    cache[key] = plan
    return plan


def _decode(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: SDPA over a few length-sorted sequences at a time, each padded and masked."""
    num_seqs, num_heads, head_dim = q.shape
    block_size = kv_layer.shape[2]
    kv_heads, group = kv_layer.shape[3], num_heads // kv_layer.shape[3]
    plan = _decode_plan(meta, num_seqs, block_size, q.device)
    # GQA without repeating K/V: the query heads sharing one KV head become that head's "query rows".
    qg = q.view(num_seqs, kv_heads, group, head_dim)
    if plan.order is not None:
        qg = qg.index_select(0, plan.order)
    if len(plan.groups) == 1 and plan.order is None:  # one sequence (or a few, sorted): no staging buffer
        o = _decode_group(qg, kv_layer, plan.groups[0], num_heads, scale)
        return o.reshape(num_seqs, num_heads, head_dim)
    out = torch.empty_like(qg)
    for g in plan.groups:
        out[g.start : g.end] = _decode_group(qg[g.start : g.end], kv_layer, g, num_heads, scale)
    if plan.order is not None:
        out = torch.empty_like(out).index_copy_(0, plan.order, out)
    return out.reshape(num_seqs, num_heads, head_dim)


def _decode_group(
    qg: torch.Tensor, kv_layer: torch.Tensor, g: _DecodeGroup, num_heads: int, scale: float
) -> torch.Tensor:
    """SDPA of one group's rows `qg` ([n, kv_heads, group, head_dim]) over their gathered, padded K/V."""
    n = g.end - g.start
    k = _gather(kv_layer[0], g.block_ids.view(n, -1), g.length)  # [n, kv_heads, L, D]
    v = _gather(kv_layer[1], g.block_ids.view(n, -1), g.length)
    if n * num_heads * g.length > SERIAL_DECODE_PAIRS or qg.device.type != "cpu":
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=scale)
    with one_thread():  # the same kernel without waking the thread pool (sums may differ in the last bit)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=scale)


def _varlen(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Prefill or mixed batches: one SDPA per sequence with the causal mask shifted by its cached prefix."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = kv_layer.shape[3]
    block_size = kv_layer.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    context_lens = meta.context_lens.tolist()
    for s, ctx in enumerate(context_lens):
        qs, qe = starts[s], starts[s + 1]
        q_len = qe - qs
        if q_len == 0:
            continue
        block_ids = meta.block_tables[s, : -(-ctx // block_size)].long()
        k = _gather(kv_layer[0], block_ids, ctx)  # [kv_heads, C, D]
        v = _gather(kv_layer[1], block_ids, ctx)
        # SDPA on CPU takes its fused (flash) kernel only for 4-D inputs; 3-D ones fall back to the math path.
        k, v = k.unsqueeze(0), v.unsqueeze(0)
        if q_len == 1:
            qg = q[qs:qe].view(1, kv_heads, group, head_dim)
            o = F.scaled_dot_product_attention(qg, k, v, scale=scale)
            out[qs:qe] = o.reshape(1, num_heads, head_dim)
            continue
        qh = q[qs:qe].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        if q_len == ctx:  # no cached prefix: the plain causal mask, which lets the kernel skip masked blocks
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            # Key j is visible to query i when j <= ctx - q_len + i (the causal diagonal shifted by the prefix).
            rows = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows[:, None]
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[qs:qe] = o[0].transpose(0, 1)
    return out
