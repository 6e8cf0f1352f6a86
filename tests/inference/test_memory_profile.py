"""KV cache sizing from a profiled step: the budget arithmetic with numbers, the dummy batch's shape, the
profiling step on a real tiny model (CPU), and the profiled engine on a GPU when one is present."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import EngineError, KVBudgetError
from inference.loader import load_model
from inference.memory_profile import (
    LoRAReserve,
    MemoryProfile,
    StepLimits,
    blocks_for_profile,
    dummy_metadata,
    dummy_query_lens,
    kv_cache_budget,
    lora_reserve,
    run_decode_profile_step,
    run_profile_step,
)
from inference.model_config import ModelConfig
from inference.params import SamplingParams
from tests.inference.test_hf_equivalence import build_tiny_model

GiB = 2**30
MiB = 2**20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama-profile")
    build_tiny_model(folder, "llama", seed=3)
    return load_model(str(folder), dtype="float32")


def test_budget_is_utilization_share_minus_peak_and_non_torch_memory() -> None:
    # an 80 GiB card: 1200 MiB of weights, a 3 GiB peak, 512 MiB of CUDA context outside torch
    profile = MemoryProfile(
        total=80 * GiB,
        free=80 * GiB - 1712 * MiB,
        torch_peak=3 * GiB,
        torch_reserved=1200 * MiB,
        weights=1200 * MiB,
    )
    assert profile.non_torch == 512 * MiB
    assert profile.activations == 3 * GiB - 1200 * MiB
    assert kv_cache_budget(profile, 0.9) == int(80 * GiB * 0.9) - 3 * GiB - 512 * MiB
    assert kv_cache_budget(profile, 0.5) == 40 * GiB - 3 * GiB - 512 * MiB
    # another process holding 20 GiB comes out of our share as well
    busy = MemoryProfile(
        total=80 * GiB, free=80 * GiB - 20 * GiB - 1712 * MiB, torch_peak=3 * GiB, torch_reserved=1200 * MiB
    )
    assert busy.non_torch == 20 * GiB + 512 * MiB
    assert kv_cache_budget(busy, 0.9) == kv_cache_budget(profile, 0.9) - 20 * GiB
    # the decode graphs' pool is kept for the engine's life, so it comes out of the share too
    graphs = dataclasses.replace(profile, graph_pool=96 * MiB)
    assert kv_cache_budget(graphs, 0.9) == kv_cache_budget(profile, 0.9) - 96 * MiB
    # and so do the Triton LoRA buffers and scratch, made after the cache
    lora = dataclasses.replace(graphs, lora=130 * MiB)
    assert kv_cache_budget(lora, 0.9) == kv_cache_budget(graphs, 0.9) - 130 * MiB
    # torch holding more than the driver reports used (rounding) never makes non-torch memory negative
    odd = MemoryProfile(total=10 * GiB, free=9 * GiB, torch_peak=GiB, torch_reserved=2 * GiB)
    assert odd.non_torch == 0


def test_blocks_for_profile_and_the_error_naming_the_utilization() -> None:
    profile = MemoryProfile(total=16 * GiB, free=14 * GiB, torch_peak=2 * GiB, torch_reserved=2 * GiB)
    per_block = 16 * 114_688  # Qwen3-0.6B in bf16: 112 KiB of K and V per token
    blocks = blocks_for_profile(
        profile, gpu_memory_utilization=0.9, bytes_per_block=per_block, block_size=16, max_model_len=4096
    )
    assert blocks == (int(16 * GiB * 0.9) - 2 * GiB) // per_block
    assert blocks * per_block <= 0.9 * 16 * GiB - 2 * GiB
    with pytest.raises(KVBudgetError) as info:
        blocks_for_profile(
            profile, gpu_memory_utilization=0.13, bytes_per_block=per_block, block_size=16, max_model_len=4096
        )
    assert "gpu_memory_utilization 0.13" in info.value.reason
    assert "LoRA" not in info.value.reason and "lora" not in (info.value.hint or "")  # none reserved
    assert "gpu_memory_utilization" in (info.value.hint or "")
    # a LoRA reserve that leaves too little is named, with the settings that shrink it
    lora = dataclasses.replace(profile, lora=int(12.3 * GiB))
    with pytest.raises(KVBudgetError) as info:
        blocks_for_profile(
            lora, gpu_memory_utilization=0.9, bytes_per_block=per_block, block_size=16, max_model_len=4096
        )
    assert "the LoRA buffers (12.30 GiB)" in info.value.reason
    assert "max_lora_rank" in (info.value.hint or "") and "lora_kernels" in (info.value.hint or "")
    # a negative budget (the weights alone exceed the share) is the same clear error, not a crash
    with pytest.raises(KVBudgetError, match="leaves -"):
        blocks_for_profile(
            profile, gpu_memory_utilization=0.05, bytes_per_block=per_block, block_size=16, max_model_len=16
        )
    # exactly one maximal request (its blocks plus the null block) is enough
    need = 4096 // 16 + 1
    tight = MemoryProfile(total=10 * GiB, free=10 * GiB, torch_peak=0, torch_reserved=0)
    assert (
        blocks_for_profile(
            tight,
            gpu_memory_utilization=need * per_block / (10 * GiB) + 1e-12,
            bytes_per_block=per_block,
            block_size=16,
            max_model_len=4096,
        )
        == need
    )


def qwen3_06b(dtype: torch.dtype = torch.bfloat16) -> ModelConfig:
    """Qwen3-0.6B's shapes (its config.json): 28 layers, hidden 1024, MLP 3072, 16 query and 8 KV heads of 128."""
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
        bos_token_id=None,
        eos_token_ids=(151645,),
        dtype=dtype,
    )


def test_lora_reserve_counts_the_triton_buffers_and_scratch() -> None:
    """The Triton LoRA path's bytes from the shapes alone: per layer and slot, `R * (in + out)` for each fused
    projection (qkv_proj 1024 -> 2048 + 2 * 1024 with 3 * rank columns, o_proj 2048 -> 1024, gate_up_proj 1024 ->
    2 * 3072 with 2 * rank, down_proj 3072 -> 1024), columns rounded up to 16; plus fp32 `h` of the widest."""
    cfg = qwen3_06b()
    per_layer = 48 * (1024 + 4096) + 16 * (2048 + 1024) + 32 * (1024 + 6144) + 16 * (3072 + 1024)
    limits = StepLimits(EngineConfig(max_loras=4, max_lora_rank=16), 4096, decode_graph_rows=64)
    reserve = lora_reserve(cfg, limits)
    assert reserve == LoRAReserve(
        buffers=4 * 28 * per_layer * 2,  # 4 slots, bf16
        step=2048 * 48 * 4 + (2048 + 2 * 4) * 4,  # max_num_batched_tokens rows of qkv's h, the rows by slot
        graphs=64 * 48 * 4 + (64 + 2 * 4) * 4,  # the largest bucket's h, the static rows
    )
    assert reserve.buffers == 132_120_576  # the "about 132 MB" of docs/adapters.md
    assert reserve.total == reserve.buffers + reserve.step + reserve.graphs
    # rank 8: qkv's 24 columns round up to 32, gate_up's 16 and the others' 8 to 16
    small = lora_reserve(cfg, dataclasses.replace(limits, config=EngineConfig(max_lora_rank=8)))
    per_layer8 = 32 * (1024 + 4096) + 16 * (2048 + 1024) + 16 * (1024 + 6144) + 16 * (3072 + 1024)
    assert small.buffers == 4 * 28 * per_layer8 * 2
    assert small.step == 2048 * 32 * 4 + (2048 + 8) * 4
    # slots and element size scale the buffers; no decode graphs, no LoRA graphs
    eager = StepLimits(EngineConfig(max_loras=2, max_lora_rank=16), 4096)
    fp32 = lora_reserve(qwen3_06b(torch.float32), eager)
    assert fp32.buffers == 2 * 28 * per_layer * 4 and fp32.graphs == 0


def test_dummy_query_lens() -> None:
    assert dummy_query_lens(2048, 64, 4096) == [2048]
    assert dummy_query_lens(2048, 64, 512) == [512, 512, 512, 512]
    assert dummy_query_lens(2000, 64, 512) == [512, 512, 512, 464]
    assert dummy_query_lens(8192, 2, 1024) == [1024, 1024]  # capped by max_num_seqs


def test_dummy_metadata_points_everything_at_the_null_block() -> None:
    positions, meta = dummy_metadata([5, 3], context_len=40, block_size=16, device=torch.device("cpu"))
    assert positions.tolist() == list(range(35, 40)) + list(range(37, 40))
    assert meta.query_start_loc.tolist() == [0, 5, 8]
    assert meta.context_lens.tolist() == [40, 40]
    assert meta.block_tables.shape == (2, 3) and int(meta.block_tables.abs().sum()) == 0
    assert int(meta.slot_mapping.max()) < 16  # every write lands in block 0
    assert meta.max_query_len == 5 and meta.max_context_len == 40


def test_profile_step_runs_the_full_budget_on_a_one_block_cache(tiny: Any) -> None:
    model, cfg = tiny.model, tiny.config
    seen: list[tuple[int, ...]] = []
    hook = model.embed_tokens.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    caches: list[tuple[int, ...]] = []
    layer0 = model.layers[0].self_attn
    original = layer0.forward

    def spy(x: torch.Tensor, rope: Any, meta: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        caches.append(tuple(kv_layer.shape))
        return original(x, rope, meta, kv_layer)

    layer0.forward = spy
    try:
        limits = StepLimits(EngineConfig(max_num_batched_tokens=96, max_num_seqs=5, block_size=16), 64)
        ids = run_profile_step(model, cfg, limits)
    finally:
        hook.remove()
        del layer0.forward
    assert seen == [(96,)]  # one forward over the whole token budget
    assert caches == [(2, 1, 16, cfg.num_kv_heads, cfg.head_dim)]  # only the scratch null block
    assert len(ids) == 5 and all(0 <= t < cfg.vocab_size for t in ids)  # max_num_seqs rows sampled


def test_decode_profile_step_is_one_token_per_row_at_the_graphs_context_bound(tiny: Any) -> None:
    model, cfg = tiny.model, tiny.config
    calls: list[tuple[Any, ...]] = []
    layer0 = model.layers[0].self_attn
    original = layer0.forward

    def spy(x: torch.Tensor, rope: Any, meta: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], meta.max_query_len, meta.max_context_len, tuple(kv_layer.shape)))
        return original(x, rope, meta, kv_layer)

    layer0.forward = spy
    try:
        hidden = run_decode_profile_step(model, cfg, rows=6, max_model_len=64, block_size=16)
    finally:
        del layer0.forward
    assert hidden.shape == (6, cfg.hidden_size) and bool(torch.isfinite(hidden).all())
    # six decode rows, sized for the widest split-KV launch, against the one-block scratch cache only
    assert calls == [(6, 1, 64, (2, 1, 16, cfg.num_kv_heads, cfg.head_dim))]


def test_profile_bookkeeping_with_torch_cuda_statistics_faked(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """profile_cuda_memory and plan_cuda_kv_blocks end to end on the CPU: the steps run on the tiny model, and only
    torch.cuda's memory statistics are stand-ins (weights 100 MiB, prefill peak 900 MiB, decode peak 40 MiB above
    what was allocated before it, 2 GiB of 16 GiB in use outside torch)."""
    import contextlib

    from inference import memory_profile as mp

    allocated = iter([100 * MiB, 120 * MiB])  # before the prefill step, before the decode step
    peaks = iter([900 * MiB, 160 * MiB])
    decode_rows: list[int] = []
    real_decode = mp.run_decode_profile_step

    def decode_spy(*args: Any, rows: int, **kwargs: Any) -> torch.Tensor:
        decode_rows.append(rows)
        return real_decode(*args, rows=rows, **kwargs)

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 1 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (13 * GiB, 16 * GiB))
    monkeypatch.setattr(mp, "run_decode_profile_step", decode_spy)
    config = EngineConfig(
        max_num_batched_tokens=64, max_num_seqs=4, block_size=16, gpu_memory_utilization=0.5
    )
    limits = mp.StepLimits(config, max_model_len=64, decode_graph_rows=4)
    profile = mp.profile_cuda_memory(tiny.model, tiny.config, limits)
    assert decode_rows == [4]
    assert profile == MemoryProfile(
        total=16 * GiB,
        free=13 * GiB,
        torch_peak=900 * MiB,
        torch_reserved=GiB,
        weights=100 * MiB,
        graph_pool=40 * MiB,
    )
    assert profile.non_torch == 2 * GiB
    allocated, peaks = iter([100 * MiB, 120 * MiB]), iter([900 * MiB, 160 * MiB])
    blocks = mp.plan_cuda_kv_blocks(tiny.model, tiny.config, limits)
    per_block = tiny.config.kv_bytes_per_token() * 16
    assert blocks == (8 * GiB - 900 * MiB - 40 * MiB - 2 * GiB) // per_block
    # without decode graphs there is no decode step and no reserve
    allocated, peaks = iter([100 * MiB]), iter([900 * MiB])
    eager = mp.profile_cuda_memory(tiny.model, tiny.config, dataclasses.replace(limits, decode_graph_rows=0))
    assert eager.graph_pool == 0 and decode_rows == [4, 4]
    # adapters on the Triton kernels: their buffers and scratch come out of the share ("auto" above is torch here,
    # on the CPU; "triton" is what CUDA with triton installed gets); fewer blocks, by exactly those bytes
    triton = dataclasses.replace(limits, config=dataclasses.replace(config, lora_kernels="triton"))
    reserve = mp.lora_reserve(tiny.config, triton)
    assert reserve.buffers > 0 and reserve.graphs > 0
    allocated, peaks = iter([100 * MiB, 120 * MiB]), iter([900 * MiB, 160 * MiB])
    with_lora = mp.profile_cuda_memory(tiny.model, tiny.config, triton)
    assert with_lora == dataclasses.replace(profile, lora=reserve.total)
    allocated, peaks = iter([100 * MiB, 120 * MiB]), iter([900 * MiB, 160 * MiB])
    lora_blocks = mp.plan_cuda_kv_blocks(tiny.model, tiny.config, triton)
    assert lora_blocks == (8 * GiB - 900 * MiB - 40 * MiB - reserve.total - 2 * GiB) // per_block < blocks
    torch_path = dataclasses.replace(limits, config=dataclasses.replace(config, lora_kernels="torch"))
    allocated, peaks = iter([100 * MiB, 120 * MiB]), iter([900 * MiB, 160 * MiB])
    assert mp.profile_cuda_memory(tiny.model, tiny.config, torch_path).lora == 0


def test_engine_validates_utilization_and_keeps_cpu_sizing(tiny: Any) -> None:
    with pytest.raises(EngineError, match="gpu_memory_utilization"):
        EngineConfig(num_blocks=64, gpu_memory_utilization=1.5)
    with pytest.raises(EngineError, match="gpu_memory_utilization"):
        EngineConfig(num_blocks=64, gpu_memory_utilization=0)
    # the CPU ignores the utilization: the byte budget decides, as before
    a = LLMEngine(tiny, EngineConfig(kv_cache_memory=4 * MiB, max_model_len=256, gpu_memory_utilization=0.1))
    b = LLMEngine(tiny, EngineConfig(kv_cache_memory=4 * MiB, max_model_len=256))
    assert a.runner.num_blocks == b.runner.num_blocks == 4 * MiB // (tiny.config.kv_bytes_per_token() * 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_profiled_engine_on_cuda(tmp_path: Path) -> None:
    build_tiny_model(tmp_path, "llama", seed=3)
    gpu = load_model(str(tmp_path), dtype="float32", device="cuda")
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # a share that leaves about 256 MiB beyond what is in use now (CUDA context, weights, other processes)
    utilization = (total - free + 256 * MiB) / total
    engine = LLMEngine(gpu, EngineConfig(max_model_len=256, gpu_memory_utilization=utilization))
    kv = engine.runner.kv_cache_bytes
    assert 64 * MiB <= kv <= 256 * MiB, kv / MiB  # the tiny model's step needs far less than 192 MiB
    cpu = LLMEngine(
        load_model(str(tmp_path), dtype="float32", device="cpu"),
        EngineConfig(num_blocks=64, max_model_len=256),
    )
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 40))
    assert engine.generate([prompt], params)[0].token_ids == cpu.generate([prompt], params)[0].token_ids
    with pytest.raises(KVBudgetError, match="gpu_memory_utilization"):
        LLMEngine(gpu, EngineConfig(max_model_len=256, gpu_memory_utilization=(total - free) / total / 2))
