"""SmolLM2-135M on the CPU per weight layout: one batch-1 decode step, one prefill, the weight memory and (with
`--perplexity`) the perplexity of a fixed text.

Run `python -m benchmarks.quant_decode [--variants fp32,bf16,int8,int4,gguf] [--context 128] [--steps 20]
[--rounds 5] [--prefill 512] [--perplexity] [--ppl-tokens N] [--profile VARIANT]`. Each variant is what
`inference.loader.load_model` builds (then the model runner's oneDNN packing, as the engine does):

- `fp32`, `bf16`: float weights, the packaged GGUF dequantized (`quantize="none"`);
- `int8`, `int4`: in-situ quantization (`quantize="int8"/"int4"`) of the dequantized float model, loaded from its
  converted folder (a float source, as a Hugging Face folder would be), bf16; `int4 g64`, `int4 g128` other
  group sizes;
- `gguf`: the GGUF's own blocks kept (`quantize="auto"` on a bf16 model: Q4_1 -> int4, the Q8_0 tied head -> int8);
  `gguf int8`: the file re-targeted to int8 (`quantize="int8"` on the GGUF).

A decode step is the model's forward over one new token at position `--context - 1` against a zeroed paged cache
plus `compute_logits` (what the runner does per decode step, without scheduling or sampling); a prefill step is
`--prefill` tokens in one forward (the quantized layers' dense path). Variants run in interleaved rounds; medians.
`--perplexity` prints each variant's perplexity of benchmarks/perplexity_sample.txt (the engine docs' sections on
the KV cache, scheduling and sampling, copied as they stood when quantization was added: English technical prose,
1979 SmolLM2 tokens; not a standard data set, a relative check) in one prefill, and its change against bf16
(targets: int8 within 1%, int4 within 5%). Exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SAMPLE = Path(__file__).resolve().parent / "perplexity_sample.txt"
VARIANTS = ("fp32", "bf16", "int8", "int4", "gguf")
ALL_VARIANTS = (*VARIANTS, "int4 g64", "int4 g128", "gguf int8")


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: object
    kv_cache: torch.Tensor


def _inputs(model: nn.Module, ids: list[int], start: int, block_size: int = 16) -> StepInputs:
    """`ids` at positions start.. of one sequence whose blocks are 1.. of a zeroed cache (block 0 is null)."""
    from inference.metadata import AttentionMetadata
    from inference.model_runner import allocate_kv_cache

    n, end = len(ids), start + len(ids)
    blocks = -(-end // block_size)
    kv = allocate_kv_cache(model.config, blocks + 1, block_size, torch.device("cpu"))  # type: ignore[arg-type]  # nn.Module's stubs type .config as Tensor | Module; it is the model's ModelConfig
    pos = torch.arange(start, end)
    meta = AttentionMetadata(
        slot_mapping=(1 + pos // block_size) * block_size + pos % block_size,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([end], dtype=torch.int32),
        block_tables=torch.arange(1, blocks + 1, dtype=torch.int32).reshape(1, blocks),
        max_query_len=n,
        max_context_len=end,
        block_size=block_size,
    )
    return StepInputs(torch.tensor(ids), pos, meta, kv)


def step_fn(model: nn.Module, inputs: StepInputs, all_logits: bool = False) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(inputs.input_ids, inputs.positions, inputs.meta, inputs.kv_cache)
            return model.compute_logits(hidden if all_logits else hidden[-1:])  # type: ignore[operator]  # nn.Module's stubs type .compute_logits as Tensor | Module; it is the model's method

    return step


def perplexity(model: nn.Module, ids: list[int]) -> float:
    """exp(mean next-token NLL) of `ids` under the model, in one prefill."""
    logits = step_fn(model, _inputs(model, ids, 0), all_logits=True)()
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return float(torch.exp(nll))


def sample_ids(tokens: int = 0) -> list[int]:
    """SmolLM2's token ids of benchmarks/perplexity_sample.txt (the first `tokens`, all when 0)."""
    from transformers import AutoTokenizer

    from inference.loader import converted_gguf, smollm2_gguf_path

    tok = AutoTokenizer.from_pretrained(str(converted_gguf(smollm2_gguf_path(), weights=False)))
    ids: list[int] = tok(SAMPLE.read_text())["input_ids"]
    return ids[:tokens] if tokens else ids


def load_variant(name: str) -> tuple[nn.Module, str]:
    """(model, one-line description of its weights) for a variant name."""
    from inference.cpu_linear import pack_linear_weights
    from inference.loader import converted_gguf, load_model, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    float_folder = converted_gguf(gguf)
    if name in ("fp32", "bf16"):
        loaded = load_model(gguf, dtype="float32" if name == "fp32" else "bfloat16", quantize="none")
    elif name.startswith("int"):
        mode, _, group = name.partition(" g")
        loaded = load_model(
            float_folder, dtype="bfloat16", quantize=mode, quantize_group_size=int(group or 32)
        )
    elif name == "gguf":
        loaded = load_model(gguf, dtype="bfloat16", quantize="auto")
    elif name == "gguf int8":
        loaded = load_model(gguf, dtype="bfloat16", quantize="int8")
    else:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(ALL_VARIANTS)}")
    pack_linear_weights(loaded.model)  # as the model runner does (bf16 float weights only)
    quant = loaded.quantization
    return loaded.model, quant.describe() if quant is not None else f"{name} float weights"


def time_steps(fn: Callable[[], torch.Tensor], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill step (0: none)")
    ap.add_argument(
        "--perplexity", action="store_true", help="perplexity of benchmarks/perplexity_sample.txt"
    )
    ap.add_argument("--ppl-tokens", type=int, default=0, help="only the sample's first N tokens")
    ap.add_argument("--no-timing", action="store_true", help="perplexity only")
    ap.add_argument("--profile", default="", help="a variant to profile with torch.profiler")
    args = ap.parse_args()
    from inference.model_runner import configure_threads
    from inference.quant import model_weight_bytes

    configure_threads()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    models: dict[str, nn.Module] = {}
    for name in names:
        models[name], what = load_variant(name)
        print(f"{name:10s} {what}")
    print(f"\nload average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    if not args.no_timing:
        decode = {n: step_fn(m, _inputs(m, [1234], args.context - 1)) for n, m in models.items()}
        prompt = list(range(1000, 1000 + args.prefill))
        prefill = {n: step_fn(m, _inputs(m, prompt, 0)) for n, m in models.items()} if args.prefill else {}
        for fn in [*decode.values(), *prefill.values()]:
            fn()
        times: dict[str, list[float]] = {n: [] for n in models}
        ptimes: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(args.rounds):
            for name in models:
                times[name].append(time_steps(decode[name], args.steps))
                if prefill:
                    ptimes[name].append(time_steps(prefill[name], 1))
        base = names[1] if len(names) > 1 and names[0] == "fp32" else names[0]
        print(
            f"{'variant':10s} {'decode ms':>9s} {'tok/s':>7s} {'vs ' + base:>9s} {'prefill ms':>10s} "
            f"{'vs ' + base:>9s} {'weights MiB':>11s}"
        )
        for name in models:
            med = statistics.median(times[name])
            if prefill:
                pre = statistics.median(ptimes[name])
                pre_cols = f"{pre * 1e3:10.1f} {statistics.median(ptimes[base]) / pre:8.2f}x"
            else:
                pre_cols = f"{'-':>10s} {'-':>9s}"
            print(
                f"{name:10s} {med * 1e3:9.2f} {1 / med:7.1f} {statistics.median(times[base]) / med:8.2f}x "
                f"{pre_cols} {model_weight_bytes(models[name]) / 2**20:11.1f}"
            )
        print(
            f"load average {os.getloadavg()[0]:.2f}; prefill of {args.prefill} tokens, decode at {args.context}"
        )
    if args.perplexity:
        ids = sample_ids(args.ppl_tokens)
        print(f"\nperplexity of benchmarks/perplexity_sample.txt, {len(ids)} tokens, one prefill")
        ppl = {name: perplexity(m, ids) for name, m in models.items()}
        for name, value in ppl.items():
            rel = f"{(value / ppl['bf16'] - 1) * 100:+.2f}% vs bf16" if "bf16" in ppl else ""
            print(f"  {name:10s} {value:8.3f}  {rel}")
    if args.profile:
        profile(
            step_fn(models[args.profile], _inputs(models[args.profile], [1234], args.context - 1)),
            args.profile,
        )


def profile(fn: Callable[[], torch.Tensor], name: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fn()
    print(f"\nprofile of 20 eager decode steps, {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
