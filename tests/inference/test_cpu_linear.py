"""oneDNN-packed bf16 linear weights on the CPU (inference/cpu_linear.py): bit-identical to F.linear, everywhere
the engine uses them, or not used at all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference import cpu_linear, envs
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.metadata import AttentionMetadata
from inference.model_runner import ModelRunner
from inference.models.llama import LlamaForCausalLM
from inference.params import OutputKind, SamplingParams
from tests.inference.test_cuda_graphs import tiny_config

# Only the kernel tests need a CPU that packs; the fallback test below runs everywhere.
needs_packing = pytest.mark.skipif(
    not cpu_linear.packing_supported(),
    reason="this CPU or torch build cannot pack bf16 weights (oneDNN needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)",
)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (17, 576), (300, 576), (2, 5, 576)])
def test_packed_linear_is_bit_identical_to_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(960, 576, generator=gen).to(torch.bfloat16)
    b = torch.randn(960, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    got = cpu_linear.packed_linear(x, cpu_linear.pack_weight(w), b)
    assert got.shape == (*shape[:-1], 960) and got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x, w, b))


def _model(tie: bool, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_config(tie_word_embeddings=tie, attention_bias=True, dtype=dtype)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    """A prefill of two sequences (5 and 3 tokens) through the reference attention: logits of every token."""
    cfg = model.config
    kv = torch.zeros(2, cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([4, 5, 6, 7, 8, 12, 13, 14]),
        query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32),
        context_lens=torch.tensor([5, 3], dtype=torch.int32),
        block_tables=torch.tensor([[1, 2], [3, 0]], dtype=torch.int32),
        max_query_len=5,
        max_context_len=5,
        block_size=4,
    )
    ids = torch.tensor([3, 17, 40, 2, 9, 60, 61, 5])
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    return model.compute_logits(model(ids, positions, meta, kv))


@needs_packing
@pytest.mark.parametrize("tie", [False, True], ids=["own-head", "tied-head"])
def test_packed_model_gives_the_same_logits(tie: bool) -> None:
    model = _model(tie, torch.bfloat16)
    want = _logits(model)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert cpu_linear.pack_linear_weights(model) == linears + int(tie)
    assert all(m.weight.is_mkldnn for m in model.modules() if isinstance(m, nn.Linear))
    assert (model.packed_head is not None) == tie
    assert not model.embed_tokens.weight.is_mkldnn  # the lookup keeps the plain table
    assert torch.equal(_logits(model), want)
    assert cpu_linear.pack_linear_weights(model) == 0  # idempotent: a second engine on the same model


@needs_packing
def test_only_bf16_on_the_cpu_and_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = _model(False, torch.float32)
    assert (
        cpu_linear.pack_linear_weights(fp32) == 0
    )  # packing changes fp32 sums: the oracle dtype stays plain
    monkeypatch.setenv(envs.CPU_PACKED_LINEAR, "0")
    bf16 = _model(True, torch.bfloat16)
    ModelRunner(bf16, bf16.config, EngineConfig(block_size=4), num_blocks=8)
    assert not any(m.weight.is_mkldnn for m in bf16.modules() if isinstance(m, nn.Linear))
    assert bf16.packed_head is None
    monkeypatch.delenv(envs.CPU_PACKED_LINEAR)
    # the runner packs a CPU bf16 model
    ModelRunner(bf16, bf16.config, EngineConfig(block_size=4), num_blocks=8)
    assert bf16.packed_head is not None


@needs_packing
@pytest.mark.smollm2
def test_smollm2_generates_the_same_tokens_packed_and_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded model in bf16, greedy: the engine's tokens with packed weights equal those with plain ones."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY)
    prompts = ["The capital of France is", "def fibonacci(n):", "Tokyo weather today"]
    runs = []
    for enabled in ("0", "1"):
        monkeypatch.setenv(envs.CPU_PACKED_LINEAR, enabled)
        # float weights: quantize "auto" would keep the GGUF's int4 blocks (nothing to pack)
        loaded = load_model("smollm2-135m-instruct", dtype="bfloat16", quantize="none")
        engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4))
        packed = loaded.model.packed_head is not None
        assert packed == (enabled == "1")
        runs.append([o.token_ids for o in engine.generate(prompts, params)])
    assert runs[0] == runs[1]


def test_a_cpu_that_cannot_pack_keeps_plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU: oneDNN refuses to pack bf16, and the runner must load and run the model unpacked."""

    def refuse(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    monkeypatch.setattr(cpu_linear, "pack_weight", refuse)
    cpu_linear.packing_supported.cache_clear()
    try:
        assert cpu_linear.pack_linear_weights(_model(True, torch.float32)) == 0
        assert cpu_linear.packing_supported.cache_info().currsize == 0  # a float32 model never asks oneDNN
        assert not cpu_linear.packing_supported() and not cpu_linear.packing_enabled()
        model = _model(True, torch.bfloat16)
        want = _logits(model)
        ModelRunner(model, model.config, EngineConfig(block_size=4), num_blocks=8)
        assert not any(m.weight.is_mkldnn for m in model.modules() if isinstance(m, nn.Linear))
        assert model.packed_head is None
        assert torch.equal(_logits(model), want)
    finally:
        cpu_linear.packing_supported.cache_clear()
