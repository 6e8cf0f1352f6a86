"""The pieces of benchmarks/compiled_decode.py that decide what it measures: the KV write as a custom op with a
declared mutation, and the static decode attention, traced whole (aot_eager: dynamo plus functionalization,
without inductor's compile time) against the reference attention."""

from __future__ import annotations

import torch

from benchmarks.compiled_decode import static_decode_attention, write_kv_op
from inference import attention as reference
from inference.metadata import AttentionMetadata


def _case() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    blocks, block_size, kv_heads, dim = 5, 4, 2, 8
    kv = torch.randn(2, blocks, block_size, kv_heads, dim, generator=gen)
    q = torch.randn(2, 4, dim, generator=gen)
    k = torch.randn(2, kv_heads, dim, generator=gen)
    v = torch.randn(2, kv_heads, dim, generator=gen)
    return kv, q, k, v


def _meta() -> AttentionMetadata:
    # two sequences of 6 and 3 tokens: blocks [1, 2] and [3, 0 (padding)]; each new token at its last position
    return AttentionMetadata(
        slot_mapping=torch.tensor([1 * 4 + 1, 3 * 4 + 2]),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        context_lens=torch.tensor([6, 3], dtype=torch.int32),
        block_tables=torch.tensor([[1, 2], [3, 0]], dtype=torch.int32),
        max_query_len=1,
        max_context_len=6,
        block_size=4,
    )


def test_the_kv_op_writes_what_the_reference_writes() -> None:
    kv, _, k, v = _case()
    want = kv.clone()
    reference.write_kv(want, k, v, _meta().slot_mapping)
    write_kv_op(kv, k, v, _meta().slot_mapping)
    assert torch.equal(kv, want)


def test_a_compiled_step_writes_the_cache_and_attends_like_the_reference() -> None:
    kv, q, k, v = _case()
    eager_kv = kv.clone()
    meta = _meta()
    reference.write_kv(eager_kv, k, v, meta.slot_mapping)
    want = reference.paged_attention(q, eager_kv, meta, 0.35)

    def step(kv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        write_kv_op(kv, k, v, meta.slot_mapping)
        return static_decode_attention(q, kv, meta, 0.35)

    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(kv, q, k, v)
    assert torch.equal(kv, eager_kv)  # the declared mutation reached the caller's cache
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
