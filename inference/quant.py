"""Weight-only quantized linear layers for the CPU, and GGUF blocks loaded straight into their layouts.

Two layouts, each run by a torch CPU kernel that reads the quantized weight and dequantizes as it multiplies:

- `int8`: `w[n, k] = q[n, k] * scale[n]` (symmetric, per output channel), `aten._weight_int8pack_mm`;
- `int4`: `w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`, `q` in 0..15, `g = k // group_size` with group
  size 32, 64, 128 or 256, `aten._weight_int4pack_mm_for_cpu` on a weight packed by
  `aten._convert_weight_to_int4pack_for_cpu` (the packed layout depends on the CPU's vector width: pack at load,
  never cache it on disk).

Both kernels are vectorized for bfloat16 only (their float32 path is scalar, 10-40x slower), so `QuantLinear`
runs them in bf16 and casts other inputs in and out. They tile the rows by four and re-read the weight per tile:
fastest at decode sizes, slower than a dense bf16 matmul from about 16 rows (int8) or 64 rows (int4). Above those
row counts (`DENSE_ROWS`) a layer dequantizes its weight to bf16, a slice at a time, and runs a dense matmul: the
weights stay quantized in memory and prefill is not held back by the decode kernels (docs/engine.md).

Where our own kernel runs (inference/qgemv.py: activations quantized to int8 per block of 32, integer dot products
with AVX512-VNNI or AVX2, built for this CPU at first use), `QuantLinear` holds int8 and single-plane int4 group-32
weights in its layout instead (`to_qgemv`, fp16 scales and mins) and runs it up to `qgemv_dense_rows` rows: 1.2-1.3x
torch's int4 kernel and about 2x its int8 one at decode sizes on AVX512. An `Int8Weight` may carry a scale per block
of 32 (a GGUF Q8_0 matrix as it is); only that kernel runs those, and a layer without it re-quantizes them per row.

On CUDA, `TritonQuantLinear` holds the same layouts (int4 codes packed two a byte along K, `pack_int4_pairs`) and
runs them through the Triton kernels of inference/triton_quant.py; `quant_linear` / `kernels_for` pick the layer
for a device.

`QuantLinear` replaces an `nn.Linear`; `quantize_model` swaps a model's linears in place (in-situ quantization,
ISQ; the output head always per-channel int8: int4 there costs ~4% perplexity) and reports the weight bytes
before and after. A weight may be a sum of int4 planes (`Int4Weight` list): that is how GGUF types with more than 4
bits per value (Q8_0, Q5_0, Q5_1, Q5_K) can stay exact with the int4 kernel.

`gguf_to_int8` / `gguf_to_int4` take a GGUF tensor's raw blocks (uint8 `[rows, bytes per row]`, as
`inference.gguf_file` and `gguf.GGUFReader` give them) and produce our codes and float32 scales without a float
copy of the weight. "Exact" below is of those codes and scales against `gguf.quants.dequantize`; the kernels then
hold the scales in bf16 (8 significant bits against fp16's 11), a relative error of at most 2^-8 per scale:

| GGUF type | our layout | exact? |
| --- | --- | --- |
| Q4_0 | int4, group 32, scale d, zero 0 | yes |
| Q4_1 | int4, group 32, scale d, zero m + 8d | yes up to fp32 rounding of the zero (<= 1 ulp) |
| Q4_K | int4, group 32, scale d*sc, zero 8*d*sc - dmin*m | yes up to fp32 rounding of the zero |
| Q5_K | two int4 planes (high bit, low nibble), group 32, or int8 re-quantized per row | planes: yes; int8: no |
| Q5_0, Q5_1 | two int4 planes (high bit, low nibble), group 32, or int8 re-quantized per row | planes: yes; int8: no |
| Q8_0 | two int4 planes (high nibble, low nibble), group 32, or int8 re-quantized per row | planes: yes; int8: no |
| Q6_K | int8 re-quantized per row (16-wide sub-blocks: no int4 group of 16) | no |

Other types raise `UnsupportedQuantTypeError` naming the type. `QuantEmbedding` holds an embedding table as int8
rows (Q8_0's own blocks, or the codes of a tied int8 head). Kernels are probed once per process on a tiny weight
(`kernel_available`) and shapes checked (`kernel_fits`): a CPU, torch build or shape without one keeps the layer
dequantized (logged), never an error in the middle of a generation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import structlog
import torch
from torch import nn

from inference import qgemv
from inference.config import DEFAULT_QUANTIZE_GROUP_SIZE, QUANTIZE_GROUP_SIZES
from inference.errors import QuantError, UnsupportedQuantTypeError

log = structlog.get_logger(__name__)

KernelName = Literal["int8", "int4"]
QuantKernels = Literal[
    "cpu", "triton"
]  # torch's CPU kernels (`QuantLinear`), or Triton's (CUDA, inference/triton_quant.py)
# The dtype the kernels run in: torch vectorizes them on x86 for bfloat16 only.
KERNEL_DTYPE = torch.bfloat16
# Above this many rows a layer dequantizes its weight and runs a dense bf16 matmul instead of the kernel
# (measured on AVX512 with 2 threads: the int8 kernel loses to the dense path from ~32 rows, int4 from ~128 at
# SmolLM2's shapes; docs/engine.md, benchmarks/quant_kernels.py --dense).
DENSE_ROWS: dict[KernelName, int] = {"int8": 16, "int4": 64}


def qgemv_dense_rows(in_features: int) -> int:
    """`DENSE_ROWS` for our own kernel (inference/qgemv.py): K / 8 rows, within [64, 256]. Its dense path (C++:
    activations rounded as the kernel rounds them, weights dequantized to bf16 a slice at a time) overtakes it from
    about 50 rows at an input size of 576 to about 170 at 4864 (2-core AVX512, Qwen2.5-0.5B and SmolLM2 shapes). Up
    to it, every row's result is the same bits whatever the step's other rows, so a prompt replayed from the prefix
    cache samples the same tokens."""
    return min(256, max(64, in_features // 8))


# Dense path: dequantize at most about this many weights at a time (a few MB of bf16, reused by the allocator)
_DENSE_CHUNK = 1 << 21


# ---- unpacked codes ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Int8Weight:
    """`w[n, k] = qweight[n, k] * scales[n]`: int8 `[N, K]` codes, float32 `[N]` scales; or with `[N, K / 32]`
    scales, one per block of 32 (a GGUF Q8_0 matrix as it is: only our own kernel runs those, `per_row` makes
    the per-channel weight torch's kernel takes)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.qweight.shape[0]), int(self.qweight.shape[1]))

    @property
    def per_block(self) -> bool:
        return self.scales.dim() == 2

    def dequantize(self) -> torch.Tensor:
        """float32 `[N, K]`."""
        if self.per_block:
            n, k = self.shape
            blocks = self.qweight.float().view(n, self.scales.shape[1], -1)
            return (blocks * self.scales.float()[..., None]).view(n, k)
        return self.qweight.float() * self.scales.float()[:, None]


def per_row(weight: Int8Weight) -> Int8Weight:
    """The per-channel int8 weight of a block-scaled one (re-quantized per row: lossy); others as they are."""
    return quantize_int8(weight.dequantize()) if weight.per_block else weight


@dataclass(slots=True)
class SuperBlocks:
    """A GGUF Q4_K plane's scales as the file holds them: uint8 `[N, K / 256, 12]`, each super-block's 6-bit
    sub-scales and sub-mins packed, and float16 `[N, K / 256, 2]` (d, dmin) pairs, `scale = d * sub_scale`,
    `min = -dmin * sub_min` (our kernel keeps them so: `qgemv.from_super_blocks`, 2 bytes a block of 32 instead
    of 4)."""

    packed: torch.Tensor
    pairs: torch.Tensor

    def take(self, rows: torch.Tensor) -> SuperBlocks:
        return SuperBlocks(self.packed[rows], self.pairs[rows])


@dataclass(slots=True)
class Int4Weight:
    """`w[n, k] = (codes[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]`, the int4 kernel's own formula:
    uint8 `[N, K]` codes in 0..15, float32 `[N, K // g]` scales and zeros, `g = group_size`. A Q4_K plane also
    carries its file's own scales (`super_blocks`), whose product is the same weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    super_blocks: SuperBlocks | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """float32 `[N, K]`, computed as the kernel does: `(q - 8) * scale + zero` in float32."""
        g = self.group_size
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        return (self.codes.float() - 8.0) * s + z


QuantWeight = Int8Weight | list[Int4Weight]


def as_kernel_sees(weight: QuantWeight) -> QuantWeight:
    """The same codes with scales (and zeros) rounded to `KERNEL_DTYPE`, as `QuantLinear` stores them: its
    dequantization is the weight the kernels multiply by (up to their float32 accumulation order)."""
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.qweight, weight.scales.to(KERNEL_DTYPE).float())
    return [
        Int4Weight(p.codes, p.scales.to(KERNEL_DTYPE).float(), p.zeros.to(KERNEL_DTYPE).float(), p.group_size)
        for p in weight
    ]


def dequantize_weight(weight: QuantWeight) -> torch.Tensor:
    """float32 `[N, K]` of unpacked codes (int8, or the sum of int4 planes)."""
    if isinstance(weight, Int8Weight):
        return weight.dequantize()
    total = weight[0].dequantize()
    for plane in weight[1:]:
        total += plane.dequantize()
    return total


def quant_weight_bytes(weight: QuantWeight) -> int:
    """Bytes in the kernels' layouts (int4 codes packed two per byte, bf16 scales and zeros)."""
    if isinstance(weight, Int8Weight):
        return weight.qweight.numel() + 2 * weight.scales.numel()
    return sum(p.codes.numel() // 2 + 2 * (p.scales.numel() + p.zeros.numel()) for p in weight)


# ---- quantizing float weights (ISQ) ---------------------------------------------------------------------------


def check_group_size(group_size: int, in_features: int) -> None:
    if group_size not in QUANTIZE_GROUP_SIZES:
        raise QuantError(
            f"int4 group size {group_size} is not supported",
            hint=f"use one of {', '.join(map(str, QUANTIZE_GROUP_SIZES))}",
        )
    if in_features % group_size:
        raise QuantError(
            f"in_features {in_features} is not a multiple of the int4 group size {group_size}",
            hint="use a smaller group size, or int8",
        )


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float `[N, K]` weight: scale = max|w| / 127 per row."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_QUANTIZE_GROUP_SIZE) -> Int4Weight:
    """Asymmetric group-wise int4 of a float `[N, K]` weight: per group of `group_size` inputs,
    scale = (max - min) / 15 and codes round((w - min) / scale), stored as the kernel's zero = min + 8 * scale."""
    n, k = weight.shape
    check_group_size(group_size, k)
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=2)
    hi = w.amax(dim=2)
    scales = (hi - lo) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    zeros = lo + 8.0 * scales
    return Int4Weight(q.reshape(n, k).contiguous(), scales.contiguous(), zeros.contiguous(), group_size)


# ---- kernels -------------------------------------------------------------------------------------------------


def pack_int4(weight: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 weight, `[K // g, N, 2]` scale-and-zero in `dtype`) for `_weight_int4pack_mm_for_cpu`."""
    packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        weight.codes.to(torch.int32).contiguous(), 1
    )
    scale_zero = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1).to(dtype).contiguous()
    return packed, scale_zero


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zero: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)
    return out


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x, qweight, scales)
    return out


@functools.cache
def kernel_available(name: KernelName) -> bool:
    """Whether this torch build runs the kernel on this CPU, found once per process on a tiny weight checked
    against its dequantized product (a build or CPU without it raises, or would return garbage)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    x = torch.randn(2, 128, generator=gen).to(KERNEL_DTYPE)
    try:
        if name == "int8":
            q8 = quantize_int8(w)
            out = int8_mm(x, q8.qweight, q8.scales.to(KERNEL_DTYPE))
            ref = x.float() @ q8.dequantize().t()
        else:
            q4 = quantize_int4(w, 32)
            packed, sz = pack_int4(q4, KERNEL_DTYPE)
            out = int4_mm(x, packed, 32, sz)
            ref = x.float() @ q4.dequantize().t()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        log.warning(
            "quant_kernel_unavailable",
            kernel=name,
            reason=str(exc).splitlines()[0][:200],
            fallback="dequantized bf16 weights (no memory saved)",
        )
        return False
    ok = bool(torch.allclose(out.float(), ref, rtol=0.05, atol=0.05))
    if not ok:
        log.warning(
            "quant_kernel_wrong",
            kernel=name,
            max_error=float((out.float() - ref).abs().max()),
            fallback="dequantized bf16 weights (no memory saved)",
        )
    return ok


def to_qgemv(weight: QuantWeight) -> qgemv.QGemvWeight | None:
    """The weight in our own kernel's layout where that kernel runs here and takes it: int8 per channel (each
    block gets its row's scale), or a single int4 plane of group 32 (`min = zero - 8 * scale`, none where every
    zero is 0; a Q4_K plane's own compact scales) with K a multiple of 64; None otherwise (torch's kernels run
    it)."""
    if qgemv.qgemv_kernel() is None:
        return None
    if isinstance(weight, Int8Weight):
        n, k = weight.shape
        if not qgemv.fits(n, k) or (weight.per_block and weight.scales.shape[1] * qgemv.BLOCK != k):
            return None
        scales = (
            weight.scales.float()
            if weight.per_block
            else weight.scales.float()[:, None].expand(n, k // qgemv.BLOCK)
        )
        return qgemv.from_blocks(weight.qweight, scales, None, 8)
    if len(weight) != 1 or weight[0].group_size != qgemv.BLOCK or not qgemv.fits(*weight[0].shape):
        return None
    plane = weight[0]
    blocks = plane.super_blocks
    if blocks is not None and plane.shape[1] % (qgemv.BLOCK * qgemv.SUPER_BLOCKS) == 0:
        return qgemv.from_super_blocks(plane.codes, blocks.packed, blocks.pairs)
    # zero points all 0 (GGUF Q4_0, symmetric re-quantization): no mins to store or read
    mins = None if not bool(plane.zeros.any()) else plane.zeros - 8 * plane.scales
    return qgemv.from_blocks(plane.codes, plane.scales, mins, 4)


def kernel_fits(name: KernelName, out_features: int, in_features: int) -> bool:
    """Shapes the kernels handle (torch 2.13, checked here): the int8 kernel silently returns garbage unless the
    input size is a multiple of 16; the int4 packing refuses output sizes that are not multiples of 16. Every
    linear of the models we run fits; others fall back to dense weights."""
    if name == "int8":
        return in_features % 16 == 0
    return out_features % 16 == 0


@dataclass(frozen=True, slots=True)
class Int4Layout:
    """How `_convert_weight_to_int4pack_for_cpu` laid out the codes on this CPU (ATen's int4mm_kernel.cpp): for
    each block of `block` output rows and each input k, `block / 2` bytes; byte j holds rows j (low nibble) and
    j + block/2 (high) when `halves` (AVX512: 64-row blocks, AVX2: 32), rows 2j and 2j + 1 otherwise."""

    block: int
    halves: bool

    def unpack_kmajor(self, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """uint8 codes `[K, N]` (transposed: the dense path multiplies by `W.T`) of output rows `n` of a packed
        weight slice `[n * K / 2]` bytes, `n` a multiple of `block`."""
        b = self.block
        src = packed.reshape(n // b, k, b // 2).permute(1, 0, 2)  # [K, blocks, b/2]: runs of b/2 bytes
        codes = torch.empty(k, n // b, b, dtype=torch.uint8)
        lo, hi = (
            (codes[..., : b // 2], codes[..., b // 2 :])
            if self.halves
            else (codes[..., 0::2], codes[..., 1::2])
        )
        torch.bitwise_and(src, 15, out=lo)
        torch.bitwise_right_shift(src, 4, out=hi)
        return codes.view(k, n)


_LAYOUT_CANDIDATES = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False))


@functools.cache
def int4_layout() -> Int4Layout | None:
    """This CPU's packed int4 layout, found once per process by packing known codes and reading them back with
    each known layout; None (logged: int4 layers then run the kernel at every row count) if none matches."""
    if not kernel_available("int4"):
        return None
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in _LAYOUT_CANDIDATES:
        if torch.equal(layout.unpack_kmajor(packed, n, k).t().to(torch.int32), codes):
            return layout
    log.warning(
        "int4_layout_unknown", hint="int4 layers run the int4 kernel at every row count (slower prefill)"
    )
    return None


class QuantLinearBase(nn.Module):
    """What every quantized linear layer holds, whichever kernels run it (`QuantLinear` here on the CPU,
    `TritonQuantLinear` on CUDA): sizes, mode, int4 group size and planes, and the bias."""

    fallback: bool = False  # the weight kept dequantized (no kernel for it): only the CPU layer does this

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        planes: list[Int8Weight] | list[Int4Weight] = (
            [weight] if isinstance(weight, Int8Weight) else list(weight)
        )
        if not planes:
            raise QuantError("a quantized weight needs at least one plane")
        self.out_features, self.in_features = planes[0].shape
        for plane in planes:
            if plane.shape != (self.out_features, self.in_features):
                raise QuantError(f"a plane has shape {plane.shape}, expected {planes[0].shape}")
        self.mode: KernelName = "int8" if isinstance(weight, Int8Weight) else "int4"
        self.group_size = 0 if isinstance(weight, Int8Weight) else weight[0].group_size
        if any(isinstance(p, Int4Weight) and p.group_size != self.group_size for p in planes):
            raise QuantError("all int4 planes of a weight need the same group size")
        self.num_planes = len(planes)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def int8_weight(self) -> Int8Weight | None:
        """The per-channel int8 codes and scales as stored (to share with an embedding lookup); None for int4 or a
        dequantized fallback."""
        return None


class QuantLinear(QuantLinearBase):
    """`y = x @ W.T + b` with W held quantized: int8 per channel, or a sum of int4 group-wise planes.

    The kernels run in bfloat16 (`KERNEL_DTYPE`; their scales are stored in it): on x86 torch vectorizes them for
    bf16 only. Inputs of another dtype are cast in and the output cast back, so a float32 model runs them too. Up
    to `dense_rows` rows (`DENSE_ROWS` of the mode) a call runs the kernel; above, the layer dequantizes its weight
    to bf16 a slice at a time and runs dense matmuls (int4 needs this CPU's packed layout, `int4_layout`, and an
    output size that is a multiple of its block; otherwise the kernel runs at every size). Without the kernel on
    this CPU (`kernel_available`), or for a shape it cannot take (`kernel_fits`), the weight is kept dequantized
    (`fallback`) and the layer runs `F.linear` in the input's dtype: correct, no memory saved.

    Where our own kernel runs (inference/qgemv.py) and takes the weight (`to_qgemv`), the layer holds it in that
    kernel's layout instead (`qcodes`, `qscales`, `qmins`; `qgemv_bits` 4 or 8) and runs it on float32 or bf16
    inputs as they come, up to `qgemv_dense_rows(in_features)` rows (its C++ dense path above).
    """

    qweight0: torch.Tensor
    scales0: torch.Tensor
    qcodes: torch.Tensor
    qscales: torch.Tensor
    qmins: torch.Tensor
    qsupers: torch.Tensor
    dense: torch.Tensor | None

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight, bias)
        planes: list[Int8Weight] | list[Int4Weight] = (
            [weight] if isinstance(weight, Int8Weight) else list(weight)
        )
        ours = to_qgemv(weight)
        self.fallback = ours is None and not (
            kernel_available(self.mode) and kernel_fits(self.mode, self.out_features, self.in_features)
        )
        self.dense_rows = DENSE_ROWS[self.mode]
        if ours is None and isinstance(weight, Int8Weight) and weight.per_block:
            weight = per_row(weight)
            planes = [weight]
        self.qgemv = qgemv.qgemv_kernel() if ours is not None else None
        self.qgemv_bits = 0 if ours is None else ours.bits
        layout = int4_layout() if self.mode == "int4" and not self.fallback and ours is None else None
        self.layout = layout if layout is not None and self.out_features % layout.block == 0 else None
        # buffers (so that `state_dict` and memory accounting see them): `dense` in the fallback, `qcodes` /
        # `qscales` / `qmins` in our kernel's layout, else `qweight{i}` / `scales{i}` per plane
        self.register_buffer("dense", dequantize_weight(weight) if self.fallback else None)
        if ours is not None:
            self.dense_rows = qgemv_dense_rows(self.in_features)
            self.register_buffer("qcodes", ours.codes)
            self.register_buffer("qscales", ours.scales)
            self.register_buffer("qmins", ours.mins)
            self.register_buffer("qsupers", ours.supers)
        kept: Sequence[Int8Weight | Int4Weight] = [] if self.fallback or ours is not None else planes
        for i, plane in enumerate(kept):
            if isinstance(plane, Int8Weight):
                q, s = plane.qweight.contiguous(), plane.scales.to(KERNEL_DTYPE).contiguous()
            else:
                q, s = pack_int4(plane, KERNEL_DTYPE)
            self.register_buffer(f"qweight{i}", q)
            self.register_buffer(f"scales{i}", s)

    def int8_weight(self) -> Int8Weight | None:
        if self.mode != "int8" or self.fallback or self.qgemv is not None:
            return None
        return Int8Weight(self.qweight0, self.scales0.float())

    def qgemv_weight(self) -> qgemv.QGemvWeight | None:
        """The weight in our kernel's layout (the layer's own tensors); None where torch's kernels run it."""
        if self.qgemv is None:
            return None
        return qgemv.QGemvWeight(self.qcodes, self.qscales, self.qmins, self.qgemv_bits, self.qsupers)

    def planes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(packed weight, scales) per plane of torch's kernels; empty in the fallback or our kernel's layout."""
        if self.fallback or self.qgemv is not None:
            return []
        out = []
        for i in range(self.num_planes):
            q, s = self._buffers[f"qweight{i}"], self._buffers[f"scales{i}"]
            assert q is not None and s is not None
            out.append((q, s))
        return out

    def weight_bytes(self) -> int:
        """Bytes of the weight as stored (codes and scales, bias excluded)."""
        tensors = [t for pair in self.planes() for t in pair] if self.dense is None else [self.dense]
        if self.qgemv is not None:
            tensors = [self.qcodes, self.qscales, self.qmins, self.qsupers]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        kind = f"int4 g{self.group_size} x{self.num_planes}" if self.mode == "int4" else "int8"
        if self.qgemv is not None:
            kind += f" (qgemv int{self.qgemv_bits} g32)"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, fallback={self.fallback}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this ~120 times: every view or module lookup saved is ~1 us a call.
        dtype = x.dtype
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)
        if self.dense is not None:
            y = torch.nn.functional.linear(x2, self.dense.to(dtype))
        elif self.qgemv is not None:
            if x2.dtype != torch.float32 and x2.dtype != KERNEL_DTYPE:
                x2 = x2.to(KERNEL_DTYPE)
            y = self.qgemv(
                x2.contiguous(),
                self.qcodes,
                self.qscales,
                self.qmins,
                self.qgemv_bits,
                self.dense_rows,
                self.qsupers,
            )
        else:
            if x2.dtype != KERNEL_DTYPE:
                x2 = x2.to(KERNEL_DTYPE)
            rows = x2.shape[0]
            if rows > self.dense_rows and (self.mode == "int8" or self.layout is not None):
                y = self._dense_forward(x2)
            else:
                y = self._kernel(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if y.dtype != dtype:
            y = y.to(dtype)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            return int8_mm(x, self.qweight0, self.scales0)
        y = int4_mm(x, self.qweight0, self.group_size, self.scales0)
        if self.num_planes > 1:
            for q, s in self.planes()[1:]:
                y = y + int4_mm(x, q, self.group_size, s)
        return y

    def dense_weight_t(self, start: int, stop: int) -> torch.Tensor:
        """`W[start:stop].T` dequantized to bf16, `[K, stop - start]` (rows a multiple of the int4 layout's
        block), the weight torch's kernels' dense path multiplies by (ours has its own, in C++)."""
        k = self.in_features
        planes = self.planes()
        if self.mode == "int8":
            q, s = planes[0]
            return (q[start:stop].to(KERNEL_DTYPE) * s[start:stop, None]).t()
        layout = self.layout
        assert layout is not None
        g = self.group_size
        total: torch.Tensor | None = None
        for packed, sz in planes:
            codes = layout.unpack_kmajor(packed.view(-1)[start * k // 2 : stop * k // 2], stop - start, k)
            s, z = sz[:, start:stop, 0], sz[:, start:stop, 1]
            w = codes.view(k // g, g, stop - start).to(KERNEL_DTYPE)
            w = w.mul_(s[:, None, :]).add_((z - 8 * s)[:, None, :]).view(k, stop - start)
            total = w if total is None else total.add_(w)
        assert total is not None
        return total

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        step = max(1, _DENSE_CHUNK // k)
        if self.layout is not None:
            step = max(self.layout.block, step // self.layout.block * self.layout.block)
        if step >= n:
            return torch.mm(x, self.dense_weight_t(0, n))
        out = x.new_empty(x.shape[0], n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            out[:, start:stop] = torch.mm(x, self.dense_weight_t(start, stop))
        return out


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[N, K]` in 0..15 (K even) -> `[N, K / 2]` bytes, `k = 2j` in byte j's low nibble, `2j + 1` high."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_pairs`: `[N, K / 2]` bytes -> uint8 codes `[N, K]`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class TritonQuantLinear(QuantLinearBase):
    """`y = x @ W.T + b` with W held quantized (int8 per channel, or a sum of int4 group-wise planes), computed in
    x's dtype by the Triton kernels of inference/triton_quant.py (fp32 accumulation). Runs where its buffers are:
    CUDA, or CPU tensors under TRITON_INTERPRET=1 (tests); build it anywhere and move it with `.to(device)` (the
    layout is the same). int8: the CPU layout as it is (int8 `qweight [N, K]`, bf16 `scales [N]`); int4: codes two
    a byte along K (`pack_int4_pairs`), `qweight [planes, N, K / 2]`, bf16 `scales` and `zeros`
    `[planes, N, K / group_size]`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        if isinstance(weight, Int8Weight):
            weight = per_row(weight)
        super().__init__(weight, bias)
        # imported here: triton is only needed (and only installed) for the GPU path; CPU-only imports never load it
        from inference.triton_quant import quant_matmul

        self._matmul = quant_matmul
        if isinstance(weight, Int8Weight):
            self.register_buffer("qweight", weight.qweight.to(torch.int8).contiguous())
            self.register_buffer("scales", weight.scales.to(KERNEL_DTYPE).contiguous())
            self.register_buffer("zeros", None)
            return
        check_group_size(self.group_size, self.in_features)
        planes: list[Int4Weight] = list(weight)
        self.register_buffer("qweight", torch.stack([pack_int4_pairs(p.codes) for p in planes]))
        self.register_buffer("scales", torch.stack([p.scales.to(KERNEL_DTYPE) for p in planes]).contiguous())
        self.register_buffer("zeros", torch.stack([p.zeros.to(KERNEL_DTYPE) for p in planes]).contiguous())

    def int8_weight(self) -> Int8Weight | None:
        if self.mode != "int8":
            return None
        return Int8Weight(self.qweight, self.scales.float())

    def weight_bytes(self) -> int:
        tensors = [t for t in (self.qweight, self.scales, self.zeros) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self) -> torch.Tensor:
        """float32 `[N, K]`: the weight the kernels multiply by (bf16 scales and zeros, the planes summed)."""
        if self.mode == "int8":
            return self.qweight.float() * self.scales.float()[:, None]
        g = self.group_size
        total = torch.zeros(
            self.out_features, self.in_features, dtype=torch.float32, device=self.qweight.device
        )
        for p in range(self.num_planes):
            codes = unpack_int4_pairs(self.qweight[p]).float() - 8.0
            s = self.scales[p].float().repeat_interleave(g, dim=1)
            z = self.zeros[p].float().repeat_interleave(g, dim=1) if self.zeros is not None else 0.0
            total += codes * s + z
        return total

    def extra_repr(self) -> str:
        kind = f"int4 g{self.group_size} x{self.num_planes}" if self.mode == "int4" else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._matmul(x2, self.qweight, self.scales, self.zeros, self.bias, self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """An embedding table held as int8 rows: `table[i] = codes[i] * scales[i]`, with one scale per row
    (`scales` [V]: the per-channel `Int8Weight` of a tied head, so that head and lookup share one copy) or one per
    group of 32 columns (`scales` [V, H / 32]: GGUF Q8_0 blocks, exact). Rows are dequantized on lookup, in float32,
    then cast to `dtype`."""

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise QuantError("an int8 embedding needs int8 [rows, dim] codes")
        rows, dim = codes.shape
        per_row = scales.dim() == 1
        if scales.shape[0] != rows or (not per_row and dim % scales.shape[1]):
            raise QuantError(f"embedding scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)}")
        self.num_embeddings, self.embedding_dim = int(rows), int(dim)
        self.group_size = dim if per_row else dim // int(scales.shape[1])
        self.dtype = dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales if per_row else scales.float())

    @classmethod
    def shared_with(cls, head: Int8Weight, dtype: torch.dtype = torch.bfloat16) -> QuantEmbedding:
        """The lookup of a tied head's per-channel int8 weight, sharing its codes (no second copy)."""
        return cls(head.qweight, head.scales, dtype)

    codes: torch.Tensor
    scales: torch.Tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.codes.index_select(0, flat).float()
        scales = self.scales.index_select(0, flat).float()
        if scales.dim() == 1:
            out = rows * scales[:, None]
        else:
            out = (rows.view(flat.shape[0], -1, self.group_size) * scales[..., None]).view(flat.shape[0], -1)
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)


class Int4HeadEmbedding(nn.Module):
    """The lookup of a tied int4 head (a GGUF's 4-bit embedding kept as the head's int4 codes): each row is read
    out of the head's packed weight (this CPU's layout, `Int4Layout`) and scaled as the kernel does, so head and
    lookup share one copy of the table."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        layout = head.layout
        if head.mode != "int4" or layout is None:
            raise QuantError("an int4 head lookup needs an int4 head in a known packed layout")
        self.layout = layout
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.group_size = head.group_size
        self.dtype = dtype
        self.num_planes = head.num_planes
        for i, (packed, scale_zero) in enumerate(head.planes()):
            self.register_buffer(f"qweight{i}", packed)  # the head's own tensors: counted once
            self.register_buffer(f"scales{i}", scale_zero)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        t, k, g, b = flat.shape[0], self.embedding_dim, self.group_size, self.layout.block
        within = flat % b
        if self.layout.halves:  # byte j holds rows j (low nibble) and j + b/2 (high) of its block
            column, high = within % (b // 2), within >= b // 2
        else:  # rows 2j and 2j + 1
            column, high = within // 2, within % 2 == 1
        total: torch.Tensor | None = None
        for i in range(self.num_planes):
            packed, scale_zero = self._buffers[f"qweight{i}"], self._buffers[f"scales{i}"]
            assert packed is not None and scale_zero is not None
            raw = packed.view(self.num_embeddings // b, k, b // 2)[flat // b, :, column]  # [T, K] bytes
            codes = torch.where(high[:, None], raw >> 4, raw & 15).float().view(t, k // g, g)
            sz = scale_zero[:, flat].float()  # [K / g, T, 2]
            scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
            rows = ((codes - 8.0) * scale + zero).view(t, k)
            total = rows if total is None else total + rows
        assert total is not None
        return total.to(self.dtype).reshape(*ids.shape, k)


class QGemvEmbedding(nn.Module):
    """The lookup of a tied head held in our kernel's layout (inference/qgemv.py): rows read out of the head's own
    codes, scales and mins, so head and lookup share one copy of the table."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    supers: torch.Tensor

    def __init__(self, head: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        ours = head.qgemv_weight()
        if ours is None:
            raise QuantError("a qgemv head lookup needs a head in our kernel's layout")
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.bits = ours.bits
        self.dtype = dtype
        self.register_buffer("codes", ours.codes)  # the head's own tensors: counted once
        self.register_buffer("scales", ours.scales)
        self.register_buffer("mins", ours.mins)
        self.register_buffer("supers", ours.supers)
        # the head's build's `q_rows`: the rows dequantized in one call
        self.lookup = qgemv.sibling_op(head.qgemv, "q_rows")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids.long(), self.codes, self.scales, self.mins, self.bits, self.dtype, self.supers)


def gguf_q8_0_blocks(data: np.ndarray, shape: Sequence[int]) -> Int8Weight:
    """A GGUF Q8_0 matrix `[rows, dim]` as it is: its int8 values and fp16 block scales (as float32), exact."""
    rows = int(shape[0])
    b = _blocks(data, rows, 34)
    if b.shape[1] * 32 != int(shape[1]):
        raise QuantError(f"Q8_0 data of {b.shape[1]} blocks a row does not match {int(shape[1])} columns")
    codes = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1))
    return Int8Weight(codes, torch.from_numpy(_f16(b[..., 0:2])))


def gguf_q8_0_embedding(
    data: np.ndarray, shape: Sequence[int], dtype: torch.dtype = torch.bfloat16
) -> QuantEmbedding:
    """A GGUF Q8_0 embedding table `[rows, dim]` as a `QuantEmbedding`, exact: its int8 values and fp16 block
    scales (as float32), 1.125 bytes a value instead of bf16's 2."""
    blocks = gguf_q8_0_blocks(data, shape)
    return QuantEmbedding(blocks.qweight, blocks.scales, dtype)


def dequantize_linear(layer: QuantLinear, *, dense: bool = False) -> torch.Tensor:
    """The `[N, K]` weight the layer multiplies by, read back through its kernel (or with `dense`, its dense path)
    with an identity input, as float32 (the bf16 output rounds each value to bf16): what the layer computes,
    whatever the packed layout of this CPU."""
    eye = torch.eye(layer.in_features, dtype=KERNEL_DTYPE)
    bias, rows, layer.bias = layer.bias, layer.dense_rows, None
    layer.dense_rows = 0 if dense else layer.in_features
    try:
        out: torch.Tensor = layer(eye).float()
    finally:
        layer.bias, layer.dense_rows = bias, rows
    return out.t().contiguous()


# ---- whole models -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class QuantReport:
    """What quantization did to a model: its mode, the layers it quantized (and those left dense because this CPU
    or their shape has no kernel), and the model's weight bytes (parameters and buffers) before and after."""

    mode: str
    group_size: int
    layers: int
    bytes_before: int
    bytes_after: int
    fallback_layers: int = 0
    source: str = "isq"  # "isq" (quantized at load) or "gguf" (the file's own blocks)

    def log(self) -> None:
        log.info(
            "model_quantized",
            mode=self.mode,
            source=self.source,
            group_size=self.group_size,
            layers=self.layers,
            dense_fallback_layers=self.fallback_layers,
            weights_mib_before=round(self.bytes_before / 2**20, 1),
            weights_mib_after=round(self.bytes_after / 2**20, 1),
        )

    def describe(self) -> str:
        """One line for `generate --stats` and logs."""
        # a GGUF's source already names each layout (its 4-bit blocks keep group 32 whatever was asked)
        mode = (
            f"int4 g{self.group_size}" if self.mode == "int4" and self.source.startswith("isq") else self.mode
        )
        return (
            f"{mode} weights ({self.source}): {self.bytes_before / 2**20:.1f} -> "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (plain tensors; oneDNN-packed ones
    by their element count)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def kernels_for(device: torch.device) -> QuantKernels | None:
    """Which kernels run quantized layers on `device`: the CPU's own, Triton's on CUDA, none elsewhere."""
    return "cpu" if device.type == "cpu" else "triton" if device.type == "cuda" else None


def quant_linear(
    weight: QuantWeight, bias: torch.Tensor | None, kernels: QuantKernels = "cpu"
) -> QuantLinearBase:
    """The layer holding `weight` for `kernels`: `QuantLinear` (CPU) or `TritonQuantLinear` (CUDA; built on any
    device, moved with `.to`)."""
    if kernels == "cpu":
        return QuantLinear(weight, bias)
    if kernels != "triton":
        raise QuantError(f"unknown quantized kernels {kernels!r}", hint="use 'cpu' or 'triton'")
    return TritonQuantLinear(weight, bias)


def quantize_model(
    model: nn.Module,
    mode: KernelName,
    *,
    group_size: int = DEFAULT_QUANTIZE_GROUP_SIZE,
    skip: Callable[[str, nn.Linear], bool] | None = None,
    kernels: QuantKernels | None = None,
) -> QuantReport:
    """Replace every plain `nn.Linear` of `model` on the CPU or CUDA by a quantized layer (in place) and return the
    model's weight bytes before and after (`model_weight_bytes`). `mode` is the layers' layout; the output head
    (`lm_head`) is per-channel int8 in both modes, and a model with a tied head (an `embed_tokens` embedding and
    `lm_head` None) gets an int8 `lm_head` built from the embedding (which stays, for the lookup). A layer whose
    input size is no multiple of `group_size` takes int8 instead of int4. Weights already packed for oneDNN
    (`is_mkldnn`) are left alone: quantize before `pack_linear_weights`.

    `kernels` None picks them by each weight's device (`kernels_for`: `QuantLinear` on the CPU, `TritonQuantLinear`
    on CUDA); "triton" forces the Triton layers on CPU weights too (they then run under TRITON_INTERPRET=1 only).
    """
    if mode not in ("int8", "int4"):
        raise QuantError(f"unknown quantization {mode!r}", hint="use int8 or int4")
    if group_size not in QUANTIZE_GROUP_SIZES:
        check_group_size(group_size, group_size)
    before = model_weight_bytes(model)
    report = QuantReport(mode, group_size if mode == "int4" else 0, 0, before, before)
    targets: list[tuple[nn.Module, str, nn.Linear, QuantKernels]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, nn.Linear) or child.weight.is_mkldnn:
                continue
            layer_kernels = kernels or kernels_for(child.weight.device)
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if layer_kernels is not None and (skip is None or not skip(full, child)):
                targets.append((parent, child_name, child, layer_kernels))
    widened = 0  # int4 layers whose input size is no multiple of the group size: int8 instead
    with torch.no_grad():
        for parent, child_name, child, layer_kernels in targets:
            layer_mode: KernelName = "int8" if child_name == "lm_head" else mode
            widened += int(layer_mode == "int4" and child.weight.shape[1] % group_size != 0)
            layer = quantized_layer(child.weight, child.bias, layer_mode, group_size, layer_kernels)
            report.fallback_layers += int(layer.fallback)
            report.layers += 1
            setattr(parent, child_name, layer)
        embed = getattr(model, "embed_tokens", None)
        head_kernels = (
            (kernels or kernels_for(embed.weight.device)) if isinstance(embed, nn.Embedding) else None
        )
        if (
            hasattr(model, "lm_head")
            and model.lm_head is None
            and embed is not None
            and head_kernels is not None
        ):
            head = quantized_layer(embed.weight, None, "int8", group_size, head_kernels)
            report.fallback_layers += int(head.fallback)
            report.layers += 1
            model.lm_head = head
            if getattr(model, "packed_head", None) is not None:
                model.packed_head = None
    report.bytes_after = model_weight_bytes(model)
    if widened:
        report.source = f"isq, {widened} layers int8: inputs not a multiple of {group_size}"
        log.warning(
            "int4_group_size_unfit",
            group_size=group_size,
            int8_layers=widened,
            hint="a group size that divides the hidden size (32 fits every model we run)",
        )
    return report


def quantized_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: KernelName,
    group_size: int,
    kernels: QuantKernels = "cpu",
) -> QuantLinearBase:
    """A quantized layer of a float weight for `kernels`: int8 per channel, or int4 group-wise (int8 when the input
    size is no multiple of `group_size`)."""
    if mode == "int4" and weight.shape[1] % group_size == 0:
        return quant_linear([quantize_int4(weight, group_size)], bias, kernels)
    return quant_linear(quantize_int8(weight), bias, kernels)


# ---- GGUF blocks -----------------------------------------------------------------------------------------------

QK_K = 256


def _blocks(data: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    """uint8 `[rows, blocks per row, block_bytes]` view of a GGUF tensor's raw data."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    if raw.shape[1] % block_bytes:
        raise QuantError(f"a row of {raw.shape[1]} bytes is not made of {block_bytes}-byte blocks")
    return raw.reshape(rows, raw.shape[1] // block_bytes, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """float32 of little-endian fp16 stored in the last axis (2 bytes)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 order: 16 bytes -> 32 values, low nibbles first (elements 0..15), then high (16..31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _int4(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, rows: int) -> Int4Weight:
    return Int4Weight(
        torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1), dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(scales.reshape(rows, -1), dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(zeros.reshape(rows, -1), dtype=np.float32)),
        32,
    )


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of Q4_K/Q5_K super-blocks (`[..., 12]` bytes -> float32 `[..., 8]` each), as
    ggml's get_scale_min_k4 (`qgemv.unpack_sub_scales`, the one reading of that packing)."""
    packed = torch.from_numpy(np.ascontiguousarray(scales).reshape(-1, 12))
    shape = (*scales.shape[:-1], 8)
    sc, mn = qgemv.unpack_sub_scales(packed)
    return sc.numpy().reshape(shape).astype(np.float32), mn.numpy().reshape(shape).astype(np.float32)


def _super_blocks(blocks: np.ndarray, rows: int) -> SuperBlocks:
    """Q4_K super-blocks' own scales (`SuperBlocks`): the packed 6-bit sub-scales and sub-mins and the fp16
    (d, dmin), copied as they are."""
    pairs = np.ascontiguousarray(blocks[..., 0:4]).view(np.float16)
    return SuperBlocks(
        torch.from_numpy(np.ascontiguousarray(blocks[..., 4:16]).reshape(rows, -1, 12)),
        torch.from_numpy(pairs.reshape(rows, -1, 2).copy()),
    )


def _q_k_codes_scales(blocks: np.ndarray, five_bit: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks -> (codes [rows, nb, 8, 32] uint8 0..15 or 0..31, scale [rows, nb, 8], min)."""
    d = _f16(blocks[..., 0:2])[..., None]
    dmin = _f16(blocks[..., 2:4])[..., None]
    sc, mn = _q4_k_scale_min(blocks[..., 4:16])
    if five_bit:
        qh, qs = blocks[..., 16:48], blocks[..., 48:176]
    else:
        qh, qs = None, blocks[..., 16:144]
    # 4 chunks of 32 bytes: low nibbles -> sub-block 2j, high nibbles -> sub-block 2j + 1
    qs = qs.reshape(*qs.shape[:-1], 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-2], 8, 32)
    if qh is not None:
        # bit i of qh[e] is the fifth bit of element e of sub-block i
        bits = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        codes = codes | (bits << 4)
    return codes, d * sc, dmin * mn


def gguf_to_int4(data: np.ndarray, tensor_type: int, shape: Sequence[int]) -> list[Int4Weight]:
    """int4 planes (group 32) of a GGUF matrix `[N, K]` (`shape` in torch order, rows first) from its raw blocks.

    Q4_0/Q4_1/Q4_K give one plane, Q8_0/Q5_0/Q5_1/Q5_K two (their sum is the weight). Raises UnsupportedQuantTypeError
    for other types.
    """
    from gguf import GGMLQuantizationType as T

    rows, cols = int(shape[0]), int(shape[1])
    qtype = T(int(tensor_type))
    if qtype == T.Q4_0:
        b = _blocks(data, rows, 18)
        d = _f16(b[..., 0:2])
        return [_int4(_nibbles_32(b[..., 2:]), d, np.zeros_like(d), rows)]
    if qtype == T.Q4_1:
        b = _blocks(data, rows, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return [_int4(_nibbles_32(b[..., 4:]), d, m + np.float32(8) * d, rows)]
    if qtype == T.Q8_0:
        b = _blocks(data, rows, 34)
        d = _f16(b[..., 0:2])
        q = b[..., 2:].view(np.int8).astype(np.int16)
        hi, lo = q >> 4, q & 0x0F  # q = 16 * hi + lo, hi in -8..7, lo in 0..15
        return [
            _int4((hi + 8).astype(np.uint8), np.float32(16) * d, np.zeros_like(d), rows),
            _int4(lo.astype(np.uint8), d, np.float32(8) * d, rows),
        ]
    if qtype in (T.Q5_0, T.Q5_1):
        # d (fp16), [m (fp16),] qh (32 fifth bits, bit e of element e), qs (16 bytes of nibbles, as Q4_0)
        has_min = qtype == T.Q5_1
        b = _blocks(data, rows, 24 if has_min else 22)
        d = _f16(b[..., 0:2])
        m = _f16(b[..., 2:4]) if has_min else np.float32(-16) * d  # Q5_0: (q - 16) * d
        off = 8 if has_min else 6
        qh = np.ascontiguousarray(b[..., off - 4 : off]).view("<u4")[..., 0]
        bits = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return [
            _int4(bits + 8, np.float32(16) * d, np.zeros_like(d), rows),
            _int4(_nibbles_32(b[..., off:]), d, m + np.float32(8) * d, rows),
        ]
    if qtype in (T.Q4_K, T.Q5_K):
        five = qtype == T.Q5_K
        b = _blocks(data, rows, 176 if five else 144)
        codes, scale, mn = _q_k_codes_scales(b, five)
        lo_plane = _int4(codes & 0x0F, scale, np.float32(8) * scale - mn, rows)
        if not five:
            lo_plane.super_blocks = _super_blocks(b, rows)
            return [lo_plane]
        hi = (codes >> 4) + 8  # 0 or 1, stored as 8 or 9 so that (q - 8) * 16 * scale is the fifth bit
        return [_int4(hi, np.float32(16) * scale, np.zeros_like(scale), rows), lo_plane]
    raise _unsupported(qtype.name, cols, "int4")


def _q6_k_values(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K super-blocks -> (integer values sc * (q - 32) as int32 [rows, nb, 256], d float32 [rows, nb, 1])."""
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    sc = blocks[..., 192:208].view(np.int8).astype(np.int32)
    d = _f16(blocks[..., 208:210])[..., None]
    ql = ql.reshape(*ql.shape[:-1], 2, 64)
    low = np.stack([ql & 0x0F, ql >> 4], axis=-2)  # [.., 2 halves, 2, 64]
    low = low.reshape(*ql.shape[:-2], 2, 4, 32)
    qh = qh.reshape(*qh.shape[:-1], 2, 1, 32) >> (np.arange(4, dtype=np.uint8) * 2)[:, None]
    q = (low | ((qh & 0x03) << 4)).astype(np.int32) - 32  # [.., 2, 4, 32] = 256 in order
    q = q.reshape(*q.shape[:-3], 16, 16)
    return (q * sc[..., None]).reshape(*q.shape[:-2], QK_K), d


def gguf_to_int8(data: np.ndarray, tensor_type: int, shape: Sequence[int]) -> Int8Weight:
    """int8 per-channel weight of a GGUF matrix `[N, K]` from its raw blocks, re-quantized per row from the block
    values (in float32, exact for Q8_0 and Q6_K products; a slice of rows at a time, never a float copy of the
    whole matrix). Lossy: a row's scale is its largest value / 127. Q8_0, Q6_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K;
    UnsupportedQuantTypeError otherwise."""
    from gguf import GGMLQuantizationType as T

    rows, cols = int(shape[0]), int(shape[1])
    qtype = T(int(tensor_type))
    if qtype not in (T.Q8_0, T.Q6_K, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K):
        raise _unsupported(qtype.name, cols, "int8")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    step = max(1, (1 << 22) // max(cols, 1))
    parts = []
    for start in range(0, rows, step):
        chunk = raw[start : start + step]
        n = chunk.shape[0]
        if qtype == T.Q8_0:
            b = _blocks(chunk, n, 34)
            values = b[..., 2:].view(np.int8).astype(np.float32) * _f16(b[..., 0:2])[..., None]
            parts.append(quantize_int8(torch.from_numpy(values.reshape(n, cols))))
        elif qtype == T.Q6_K:
            ints6, d6 = _q6_k_values(_blocks(chunk, n, 210))
            parts.append(quantize_int8(torch.from_numpy((ints6.astype(np.float32) * d6).reshape(n, cols))))
        else:
            parts.append(quantize_int8(dequantize_weight(gguf_to_int4(chunk, tensor_type, (n, cols)))))
    return Int8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))


def _unsupported(name: str, cols: int, target: str) -> UnsupportedQuantTypeError:
    return UnsupportedQuantTypeError(
        f"GGUF tensor type {name} cannot be loaded into our {target} layout",
        hint="supported: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0 (int4); Q6_K and those (int8); "
        "or load the GGUF dequantized (model.quantize: none)",
    )
