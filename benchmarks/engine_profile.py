"""Where an engine step's time goes on the GPU: wall time, kernel time, kernels per step, GPU idle, top kernels.

`python -m benchmarks.engine_profile` (`--smoke` on the CPU) runs our engine on dummy weights (Qwen3-0.6B by
default, as benchmarks/engine_cuda.py) and profiles, with torch.profiler, decode steps at batch sizes 1, 64 and 256
over 128-token contexts, and prefill steps of 8 x 256 fresh tokens. A diagnostic, not a comparison: the GPU
benchmark's figures come from benchmarks/engine_cuda.py. The "GPU idle" column is the share of a step's wall time
with no kernel running, i.e. host work (scheduling, input preparation, sampling's copy, output processing) that the
GPU waits for; the top-kernels table says which kernels to tune.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_cuda import build_engine, model_source, sampling, sync


@dataclass(slots=True)
class StepProfile:
    """Steps of one kind, profiled together."""

    name: str
    steps: int
    wall_ms: list[float]
    kernel_ms: float = 0.0  # summed kernel time per step (device); 0 on the CPU
    kernels: float = 0.0  # kernel launches per step
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (name, calls per step, ms per step)

    @property
    def median_wall_ms(self) -> float:
        return statistics.median(self.wall_ms)


def _is_device_event(event: Any) -> bool:
    """A kernel or copy on the GPU's timeline (user annotations there span other events: not counted)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(
        event, "is_user_annotation", False
    )


def profile_steps(engine: Any, name: str, steps: int, device: torch.device) -> StepProfile:
    """Profile the next `steps` engine steps (the caller queued the work)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            sync(device)
            walls.append((time.perf_counter() - t0) * 1000)
    result = StepProfile(name, steps, walls)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if device.type == "cuda":
        for event in prof.events():
            if _is_device_event(event):
                entry = totals[event.name]
                entry[0] += 1
                entry[1] += event.time_range.elapsed_us() / 1000
    else:
        # no device: the ops' own CPU time, so the smoke run exercises the same table
        for avg in prof.key_averages():
            if avg.key.startswith("aten::"):
                totals[avg.key] = [avg.count, avg.self_cpu_time_total / 1000]
    result.kernel_ms = sum(ms for _, ms in totals.values()) / steps if device.type == "cuda" else 0.0
    result.kernels = sum(n for n, _ in totals.values()) / steps
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:8]
    result.top = [(name, n / steps, ms / steps) for name, (n, ms) in ranked]
    return result


def _queue(engine: Any, n: int, prompt_len: int, max_tokens: int, vocab: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"p{seed}-{i}", prompt, sampling(0.0, max_tokens))


def _prefilled(engine: Any, deadline_steps: int = 10_000) -> None:
    """Step until no sequence waits for its prefill (the decode steps that follow are pure decode)."""
    for _ in range(deadline_steps):
        sched = engine.scheduler
        if not sched.waiting and all(len(s.token_ids) - s.num_computed_tokens <= 1 for s in sched.running):
            return
        engine.step()
    raise RuntimeError("prefill did not finish")


def run(args: argparse.Namespace, device: torch.device, source: str | Path) -> list[StepProfile]:
    from inference.loader import resolve_dtype

    engine = build_engine(args, device, source, resolve_dtype(args.dtype, device))
    vocab = min(10_000, engine.model_config.vocab_size)
    steps = args.steps
    # warm-up: Triton compiles per specialisation; every shape below is seen once before it is profiled
    _queue(engine, 8, args.prompt_len, 4, vocab, seed=99)
    while engine.has_unfinished():
        engine.step()
    profiles = []
    for batch in args.batch:
        _queue(engine, batch, args.prompt_len, steps + 4, vocab, seed=batch)
        _prefilled(engine)
        for _ in range(3):
            engine.step()
        profiles.append(profile_steps(engine, f"decode, batch {batch}", steps, device))
        engine.abort_all()
        while engine.has_unfinished():
            engine.step()
    for i in range(2):  # the first prefill of this shape warms it
        _queue(engine, 8, args.prefill_len, 1, vocab, seed=1000 + i)
        if i:
            profiles.append(profile_steps(engine, f"prefill, 8 x {args.prefill_len} tokens", 1, device))
        while engine.has_unfinished():
            engine.step()
    return profiles


def print_report(profiles: list[StepProfile], device: torch.device, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    gpu = device.type == "cuda"
    table = Table(title=title)
    for col in (
        "steps",
        "wall ms/step (median)",
        "kernel ms/step",
        "GPU idle",
        "kernels/step" if gpu else "ops/step",
    ):
        table.add_column(col, justify="right")
    table.add_column("profiled", justify="left")
    for p in profiles:
        idle = f"{max(0.0, 1 - p.kernel_ms / p.median_wall_ms):.0%}" if gpu else "n/a"
        table.add_row(
            str(p.steps),
            f"{p.median_wall_ms:.3f}",
            f"{p.kernel_ms:.3f}" if gpu else "n/a",
            idle,
            f"{p.kernels:.0f}",
            p.name,
        )
    console.print(table)
    for p in profiles:
        top = Table(title=f"top {'kernels' if gpu else 'CPU ops'}: {p.name}")
        top.add_column("name", justify="left", max_width=90)
        top.add_column("calls/step", justify="right")
        top.add_column("ms/step", justify="right")
        top.add_column("share", justify="right")
        total = sum(ms for _, _, ms in p.top) or 1.0
        for name, calls, ms in p.top:
            top.add_row(name, f"{calls:.0f}", f"{ms:.3f}", f"{ms / total:.0%}")
        console.print(top)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_profile", description=__doc__.splitlines()[0]
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random Qwen3 unless --model is given")
    p.add_argument("--model", default=None, help="builtin config or config.json (default qwen3-0.6b)")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--batch", type=int, action="append", help="decode batch sizes (default 1, 64, 256; smoke 1, 4)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="decode steps profiled per batch size (default 20; smoke 3)"
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "no CUDA device: this profile needs a GPU (`--smoke` runs its code path on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    args.batch = args.batch or ([1, 4] if args.smoke else [1, 64, 256])
    args.steps = args.steps or (3 if args.smoke else 20)
    if args.smoke:
        args.prompt_len, args.prefill_len = min(args.prompt_len, 16), min(args.prefill_len, 32)
    with model_source(args.model, args.smoke) as source:
        profiles = run(args, device, source)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: not a result)"
    print_report(profiles, device, f"engine step profile: {name}, {source if args.model else 'qwen3-0.6b'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
