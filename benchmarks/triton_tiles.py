"""Time the attention kernels' tile choices (inference.triton_attention.Tiles) on a GPU and suggest the fastest.

    python -m benchmarks.triton_tiles [--model qwen3-0.6b] [--max-seconds 420]   # on a GPU
    python -m benchmarks.triton_tiles --aot sm_90                               # no GPU: compile every candidate
    python -m benchmarks.triton_tiles --smoke                                   # CPU interpreter: checks the script

Decode candidates (keys per iteration x warps x pipeline stages) run on graph-sized decode batches of 1, 64 and
256 sequences; prefill candidates (query rows x keys per iteration x warps x stages) on fresh and chunked prefills,
all over shuffled block tables on the model config's head layout. Each candidate must first agree with the
reference backend (fp32, within 2e-2 in bf16); then its kernel time is measured in a CUDA graph (as the engine's
decode runs) and compared with the current tiles measured in the same run. The result is an
AGENT_RUNTIME_TRITON_TILES value to try with `python -m benchmarks.engine --device cuda`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(slots=True)
class Shape:
    """One attention call of the benchmark: a batch as (context_len, query_len) per sequence."""

    name: str
    kind: str  # "decode" | "prefill"
    seqs: list[tuple[int, int]]
    max_context_len: int  # graph decode binds it to max_model_len


@dataclass(slots=True)
class Outcome:
    tiles: Any
    ms: dict[str, float] = field(default_factory=dict)  # shape name -> kernel ms
    failed: str = ""


DECODE_GRID = {"decode_block_n": (16, 32, 64, 128), "decode_warps": (2, 4, 8), "decode_stages": (1, 2, 3, 4)}
PREFILL_GRID = {
    "prefill_block_m": (16, 32, 64, 128),
    "prefill_block_n": (16, 32, 64, 128),
    "prefill_warps": (4, 8),
    "prefill_stages": (1, 2, 3),
}


def candidates(grid: dict[str, tuple[int, ...]], base: Any) -> list[Any]:
    """The current tiles first, then every combination of the grid (the current one not repeated)."""
    names = list(grid)
    out = [base]
    for values in itertools.product(*(grid[n] for n in names)):
        tiles = replace(base, **dict(zip(names, values, strict=True)))
        if tiles != base:
            out.append(tiles)
    return out


def shapes(smoke: bool, max_model_len: int) -> list[Shape]:
    if smoke:
        return [
            Shape("decode 2 seqs", "decode", [(40, 1), (23, 1)], 64),
            Shape("prefill 2 x 24", "prefill", [(24, 24), (30, 24)], 30),
        ]
    ctx = [
        1024 + (i * 389) % 1024 - 512 for i in range(256)
    ]  # 512-1535, spread like the benchmark's contexts
    return [
        Shape("decode, graph batch 1", "decode", [(1024, 1)], max_model_len),
        Shape("decode, graph batch 64", "decode", [(c, 1) for c in ctx[:64]], max_model_len),
        Shape("decode, graph batch 256", "decode", [(c, 1) for c in ctx], max_model_len),
        Shape("prefill 8 x 256 fresh", "prefill", [(256, 256)] * 8, 256),
        Shape("prefill 1 x 2048 fresh", "prefill", [(2048, 2048)], 2048),
        Shape("prefill 4 x 512 after 1024 cached", "prefill", [(1536, 512)] * 4, 1536),
    ]


@dataclass(slots=True)
class Bench:
    """Inputs of one shape on the device, and the reference output."""

    shape: Shape
    q: torch.Tensor
    kv: torch.Tensor
    meta: Any
    scale: float
    want: torch.Tensor | None


def build(
    shape: Shape,
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    with_reference: bool = True,
) -> Bench:
    from inference import attention as reference
    from inference.triton_aot import paged_metadata

    block = 16
    width = -(-max(shape.max_context_len, max(c for c, _ in shape.seqs)) // block)
    num_blocks = sum(-(-c // block) for c, _ in shape.seqs) + 2  # every sequence its own pages, scattered
    meta = paged_metadata(shape.seqs, block, width, shape.max_context_len, num_blocks, device, shuffle=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = sum(q for _, q in shape.seqs)
    q = torch.randn(tokens, heads, dim, generator=gen).to(device=device, dtype=dtype)
    kv = torch.randn(2, num_blocks, block, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    scale = dim**-0.5
    want = reference.paged_attention(q.float(), kv.float(), meta, scale) if with_reference else None
    return Bench(shape, q, kv, meta, scale, want)


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":
        import triton.testing

        # in a CUDA graph, as the engine's decode runs: launch overhead out, kernel time in
        return lambda fn: float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))

    def cpu(fn: Callable[[], Any]) -> float:
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1000

    return cpu


def sweep(
    tiles_list: list[Any], benches: list[Bench], device: torch.device, deadline: float, atol: float
) -> list[Outcome]:
    from inference import triton_attention as tri

    measure = timer(device)
    before = tri.tiles()
    outcomes = []
    try:
        for tiles in tiles_list:
            if time.monotonic() > deadline:
                break
            tri.set_tiles(tiles)
            outcome = Outcome(tiles)
            outcomes.append(outcome)
            for b in benches:

                def call(b: Bench = b) -> torch.Tensor:
                    return tri.paged_attention(b.q, b.kv, b.meta, b.scale)

                try:
                    got = call()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if b.want is not None:
                        err = (got.float() - b.want).abs().max().item()
                        if not err <= atol:
                            outcome.failed = f"{b.shape.name}: max error {err:.3g} > {atol}"
                            break
                    outcome.ms[b.shape.name] = measure(call)
                except (
                    Exception
                ) as exc:  # a tile that does not compile or does not fit is a result, not a crash
                    outcome.failed = f"{b.shape.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    break
    finally:
        tri.set_tiles(before)
    return outcomes


def relative(outcome: Outcome, base: Outcome) -> float:
    """Geometric mean of this candidate's time over the current tiles' time, across the shapes both ran."""
    common = [s for s in base.ms if s in outcome.ms]
    if not common or outcome.failed:
        return math.inf
    return math.exp(sum(math.log(outcome.ms[s] / base.ms[s]) for s in common) / len(common))


def label(tiles: Any, kind: str) -> str:
    from dataclasses import asdict

    return " ".join(
        f"{k.removeprefix(kind + '_')}={v}" for k, v in asdict(tiles).items() if k.startswith(kind)
    )


def report(kind: str, outcomes: list[Outcome], top: int, console: Any) -> Any:
    from rich.table import Table

    base = outcomes[0]
    ranked = sorted(outcomes, key=lambda o: relative(o, base))
    shape_names = list(base.ms)
    table = Table(title=f"{kind}: {len(outcomes)} candidates, current tiles first in the sweep")
    table.add_column("tiles", justify="left")
    for name in shape_names:
        table.add_column(f"{name} (ms)", justify="right")
    table.add_column("time vs current", justify="right")
    shown = [o for o in ranked if not o.failed][:top]
    if base not in shown:
        shown.append(base)
    for o in shown:
        mark = " (current)" if o is base else ""
        table.add_row(
            label(o.tiles, kind) + mark,
            *(f"{o.ms[s]:.4f}" if s in o.ms else "-" for s in shape_names),
            f"{relative(o, base):.2f}x",
        )
    console.print(table)
    failed = [o for o in outcomes if o.failed]
    if failed:
        console.print(
            f"{kind}: {len(failed)} candidates failed; first: {label(failed[0].tiles, kind)}: {failed[0].failed}"
        )
    best = ranked[0]
    return best.tiles if relative(best, base) < 1.0 else base.tiles


def aot_report(target: str, tiles_list: list[Any], shapes_: list[Shape], cfg: Any, console: Any) -> int:
    """Compile every candidate for `target` (no GPU) and list those that would not launch or that spill."""
    from inference import triton_attention as tri
    from inference.triton_aot import TARGETS, _describe, check, compile_only

    capability, _ = TARGETS[target]
    refused, spilling, ok = [], [], 0
    cpu = torch.device("cpu")
    benches = [
        build(s, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, cpu, False) for s in shapes_
    ]
    before = tri.tiles()
    try:
        with compile_only(capability) as captures:
            for tiles in tiles_list:
                tri.set_tiles(tiles)
                start = len(captures)
                for b in benches:
                    tri.paged_attention(b.q, b.kv, b.meta, b.scale)
                launches = [_describe(c) for c in captures[start:]]
                problems = check(launches, target)
                spills = max((x.spill_bytes for x in launches), default=0)
                if problems:
                    refused.append((tiles, problems[0]))
                elif spills:
                    spilling.append((tiles, spills))
                else:
                    ok += 1
    finally:
        tri.set_tiles(before)
    console.print(f"{target}: {len(tiles_list)} candidates compiled; {ok} fit without spills")
    for tiles, problem in refused:
        console.print(f"  would not launch: {tiles.spec() or 'current'}: {problem}")
    for tiles, spills in spilling:
        console.print(f"  spills {spills} bytes: {tiles.spec() or 'current'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.triton_tiles", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default="qwen3-0.6b", help="builtin config or config.json: the head layout"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument(
        "--max-model-len", type=int, default=4096, help="the graph decode bound (split-KV grid)"
    )
    parser.add_argument("--max-seconds", type=float, default=420.0, help="stop trying candidates after this")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument(
        "--aot", metavar="TARGET", help="compile every candidate for TARGET (e.g. sm_90) instead"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU interpreter, tiny shapes, 2 candidates per kind"
    )
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    if args.smoke and not args.aot and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (it is not, above)
    elif not gpu and not args.aot:
        print("no CUDA device: give --aot TARGET to compile the candidates, or --smoke", file=sys.stderr)
        return 2
    from rich.console import Console

    from inference import triton_attention as tri
    from inference.loader import dummy_model_config

    console = Console() if sys.stdout.isatty() else Console(width=180)
    _, cfg = dummy_model_config(args.model, getattr(torch, args.dtype))
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    base = tri.tiles()
    decode = candidates(DECODE_GRID, base)
    prefill = candidates(PREFILL_GRID, base)
    if args.smoke:
        decode, prefill = decode[:2], prefill[:2]
    all_shapes = shapes(args.smoke, args.max_model_len)
    if args.aot:
        return aot_report(args.aot, decode + prefill, all_shapes, cfg, console)
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name(device) if gpu else "CPU interpreter (smoke: not a result)"
    console.print(
        f"[bold]attention tile sweep[/] {name}, {args.model} heads {heads}/{kv_heads} dim {dim}, {args.dtype}"
    )
    dtype = getattr(torch, args.dtype)
    deadline = time.monotonic() + args.max_seconds
    chosen = {}
    for kind, tiles_list in (("decode", decode), ("prefill", prefill)):
        benches = [build(s, heads, kv_heads, dim, dtype, device) for s in all_shapes if s.kind == kind]
        # half the time budget each, so prefill is reached
        kind_deadline = min(
            deadline, time.monotonic() + (deadline - time.monotonic()) / (2 if kind == "decode" else 1)
        )
        outcomes = sweep(tiles_list, benches, device, kind_deadline, atol=2e-2)
        chosen[kind] = report(kind, outcomes, args.top, console)
        del benches
    best = replace(
        base,
        **{k: getattr(chosen["decode"], k) for k in DECODE_GRID},
        **{k: getattr(chosen["prefill"], k) for k in PREFILL_GRID},
    )
    console.print(
        f"suggested: AGENT_RUNTIME_TRITON_TILES='{best.spec()}'"
        if best.spec()
        else "suggested: the current tiles"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
