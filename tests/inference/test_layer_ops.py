"""The eager layer ops against their textbook forms: the same values, bit for bit."""

from __future__ import annotations

import pytest
import torch

from inference.layer_ops import apply_rotary, norm_rotary, rms_norm


def _textbook_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: float32 statistics, cast back, then the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 896), (3, 9, 64)])
def test_rms_norm_equals_the_textbook_form(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    weight = torch.rand(shape[-1], generator=gen).to(dtype)
    assert torch.equal(rms_norm(x, weight, 1e-5), _textbook_rms_norm(x, weight, 1e-5))


def _qkv(tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(tokens + heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    cos = torch.randn(tokens, 1, dim, generator=gen).to(dtype)
    sin = torch.randn(tokens, 1, dim, generator=gen).to(dtype)
    return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads"), [(1, 9, 3), (5, 14, 2), (3, 4, 4)])
def test_rotary_of_side_by_side_q_and_k_equals_rotating_each(
    dtype: torch.dtype, tokens: int, heads: int, kv_heads: int
) -> None:
    q, k, _, cos, sin = _qkv(tokens, heads, kv_heads, 16, dtype)
    got_q, got_k = norm_rotary(q, k, cos, sin, None, None, 1e-6)
    # they were rotated as one tensor: views of one new buffer
    assert got_k.data_ptr() == got_q.data_ptr() + heads * 16 * got_q.element_size()
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))


def test_rotary_of_separate_q_and_k_rotates_each() -> None:
    q, _, _, cos, sin = _qkv(2, 6, 2, 16, torch.float32)
    k = torch.randn(2, 2, 16)  # its own buffer: nothing to join
    got_q, got_k = norm_rotary(q, k, cos, sin, None, None, 1e-6)
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))
    # q and v of one buffer are not side by side (k sits between them)
    q, _, v, cos, sin = _qkv(2, 6, 2, 16, torch.float32)
    got_q, got_v = norm_rotary(q, v.view(2, 2, 16), cos, sin, None, None, 1e-6)
    assert torch.equal(got_v, apply_rotary(v.view(2, 2, 16), cos, sin))
    assert torch.equal(got_q, apply_rotary(q, cos, sin))


def test_qk_norm_then_rotary() -> None:
    q, k, _, cos, sin = _qkv(3, 4, 2, 16, torch.float32)
    qw, kw = torch.rand(16), torch.rand(16)
    got_q, got_k = norm_rotary(q, k, cos, sin, qw, kw, 1e-6)
    assert torch.equal(got_q, apply_rotary(rms_norm(q, qw, 1e-6), cos, sin))
    assert torch.equal(got_k, apply_rotary(rms_norm(k, kw, 1e-6), cos, sin))


def test_rotary_traces_whole_under_torch_compile() -> None:
    # storage addresses do not trace: a compiled decode step (inference/compiled_decode.py) needs norm_rotary in
    # one graph, with the rotations it gives eagerly
    q, k, _, cos, sin = _qkv(3, 9, 3, 16, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(norm_rotary, backend="eager", fullgraph=True)
    got_q, got_k = compiled(q, k, cos, sin, None, None, 1e-6)
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))
