"""Fused Triton kernels for a decoder layer's elementwise work: RMSNorm (with the residual add), SiLU-and-mul, and
q/k RMSNorm + RoPE in one launch. Same signatures and rounding as inference.layer_ops.EAGER_OPS (the oracle).

In eager torch each of these is several kernels with a round trip to memory between them (RMSNorm alone is about
seven); here each is one pass. Every intermediate the eager ops round to the model dtype is rounded here too, so
bf16 results match the eager ones to within the reduction order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference.layer_ops import LayerOps, Tensor
from inference.triton_attention import INTERPRETED, _cast, _pow2

_SILU_BLOCK = 1024  # columns of the intermediate size per SiLU-and-mul program


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x rounded to `dtype` and back to float32: what an eager op in that dtype leaves behind."""
    return _cast(x, dtype, INTERPRETER).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    out_ptr,
    res_out_ptr,
    w_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program per row: optionally sum = x + residual (stored as the new residual), then RMSNorm of it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype, INTERPRETER)
        tl.store(res_out_ptr + row * stride_res_out + cols, x.to(dtype), mask=mask)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * _round(x * inv_rms, dtype, INTERPRETER)
    tl.store(out_ptr + row * stride_out + cols, _cast(y, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Programs over (row, column block): out = silu(gate) * up, gate = x[:, :n], up = x[:, n:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype, INTERPRETER)
    tl.store(out_ptr + row * stride_out + cols, _cast(silu * up, dtype, INTERPRETER), mask=mask)


@triton.jit
def _norm_rotate_heads(
    src_ptr,
    dst_ptr,
    w_ptr,
    t,
    stride_t,
    stride_h,
    cos,
    sin,
    eps,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """All heads of token t: optional per-head RMSNorm, then rotate-half RoPE, into a contiguous [heads, dim] row."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < HEADS) & (d < HALF)
    dtype = dst_ptr.dtype.element_ty
    src = src_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = _round(w1 * _round(x1 * inv_rms, dtype, INTERPRETER), dtype, INTERPRETER)
        x2 = _round(w2 * _round(x2 * inv_rms, dtype, INTERPRETER), dtype, INTERPRETER)
    # eager: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype; the tables repeat their
    # first half, so cos[d] == cos[d + HALF]
    o1 = _round(x1 * cos, dtype, INTERPRETER) + _round(-x2 * sin, dtype, INTERPRETER)
    o2 = _round(x2 * cos, dtype, INTERPRETER) + _round(x1 * sin, dtype, INTERPRETER)
    dst = dst_ptr + t * (HEADS * HEAD_DIM) + h * HEAD_DIM + d
    tl.store(dst, _cast(o1, dtype, INTERPRETER), mask=mask)
    tl.store(dst + HALF, _cast(o2, dtype, INTERPRETER), mask=mask)


@triton.jit
def _norm_rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    qw_ptr,
    kw_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    eps,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program per token: its q heads and its k heads, which share the token's cos/sin row."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=dmask, other=0.0).to(tl.float32)
    _norm_rotate_heads(
        q_ptr, q_out_ptr, qw_ptr, t, stride_qt, stride_qh, cos, sin, eps,
        Q_HEADS, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF, HAS_NORM, INTERPRETER,
    )  # fmt: skip
    _norm_rotate_heads(
        k_ptr, k_out_ptr, kw_ptr, t, stride_kt, stride_kh, cos, sin, eps,
        KV_HEADS, HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF, HAS_NORM, INTERPRETER,
    )  # fmt: skip


def _warps(block: int) -> int:
    """Warps for a one-row program of `block` elements: enough lanes to hold the row without spilling."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _rows(x: Tensor) -> Tensor:
    """`x` as [rows, last dim] without a copy when its last dim is contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor | None]:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not match rows of {x.shape[-1]}")
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res = res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)}"
            )
        res = _rows(residual)
        res_out = torch.empty_like(x)
    if rows.shape[0] == 0:
        return out, res_out
    block = _pow2(x.shape[-1])
    out2 = out.view(-1, x.shape[-1])
    res_out2 = res_out.view(-1, x.shape[-1]) if res_out is not None else out2
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res if res is not None else rows, out2, res_out2, weight,
        rows.stride(0), (res if res is not None else rows).stride(0), out2.stride(0), res_out2.stride(0),
        x.shape[-1], eps,
        HAS_RESIDUAL=res is not None, BLOCK=block, INTERPRETER=INTERPRETED, num_warps=_warps(block),
    )  # fmt: skip
    return out, res_out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of `x` (any leading shape); same contract as layer_ops.rms_norm."""
    return _rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual), x + residual) in one pass; same contract as layer_ops.add_rms_norm."""
    out, res_out = _rms_norm(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for `gate_up` = [..., 2 * n]; same contract as layer_ops.silu_and_mul."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate then up), got {gate_up.shape[-1]}")
    n = gate_up.shape[-1] // 2
    rows = _rows(gate_up)
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] == 0:
        return out
    out2 = out.view(-1, n)
    block = min(_SILU_BLOCK, _pow2(n))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](
        rows, out2, rows.stride(0), out2.stride(0), n, BLOCK=block, INTERPRETER=INTERPRETED, num_warps=4
    )
    return out


def norm_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Optional per-head RMSNorm then RoPE of q [T, H, D] and k [T, KVH, D] (rows may be strided views of a fused
    qkv output) in one launch; cos/sin are [T, 1, D] or [T, D]. Returns new contiguous q and k."""
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[0] != t or k.shape[2] != dim or dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share tokens and an even head dim")
    has_norm = q_weight is not None and k_weight is not None
    q_out = torch.empty(t, heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, kv_heads, dim, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos2, sin2 = _rows(cos), _rows(sin)
    _norm_rotary_kernel[(t,)](
        q, k, q_out, k_out,
        q_weight if has_norm else q, k_weight if has_norm else k,
        cos2, sin2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos2.stride(0), sin2.stride(0),
        eps,
        Q_HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=dim, HALF=dim // 2,
        BLOCK_HQ=_pow2(heads), BLOCK_HK=_pow2(kv_heads), BLOCK_HALF=_pow2(dim // 2),
        HAS_NORM=has_norm, INTERPRETER=INTERPRETED,
        num_warps=_warps(_pow2(max(heads, kv_heads)) * _pow2(dim // 2)),
    )  # fmt: skip
    return q_out, k_out


TRITON_OPS = LayerOps("triton", rms_norm, add_rms_norm, silu_and_mul, norm_rotary)
