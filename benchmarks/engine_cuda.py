"""GPU engine benchmark: our engine against Hugging Face transformers on the same card, on nano-vllm's workload.

Run `python -m benchmarks.engine --device cuda` (or `python -m benchmarks.engine_cuda`). The workload is nano-vllm's
published one: Qwen3-0.6B config with dummy weights, 256 requests, prompt and output lengths uniform in 100-1024
(seeded), EOS ignored, temperature 0.6. Figures, all measured in this run on this card at the same dtype: output
tokens/s against transformers' continuous batching (the engine behind `generate_batch`) and padded `generate`;
batch-1 decode time per token against the HBM bandwidth limit (weight bytes / bandwidth); TTFT of a 128-token
prompt on an idle engine; peak concurrent sequences and preemptions. Prints a table; exits 0.

`--smoke` runs the same code on the CPU with a tiny random Qwen3 and a handful of requests: it checks the script,
it is not a result.

`--quantized` measures weight-only quantization instead (inference/triton_quant.py on CUDA): first each linear
shape of the model at 1, 16 and 256 rows through the int8 and int4 Triton matmuls against a dense matmul
(do_bench, GPU only); then the same model loaded with bf16, int8 and int4 (group 32) linear layers, one engine
after another, each with its weight memory, batch-1 decode ms/token (and the bandwidth limit of its own weight
bytes) and the decode tok/s of a batch of 32 requests (128-token prompts, 128 new tokens), every ratio against the
bf16 row of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine import Workload, left_padded

# HBM bandwidth in GB/s of known cards, matched in order against torch.cuda.get_device_name().
HBM_GBPS: tuple[tuple[str, float], ...] = (
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),  # SXM (HBM3)
    (r"A100.*80GB", 2000.0),
    (r"A100", 1550.0),  # 40GB
    (r"\bL4\b", 300.0),
    (r"RTX 4090", 1000.0),
)
TARGET_TOK_S = 10_000  # on an H100; vLLM measured about 9,500 on an A100 with this workload
TARGET_VS_CB = 3.0
TARGET_BW_FRACTION = 0.5
TARGET_TTFT_MS = 50.0
TARGET_CONCURRENCY = 50

# A Qwen3 small enough for the CPU: the smoke run's model (same architecture, same code path).
SMOKE_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


@contextlib.contextmanager
def model_source(model: str | None, smoke: bool) -> Iterator[str | Path]:
    """The model to load: `model` when given, else Qwen3-0.6B, or on a smoke run a tiny random Qwen3 (a config.json
    in a temporary folder that lives as long as the block)."""
    if model is not None or not smoke:
        yield model or "qwen3-0.6b"
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(SMOKE_CONFIG))
        yield path


def hbm_gbps(device_name: str) -> float | None:
    """HBM bandwidth of a known card (GB/s), or None."""
    for pattern, gbps in HBM_GBPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return gbps
    return None


def nano_vllm_workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> Workload:
    """nano-vllm's bench.py: prompt ids uniform in [0, 10000], prompt and output lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    top = min(10_000, vocab - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return Workload(prompts, [rng.randint(lo, hi) for _ in range(n)])


@dataclass(slots=True)
class Run:
    """One complete run of a set of requests."""

    requests: int
    tokens: int  # output tokens requested (and produced: EOS is ignored)
    seconds: float
    peak_running: int = 0
    preemptions: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- our engine ------------------------------------------------------------------------------------------------


def sampling(temperature: float, n: int, output_kind: str = "delta") -> Any:
    """Greedy or sampled, exactly n tokens; outputs carry deltas (or, with "final_only", only the final one)."""
    from inference.params import OutputKind, SamplingParams

    return SamplingParams(
        temperature=temperature, max_tokens=n, ignore_eos=True, output_kind=OutputKind(output_kind)
    )


def engine_run(engine: Any, work: Workload, temperature: float) -> Run:
    """All requests queued at once, stepped to completion."""
    preempted = engine.scheduler.num_preemptions
    peak = 0
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens, strict=True)):
        engine.add_request(f"tp-{i}", p, sampling(temperature, n, "final_only"))
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                produced += out.completion_tokens
        peak = max(peak, len(engine.scheduler.running))
    seconds = time.perf_counter() - t0
    if produced != work.output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, {work.output_tokens} were requested")
    return Run(len(work), produced, seconds, peak, engine.scheduler.num_preemptions - preempted)


def engine_decode_ms(engine: Any, prompt: list[int], n: int) -> float:
    """Batch-1 decode: ms per output token between the first and the last token of one greedy request."""
    engine.add_request(None, prompt, sampling(0.0, n))
    stamps: list[float] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.delta_token_ids:
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (n - 1) * 1000


def engine_decode_ms_with_layer_ops(engine: Any, layer_ops: Any, prompt: list[int], n: int) -> float:
    """Batch-1 decode as `engine_decode_ms`, with the model's layer ops swapped for `layer_ops` (decode graphs
    re-captured around them); the engine's own ops and graphs are restored afterwards."""
    from dataclasses import replace

    from inference.attention_backends import set_attention_backend

    runner = engine.runner
    own = runner.attention
    had_graphs = runner.decode_graphs is not None

    def use(backend: Any) -> None:
        set_attention_backend(runner.model, backend)
        if had_graphs:
            runner.decode_graphs = None  # free the old graphs' pool before capturing again
            free_device_memory()
            runner.build_decode_graphs()

    use(replace(own, layer_ops=layer_ops))
    try:
        engine_decode_ms(engine, prompt, 8)  # warm-up
        return engine_decode_ms(engine, prompt, n)
    finally:
        use(own)


def engine_ttft(engine: Any, prompt: list[int]) -> float:
    """Seconds from queuing a request on an idle engine to its first token."""
    t0 = time.perf_counter()
    engine.add_request(None, prompt, sampling(0.0, 1))
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.delta_token_ids for o in outs):
            first = time.perf_counter() - t0
    assert first is not None
    return first


# ---- transformers --------------------------------------------------------------------------------------------


def hf_generation_kwargs(temperature: float) -> dict[str, Any]:
    # top-k/top-p off: transformers' default top_k=50 is work our side does not do
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def hf_padded(model: Any, work: Workload, batch: int, temperature: float, deadline: float) -> float | None:
    """`generate` in left-padded batches, each run to its longest requested output; None past the deadline."""
    device = model.device
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        ids, mask = left_padded(work.prompts[i : i + batch], pad_id=0)
        longest = ids.shape[1]
        n = max(work.max_tokens[i : i + batch])
        with torch.inference_mode():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                **hf_generation_kwargs(temperature),
            )
        assert out.shape[1] - longest == n
        if time.perf_counter() > deadline and i + batch < len(work):
            return None
    sync(device)
    return time.perf_counter() - t0


def hf_continuous(
    model: Any, work: Workload, temperature: float, deadline: float, cb_config: Any = None
) -> float | None:
    """transformers' continuous batching (what `generate_batch` runs), each request with its own max_new_tokens.

    Timed from the first request to the last result: the manager's warm-up (its CUDA graph capture) is left out,
    as our engine's capture is. None past the deadline.
    """
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gc_ = GenerationConfig(
        max_new_tokens=max(work.max_tokens),
        eos_token_id=None,
        pad_token_id=0,
        **hf_generation_kwargs(temperature),
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in work.prompts),
        max_generated_length=max(work.max_tokens),
        num_requests=len(work),
    )
    with model.continuous_batching_context_manager(
        generation_config=gc_,
        block=True,
        timeout=60,
        workload_hints=hints,
        continuous_batching_config=cb_config,
    ) as manager:
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens, strict=True)):
            manager.add_request(p, request_id=f"cb-{i}", max_new_tokens=n)
        done = 0
        while done < len(work):
            if time.perf_counter() > deadline:
                manager.stop(block=True, timeout=60, hard_stop=True)
                return None
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers continuous batching failed: {result.error}")
                n = work.max_tokens[int(result.request_id.removeprefix("cb-"))]
                if len(result.generated_tokens) != n:
                    raise RuntimeError(
                        f"{result.request_id}: {len(result.generated_tokens)} tokens, wanted {n}"
                    )
                done += 1
        seconds = time.perf_counter() - t0
    return seconds


def hf_decode_ms(model: Any, prompt: list[int], n: int) -> float:
    """Batch-1 greedy decode with `generate`: (time for 1 + n tokens - time for 1 token) / n."""
    ids = torch.tensor([prompt], device=model.device)

    def timed(k: int) -> float:
        sync(model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(model.device)
        return time.perf_counter() - t0

    timed(4)  # warm-up
    return (timed(n + 1) - timed(1)) / n * 1000


def capped(
    run: Callable[[Workload, float], float | None], work: Workload, cap: float, probe: int
) -> tuple[Workload, float] | None:
    """Run a peer on the whole workload if it fits in `cap` seconds, else on the largest prefix that does.

    A probe on the first `probe` requests (timed, complete) picks the size; the figure always comes from one
    complete run of a stated set of requests, never from an extrapolation. None when not even the probe finished.
    """
    start = time.perf_counter()
    small = work.head(probe)
    t_probe = run(small, start + cap)
    if t_probe is None:
        return None
    if len(small) == len(work):
        return small, t_probe
    budget = cap - (time.perf_counter() - start)
    rate = small.output_tokens / t_probe  # a bigger set batches better: this guess errs small
    k, tokens = len(small), small.output_tokens
    while k < len(work) and (tokens + work.max_tokens[k]) / rate <= 0.9 * budget:
        tokens += work.max_tokens[k]
        k += 1
    if k == len(small):
        return small, t_probe
    chosen = work.head(k)
    t = run(chosen, time.perf_counter() + budget)
    return (chosen, t) if t is not None else (small, t_probe)


# ---- main ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    engine_full: Run | None = None
    engine_error: str | None = None
    engine_subsets: dict[int, Run] | None = None
    cb: tuple[Workload, float] | None = None
    cb_error: str | None = None
    padded: tuple[Workload, float] | None = None
    padded_error: str | None = None
    decode_ms: float | None = None
    eager_ops_decode_ms: float | None = (
        None  # the same, with the eager torch layer ops instead of fused kernels
    )
    layer_ops: str = ""
    hf_decode_ms: float | None = None
    ttft_ms: list[float] | None = None
    weight_bytes: int = 0
    kv_gib: float = 0.0
    graphs: str = "off"
    peak_gib: float = 0.0


# ---- quantized weights ---------------------------------------------------------------------------------------

QUANT_MODES = ("none", "int8", "int4")
QUANT_BATCH = 32  # requests of the batched decode row
QUANT_LEN = 128  # prompt and output tokens of each request there


@dataclass(slots=True)
class QuantRow:
    """One weight layout's figures."""

    mode: str
    weight_bytes: int
    layout: str  # QuantReport.describe(), or the float dtype
    decode_ms: float  # batch 1, per token
    batch: Run


def quantized_rows(
    args: argparse.Namespace, console: Any, device: torch.device, source: str | Path, dtype: torch.dtype
) -> list[QuantRow]:
    """bf16 then int8 then int4 weights of `source`, each in its own engine (freed before the next): weight bytes,
    batch-1 decode and the batched decode of `QUANT_BATCH` requests."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from inference.quant import model_weight_bytes

    smoke = device.type != "cuda"
    rng = random.Random(args.seed + 4)
    rows: list[QuantRow] = []
    for mode in QUANT_MODES:
        console.print(f"ours, {mode if mode != 'none' else 'float'} weights: loading, starting the engine")
        loaded = load_model(source, dtype=dtype, device=device, load_format="dummy", quantize=mode)
        dtype_name = str(dtype).removeprefix("torch.")
        layout = loaded.quantization.describe() if loaded.quantization else f"{dtype_name} weights (float)"
        weight_bytes = model_weight_bytes(loaded.model)
        n_seqs, length = (4, 8) if smoke else (QUANT_BATCH, QUANT_LEN)
        config = EngineConfig(
            max_num_seqs=n_seqs,
            max_num_batched_tokens=max(2048, n_seqs * length),
            max_model_len=args.max_model_len,
            # the same modest cache for every layout: the rows compare weights, not cache sizes
            kv_cache_memory=(256 if smoke else 2048) * 2**20,
        )
        engine = LLMEngine(loaded, config)
        top = min(10_000, engine.model_config.vocab_size - 1)
        prompt = [rng.randint(0, top) for _ in range(length)]
        engine_decode_ms(engine, prompt, 8)  # warm-up: Triton compiles each launch specialisation once
        decode_n = 32 if smoke else 256
        decode_ms = engine_decode_ms(engine, prompt, decode_n)
        work = Workload(
            [[rng.randint(0, top) for _ in range(length)] for _ in range(n_seqs)], [length] * n_seqs
        )
        engine_run(engine, Workload(work.prompts[:2], [8, 8]), 0.0)  # warm-up of the batched shapes
        batch = engine_run(engine, work, 0.0)
        rows.append(QuantRow(mode, weight_bytes, layout, decode_ms, batch))
        console.print(
            f"  {layout}; batch-1 {decode_ms:.3f} ms/token, batch {n_seqs} {batch.tok_s:,.0f} tok/s"
        )
        del engine, loaded
        free_device_memory()
    return rows


@dataclass(slots=True)
class KernelRow:
    """One linear layer's shape and rows, timed as a bf16 `F.linear` and through the int8 and int4 Triton layers."""

    layer: str
    m: int
    n: int
    k: int
    ms: dict[str, float]  # "bf16" / "int8" / "int4" -> median ms per call
    weight_bytes: dict[str, int]


def quant_kernel_rows(source: str | Path, device: torch.device, dtype: torch.dtype) -> list[KernelRow]:
    """Each linear shape of one decoder layer of `source` (and the output head) at 1, 16 and 256 rows: the Triton
    int8 and int4 (group 32) matmuls against the dense matmul in `dtype`, timed with triton.testing.do_bench."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from inference.loader import dummy_model_config
    from inference.quant import TritonQuantLinear, quantize_int4, quantize_int8

    _, c = dummy_model_config(source, dtype)
    shapes = {
        "qkv_proj": ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_heads * c.head_dim),
        "gate_up_proj": (2 * c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
        "lm_head (int8 in both modes)": (c.vocab_size, c.hidden_size),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[KernelRow] = []
    for layer, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32) * 0.02
        dense = w.to(dtype)
        head = layer.startswith("lm_head")
        quant = {
            "int8": TritonQuantLinear(quantize_int8(w)),
            "int4": TritonQuantLinear(quantize_int8(w) if head else [quantize_int4(w, 32)]),
        }
        del w
        for m in (1, 16, 256):
            x = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
            ms = {"bf16": float(do_bench(lambda x=x, d=dense: F.linear(x, d)))}
            for mode, q in quant.items():
                ms[mode] = float(do_bench(lambda x=x, q=q: q(x)))
            sizes = {"bf16": dense.numel() * dense.element_size()} | {
                mode: q.weight_bytes() for mode, q in quant.items()
            }
            rows.append(KernelRow(layer, m, n, k, ms, sizes))
        del dense, quant
        free_device_memory()
    return rows


def print_kernel_table(console: Any, name: str, rows: list[KernelRow]) -> None:
    from rich.table import Table

    table = Table(title=f"Triton weight-only matmuls against a dense matmul, one layer's shapes ({name})")
    for col in (
        "layer",
        "rows",
        "N x K",
        "dense ms",
        "int8 ms",
        "vs dense",
        "int4 ms",
        "vs dense",
        "int4 GB/s",
    ):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        table.add_row(
            r.layer,
            str(r.m),
            f"{r.n} x {r.k}",
            f"{r.ms['bf16']:.4f}",
            f"{r.ms['int8']:.4f}",
            f"{r.ms['bf16'] / r.ms['int8']:.2f}x",
            f"{r.ms['int4']:.4f}",
            f"{r.ms['bf16'] / r.ms['int4']:.2f}x",
            f"{r.weight_bytes['int4'] / r.ms['int4'] / 1e6:,.0f}",  # weight bytes read per second
        )
    console.print(table)


def print_quant_table(console: Any, name: str, gbps: float | None, rows: list[QuantRow], smoke: bool) -> None:
    from rich.table import Table

    title = f"weight-only quantization, ours, {name}"
    table = Table(title=f"SMOKE RUN ON THE CPU, NOT A RESULT: {title}" if smoke else title)
    for col in (
        "weights",
        "MiB",
        "vs float",
        "batch-1 ms/token",
        "tok/s",
        "vs float",
        "of bandwidth limit",
        f"batch {rows[0].batch.requests} tok/s",
        "vs float",
    ):
        table.add_column(col, justify="left" if col == "weights" else "right")
    base = rows[0]
    for row in rows:
        limit = f"{row.weight_bytes / (gbps * 1e9) * 1000 / row.decode_ms:.0%}" if gbps else "n/a"
        table.add_row(
            row.layout,
            f"{row.weight_bytes / 2**20:,.1f}",
            f"{row.weight_bytes / base.weight_bytes:.2f}x",
            f"{row.decode_ms:.3f}",
            f"{1000 / row.decode_ms:,.0f}",
            f"{base.decode_ms / row.decode_ms:.2f}x",
            limit,
            f"{row.batch.tok_s:,.0f}",
            f"{row.batch.tok_s / base.batch.tok_s:.2f}x",
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine --device cuda", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, a few requests, a tiny random Qwen3 unless --model is given: checks the script",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a builtin config (inference/configs) or a config.json; default qwen3-0.6b",
    )
    p.add_argument("--num-seqs", type=int, default=None, help="requests (default 256; smoke 6)")
    p.add_argument(
        "--min-len", type=int, default=None, help="shortest prompt and output (default 100; smoke 8)"
    )
    p.add_argument(
        "--max-len", type=int, default=None, help="longest prompt and output (default 1024; smoke 24)"
    )
    p.add_argument("--temperature", type=float, default=0.6, help="nano-vllm's 0.6; 0 for greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16, fp16 without bf16), bfloat16, float16, float32"
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (default: known-card table)"
    )
    p.add_argument("--hf-batch", type=int, default=64, help="batch size of the padded `generate` peer")
    p.add_argument(
        "--peers-max-seconds",
        type=float,
        default=180.0,
        help="time cap per transformers peer; a capped peer runs a stated prefix of the requests, and so do we",
    )
    p.add_argument("--skip-peers", action="store_true", help="only our engine")
    p.add_argument(
        "--quantized",
        action="store_true",
        help="instead: float, int8 and int4 weights of the model, weight memory and decode speed (no peers)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    # wide enough for the table when the output is a log file rather than a terminal
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not args.smoke and not torch.cuda.is_available():
        console.print(
            "[red]no CUDA device[/]: this benchmark needs a GPU (`--smoke` runs its code path on the CPU)"
        )
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    n_seqs = args.num_seqs or (6 if args.smoke else 256)
    lo = args.min_len or (8 if args.smoke else 100)
    hi = args.max_len or (24 if args.smoke else 1024)
    with model_source(args.model, args.smoke) as source:
        if args.quantized:
            return _run_quantized(args, console, device, source)
        return _run(args, console, device, source, n_seqs, lo, hi)


def _run_quantized(args: argparse.Namespace, console: Any, device: torch.device, source: str | Path) -> int:
    from inference.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    gbps = args.hbm_gbps or (hbm_gbps(name) if device.type == "cuda" else None)
    console.print(
        f"[bold]quantized weights[/] {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}; "
        f"model {source}"
    )
    if device.type == "cuda":
        console.print("kernels: each linear shape at 1, 16 and 256 rows")
        print_kernel_table(console, name, quant_kernel_rows(source, device, dtype))
    else:
        console.print("kernels: no table off CUDA (the Triton matmuls only run on a GPU outside the tests)")
    rows = quantized_rows(args, console, device, source, dtype)
    print_quant_table(console, name, gbps, rows, args.smoke)
    return 0


def _run(
    args: argparse.Namespace, console: Any, device: torch.device, source: str | Path, n: int, lo: int, hi: int
) -> int:
    import transformers
    from transformers import AutoModelForCausalLM

    from inference.loader import _dummy_config_path, _read_json, resolve_dtype
    from inference.model_config import hf_config_from_dict

    dtype = resolve_dtype(args.dtype, device)
    hf_cfg = hf_config_from_dict(_read_json(_dummy_config_path(source)), str(source))
    work = nano_vllm_workload(n, lo, hi, hf_cfg.vocab_size, args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    gbps = args.hbm_gbps or (hbm_gbps(name) if device.type == "cuda" else None)
    label = (
        f"[bold yellow]SMOKE RUN[/] (CPU, {'tiny random Qwen3' if args.model is None else 'dummy weights'}): "
        "checks the script, not a result"
        if args.smoke
        else ""
    )
    console.print(
        f"[bold]GPU engine benchmark[/] {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {n} requests, lengths {lo}-{hi}, temperature {args.temperature}"
        + (f"\n{label}" if label else "")
    )
    res = Results()
    rng = random.Random(args.seed + 1)
    vocab_top = min(10_000, hf_cfg.vocab_size - 1)
    decode_prompt = [rng.randint(0, vocab_top) for _ in range(128)]
    decode_n = 32 if args.smoke else 256
    cap = args.peers_max_seconds

    # Peers first: our engine takes most of the GPU's memory for its KV cache once it exists.
    if not args.skip_peers:
        console.print("transformers: building the model (random weights, sdpa)")
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa").eval()
        console.print("transformers: batch-1 decode")
        res.hf_decode_ms = hf_decode_ms(hf, decode_prompt, decode_n)
        console.print(f"transformers: padded generate, batches of {args.hf_batch} (cap {cap:.0f}s)")
        try:
            res.padded = capped(
                lambda w, d: hf_padded(hf, w, args.hf_batch, args.temperature, d), work, cap, args.hf_batch
            )
        except torch.cuda.OutOfMemoryError as exc:
            res.padded_error = f"OOM: {str(exc).splitlines()[0]}"
        free_device_memory()
        console.print(f"transformers: continuous batching (generate_batch's engine, cap {cap:.0f}s)")
        try:
            # on the GPU transformers sizes its cache and batches from free memory, as generate_batch does; on the
            # CPU that would be most of the host's RAM, zero-filled at start
            cb_config = None
            if args.smoke:
                from transformers import ContinuousBatchingConfig

                cb_config = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256)
            res.cb = capped(
                lambda w, d: hf_continuous(hf, w, args.temperature, d, cb_config), work, cap, max(16, n // 8)
            )
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            res.cb_error = str(exc).splitlines()[0]
        attn = hf.config._attn_implementation
        console.print(f"transformers: done (attention {attn})")
        del hf
        free_device_memory()

    console.print("ours: loading dummy weights and starting the engine")
    _run_engine(args, console, device, source, dtype, work, decode_prompt, decode_n, res)
    _print_table(args, console, name, gbps, work, res)
    return 0


def build_engine(
    args: argparse.Namespace, device: torch.device, source: str | Path, dtype: torch.dtype
) -> Any:
    """Our engine on dummy weights of `source`, sized by the benchmark's arguments (KV from a profiling step on
    CUDA; on the CPU, room for two longest requests)."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model

    loaded = load_model(source, dtype=dtype, device=device, load_format="dummy")
    kv_cache_memory = None  # CUDA: sized from a profiling step under the utilization
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        kv_cache_memory = max(256 * 2**20, 2 * args.max_model_len * loaded.config.kv_bytes_per_token())
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,  # the CPU ignores it
        kv_cache_memory=kv_cache_memory,
    )
    return LLMEngine(loaded, config)


def _run_engine(
    args: argparse.Namespace,
    console: Any,
    device: torch.device,
    source: str | Path,
    dtype: torch.dtype,
    work: Workload,
    decode_prompt: list[int],
    decode_n: int,
    res: Results,
) -> None:
    engine = build_engine(args, device, source, dtype)
    res.weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    runner = engine.runner
    res.kv_gib = runner.kv_cache_bytes / 2**30
    graphs = runner.decode_graphs
    res.graphs = (
        f"{'captured' if graphs.captured else 'static, eager'} up to {graphs.max_batch}" if graphs else "off"
    )
    del graphs  # the layer-ops row re-captures: no reference may keep the old graphs' pool alive
    rng = random.Random(args.seed + 2)
    top = min(10_000, engine.model_config.vocab_size - 1)
    # warm-up: Triton compiles per launch specialisation; the first steps of every shape pay for it
    warm = nano_vllm_workload(8, 16, 300 if device.type == "cuda" else 16, top + 1, args.seed + 3)
    engine_run(engine, Workload(warm.prompts, [16] * 8), args.temperature)
    console.print(f"ours: {len(work)} requests (decode graphs: {res.graphs})")
    try:
        res.engine_full = engine_run(engine, work, args.temperature)
    except torch.cuda.OutOfMemoryError as exc:
        res.engine_error = f"OOM: {str(exc).splitlines()[0]}"
        engine.abort_all()
        free_device_memory()
    res.engine_subsets = {}
    for peer in (res.cb, res.padded):
        if peer is not None and len(peer[0]) < len(work) and len(peer[0]) not in res.engine_subsets:
            console.print(f"ours: the first {len(peer[0])} requests (the capped peer's set)")
            res.engine_subsets[len(peer[0])] = engine_run(engine, peer[0], args.temperature)
    console.print("ours: batch-1 decode and TTFT")
    engine_decode_ms(engine, decode_prompt, 8)  # warm-up
    res.decode_ms = engine_decode_ms(engine, decode_prompt, decode_n)
    ttfts = []
    for _ in range(6):
        prompt = [rng.randint(0, top) for _ in range(128)]  # fresh tokens: no prefix-cache hits
        ttfts.append(engine_ttft(engine, prompt) * 1000)
    res.ttft_ms = ttfts[1:]  # the first one warms the 128-token prefill shape
    from inference.layer_ops import EAGER_OPS

    res.layer_ops = runner.attention.layer_ops.name
    if runner.attention.layer_ops is not EAGER_OPS:
        console.print(
            f"ours: batch-1 decode with the eager torch layer ops instead of the {res.layer_ops} ones"
        )
        res.eager_ops_decode_ms = engine_decode_ms_with_layer_ops(engine, EAGER_OPS, decode_prompt, decode_n)
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30


def _print_table(
    args: argparse.Namespace, console: Any, name: str, gbps: float | None, work: Workload, res: Results
) -> None:
    from rich.table import Table

    smoke = args.smoke
    title = f"our engine vs transformers, nano-vllm workload ({name})"
    if smoke:
        title = f"SMOKE RUN ON THE CPU, NOT A RESULT: {title}"
    table = Table(title=title)
    for col in ("figure", "ours", "peer", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")

    def mark(ok: bool) -> str:
        return "[dim]smoke[/]" if smoke else ("[green]ok[/]" if ok else "[red]miss[/]")

    def ours_on(w: Workload) -> Run | None:
        if res.engine_full is not None and len(w) == len(work):
            return res.engine_full
        return (res.engine_subsets or {}).get(len(w))

    full = res.engine_full
    if full is not None:
        on_h100 = "H100" in name.upper()
        target = f">= {TARGET_TOK_S:,} on H100 " + (
            mark(full.tok_s >= TARGET_TOK_S) if on_h100 else "[dim]n/a[/]"
        )
        table.add_row(f"output tok/s, {full.requests} requests", f"{full.tok_s:,.0f}", "", "", target)
    else:
        table.add_row(f"output tok/s, {len(work)} requests", f"[red]{res.engine_error}[/]", "", "", "")
    for label, peer, error, goal in (
        ("transformers continuous batching", res.cb, res.cb_error, TARGET_VS_CB),
        (f"transformers generate, padded x{args.hf_batch}", res.padded, res.padded_error, None),
    ):
        if args.skip_peers:
            continue
        if peer is None:
            table.add_row(
                f"output tok/s vs {label}", "", f"[red]{error or 'did not finish within the cap'}[/]", "", ""
            )
            continue
        w, secs = peer
        ours = ours_on(w)
        peer_tok_s = w.output_tokens / secs
        subset = "" if len(w) == len(work) else f" (first {len(w)} requests: capped)"
        ratio = ours.tok_s / peer_tok_s if ours else float("nan")
        target = f">= {goal:g}x {mark(ratio >= goal)}" if goal else "info"
        table.add_row(
            f"output tok/s vs {label}{subset}",
            f"{ours.tok_s:,.0f}" if ours else "",
            f"{peer_tok_s:,.0f}",
            f"{ratio:.2f}x",
            target,
        )
    if res.decode_ms is not None:
        if gbps:
            limit_ms = res.weight_bytes / (gbps * 1e9) * 1000
            frac = limit_ms / res.decode_ms
            table.add_row(
                f"batch-1 decode ms/token vs bandwidth limit ({res.weight_bytes / 1e9:.2f} GB at {gbps:,.0f} GB/s)",
                f"{res.decode_ms:.3f}",
                f"{limit_ms:.3f}",
                f"{frac:.0%} of limit",
                f">= {TARGET_BW_FRACTION:.0%} {mark(frac >= TARGET_BW_FRACTION)}",
            )
        else:
            table.add_row(
                "batch-1 decode ms/token vs bandwidth limit",
                f"{res.decode_ms:.3f}",
                "[dim]n/a on the CPU[/]" if smoke else "[dim]unknown card: --hbm-gbps[/]",
                "",
                f">= {TARGET_BW_FRACTION:.0%}",
            )
        label = "batch-1 decode ms/token: fused layer kernels vs eager torch ops (RMSNorm, SiLU, RoPE)"
        if res.eager_ops_decode_ms is not None:
            table.add_row(
                label,
                f"{res.decode_ms:.3f}",
                f"{res.eager_ops_decode_ms:.3f}",
                f"{res.eager_ops_decode_ms / res.decode_ms:.2f}x faster",
                "info",
            )
        else:
            table.add_row(label, f"[dim]n/a: the engine runs the {res.layer_ops} ops here[/]", "", "", "info")
        if res.hf_decode_ms is not None:
            table.add_row(
                "batch-1 decode ms/token vs transformers generate",
                f"{res.decode_ms:.3f}",
                f"{res.hf_decode_ms:.3f}",
                f"{res.hf_decode_ms / res.decode_ms:.2f}x faster",
                "info",
            )
    if res.ttft_ms:
        med = statistics.median(res.ttft_ms)
        table.add_row(
            f"TTFT, 128-token prompt, idle engine (ms, median of {len(res.ttft_ms)})",
            f"{med:.1f}",
            "",
            "",
            f"< {TARGET_TTFT_MS:.0f} {mark(med < TARGET_TTFT_MS)}",
        )
    if full is not None:
        ok = full.peak_running > TARGET_CONCURRENCY
        table.add_row(
            "peak concurrent generations / preemptions (no OOM)",
            f"{full.peak_running} / {full.preemptions}",
            "",
            "",
            f"> {TARGET_CONCURRENCY} {mark(ok)}",
        )
    console.print(table)
    extra = f", peak GPU memory allocated {res.peak_gib:.1f} GiB" if res.peak_gib else ""
    console.print(
        f"ours: KV cache {res.kv_gib:.2f} GiB, decode graphs {res.graphs}{extra}; "
        f"wall: ours {full.seconds:.1f}s"
        if full
        else "ours: did not finish",
        end="",
    )
    for label, peer in (("continuous batching", res.cb), ("padded generate", res.padded)):
        if peer is not None:
            console.print(f", transformers {label} {peer[1]:.1f}s on {len(peer[0])} requests", end="")
    console.print()


if __name__ == "__main__":
    raise SystemExit(main())
