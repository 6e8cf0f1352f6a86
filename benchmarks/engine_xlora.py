"""X-LoRA decode benchmark: single-stream decode tok/s of one X-LoRA request at several context lengths, against the
base model in the same process and, with `--baseline DIR`, against another checkout's engine in alternating rounds.

Run `python -m benchmarks.engine_xlora [--baseline DIR] [--contexts 16,256,1024] [--tokens N] [--rounds R]
[--dtype auto|bf16|fp32]`. SmolLM2-135M, an X-LoRA adapter of three random rank-8 experts on all seven projections
with a random one-layer gate (written in PEFT's format), greedy, EOS ignored. DIR is a folder holding the `inference`
package to compare with, for example the code before the scaling pass had a KV cache:
`git archive 364b9d7 inference | tar -x -C /tmp/before`. Each side runs in its own subprocess (one model load per
round), the sides alternate, and every figure is the median over the rounds. Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

EXPERTS = 3
RANK = 8
# a worker runs this file by path from the tree under test (its cwd), so that `inference` is that tree's and this
# folder's other modules (benchmarks/policies.py, ...) never shadow an installed package
_BOOT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def write_xlora(folder: Path, config: Any, seed: int = 0) -> None:
    """An X-LoRA folder in PEFT's format for a model of `config`: EXPERTS random LoRA experts (all seven
    projections, rank RANK) in numbered subfolders and a random one-layer classifier."""
    from safetensors.torch import save_file

    from benchmarks.engine_lora import write_random_adapter

    experts = {}
    for i in range(EXPERTS):
        write_random_adapter(folder / str(i), config, seed=seed + i, rank=RANK)
        experts[str(i)] = str(folder / str(i))
    gen = torch.Generator().manual_seed(seed + 100)
    save_file(
        {
            "internal_xlora_classifier.layers.0.weight": torch.randn(
                EXPERTS, config.hidden_size, generator=gen
            )
            / config.hidden_size**0.5,
            "internal_xlora_classifier.layers.0.bias": torch.zeros(EXPERTS),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "XLORA",
                "adapters": experts,
                "hidden_size": config.hidden_size,
                "xlora_depth": 1,
                "top_k_lora": None,
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            }
        )
    )


def decode_tok_s(engine: Any, prompt: list[int], tokens: int, adapter: str | None) -> float:
    """Decode tok/s of one request: the prefill step (and its first token) is not timed."""
    from inference.params import OutputKind, SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=tokens + 1,
        ignore_eos=True,
        adapter=adapter,
        output_kind=OutputKind.FINAL_ONLY,
    )
    engine.add_request(None, prompt, params)
    engine.step()  # the whole prompt in one prefill step (max_num_batched_tokens is above the longest context)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return tokens / (time.perf_counter() - t0)


def worker(folder: Path, contexts: list[int], tokens: int, dtype_name: str) -> dict[str, Any]:
    """One side of one round: load the model and the adapter, then per context the base model's and the X-LoRA
    request's decode tok/s."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model, resolve_dtype

    dtype = resolve_dtype(dtype_name, torch.device("cpu"))
    loaded = load_model(dtype=dtype)
    longest = max(contexts) + tokens + 2
    settings = EngineConfig(max_model_len=longest, max_num_batched_tokens=max(2048, longest), num_blocks=512)
    engine = LLMEngine(loaded, settings, adapters={"x": folder})
    gen = torch.Generator().manual_seed(1)
    vocab = loaded.config.vocab_size
    decode_tok_s(engine, torch.randint(2, vocab, (16,), generator=gen).tolist(), 2, "x")  # warm-up
    out: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    for n in contexts:
        prompt = torch.randint(2, vocab, (n,), generator=gen).tolist()
        out[f"base@{n}"] = decode_tok_s(engine, prompt, tokens, None)
        out[f"xlora@{n}"] = decode_tok_s(engine, prompt, tokens, "x")
    return out


def run_side(tree: Path, folder: Path, contexts: list[int], tokens: int, dtype: str) -> dict[str, Any]:
    """A worker subprocess on the `inference` package of `tree`."""
    args = [
        str(Path(__file__).resolve()),
        "--worker",
        str(folder),
        "--contexts",
        ",".join(map(str, contexts)),
    ]
    args += ["--tokens", str(tokens), "--dtype", dtype]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", _BOOT, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker on {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_xlora")
    parser.add_argument(
        "--baseline", type=Path, help="a folder holding the inference package to compare with"
    )
    parser.add_argument("--contexts", default="16,256,1024", help="prompt lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per request")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (the median is reported)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker is not None:
        print(json.dumps(worker(args.worker, contexts, args.tokens, args.dtype)))
        return 0

    from rich.console import Console
    from rich.table import Table

    from inference.loader import load_model

    console = Console()
    ours = Path(__file__).resolve().parent.parent
    sides = {"ours": ours} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    loads: list[float] = [os.getloadavg()[0]]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="xlora-bench-") as tmp:
        folder = Path(tmp) / "x"
        write_xlora(folder, load_model().config)  # only its sizes
        for r in range(args.rounds):
            for side, tree in sides.items() if r % 2 == 0 else reversed(sides.items()):
                runs[side].append(run_side(tree, folder, contexts, args.tokens, args.dtype))
                loads.append(os.getloadavg()[0])
                console.print(f"round {r + 1} {side}: {json.dumps(runs[side][-1])}")

    def med(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    first = runs["ours"][0]
    table = Table(
        title=f"X-LoRA decode tok/s, one request, {args.tokens} tokens after a prompt of n ({first['dtype']}, "
        f"{first['threads']} threads, median of {args.rounds} rounds, load average "
        f"{min(loads):.1f}-{max(loads):.1f})"
    )
    columns = ["context n", "base model", "X-LoRA ours"]
    if args.baseline:
        columns += ["X-LoRA baseline", "ours / baseline"]
    columns += ["X-LoRA / base"]
    for col in columns:
        table.add_column(col, justify="right")
    for n in contexts:
        row = [str(n), f"{med('ours', f'base@{n}'):.1f}", f"{med('ours', f'xlora@{n}'):.1f}"]
        if args.baseline:
            before = med("baseline", f"xlora@{n}")
            row += [f"{before:.1f}", f"{med('ours', f'xlora@{n}') / before:.2f}x"]
        row.append(f"{med('ours', f'xlora@{n}') / med('ours', f'base@{n}'):.2f}x")
        table.add_row(*row)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
