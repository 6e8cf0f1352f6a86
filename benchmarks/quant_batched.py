"""Batched throughput of SmolLM2 per weight layout: the mixed workload of benchmarks/engine.py (prompts of 32-512
tokens, outputs of 16-256, greedy), float bf16 weights against the GGUF's blocks kept (the default) and re-targeted.

Run `python -m benchmarks.quant_batched [--requests 64] [--rounds 1] [--variants bf16,gguf]`. Every variant is the
same engine (`EngineConfig(max_num_seqs=64, max_model_len=2048)`, 640 MiB of KV) on the model `load_model` builds in
bf16 with `quantize` none / auto / int8; rounds alternate the variants (the cores are shared), and the table shows
the median output tokens per second and the ratio to `bf16`, the CPU path before quantization existed. Batched
decode steps run 16-64 rows, where torch's weight-only kernels are slower than a dense bf16 matmul: above
`inference.quant.DENSE_ROWS` the quantized layers dequantize to bf16 slices instead. Exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch

from benchmarks.engine import engine_throughput, make_workload

_QUANTIZE = {"bf16": "none", "gguf": "auto", "gguf int8": "int8"}


def build(variant: str) -> Any:
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model

    if variant not in _QUANTIZE:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(_QUANTIZE)}")
    loaded = load_model(dtype="bfloat16", quantize=_QUANTIZE[variant])
    return LLMEngine(loaded, EngineConfig(kv_cache_memory=640 * 2**20, max_model_len=2048, max_num_seqs=64))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default="bf16,gguf", help=f"of {', '.join(_QUANTIZE)}")
    args = ap.parse_args()
    from inference.model_runner import configure_threads

    threads = configure_threads()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    engines = {name: build(name) for name in names}
    vocab = next(iter(engines.values())).model_config.vocab_size
    work = make_workload(args.requests, (32, 512), (16, 256), vocab)
    for engine in engines.values():  # warm-up
        engine_throughput(engine, work.head(2))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, engine in engines.items():
            seconds[name].append(engine_throughput(engine, work)[0])
            loads.append(os.getloadavg()[0])
    toks = work.output_tokens
    base = names[0]
    print(
        f"SmolLM2-135M, {args.requests} mixed requests ({toks} output tokens), {threads} threads "
        f"(torch {torch.get_num_threads()}), {args.rounds} round(s), load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"{'variant':10s} {'out tok/s':>10s} {'vs ' + base:>10s}")
    for name in names:
        tps = toks / statistics.median(seconds[name])
        ratio = statistics.median(seconds[base]) / statistics.median(seconds[name])
        print(f"{name:10s} {tps:10.1f} {ratio:9.2f}x")


if __name__ == "__main__":
    main()
