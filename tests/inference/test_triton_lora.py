"""The Triton segmented LoRA kernels (inference/triton_lora.py) equal the torch update `(x @ A) @ B` per row: several
adapters and base rows in one batch, unsorted rows, different ranks, fused qkv/gate_up layouts, the per-slot weight
buffers; bad slots and ranks are typed errors. (With PEFT adapters through the engine: test_triton_lora_engine.py.)

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported); on a CUDA machine the same tests run the compiled kernels. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with the dev environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

from inference.config import EngineConfig
from inference.errors import AdapterError
from inference.lora import LoRAAdapter, LoRAWeights
from inference.triton_lora import LoRASlots, add_lora, lora_segments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def reference(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slots: list[int]
) -> torch.Tensor:
    """y + each row's (x @ a[s]) @ b[s], in float64: what the kernels approximate."""
    out = y.double().clone()
    for i, s in enumerate(row_slots):
        if s >= 0:
            out[i] += (x[i].double() @ a[s].double()) @ b[s].double()
    return out


def _run(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: list[int], **kw: Any
) -> None:
    add_lora(y, x, a, b, lora_segments(rows, a.shape[0], DEVICE), **kw)


def test_one_adapter_every_row() -> None:
    x, y = _randn(5, 48, seed=1), _randn(5, 40, seed=2)
    a, b = _randn(1, 48, 8, seed=3, scale=0.3), _randn(1, 8, 40, seed=4, scale=0.3)
    want = reference(y, x, a, b, [0] * 5)
    _run(y, x, a, b, [0] * 5)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    assert (want - reference(y * 0, x * 0, a, b, [0] * 5)).abs().max() > 0.1  # the update is not negligible


@pytest.mark.parametrize("split_k", [1, 2, None], ids=["no-split", "split-2", "auto"])
def test_three_adapters_and_base_rows_unsorted(split_k: int | None) -> None:
    """Rows of three slots interleaved with base rows (-1), slots with different ranks zero-padded to the buffer's
    24 columns, and a fourth slot nobody uses: base rows are left exactly as they were."""
    t, k, n, cols = 11, 150, 70, 24
    x, y = _randn(t, k, seed=5), _randn(t, n, seed=6)
    a, b = _randn(4, k, cols, seed=7, scale=0.2), _randn(4, cols, n, seed=8, scale=0.2)
    for slot, rank in ((0, 24), (1, 8), (2, 3)):  # columns past an adapter's rank are zero in the buffers
        a[slot, :, rank:] = 0
        b[slot, rank:] = 0
    rows = [2, -1, 0, 1, 0, -1, 2, 2, 1, -1, 0]
    want = reference(y, x, a, b, rows)
    before = y.clone()
    _run(y, x, a, b, rows, split_k=split_k)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    base = [i for i, s in enumerate(rows) if s < 0]
    assert torch.equal(y[base], before[base])


def test_rows_past_one_tile_and_strided_inputs() -> None:
    """A prefill-sized segment (more rows than one 64-row tile) and x, y as column slices of wider tensors."""
    t = 70
    xw, yw = _randn(t, 96, seed=9), _randn(t, 100, seed=10)
    x, y = xw[:, 16:80], yw[:, 10:90]
    a, b = _randn(2, 64, 16, seed=11, scale=0.2), _randn(2, 16, 80, seed=12, scale=0.2)
    rows = [1] * 66 + [-1, 0, 0, -1]
    want = reference(y, x, a, b, rows)
    outside = yw[:, :10].clone()
    _run(y, x, a, b, rows)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(yw[:, :10], outside)


def test_bfloat16_within_rounding_of_fp32() -> None:
    x, y = _randn(6, 64, seed=13), _randn(6, 48, seed=14)
    a, b = _randn(2, 64, 16, seed=15, scale=0.2), _randn(2, 16, 48, seed=16, scale=0.2)
    rows = [0, 1, -1, 1, 0, 0]
    want = reference(y, x, a, b, rows)
    y16 = y.bfloat16()
    _run(y16, x.bfloat16(), a.bfloat16(), b.bfloat16(), rows)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), want, atol=6e-2, rtol=2e-2)


def _fused_adapter(
    name: str, seed: int, ranks: tuple[int, ...], outs: tuple[int, ...], k: int
) -> LoRAAdapter:
    """An adapter on one fused module laid out as inference/lora.py stacks it: the shards' A side by side, B
    block-diagonal over the shards' output columns (a rank of 0: that shard is not adapted)."""
    gen = torch.Generator().manual_seed(seed)
    a_parts, blocks = [], []
    for i, r in enumerate(ranks):
        if r:
            a_parts.append(torch.randn(k, r, generator=gen) * 0.2)
            block = torch.zeros(r, sum(outs))
            block[:, sum(outs[:i]) : sum(outs[: i + 1])] = torch.randn(r, outs[i], generator=gen) * 0.2
            blocks.append(block)
    w = LoRAWeights(
        torch.cat(a_parts, 1).to(DEVICE),
        torch.cat(blocks, 0).to(DEVICE),
        tuple((i, r) for i, r in enumerate(ranks) if r),
    )
    return LoRAAdapter(name, Path(name), max(ranks), 1.0, False, None, (), {(0, "self_attn.qkv_proj"): w})


@pytest.mark.parametrize("outs", [(64, 32, 32), (96, 96)], ids=["qkv (q 64, k 32, v 32)", "gate_up (96, 96)"])
def test_fused_projections_through_slots(outs: tuple[int, ...]) -> None:
    """Fused modules with a different rank per shard and per adapter (one adapter skips a shard) put into slots:
    each row gets its adapter's `(x @ A) @ B`, the torch update of inference/lora.py."""
    k = 64
    ranks = [(8, 4, 2)[: len(outs)], (0, 16, 8)[: len(outs)], (4, 0, 0)[: len(outs)]]
    adapters = [_fused_adapter(f"a{i}", 20 + i, r, outs, k) for i, r in enumerate(ranks)]
    slots = LoRASlots(4, DEVICE, torch.float32)
    ids = [slots.put(ad) for ad in adapters]
    assert sorted(ids) == [0, 1, 2]
    x, y = _randn(7, k, seed=30), _randn(7, sum(outs), seed=31)
    which = [1, 0, -1, 2, 1, 0, 1]  # index into adapters
    want = y.clone()
    for i, j in enumerate(which):
        if j >= 0:
            w = adapters[j].modules[(0, "self_attn.qkv_proj")]
            want[i] += (x[i] @ w.a_t) @ w.b_t
    slots.apply((0, "self_attn.qkv_proj"), x, y, slots.segments([ids[j] if j >= 0 else -1 for j in which]))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    slots.apply((5, "mlp.down_proj"), x, y, slots.segments([0] * 7))  # no adapter has it: nothing happens
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_slot_reuse_clears_the_previous_adapter_and_buffers_grow() -> None:
    """An evicted adapter's slot taken by one without its module adds nothing there; a larger rank grows the
    buffer and keeps the other slots' weights."""
    k, outs = 32, (32, 16, 16)
    small = _fused_adapter("small", 40, (4, 4, 4), outs, k)
    slots = LoRASlots(2, DEVICE, torch.float32)
    first = slots.put(small)
    assert slots.buffers[(0, "self_attn.qkv_proj")][0].shape[2] == 16
    big = _fused_adapter("big", 41, (16, 16, 8), outs, k)
    slots.put(big)
    a, b = slots.buffers[(0, "self_attn.qkv_proj")]
    assert a.shape[2] == 48
    w = small.modules[(0, "self_attn.qkv_proj")]
    assert torch.equal(a[first, :, :12], w.a_t) and torch.equal(b[first, :12], w.b_t)
    slots.evict("small")
    other = LoRAAdapter("other", Path("o"), 2, 1.0, False, None, (), {})
    assert slots.put(other) == first
    x, y = _randn(3, k, seed=42), _randn(3, 64, seed=43)
    before = y.clone()
    slots.apply((0, "self_attn.qkv_proj"), x, y, slots.segments([first] * 3))
    assert torch.equal(y, before)


def test_bad_slots_and_ranks_are_adapter_errors() -> None:
    k, outs = 32, (32, 16, 16)
    slots = LoRASlots(2, DEVICE, torch.float32)
    slots.reserve({(0, "self_attn.qkv_proj"): (k, sum(outs), 16)})
    a_buffer = slots.buffers[(0, "self_attn.qkv_proj")][0]
    with pytest.raises(
        AdapterError, match=r"adapter 'wide' needs 24 rank columns in layer 0 self_attn\.qkv_proj"
    ):
        slots.put(_fused_adapter("wide", 50, (8, 8, 8), outs, k))
    assert slots.slot_of("wide") is None  # refused whole: no slot taken
    elsewhere = _fused_adapter("elsewhere", 54, (4, 4, 4), outs, k)
    elsewhere.modules = {(1, "mlp.down_proj"): elsewhere.modules[(0, "self_attn.qkv_proj")]}
    with pytest.raises(
        AdapterError, match=r"adapter 'elsewhere' adapts layer 1 mlp\.down_proj, which the LoRA"
    ):
        slots.put(elsewhere)
    slot = slots.put(_fused_adapter("ok", 51, (8, 4, 4), outs, k))
    with pytest.raises(
        AdapterError, match="row 2 of the batch asks for LoRA slot 2, but the buffers have slots 0-1"
    ):
        slots.segments([slot, -1, 2])
    with pytest.raises(AdapterError, match="slot -3"):
        lora_segments([-3], 2, DEVICE)
    with pytest.raises(AdapterError, match=f"LoRA slot {1 - slot}, which holds no adapter"):
        slots.segments([slot, 1 - slot])
    slots.put(_fused_adapter("two", 52, (4, 4, 4), outs, k))
    with pytest.raises(AdapterError, match="no free LoRA slot for adapter 'three'"):
        slots.put(_fused_adapter("three", 53, (4, 4, 4), outs, k))
    with pytest.raises(AdapterError, match="adapter 'ok' already holds"):
        slots.put(_fused_adapter("ok", 51, (8, 4, 4), outs, k))
    assert slots.buffers[(0, "self_attn.qkv_proj")][0] is a_buffer  # fixed: never reallocated


def test_shape_mismatch_is_refused_before_launch() -> None:
    x, y = _randn(3, 32, seed=60), _randn(3, 16, seed=61)
    a, b = _randn(2, 32, 8, seed=62), _randn(2, 8, 24, seed=63)
    with pytest.raises(ValueError, match="LoRA shapes do not fit"):
        _run(y, x, a, b, [0, 1, 0])


def test_kernel_choice_is_checked() -> None:
    with pytest.raises(Exception, match="lora_kernels must be a kernel choice"):
        EngineConfig(lora_kernels="cutlass")
