"""Segmented LoRA on CUDA: two Triton kernels add each row's adapter update `(x @ A[s]) @ B[s]` to a projection's
output in place, over fixed-capacity per-slot weight buffers (`LoRASlots`); rows without an adapter are untouched.

Layout (per decoder layer and fused module, as inference/lora.py stacks an adapter): `a` is `[slots, in, R]` and
`b` is `[slots, R, out]` in the model dtype, one slot per resident adapter, `R` the buffer's rank columns. A slot
holds its adapter's `A` (the fused shards' `A` side by side) in its first rank columns and its block-diagonal `B`
(scaling, rsLoRA's included, folded in) in the same rows; the rest is zero, so smaller ranks are zero-padded and a
slot whose adapter lacks the module adds exactly nothing. A step says which slot each row uses (-1: none) and
`LoRASegments` turns that into rows grouped by slot, which the kernels gather, so rows need not be sorted.

- shrink, grid `(slot, row block, K split)`: `h[rows of s] = x[rows of s] @ a[s]`, fp32 accumulation, `h` fp32
  (split over the input features with fp32 atomics when there are few programs, decode steps);
- expand, grid `(slot, row block, output block)`: `y[rows of s] += h[rows of s] @ b[s]`, `h` rounded to the model
  dtype first (as the torch path's `x @ A` is), the sum in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
import triton.language as tl

from inference.errors import AdapterError
from inference.lora_shapes import lora_rank_columns
from inference.triton_attention import INTERPRETED, _cast, _pow2

if TYPE_CHECKING:
    from inference.lora import LoRAAdapter

_MIN_PROGRAMS = 64  # below this many shrink programs (decode), the input features are split across more
_BLOCK_K = 64  # input features per shrink iteration
_BLOCK_N = 64  # output features per expand program


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    if (
        INTERPRETER
    ):  # the interpreter's tl.dot multiplies bfloat16's raw bits: do it in fp32 on the same values
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _segment_rows(order_ptr, starts_ptr, lens_ptr, slot, m0, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of `slot`'s segment (int64) and which of them exist."""
    n = tl.load(lens_ptr + slot)
    start = tl.load(starts_ptr + slot)
    m = m0 + tl.arange(0, BLOCK_M)
    valid = m < n
    rows = tl.load(order_ptr + start + m, mask=valid, other=0).to(tl.int64)
    return rows, valid


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    order_ptr,
    starts_ptr,
    lens_ptr,
    stride_x,
    stride_as,
    stride_ak,
    stride_h,
    k_dim,
    rank_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """h[rows, :R] (+)= x[rows] @ a[slot] over this program's share of the input features."""
    slot = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= tl.load(lens_ptr + slot):  # past the segment (or an empty slot): nothing to do
        return
    rows, valid = _segment_rows(order_ptr, starts_ptr, lens_ptr, slot, m0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank_cols
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, k_dim, BLOCK_K * SPLIT_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_dim
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0
        )
        a = tl.load(
            a_base + k[:, None] * stride_ak + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0
        )
        acc += _dot(x, a, DOT_PRECISION, INTERPRETER)
    out = h_ptr + rows[:, None] * stride_h + r[None, :]
    mask = valid[:, None] & rmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    order_ptr,
    starts_ptr,
    lens_ptr,
    stride_h,
    stride_bs,
    stride_br,
    stride_y,
    n_dim,
    rank_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """y[rows, n block] += h[rows, :R] @ b[slot][:, n block]."""
    slot = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= tl.load(lens_ptr + slot):
        return
    rows, valid = _segment_rows(order_ptr, starts_ptr, lens_ptr, slot, m0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank_cols
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_dim
    dtype = b_ptr.dtype.element_ty
    h = tl.load(
        h_ptr + rows[:, None] * stride_h + r[None, :], mask=valid[:, None] & rmask[None, :], other=0.0
    )
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + r[:, None] * stride_br + n[None, :],
        mask=rmask[:, None] & nmask[None, :],
        other=0.0,
    )
    delta = _dot(_cast(h, dtype, INTERPRETER), b, DOT_PRECISION, INTERPRETER)
    out = y_ptr + rows[:, None] * stride_y + n[None, :]
    mask = valid[:, None] & nmask[None, :]
    y = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, _cast(y + delta, y_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@dataclass(slots=True)
class LoRASegments:
    """A step's rows grouped by LoRA slot, on the device: `order[starts[s] : starts[s] + lens[s]]` are the rows of
    slot `s`, in their order in the batch; rows without an adapter appear nowhere."""

    order: torch.Tensor  # int32 [rows with an adapter]
    starts: torch.Tensor  # int32 [slots]
    lens: torch.Tensor  # int32 [slots]
    num_rows: int  # rows in the batch, adapter or not
    max_len: int  # the longest segment (sizes the grid; a bound is enough)


def segment_arrays(row_slots: SequenceT[int] | np.ndarray, num_slots: int) -> tuple[np.ndarray, int]:
    """On the host: `order`, `starts` and `lens` of `LoRASegments` packed in one int32 array (in that order) and
    the longest segment. AdapterError for a slot outside `-1 .. num_slots - 1`."""
    slots = np.asarray(row_slots, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((slots < -1) | (slots >= num_slots))
    if bad.size:
        i = int(bad[0])
        raise AdapterError(
            f"row {i} of the batch asks for LoRA slot {int(slots[i])}, but the buffers have slots 0-{num_slots - 1}",
            "slots come from LoRASlots.put; -1 means no adapter",
        )
    counts = np.bincount(slots[slots >= 0], minlength=num_slots)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # a stable sort keeps each slot's rows in batch order; the base rows (-1) sort first and are cut off
    order = np.argsort(slots, kind="stable")[int(np.count_nonzero(slots < 0)) :]
    return np.concatenate((order, starts, counts)).astype(np.int32), int(counts.max(initial=0))


def lora_segments(
    row_slots: SequenceT[int] | np.ndarray, num_slots: int, device: torch.device
) -> LoRASegments:
    """`row_slots[i]`: the slot of row i (-1: no adapter). AdapterError for a slot outside `0 .. num_slots - 1`."""
    packed, longest = segment_arrays(row_slots, num_slots)
    k = packed.size - 2 * num_slots
    on_device = torch.from_numpy(packed).to(device)
    return LoRASegments(
        on_device[:k],
        on_device[k : k + num_slots],
        on_device[k + num_slots :],
        len(row_slots),
        longest,
    )


def _split_k(programs: int, k_dim: int) -> int:
    """How many ways to split the input features: enough programs to spread over the GPU, at most one tile each."""
    split = 1
    while programs * split < _MIN_PROGRAMS and split * 2 * _BLOCK_K <= k_dim:
        split *= 2
    return split


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segments: LoRASegments,
    *,
    split_k: int | None = None,
) -> None:
    """y[rows of s] += (x[rows of s] @ a[s]) @ b[s] for every slot s, in place; x `[T, in]`, y `[T, out]`, a
    `[slots, in, R]`, b `[slots, R, out]` (inner dims contiguous). `split_k` forces the shrink's split (a power of
    two; default from the grid's size)."""
    t, k_dim = x.shape
    num_slots, _, rank_cols = a.shape
    n_dim = y.shape[1]
    if (
        y.shape[0] != t
        or a.shape[1] != k_dim
        or b.shape != (num_slots, rank_cols, n_dim)
        or segments.num_rows != t
        or segments.starts.shape[0] != num_slots
    ):
        raise ValueError(
            f"LoRA shapes do not fit: x {tuple(x.shape)}, y {tuple(y.shape)}, a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, segments over {segments.num_rows} rows and {segments.starts.shape[0]} slots"
        )
    if x.dtype != a.dtype or a.dtype != b.dtype:
        raise ValueError(f"x, a and b must share a dtype, got {x.dtype}, {a.dtype}, {b.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1 or a.stride(2) != 1 or b.stride(2) != 1:
        raise ValueError("x, y, a and b need contiguous last dimensions")
    if segments.max_len == 0 or t == 0:
        return
    block_m = min(64, _pow2(segments.max_len, 16))
    block_r = _pow2(rank_cols, 16)
    row_blocks = triton.cdiv(segments.max_len, block_m)
    split = split_k or _split_k(num_slots * row_blocks, k_dim)
    h = (torch.zeros if split > 1 else torch.empty)(t, rank_cols, dtype=torch.float32, device=x.device)
    # fp32 must not drop to TF32 on tensor cores: the tests compare with the torch path at 1e-4
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _shrink_kernel[(num_slots, row_blocks, split)](
        x, a, h, segments.order, segments.starts, segments.lens,
        x.stride(0), a.stride(0), a.stride(1), h.stride(0), k_dim, rank_cols,
        BLOCK_M=block_m, BLOCK_K=_BLOCK_K, BLOCK_R=block_r, SPLIT_K=split,
        DOT_PRECISION=precision, INTERPRETER=INTERPRETED, num_warps=4,
    )  # fmt: skip
    _expand_kernel[(num_slots, row_blocks, triton.cdiv(n_dim, _BLOCK_N))](
        h, b, y, segments.order, segments.starts, segments.lens,
        h.stride(0), b.stride(0), b.stride(1), y.stride(0), n_dim, rank_cols,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_R=block_r,
        DOT_PRECISION=precision, INTERPRETER=INTERPRETED, num_warps=4,
    )  # fmt: skip


@dataclass(slots=True)
class LoRASlots:
    """The resident LoRA adapters' weights as the kernels read them: per (layer, module) a `[slots, in, R]` /
    `[slots, R, out]` buffer pair, one slot per adapter. Buffers grow (in steps of 16 rank columns) to fit until
    `reserve` fixes them: from then on their addresses never change (what a CUDA graph needs), and an adapter that
    needs more rank columns, or a module without a buffer, is refused with an AdapterError."""

    num_slots: int
    device: torch.device
    dtype: torch.dtype
    buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fixed: bool = False
    _names: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._names = [None] * self.num_slots

    def reserve(self, shapes: Mapping[tuple[int, str], tuple[int, int, int]]) -> None:
        """Allocate every module's buffers at their final size, `key -> (in, out, rank columns)` (columns rounded up
        to 16), and fix them. Only before any adapter is put."""
        if any(self._names):
            raise AdapterError("LoRA buffers are reserved before any adapter is put", "reserve them first")
        self.buffers = {
            key: (
                torch.zeros(
                    self.num_slots, k_dim, lora_rank_columns(cols), dtype=self.dtype, device=self.device
                ),
                torch.zeros(
                    self.num_slots, lora_rank_columns(cols), n_dim, dtype=self.dtype, device=self.device
                ),
            )
            for key, (k_dim, n_dim, cols) in shapes.items()
        }
        self.fixed = True

    def slot_of(self, name: str) -> int | None:
        return self._names.index(name) if name in self._names else None

    def slot(self, name: str) -> int:
        """`name`'s slot; AdapterError if it holds none."""
        slot = self.slot_of(name)
        if slot is None:
            raise AdapterError(
                f"adapter {name!r} holds no LoRA slot", "make it resident (LoRASlots.put) first"
            )
        return slot

    def misfit(self, adapter: LoRAAdapter) -> str | None:
        """Why `adapter` cannot go into these fixed buffers (a reason naming it), or None when it fits."""
        if not self.fixed:
            return None
        for (layer, module), w in adapter.modules.items():
            have = self.buffers.get((layer, module))
            cols = w.a_t.shape[1]
            if have is None:
                return f"adapter {adapter.name!r} adapts layer {layer} {module}, which the LoRA buffers do not hold"
            if cols > have[0].shape[2]:
                return (
                    f"adapter {adapter.name!r} needs {cols} rank columns in layer {layer} {module}, "
                    f"the LoRA buffers hold {have[0].shape[2]}"
                )
        return None

    def put(self, adapter: LoRAAdapter) -> int:
        """Copy `adapter` into a free slot (every module: its weights, or zeros where it has none); its slot."""
        name = adapter.name
        if name in self._names:
            raise AdapterError(
                f"adapter {name!r} already holds LoRA slot {self._names.index(name)}", "evict it first"
            )
        if None not in self._names:
            raise AdapterError(
                f"no free LoRA slot for adapter {name!r}: all {self.num_slots} hold adapters",
                "evict one first (the engine keeps at most max_loras resident)",
            )
        why = self.misfit(adapter)
        if why is not None:
            raise AdapterError(
                why, "raise max_lora_rank (the rank capacity of each projection's LoRA buffers)"
            )
        slot = self._names.index(None)
        for key, w in adapter.modules.items():
            a, b = self._buffer(key, w.a_t.shape[0], w.b_t.shape[1], w.a_t.shape[1])
            cols = w.a_t.shape[1]
            a[slot, :, :cols].copy_(w.a_t)
            a[slot, :, cols:].zero_()
            b[slot, :cols].copy_(w.b_t)
            b[slot, cols:].zero_()
        for key, (a, b) in self.buffers.items():
            if key not in adapter.modules:  # a previous occupant's weights must not leak into this adapter
                a[slot].zero_()
                b[slot].zero_()
        self._names[slot] = name
        return slot

    def weights(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """`adapter` as its slot holds it: the same adapter with every weight a view of its slot's first rank
        columns, for the torch update of a step that falls back to it (X-LoRA or an adapter above the capacity in
        the same step), so a resident adapter has no second device copy. Valid while it holds the slot of fixed
        buffers (buffers that grow move)."""
        slot = self.slot(adapter.name)
        modules = {}
        for key, w in adapter.modules.items():
            a, b = self.buffers[key]
            cols = w.a_t.shape[1]
            modules[key] = replace(w, a_t=a[slot, :, :cols], b_t=b[slot, :cols])
        return replace(adapter, modules=modules)

    def evict(self, name: str) -> None:
        """Free `name`'s slot (its weights stay until the next `put` overwrites them); nothing if it has none."""
        slot = self.slot_of(name)
        if slot is not None:
            self._names[slot] = None

    def _buffer(
        self, key: tuple[int, str], k_dim: int, n_dim: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        have = self.buffers.get(key)
        if have is not None and have[0].shape[2] >= cols:
            return have
        want = lora_rank_columns(cols)
        a = torch.zeros(self.num_slots, k_dim, want, dtype=self.dtype, device=self.device)
        b = torch.zeros(self.num_slots, want, n_dim, dtype=self.dtype, device=self.device)
        if have is not None:  # grown: the other slots keep their adapters
            old = have[0].shape[2]
            a[:, :, :old].copy_(have[0])
            b[:, :old].copy_(have[1])
        self.buffers[key] = (a, b)
        return a, b

    def apply(self, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor, segments: LoRASegments) -> None:
        """Add module `key`'s update to `y` for the rows of `segments`; nothing when no resident adapter has it."""
        buffers = self.buffers.get(key)
        if buffers is not None:
            add_lora(y, x, buffers[0], buffers[1], segments)

    def segments(self, row_slots: SequenceT[int] | np.ndarray) -> LoRASegments:
        """The step's rows grouped by slot (`row_slots[i]`, -1 for none); AdapterError for a slot out of range
        or one that holds no adapter."""
        segs = lora_segments(row_slots, self.num_slots, self.device)
        self.check_slots(row_slots)
        return segs

    def check_slots(self, row_slots: SequenceT[int] | np.ndarray) -> None:
        """AdapterError if a row asks for a slot that holds no adapter."""
        used = np.unique(np.asarray(row_slots, dtype=np.int64))
        empty = [int(s) for s in used if 0 <= s < self.num_slots and self._names[int(s)] is None]
        if empty:
            raise AdapterError(
                f"rows of the batch ask for LoRA slot {empty[0]}, which holds no adapter",
                "put the adapter into the buffers (LoRASlots.put) before the step",
            )
