"""Triton paged attention over the shared KV layout: KV write by slot, split-KV decode, varlen prefill with prefixes.

Same contract as inference.attention (the oracle): `write_kv(kv_layer, k, v, slot_mapping)` and
`paged_attention(q, kv_layer, meta, scale) -> [T, heads, head_dim]`; everything stays on the device (no host syncs).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields

import torch
import triton
import triton.language as tl

from inference.metadata import AttentionMetadata

# exp(x) == exp2(x * log2(e)); exp2 is the cheaper instruction on GPUs.
_LOG2E = 1.4426950408889634

_MAX_SPLITS = 16  # most KV partitions one decode sequence is split into
_MIN_KEYS_PER_SPLIT = 256  # fewer keys per partition than this costs more in the reduction than it gains


@dataclass(frozen=True, slots=True)
class Tiles:
    """Tile sizes and launch shape of the attention kernels (the KV-write and reduction kernels have no choices).

    tl.dot needs every dimension >= 16 on GPUs, so each block is a power of two >= 16. Set with `set_tiles` before
    an engine captures its decode graphs (a captured launch keeps the tiles it was captured with), or for a whole
    process with AGENT_RUNTIME_TRITON_TILES="decode_block_n=64,decode_warps=8". `benchmarks/triton_tiles.py`
    times the choices on a GPU.
    """

    decode_block_n: int = 32  # keys per decode iteration
    decode_warps: int = 4
    decode_stages: int = 3
    prefill_block_m: int = 32  # (query token, head) rows per prefill program
    prefill_block_n: int = 32  # keys per prefill iteration
    prefill_warps: int = 4
    prefill_stages: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if f.name.endswith(("block_n", "block_m")) and (value < 16 or value & (value - 1) or value > 256):
                raise ValueError(f"{f.name} must be a power of two from 16 to 256, got {value}")
            if f.name.endswith("warps") and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"{f.name} must be 1, 2, 4, 8 or 16, got {value}")
            if f.name.endswith("stages") and not 1 <= value <= 6:
                raise ValueError(f"{f.name} must be from 1 to 6, got {value}")

    @classmethod
    def parse(cls, spec: str) -> Tiles:
        """Tiles from "name=value,..." (unnamed fields keep their defaults); ValueError names what is wrong."""
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(f"{item!r} is not name=value with a name among {', '.join(sorted(known))}")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw.strip()!r}") from None
        return cls(**values)

    def spec(self) -> str:
        """The "name=value,..." of the fields that differ from the defaults ("" for the defaults)."""
        default = asdict(Tiles())
        return ",".join(f"{k}={v}" for k, v in asdict(self).items() if v != default[k])


_tiles = Tiles()


def tiles() -> Tiles:
    """The tiles the next launches use."""
    return _tiles


def set_tiles(new: Tiles) -> Tiles:
    """Use `new` for every later launch; returns the tiles it replaces."""
    global _tiles
    old, _tiles = _tiles, new
    return old


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even, as compiled code does; the interpreter truncates fp32 -> bfloat16."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            # pre-rounded: truncating the low half now rounds to even. Zeros and subnormals are left alone: the
            # interpreter turns a biased zero (0x00007FFF) into the smallest normal bfloat16 instead of 0.
            bias = tl.where((bits & 0x7F800000) == 0, 0, 0x7FFF + ((bits >> 16) & 1))
            x = (bits + bias).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program per new token: copy its [kv_heads, head_dim] K and V into the cache slot, casting to the cache dtype."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)
    cache_off = block * stride_cb + offset * stride_ct + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_off, _cast(k, k_cache_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + cache_off, _cast(v, v_cache_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_row_ptr,
    kv_head,
    start,
    row_limit,
    kv_end,
    stride_cb,
    stride_ct,
    stride_ch,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N) read through the block table.

    `row_limit` ([M]) is the last key position each query row may see; keys at or past `kv_end` do not exist.
    """
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    key_ok = n < kv_end
    # Token n lives in page n // BLOCK_SIZE of this sequence, at offset n % BLOCK_SIZE inside it; BLOCK_N need not
    # match the page size, so one tile may span several pages (or part of one).
    block = tl.load(table_row_ptr + n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    base = block * stride_cb + (n % BLOCK_SIZE).to(tl.int64) * stride_ct + kv_head * stride_ch
    kv_mask = key_ok[None, :] & (d[:, None] < HEAD_DIM)
    k = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=kv_mask, other=0.0)  # [D, N]
    if (
        INTERPRETER
    ):  # the interpreter's tl.dot is wrong for bfloat16 (it multiplies the raw bits): do it in fp32
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
    s = s * qk_scale  # [M, N], log2 domain
    visible = key_ok[None, :] & (n[None, :] <= row_limit[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_mask = key_ok[:, None] & (d[None, :] < HEAD_DIM)
    v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=v_mask, other=0.0)  # [N, D]
    p_low = _cast(p, v.dtype, INTERPRETER)  # rounded like the GPU path, also when the dot itself runs in fp32
    if INTERPRETER:
        pv = tl.dot(p_low.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p_low, v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


# The block-table width changes from step to step in eager steps: specialising on it (value 1, multiple of 16) would
# compile extra variants mid-run for no gain in a multiply-add.
@triton.jit(do_not_specialize=["stride_table"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    ctx_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_cb,
    stride_ct,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (sequence, kv head, split): the GROUP query heads sharing that KV head over one slice of the context.

    With one split it writes the output; otherwise it leaves unnormalised partials (acc, max, sum) for the reduction.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_ok = g < GROUP
    q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0
    )
    q = _cast(q, k_cache_ptr.dtype.element_ty, INTERPRETER)

    # This split's share of the key tiles; a split past the end of a short sequence does no work.
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    lo = split * per_split * BLOCK_N
    hi = tl.minimum((split + 1) * per_split * BLOCK_N, ctx)

    # Running maxima start at a finite "minus infinity": a row whose keys are all masked keeps m == -1e30 and
    # exp2(-inf + 1e30) == 0, where a true -inf would give exp2(-inf + inf) == NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    row_limit = tl.full([BLOCK_G], 0, tl.int32) + ctx - 1  # a decode query sees its whole context
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head, start, row_limit, hi,
            stride_cb, stride_ct, stride_ch, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_PRECISION, INTERPRETER,
        )  # fmt: skip

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, _cast(out, out_ptr.dtype.element_ty, INTERPRETER), mask=q_mask)
    else:
        # partials are [S, H, NUM_SPLITS, BLOCK_D] and [S, H, NUM_SPLITS, 2], contiguous fp32
        row = (seq * NUM_HEADS + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (sequence, head): merge the per-split partial softmaxes into the output row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    row = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + row * 2)
    l_s = tl.load(part_ml_ptr + row * 2 + 1)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :])
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - m_max)  # an empty split has m == -1e30 and l == 0, so weight ~0 and nothing to add
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, _cast(out, out_ptr.dtype.element_ty, INTERPRETER), mask=d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_table"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    ctx_ptr,
    qsl_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_cb,
    stride_ct,
    stride_ch,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (sequence, kv head, query tile): BLOCK_Q new tokens x GROUP heads as BLOCK_M rows, one K/V read each.

    Query i of a sequence with context C and query length Q sits at position C - Q + i and sees keys 0 .. C - Q + i.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return  # the grid is sized for the longest query in the batch
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = tile * BLOCK_Q + r // GROUP  # query index inside the sequence
    heads = kv_head * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (tok < q_len)
    q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0
    )
    q = _cast(q, k_cache_ptr.dtype.element_ty, INTERPRETER)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_limit = prefix + tok
    # keys past the last query's position in this tile are invisible to every row: stop there
    kv_end = tl.minimum(prefix + tl.minimum((tile + 1) * BLOCK_Q, q_len), ctx)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    for start in range(0, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head, start, row_limit, kv_end,
            stride_cb, stride_ct, stride_ch, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_PRECISION, INTERPRETER,
        )  # fmt: skip

    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, _cast(out, out_ptr.dtype.element_ty, INTERPRETER), mask=q_mask)


# @triton.jit chose interpreter or compiler when the kernels above were defined (TRITON_INTERPRET at import time).
INTERPRETED: bool = type(_write_kv_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, floor: int = 1) -> int:
    p: int = triton.next_power_of_2(n)
    return max(floor, p)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32 on tensor cores: the backend has to agree with the oracle to 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(kv_layer: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(
            f"kv_layer must be [2, num_blocks, block_size, kv_heads, head_dim], got {tuple(kv_layer.shape)}"
        )
    if kv_layer.stride(-1) != 1:
        raise ValueError("kv_layer's head_dim must be contiguous")


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K and V ([T, kv_heads, head_dim]) at their slots in one layer's cache, in one launch."""
    _check_cache(kv_layer)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _, _, block_size, kv_heads, head_dim = kv_layer.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=_pow2(kv_heads), BLOCK_D=_pow2(head_dim), INTERPRETER=INTERPRETED,
    )  # fmt: skip


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (the AOT check substitutes its target's count)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_decode_splits(num_seqs: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """How many KV partitions each decode sequence uses: enough programs to fill the GPU when the batch is small."""
    # off CUDA (the interpreter runs programs one by one) there is nothing to fill; pretend a tiny GPU
    sms = (
        sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 4
    )
    programs = num_seqs * kv_heads
    by_length = max(1, max_context_len // _MIN_KEYS_PER_SPLIT)
    by_occupancy = max(1, -(-2 * sms // programs))  # about two programs per SM
    return min(_MAX_SPLITS, _pow2(min(by_length, by_occupancy)))


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of the new queries `q` ([T, heads, head_dim]) over each sequence's cached K/V -> [T, heads, head_dim].

    The new tokens' K/V must already be in the cache (see write_kv). Decode-only batches take the split-KV decode
    kernel (`num_splits` overrides the automatic choice, a power of two); anything else takes the varlen kernel.
    """
    _check_cache(kv_layer)
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, kv_dim = kv_layer.shape
    if kv_dim != head_dim or num_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_layer {tuple(kv_layer.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // kv_heads
    t = _tiles
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    tables = meta.block_tables
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    qk_scale = scale * _LOG2E
    block_d = _pow2(head_dim, 16)
    precision = _dot_precision(kv_layer.dtype)
    num_seqs = meta.num_seqs
    if meta.is_decode_only:
        splits = num_splits or num_decode_splits(num_seqs, kv_heads, meta.max_context_len, q.device)
        if splits & (splits - 1):
            raise ValueError(f"num_splits must be a power of two, got {splits}")
        if splits > 1:
            part_acc = torch.empty(num_seqs, num_heads, splits, block_d, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(num_seqs, num_heads, splits, 2, dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out  # unused by the single-split specialisation
        _decode_kernel[(num_seqs, kv_heads, splits)](
            q, k_cache, v_cache, tables, meta.context_lens, out, part_acc, part_ml, qk_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_G=_pow2(group, 16), BLOCK_N=t.decode_block_n, BLOCK_D=block_d,
            NUM_SPLITS=splits, DOT_PRECISION=precision, INTERPRETER=INTERPRETED,
            num_warps=t.decode_warps, num_stages=t.decode_stages,
        )  # fmt: skip
        if splits > 1:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                part_acc, part_ml, out, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits,
                INTERPRETER=INTERPRETED,
            )  # fmt: skip
        return out
    block_m = max(t.prefill_block_m, _pow2(group))
    block_q = block_m // group
    grid = (num_seqs, kv_heads, triton.cdiv(meta.max_query_len, block_q))
    _prefill_kernel[grid](
        q, k_cache, v_cache, tables, meta.context_lens, meta.query_start_loc, out, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=t.prefill_block_n, BLOCK_D=block_d,
        DOT_PRECISION=precision, INTERPRETER=INTERPRETED,
        num_warps=t.prefill_warps, num_stages=t.prefill_stages,
    )  # fmt: skip
    return out
