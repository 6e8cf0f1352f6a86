"""Compile the Triton kernels for a CUDA GPU without one: run a model's forward on the CPU with every Triton launch
turned into an ahead-of-time compile for the target (sm_90 by default), and report each specialisation's resources.
The model runs with float weights, then with int8 and int4 linear layers (the quantized matmuls, `--quantize`).

The interpreter that runs the kernels on the CPU checks their arithmetic, not what only the compiler rejects: a type
that changes across loop iterations, a `tl.dot` shape the tensor cores cannot take, a tile that needs more shared
memory than the GPU has (an `OutOfResources` at the first launch), registers spilled to local memory. Triton's own
compiler and ptxas run fine on a machine with no GPU; only the launch needs one. `python -m inference.triton_aot`.
The LoRA kernels (inference/triton_lora.py) are compiled from their own launches over a model's projection shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from inference import envs

# Per-block shared memory a kernel may opt into, in bytes (CUDA programming guide, "Technical Specifications").
TARGETS: dict[str, tuple[int, int]] = {  # name -> (compute capability, shared memory per block)
    "sm_80": (80, 166_912),  # A100
    "sm_86": (86, 101_376),  # RTX 30xx, A10, A40
    "sm_89": (89, 101_376),  # RTX 40xx, L4, L40
    "sm_90": (90, 232_448),  # H100, H200
}
SM_COUNTS = {80: 108, 86: 84, 89: 58, 90: 132}  # the split-KV choice depends on it: the flagship card's count
MAX_REGISTERS = 255  # per thread on every target above

# LoRA projection shapes, (hidden, q features, k/v features each, intermediate), from the models' config.json
LORA_MODELS: dict[str, tuple[int, int, int, int]] = {
    "smollm2-135m": (576, 9 * 64, 3 * 64, 1536),  # 9 query heads and 3 KV heads of 64
    "qwen3-0.6b": (1024, 16 * 128, 8 * 128, 3072),  # 16 query heads and 8 KV heads of 128
}
LORA_RANKS = (8, 16)
LORA_SLOTS = 4  # max_loras' default: the buffers' slot count, which is also the kernels' grid

_RESOURCES = re.compile(r"Function (\w+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


class AotError(RuntimeError):
    """The kernels cannot be compiled ahead of time in this process."""


@dataclass(slots=True)
class CompiledLaunch:
    """One kernel specialisation as a launch of the model's forward asked for it, compiled for the target."""

    kernel: str
    case: str  # which forward asked for it, e.g. "decode 4 seqs"
    constants: dict[str, Any]  # the launch's constexpr arguments (tile sizes, head counts)
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic (Triton's) plus static shared memory per block
    registers: int
    spill_bytes: int  # local memory and stack: registers spilled, slow but not an error
    compile_seconds: float


@dataclass(slots=True)
class _Capture:
    kernel: Any
    compiled: Any
    constants: dict[str, Any]
    seconds: float
    case: str = ""


class _TargetDriver:
    """Enough of a Triton driver to compile for `target`: device 0, stream 0, no GPU behind it."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _constants(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args, strict=False)) | kwargs
    return {p.name: bound[p.name] for p in kernel.params if p.is_constexpr and p.name in bound}


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[list[_Capture]]:
    """Within the block, every Triton kernel launch compiles for CUDA compute `capability` and does not run.

    Outputs the kernels would have written stay as allocated, so values downstream are garbage; shapes, strides and
    dtypes (all that decides a specialisation) are the real ones. Yields the list of captured compiles.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from inference import triton_attention, triton_quant

    if triton_attention.INTERPRETED:
        raise AotError(
            "the Triton kernels were defined under TRITON_INTERPRET=1, so they can only be interpreted; "
            "run this in a process without TRITON_INTERPRET"
        )
    captures: list[_Capture] = []
    touched: dict[int, tuple[Any, Any]] = {}  # kernel id -> (kernel, its own per-device caches)
    real_run = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if id(self) not in touched:
            # the per-device caches would otherwise keep the fake target's binder and kernels for device 0
            touched[id(self)] = (self, self.device_caches)
            self.device_caches = type(self.device_caches)(self.device_caches.default_factory)
        t0 = time.perf_counter()
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        captures.append(_Capture(self, compiled, _constants(self, args, kwargs), time.perf_counter() - t0))
        return compiled

    # not `driver.active`: on a machine with no GPU, reading it looks for a driver and raises; None restores the lazy
    # lookup where nothing was active before
    previous = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(GPUTarget("cuda", capability, 32)))
    JITFunction.run = run
    # The split-KV choice reads the GPU's multiprocessor count, and pretends a tiny GPU for CPU tensors: ask it as
    # for a tensor on the target.
    splits = triton_attention.num_decode_splits
    sms = SM_COUNTS.get(capability, 132)

    def num_decode_splits(num_seqs: int, kv_heads: int, max_context_len: int, _device: torch.device) -> int:
        return splits(num_seqs, kv_heads, max_context_len, torch.device("cuda", 0))

    real_sm_count = triton_attention.sm_count
    triton_attention.sm_count = lambda _index: sms  # type: ignore[assignment]  # patched, restored below
    triton_attention.num_decode_splits = num_decode_splits  # type: ignore[assignment]  # patched, restored below
    # the quantized matmuls refuse CPU tensors outside the interpreter, and size their split-K by the GPU's SMs
    quant_runs_on, quant_sms = triton_quant.kernels_run_on, triton_quant.multiprocessors
    triton_quant.kernels_run_on = lambda _device: True  # type: ignore[assignment]  # patched, restored below
    triton_quant.multiprocessors = lambda _device: sms  # type: ignore[assignment]  # patched, restored below
    try:
        yield captures
    finally:
        JITFunction.run = real_run
        driver.set_active(previous)
        triton_attention.sm_count = real_sm_count
        triton_attention.num_decode_splits = splits
        triton_quant.kernels_run_on, triton_quant.multiprocessors = quant_runs_on, quant_sms
        for kernel, caches in touched.values():
            kernel.device_caches = caches


def _resources(cubin: bytes) -> dict[str, tuple[int, int, int, int, int]]:
    """kernel name -> (registers, stack, static shared, local) of a cubin, read by cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5]), 0) for m in _RESOURCES.finditer(out)}


def _describe(capture: _Capture) -> CompiledLaunch:
    compiled = capture.compiled
    md = compiled.metadata
    name = capture.kernel.fn.__name__
    regs, stack, static_shared, local, _ = _resources(compiled.asm["cubin"]).get(name, (0, 0, 0, 0, 0))
    return CompiledLaunch(
        kernel=name,
        case=capture.case,
        constants={k: v for k, v in capture.constants.items() if k != "INTERPRETER"},
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        shared_bytes=md.shared + static_shared,
        registers=regs,
        spill_bytes=stack + local,
        compile_seconds=round(capture.seconds, 3),
    )


# ---- the model's forwards ------------------------------------------------------------------------------------


def _forward_cases(block_size: int, max_model_len: int) -> list[tuple[str, list[tuple[int, int]], int, int]]:
    """(name, [(context_len, query_len)] per sequence, block-table width, max_context_len) of the batches an engine
    runs. Graph-captured decode binds max_context_len to max_model_len (its grid is fixed when captured), so it takes
    the widest split-KV specialisation of its batch size."""
    full = -(-max_model_len // block_size)
    graph = [
        (f"decode in a graph, batch {n}", [(200 + i, 1) for i in range(n)], full, max_model_len)
        for n in (1, 8, 64, 256)
    ]
    return [
        ("prefill", [(100, 100), (37, 37), (1, 1)], 8, 100),
        ("chunked prefill after a cached prefix", [(300, 45), (64, 1)], 20, 300),
        ("eager decode, 4 seqs", [(1000, 1), (500, 1), (20, 1), (3, 1)], 64, 1000),
        *graph,
    ]


def paged_metadata(
    seqs: list[tuple[int, int]],
    block_size: int,
    width: int,
    max_context_len: int,
    num_blocks: int,
    device: torch.device | str = "cpu",
    shuffle: bool = False,
) -> Any:
    """AttentionMetadata of a batch given as (context_len, query_len) per sequence, over block tables `width` wide.

    Blocks are dealt out in order, wrapping past `num_blocks` (block 0 is the null block); `shuffle` deals them in a
    seeded random order instead, scattered through the cache as a long-running engine leaves them."""
    from inference.metadata import AttentionMetadata

    order = (
        torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1 if shuffle else None
    )
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    slots: list[int] = []
    starts = [0]
    for i, (ctx, q_len) in enumerate(seqs):
        blocks = [(i * width + j) % (num_blocks - 1) + 1 for j in range(-(-ctx // block_size))]
        if order is not None:
            blocks = [int(order[b - 1]) for b in blocks]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(q for _, q in seqs),
        max_context_len=max_context_len,
        block_size=block_size,
    )


QUANTIZED_MODES = ("int8", "int4")  # besides float weights, the layouts whose matmuls the AOT compile covers


def compile_model(
    config: Any,
    *,
    target: str = "sm_90",
    block_size: int = 16,
    max_model_len: int = 4096,
    quantize: tuple[str, ...] = QUANTIZED_MODES,
    progress: Callable[[str], None] | None = None,
) -> list[CompiledLaunch]:
    """Every distinct kernel specialisation a one-layer copy of `config` (a ModelConfig) launches in the engine's
    prefill, chunked-prefill and decode forwards (and its output head), compiled for `target`; duplicates are
    listed once. With float weights, then with the linear layers quantized as each of `quantize` says ("int8", or
    "int4" in groups of 32) for the Triton matmuls of inference/triton_quant.py."""
    from inference.attention_backends import get_attention_backend, set_attention_backend
    from inference.loader import _dummy_model
    from inference.model_runner import allocate_kv_cache
    from inference.quant import quantize_model

    if target not in TARGETS:
        raise AotError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    unknown = [mode for mode in quantize if mode not in QUANTIZED_MODES]
    if unknown:
        raise AotError(f"unknown quantize mode {unknown[0]!r}; known: {', '.join(QUANTIZED_MODES)}")
    capability, _ = TARGETS[target]
    # one layer and a small vocabulary launch the same kernels as the whole model, at a fraction of the memory
    small = replace(config, num_layers=1, vocab_size=min(config.vocab_size, 1024))
    num_blocks = 64
    kv_cache = allocate_kv_cache(small, num_blocks, block_size, torch.device("cpu"))
    launches: dict[tuple[Any, ...], CompiledLaunch] = {}
    with compile_only(capability) as captures:
        for mode in ("none", *quantize):
            model = _dummy_model(small, torch.device("cpu"))
            if mode != "none":
                quantize_model(model, mode, group_size=32, kernels="triton")  # type: ignore[arg-type]  # checked above
            # the backend CUDA runs, on CPU tensors
            set_attention_backend(model, get_attention_backend("cuda", "triton"))
            for name, seqs, width, max_context in _forward_cases(block_size, max_model_len):
                case = name if mode == "none" else f"{mode}: {name}"
                if progress:
                    progress(case)
                meta = paged_metadata(seqs, block_size, width, max_context, num_blocks)
                tokens = int(meta.query_start_loc[-1])
                ids = torch.randint(0, small.vocab_size, (tokens,))
                positions = torch.cat([torch.arange(c - q, c) for c, q in seqs])
                start = len(captures)
                hidden = model(ids, positions, meta, kv_cache)
                model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
                for capture in captures[start:]:
                    capture.case = case
    for capture in captures:
        launch = _describe(capture)
        key = (launch.kernel, json.dumps(launch.constants, sort_keys=True, default=str), launch.num_warps)
        launches.setdefault(key, launch)
    return list(launches.values())


def _lora_cases() -> list[tuple[str, list[int], bool]]:
    """(name, slot of each row, in a decode graph) of the steps an engine runs with adapters: eager decode, a
    chunked prefill, and graph decode, whose grid is bounded by the bucket rather than the longest segment."""
    graph = [(f"decode in a graph, batch {n}", [i % 5 - 1 for i in range(n)], True) for n in (1, 64, 256)]
    return [
        ("decode, 1 row", [0], False),
        ("decode, 64 rows over 4 adapters and the base", [i % 5 - 1 for i in range(64)], False),
        ("prefill, 512 tokens over 4 adapters", [i // 128 for i in range(512)], False),
        *graph,
    ]


def compile_lora(
    model: str, dtype: torch.dtype, *, target: str = "sm_90", ranks: tuple[int, ...] = LORA_RANKS
) -> list[CompiledLaunch]:
    """Every distinct specialisation of the LoRA kernels for the four adapted projections of `model` (a key of
    LORA_MODELS) with adapters of each rank in `ranks` on all seven projections (rank columns as LoRASlots sizes
    them: the fused shards' ranks added up, rounded up to 16), in the steps of `_lora_cases`, compiled for
    `target`."""
    from inference import triton_lora

    if target not in TARGETS:
        raise AotError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if model not in LORA_MODELS:
        raise AotError(f"no LoRA shapes for {model!r}; known: {', '.join(LORA_MODELS)}")
    hidden, q, kv, inter = LORA_MODELS[model]
    # module -> (input features, output features, shards)
    modules = {
        "qkv": (hidden, q + 2 * kv, 3),
        "o": (q, hidden, 1),
        "gate_up": (hidden, 2 * inter, 2),
        "down": (inter, hidden, 1),
    }
    capability, _ = TARGETS[target]
    launches: dict[tuple[Any, ...], CompiledLaunch] = {}
    with compile_only(capability) as captures:
        for rank in ranks:
            for case, rows, in_graph in _lora_cases():
                segments = triton_lora.lora_segments(rows, LORA_SLOTS, torch.device("cpu"))
                if in_graph:  # DecodeGraphRunner's static segments: the bucket bounds every segment
                    segments.max_len = len(rows)
                for module, (k_dim, n_dim, shards) in modules.items():
                    cols = -(-rank * shards // 16) * 16
                    x = torch.zeros(len(rows), k_dim, dtype=dtype)
                    y = torch.zeros(len(rows), n_dim, dtype=dtype)
                    a = torch.zeros(LORA_SLOTS, k_dim, cols, dtype=dtype)
                    b = torch.zeros(LORA_SLOTS, cols, n_dim, dtype=dtype)
                    start = len(captures)
                    triton_lora.add_lora(y, x, a, b, segments)
                    for capture in captures[start:]:
                        capture.case = f"r{rank} {module}, {case}"
    for capture in captures:
        launch = _describe(capture)
        key = (launch.kernel, json.dumps(launch.constants, sort_keys=True, default=str), launch.num_warps)
        launches.setdefault(key, launch)
    return list(launches.values())


def check(launches: list[CompiledLaunch], target: str) -> list[str]:
    """What would fail at launch on `target`: shared memory over the per-block limit, registers over the cap."""
    _, smem = TARGETS[target]
    problems = []
    for launch in launches:
        if launch.shared_bytes > smem:
            problems.append(
                f"{launch.kernel} ({launch.case}) needs {launch.shared_bytes} bytes of shared memory, "
                f"{target} gives a block at most {smem}"
            )
        if launch.registers > MAX_REGISTERS:
            problems.append(f"{launch.kernel} ({launch.case}) uses {launch.registers} registers per thread")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.triton_aot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--target", default="sm_90", choices=sorted(TARGETS))
    parser.add_argument(
        "--model",
        action="append",
        help="builtin config name or config.json (repeatable; default: every builtin config, unless --lora)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        choices=sorted(LORA_MODELS),
        help="the LoRA kernels over this model's projections, ranks 8 and 16 (repeatable; default: every one, "
        "unless --model)",
    )
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--quantize",
        action="append",
        choices=["none", *QUANTIZED_MODES],
        help="also compile the quantized matmuls of these layouts (repeatable; default: int8 and int4; "
        "none: float weights only)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model and dtype, no table")
    args = parser.parse_args(argv)
    if envs.flag(envs.TRITON_INTERPRET):
        print(
            "unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them", file=sys.stderr
        )
        return 2
    from inference.errors import EngineError
    from inference.loader import _builtin_configs, dummy_model_config

    models = args.model or ([] if args.lora else _builtin_configs())
    loras = args.lora or ([] if args.model else sorted(LORA_MODELS))
    dtypes = args.dtype or ["bfloat16"]
    quantize = tuple(m for m in (args.quantize or QUANTIZED_MODES) if m != "none")
    failed = False
    jobs = [(m, False) for m in models] + [(m, True) for m in loras]
    for job, lora in jobs:
        model = f"lora:{job}" if lora else job
        for dtype_name in dtypes:
            try:
                if lora:
                    launches = compile_lora(job, getattr(torch, dtype_name), target=args.target)
                else:
                    _, config = dummy_model_config(job, getattr(torch, dtype_name))
                    launches = compile_model(config, target=args.target, quantize=quantize)
            except (EngineError, AotError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            problems = check(launches, args.target)
            failed |= bool(problems)
            if args.json:
                print(
                    json.dumps(
                        {
                            "model": model,
                            "dtype": dtype_name,
                            "target": args.target,
                            "quantize": list(quantize),
                            "launches": [asdict(x) for x in launches],
                            "problems": problems,
                        },
                        default=str,
                    )
                )
            else:
                _print_table(model, dtype_name, args.target, launches, problems)
    return 1 if failed else 0


def _print_table(
    model: str, dtype: str, target: str, launches: list[CompiledLaunch], problems: list[str]
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}, {dtype}, compiled for {target}")
    for col in ("kernel", "first asked by", "tiles", "warps", "stages", "shared KiB", "regs", "spill B", "s"):
        table.add_column(col, justify="left" if col in ("kernel", "first asked by", "tiles") else "right")
    for x in launches:
        tiles = " ".join(
            f"{k}={v}"
            for k, v in x.constants.items()
            if k.startswith(("BLOCK", "NUM_SPLITS", "SPLIT_K", "NUM_PLANES"))
        )
        table.add_row(
            x.kernel,
            x.case,
            tiles,
            str(x.num_warps),
            str(x.num_stages),
            f"{x.shared_bytes / 1024:.1f}",
            str(x.registers),
            str(x.spill_bytes),
            f"{x.compile_seconds:.1f}",
        )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    for p in problems:
        console.print(f"[red]would fail at launch:[/] {p}")


if __name__ == "__main__":
    raise SystemExit(main())
