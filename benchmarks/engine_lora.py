"""LoRA benchmark: the engine workload spread over N adapters in one batch, against the same workload without
adapters and against each adapter's requests run as a separate batch on merged weights (one adapter at a time).

Run `python -m benchmarks.engine --adapters 4 [--dtype auto|bf16|fp32] [--quick] [--max-out N]`. SmolLM2-135M, random
rank-16 adapters on all seven projections (written in PEFT's format), greedy, EOS ignored, every figure measured in
the same process. Also times loading and unloading an adapter between steps of a running batch. Exits 0.

`--device cuda` runs it on the GPU, where the adapters go through the Triton LoRA kernels (inference/triton_lora.py)
and decode steps through CUDA graphs; `--model` takes a builtin config or a config.json (dummy weights) instead of
the packaged SmolLM2, which a GPU machine may not have (benchmarks/gpu_session.sh passes the kit's Qwen3-0.6B).
Exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine import Workload, make_workload

RANK = 16
ALPHA = 32


def write_random_adapter(folder: Path, config: Any, seed: int, rank: int = RANK) -> None:
    """A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) with random weights on every
    q/k/v/o/gate/up/down projection of a model of `config` (inference.model_config.ModelConfig)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    h, inter = config.hidden_size, config.intermediate_size
    shapes = {
        "self_attn.q_proj": (h, q),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    tensors = {}
    for layer in range(config.num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config_json = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": ALPHA,
        "target_modules": [m.split(".")[1] for m in shapes],
        "bias": "none",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config_json))


def run_batch(engine: Any, work: Workload, adapters: list[str | None], on_step: Any = None) -> float:
    """Seconds to run `work` as one continuously batched run, request i on `adapters[i]`."""
    from inference.params import OutputKind, SamplingParams

    t0 = time.perf_counter()
    for i, (p, n, a) in enumerate(zip(work.prompts, work.max_tokens, adapters, strict=True)):
        params = SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY, adapter=a
        )
        engine.add_request(f"lora-{i}", p, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if on_step is not None:
            on_step(engine, steps)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine --adapters N")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--quick", action="store_true", help="16 requests")
    parser.add_argument(
        "--max-out",
        type=int,
        default=48,
        help="outputs are uniform in [16, max-out] tokens (the engine benchmark uses 256; 48 keeps three runs of "
        "the 64 requests under 5 minutes on 2 shared cores)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        default=None,
        help="a builtin config (inference/configs) or a config.json, with dummy weights; default the packaged "
        "SmolLM2-135M",
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model, resolve_dtype
    from inference.lora import read_adapter
    from inference.model_runner import configure_threads

    # wide enough for the table when the output is a log file rather than a terminal
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]no CUDA device[/]: --device cuda needs a GPU")
        return 2
    device = torch.device(args.device)
    threads = configure_threads()
    dtype = resolve_dtype(args.dtype, device)
    label = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")

    def load() -> Any:
        if args.model is None:
            # float weights in every run: the merged baseline adds each adapter into plain linear weights, which
            # the packaged GGUF's default load keeps quantized
            return load_model(dtype=dtype, device=device, quantize="none")
        return load_model(args.model, dtype=dtype, device=device, load_format="dummy")

    n_req, n_ad = (16 if args.quick else 64), args.adapters
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    console.print(
        f"[bold]LoRA benchmark[/] {args.model or 'SmolLM2-135M'}, {label}, {where}, {n_req} requests over {n_ad} "
        f"rank-{RANK} adapters, outputs 16-{args.max_out}, load average {os.getloadavg()[0]:.1f}"
    )
    # the GPU holds the whole batch's KV (Qwen3-0.6B: 112 KiB a token); the CPU's 640 MiB is SmolLM2's
    kv_memory = (4 if device.type == "cuda" else 0.625) * 2**30
    settings = EngineConfig(kv_cache_memory=kv_memory, max_model_len=2048, max_num_seqs=64, max_loras=n_ad)
    loaded = load()
    work = make_workload(n_req, (32, 512), (16, args.max_out), loaded.config.vocab_size)
    names = [f"task{i}" for i in range(n_ad)]
    spread = [names[i % n_ad] for i in range(n_req)]
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        paths = {name: Path(tmp) / name for name in names}
        for i, name in enumerate(names):
            write_random_adapter(paths[name], loaded.config, seed=i)
        write_random_adapter(Path(tmp) / "extra", loaded.config, seed=99)

        engine = LLMEngine(loaded, settings)
        run_batch(engine, work.head(2), [None, None])  # warm-up
        base = run_batch(engine, work, [None] * n_req)
        t0 = time.perf_counter()
        for name in names:
            engine.load_adapter(name, paths[name])
        load_all = (time.perf_counter() - t0) / n_ad
        run_batch(engine, work.head(2), names[:2])  # warm-up
        timings: dict[str, float] = {}

        def hot_swap(
            engine: Any, step: int
        ) -> None:  # load then unload a fifth adapter between two steps of the batch
            if step == 20:
                t = time.perf_counter()
                engine.load_adapter("extra", Path(tmp) / "extra")
                timings["load"] = time.perf_counter() - t
            elif step == 21:
                t = time.perf_counter()
                engine.unload_adapter("extra")
                timings["unload"] = time.perf_counter() - t

        steps_before = engine.metrics().steps
        mixed = run_batch(engine, work, list(spread), on_step=hot_swap)
        steps = engine.metrics().steps - steps_before
        kernels = "triton" if engine.lora.slots is not None else "torch"  # what served the adapters
        graphs = engine.runner.decode_graphs
        lora_buckets = sorted(graphs.lora_buckets) if graphs is not None else []
        del engine, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next engines size nothing from free memory, but leave them room

        separate = 0.0
        for name in names:
            merged = load()
            read_adapter(name, paths[name], merged.config).merge_into(merged.model)
            alone = LLMEngine(merged, settings)
            run_batch(alone, work.head(2), [None, None])  # warm-up, untimed like the other runs'
            mine = [i for i, a in enumerate(spread) if a == name]
            part = Workload([work.prompts[i] for i in mine], [work.max_tokens[i] for i in mine])
            separate += run_batch(alone, part, [None] * len(part))
            del alone, merged
            if device.type == "cuda":
                torch.cuda.empty_cache()

    toks = work.output_tokens
    table = Table(title=f"LoRA: {n_req} requests, {toks} output tokens ({label}, {where})")
    for col in ("figure", "ours", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    table.add_row(
        f"tok/s, {n_ad} adapters in one batch vs no adapters",
        f"{toks / mixed:.1f}",
        f"{toks / base:.1f}",
        f"{base / mixed:.2f}x",
        ">= 0.7x " + ("ok" if base / mixed >= 0.7 else "miss"),
    )
    table.add_row(
        f"tok/s, {n_ad} adapters in one batch vs one merged batch per adapter",
        f"{toks / mixed:.1f}",
        f"{toks / separate:.1f}",
        f"{separate / mixed:.2f}x",
        ">= 2x " + ("ok" if separate / mixed >= 2 else "miss"),
    )
    table.add_row("load one adapter, engine idle (ms)", f"{load_all * 1e3:.0f}", "", "", "")
    # the swap happens at steps 20 and 21: a batch that finishes sooner has no figure
    swap = {
        k: f"{timings[k] * 1e3:.2f}" if k in timings else "n/a (under 21 steps)" for k in ("load", "unload")
    }
    table.add_row("load one adapter between two steps of the batch (ms)", swap["load"], "", "", "")
    table.add_row("unload it between two steps (ms)", swap["unload"], "", "", "")
    console.print(table)
    console.print(
        f"wall: no adapters {base:.1f}s, {n_ad} adapters batched {mixed:.1f}s ({steps} steps), merged one "
        f"adapter at a time {separate:.1f}s"
    )
    if device.type == "cuda":
        console.print(f"LoRA kernels: {kernels}; decode graph buckets captured with adapters: {lora_buckets}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
