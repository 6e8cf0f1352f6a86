"""Our CPU kernel for int4/int8 weights in blocks of 32 (inference/qgemv.py, inference/csrc/qgemv.cpp): every build
this CPU runs against a reference of its arithmetic, the layout, the layers and lookups that hold it, and the
fallbacks when it cannot be built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from torch import nn

from inference import qgemv
from inference.gguf_quant import _stack_rows, _take_rows
from inference.quant import (
    Int4HeadEmbedding,
    Int4Weight,
    Int8Weight,
    QGemvEmbedding,
    QuantEmbedding,
    QuantLinear,
    _q4_k_scale_min,
    dequantize_linear,
    dequantize_weight,
    gguf_q8_0_blocks,
    gguf_to_int4,
    model_weight_bytes,
    qgemv_dense_rows,
    quantize_int4,
    quantize_int8,
)

ISAS = qgemv.supported_isas()
# widths along K that cross every region of the layout: a pair only, a group of 8 (+ pair), groups of 16 (+ 8 + pairs)
WIDTHS = [64, 256, 576, 768, 832, 1536]
# int4 with fp16 mins (Q4_1, our int4), int4 without (Q4_0: min = -8 * scale), int8 (no mins), and int4 with Q4_K's
# compact scales (6-bit sub-scales and sub-mins, packed, under an fp16 pair per 256 values: K a multiple of 256)
KINDS = ["int4", "int4 symmetric", "int8", "q4_k"]
# (kind, K) for every kind at every width it takes
CASES = [(kind, k) for kind in KINDS for k in WIDTHS if kind != "q4_k" or k % 256 == 0]


def make(kind: str, w: torch.Tensor) -> qgemv.QGemvWeight:
    """`w` quantized in the kernel's layout as `kind` (one of KINDS)."""
    if kind == "q4_k":
        return qgemv.quantize_super_blocks(w)
    return qgemv.quantize_blocks(w, 8 if kind == "int8" else 4, symmetric=kind != "int4")


def call(op: qgemv.QGemvOp, x: torch.Tensor, w: qgemv.QGemvWeight, dense_rows: int = -1) -> torch.Tensor:
    return op(x, w.codes, w.scales, w.mins, w.bits, dense_rows, w.op_supers)


def sub_scales(w: qgemv.QGemvWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 `[N, K / 32]` sub-scales and sub-mins of a compact weight, as the loader reads Q4_K
    (`quant._q4_k_scale_min`; checked against gguf's own dequantization in
    `test_sub_scales_pack_and_unpack_as_q4_k_does`)."""
    sc, mn = _q4_k_scale_min(w.scales.reshape(w.shape[0], -1, 12).numpy())
    return torch.from_numpy(sc).double().reshape(w.shape[0], -1), torch.from_numpy(mn).double().reshape(
        w.shape[0], -1
    )


def implied_mins(w: qgemv.QGemvWeight) -> torch.Tensor:
    """float64 `[N, K / 32]`: the weight's own mins (Q4_K's `-dmin * sub_min`), or a symmetric one's (-8 * scale
    for 4 bits, 0 for 8)."""
    if w.compact:
        dmin = w.supers[:, :, 1].double().repeat_interleave(8, dim=1)
        return -dmin * sub_scales(w)[1]
    if w.mins.numel():
        return w.mins.double()
    return -8 * w.scales.double() if w.bits == 4 else torch.zeros_like(w.scales, dtype=torch.float64)


def block_scales(w: qgemv.QGemvWeight) -> torch.Tensor:
    """float64 `[N, K / 32]`: the fp16 scales, or Q4_K's `d * sub_scale`."""
    if w.compact:
        return w.supers[:, :, 0].double().repeat_interleave(8, dim=1) * sub_scales(w)[0]
    return w.scales.double()


def lookup_shares_head(model: nn.Module) -> bool:
    """Whether a tied model's embedding reads the quantized head's own tensors (one copy of the table), in whichever
    layout the head's kernel holds it."""
    head, lookup = model.lm_head, model.embed_tokens
    if not isinstance(head, QuantLinear):
        return False
    if head.qgemv is not None:
        return isinstance(lookup, QGemvEmbedding) and lookup.codes.data_ptr() == head.qcodes.data_ptr()
    if head.mode == "int8":
        return isinstance(lookup, QuantEmbedding) and lookup.codes.data_ptr() == head.qweight0.data_ptr()
    return isinstance(lookup, Int4HeadEmbedding) and lookup.qweight0.data_ptr() == head.qweight0.data_ptr()


def rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` rounded to int8 per block of 32 in float32 as the kernel does it (scale = max |x| / 127,
    `x * (127 / max)` rounded half to even): float32 codes `[M, blocks, 32]` and scales `[M, blocks]`."""
    xb = x.float().view(x.shape[0], -1, 32)
    amax = xb.abs().amax(dim=-1)
    # a true division (`127 / tensor` is 127 * reciprocal in torch, which rounds differently near a tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    return torch.round(xb * inv[..., None]), amax / 127


def reference(x: torch.Tensor, w: qgemv.QGemvWeight) -> torch.Tensor:
    """The kernel's arithmetic: `x` rounded (`rounded`), integer block dot products (exact in float64), then the
    weight's fp16 scale and min per block."""
    n, k = w.shape
    q32, d = rounded(x)
    q = q32.double()
    codes = qgemv.unpack_codes(w.codes, w.bits, k)
    u = (codes.view(torch.int8) if w.bits == 8 else codes).double().view(n, k // 32, 32)
    dots = torch.einsum("mbv,nbv->mnb", q, u)  # [M, N, blocks]
    s, mins, d64 = block_scales(w), implied_mins(w), d.double()
    xs = d64 * q.sum(dim=-1)
    return (dots * s[None] * d64[:, None]).sum(-1) + xs @ mins.t()


@pytest.fixture(params=ISAS)
def op(request: pytest.FixtureRequest) -> qgemv.QGemvOp:
    return qgemv.load(request.param)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", WIDTHS)
def test_layout_round_trips(bits: int, k: int) -> None:
    codes = torch.randint(0, 16 if bits == 4 else 256, (7, k), dtype=torch.uint8)
    packed = qgemv.pack_codes(codes, bits)
    assert packed.shape == (7, k * bits // 8)
    assert torch.equal(qgemv.unpack_codes(packed, bits, k), codes)
    assert sorted(qgemv.positions(k).tolist()) == list(range(k))  # a permutation of the row


@pytest.mark.parametrize(("kind", "k"), CASES)
def test_dequantizing_follows_the_codes_in_either_column_order(kind: str, k: int) -> None:
    """`u * scale + min` per block from the row-order codes, in row order and in the layout's order."""
    w = make(kind, torch.randn(5, k))
    bits, symmetric = w.bits, kind in ("int4 symmetric", "int8")
    assert w.symmetric == symmetric and w.compact == (kind == "q4_k")
    assert w.mins.numel() == (0 if symmetric or w.compact else 5 * k // 32)
    codes = qgemv.unpack_codes(w.codes, bits, k)[1:4]
    u = (codes.view(torch.int8) if bits == 8 else codes).float().view(3, -1, 32)
    want = (u * block_scales(w)[1:4].float()[..., None] + implied_mins(w)[1:4].float()[..., None]).view(3, k)
    assert torch.equal(w.dequantize(1, 4), want)
    assert torch.equal(w.dequantize_laid(1, 4), want[:, torch.argsort(qgemv.positions(k))])


@pytest.mark.parametrize(("kind", "k"), CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_kernel_computes_its_reference(op: qgemv.QGemvOp, kind: str, k: int, rows: int) -> None:
    """Exactly the reference up to float32 accumulation, for every row-block width (1-4, and more than 4 rows:
    the weights read once per four), an odd number of output rows, both input dtypes, with mins and without, with
    fp16 scales and Q4_K's compact ones."""
    gen = torch.Generator().manual_seed(k + rows)
    w = make(kind, torch.randn(37, k, generator=gen) * 0.1)
    x = torch.randn(rows, k, generator=gen)
    x[0, :32] = 0.0  # an all-zero activation block
    want = reference(x, w)
    got = call(op, x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 37)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    xb = x.bfloat16()
    got_bf16 = call(op, xb, w)
    assert got_bf16.dtype == torch.bfloat16
    want_bf16 = reference(xb.float(), w)
    torch.testing.assert_close(
        got_bf16.double(), want_bf16, rtol=2**-8, atol=1e-5 * float(want_bf16.abs().max())
    )
    # and the product of the float weight: within the activation rounding (about 0.5% of the output's norm)
    exact = x @ w.dequantize().t()
    assert float((got - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize(("kind", "k"), CASES)
def test_dense_path_multiplies_rounded_activations_by_bf16_weights(
    op: qgemv.QGemvOp, kind: str, k: int
) -> None:
    """Above `dense_rows` rows: the activations rounded as the kernel rounds them, then to bf16, times each weight
    rounded once to bf16 (`u * scale + min` in float32), through a bf16 matrix product; up to it, the kernel."""
    gen = torch.Generator().manual_seed(k + len(kind))
    w = make(kind, torch.randn(37, k, generator=gen) * 0.1)
    x = torch.randn(6, k, generator=gen)
    x[0, :32] = 0.0
    q, d = rounded(x)
    xr = (q * d[..., None]).view(6, k).bfloat16().double()
    want = xr @ w.dequantize().bfloat16().double().t()
    got = call(op, x, w, 0)  # every row on the dense path
    assert got.dtype == torch.float32 and got.shape == (6, 37)
    # the product's output is bf16 (one rounding, 2^-9 relative) cast to float32
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))
    got_bf16 = call(op, x.bfloat16(), w, 0)
    assert got_bf16.dtype == torch.bfloat16
    q, d = rounded(x.bfloat16().float())
    want_bf16 = (q * d[..., None]).view(6, k).bfloat16().double() @ w.dequantize().bfloat16().double().t()
    torch.testing.assert_close(got_bf16.double(), want_bf16, rtol=2**-7, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(call(op, x, w, 6), call(op, x, w))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs one build")
@pytest.mark.parametrize("kind", KINDS)
def test_builds_agree(kind: str) -> None:
    """Every build this CPU runs gives the same products (the same integer sums, float order aside)."""
    k = 1536 + 256 + (0 if kind == "q4_k" else 64)
    w = make(kind, torch.randn(64, k))
    x = torch.randn(2, k)
    outs = [call(qgemv.load(isa), x, w) for isa in ISAS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("kind", "k"), CASES)
def test_rows_are_the_dequantized_table_in_either_dtype(isa: qgemv.Isa, kind: str, k: int) -> None:
    """`q_rows` (a tied table's lookup) gives `dequantize`'s rows for ids of any shape: exactly in float32, rounded
    once in bf16; an id outside the table is an error."""
    w = make(kind, torch.randn(9, k))
    lookup = qgemv.sibling_op(qgemv.load(isa), "q_rows")

    def rows(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return lookup(ids, w.codes, w.scales, w.mins, w.bits, dtype, w.op_supers)

    ids = torch.tensor([[8, 0, 3], [3, 3, 5]])
    table = w.dequantize()
    assert torch.equal(rows(ids, torch.float32), table[ids])
    assert torch.equal(rows(ids, torch.bfloat16), table[ids].bfloat16())
    with pytest.raises(RuntimeError, match="outside the table"):
        rows(torch.tensor([9]), torch.float32)


def test_bad_arguments_are_errors_not_crashes(op: qgemv.QGemvOp) -> None:
    w = qgemv.quantize_blocks(torch.randn(8, 128), 4)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        op(torch.randn(1, 96), w.codes, w.scales, w.mins, 4)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        op(torch.randn(1, 128), w.codes, w.scales, w.mins, 5)
    with pytest.raises(RuntimeError, match="codes must be"):
        op(torch.randn(1, 128), w.codes, w.scales, w.mins, 8)  # 4-bit codes read as 8-bit ones
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, 128).half(), w.codes, w.scales, w.mins, 4)
    with pytest.raises(RuntimeError, match="mins empty for a symmetric weight"):
        op(torch.randn(1, 128), w.codes, w.scales, w.mins[:1], 4)  # neither a min a block nor none
    c = qgemv.quantize_super_blocks(torch.randn(8, 512))
    x = torch.randn(1, 512)
    with pytest.raises(RuntimeError, match="supers must be contiguous float16"):
        op(x, c.codes, c.scales, c.mins, 4, -1, c.supers[:4])  # a super-block pair short
    with pytest.raises(RuntimeError, match="supers must be contiguous float16"):
        op(x, c.codes, c.scales, c.mins, 4, -1, c.supers.float())
    with pytest.raises(RuntimeError, match="with supers, scales must be contiguous uint8"):
        op(x, c.codes, c.scales.half(), c.mins, 4, -1, c.supers)
    with pytest.raises(RuntimeError, match="with supers, scales must be contiguous uint8"):
        op(x, c.codes, c.scales[:, :12], c.mins, 4, -1, c.supers)  # one super-block's sub-scales of two
    with pytest.raises(RuntimeError, match="scales and mins must be contiguous float16"):
        op(x, c.codes, c.scales, c.mins, 4)  # packed sub-scales read as fp16 ones without their supers
    w8 = qgemv.quantize_blocks(torch.randn(8, 512), 8)
    with pytest.raises(RuntimeError, match="super-blocks need 4-bit codes"):
        op(x, w8.codes, c.scales, c.mins, 8, -1, c.supers)
    w4 = qgemv.quantize_blocks(torch.randn(8, 576), 4)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        op(torch.randn(1, 576), w4.codes, torch.zeros(8, 18, dtype=torch.uint8), w4.mins, 4, -1, c.supers)
    with pytest.raises(ValueError, match="multiple of 256"):
        qgemv.from_super_blocks(torch.zeros(8, 576, dtype=torch.uint8), c.scales, c.supers)


# ---- layers and lookups ----------------------------------------------------------------------------------------

needs_qgemv = pytest.mark.skipif(qgemv.qgemv_kernel() is None, reason="no build of our kernel for this CPU")


@needs_qgemv
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_runs_our_kernel_and_its_dense_path(mode: str, dtype: torch.dtype) -> None:
    """int8 per channel and int4 group 32 layers hold our layout; up to `qgemv_dense_rows` they run the kernel on the input's
    dtype, above it the dense path on the same weight; the bias is added; the layer reads back its exact weight."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(72, 576, generator=gen) * 0.05
    weight = quantize_int8(w) if mode == "int8" else [quantize_int4(w, 32)]
    bias = torch.randn(72, generator=gen)
    layer = QuantLinear(weight, bias)
    ours = layer.qgemv_weight()
    assert ours is not None and ours.bits == (8 if mode == "int8" else 4) and layer.planes() == []
    dense = ours.dequantize()
    want_w = weight.dequantize() if isinstance(weight, Int8Weight) else weight[0].dequantize()
    # fp16 scales and mins: each rounds by at most 2^-11 of itself (torch's kernels hold bf16 ones: 2^-8)
    torch.testing.assert_close(dense, want_w, rtol=0, atol=2**-9 * float(want_w.abs().max()))
    assert layer.weight_bytes() == sum(
        t.numel() * t.element_size() for t in (layer.qcodes, layer.qscales, layer.qmins)
    )
    assert layer.dense_rows == qgemv_dense_rows(576) == 72
    for rows in (1, 5, 16, 17, 40, 72, 73, 300):
        x = torch.randn(rows, 576, generator=gen).to(dtype)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, 72)
        want = x.float() @ dense.t() + bias
        # both paths round the activations to int8 per block (about 0.5%); the dense one then to bf16
        assert float((got.float() - want).norm() / want.norm()) < 0.02
    # read back through the kernel with a bf16 identity: the weight rounded to bf16 (a tie may round either way)
    torch.testing.assert_close(
        dequantize_linear(layer), dense, rtol=2**-7, atol=2**-8 * float(dense.abs().max())
    )


@needs_qgemv
def test_each_rows_result_is_the_same_bits_whatever_the_other_rows() -> None:
    """Up to `qgemv_dense_rows` a row's output does not depend on the step's other rows (their number, their
    grouping by four, the threads' split of the weight rows): what makes a replay from the prefix cache exact."""
    layer = QuantLinear([quantize_int4(torch.randn(200, 576) * 0.05, 32)])
    x = torch.randn(37, 576).bfloat16()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(37)])
    assert torch.equal(layer(x), alone)
    assert torch.equal(layer(x[5:12]), alone[5:12])


@needs_qgemv
@pytest.mark.smollm2
def test_a_prompt_replayed_from_the_prefix_cache_samples_the_same_tokens() -> None:
    """Seeded sampling on the packaged GGUF (kept quantized): the first request prefills the whole prompt, the
    second finds 64 of its 70 tokens in the prefix cache and prefills 6; both sample the same tokens. (With torch's
    kernels the 70-row prefill took the dense path and the 6-row one the kernel, and the replay diverged at its
    fifth token.)"""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from inference.params import SamplingParams

    loaded = load_model("smollm2-135m-instruct", dtype="bfloat16")
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=64 << 20, max_model_len=512, max_num_seqs=4))
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12)
    prompt = list(range(1000, 1070))
    first, second = (engine.generate([prompt], [params])[0] for _ in range(2))
    assert first.cached_tokens == 0 and second.cached_tokens == 64
    assert first.token_ids == second.token_ids


@needs_qgemv
def test_a_q8_0_matrix_keeps_its_blocks_exactly() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((64, 128)).astype(np.float32)
    raw = quantize(values, T.Q8_0)
    weight = gguf_q8_0_blocks(raw, (64, 128))
    assert weight.per_block and weight.scales.shape == (64, 4)
    exact = torch.from_numpy(dequantize(raw, T.Q8_0).reshape(64, 128))
    assert torch.equal(weight.dequantize(), exact)
    layer = QuantLinear(weight)
    ours = layer.qgemv_weight()
    assert ours is not None and torch.equal(ours.dequantize(), exact)  # fp16 block scales: nothing lost


@needs_qgemv
@pytest.mark.parametrize(("qtype", "symmetric"), [(T.Q4_0, True), (T.Q4_1, False)])
def test_a_4_bit_matrix_keeps_its_codes_and_q4_0_holds_no_mins(qtype: T, symmetric: bool) -> None:
    """Q4_0's blocks have no min (`(q - 8) * d`): the layer reads its codes and scales only, 18 bytes a block as in
    the file; Q4_1's mins are held. Both dequantize exactly to the file's weights."""
    rng = np.random.default_rng(3)
    raw = quantize(rng.standard_normal((48, 128)).astype(np.float32), qtype)
    layer = QuantLinear(gguf_to_int4(raw, int(qtype), (48, 128)))
    ours = layer.qgemv_weight()
    assert ours is not None and ours.bits == 4 and ours.symmetric == symmetric
    assert layer.weight_bytes() == 48 * 4 * (16 + 2 + (0 if symmetric else 2))
    exact = torch.from_numpy(dequantize(raw, qtype).reshape(48, 128))
    assert torch.equal(ours.dequantize(), exact)
    x = torch.randn(2, 128)
    want = x @ exact.t()
    assert float((layer(x) - want).norm() / want.norm()) < 0.02


@needs_qgemv
def test_block_scaled_int8_goes_per_row_for_torchs_kernel(torch_kernels: None) -> None:
    raw = quantize(np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32), T.Q8_0)
    layer = QuantLinear(gguf_q8_0_blocks(raw, (32, 128)))
    assert layer.qgemv is None and not layer.fallback and layer.scales0.dim() == 1
    want = torch.from_numpy(dequantize(raw, T.Q8_0).reshape(32, 128))
    assert (dequantize_linear(layer) - want).abs().max() < 0.01 * want.abs().max()


@needs_qgemv
@pytest.mark.parametrize("kind", ["int8", "int4", "int4 symmetric"])
def test_lookup_reads_the_heads_rows(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(300, 64, generator=gen) * 0.1
    int4 = quantize_int4(w, 32)
    if kind == "int4 symmetric":  # as GGUF Q4_0: zero points all 0
        int4 = Int4Weight(int4.codes, int4.scales, torch.zeros_like(int4.zeros), 32)
    head = QuantLinear(quantize_int8(w) if kind == "int8" else [int4])
    assert head.qgemv_weight().symmetric == (kind != "int4")
    lookup = QGemvEmbedding(head, torch.float32)
    ids = torch.tensor([[0, 299, 7], [7, 150, 1]])
    table = head.qgemv_weight().dequantize()
    assert torch.equal(lookup(ids), table[ids])
    assert model_weight_bytes(nn.ModuleList([head, lookup])) == head.weight_bytes()  # one copy


@needs_qgemv
def test_the_op_compiles_with_the_layer() -> None:
    """torch.compile traces the layer through the op's registered shape (the compiled decode step does this)."""
    layer = QuantLinear([quantize_int4(torch.randn(64, 128) * 0.1, 32)])
    x = torch.randn(3, 128)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@needs_qgemv
def test_a_shape_neither_kernel_takes_keeps_dense_weights() -> None:
    """Our kernel needs K a multiple of 64, torch's int4 packing N a multiple of 16: a layer with neither keeps its
    dequantized weight."""
    w = torch.randn(40, 96) * 0.05
    q = [quantize_int4(w, 32)]
    layer = QuantLinear(q)
    assert layer.fallback and layer.qgemv is None
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ q[0].dequantize().t())


# ---- choosing and building -------------------------------------------------------------------------------------


def test_setting_off_or_an_isa_the_cpu_lacks_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNTIME_QGEMV", "off")
    assert qgemv.chosen_isa() is None
    monkeypatch.setattr(qgemv, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv("AGENT_RUNTIME_QGEMV", "avx512_vnni")
    assert qgemv.chosen_isa() is None  # refused, logged
    monkeypatch.setenv("AGENT_RUNTIME_QGEMV", "auto")
    assert qgemv.chosen_isa() == "avx2"
    assert qgemv.supported_isas(
        {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}
    ) == [
        "avx512_vnni",
        "avx2",
    ]
    assert qgemv.supported_isas({"sse4_2"}) == []


@pytest.mark.skipif(not ISAS, reason="no build of our kernel for this CPU")
def test_a_failing_compiler_leaves_torchs_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails (here one that exits 1) is logged and the layers run torch's kernels."""
    monkeypatch.setenv("AGENT_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setenv("AGENT_RUNTIME_QGEMV", ISAS[-1])
    failing = tmp_path / "cxx"
    failing.write_text("#!/bin/sh\necho 'fatal error: no such compiler' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    qgemv.qgemv_kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="fatal error: no such compiler"):
            qgemv.build(ISAS[-1])
        assert qgemv.qgemv_kernel() is None
        layer = QuantLinear(quantize_int8(torch.randn(32, 128)))
        assert layer.qgemv is None and not layer.fallback
    finally:
        # the process's kernel again for the tests that follow (the cached None would leave them on torch's)
        monkeypatch.undo()
        qgemv.qgemv_kernel.cache_clear()


# ---- GGUF Q4_K kept compact -------------------------------------------------------------------------------------


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def random_k_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random super-blocks of a K-quant type (gguf-py has no quantizer for them): random codes and sub-scales,
    sane fp16 super-scales."""
    rng = np.random.default_rng(seed)
    size = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}[qtype]
    nb = cols // 256
    raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
    d = rng.uniform(1e-4, 2e-3, (rows, nb))
    if qtype == T.Q6_K:
        raw[..., 208:210] = _f16_bytes(d)
    else:
        raw[..., 0:2] = _f16_bytes(d)
        raw[..., 2:4] = _f16_bytes(rng.uniform(1e-4, 2e-3, (rows, nb)))
    return raw.reshape(rows, nb * size)


@needs_qgemv
def test_a_q4_k_matrix_keeps_its_own_scales_exactly() -> None:
    """A Q4_K matrix holds its file's 6-bit sub-scales and sub-mins, packed as the file packs them, and fp16
    (d, dmin) per 256 values: 18 bytes a block of 32, the file's, where fp16 scales and mins take 20, and its weights
    are exactly the file's (fp16 `d * sub_scale` would round them)."""
    raw = random_k_blocks(T.Q4_K, 48, 512)
    layer = QuantLinear(gguf_to_int4(raw, int(T.Q4_K), (48, 512)))
    ours = layer.qgemv_weight()
    assert ours is not None and ours.compact and ours.bits == 4
    assert ours.scales.dtype == torch.uint8 and ours.supers.shape == (48, 2, 2) and ours.mins.numel() == 0
    # the packed sub-scales are the file's bytes 4..15 of each super-block, as they are
    assert torch.equal(
        ours.scales, torch.from_numpy(raw.reshape(48, 2, 144)[..., 4:16].reshape(48, 24).copy())
    )
    assert layer.weight_bytes() == 48 * 16 * 18
    exact = torch.from_numpy(dequantize(raw, T.Q4_K).reshape(48, 512))
    assert torch.equal(ours.dequantize(), exact)
    x = torch.randn(3, 512)
    want = x @ exact.t()
    assert float((layer(x) - want).norm() / want.norm()) < 0.02


@needs_qgemv
def test_q4_k_shards_stack_compact_and_a_mixed_layer_takes_fp16_scales() -> None:
    """q, k and v (or gate and up) of Q4_K stack into one compact layer, rows taken out of order (llama.cpp's q/k
    interleave undone) keep theirs; a layer whose shards mix Q4_K with another 4-bit type holds fp16 scales."""
    q, k = (gguf_to_int4(random_k_blocks(T.Q4_K, 32, 256, seed), int(T.Q4_K), (32, 256)) for seed in (1, 2))
    order = torch.randperm(32)
    stacked = _stack_rows([_take_rows(q, order), k])
    assert isinstance(stacked, list)
    layer = QuantLinear(stacked)
    ours = layer.qgemv_weight()
    assert ours is not None and ours.compact
    want = torch.cat([dequantize_weight(q)[order], dequantize_weight(k)])
    torch.testing.assert_close(ours.dequantize(), want, rtol=0, atol=float(want.abs().max()) * 2**-20)
    q4_1 = quantize(np.random.default_rng(4).standard_normal((32, 256)).astype(np.float32), T.Q4_1)
    mixed = QuantLinear(_stack_rows([q, gguf_to_int4(q4_1, int(T.Q4_1), (32, 256))]))
    held = mixed.qgemv_weight()
    assert held is not None and not held.compact and held.scales.dtype == torch.float16


@needs_qgemv
def test_the_op_compiles_with_a_compact_layer() -> None:
    """torch.compile traces the op's `supers` argument through its registered shape."""
    raw = random_k_blocks(T.Q4_K, 32, 256)
    layer = QuantLinear(gguf_to_int4(raw, int(T.Q4_K), (32, 256)))
    x = torch.randn(3, 256)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_sub_scales_pack_and_unpack_as_q4_k_does() -> None:
    """`pack_sub_scales` and `unpack_sub_scales` are inverses over every 6-bit value, and unpack reads random packed
    bytes as gguf's own Q4_K dequantization does: a super-block of codes 1 with d = 1 and dmin = 0 dequantizes to
    its sub-scales, one with d = 0 and dmin = 1 to its negated sub-mins."""
    gen = torch.Generator().manual_seed(5)
    sc = torch.randint(0, 64, (7, 24), generator=gen, dtype=torch.uint8)
    mn = torch.randint(0, 64, (7, 24), generator=gen, dtype=torch.uint8)
    packed = qgemv.pack_sub_scales(sc, mn)
    assert packed.shape == (7, 36)
    got_sc, got_mn = qgemv.unpack_sub_scales(packed)
    assert torch.equal(got_sc, sc) and torch.equal(got_mn, mn)
    raw = torch.randint(0, 256, (5, 12), generator=gen, dtype=torch.uint8).numpy()
    blocks = np.zeros((2, 5, 144), np.uint8)
    blocks[..., 4:16] = raw
    blocks[..., 16:] = 0x11  # every code 1
    blocks[0, :, 0:2] = np.float16(1.0).reshape(1).view(np.uint8)  # d = 1, dmin = 0
    blocks[1, :, 2:4] = np.float16(1.0).reshape(1).view(np.uint8)  # d = 0, dmin = 1
    values = dequantize(blocks.reshape(10, 144), T.Q4_K).reshape(2, 5, 8, 32)
    got_sc, got_mn = qgemv.unpack_sub_scales(torch.from_numpy(raw))
    assert np.array_equal(values[0, ..., 0], got_sc.numpy().astype(np.float32))
    assert np.array_equal(values[1, ..., 0], -got_mn.numpy().astype(np.float32))
