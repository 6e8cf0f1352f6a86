"""The fused Triton layer kernels agree with the eager torch ops (inference.layer_ops, the oracle).

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported);
on a CUDA machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

# TRITON_INTERPRET is set in tests/conftest.py where there is no GPU, before anything imports triton
try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with the dev environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

from inference import layer_ops as eager
from inference import triton_layers as fused
from inference.attention_backends import get_attention_backend
from inference.triton_attention import INTERPRETED

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = (torch.bfloat16, torch.float16)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def _close_fp32(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _close_half(got: torch.Tensor, want_fp32: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """Within 2e-2 of the fp32 oracle on the same values, and within one rounding step of the eager op in the
    same dtype (the kernels round every intermediate the eager ops round). Under the interpreter, whose
    arithmetic is numpy's, bfloat16 results are the eager ones bit for bit; compiled exp/rsqrt may differ."""
    assert got.dtype == same_dtype.dtype
    torch.testing.assert_close(got.float(), want_fp32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, same_dtype, atol=1e-2, rtol=1e-2)
    if INTERPRETED and got.dtype == torch.bfloat16:
        assert torch.equal(got, same_dtype)


# ---- RMSNorm --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (7, 96), (5, 576), (3, 2048)])
def test_rms_norm_fp32(tokens: int, hidden: int) -> None:
    x = _randn(tokens, hidden, seed=hidden, scale=3.0)
    w = _randn(hidden, seed=hidden + 1)
    _close_fp32(fused.rms_norm(x, w, 1e-6), eager.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_half_precision(dtype: torch.dtype) -> None:
    x = _randn(6, 192, seed=1, scale=2.0)
    w = _randn(192, seed=2)
    got = fused.rms_norm(x.to(dtype), w.to(dtype), 1e-5)
    _close_half(got, eager.rms_norm(x, w, 1e-5), eager.rms_norm(x.to(dtype), w.to(dtype), 1e-5))


def test_rms_norm_takes_leading_dims_and_strided_rows() -> None:
    base = _randn(4, 3, 80, seed=3)
    x = base[:, :, :40]  # rows of 40 elements, 80 apart
    w = _randn(40, seed=4)
    got = fused.rms_norm(x, w, 1e-6)
    assert got.shape == (4, 3, 40) and got.is_contiguous()
    _close_fp32(got, eager.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_add_rms_norm_returns_the_sum_as_the_new_residual(dtype: torch.dtype) -> None:
    x = _randn(9, 128, seed=5).to(dtype)
    residual = _randn(9, 128, seed=6, scale=4.0).to(dtype)
    w = _randn(128, seed=7).to(dtype)
    normed, new_residual = fused.add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_residual = eager.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(new_residual, want_residual)  # one rounded add in both: bit for bit
    assert torch.equal(residual, _randn(9, 128, seed=6, scale=4.0).to(dtype))  # inputs untouched
    if dtype == torch.float32:
        _close_fp32(normed, want_normed)
    else:
        want_fp32 = eager.rms_norm(want_residual.float(), w.float(), 1e-6)
        _close_half(normed, want_fp32, want_normed)


def test_rms_norm_rejects_mismatched_shapes() -> None:
    x = _randn(2, 32, seed=8)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, _randn(16, seed=9), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.add_rms_norm(x, _randn(2, 16, seed=9), _randn(32, seed=9), 1e-6)


# ---- SiLU and mul ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "n"), [(1, 48), (5, 1536), (3, 2100)])  # 2100: several column blocks
def test_silu_and_mul_fp32(tokens: int, n: int) -> None:
    gate_up = _randn(tokens, 2 * n, seed=n, scale=3.0)
    _close_fp32(fused.silu_and_mul(gate_up), eager.silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", HALF)
def test_silu_and_mul_half_precision(dtype: torch.dtype) -> None:
    gate_up = _randn(4, 2 * 160, seed=11, scale=4.0)
    got = fused.silu_and_mul(gate_up.to(dtype))
    _close_half(got, eager.silu_and_mul(gate_up), eager.silu_and_mul(gate_up.to(dtype)))


def test_silu_and_mul_strided_rows_and_bad_width() -> None:
    base = _randn(3, 200, seed=12)
    gate_up = base[:, :64]
    _close_fp32(fused.silu_and_mul(gate_up), eager.silu_and_mul(gate_up))
    with pytest.raises(ValueError, match="even"):
        fused.silu_and_mul(_randn(2, 33, seed=13))


# ---- q/k norm + RoPE -----------------------------------------------------------------------------------------


def _qk_case(
    tokens: int, heads: int, kv_heads: int, dim: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k as strided views of one fused qkv output, as the attention layer passes them, and cos/sin rows
    [T, 1, dim] whose halves repeat (as RotaryEmbedding builds them)."""
    qkv = _randn(tokens, (heads + 2 * kv_heads) * dim, seed=seed, scale=2.0)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    angles = _randn(tokens, 1, dim // 2, seed=seed + 1, scale=3.0)
    angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(4, 2, 16), (6, 2, 24), (8, 1, 64), (3, 3, 32)],  # GQA, head dim not a power of two, MQA, MHA
)
@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rotary_fp32(heads: int, kv_heads: int, dim: int, with_norm: bool) -> None:
    q, k, cos, sin = _qk_case(5, heads, kv_heads, dim, seed=heads * 100 + dim)
    qw = _randn(dim, seed=1) if with_norm else None
    kw = _randn(dim, seed=2) if with_norm else None
    got_q, got_k = fused.norm_rotary(q, k, cos, sin, qw, kw, 1e-6)
    want_q, want_k = eager.norm_rotary(q, k, cos, sin, qw, kw, 1e-6)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    _close_fp32(got_q, want_q)
    _close_fp32(got_k, want_k)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rotary_half_precision(dtype: torch.dtype, with_norm: bool) -> None:
    q, k, cos, sin = _qk_case(4, 4, 2, 32, seed=21)
    qw = _randn(32, seed=3) if with_norm else None
    kw = _randn(32, seed=4) if with_norm else None
    h = [t.to(dtype) for t in (q, k, cos, sin)]
    hw = [None if w is None else w.to(dtype) for w in (qw, kw)]
    got = fused.norm_rotary(*h, *hw, 1e-6)
    want32 = eager.norm_rotary(q, k, cos, sin, qw, kw, 1e-6)
    same = eager.norm_rotary(*h, *hw, 1e-6)
    for g, w32, s in zip(got, want32, same, strict=True):
        _close_half(g, w32, s)


def test_norm_rotary_leaves_its_inputs_alone_and_handles_no_tokens() -> None:
    q, k, cos, sin = _qk_case(3, 4, 2, 16, seed=31)
    q0, k0 = q.clone(), k.clone()
    fused.norm_rotary(q, k, cos, sin, None, None, 1e-6)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    e_q, e_k = fused.norm_rotary(q[:0], k[:0], cos[:0], sin[:0], None, None, 1e-6)
    assert e_q.shape == (0, 4, 16) and e_k.shape == (0, 2, 16)
    with pytest.raises(ValueError, match="even head dim"):
        fused.norm_rotary(q, k[:2], cos, sin, None, None, 1e-6)


def test_empty_batches_launch_nothing() -> None:
    w = _randn(32, seed=1)
    assert fused.rms_norm(_randn(0, 32, seed=1), w, 1e-6).shape == (0, 32)
    normed, res = fused.add_rms_norm(_randn(0, 32, seed=1), _randn(0, 32, seed=2), w, 1e-6)
    assert normed.shape == res.shape == (0, 32)
    assert fused.silu_and_mul(_randn(0, 64, seed=1)).shape == (0, 32)


def test_triton_backend_brings_the_fused_ops_and_the_reference_the_eager_ones() -> None:
    assert get_attention_backend(DEVICE, "triton").layer_ops is fused.TRITON_OPS
    assert get_attention_backend(DEVICE, "reference").layer_ops is eager.EAGER_OPS
