"""Our engine with quantized weights against llama.cpp on the same GGUF, single stream on the CPU.

Run `python -m benchmarks.quant_vs_llama_cpp [--gguf FILE] [--llama-python /work/peers/llama-venv/bin/python]
[--rounds 3] [--new-tokens 128] [--ttft-tokens 1000] [--variants "bf16,gguf,gguf int8"]`. The file is the packaged
SmolLM2-135M (Q4_1 layers, Q8_0 embedding) unless `--gguf` names another, such as the random-weight Qwen2.5-0.5B
and Llama-3.2-1B shapes of `python -m benchmarks.random_gguf`. llama.cpp runs as a subprocess
(benchmarks/llama_cpp_peer.py, in its own virtual environment: never a dependency of this project); without it the
peer row is empty. Both sides get the same token ids: a 100-token prompt then `--new-tokens` greedy tokens (EOS
ignored; tok/s = new tokens / wall time of the whole request, scheduling and sampling included), and a cold
`--ttft-tokens` prompt for the time to first token (no prefix cache on either side: a fresh prompt each time; 0
skips it). Rounds alternate the peer and each of our variants, since the cores are shared; the table shows medians,
the ratio to llama.cpp, and our weights' memory against the file's size. Our variants (what
`inference.loader.load_model` builds in bf16, then the engine's model runner):

- `bf16`: float weights, the GGUF dequantized (`quantize="none"`; oneDNN-packed bf16 linears), the CPU path before
  quantization existed (SmolLM2 only by default: it writes a float32 copy of the model to the cache);
- `gguf`: the default (`quantize="auto"`): 4-bit blocks kept as int4 group 32 (exact codes), wider ones as
  per-channel int8, a Q8_0 embedding read from its own blocks, the head per-channel int8; decode steps through the
  fused C++ step (inference/fused_decode.py);
- `gguf int8`: the file re-targeted to per-channel int8 (`quantize="int8"`);
- `gguf int4`: re-targeted to int4 (`quantize="int4"`: 4-bit blocks kept, wider ones re-quantized to int4 g32);
- `gguf pooled`: `gguf unfused` with the reference decode attention on the intra-op thread pool at every size, as
  before small decode groups ran on one thread (`inference.attention.SERIAL_DECODE_PAIRS`): that change's
  before/after in one run, against `gguf unfused`;
- `gguf unfused`: `gguf` with decode steps op by op in eager torch (`fused_decode=False`), as before the fused C++
  decode step (inference/fused_decode.py) existed;
- `gguf compiled`: `gguf` with decode steps through torch.compile (`compile=True`, inference/compiled_decode.py; the
  compile happens at engine start, before any round) instead of the fused step;
- `gguf fp16 scales`: `gguf` with a Q4_K file's scales held as fp16 scale and min per block of 32 (20 bytes a
  block), as before Q4_K kept its own 6-bit ones under an fp16 pair per 256 values (18 bytes; inference/qgemv.py,
  `from_super_blocks`): that change's before/after in one run (other files: the same as `gguf`);
- `gguf torch`, `gguf torch compiled`: the same with torch's int8/int4 kernels instead of our own
  (`AGENT_RUNTIME_QGEMV=off` while the model is built; inference/qgemv.py): that kernel's before/after in one run.

Exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.engine import DEFAULT_LLAMA_PYTHON, LlamaPeer, llama_run, peer_failed

VARIANTS = (
    "bf16",
    "gguf",
    "gguf int8",
    "gguf int4",
    "gguf pooled",
    "gguf unfused",
    "gguf compiled",
    "gguf fp16 scales",
    "gguf torch",
    "gguf torch compiled",
)
_QUANTIZE = {
    "bf16": "none",
    "gguf": "auto",
    "gguf int8": "int8",
    "gguf int4": "int4",
    "gguf pooled": "auto",
    "gguf unfused": "auto",
    "gguf compiled": "auto",
    "gguf fp16 scales": "auto",
    "gguf torch": "auto",
    "gguf torch compiled": "auto",
}


def build_engine(variant: str, gguf: Path) -> Any:
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model

    if variant not in _QUANTIZE:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    from inference import qgemv

    with contextlib.ExitStack() as stack:
        if " torch" in variant:
            stack.enter_context(qgemv.turned_off())
        if variant.endswith("fp16 scales"):  # Q4_K planes without their own scales: fp16 ones per block
            stack.enter_context(mock.patch("inference.quant._super_blocks", lambda blocks, rows: None))
        loaded = load_model(gguf, dtype="bfloat16", quantize=_QUANTIZE[variant])
    compiled = variant.endswith("compiled")
    config = EngineConfig(
        kv_cache_memory=256 * 2**20,
        max_model_len=2048,
        max_num_seqs=8,
        compile=compiled,
        # the fused step serves every decode step it can, before compiled ones: off where the variant is another path
        fused_decode=not (compiled or variant.endswith("unfused") or variant.endswith("pooled")),
    )
    return LLMEngine(loaded, config)


@contextlib.contextmanager
def pooled(on: bool) -> Iterator[None]:
    """With `on`, the decode attention uses the thread pool at every size (a module setting: the whole process)."""
    from inference import attention

    if not on:
        yield
        return
    pairs = attention.SERIAL_DECODE_PAIRS
    attention.SERIAL_DECODE_PAIRS = -1
    try:
        yield
    finally:
        attention.SERIAL_DECODE_PAIRS = pairs


def ours_single(engine: Any, prompt: list[int], n: int) -> float:
    from inference.params import SamplingParams

    t0 = time.perf_counter()
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert out.completion_tokens == n
    return n / (time.perf_counter() - t0)


def ours_ttft(engine: Any, prompt: list[int]) -> float:
    from inference.params import OutputKind, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, output_kind=OutputKind.DELTA)
    t0 = time.perf_counter()
    engine.add_request(None, prompt, params)
    while engine.has_unfinished():
        if any(o.delta_token_ids for o in engine.step()):
            break
    return (time.perf_counter() - t0) * 1000


def llama_cpp(
    python: str, gguf: Path, threads: int, prompts: list[list[int]], new_tokens: int, ttft_tokens: int
) -> dict[str, Any] | None:
    """llama.cpp's single-stream (and TTFT) figures on `prompts`, or None (and why, on stderr) without them."""
    options = [
        "--repeats",
        "1",
        "--new-tokens",
        str(new_tokens),
        "--ttft-tokens",
        str(ttft_tokens),
        "--prompts",
    ]
    try:
        return llama_run(LlamaPeer(python, ""), gguf, threads, options, prompts)
    except (subprocess.SubprocessError, OSError, json.JSONDecodeError, IndexError) as exc:
        print(peer_failed(exc), file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-tokens", type=int, default=1000, help="0: no time-to-first-token figure")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"of {', '.join(VARIANTS)} (default: the first three for SmolLM2, else gguf)",
    )
    args = ap.parse_args()
    from inference.loader import smollm2_gguf_path
    from inference.model_runner import configure_threads
    from inference.quant import model_weight_bytes

    threads = configure_threads()
    gguf = args.gguf or smollm2_gguf_path()
    default_variants = VARIANTS[:3] if args.gguf is None else ("gguf",)
    names = [v.strip() for v in (args.variants or ",".join(default_variants)).split(",") if v.strip()]
    engines = {name: build_engine(name, gguf) for name in names}
    vocab = next(iter(engines.values())).model_config.vocab_size
    rng = random.Random(0)
    have_peer = Path(args.llama_python).is_file()
    results: dict[str, dict[str, list[float]]] = {
        n: {"tok_s": [], "ttft_ms": []} for n in ["llama.cpp", *names]
    }
    peer_rss: list[float] = []
    loads = [os.getloadavg()[0]]
    for engine in engines.values():  # warm-up
        ours_single(engine, [rng.randrange(100, vocab - 100) for _ in range(16)], 4)
    for _ in range(args.rounds):
        single = [rng.randrange(100, vocab - 100) for _ in range(100)]
        long = [rng.randrange(100, vocab - 100) for _ in range(args.ttft_tokens)]
        if have_peer:
            prompts = [single, long] if args.ttft_tokens else [single]
            peer = llama_cpp(args.llama_python, gguf, threads, prompts, args.new_tokens, args.ttft_tokens)
            if peer is not None:
                results["llama.cpp"]["tok_s"].append(peer["single"]["tok_s"])
                if args.ttft_tokens:
                    results["llama.cpp"]["ttft_ms"].append(peer["ttft"]["ms"])
                peer_rss.append(peer["peak_rss_mib"])
        for name, engine in engines.items():
            with pooled(name == "gguf pooled"):
                results[name]["tok_s"].append(ours_single(engine, single, args.new_tokens))
                if args.ttft_tokens:  # a fresh prompt (the first token differs), so no prefix of it is cached
                    results[name]["ttft_ms"].append(
                        ours_ttft(engine, [rng.randrange(100, vocab - 100), *long[1:]])
                    )
        loads.append(os.getloadavg()[0])

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    peer_tok, peer_ttft = median(results["llama.cpp"]["tok_s"]), median(results["llama.cpp"]["ttft_ms"])
    file_mib = gguf.stat().st_size / 2**20
    print(
        f"{gguf.name} ({file_mib:.1f} MiB), {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{args.new_tokens} new tokens, load average {min(loads):.1f}-{max(loads):.1f} "
        "(shared cores: compare within this table only)"
    )
    print(
        f"{'':12s} {'tok/s':>7s} {'vs llama.cpp':>12s} {f'TTFT {args.ttft_tokens} ms':>14s} "
        f"{'llama.cpp/ours':>14s} {'weights MiB':>11s} {'vs file':>7s}"
    )
    for name, r in results.items():
        tok, ttft = median(r["tok_s"]), median(r["ttft_ms"])
        if tok is None:
            print(f"{name:12s} {'n/a':>7s}")
            continue
        tok_ratio = f"{tok / peer_tok:.2f}x" if peer_tok else ""
        ttft_col = f"{ttft:14.0f}" if ttft is not None else f"{'-':>14s}"
        ttft_ratio = f"{peer_ttft / ttft:.2f}x" if peer_ttft and ttft else ""
        if name in engines:
            mib = model_weight_bytes(engines[name].loaded.model) / 2**20
            weights = f"{mib:11.1f} {mib / file_mib:6.2f}x"
        else:
            weights = f"{'mmap':>11s} {'':7s} peak RSS {max(peer_rss):.0f} MiB" if peer_rss else ""
        print(f"{name:12s} {tok:7.1f} {tok_ratio:>12s} {ttft_col} {ttft_ratio:>14s} {weights}")


if __name__ == "__main__":
    main()
