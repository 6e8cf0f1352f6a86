"""llama.cpp as a peer for the CPU benchmarks: single-stream greedy decode and time to first token, as JSON.

Run by the python of a separate virtual environment that has `llama-cpp-python` (never a dependency of this
project, never in CI), for instance one built with
`python3 -m venv /work/peers/llama-venv && /work/peers/llama-venv/bin/pip install llama-cpp-python` (on an AMX
CPU add `CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"`: its AMX matmul segfaulted here):

    /work/peers/llama-venv/bin/python benchmarks/llama_cpp_peer.py --model SmolLM2.gguf [--threads 2]
        [--prompt-tokens 100] [--new-tokens 128] [--ttft-tokens 1000] [--repeats 3] [--prompts FILE.json]
    /work/peers/llama-venv/bin/python benchmarks/llama_cpp_peer.py --model SmolLM2.gguf --workload FILE.json
    /work/peers/llama-venv/bin/python benchmarks/llama_cpp_peer.py --model F32.gguf --quantize-to Q4_K_M --out F.gguf

It imports nothing from this repository, so `benchmarks/engine.py` can run it as a subprocess and read the one
JSON object it prints on stdout. Prompts are random token ids (seeded, ids 100 .. vocab - 100 as in
benchmarks/engine.py), or the token-id lists of `--prompts` (a JSON list of lists; the first is the decode prompt,
the second, if any, the TTFT prompt). Greedy (top_k 1), EOS ignored (the generator runs until told to stop), the
KV cache reset before each run (no prefix reuse). Figures: `tok_s` = new tokens / wall time of prompt + decode
(as benchmarks/engine.py's single-stream row), `decode_tok_s` = tokens after the first / time after the first,
`ttft_ms` = wall time from the call to the first token; medians over `--repeats`, and every run's figure, with
the load average before and after (the machine is shared: compare only with runs made next to it).

`--workload FILE.json` runs a list of requests (`[{"prompt": [ids...], "max_tokens": n}, ...]`) one after another
instead, as a user of llama-cpp-python serves them (it has no continuous batching), and reports `workload`:
requests, output tokens, seconds and `tok_s` = all output tokens / wall time of the whole list.

`--quantize-to TYPE --out FILE` writes the model quantized by llama.cpp's own quantizer (`llama-quantize`'s mixes:
Q4_K_M, Q5_K_M, Q6_K, ...; tensors already quantized are re-quantized) and reports `quantized`: the file and the
seconds it took. The `gguf` Python package cannot write K-quants; this is how the benchmarks get such files.

OpenMP's waiting comes from the environment, as for any user of llama.cpp: the wheel built here uses libgomp,
whose default spin was measured 2.5x faster than `OMP_WAIT_POLICY=PASSIVE` on idle cores (91 against 37 tok/s on
SmolLM2) and 4x slower on loaded ones. The runners in benchmarks/engine.py (`peer_env`) run it both ways and keep
the faster, so that llama.cpp is measured at its best whatever the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from typing import Any


def _generate(llm: Any, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of a greedy run of `n` new tokens."""
    llm.reset()
    t0 = time.perf_counter()
    first = 0.0
    count = 0
    for _tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter() - t0
        if count >= n:
            break
    return first, time.perf_counter() - t0, count


def read_workload(path: str) -> list[tuple[list[int], int]]:
    """The `--workload` file's requests as (prompt ids, max tokens); ValueError naming what is wrong."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of requests")
    requests: list[tuple[list[int], int]] = []
    for i, item in enumerate(raw):
        prompt = item.get("prompt") if isinstance(item, dict) else None
        n = item.get("max_tokens") if isinstance(item, dict) else None
        if not (isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)):
            raise ValueError(f"{path}: request {i}: prompt must be a non-empty list of token ids")
        if not (type(n) is int and n > 0):
            raise ValueError(f"{path}: request {i}: max_tokens must be a positive integer")
        requests.append((prompt, n))
    return requests


# llama.cpp's file types (enum llama_ftype) that `--quantize-to` offers: what people download
QUANTIZE_TYPES = {"Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="path of a .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-tokens", type=int, default=1000, help="0 skips the TTFT figure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-batch", type=int, default=2048, help="llama.cpp's logical batch (its CLI default)")
    ap.add_argument("--n-ubatch", type=int, default=512, help="llama.cpp's physical batch (its CLI default)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", help="JSON file: a list of token-id lists")
    ap.add_argument(
        "--workload",
        help='JSON file: [{"prompt": [ids], "max_tokens": n}, ...] run one after another (no single/TTFT figures)',
    )
    ap.add_argument(
        "--quantize-to", choices=sorted(QUANTIZE_TYPES), help="write the model quantized to --out"
    )
    ap.add_argument("--out", help="the file --quantize-to writes")
    args = ap.parse_args(argv)
    if bool(args.quantize_to) != bool(args.out):
        ap.error("--quantize-to and --out go together")
    if args.quantize_to and args.workload:
        ap.error("--quantize-to and --workload are separate runs")
    if args.workload:
        try:
            args.requests = read_workload(args.workload)
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
    else:
        args.requests = []
    return args


def run_workload(llm: Any, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    """The requests one after another, each a fresh greedy run to its max tokens (EOS ignored)."""
    _generate(llm, requests[0][0][:8], 2)  # warm-up
    t0 = time.perf_counter()
    produced = 0
    for prompt, n in requests:
        produced += _generate(llm, prompt, n)[2]
    seconds = time.perf_counter() - t0
    return {
        "requests": len(requests),
        "output_tokens": produced,
        "seconds": seconds,
        "tok_s": produced / seconds,
    }


def quantize_file(args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's quantizer on `args.model` -> `args.out` as `args.quantize_to`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZE_TYPES[args.quantize_to]
    params.nthread = args.threads
    params.allow_requantize = True  # a tensor the input holds quantized (an embedding kept as Q8_0)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.model.encode(), args.out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc} for {args.model} -> {args.quantize_to}")
    return {"file": os.path.abspath(args.out), "type": args.quantize_to, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quantize_to:
        json.dump({"peer": "llama.cpp", "quantized": quantize_file(args)}, sys.stdout)
        sys.stdout.write("\n")
        return 0

    import llama_cpp

    longest = max((len(p) + n for p, n in args.requests), default=0)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=max(args.n_ctx, args.ttft_tokens + 8, args.prompt_tokens + args.new_tokens + 8, longest + 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=args.n_batch,
        n_ubatch=args.n_ubatch,
        seed=args.seed,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "peer": "llama.cpp",
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "model": os.path.abspath(args.model),
        "threads": args.threads,
        "load_s": load_s,
    }
    if args.requests:
        result["workload"] = run_workload(llm, args.requests)
    else:
        result.update(_single_and_ttft(llm, args))
    result["loadavg"] = [load_before, os.getloadavg()[0]]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _single_and_ttft(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    vocab = llm.n_vocab()
    rng = random.Random(args.seed)
    given: list[list[int]] = []
    if args.prompts:
        with open(args.prompts) as f:
            given = [[int(t) for t in p] for p in json.load(f)]

    def prompt(i: int, n: int) -> list[int]:
        if i < len(given):
            return given[i]
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    decode_prompt = prompt(0, args.prompt_tokens)
    _generate(llm, decode_prompt, 4)  # warm-up
    runs = []
    for _ in range(args.repeats):
        first, total, count = _generate(llm, decode_prompt, args.new_tokens)
        runs.append(
            {
                "ttft_ms": first * 1000,
                "seconds": total,
                "tok_s": count / total,
                "decode_tok_s": (count - 1) / (total - first) if count > 1 else 0.0,
            }
        )
    result: dict[str, Any] = {
        "single": {
            "prompt_tokens": len(decode_prompt),
            "new_tokens": args.new_tokens,
            "tok_s": statistics.median(r["tok_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "runs": runs,
        },
    }
    if args.ttft_tokens:
        ttft_prompt = prompt(1, args.ttft_tokens)
        times = []
        for _ in range(args.repeats):
            first, _total, _count = _generate(llm, ttft_prompt, 1)
            times.append(first * 1000)
        result["ttft"] = {"prompt_tokens": len(ttft_prompt), "ms": statistics.median(times), "runs_ms": times}
    return result


if __name__ == "__main__":
    raise SystemExit(main())
