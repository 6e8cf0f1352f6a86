"""Our CPU kernel for decode-size products on weights quantized in blocks of 32 (inference/csrc/qgemv.cpp): built
for this CPU's instruction set at first use, cached on disk, checked against a reference, or left out (logged) so
that torch's kernels run instead.

Torch's packed kernels dequantize each weight to float and multiply in bf16. This one quantizes the activations to
int8 in blocks of 32 as well (as llama.cpp does) and takes each block's dot product in integers: AVX512-VNNI
`vpdpbusd` where the CPU has it, AVX2 `vpmaddubsw` otherwise. On the 2-core AVX512 machine of docs/engine.md it
reads int4 weights about 1.2-1.3x and int8 weights about 2x as fast as torch's kernels at one to four rows. The
activation rounding adds a relative error of about 0.5% to a product (torch's bf16 kernels: about 0.25%).

The same op takes larger products too (`dense_rows`): above that many rows it rounds the activations the same way,
dequantizes the weights to bf16 a slice at a time and runs bf16 matrix products, all in C++.

`QGemvWeight` is a weight in the kernel's layout: `w[n, k] = u[n, k] * scale[n, k // 32] + min[n, k // 32]`, codes
`u` of 4 bits (0..15) or 8 (signed) reordered within each row (`pack_codes`, the layout is described in the C++
file), fp16 scales and mins, or GGUF Q4_K's own compact ones (`from_super_blocks`). `AGENT_RUNTIME_QGEMV` picks
the build: `auto` (default: the best this CPU runs), `avx512_vnni`, `avx2`, or `off` (torch's kernels only).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog
import torch

from inference import envs

log = structlog.get_logger(__name__)

Isa = Literal["avx512_vnni", "avx2"]
# q_linear(x, codes, scales, mins, bits, dense_rows=-1, supers=None): the kernel up to `dense_rows` rows (all if
# negative), bf16 matrix products on the dequantized weights above, the activations rounded as the kernel rounds
# them either way
QGemvOp = Callable[..., torch.Tensor]

BLOCK = 32
# blocks of 32 under one (d, dmin) pair in the compact form: a GGUF K-quant super-block of 256
SUPER_BLOCKS = 8
_CSRC = Path(__file__).parent / "csrc"
# one library a build: the kernel, and the decode step that calls it (inference/fused_decode.py)
SOURCES = (_CSRC / "qgemv.cpp", _CSRC / "decode_step.cpp")
HEADERS = (_CSRC / "qgemv.h",)
# what each build needs from /proc/cpuinfo, and its compiler flags
_ISA_NEEDS: dict[Isa, tuple[str, ...]] = {
    "avx512_vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
}
_ISA_FLAGS: dict[Isa, tuple[str, ...]] = {
    "avx512_vnni": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
}
_BUILD_TIMEOUT_S = 300.0
# fp16 holds the scales and mins: a weight whose scales fall outside its normal range stays on torch's kernels
_FP16_MIN_NORMAL = 6.2e-5
_FP16_MAX = 65000.0


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere: no build is chosen)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_isas(flags: set[str] | None = None) -> list[Isa]:
    """The builds this CPU runs, best first."""
    have = cpu_flags() if flags is None else flags
    return [isa for isa, needs in _ISA_NEEDS.items() if all(f in have for f in needs)]


def chosen_isa() -> Isa | None:
    """The build `AGENT_RUNTIME_QGEMV` asks for (`auto`: the best this CPU runs), None for `off` or a CPU with
    none; a build this CPU cannot run is refused (logged)."""
    wanted = os.environ.get("AGENT_RUNTIME_QGEMV", "auto").strip().lower() or "auto"
    if wanted == "off":
        return None
    isas = supported_isas()
    if wanted == "auto":
        return isas[0] if isas else None
    if wanted not in _ISA_NEEDS:
        log.warning("qgemv_unknown_setting", value=wanted, expected="auto, avx512_vnni, avx2 or off")
        return isas[0] if isas else None
    if wanted not in isas:
        log.warning("qgemv_isa_unsupported", isa=wanted, cpu_runs=isas or "none")
        return None
    return wanted


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """Quantized layers built inside run torch's kernels (`AGENT_RUNTIME_QGEMV=off` for the duration): for tests
    of torch's layouts and benchmarks that compare the two in one process."""
    before = os.environ.get("AGENT_RUNTIME_QGEMV")
    os.environ["AGENT_RUNTIME_QGEMV"] = "off"
    qgemv_kernel.cache_clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AGENT_RUNTIME_QGEMV", None)
        else:
            os.environ["AGENT_RUNTIME_QGEMV"] = before
        qgemv_kernel.cache_clear()  # the next call reads the restored setting


def namespace(isa: Isa) -> str:
    return f"agent_runtime_qgemv_{isa}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path(isa: Isa, cxx: str) -> Path:
    """Where the build for `isa` is cached: keyed by the source, torch's version, the flags and the compiler."""
    key = hashlib.sha256(
        "\0".join(
            [*(p.read_text() for p in (*SOURCES, *HEADERS)), torch.__version__, isa, cxx, *_ISA_FLAGS[isa]]
        ).encode()
    ).hexdigest()[:16]
    return envs.cache_dir() / "qgemv" / f"{namespace(isa)}-{key}.so"


def build(isa: Isa) -> Path:
    """The shared library for `isa`, compiled once (about 10 s) and then read from the cache; raises `RuntimeError`
    with the compiler's first error line."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH, and CXX is not set")
    out = library_path(isa, cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    # the one wait a user sees on a first start (about 10 s on 2 cores): say what it is
    log.info(
        "qgemv_building", isa=isa, cache=str(out.parent), note="once per CPU, compiler and torch version"
    )
    started = time.perf_counter()

    torch_lib = Path(torch.__file__).parent / "lib"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [
            cxx,
            "-O3",
            "-shared",
            "-fPIC",
            "-std=c++20",
            "-fopenmp",
            "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DQGEMV_NAMESPACE={namespace(isa)}",
            *_ISA_FLAGS[isa],
            *(f"-I{p}" for p in cpp_extension.include_paths()),
            *(str(p) for p in SOURCES),
            f"-L{torch_lib}",
            f"-Wl,-rpath,{torch_lib}",
            "-ltorch_cpu",
            "-lc10",
            "-o",
            str(partial),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the compiler ran over {_BUILD_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            errors = [
                line for line in done.stderr.splitlines() if "error" in line
            ] or done.stderr.splitlines()
            raise RuntimeError((errors[0] if errors else f"{cxx} exited {done.returncode}")[:300])
        os.replace(partial, out)  # atomic: a process building at the same time finds a whole file
    log.info("qgemv_built", isa=isa, seconds=round(time.perf_counter() - started, 1))
    return out


def load(isa: Isa) -> QGemvOp:
    """The `q_linear` op of the build for `isa` (raises as `build` does; the library is loaded once a process)."""
    return _library(isa, build(isa))


def library_of(op: object) -> str | None:
    """The op namespace (one build's library) that `op` belongs to, None for anything but a registered op."""
    qualified = str(getattr(op, "_qualified_op_name", ""))
    return qualified.split("::")[0] if "::" in qualified else None


def sibling_op(op: object, name: str) -> Callable[..., torch.Tensor]:
    """The op `name` (`q_rows`, `decode_step`) of the build that `op` (a `q_linear`) comes from."""
    library = library_of(op)
    if library is None:
        raise ValueError(f"{op!r} is not an op of our kernel's library")
    found: Callable[..., torch.Tensor] = getattr(getattr(torch.ops, library), name)
    return found


@functools.cache
def _library(isa: Isa, path: Path) -> QGemvOp:
    ns = namespace(isa)
    if not hasattr(torch.ops, ns) or not hasattr(getattr(torch.ops, ns), "q_linear"):
        # once per namespace: a second library (another cache folder) would register the op twice
        torch.ops.load_library(str(path))

        def _shape(
            x: torch.Tensor,
            codes: torch.Tensor,
            scales: torch.Tensor,
            mins: torch.Tensor,
            bits: int,
            dense_rows: int = -1,
            supers: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return x.new_empty(x.shape[0], codes.shape[0])

        def _rows_shape(
            ids: torch.Tensor,
            codes: torch.Tensor,
            scales: torch.Tensor,
            mins: torch.Tensor,
            bits: int,
            dtype: torch.dtype,
            supers: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return scales.new_empty(*ids.shape, codes.shape[1] * 8 // bits, dtype=dtype)

        # the outputs' shapes, for torch.compile
        torch.library.register_fake(f"{ns}::q_linear", _shape)
        torch.library.register_fake(f"{ns}::q_rows", _rows_shape)
    op: QGemvOp = getattr(torch.ops, ns).q_linear
    return op


@functools.cache
def qgemv_kernel() -> QGemvOp | None:
    """This process's kernel, found once: built and loaded for `chosen_isa`, then checked on a small weight against
    its dequantized product; None (logged) where there is no build, it fails, or it computes wrong."""
    isa = chosen_isa()
    if isa is None:
        return None
    try:
        op = load(isa)
        ok, error = check(op)
    except (RuntimeError, OSError) as exc:
        log.warning(
            "qgemv_unavailable",
            isa=isa,
            reason=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            fallback="torch's int8/int4 kernels",
        )
        return None
    if not ok:
        log.warning("qgemv_wrong", isa=isa, relative_error=error, fallback="torch's int8/int4 kernels")
        return None
    log.debug("qgemv_ready", isa=isa)
    return op


def check(op: QGemvOp) -> tuple[bool, float]:
    """Whether `op` computes both code widths, int4 with and without mins and with compact scales, within the
    activation rounding (a relative error of about 0.5%; a layout or build mistake gives 100%), on shapes that cross
    every region of the layout."""
    gen = torch.Generator().manual_seed(0)
    n, k = 48, 64 * 13  # 26 blocks: a group of 16, one of 8, a pair
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(3, k, generator=gen)
    worst = 0.0
    weights = [
        quantize_blocks(w, bits, symmetric=symmetric)
        for bits, symmetric in ((4, False), (4, True), (8, True))
    ]
    xs = [x] * 3
    # compact scales: 24 blocks (a group of 16 and one of 8, three super-blocks)
    weights.append(quantize_super_blocks(w[:, :768]))
    xs.append(x[:, :768].contiguous())
    for q, xq in zip(weights, xs, strict=True):
        ref = xq @ q.dequantize().t()
        out = op(xq, q.codes, q.scales, q.mins, q.bits, -1, q.op_supers)
        worst = max(worst, float((out - ref).norm() / ref.norm()))
    return worst < 0.03, worst


# ---- the weight layout -----------------------------------------------------------------------------------------


def no_supers() -> torch.Tensor:
    """The `supers` of a weight with fp16 scales: an empty tensor (the op's argument is then ignored)."""
    return torch.empty(0, dtype=torch.float16)


@dataclass(slots=True)
class QGemvWeight:
    """A weight in the kernel's layout: `codes` uint8 `[N, K * bits / 8]` (`pack_codes`), fp16 `[N, K / 32]`
    `scales` and `mins`; `w[n, k] = u[n, k] * scale + min` with `u` in 0..15 (4 bits) or the signed code (8). A
    symmetric weight has no mins (an empty tensor, 2 bytes a block less to read): `min = -8 * scale` for 4 bits
    (GGUF Q4_0), 0 for 8 (Q8_0, per-channel int8).

    Compact (GGUF Q4_K kept as the file has it; `supers` not empty, 4 bits, K a multiple of 256): `scales` is uint8
    `[N, K / 256 * 12]`, each super-block's 8 six-bit sub-scales and sub-mins packed as Q4_K packs them
    (`pack_sub_scales`), `mins` empty, `supers` fp16 `[N, K / 256, 2]` each super-block's (d, dmin):
    `scale = d * sub_scale`, `min = -dmin * sub_min`; 18 bytes a block of 32, the file's, where fp16 pairs take
    20."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int
    supers: torch.Tensor = field(default_factory=no_supers)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]) * 8 // self.bits)

    @property
    def symmetric(self) -> bool:
        return self.mins.numel() == 0 and not self.compact

    @property
    def compact(self) -> bool:
        return self.supers.numel() > 0

    @property
    def op_supers(self) -> torch.Tensor | None:
        """The op's `supers` argument: None for fp16 scales."""
        return self.supers if self.compact else None

    def block_scales(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 `[rows, K / 32]` scales of rows `[start, stop)` (exact: d * sub-scale fits float32)."""
        if not self.compact:
            return self.scales[start:stop].float()
        d = self.supers[start:stop, :, 0].float().repeat_interleave(SUPER_BLOCKS, dim=1)
        return d * unpack_sub_scales(self.scales[start:stop])[0].float()

    def block_mins(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 `[rows, K / 32]` mins of rows `[start, stop)`, a symmetric weight's implied ones included."""
        if self.compact:
            dmin = self.supers[start:stop, :, 1].float().repeat_interleave(SUPER_BLOCKS, dim=1)
            return -dmin * unpack_sub_scales(self.scales[start:stop])[1].float()
        if not self.symmetric:
            return self.mins[start:stop].float()
        scales = self.scales[start:stop].float()
        return scales * -8.0 if self.bits == 4 else torch.zeros_like(scales)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows `[start, stop)`, `[rows, K]` in row order."""
        return self.dequantize_laid(start, stop)[:, positions(self.shape[1])]

    def dequantize_laid(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows `[start, stop)` in the 8-bit layout's column order (byte `positions(K)[k]` holds value k):
        no gather, each region's scales broadcast over its blocks' lanes (the C++ dense path does the same)."""
        k = self.shape[1]
        codes = laid_codes(self.codes[start:stop], self.bits, k)
        u = (codes.view(torch.int8) if self.bits == 8 else codes).float()
        rows = u.shape[0]
        s, m = self.block_scales(start, stop), self.block_mins(start, stop)
        b8, bp, blocks = region_blocks(k)
        g16 = b8 // 16
        # a group of 16 is [vector j, lanes of 16 blocks x 4 values], a group of 8 the same with 8 lanes: their
        # scales, repeated over each block's 4 values, make a lane row that every vector j shares (a long inner
        # loop, where broadcasting one scale over 4 values vectorizes badly); pairs are blocks in order
        parts = []
        if b8:
            region = u[:, : b8 * BLOCK].reshape(rows, g16, 8, 64)
            lanes = (rows, g16, 1, 64)
            sv = s[:, :b8].reshape(rows, g16, 16, 1).expand(rows, g16, 16, 4).reshape(lanes)
            mv = m[:, :b8].reshape(rows, g16, 16, 1).expand(rows, g16, 16, 4).reshape(lanes)
            parts.append((region * sv + mv).reshape(rows, -1))
        if bp > b8:
            region = u[:, b8 * BLOCK : bp * BLOCK].reshape(rows, 8, 32)
            sv = s[:, b8:bp].reshape(rows, 8, 1).expand(rows, 8, 4).reshape(rows, 1, 32)
            mv = m[:, b8:bp].reshape(rows, 8, 1).expand(rows, 8, 4).reshape(rows, 1, 32)
            parts.append((region * sv + mv).reshape(rows, -1))
        if blocks > bp:
            region = u[:, bp * BLOCK :].reshape(rows, blocks - bp, BLOCK)
            parts.append((region * s[:, bp:, None] + m[:, bp:, None]).reshape(rows, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def region_blocks(k: int) -> tuple[int, int, int]:
    """Where a row's regions end, in blocks: (groups of 16, then the group of 8, then the pairs = all blocks)."""
    blocks = k // BLOCK
    end16 = blocks // 16 * 16
    return end16, end16 + (blocks % 16) // 8 * 8, blocks


@functools.cache
def positions(k: int) -> torch.Tensor:
    """For each value k of a row, its byte in the 8-bit layout (the C++ `position`)."""
    end16, end8, blocks = region_blocks(k)
    b = torch.arange(blocks)[:, None]
    v = torch.arange(BLOCK)[None, :]
    in16 = (b // 16) * 512 + (v // 4) * 64 + (b % 16) * 4 + v % 4
    in8 = end16 * BLOCK + (v // 4) * 32 + (b - end16) * 4 + v % 4
    pairs = b * BLOCK + v
    pos = torch.where(b < end16, in16, torch.where(b < end8, in8, pairs))
    return pos.reshape(k)


def _nibble_regions(k: int) -> list[tuple[int, int]]:
    """(bytes, width) of each region of a row in the 8-bit layout: a 4-bit row packs each run of 2 * width bytes
    as width bytes, the first run in the low nibbles and the second in the high ones."""
    end16, end8, blocks = region_blocks(k)
    return [(end16 * BLOCK, 64), ((end8 - end16) * BLOCK, 32), ((blocks - end8) * BLOCK, 32)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 `[N, K]` codes (0..15, or int8 viewed as uint8) in the kernel's layout."""
    n, k = codes.shape
    laid = torch.empty_like(codes)
    laid[:, positions(k)] = codes
    if bits == 8:
        return laid
    parts, start = [], 0
    for size, width in _nibble_regions(k):
        if size:
            run = laid[:, start : start + size].reshape(n, -1, 2, width)
            parts.append((run[:, :, 0] | (run[:, :, 1] << 4)).reshape(n, -1))
        start += size
    return torch.cat(parts, dim=1).contiguous()


def laid_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 `[N, K]` codes in the 8-bit layout's order (int4 nibbles split, nothing gathered)."""
    if bits == 8:
        return packed
    n = packed.shape[0]
    parts, start = [], 0
    for size, width in _nibble_regions(k):
        if size:
            run = packed[:, start // 2 : (start + size) // 2].reshape(n, -1, 1, width)
            parts.append(torch.cat([run & 15, run >> 4], dim=2).reshape(n, -1))
        start += size
    return torch.cat(parts, dim=1)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 `[N, K]` codes in row order from the kernel's layout (the inverse of `pack_codes`)."""
    return laid_codes(packed, bits, k)[:, positions(k)]


def fits(out_features: int, in_features: int) -> bool:
    """Shapes the kernel takes: whole pairs of blocks along K."""
    return in_features % (2 * BLOCK) == 0 and out_features > 0


def _fp16_ok(scales: torch.Tensor, mins: torch.Tensor | None) -> bool:
    """Scales in fp16's normal range (a subnormal one loses relative precision), mins without overflow (a tiny
    min loses precision only against the block's scale, which dwarfs it)."""
    s = scales.abs()
    return bool((s <= _FP16_MAX).all() and ((s >= _FP16_MIN_NORMAL) | (s == 0)).all()) and bool(
        mins is None or (mins.abs() <= _FP16_MAX).all()
    )


def from_blocks(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int
) -> QGemvWeight | None:
    """A weight from row-order codes `[N, K]` (uint8 0..15 for 4 bits, int8 for 8) and float `[N, K / 32]` scales
    and mins (None: symmetric, see `QGemvWeight`); None where a scale or min would lose precision in fp16 (the
    layer then keeps torch's layout)."""
    if not _fp16_ok(scales, mins):
        return None
    u8 = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes.to(torch.uint8)
    held = torch.empty(0, dtype=torch.float16) if mins is None else mins.half().contiguous()
    return QGemvWeight(pack_codes(u8.contiguous(), bits), scales.half().contiguous(), held, bits)


def unpack_sub_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 `[N, S * 12]` (or `[N, S, 12]`) packed Q4_K sub-scales and sub-mins -> uint8 `[N, S * 8]` each, in
    block order (ggml's `get_scale_min_k4`; the C++ `unpack_sub_scales`)."""
    q = packed.reshape(packed.shape[0], -1, 12)
    a, b, c = q[..., 0:4], q[..., 4:8], q[..., 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc.reshape(q.shape[0], -1), mn.reshape(q.shape[0], -1)


def pack_sub_scales(sub_scales: torch.Tensor, sub_mins: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, S * 8]` sub-scales and sub-mins (0..63) packed as Q4_K packs them: uint8 `[N, S * 12]` (the
    inverse of `unpack_sub_scales`)."""
    n = sub_scales.shape[0]
    sc = sub_scales.to(torch.uint8).reshape(n, -1, 8)
    mn = sub_mins.to(torch.uint8).reshape(n, -1, 8)
    a = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=-1).reshape(n, -1).contiguous()


def from_super_blocks(codes: torch.Tensor, packed: torch.Tensor, supers: torch.Tensor) -> QGemvWeight:
    """A compact 4-bit weight (`QGemvWeight`) from row-order codes `[N, K]` (uint8 0..15), uint8 `[N, K / 256, 12]`
    packed sub-scales and sub-mins and fp16 `[N, K / 256, 2]` (d, dmin) pairs: GGUF Q4_K's blocks as they are."""
    n, k = codes.shape
    supers_shape = (n, k // (BLOCK * SUPER_BLOCKS), 2)
    if (
        k % (BLOCK * SUPER_BLOCKS)
        or supers.shape != supers_shape
        or packed.numel() != n * supers_shape[1] * 12
    ):
        raise ValueError(
            f"super-blocks need K a multiple of 256, [N, K / 256, 2] supers and 12 bytes of sub-scales a "
            f"super-block, got K={k}"
        )
    return QGemvWeight(
        pack_codes(codes.to(torch.uint8).contiguous(), 4),
        packed.to(torch.uint8).reshape(n, -1).contiguous(),
        torch.empty(0, dtype=torch.uint8),
        4,
        supers.to(torch.float16).contiguous(),
    )


def quantize_super_blocks(w: torch.Tensor) -> QGemvWeight:
    """A float `[N, K]` weight (K a multiple of 256) in the compact form, quantized about as Q4_K is: int4 with a
    min per block, its scale and min as 6-bit multiples of its super-block's fp16 d and dmin (for `check` and
    tests; the loader takes a file's Q4_K blocks as they are)."""
    n, k = w.shape
    blocks = w.float().view(n, k // BLOCK, BLOCK)
    lo = blocks.amin(dim=-1).clamp_max(0.0)
    scale = (blocks.amax(dim=-1) - lo) / 15
    per_super = (n, k // (BLOCK * SUPER_BLOCKS), SUPER_BLOCKS)
    d = (scale.view(per_super).amax(dim=-1) / 63).clamp_min(_FP16_MIN_NORMAL).half()
    dmin = ((-lo).view(per_super).amax(dim=-1) / 63).clamp_min(_FP16_MIN_NORMAL).half()
    dv = d.float().repeat_interleave(SUPER_BLOCKS, dim=1)
    dminv = dmin.float().repeat_interleave(SUPER_BLOCKS, dim=1)
    sub_scales = torch.round(scale / dv).clamp(1, 63)
    sub_mins = torch.round(-lo / dminv).clamp(0, 63)
    s, m = (dv * sub_scales)[..., None], (dminv * sub_mins)[..., None]
    codes = torch.round((blocks + m) / s).clamp(0, 15).to(torch.uint8)
    packed = pack_sub_scales(sub_scales.to(torch.uint8), sub_mins.to(torch.uint8))
    return from_super_blocks(codes.view(n, k), packed, torch.stack([d, dmin], dim=-1))


def quantize_blocks(w: torch.Tensor, bits: int, *, symmetric: bool = False) -> QGemvWeight:
    """A float `[N, K]` weight quantized per block of 32: symmetric int8, or int4 with a min (`symmetric`: around
    8, without one) (for `check` and tests; the loader converts `quant.Int8Weight` / `quant.Int4Weight` codes
    instead)."""
    n, k = w.shape
    blocks = w.float().view(n, k // BLOCK, BLOCK)
    mins: torch.Tensor | None = None
    if bits == 8:
        scale = (blocks.abs().amax(dim=-1) / 127).clamp_min(_FP16_MIN_NORMAL)
        codes = torch.round(blocks / scale[..., None]).clamp(-127, 127).to(torch.int8)
    elif symmetric:
        scale = (blocks.abs().amax(dim=-1) / 7).clamp_min(_FP16_MIN_NORMAL)
        codes = (torch.round(blocks / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    else:
        lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp_min(_FP16_MIN_NORMAL)
        codes = torch.round((blocks - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        mins = lo
    q = from_blocks(
        codes.view(n, k), scale.half().float(), None if mins is None else mins.half().float(), bits
    )
    assert q is not None
    return q
