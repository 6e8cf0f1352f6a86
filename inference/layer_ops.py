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
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
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
    """Per-head RMSNorm of q and k when their weights are given (Qwen3), then RoPE on both."""
    if q_weight is not None and k_weight is not None:
        q = rms_norm(q, q_weight, eps)
        k = rms_norm(k, k_weight, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


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
