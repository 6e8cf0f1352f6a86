"""torch.compile of the CPU decode step, measured against eager: SmolLM2's packaged GGUF (the default int4/int8
load), one sequence, one new token at a fixed context.

Run `python -m benchmarks.compiled_decode [--context 128] [--steps 30] [--rounds 5] [--variants ...]`. Not in the
engine yet: this is the measurement that decides how to build it (docs/quant_notes.md, "torch.compile of the decode
step"). Every variant compiles the model's undecorated forward (`inference_mode` cannot be compiled around a write
to the KV cache) with `fullgraph=True`, `dynamic=False` and `emulate_precision_casts` (without it bf16 logits drift
and the argmax can change), and uses a static-shape decode attention (every block of the table gathered, positions
past the context masked: the reference attention sizes its gathers on the host, which breaks the graph):

- `static`: the KV cache write as plain `index_copy_` in the graph;
- `static+kv-op`: the write as a custom op that declares its mutation of the cache layer, so that the graph does not
  functionalize the write into copies of the cache.

Prints each variant's first-call (compile) seconds, eager and compiled ms per step (alternating rounds, medians),
their ratio, whether the argmax matches eager and the largest logit difference. Exits 0; a variant that fails to
compile is reported, not raised.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from inference import attention as reference
from inference.attention_backends import REFERENCE, AttentionBackend, set_attention_backend
from inference.metadata import AttentionMetadata

VARIANTS = ("static", "static+kv-op")


def static_decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode attention with shapes fixed by the block table's width: no host sync, no data-dependent sizes."""
    batch, heads, head_dim = q.shape
    block_size, kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    length = meta.block_tables.shape[1] * block_size
    ids = meta.block_tables.long().reshape(-1)
    k = kv_layer[0].index_select(0, ids).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = kv_layer[1].index_select(0, ids).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    mask = torch.arange(length, device=q.device)[None, :] < meta.context_lens.long()[:, None]
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg, k, v, attn_mask=mask.view(batch, 1, 1, length), scale=scale
    )
    return out.reshape(batch, heads, head_dim)


@torch.library.custom_op("agent_runtime_bench::write_kv", mutates_args=("kv_layer",))
def write_kv_op(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """The reference KV write, opaque to the compiler, with its mutation of `kv_layer` declared."""
    reference.write_kv(kv_layer, k, v, slot_mapping)


def decode_inputs(model: Any, context: int, block_size: int = 16) -> tuple[Any, ...]:
    """(input ids, positions, metadata, KV cache): one sequence, its token at position `context - 1`, blocks 1.. of
    a zeroed cache (block 0 is the null block)."""
    from inference.model_runner import allocate_kv_cache

    blocks = -(-context // block_size)
    kv = allocate_kv_cache(model.config, blocks + 1, block_size, torch.device("cpu"))
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
    return torch.tensor([1234]), torch.tensor([pos]), meta, kv


def stepper(model: Any, forward: Callable[..., torch.Tensor], inputs: tuple[Any, ...], eager: bool) -> Any:
    ids, positions, meta, kv = inputs

    def step() -> torch.Tensor:
        meta.backend_cache = None
        with torch.inference_mode() if eager else torch.no_grad():
            logits: torch.Tensor = model.compute_logits(forward(ids, positions, meta, kv))
            return logits

    return step


def ms_per_step(step: Callable[[], torch.Tensor], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    from inference.loader import load_model, smollm2_gguf_path
    from inference.model_runner import configure_threads

    threads = configure_threads()
    torch._inductor.config.emulate_precision_casts = True
    model = load_model(smollm2_gguf_path(), dtype="bfloat16").model
    inputs = decode_inputs(model, args.context)
    want = stepper(model, model, inputs, eager=True)()
    plain_forward = functools.partial(type(model).forward.__wrapped__, model)  # type: ignore[attr-defined]
    load = os.getloadavg()[0]
    print(
        f"SmolLM2-135M GGUF (int4 layers, int8 head), bf16, batch 1, context {args.context}, {threads} threads"
    )
    print(
        f"{'variant':14s} {'compile s':>9s} {'eager ms':>9s} {'compiled':>9s} {'ratio':>6s}  same argmax, max|diff|"
    )
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        write = write_kv_op if name == "static+kv-op" else reference.write_kv
        set_attention_backend(model, AttentionBackend(name, write, static_decode_attention))
        eager = stepper(model, model, inputs, eager=True)
        torch._dynamo.reset()
        compiled = stepper(
            model, torch.compile(plain_forward, dynamic=False, fullgraph=True), inputs, eager=False
        )
        t0 = time.perf_counter()
        try:
            out = compiled()
        except Exception as exc:  # reported: whether it compiles is what this measures
            print(f"{name:14s} failed to compile: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            compiled()
        eager_ms, compiled_ms = [], []
        for _ in range(args.rounds):
            eager_ms.append(ms_per_step(eager, args.steps))
            compiled_ms.append(ms_per_step(compiled, args.steps))
        e, c = statistics.median(eager_ms), statistics.median(compiled_ms)
        same = bool(torch.equal(out.argmax(-1), want.argmax(-1)))
        diff = (out.float() - want.float()).abs().max().item()
        print(f"{name:14s} {compile_s:9.1f} {e:9.2f} {c:9.2f} {e / c:5.2f}x  {same}, {diff:.4f}")
    set_attention_backend(model, REFERENCE)
    print(f"load average {load:.1f}-{os.getloadavg()[0]:.1f} (shared cores: compare within this table only)")


if __name__ == "__main__":
    main()
