"""Weight-only int8/int4 linears (inference/quant.py) and GGUF blocks loaded into their layouts
(inference/gguf_quant.py): error bounds of the quantizers, the kernels against F.linear on the weight they hold,
GGUF conversion against the gguf package's own dequantization (synthetic tensors and the packaged SmolLM2), and a
typed error for types we cannot load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from torch import nn

from inference.errors import EngineError, ModelLoadError, UnsupportedQuantTypeError
from inference.gguf_file import GGUFFile
from inference.gguf_quant import gguf_linear_weights, tie_embedding_to_head
from inference.loader import _unpermute, smollm2_gguf_path
from inference.metadata import AttentionMetadata
from inference.models.llama import LlamaForCausalLM
from inference.quant import (
    KERNEL_DTYPE,
    Int4HeadEmbedding,
    Int4Weight,
    Int8Weight,
    QuantEmbedding,
    QuantLinear,
    as_kernel_sees,
    dequantize_linear,
    dequantize_weight,
    gguf_q8_0_embedding,
    gguf_to_int4,
    gguf_to_int8,
    int4_layout,
    kernel_available,
    model_weight_bytes,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from tests.inference.test_cuda_graphs import tiny_config
from tests.inference.test_qgemv import lookup_shares_head, random_k_blocks

needs_int8 = pytest.mark.skipif(
    not kernel_available("int8"), reason="torch's _weight_int8pack_mm does not run on this CPU/build"
)
needs_int4 = pytest.mark.skipif(
    not kernel_available("int4"), reason="torch's _weight_int4pack_mm_for_cpu does not run on this CPU/build"
)


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :] = 0.0  # an all-zero row and group: scales must stay finite
    w[1, 3] = 1.5  # an outlier
    return w


# ---- quantizers ------------------------------------------------------------------------------------------------


def test_int8_round_trip_within_half_a_step() -> None:
    w = _weight(48, 256)
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (48,)
    assert int(q.qweight.abs().max()) <= 127
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= q.scales[:, None] / 2 + 1e-7)
    assert torch.equal(q.dequantize()[0], torch.zeros(256))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group_size: int) -> None:
    w = _weight(40, 256)
    q = quantize_int4(w, group_size)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scales.shape == (40, 256 // group_size) == q.zeros.shape
    step = q.scales.repeat_interleave(group_size, dim=1)
    assert torch.all((q.dequantize() - w).abs() <= step / 2 + 1e-6)
    assert torch.equal(q.dequantize()[0], torch.zeros(256))


def test_int4_rejects_bad_group_sizes() -> None:
    with pytest.raises(ModelLoadError, match="group size 48"):
        quantize_int4(_weight(8, 96), 48)
    with pytest.raises(ModelLoadError, match="not a multiple"):
        quantize_int4(_weight(8, 96), 64)


# ---- kernels -----------------------------------------------------------------------------------------------------


def _expected(
    x: torch.Tensor, weight: Int8Weight | list[Int4Weight], bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear in float32 on the weight the kernel holds (bf16 scales), with the input as the kernel reads it."""
    return F.linear(x.to(KERNEL_DTYPE).float(), dequantize_weight(as_kernel_sees(weight)), bias)


def _close(
    got: torch.Tensor, want: torch.Tensor, layer: QuantLinear | None = None, x: torch.Tensor | None = None
) -> None:
    # the kernels accumulate in float32 and round the output to bf16 once per plane
    tol = 2**-7 * want.abs().amax().item() + 1e-5
    if layer is not None and layer.qgemv is not None and x is not None:
        # our kernel also rounds the activations to int8 per block of 32 (half a step: max |x| / 254 a value), which
        # moves an output by at most sum |w| times that
        xb = x.reshape(-1, x.shape[-1]).float().view(-1, x.shape[-1] // 32, 32)
        half_step = (xb.abs().amax(-1, keepdim=True) / 254).expand_as(xb).reshape(xb.shape[0], -1)
        tol += (half_step @ dequantize_linear(layer).abs().t()).max().item()
    assert (got.float() - want).abs().max().item() <= tol


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_f_linear_on_its_weight(rows: int, dtype: torch.dtype) -> None:
    w = _weight(200, 576)
    q = quantize_int8(w)
    bias = torch.randn(200)
    layer = QuantLinear(q, bias)
    assert not layer.fallback
    x = torch.randn(rows, 576)
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 200)
    _close(got, _expected(x, q, bias), layer, x.to(dtype))


@needs_int4
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_f_linear_on_its_weight(rows: int, group_size: int) -> None:
    w = _weight(208, 512)  # 208 output rows: not a multiple of the kernel's 64-wide column blocks
    q = [quantize_int4(w, group_size)]
    layer = QuantLinear(q)
    assert not layer.fallback
    x = torch.randn(2, rows, 512)  # leading dims are flattened and restored
    got = layer(x.bfloat16())
    assert got.shape == (2, rows, 208)
    _close(got, _expected(x, q, None), layer, x.bfloat16())


@needs_int4
def test_two_int4_planes_hold_an_int8_group_weight_exactly() -> None:
    """Q8_0's layout: int8 values in groups of 32 with an fp16 scale, split into a high and a low nibble plane."""
    w = _weight(64, 256).numpy()
    raw = quantize(w, T.Q8_0)
    planes = gguf_to_int4(raw, T.Q8_0, w.shape)
    assert len(planes) == 2
    layer = QuantLinear(planes)
    x = torch.randn(5, 256)
    _close(layer(x), _expected(x, planes, None))


@needs_int4
@pytest.mark.usefixtures("torch_kernels")
def test_dequantize_linear_reads_the_weight_back_through_the_kernel() -> None:
    q = [quantize_int4(_weight(96, 256), 32)]
    layer = QuantLinear(q, torch.ones(96))
    got = dequantize_linear(layer)
    want = dequantize_weight(as_kernel_sees(q))
    assert torch.allclose(got, want, rtol=2**-8, atol=1e-6)
    assert layer.bias is not None  # put back


@pytest.mark.parametrize(("mode", "shape"), [("int8", (16, 40)), ("int4", (40, 64))])
@pytest.mark.usefixtures("torch_kernels")
def test_shapes_the_kernels_cannot_take_fall_back_to_f_linear(mode: str, shape: tuple[int, int]) -> None:
    """The int8 kernel returns garbage for inputs not a multiple of 16 wide, the int4 packing refuses outputs not a
    multiple of 16: such layers keep dense weights."""
    w = _weight(*shape)
    q: Int8Weight | list[Int4Weight] = quantize_int8(w) if mode == "int8" else [quantize_int4(w, 32)]
    layer = QuantLinear(q)
    assert layer.fallback
    x = torch.randn(3, shape[1])
    assert torch.equal(layer(x), F.linear(x, dequantize_weight(q)))


@pytest.mark.usefixtures("torch_kernels")
def test_fallback_without_kernel_is_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without the kernel keeps the dequantized weight and runs F.linear in the input's dtype."""
    from inference import quant

    monkeypatch.setattr(quant, "kernel_available", lambda name: False)
    q = quantize_int8(_weight(32, 64))
    layer = QuantLinear(q)
    assert layer.fallback and layer.planes() == []
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, q.dequantize()))


# ---- whole models --------------------------------------------------------------------------------------------


def tiny_tied_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    """A tiny random Llama with a tied head (quantize_model builds an int8 head from the embedding), on the CPU."""
    torch.manual_seed(0)
    cfg = tiny_config(tie_word_embeddings=True, dtype=dtype)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def five_token_logits(model: LlamaForCausalLM) -> torch.Tensor:
    """Logits of a 5-token prefill through the model's attention backend."""
    cfg = model.config
    kv = torch.zeros(2, cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([4, 5, 6, 7, 8]),
        query_start_loc=torch.tensor([0, 5], dtype=torch.int32),
        context_lens=torch.tensor([5], dtype=torch.int32),
        block_tables=torch.tensor([[1, 2]], dtype=torch.int32),
        max_query_len=5,
        max_context_len=5,
        block_size=4,
    )
    hidden = model(torch.tensor([3, 1, 4, 1, 5]), torch.arange(5), meta, kv)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_model_swaps_linears_and_reports_bytes(mode: str, dtype: torch.dtype) -> None:
    model = tiny_tied_llama(dtype)
    before = five_token_logits(model)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    report = quantize_model(model, mode, group_size=32)  # type: ignore[arg-type]  # mode: "int8" or "int4", from the parametrization
    assert report.layers == linears + 1  # and the tied head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.mode == "int8"  # the head is int8 in every mode (int4 there costs perplexity)
    params = sum(p.numel() for p in tiny_tied_llama(dtype).parameters())
    assert report.bytes_before == params * (4 if dtype == torch.float32 else 2)
    # the tiny model's embedding (kept for the lookup) is a fifth of it; the linears shrink 2-8x
    assert report.bytes_after < report.bytes_before * (0.75 if dtype == torch.bfloat16 else 0.4)
    assert report.bytes_after == sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    after = five_token_logits(model)
    assert after.dtype == torch.float32 and after.shape == before.shape
    # weight-only quantization of a random tiny model: the logits move by a few percent of their range
    assert (after - before).abs().max() <= 0.1 * before.abs().max() + 0.05
    assert torch.equal(after.argmax(-1)[-1:], before.argmax(-1)[-1:]) or mode == "int4"


def test_quantize_model_rejects_unknown_modes() -> None:
    model = tiny_tied_llama(torch.float32)
    for mode in ("none", "int3"):
        with pytest.raises(ModelLoadError, match="unknown quantization"):
            quantize_model(model, mode)  # type: ignore[arg-type]  # on purpose: modes quantize_model must refuse


# ---- GGUF blocks -------------------------------------------------------------------------------------------------


def _synthetic(qtype: T, rows: int = 64, cols: int = 512) -> np.ndarray:
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return random_k_blocks(qtype, rows, cols)
    w = _weight(rows, cols).numpy()
    return quantize(w, qtype)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K])
def test_gguf_blocks_to_int4_planes_are_exact(qtype: T) -> None:
    raw = _synthetic(qtype)
    want = dequantize(raw, qtype).reshape(64, 512)
    planes = gguf_to_int4(raw, qtype, (64, 512))
    assert len(planes) == (2 if qtype in (T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K) else 1)
    assert all(p.group_size == 32 and int(p.codes.max()) <= 15 for p in planes)
    got = dequantize_weight(planes).numpy()
    # the codes and float32 scales reproduce gguf's dequantization; the zero term (m + 8 d) may round by one ulp
    np.testing.assert_allclose(got, want, rtol=0, atol=float(np.abs(want).max()) * 2**-22)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_K])
def test_gguf_blocks_to_int8_within_half_a_step(qtype: T) -> None:
    raw = _synthetic(qtype)
    want = torch.from_numpy(dequantize(raw, qtype).reshape(64, 512))
    w8 = gguf_to_int8(raw, qtype, (64, 512))
    assert w8.qweight.dtype == torch.int8
    assert torch.all((w8.dequantize() - want).abs() <= w8.scales[:, None] / 2 * (1 + 1e-5))


@needs_int4
def test_bf16_scales_of_gguf_int4_stay_within_a_bf16_rounding() -> None:
    """The kernels store scales and zeros in bf16 (8 significant bits against fp16's 11): each loses up to 2^-8
    relative, so a value moves by at most (8 |scale| + |zero|) * 2^-8."""
    raw = _synthetic(T.Q4_1)
    want = dequantize(raw, T.Q4_1).reshape(64, 512)
    planes = gguf_to_int4(raw, T.Q4_1, (64, 512))
    got = dequantize_weight(as_kernel_sees(planes)).numpy()
    s = planes[0].scales.repeat_interleave(32, 1).numpy()
    z = planes[0].zeros.repeat_interleave(32, 1).numpy()
    bound = (8 * np.abs(s) + np.abs(z)) * 2**-8
    assert np.all(np.abs(got - want) <= bound + 1e-9)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_NL, T.TQ1_0])
def test_unsupported_gguf_type_is_a_typed_error_naming_it(qtype: T) -> None:
    raw = np.zeros((4, 256), dtype=np.uint8)
    for convert in (gguf_to_int4, gguf_to_int8):
        with pytest.raises(UnsupportedQuantTypeError) as info:
            convert(raw, qtype, (4, 256))
        err = info.value
        assert isinstance(err, ModelLoadError) and isinstance(err, EngineError)
        assert qtype.name in str(err) and err.hint and "Q4_K" in err.hint


# ---- the packaged SmolLM2 GGUF -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reader() -> Iterator[GGUFFile]:
    try:
        path = smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"the packaged SmolLM2 GGUF is not installed: {exc}")
    yield GGUFFile(path)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
def test_smollm2_tensors_convert_exactly(smollm2_reader: GGUFFile, name: str) -> None:
    tensor = next(t for t in smollm2_reader.tensors if t.name == name)
    data = tensor.data[:4096]  # the embedding's first 4096 rows are enough
    shape = (int(data.shape[0]), int(tensor.shape[0]))
    want = dequantize(data, tensor.tensor_type).reshape(shape)
    got = dequantize_weight(gguf_to_int4(data, tensor.tensor_type, shape)).numpy()
    np.testing.assert_array_equal(got, want)


def test_smollm2_layers_map_onto_our_fused_parameters(smollm2_reader: GGUFFile) -> None:
    """q/k/v stack into qkv_proj with llama.cpp's q/k row interleaving undone, as the float loader does."""
    weights, counts = gguf_linear_weights(smollm2_reader, "auto", 32)
    assert counts == {"Q4_1->int4 g32": 210, "Q8_0->int8": 1}  # the tied head from the Q8_0 embedding
    head = weights["lm_head"]
    assert isinstance(head, Int8Weight) and head.shape == (49152, 576)
    by_name = {t.name: t for t in smollm2_reader.tensors}

    def deq(name: str) -> torch.Tensor:
        t = by_name[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])))

    qkv = torch.cat(
        [
            _unpermute(deq("blk.5.attn_q.weight"), 9),
            _unpermute(deq("blk.5.attn_k.weight"), 3),
            deq("blk.5.attn_v.weight"),
        ]
    )
    fused = weights["layers.5.self_attn.qkv_proj"]
    assert isinstance(fused, list) and isinstance(fused[0], Int4Weight)
    assert torch.equal(dequantize_weight(fused), qkv)
    gate_up = torch.cat([deq("blk.5.ffn_gate.weight"), deq("blk.5.ffn_up.weight")])
    assert torch.equal(dequantize_weight(weights["layers.5.mlp.gate_up_proj"]), gate_up)


# ---- int8 embeddings -------------------------------------------------------------------------------------------


def test_q8_0_embedding_looks_up_exact_rows() -> None:
    w = _weight(100, 64).numpy()
    raw = quantize(w, T.Q8_0)
    table = torch.from_numpy(dequantize(raw, T.Q8_0).reshape(100, 64))
    emb = gguf_q8_0_embedding(raw, (100, 64), torch.float32)
    ids = torch.tensor([[0, 1, 99], [5, 5, 42]])
    got = emb(ids)
    assert got.shape == (2, 3, 64) and torch.equal(got, table[ids])
    assert got.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="blocks a row"):
        gguf_q8_0_embedding(raw, (100, 96))


@needs_int8
@pytest.mark.usefixtures("torch_kernels")
def test_tied_int8_head_and_embedding_share_one_table() -> None:
    model = tiny_tied_llama(torch.bfloat16)
    quantize_model(model, "int8")
    assert isinstance(model.lm_head, QuantLinear)
    before = model_weight_bytes(model)
    assert tie_embedding_to_head(model)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.embed_tokens.codes.data_ptr() == model.lm_head.qweight0.data_ptr()
    # the bf16 table (96 x 64) is gone; the shared codes are counted once
    assert model_weight_bytes(model) == before - 96 * 64 * 2 + 96 * 4
    ids = torch.tensor([3, 1, 4])
    head = model.lm_head
    want = (head.qweight0.float() * head.scales0.float()[:, None])[ids].bfloat16()
    assert torch.equal(model.embed_tokens(ids), want)
    assert five_token_logits(model).isfinite().all()
    assert not tie_embedding_to_head(tiny_tied_llama(torch.bfloat16))  # no int8 head: nothing to share


# ---- int4 heads from 4-bit GGUF tables -------------------------------------------------------------------------


@needs_int4
@pytest.mark.skipif(int4_layout() is None, reason="this CPU's packed int4 layout is unknown")
@pytest.mark.usefixtures("torch_kernels")
def test_int4_head_lookup_reads_the_heads_packed_rows() -> None:
    """`Int4HeadEmbedding` unpacks rows from the head's packed codes (this CPU's layout, both nibbles, several
    blocks): each row is `(code - 8) * scale + zero` with the head's own bf16 scales, and nothing is copied."""
    layout = int4_layout()
    assert layout is not None
    rows, dim = 3 * layout.block, 64
    w = quantize_int4(_weight(rows, dim), 32)
    head = QuantLinear([w])
    assert head.layout is not None
    emb = Int4HeadEmbedding(head, torch.float32)
    ids = torch.tensor([[0, 1, layout.block // 2, layout.block - 1], [layout.block, rows - 1, 7, 7]])
    scale_zero = head.planes()[0][1].float()  # [K / g, N, 2]: what the kernel multiplies by
    s = scale_zero[..., 0].t().repeat_interleave(32, dim=1)
    z = scale_zero[..., 1].t().repeat_interleave(32, dim=1)
    table = (w.codes.float() - 8.0) * s + z
    assert torch.equal(emb(ids), table[ids])
    assert model_weight_bytes(nn.ModuleList([head, emb])) == head.weight_bytes()  # one copy


@needs_int4
@pytest.mark.skipif(int4_layout() is None, reason="this CPU's packed int4 layout is unknown")
def test_a_tied_4_bit_gguf_table_stays_int4_as_head_and_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tied Q4_0 embedding becomes an int4 head with the file's codes (not an int8 re-quantization) and the
    lookup reads it; int8 re-targets the whole file, head included; the logits follow the float weights. (Q4_1 and
    Q4_K take the same branch; their codes convert exactly in test_gguf_blocks_to_int4_planes_are_exact. One file:
    its tokenizer's conversion is most of the test's time.)"""
    from benchmarks import random_gguf
    from inference.loader import load_model

    monkeypatch.setitem(random_gguf.SHAPES, "tiny", random_gguf.Shape(256, 2, 4, 2, 512, 49152, 10000.0))
    path = random_gguf.write("tiny", "Q4_0", tmp_path)
    loaded = load_model(path, dtype="bfloat16")
    head, emb = loaded.model.lm_head, loaded.model.embed_tokens
    assert isinstance(head, QuantLinear) and head.mode == "int4"
    assert lookup_shares_head(loaded.model)  # our kernel's layout, or torch's packed one
    report = loaded.quantization
    assert report is not None and report.bytes_after <= 1.3 * path.stat().st_size
    oracle = load_model(path, dtype="float32")  # dequantized float weights
    ids = torch.tensor([5, 700, 49151])
    table = oracle.model.embed_tokens.weight
    torch.testing.assert_close(emb(ids).float(), table[ids], rtol=0.02, atol=2e-3)
    hidden = torch.randn(3, 256) * 0.5
    want = hidden @ table.t()
    got = loaded.model.compute_logits(hidden.bfloat16())
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    int8 = load_model(path, dtype="bfloat16", quantize="int8")
    assert isinstance(int8.model.lm_head, QuantLinear) and int8.model.lm_head.mode == "int8"
    assert lookup_shares_head(int8.model)
