"""Weight-only quantized matmul kernels against bf16 and fp32 linears on the CPU, at SmolLM2-135M's shapes.

Run `python -m benchmarks.quant_kernels [--rows 1,4,16,64] [--rounds 5] [--compile]`. For each weight shape
(in -> out) and row count it times every variant in interleaved rounds (so a noisy neighbour hits all alike) and
prints the median microseconds per call and the ratio to bf16 `F.linear`. Variants:

- `fp32`, `bf16`: `F.linear` on plain weights; `bf16 packed`: oneDNN's blocked bf16 layout (inference/cpu_linear);
- `int8 (bf16)`: `aten._weight_int8pack_mm`, per-channel scales;
- `int4 gN (bf16)`: `aten._weight_int4pack_mm_for_cpu`, group size N (32, 64, and 128 where it divides the input);
- `int4 g32 x2 (bf16)`: two int4 planes summed, the exact layout of GGUF Q8_0/Q5_K;
- with `--fp32-kernels`, the int8 and int4 kernels on fp32 activations: on x86 torch vectorizes them for bf16
  only (its fp32 path is scalar, 10-40x slower here);
- `qgemv int8 g32`, `qgemv int4 g32`: our own kernel (inference/qgemv.py: activations rounded to int8 per block
  of 32, integer dot products), where it builds on this CPU; `... dense`: the same op's dense path at every row
  count (rounded activations, weights dequantized to bf16 a slice at a time, bf16 products), which layers take
  above `quant.qgemv_dense_rows(in)` rows;
- `w8a8 fbgemm (fp32)`: `quantized::linear_dynamic` (activations quantized to int8 per call; other numerics);
- `compiled dequant int8 g32`: with `--compile`, `torch.compile` of a group-wise int8 dequantize + matmul.

Exits 0; a variant that fails on this CPU prints `n/a`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from inference import cpu_linear, qgemv
from inference.quant import Int4Weight, int4_mm, int8_mm, pack_int4, quantize_int4, quantize_int8

# (in, out): SmolLM2-135M's linears; our model fuses q/k/v (576 -> 960) and gate/up (576 -> 3072).
SHAPES = [
    (576, 576),
    (576, 192),
    (576, 960),
    (576, 1536),
    (576, 3072),
    (1536, 576),
    (576, 49152),
]

Fn = Callable[[], torch.Tensor]


def time_call(fn: Fn, budget_s: float = 0.02) -> float:
    """Seconds per call: enough calls to fill `budget_s`."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(3, min(2000, int(budget_s / once)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _planes(w: torch.Tensor) -> list[Int4Weight]:
    """Two int4 planes whose sum is an int8 group-32 weight (as GGUF Q8_0 loads)."""
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    d = g.abs().amax(-1) / 127
    q = torch.round(g / d[..., None]).to(torch.int16).reshape(n, k)
    hi, lo = q >> 4, q & 15
    return [
        Int4Weight((hi + 8).to(torch.uint8), 16 * d, torch.zeros_like(d), 32),
        Int4Weight(lo.to(torch.uint8), d, 8 * d, 32),
    ]


def variants(w32: torch.Tensor, m: int, use_compile: bool, with_fp32: bool) -> dict[str, Fn]:
    n, k = w32.shape
    gen = torch.Generator().manual_seed(1)
    x32 = torch.randn(m, k, generator=gen)
    xbf = x32.bfloat16()
    wbf = w32.bfloat16()
    out: dict[str, Fn] = {
        "fp32": lambda: torch.nn.functional.linear(x32, w32),
        "bf16": lambda: torch.nn.functional.linear(xbf, wbf),
    }
    if cpu_linear.packing_supported():
        packed = cpu_linear.pack_weight(wbf)
        out["bf16 packed"] = lambda: cpu_linear.packed_linear(xbf, packed, None)
    q8 = quantize_int8(w32)
    s8bf, s8 = q8.scales.bfloat16(), q8.scales
    out["int8 (bf16)"] = lambda: int8_mm(xbf, q8.qweight, s8bf)
    if with_fp32:
        out["int8 (fp32)"] = lambda: int8_mm(x32, q8.qweight, s8)
    for g in (32, 64, 128):
        if k % g:
            continue
        q4 = quantize_int4(w32, g)
        p, szbf = pack_int4(q4, torch.bfloat16)
        out[f"int4 g{g} (bf16)"] = lambda p=p, g=g, s=szbf: int4_mm(xbf, p, g, s)
        if with_fp32 and g == 32:
            _, sz32 = pack_int4(q4, torch.float32)
            out[f"int4 g{g} (fp32)"] = lambda p=p, g=g, s=sz32: int4_mm(x32, p, g, s)
    op = qgemv.qgemv_kernel()
    if op is not None and qgemv.fits(n, k):
        for bits in (8, 4):
            qg = qgemv.quantize_blocks(w32, bits)
            out[f"qgemv int{bits} g32"] = lambda qg=qg, b=bits: op(xbf, qg.codes, qg.scales, qg.mins, b)
            out[f"qgemv int{bits} g32 dense"] = lambda qg=qg, b=bits: op(
                xbf, qg.codes, qg.scales, qg.mins, b, 0
            )
    (p1, s1), (p2, s2) = (pack_int4(pl, torch.bfloat16) for pl in _planes(w32))
    out["int4 g32 x2 (bf16)"] = lambda: int4_mm(xbf, p1, 32, s1) + int4_mm(xbf, p2, 32, s2)
    try:
        qw = torch.quantize_per_channel(
            w32, q8.scales.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
        fb = torch.ops.quantized.linear_prepack(qw, None)
        torch.ops.quantized.linear_dynamic(x32, fb)
        out["w8a8 fbgemm (fp32)"] = lambda: torch.ops.quantized.linear_dynamic(x32, fb)
    except (RuntimeError, AttributeError):
        pass
    if use_compile:
        g8 = w32.reshape(n, k // 32, 32)
        d8 = (g8.abs().amax(-1) / 127).bfloat16()
        q8g = torch.round(g8 / d8.float()[..., None]).to(torch.int8)

        @torch.compile(dynamic=False)
        def deq_mm(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            w = (q.to(torch.bfloat16) * d[..., None]).reshape(n, k)
            return torch.nn.functional.linear(x, w)

        out["compiled dequant int8 g32 (bf16)"] = lambda: deq_mm(xbf, q8g, d8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="", help="in:out,... (default: SmolLM2's)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd dequant + matmul")
    ap.add_argument(
        "--fp32-kernels",
        action="store_true",
        help="also time the int8/int4 kernels on fp32 activations (slow)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu {torch.backends.cpu.get_cpu_capability()}"
    )
    for k, n in shapes:
        w32 = torch.randn(n, k) * 0.02
        for m in rows:
            fns = variants(w32, m, args.compile, args.fp32_kernels)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    try:
                        times[name].append(time_call(fn))
                    except RuntimeError:
                        times[name].append(float("nan"))
            base = statistics.median(times["bf16"])
            print(f"\n{k} -> {n}, {m} rows   (us per call, ratio to bf16 F.linear)")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {name:34s} {med * 1e6:10.1f}  {base / med:6.2f}x")


if __name__ == "__main__":
    main()
