"""The elementwise work of a decoder layer (RMSNorm, residual add + RMSNorm, SiLU-and-mul, q/k norm + RoPE) as
eager torch ops: `EAGER_OPS` runs on any device and is the oracle the fused Triton kernels must agree with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in float32 like Hugging Face's LlamaRMSNorm, cast back, then scaled by `weight`."""
    dtype = x.dtype
    xf = x.float()
    # in place on the [..., 1] statistic: the same values with two allocations fewer (a decode step has 61 norms)
    xf = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * xf.to(dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Add the residual first, normalise the sum; returns (normed, new residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for `gate_up` = [..., 2 * intermediate] (gate first, as the fused projection packs them)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim] rotated by cos/sin [T, 1, head_dim] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def norm_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k when their weights are given (Qwen3), then RoPE on both.

    Without the norms, q and k that sit side by side in one buffer (the fused qkv projection's output, split) are
    rotated as one tensor: the same elementwise sums in half the ops (a decode step runs this in every layer).
    """
    if q_weight is not None and k_weight is not None:
        q = rms_norm(q, q_weight, eps)
        k = rms_norm(k, k_weight, eps)
    else:
        qk = _side_by_side(q, k)
        if qk is not None:
            out = apply_rotary(qk, cos, sin)
            heads = q.shape[1]
            return out[:, :heads], out[:, heads:]
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _side_by_side(q: Tensor, k: Tensor) -> Tensor | None:
    """q [T, Hq, D] and k [T, Hk, D] as one [T, Hq + Hk, D] view when k's heads follow q's in each row of the
    same buffer, else None."""
    if q.dim() != 3 or k.dim() != 3 or q.dtype != k.dtype:
        return None
    t, heads, dim = q.shape
    if k.shape[0] != t or k.shape[2] != dim:
        return None
    # heads contiguous in both; the row stride matters only with more than one row (a size-1 dim's stride is
    # arbitrary: one decode token's q and k views differ there)
    if q.stride()[1:] != (dim, 1) or k.stride()[1:] != (dim, 1) or (t > 1 and q.stride(0) != k.stride(0)):
        return None
    if torch.compiler.is_compiling():
        # storage addresses do not trace; a compiled graph fuses the two rotations anyway
        return None
    if k.data_ptr() != q.data_ptr() + heads * dim * q.element_size():
        return None
    return q.as_strided((t, heads + k.shape[1], dim), (q.stride(0), dim, 1))


@dataclass(frozen=True, slots=True)
class LayerOps:
    """The elementwise work of a decoder layer. `EAGER_OPS` (torch ops, any device) is the oracle; the Triton
    backend brings fused kernels with the same signatures (inference/triton_layers.py)."""

    name: str
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    silu_and_mul: Callable[[Tensor], Tensor]
    norm_rotary: Callable[
        [Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, float], tuple[Tensor, Tensor]
    ]


EAGER_OPS = LayerOps("eager", rms_norm, add_rms_norm, silu_and_mul, norm_rotary)
