"""Our engine with quantized weights against llama.cpp, single stream on the CPU, SmolLM2-135M (Q4_1 GGUF).

Run `python -m benchmarks.quant_vs_llama_cpp [--llama-python /work/peers/llama-venv/bin/python] [--rounds 3]
[--variants "bf16 packed,gguf int4"]`. llama.cpp runs as a subprocess (benchmarks/llama_cpp_peer.py, in its own
virtual environment: never a dependency of this project); without it the peer column is empty. Both sides get the
same token ids: a 100-token prompt then 128 greedy tokens (EOS ignored), and a cold 1000-token prompt for the time
to first token (no prefix cache on either side: a fresh prompt each time). Rounds alternate the peer and each of
our variants, since the cores are shared; the table shows medians and the ratio to llama.cpp. Our variants (what `inference.loader.load_model` builds, bf16, then the engine's model runner):

- `bf16`: float weights, the GGUF dequantized (`quantize="none"`; oneDNN-packed bf16 linears), the CPU path before
  quantization existed;
- `gguf`: the default (`quantize="auto"`): the GGUF's Q4_1 layers kept as int4 group 32 (exact codes), its Q8_0
  embedding as int8 rows, the tied head per-channel int8;
- `gguf int8`: the file re-targeted to per-channel int8 (`quantize="int8"`).

Exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

DEFAULT_LLAMA_PYTHON = "/work/peers/llama-venv/bin/python"
VARIANTS = ("bf16", "gguf", "gguf int8")
_QUANTIZE = {"bf16": "none", "gguf": "auto", "gguf int8": "int8"}


def build_engine(variant: str) -> Any:
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model

    if variant not in _QUANTIZE:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    loaded = load_model(dtype="bfloat16", quantize=_QUANTIZE[variant])
    config = EngineConfig(kv_cache_memory=256 * 2**20, max_model_len=2048, max_num_seqs=8)
    return LLMEngine(loaded, config)


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


def llama_cpp(python: str, gguf: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any] | None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    script = Path(__file__).resolve().parent / "llama_cpp_peer.py"
    cmd = [python, str(script), "--model", str(gguf), "--prompts", f.name, "--repeats", "1"]
    cmd += ["--new-tokens", str(new_tokens), "--ttft-tokens", str(len(prompts[1]))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, json.JSONDecodeError, IndexError) as exc:
        print(f"llama.cpp peer failed: {exc}", file=sys.stderr)
        return None
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    from inference.loader import smollm2_gguf_path
    from inference.model_runner import configure_threads

    configure_threads()
    gguf = smollm2_gguf_path()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    engines = {name: build_engine(name) for name in names}
    vocab = next(iter(engines.values())).model_config.vocab_size
    rng = random.Random(0)
    have_peer = Path(args.llama_python).is_file()
    results: dict[str, dict[str, list[float]]] = {
        n: {"tok_s": [], "ttft_ms": []} for n in ["llama.cpp", *names]
    }
    loads = [os.getloadavg()[0]]
    for engine in engines.values():  # warm-up
        ours_single(engine, [rng.randrange(100, vocab - 100) for _ in range(16)], 4)
    for _ in range(args.rounds):
        single = [rng.randrange(100, vocab - 100) for _ in range(100)]
        long = [rng.randrange(100, vocab - 100) for _ in range(1000)]
        if have_peer:
            peer = llama_cpp(args.llama_python, gguf, [single, long], args.new_tokens)
            if peer is not None:
                results["llama.cpp"]["tok_s"].append(peer["single"]["tok_s"])
                results["llama.cpp"]["ttft_ms"].append(peer["ttft"]["ms"])
        for name, engine in engines.items():
            results[name]["tok_s"].append(ours_single(engine, single, args.new_tokens))
            # a fresh prompt (the first token differs), so no prefix of it is cached
            results[name]["ttft_ms"].append(ours_ttft(engine, [rng.randrange(100, vocab - 100), *long[1:]]))
        loads.append(os.getloadavg()[0])
    peer_tok = statistics.median(results["llama.cpp"]["tok_s"]) if results["llama.cpp"]["tok_s"] else None
    peer_ttft = (
        statistics.median(results["llama.cpp"]["ttft_ms"]) if results["llama.cpp"]["ttft_ms"] else None
    )
    print(
        f"SmolLM2-135M Q4_1, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"load average {min(loads):.1f}-{max(loads):.1f} (shared cores: compare within this table only); "
        f"file {gguf.stat().st_size / 2**20:.1f} MiB"
    )
    from inference.quant import model_weight_bytes

    file_mib = gguf.stat().st_size / 2**20
    print(
        f"{'':22s} {'tok/s':>8s} {'vs llama.cpp':>12s} {'TTFT 1000 (ms)':>15s} {'llama.cpp/ours':>15s} "
        f"{'weights MiB':>12s} {'vs file':>8s}"
    )
    for name, r in results.items():
        if not r["tok_s"]:
            print(f"{name:22s} {'n/a':>8s}")
            continue
        tok, ttft = statistics.median(r["tok_s"]), statistics.median(r["ttft_ms"])
        tok_ratio = f"{tok / peer_tok:.2f}x" if peer_tok else ""
        ttft_ratio = f"{peer_ttft / ttft:.2f}x" if peer_ttft else ""
        weights = (
            f"{model_weight_bytes(engines[name].loaded.model) / 2**20:12.1f} "
            f"{model_weight_bytes(engines[name].loaded.model) / 2**20 / file_mib:7.2f}x"
            if name in engines
            else f"{'(mapped)':>12s}"
        )
        print(f"{name:22s} {tok:8.1f} {tok_ratio:>12s} {ttft:15.0f} {ttft_ratio:>15s} {weights}")


if __name__ == "__main__":
    main()
