"""One batch-1 decode step of SmolLM2-135M on the CPU, model forward + logits, per weight layout.

Run `python -m benchmarks.quant_decode [--context 128] [--steps 20] [--rounds 5] [--variants a,b] [--compile]
[--profile VARIANT]`. Variants (all load the packaged SmolLM2 GGUF through inference.loader):

- `fp32`, `bf16`: plain `nn.Linear` weights; `bf16 packed`: oneDNN-packed (inference/cpu_linear, the engine's
  bf16 CPU default);
- `bf16 int8`, `bf16 int4`: in-situ quantization of the bf16 model (inference.quant.quantize_model; the tied head
  becomes a quantized `lm_head`, the embedding stays bf16 for the lookup);
- `bf16 gguf`: the GGUF's own blocks as int4 (Q4_1 -> int4 g32, Q8_0 head -> two int4 planes, both exact);
  `bf16 gguf int8-head`: the same with the Q8_0 head re-quantized to per-channel int8; `bf16 gguf compact`: that,
  and the embedding lookup reading the head's int8 codes (one copy of the table);
- `fp32 gguf`: the GGUF int4 layers in a float32 model (the layers cast to bf16 and back);
- `fp32 w8a8`: int8 weights with activations quantized per call (fbgemm's dynamic linear), float32 model.

Each step is the model's forward over one new token at position `--context - 1` against a zeroed paged cache (the
reference attention backend, as the engine on the CPU) and `compute_logits`: what the model runner does per
decode step, without scheduling or sampling. Variants run in interleaved rounds; the table shows the median step
time and tokens/s. `--compile` also compiles the bf16 int4 (GGUF) model's forward with `torch.compile` (inductor,
C++ backend) for this one decode shape and reports the compile time and the step time. `--profile VARIANT`
prints torch.profiler's op table for 20 eager steps of that variant. `--ppl-tokens N` adds each variant's
perplexity on the first N tokens of docs/engine.md (a quick quality check, not a standard data set). Exits 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

VARIANTS = (
    "fp32",
    "bf16",
    "bf16 packed",
    "bf16 int8",
    "bf16 int4",
    "bf16 gguf",
    "bf16 gguf int8-head",
    "bf16 gguf compact",
    "fp32 gguf",
    "fp32 w8a8",
)


@dataclass(slots=True)
class DecodeInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: object
    kv_cache: torch.Tensor


def decode_inputs(model: nn.Module, context: int, block_size: int = 16) -> DecodeInputs:
    """One sequence, one new token at position `context - 1`, blocks 1.. of a zeroed cache (block 0 is null)."""
    from inference.metadata import AttentionMetadata
    from inference.model_runner import allocate_kv_cache

    config = model.config
    blocks = -(-context // block_size)
    kv = allocate_kv_cache(config, blocks + 1, block_size, torch.device("cpu"))
    pos = context - 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([(1 + pos // block_size) * block_size + pos % block_size]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        context_lens=torch.tensor([context], dtype=torch.int32),
        block_tables=torch.arange(1, blocks + 1, dtype=torch.int32).reshape(1, blocks),
        max_query_len=1,
        max_context_len=context,
        block_size=block_size,
    )
    return DecodeInputs(torch.tensor([1234]), torch.tensor([pos]), meta, kv)


def prefill_inputs(model: nn.Module, ids: list[int], block_size: int = 16) -> DecodeInputs:
    """One sequence of `ids` prefilled in one step into blocks 1.. of a zeroed cache."""
    from inference.metadata import AttentionMetadata
    from inference.model_runner import allocate_kv_cache

    n = len(ids)
    blocks = -(-n // block_size)
    kv = allocate_kv_cache(model.config, blocks + 1, block_size, torch.device("cpu"))
    pos = torch.arange(n)
    meta = AttentionMetadata(
        slot_mapping=(1 + pos // block_size) * block_size + pos % block_size,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(1, blocks + 1, dtype=torch.int32).reshape(1, blocks),
        max_query_len=n,
        max_context_len=n,
        block_size=block_size,
    )
    return DecodeInputs(torch.tensor(ids), pos, meta, kv)


def perplexity(model: nn.Module, ids: list[int]) -> float:
    """exp(mean next-token NLL) of `ids` under the model, in one prefill."""
    inputs = prefill_inputs(model, ids)
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, inputs.meta, inputs.kv_cache)
        logits = model.compute_logits(hidden[:-1])
        nll = torch.nn.functional.cross_entropy(logits, inputs.input_ids[1:])
    return float(torch.exp(nll))


def text_ids(tokens: int) -> list[int]:
    """The first `tokens` tokens of this repository's docs/engine.md (English prose with code), SmolLM2's
    tokenizer."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from inference.loader import converted_gguf, smollm2_gguf_path

    text = (Path(__file__).resolve().parent.parent / "docs" / "engine.md").read_text()
    tok = AutoTokenizer.from_pretrained(str(converted_gguf(smollm2_gguf_path())))
    return tok(text)["input_ids"][:tokens]


def step_fn(
    model: nn.Module, inputs: DecodeInputs, forward: Callable | None = None
) -> Callable[[], torch.Tensor]:
    fwd = forward or model

    def step() -> torch.Tensor:
        inputs.meta.backend_cache = None
        # a compiled graph that writes the (non-inference) KV cache cannot run under inference_mode
        with torch.no_grad() if forward is not None else torch.inference_mode():
            hidden = fwd(inputs.input_ids, inputs.positions, inputs.meta, inputs.kv_cache)
            return model.compute_logits(hidden)

    return step


def build_variants(names: list[str]) -> dict[str, nn.Module]:
    from inference.cpu_linear import pack_linear_weights
    from inference.gguf_quant import gguf_quant_weights, install_quant_weights, tie_embedding_to_head
    from inference.loader import load_model, smollm2_gguf_path
    from inference.quant import quantize_model

    models: dict[str, nn.Module] = {}
    base: dict[str, nn.Module] = {}

    def loaded(dtype: str) -> nn.Module:
        if dtype not in base:
            base[dtype] = load_model("smollm2-135m-instruct", dtype=dtype).model
        return copy.deepcopy(base[dtype])

    gguf: dict[str, object] = {}

    def gguf_weights(head: str | None) -> dict:
        key = head or "same"
        if key not in gguf:
            gguf[key] = gguf_quant_weights(smollm2_gguf_path(), "auto", head_mode=head)[0]  # type: ignore[arg-type]
        return gguf[key]  # type: ignore[return-value]

    for name in names:
        dtype = "float32" if name.startswith("fp32") else "bfloat16"
        m = loaded(dtype)
        if name == "bf16 packed":
            pack_linear_weights(m)
        elif name == "bf16 int8":
            quantize_model(m, "int8")
        elif name == "fp32 w8a8":
            quantize_model(m, "w8a8")
        elif name == "bf16 int4":
            quantize_model(m, "int4", group_size=32)
        elif name in ("bf16 gguf", "fp32 gguf"):
            install_quant_weights(m, gguf_weights(None))
        elif name == "bf16 gguf int8-head":
            install_quant_weights(m, gguf_weights("int8"))
        elif name == "bf16 gguf compact":
            install_quant_weights(m, gguf_weights("int8"))
            tie_embedding_to_head(m)
        models[name] = m
    return models


def time_steps(fn: Callable[[], torch.Tensor], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", default="", help="a variant to profile with torch.profiler")
    ap.add_argument(
        "--ppl-tokens", type=int, default=0, help="also the perplexity of this many tokens of text"
    )
    args = ap.parse_args()
    from inference.model_runner import configure_threads
    from inference.quant import model_weight_bytes

    configure_threads()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    models = build_variants(names)
    fns = {}
    for name, m in models.items():
        fns[name] = step_fn(m, decode_inputs(m, args.context))
        for _ in range(3):
            fns[name]()
    ref = fns[names[0]]().float()
    times: dict[str, list[float]] = {n: [] for n in fns}
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, context {args.context}")
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(time_steps(fn, args.steps))
    base = statistics.median(times[names[0]])
    print(
        f"{'variant':24s} {'ms/step':>8s} {'tok/s':>7s} {'vs ' + names[0]:>10s} {'weights MiB':>12s}"
        f"  logits max|diff| vs {names[0]}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = (fns[name]().float() - ref).abs().max().item()
        mib = model_weight_bytes(models[name]) / 2**20
        print(f"{name:24s} {med * 1e3:8.2f} {1 / med:7.1f} {base / med:9.2f}x {mib:12.1f}  {diff:.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.ppl_tokens:
        ids = text_ids(args.ppl_tokens)
        print(f"\nperplexity of the first {len(ids)} tokens of docs/engine.md (one prefill)")
        for name, m in models.items():
            print(f"  {name:24s} {perplexity(m, ids):8.3f}")
    if args.profile:
        profile(fns[args.profile], args.profile)
    if args.compile:
        compile_decode(models, args)


def profile(fn: Callable[[], torch.Tensor], name: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fn()
    print(f"\nprofile of 20 eager decode steps, {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def static_decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: object, scale: float
) -> torch.Tensor:
    """Decode attention with shapes fixed by the block-table width (no host sync, no data-dependent sizes), so that
    a whole decode step compiles into one graph: gather every block of the (padded) tables, mask past each
    context. The reference backend sizes its gathers from the lengths on the host, which breaks the graph."""
    batch, heads, head_dim = q.shape
    block_size, kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    width = meta.block_tables.shape[1]  # type: ignore[attr-defined]
    ids = meta.block_tables.long().reshape(-1)  # type: ignore[attr-defined]
    length = width * block_size
    k = kv_layer[0].index_select(0, ids).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = kv_layer[1].index_select(0, ids).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    lens = meta.context_lens.long()  # type: ignore[attr-defined]
    mask = (torch.arange(length, device=q.device)[None, :] < lens[:, None]).view(batch, 1, 1, length)
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, head_dim)


def compile_decode(models: dict[str, nn.Module], args: argparse.Namespace) -> None:
    """torch.compile one model's forward for this decode shape: compile time, step time vs eager, graph breaks."""
    from inference import attention as reference
    from inference.attention_backends import REFERENCE, AttentionBackend, set_attention_backend

    name = "bf16 gguf" if "bf16 gguf" in models else next(iter(models))
    m = models[name]
    inputs = decode_inputs(m, args.context)
    eager = step_fn(m, inputs)
    want = eager()
    static = AttentionBackend("static-decode", reference.write_kv, static_decode_attention)
    results = []
    for label, backend, fullgraph in (
        ("reference attention", REFERENCE, False),
        ("static attention", static, True),
    ):
        set_attention_backend(m, backend)
        eager_b = step_fn(m, inputs)
        torch._dynamo.reset()
        # the undecorated forward: its @inference_mode would make the KV cache write fail to compile
        plain_forward = functools.partial(type(m).forward.__wrapped__, m)
        compiled_forward = torch.compile(plain_forward, dynamic=False, fullgraph=fullgraph)
        compiled = step_fn(m, inputs, compiled_forward)
        t0 = time.perf_counter()
        try:
            out = compiled()
        except Exception as exc:  # report, not crash: this is what the benchmark asks
            print(f"\ntorch.compile of {name}, {label}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            compiled()
        te, tc = [], []
        for _ in range(args.rounds):
            te.append(time_steps(eager_b, args.steps))
            tc.append(time_steps(compiled, args.steps))
        same = bool(torch.equal(out.argmax(-1), want.argmax(-1)))
        diff = (out.float() - want.float()).abs().max().item()
        results.append((label, compile_s, statistics.median(te), statistics.median(tc), same, diff))
    set_attention_backend(m, REFERENCE)
    print(
        f"\ntorch.compile of the {name} model's forward (inductor, dynamic=False), batch 1, context {args.context}"
    )
    for label, compile_s, e, c, same, diff in results:
        print(
            f"  {label:20s} first call {compile_s:6.1f} s; eager {e * 1e3:6.2f} ms/step, compiled {c * 1e3:6.2f} "
            f"ms/step ({e / c:.2f}x); same argmax {same}, logits max|diff| {diff:.3f}"
        )


if __name__ == "__main__":
    main()
