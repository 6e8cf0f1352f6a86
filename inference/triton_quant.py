"""Weight-only int8/int4 matmuls for CUDA in Triton (the layer that holds the weights and calls them is
inference.quant.TritonQuantLinear).

The same two layouts as inference/quant.py's CPU kernels, read straight from quantized memory:

- int8: `w[n, k] = q[n, k] * scale[n]`, int8 codes `[N, K]` and bf16 scales `[N]` (the CPU layout itself);
- int4: `w[n, k] = sum over planes p of (q_p[n, k] - 8) * scale_p[n, g] + zero_p[n, g]`, `g = k // group_size`.
  Codes are packed two per byte along K: byte `j` of row `n` holds `k = 2j` in its low nibble and `k = 2j + 1` in
  its high one (uint8 `[planes, N, K / 2]`); scales and zeros are bf16 `[planes, N, K / group_size]`.

Each program computes a `[BLOCK_M, BLOCK_N]` output tile over a range of K (split-K: several programs share one
tile's K and a second launch sums their fp32 partials). Its K tiles never cross an int4 group, so the codes go
into `tl.dot` as small integers (exact in bf16/fp16) and the group's scale and zero are applied to the product:
`x . w_tile = scale * (x . (q - 8)) + zero * sum(x)`, with fp32 products and accumulation. A sum of planes (how
quant.py keeps GGUF's 5- and 8-bit types exact) is one such term per plane, each plane's codes read once. Tiles
are picked by the number of rows (`choose_tiles`): decode (M <= 16) runs one 16-row tile over all rows, so each
weight byte is read once, with split-K to fill the GPU; larger M use bigger tiles and no split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inference import triton_attention
from inference.errors import QuantError
from inference.triton_attention import INTERPRETED, _cast, _dot_precision

# int4 group sizes: inference.config.QUANTIZE_GROUP_SIZES (checked by the layer, quant.check_group_size); a K tile
# (>= 32, so that each nibble half feeds tl.dot at least 16 values) must fit inside one group.
_MAX_SPLITS = 16
_REDUCE_BLOCK = 256  # output columns per program of the split-K sum


@triton.jit(do_not_specialize=["M"])
def _quant_matmul_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wp,
    stride_wn,
    stride_sp,
    stride_sn,
    stride_om,
    stride_os,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_PLANES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Programs over (output tile, K split). With SPLIT_K == 1 the tile is finished here (bias, cast to out's
    dtype); otherwise its fp32 partial goes to `out_ptr[split]` for `_split_k_sum_kernel`."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = rn.to(tl.int64)[None, :] * stride_wn
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_even = k0 + 2 * j
            k_ok = k_even < k_end
            x_mask = m_ok[:, None] & k_ok[None, :]
            x_lo = tl.load(x_rows + k_even[None, :], mask=x_mask, other=0.0)  # [M, K/2]: k = 2j
            x_hi = tl.load(x_rows + k_even[None, :] + 1, mask=x_mask, other=0.0)  # k = 2j + 1
            x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
            if INTERPRETER:  # the interpreter's tl.dot multiplies bfloat16's raw bits: run it in fp32
                x_lo = x_lo.to(tl.float32)
                x_hi = x_hi.to(tl.float32)
            group = k0 // GROUP  # the whole tile lies in this group (BLOCK_K divides GROUP)
            w_mask = k_ok[:, None] & n_ok[None, :]
            for p in tl.static_range(NUM_PLANES):
                b = tl.load(w_ptr + p * stride_wp + w_cols + (k0 // 2 + j)[:, None], mask=w_mask, other=0)
                lo = ((b & 15).to(tl.int32) - 8).to(x_lo.dtype)  # [K/2, N], exact in any float dtype
                hi = ((b >> 4).to(tl.int32) - 8).to(x_lo.dtype)
                part = tl.dot(x_lo, lo, input_precision=DOT_PRECISION)
                part = tl.dot(x_hi, hi, acc=part, input_precision=DOT_PRECISION)
                sz = p * stride_sp + rn * stride_sn + group
                scale = tl.load(s_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)
                acc += part * scale[None, :] + x_sum[:, None] * zero[None, :]
    else:
        kr = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + kr
            k_ok = kk < k_end
            xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if INTERPRETER:
                xt = xt.to(tl.float32)
            q = tl.load(w_ptr + w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(
                xt, q.to(xt.dtype), acc=acc, input_precision=DOT_PRECISION
            )  # int8 exact in bf16/fp16
        acc = acc * tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_off = rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)
    else:
        tl.store(out_ptr + split * stride_os + out_off, acc, mask=out_mask)


@triton.jit(do_not_specialize=["M"])
def _split_k_sum_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    stride_ps,
    stride_pm,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Programs over (row, column block): out = sum of the splits' fp32 partials (+ bias), cast to out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    s = tl.arange(0, SPLIT_K)
    parts = tl.load(
        part_ptr + s[:, None] * stride_ps + row * stride_pm + cols[None, :], mask=ok[None, :], other=0.0
    )
    y = tl.sum(parts, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, _cast(y, out_ptr.dtype.element_ty, INTERPRETER), mask=ok)


# ---- launch shapes --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantTiles:
    """One launch's tiles: rows, columns and K per step of a program, K splits, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    warps: int
    stages: int


def kernels_run_on(device: torch.device) -> bool:
    """Whether a launch on `device` runs: CUDA, or CPU tensors under the interpreter (the AOT compile, which
    launches nothing, lets every device through)."""
    return device.type == "cuda" or INTERPRETED


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors to fill (the AOT compile substitutes its target's count); off CUDA, where the
    interpreter runs programs one by one, a tiny GPU."""
    if device.type != "cuda":
        return 4
    return triton_attention.sm_count(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.lru_cache(maxsize=4096)  # pure; asked once per layer per eager step, with few distinct shapes
def choose_tiles(m: int, n: int, k: int, group_size: int, sms: int) -> QuantTiles:
    """Tiles for `[m, k] x [k, n]` (`group_size` 0 for int8). Decode sizes (m <= 16) take one 16-row tile (the
    smallest tl.dot takes), so each weight byte is read once, and split K until the programs fill the GPU twice
    over; batches up to 64 rows a 32-row tile; prefill 64 x 128 tiles for int8, 64 x 64 for int4 (whose per-plane
    partial products double the registers a tile needs). An int4 K step stays inside one group. Warps and stages
    are those that compile for sm_80-sm_90 without spilling registers (`python -m inference.triton_aot`)."""
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = 32, 64, 64, 4, 2
    elif group_size:
        block_m, block_n, block_k, warps, stages = 64, 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 3
    if group_size:
        block_k = min(block_k, group_size)
    split = 1
    if m <= 16:
        programs = triton.cdiv(n, block_n)
        k_steps = triton.cdiv(k, block_k)
        # powers of two (the sum kernel's arange); each split keeps at least two K steps
        while split < _MAX_SPLITS and programs * split * 2 <= 2 * sms and k_steps >= split * 4:
            split *= 2
    return QuantTiles(block_m, block_n, block_k, split, warps, stages)


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    tiles: QuantTiles | None = None,
) -> torch.Tensor:
    """`x @ W.T (+ bias)` in x's dtype for x `[M, K]` (fp32 products and accumulation). `group_size` 0: int8
    `qweight [N, K]`, `scales [N]`; else int4 planes `qweight [P, N, K / 2]` (inference.quant.pack_int4_pairs),
    `scales` and `zeros` `[P, N, K / group_size]`. `tiles` overrides `choose_tiles`. QuantError for an input on
    another device than the weight, or a device the kernels do not run on (`kernels_run_on`)."""
    if x.device != qweight.device:
        raise QuantError(
            f"input on {x.device} but the quantized weight on {qweight.device}",
            hint="move the model to one device with .to(device) after quantizing it",
        )
    if not kernels_run_on(x.device):
        raise QuantError(
            f"the Triton int8/int4 kernels do not run on {x.device.type}",
            hint="quantize on the CPU with its own kernels (QuantLinear, quantize_model without kernels='triton'), "
            "or move the model to a GPU",
        )
    m, k = x.shape
    int4 = group_size > 0
    n = int(qweight.shape[-2])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    t = tiles or choose_tiles(m, n, k, group_size, multiprocessors(x.device))
    if int4 and group_size % t.block_k:
        raise ValueError(f"an int4 K step of {t.block_k} crosses groups of {group_size}")
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    target = out if t.split_k == 1 else torch.empty(t.split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n), t.split_k)
    _quant_matmul_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, target,
        m, n, k, k_per_split,
        x.stride(0), qweight.stride(0) if int4 else 0, qweight.stride(-2), scales.stride(0) if int4 else 0,
        scales.stride(-2) if int4 else scales.stride(0), target.stride(-2), target.stride(0),
        INT4=int4, GROUP=max(group_size, 1), NUM_PLANES=int(qweight.shape[0]) if int4 else 1,
        HAS_BIAS=bias is not None, SPLIT_K=t.split_k,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        DOT_PRECISION=_dot_precision(x.dtype), INTERPRETER=INTERPRETED,
        num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    if t.split_k > 1:
        _split_k_sum_kernel[(m, triton.cdiv(n, _REDUCE_BLOCK))](
            target, bias if bias is not None else target, out, m, n,
            target.stride(0), target.stride(1), out.stride(0),
            SPLIT_K=t.split_k, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, INTERPRETER=INTERPRETED,
            num_warps=4,
        )  # fmt: skip
    return out
