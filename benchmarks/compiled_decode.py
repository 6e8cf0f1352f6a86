"""The engine's compiled CPU decode step (inference/compiled_decode.py) and its fused one (inference/fused_decode.py)
against its eager step, per step: SmolLM2's packaged GGUF (the default int4/int8 load), one or more rows at a fixed
context, logits included.

Run `python -m benchmarks.compiled_decode [--context 128] [--rows 1,4] [--steps 30] [--rounds 5]`. Prints the
compile time at start (`CompiledDecode.warm_up`: both graphs; seconds, so a warm inductor disk cache shows), then
per row count the eager, compiled and fused ms per step (alternating rounds, medians), the ratios to eager, whether
each argmax matches eager's and the largest logit difference. Exits 0; a compile that fails is reported, not
raised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from inference.metadata import AttentionMetadata

if TYPE_CHECKING:
    from inference.compiled_decode import CompiledDecode
    from inference.model_runner import ModelRunner


def decode_inputs(
    rows: int, context: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], AttentionMetadata]]:
    """(input ids, positions, a metadata factory) for `rows` sequences at `context` tokens, each new token at
    position `context - 1`, row r on its own blocks after the null block. The KV there is whatever is in the cache
    (zeros at start): the time does not depend on it."""
    blocks = -(-context // block_size)
    pos = context - 1
    tables = torch.arange(1, rows * blocks + 1, dtype=torch.int32).reshape(rows, blocks)
    slots = tables[:, pos // block_size].long() * block_size + pos % block_size

    def meta() -> AttentionMetadata:  # a fresh one per step, as the runner builds it
        return AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
            context_lens=torch.full((rows,), context, dtype=torch.int32),
            block_tables=tables.clone(),
            max_query_len=1,
            max_context_len=context,
            block_size=block_size,
        )

    return torch.full((rows,), 1234), torch.full((rows,), pos), meta


def ms_per_step(step: Callable[[], torch.Tensor], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def compare(
    runner: ModelRunner, compiled: CompiledDecode, rows: int, context: int, steps: int, rounds: int
) -> tuple[float, float, float, bool, float, bool, float]:
    """Median eager, compiled and fused ms per step (logits included; fused NaN where it does not serve) over
    alternating rounds; for compiled and then fused, whether the argmax is eager's and the largest logit
    difference."""
    model = runner.model
    ids, positions, meta = decode_inputs(rows, context, runner.block_size)
    fused = runner.fused

    @torch.inference_mode()
    def eager() -> torch.Tensor:
        logits: torch.Tensor = model.compute_logits(model(ids, positions, meta(), runner.kv_cache))
        return logits

    @torch.inference_mode()
    def fast() -> torch.Tensor:
        hidden = compiled.run(ids, positions, meta())
        assert hidden is not None, compiled.failed
        logits: torch.Tensor = model.compute_logits(hidden)
        return logits

    @torch.inference_mode()
    def one_call() -> torch.Tensor:
        assert fused is not None
        hidden = fused.run(ids, positions, meta())
        assert hidden is not None, fused.failed
        logits: torch.Tensor = model.compute_logits(hidden)
        return logits

    want, got = eager(), fast()
    got_fused = one_call() if fused is not None else want
    eager_ms, compiled_ms, fused_ms = [], [], []
    for _ in range(rounds):
        eager_ms.append(ms_per_step(eager, steps))
        compiled_ms.append(ms_per_step(fast, steps))
        if fused is not None:
            fused_ms.append(ms_per_step(one_call, steps))
    return (
        statistics.median(eager_ms),
        statistics.median(compiled_ms),
        statistics.median(fused_ms) if fused_ms else float("nan"),
        bool(torch.equal(got.argmax(-1), want.argmax(-1))),
        (got - want).abs().max().item(),
        bool(torch.equal(got_fused.argmax(-1), want.argmax(-1))),
        (got_fused - want).abs().max().item(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rows", default="1,4", help="row counts to measure, each 1-8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model, smollm2_gguf_path

    engine = LLMEngine(
        load_model(smollm2_gguf_path(), dtype="bfloat16"),
        EngineConfig(kv_cache_memory=256 * 2**20, max_model_len=2048, max_num_seqs=8),
    )
    runner = engine.runner
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    compiled = runner.build_compiled_decode()
    if compiled is None:
        print("compiled decode failed to build (see the compiled_decode_* log line): nothing to compare")
        return
    print(
        f"SmolLM2-135M GGUF (int4 layers, int8 head), bf16, context {args.context}, {torch.get_num_threads()} "
        f"threads; compiled at start in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"{'rows':>4s} {'eager ms':>9s} {'compiled':>9s} {'ratio':>6s} {'fused':>9s} {'ratio':>6s}  "
        "same argmax, max|diff| (compiled; fused)"
    )
    for rows in [int(r) for r in args.rows.split(",") if r.strip()]:
        if not 1 <= rows <= compiled.max_rows:
            raise SystemExit(f"--rows takes 1-{compiled.max_rows}, got {rows}")
        e, c, f, same, diff, same_f, diff_f = compare(
            runner, compiled, rows, args.context, args.steps, args.rounds
        )
        print(
            f"{rows:4d} {e:9.2f} {c:9.2f} {e / c:5.2f}x {f:9.2f} {e / f:5.2f}x  "
            f"{same}, {diff:.4f}; {same_f}, {diff_f:.4f}"
        )
    print(f"load average {load:.1f}-{os.getloadavg()[0]:.1f} (shared cores: compare within this table only)")


if __name__ == "__main__":
    main()
