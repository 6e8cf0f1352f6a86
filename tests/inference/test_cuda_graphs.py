"""Decode through static buffers (the CUDA-graph path) agrees with eager decode.

Without a GPU the static path runs eagerly (`capture=False`): bucket choice, staging copies, padding rows, output
slicing and the fixed-grid Triton decode launch (under the Triton interpreter) are exactly what a graph replays.
On a CUDA machine the same tests also capture and replay real graphs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

# TRITON_INTERPRET is set in tests/conftest.py where there is no GPU, before anything imports triton
from inference import attention as reference
from inference.attention_backends import AttentionBackend, set_attention_backend
from inference.config import EngineConfig
from inference.cuda_graphs import (
    DecodeGraphRunner,
    cuda_graphs_unsupported,
    graph_batch_sizes,
    largest_graph_batch,
)
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.metadata import AttentionMetadata
from inference.model_config import ModelConfig
from inference.model_runner import ModelRunner, build_host_batch
from inference.models.llama import LlamaForCausalLM
from inference.params import SamplingParams
from inference.sequence import Sequence
from tests.inference.test_hf_equivalence import build_tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAPTURE = DEVICE.type == "cuda"
BLOCK = 4  # small pages: decode crosses page boundaries every few steps
NUM_BLOCKS = 40
MAX_MODEL_LEN = 1024  # the static decode launch is sized for this, not for the step's contexts


def tiny_config(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = dict(
        architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, qk_norm=False, max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=None, eos_token_ids=(), dtype=torch.float32,
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # large enough that attention patterns are far from uniform
    return model.to(DEVICE).eval()


# ---- buckets and support ---------------------------------------------------------------------------------------


def test_batch_size_buckets() -> None:
    assert graph_batch_sizes(256) == (1, 2, 4, 8, *range(16, 257, 8))
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert graph_batch_sizes(5) == (1, 2, 4, 5)
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(4096)[-1] == 256  # capped: bigger batches run eagerly


def test_graphs_only_with_triton_on_cuda() -> None:
    cfg = tiny_config()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs_unsupported(cuda, "triton", cfg) is None
    assert "CUDA device" in (cuda_graphs_unsupported(cpu, "triton", cfg) or "")
    assert "reference" in (cuda_graphs_unsupported(cuda, "reference", cfg) or "")
    dynamic = tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic" in (cuda_graphs_unsupported(cuda, "triton", dynamic) or "")
    assert cuda_graphs_unsupported(cuda, "triton", cfg, enforce_eager=True) == "enforce_eager"


def test_largest_graph_batch_is_what_the_memory_profile_reserves_for() -> None:
    cfg = tiny_config()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def rows(device: torch.device, backend: str, max_num_seqs: int, enforce_eager: bool = False) -> int:
        return largest_graph_batch(
            device, backend, cfg, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager
        )

    assert rows(cuda, "triton", 64) == 64
    assert rows(cuda, "triton", 20) == 20
    assert rows(cuda, "triton", 1024) == 256  # the cap: larger decode batches run eagerly
    assert rows(cuda, "triton", 64, enforce_eager=True) == 0
    assert rows(cuda, "reference", 64) == 0
    assert rows(cpu, "triton", 64) == 0


def test_eager_runner_on_the_cpu_has_no_graphs_and_capture_needs_cuda() -> None:
    model = tiny_llama()
    runner = ModelRunner(
        model, model.config, EngineConfig(block_size=BLOCK, max_num_seqs=8), num_blocks=NUM_BLOCKS
    )
    if not CAPTURE:
        assert runner.decode_graphs is None
        with pytest.raises(ValueError, match="cannot be captured"):
            runner.build_decode_graphs(capture=True)
    eager = ModelRunner(
        model, model.config, EngineConfig(block_size=BLOCK, enforce_eager=True), num_blocks=NUM_BLOCKS
    )
    assert eager.decode_graphs is None


# ---- the static path against eager decode -------------------------------------------------------------------------


class Driver:
    """Steps real Sequences through two runners on identical block tables: greedy tokens come from the first."""

    def __init__(self, prompts: list[list[int]], seed: int = 3) -> None:
        self.free = list(range(1, NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)
        self.seqs = [Sequence(f"s{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]

    def items(self, rows: list[int], chunk: int | None = None) -> list[tuple[Sequence, int]]:
        items = []
        for i in rows:
            seq = self.seqs[i]
            n = min(seq.num_uncomputed_tokens, chunk) if chunk else seq.num_uncomputed_tokens
            end = seq.num_computed_tokens + n
            while len(seq.block_table) * BLOCK < end:  # block tables grow across page boundaries
                seq.block_table.append(self.free.pop())
            items.append((seq, n))
        return items

    def step(
        self, runners: list[ModelRunner], rows: list[int], chunk: int | None = None
    ) -> list[torch.Tensor | None]:
        items = self.items(rows, chunk)
        outs = [runner.run(items) for runner in runners]
        logits, sampling = outs[0]
        for _, other in outs[1:]:
            assert [s.request_id for s in other] == [s.request_id for s in sampling]
        for seq, n in items:
            seq.num_computed_tokens += n
        if logits is not None:
            for seq, token in zip(sampling, logits.argmax(-1).tolist(), strict=True):
                seq.token_ids.append(token)
        return [o[0] for o in outs]

    def used_blocks(self) -> set[int]:
        return {b for s in self.seqs for b in s.block_table}


def test_padded_static_decode_matches_eager_triton() -> None:
    """Triton backend (interpreted on the CPU): the static path, padded to buckets, gives the eager path's logits
    (1e-5) and greedy tokens over decode steps that shrink the batch, pad it, and grow block tables."""
    model = tiny_llama()
    cfg = model.config
    config = EngineConfig(
        block_size=BLOCK,
        attention_backend="triton",
        max_num_seqs=8,
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
    )
    eager = ModelRunner(model, cfg, config, num_blocks=NUM_BLOCKS)
    static = ModelRunner(model, cfg, config, num_blocks=NUM_BLOCKS)
    graphs = static.build_decode_graphs(capture=CAPTURE, batch_sizes=(1, 2, 4, 8))
    rng = random.Random(0)
    # prompt lengths around page edges: 3 and 7 cross a page on the first or second decode, 8 starts a new one
    prompts = [[rng.randrange(1, 96) for _ in range(n)] for n in (3, 7, 8, 13, 2)]
    drv = Driver(prompts)
    drv.step([eager, static], list(range(5)), chunk=6)  # chunked prefill, eager in both
    drv.step([eager, static], list(range(5)))
    assert graphs.replays == 0
    # Poison the null block in both caches: the static path's padding rows write slot 0 before they read it, and
    # no real row may read the null block at all.
    for runner in (eager, static):
        runner.kv_cache[:, :, 0] = float("nan")
    # decode steps of 5 (bucket 8), 5, 4 (no padding), 3 (bucket 4), 2, 1 sequences
    schedule = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 3, 4], [1, 3, 4], [1, 3], [3]]
    grown = 0
    for step, rows in enumerate(schedule, start=1):
        before = sum(len(s.block_table) for s in drv.seqs)
        want, got = drv.step([eager, static], rows)
        grown += sum(len(s.block_table) for s in drv.seqs) > before
        assert want is not None and got is not None and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert graphs.replays == step
    assert grown >= 2, "block tables did not cross page boundaries between static decode steps"
    assert all(len(s.output_token_ids) > 1 for s in drv.seqs)
    untouched = [b for b in range(1, NUM_BLOCKS) if b not in drv.used_blocks()]
    # padding wrote into the null block only: real blocks hold the same K/V as the eager run, unused ones nothing
    used = sorted(drv.used_blocks())
    torch.testing.assert_close(static.kv_cache[:, :, used], eager.kv_cache[:, :, used], atol=1e-5, rtol=0)
    assert not static.kv_cache[:, :, untouched].any()
    assert torch.isfinite(static.kv_cache[:, :, 0, 0]).all(), (
        "padding rows left a non-finite K/V in slot 0 of the null block"
    )


def test_static_path_uses_fixed_buffers_and_a_fixed_launch() -> None:
    """What capture needs: every step of a bucket passes the model the same tensors (same addresses, same shapes)
    and a max_context_len that is the model's bound, not the step's; steps past the largest bucket run eagerly."""
    model = tiny_llama()
    seen: list[tuple[int, int, int, int, int, int]] = []

    def spy(q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        seen.append(
            (
                q.shape[0],
                meta.max_context_len,
                meta.context_lens.data_ptr(),
                meta.block_tables.data_ptr(),
                meta.slot_mapping.data_ptr(),
                meta.block_tables.stride(0),
            )
        )
        return reference.paged_attention(q, kv, meta, scale)

    config = EngineConfig(
        block_size=BLOCK, attention_backend="reference", max_num_seqs=4, max_model_len=MAX_MODEL_LEN
    )
    runner = ModelRunner(model, model.config, config, num_blocks=NUM_BLOCKS)
    graphs = runner.build_decode_graphs(capture=False, batch_sizes=(2, 4))
    set_attention_backend(model, AttentionBackend("spy", reference.write_kv, spy))
    rng = random.Random(1)
    drv = Driver([[rng.randrange(1, 96) for _ in range(n)] for n in (5, 9, 3, 6, 2)])
    drv.step([runner], list(range(5)))
    seen.clear()
    for rows in ([0, 1, 2], [0, 1, 2], [3, 4, 0]):  # bucket 4 with one padding row, three times
        drv.step([runner], rows)
    per_layer = model.config.num_layers
    assert len(seen) == 3 * per_layer
    assert len(set(seen)) == 1, "the static path passed different tensors or shapes between steps"
    rows, bound, ctx_ptr, table_ptr, _, stride = seen[0]
    assert rows == 4 and bound == MAX_MODEL_LEN and stride == graphs.max_blocks == MAX_MODEL_LEN // BLOCK
    assert graphs.replays == 3
    seen.clear()
    drv.step([runner], [0, 1, 2, 3, 4])  # 5 sequences: past the largest bucket, eager
    assert graphs.replays == 3 and seen[0][0] == 5 and seen[0][1] < MAX_MODEL_LEN
    seen.clear()
    host, _ = build_host_batch(drv.items([0, 1]), BLOCK)
    assert graphs.fits(host) and graphs.bucket(2) == 2 and graphs.bucket(3) == 4
    drv.step([runner], [0, 1])  # bucket 2: its own static views, no padding
    assert seen[0][0] == 2 and seen[0][2] == ctx_ptr and seen[0][3] == table_ptr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama-graphs")
    build_tiny_model(folder, "llama", seed=2)
    return load_model(str(folder), dtype="float32", device=DEVICE)


def test_engine_generates_the_same_through_the_static_path(tiny: Any) -> None:
    """The real scheduler (chunked prefill, batches that shrink as requests finish, more requests than the largest
    bucket) through the static decode path: the same greedy tokens as the eager engine."""
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(2, 40))] for _ in range(11)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 20), ignore_eos=True) for _ in prompts
    ]

    def engine(static: bool) -> LLMEngine:
        config = EngineConfig(
            num_blocks=200, block_size=4, max_num_seqs=12, max_num_batched_tokens=64, max_model_len=128
        )
        eng = LLMEngine(tiny, config)
        if static:
            eng.runner.build_decode_graphs(capture=CAPTURE, batch_sizes=(1, 2, 4, 8))
        elif eng.runner.decode_graphs is not None:  # a CUDA machine captures by default: compare with eager
            eng.runner.decode_graphs = None
        return eng

    want = engine(static=False).generate(prompts, params)
    eng = engine(static=True)
    got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    graphs = eng.runner.decode_graphs
    assert graphs is not None and graphs.replays > 10
    assert eng.metrics().batch_size_max > graphs.max_batch  # some steps were too big and ran eagerly


def test_unsupported_step_shapes_do_not_fit() -> None:
    model = tiny_llama()
    kv = torch.zeros(2, 2, NUM_BLOCKS, BLOCK, 2, 16, device=DEVICE)
    graphs = DecodeGraphRunner(
        model, kv, max_num_seqs=4, max_model_len=16, block_size=BLOCK, capture=False, batch_sizes=(4, 1, 2)
    )
    assert graphs.batch_sizes == (1, 2, 4) and graphs.max_blocks == 4
    drv = Driver([[1, 2, 3], [4, 5, 6, 7, 8]])
    prefill, _ = build_host_batch(drv.items([0, 1]), BLOCK)
    assert not graphs.fits(prefill)
    for seq in drv.seqs:
        seq.num_computed_tokens = seq.num_tokens - 1
    decode, _ = build_host_batch(drv.items([0, 1]), BLOCK)
    assert graphs.fits(decode)
    long = drv.seqs[1]
    long.token_ids += list(range(12))  # 17 tokens > max_model_len: its table is wider than the static one
    long.num_computed_tokens = long.num_tokens - 1
    too_long, _ = build_host_batch(drv.items([0, 1]), BLOCK)
    assert not graphs.fits(too_long)
