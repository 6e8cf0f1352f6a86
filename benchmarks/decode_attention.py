"""Per-call time of the CPU decode attention (one query row per sequence over a paged KV cache).

Run `python -m benchmarks.decode_attention [--keys 128,512,2000] [--rows 1,4] [--rounds 5] [--dtype bfloat16]`.
Shapes: SmolLM2-135M (9 heads, 3 KV heads), Qwen2.5-0.5B (14, 2) and Llama-3.2-1B (32, 8), head size 64, blocks
of 16 scattered over the cache. Variants, in alternating rounds (mean microseconds per call, since on shared cores
the stalls are the point):

- `pooled`: `inference.attention.paged_attention` with every group on the intra-op thread pool (SDPA's CPU flash
  kernel), the decode path before small groups ran on one thread;
- `ours`: `paged_attention` as it is (groups up to `SERIAL_DECODE_PAIRS` query-key pairs on one thread);
- `bmm f32`: the gathered K/V cast to float32, GQA as `[kv_heads, group, dim]` query rows, two batched matmuls and
  a softmax (the textbook alternative to a fused kernel), on the pool.

The last column is `pooled / ours`. Exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {"smollm2-135m": (9, 3), "qwen2.5-0.5b": (14, 2), "llama-3.2-1b": (32, 8)}
HEAD_DIM = 64
BLOCK = 16


def _case(
    rows: int, keys: int, heads: int, kv_heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
    from inference.metadata import AttentionMetadata

    per_row = -(-keys // BLOCK)
    num_blocks = rows * per_row + 1
    gen = torch.Generator().manual_seed(rows * 7919 + keys)
    kv = torch.randn(2, num_blocks, BLOCK, kv_heads, HEAD_DIM, generator=gen).to(dtype)
    tables = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(rows, per_row)
    q = torch.randn(rows, heads, HEAD_DIM, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(rows, dtype=torch.int64),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        context_lens=torch.full((rows,), keys, dtype=torch.int32),
        block_tables=tables.to(torch.int32),
        max_query_len=1,
        max_context_len=keys,
        block_size=BLOCK,
    )
    return q, kv, meta, tables


def bmm_f32(q: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor, keys: int, scale: float) -> torch.Tensor:
    rows, heads, dim = q.shape
    kv_heads = kv.shape[3]
    out = torch.empty_like(q)
    for r in range(rows):
        ids = tables[r]
        k = kv[0].index_select(0, ids).view(-1, kv_heads, dim)[:keys].float()
        v = kv[1].index_select(0, ids).view(-1, kv_heads, dim)[:keys].float()
        qg = q[r].view(kv_heads, heads // kv_heads, dim).float()
        p = torch.softmax(torch.bmm(qg, k.permute(1, 2, 0)).mul_(scale), -1)
        out[r] = torch.bmm(p, v.transpose(0, 1)).view(heads, dim).to(q.dtype)
    return out


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(
    rows: int, keys: int, heads: int, kv_heads: int, dtype: torch.dtype, rounds: int
) -> dict[str, float]:
    """Mean us per call of each variant, in alternating rounds."""
    from inference import attention

    q, kv, meta, tables = _case(rows, keys, heads, kv_heads, dtype)
    serial_pairs = attention.SERIAL_DECODE_PAIRS
    scale = HEAD_DIM**-0.5

    def paged(pairs: int) -> object:
        attention.SERIAL_DECODE_PAIRS = pairs  # read per call; the step's plan (cached on `meta`) is shared
        return attention.paged_attention(q, kv, meta, scale)  # type: ignore[arg-type]

    variants: dict[str, Callable[[], object]] = {
        "pooled": lambda: paged(-1),
        "ours": lambda: paged(serial_pairs),
        "bmm f32": lambda: bmm_f32(q, kv, tables, keys, scale),
    }
    calls = max(5, min(200, 400_000 // (rows * keys * heads)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                times[name].append(per_call_us(fn, calls))
    finally:
        attention.SERIAL_DECODE_PAIRS = serial_pairs
    return {name: statistics.mean(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", default="128,512,2000")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()
    from inference.model_runner import configure_threads

    configure_threads()
    dtype = getattr(torch, args.dtype)
    loads = [os.getloadavg()[0]]
    print(
        f"{torch.get_num_threads()} threads, {args.dtype}, mean us per call over {args.rounds} alternating rounds"
    )
    print(
        f"{'shape':14s} {'rows':>4s} {'keys':>5s} {'pooled':>8s} {'ours':>8s} {'bmm f32':>8s} {'pooled/ours':>11s}"
    )
    for shape, (heads, kv_heads) in SHAPES.items():
        for rows in (int(r) for r in args.rows.split(",")):
            for keys in (int(k) for k in args.keys.split(",")):
                mean = measure(rows, keys, heads, kv_heads, dtype, args.rounds)
                print(
                    f"{shape:14s} {rows:4d} {keys:5d} {mean['pooled']:8.1f} {mean['ours']:8.1f} "
                    f"{mean['bmm f32']:8.1f} {mean['pooled'] / mean['ours']:10.2f}x",
                    flush=True,
                )
                loads.append(os.getloadavg()[0])
    print(f"load average {min(loads):.1f}-{max(loads):.1f} (shared cores: compare within this table only)")


if __name__ == "__main__":
    main()
