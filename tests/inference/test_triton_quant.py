"""The Triton weight-only int8/int4 matmuls (inference/triton_quant.py, run by inference.quant.TritonQuantLinear)
against an eager dequantize-then-matmul.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before
triton is imported); on a CUDA machine the same tests run the compiled kernels.

Tolerances. The reference is `x.float() @ W.T` in float32, with W dequantized from the same codes and the bf16
scales and zeros the layer stores (`as_kernel_sees`). The kernels compute the same products exactly (the codes are
small integers, exact in any float dtype) and accumulate in float32, in another order: float32 inputs agree to
float32 accumulation error (1e-5 relative to the output's scale). A bf16/fp16 output is the float32 result rounded
once, so it is within half a unit in the last place of the reference: 2^-8 relative for bf16, 2^-11 for fp16, plus
the float32 accumulation error for outputs near zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with the dev environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

from inference import triton_quant as tq
from inference.attention_backends import get_attention_backend, set_attention_backend
from inference.errors import QuantError
from inference.quant import (
    Int4Weight,
    QuantLinear,
    QuantWeight,
    TritonQuantLinear,
    as_kernel_sees,
    dequantize_weight,
    gguf_to_int4,
    pack_int4_pairs,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4_pairs,
)
from inference.triton_attention import INTERPRETED
from tests.inference.test_quant import five_token_logits, tiny_tied_llama
from tests.inference.test_triton_attention import _greedy_through_model, _tiny_llama

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :] = 0.0  # an all-zero row: its scales stay finite, its outputs are the bias
    w[1, 3] = 1.5  # an outlier
    return w


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _reference(
    x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W.T + bias in float32, and the magnitude float32 accumulation errors scale with: |x| times the sum of
    the absolute terms the kernel adds, plus |bias|)."""
    seen = as_kernel_sees(weight)
    w = dequantize_weight(seen).to(x.device)
    if isinstance(seen, list):  # the kernel's terms: scale * (code - 8) and zero, each summed on its own
        terms = [
            Int4Weight((p.codes.float() - 8).abs(), p.scales.abs(), p.zeros.abs(), p.group_size) for p in seen
        ]
        magnitude = sum(t.scales.repeat_interleave(t.group_size, 1) * t.codes for t in terms) + sum(
            t.zeros.repeat_interleave(t.group_size, 1) for t in terms
        )
    else:
        magnitude = w.abs()
    y = x.float() @ w.t()
    size = x.float().abs() @ torch.as_tensor(magnitude).to(x.device).t()
    if bias is not None:
        y, size = y + bias.float(), size + bias.float().abs()
    return y, size


def _check(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
    """Float32 accumulation in another order: within 1e-5 of the products' magnitude (int4 adds the group's
    zero times the sum of x to the scaled product of the codes, so terms cancel: the output can be far smaller
    than its terms). A 16-bit output is then rounded once: half a unit in its last place."""
    value, size = want
    assert got.dtype == dtype and got.shape == value.shape
    err = (got.float() - value).abs()
    bound = 1e-5 * size
    if dtype != torch.float32:
        bound = bound + value.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert bool((err <= bound).all()), (
        f"max error {float(err.max())}, worst excess {float((err - bound).max())}"
    )


def _layer(weight: QuantWeight, bias: torch.Tensor | None) -> TritonQuantLinear:
    return TritonQuantLinear(weight, bias).to(DEVICE)


# ---- int8 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 16, 80])
@pytest.mark.parametrize(("n", "k"), [(64, 128), (50, 70)], ids=["even", "ragged-n-and-k"])
def test_int8_matches_dequantized_matmul(m: int, n: int, k: int) -> None:
    w8 = quantize_int8(_weight(n, k, seed=m))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) if m % 2 else None
    x = _x(m, k, torch.bfloat16, seed=k)
    got = _layer(w8, bias)(x)
    _check(got, _reference(x, w8, bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_in_other_dtypes(dtype: torch.dtype) -> None:
    w8 = quantize_int8(_weight(40, 96, seed=2))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(3)).to(dtype)
    for m in (2, 70):
        x = _x(m, 96, dtype, seed=m)
        _check(_layer(w8, bias)(x), _reference(x, w8, bias), dtype)


# ---- int4 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 16, 80])
def test_int4_matches_dequantized_matmul(group_size: int, m: int) -> None:
    n, k = 37, 512  # odd N: the last output tile is mostly masked
    w4 = [quantize_int4(_weight(n, k, seed=group_size + m), group_size)]
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16) if m != 3 else None
    x = _x(m, k, torch.bfloat16, seed=m)
    _check(_layer(w4, bias)(x), _reference(x, w4, bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_in_other_dtypes(dtype: torch.dtype) -> None:
    w4 = [quantize_int4(_weight(48, 256, seed=5), 64)]
    for m in (1, 33):
        x = _x(m, 256, dtype, seed=m)
        _check(_layer(w4, None)(x), _reference(x, w4, None), dtype)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q5_K", "Q4_1", "Q4_K"])
def test_gguf_blocks_run_as_int4_planes(type_name: str) -> None:
    """GGUF blocks through quant.py's conversion (two planes for the 5- and 8-bit types: their sum is the weight)
    give the file's own dequantized weight, up to the bf16 rounding of each plane's scales and zeros."""
    # gguf is a dependency here; the GPU machines' image may lack it (the rest of this module does not need it)
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from tests.inference.test_quant import _synthetic

    qtype = gguf.GGMLQuantizationType[type_name]
    raw = _synthetic(qtype, rows=40, cols=256)
    planes = gguf_to_int4(raw, qtype, (40, 256))
    assert len(planes) == (2 if type_name in ("Q8_0", "Q5_0", "Q5_K") else 1)
    layer = _layer(planes, None)
    assert layer.num_planes == len(planes) and tuple(layer.qweight.shape) == (len(planes), 40, 128)
    for m in (1, 5, 70):
        x = _x(m, 256, torch.bfloat16, seed=m)
        _check(layer(x), _reference(x, planes, None), torch.bfloat16)
    # and the stored layout dequantizes to the file's values (bf16 scales: 2^-8 relative on each term)
    want = torch.from_numpy(dequantize(raw, qtype).reshape(40, 256))
    bound = sum(8 * p.scales.abs().max() + p.zeros.abs().max() for p in planes) * 2**-8
    assert float((layer.dequantize().cpu() - want).abs().max()) <= float(bound)


# ---- tiles and splits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_k", [1, 2, 4, 16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_split_sums_to_the_same_result(split_k: int, mode: str) -> None:
    """Forced split-K, including splits past the end of K (16 splits of a 128-wide K: most get no K step)."""
    n, k = 24, 128
    weight: QuantWeight = (
        quantize_int8(_weight(n, k, 7)) if mode == "int8" else [quantize_int4(_weight(n, k, 7), 32)]
    )
    layer = _layer(weight, torch.ones(n, dtype=torch.bfloat16))
    x = _x(2, k, torch.bfloat16, seed=3)
    tiles = tq.QuantTiles(16, 16, 32, split_k, 4, 2)
    got = tq.quant_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.bias, layer.group_size, tiles)
    _check(got, _reference(x, weight, layer.bias), torch.bfloat16)


def test_an_int4_k_step_across_groups_is_refused() -> None:
    layer = _layer([quantize_int4(_weight(16, 64, 0), 32)], None)
    with pytest.raises(ValueError, match="crosses groups"):
        tq.quant_matmul(
            _x(1, 64, torch.bfloat16, 0), layer.qweight, layer.scales, layer.zeros, None, 32,
            tq.QuantTiles(16, 16, 64, 1, 4, 2),
        )  # fmt: skip


def test_tiles_by_shape() -> None:
    decode = tq.choose_tiles(1, 1024, 1024, 32, sms=132)
    assert decode.block_m == 16 and decode.block_k == 32  # an int4 K step never crosses a group
    assert decode.split_k > 1 and (1024 // decode.block_n) * decode.split_k <= 2 * 132
    assert tq.choose_tiles(16, 151_936, 1024, 0, sms=132).split_k == 1  # a wide head fills the GPU alone
    assert tq.choose_tiles(1, 1024, 64, 0, sms=132).split_k == 1  # too little K to split
    assert tq.choose_tiles(1, 1024, 1024, 256, sms=132).block_k == 128
    prefill = tq.choose_tiles(2048, 3072, 1024, 64, sms=132)
    assert (prefill.block_m, prefill.block_k, prefill.split_k) == (64, 64, 1)
    assert tq.choose_tiles(2048, 3072, 1024, 0, sms=132).block_n == 128
    assert tq.choose_tiles(40, 3072, 1024, 0, sms=132).block_m == 32


def test_packed_layout_two_codes_a_byte_low_nibble_first() -> None:
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4_pairs(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 3] & 15, codes[:, 6]) and torch.equal(packed[:, 3] >> 4, codes[:, 7])
    assert torch.equal(unpack_int4_pairs(packed), codes)


def test_layer_memory_and_empty_batches() -> None:
    w4 = [quantize_int4(_weight(64, 256, 1), 32)] * 2
    layer = _layer(w4, None)
    # two planes of 64 x 256 codes at half a byte, bf16 scales and zeros per 32 inputs
    assert layer.weight_bytes() == 2 * (64 * 128 + 2 * 2 * 64 * 8)
    out = layer(torch.empty(0, 256, dtype=torch.bfloat16, device=DEVICE))
    assert out.shape == (0, 64)
    x = _x(6, 256, torch.bfloat16, seed=2).reshape(2, 3, 256)  # leading dims are kept
    assert layer(x).shape == (2, 3, 64)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_a_group_size_the_kernel_cannot_take_is_a_typed_error() -> None:
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    w16 = Int4Weight(codes, torch.ones(16, 4), torch.zeros(16, 4), 16)
    with pytest.raises(QuantError, match="group size 16") as info:
        TritonQuantLinear([w16])
    assert info.value.hint and "32" in info.value.hint


def test_a_weight_on_another_device_is_a_typed_error() -> None:
    layer = TritonQuantLinear(quantize_int8(_weight(16, 32, 0))).to("meta")
    with pytest.raises(QuantError, match="meta") as info:
        layer(torch.zeros(1, 32, dtype=torch.bfloat16))
    assert info.value.hint and ".to(device)" in info.value.hint


def test_cpu_tensors_without_the_interpreter_are_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE.type == "cuda":
        pytest.skip("CPU tensors run the kernels only under the interpreter, which a GPU run does not use")
    assert INTERPRETED
    layer = TritonQuantLinear(quantize_int8(_weight(16, 32, 0)))
    monkeypatch.setattr(tq, "INTERPRETED", False)  # as in a process that compiles the kernels
    with pytest.raises(QuantError, match="do not run on cpu") as info:
        layer(torch.zeros(1, 32, dtype=torch.bfloat16))
    assert info.value.hint and "GPU" in info.value.hint


# ---- whole models ----------------------------------------------------------------------------------------------


def _dequantized_copy(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """`model` (untied, unquantized) with every linear weight replaced by what the quantized model's layer
    multiplies by."""
    for name, module in quantized.named_modules():
        if isinstance(module, TritonQuantLinear):
            target = model.get_submodule(name)
            assert isinstance(target, torch.nn.Linear)
            with torch.no_grad():
                target.weight.copy_(module.dequantize().to(target.weight.dtype))
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_llama_through_the_triton_kernels_matches_its_dequantized_weights(mode: str) -> None:
    """fp32 tiny Llama quantized with the Triton layers, on the whole CUDA path (Triton attention and fused layer
    kernels too): chunked prefill then batched decode give the same greedy tokens as the float model holding the
    dequantized weights on the reference path, logits within 1e-4 (float32 accumulation order)."""
    model = _tiny_llama()
    report = quantize_model(model, mode, group_size=32, kernels="triton")  # type: ignore[arg-type]  # from parametrize
    set_attention_backend(model, get_attention_backend(DEVICE, "triton"))
    layers = [m for m in model.modules() if isinstance(m, TritonQuantLinear)]
    assert report.layers == len(layers) == 2 * 4 + 1  # qkv, o, gate_up and down in each layer, and the head
    assert report.bytes_after < report.bytes_before * (0.45 if mode == "int4" else 0.6)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    prompts = [[5, 17, 33, 2, 9, 60, 41, 7, 88, 12, 3, 70, 25, 19, 44, 8, 51, 6, 30, 77], [11, 4, 93, 27, 61]]
    got_tokens, got_logits = _greedy_through_model(model, prompts, steps=4)
    reference = _dequantized_copy(_tiny_llama(), model)
    want_tokens, want_logits = _greedy_through_model(reference, prompts, steps=4)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.usefixtures("torch_kernels")
def test_tiny_llama_in_bf16_agrees_with_the_cpu_kernels(mode: str) -> None:
    """The same bf16 model quantized for torch's CPU kernels and for Triton: both multiply by the same codes and bf16
    scales, so a prefill's greedy tokens agree and their logits differ by bf16 rounding only. (Our own CPU kernel,
    inference/qgemv.py, also rounds the activations: tests/inference/test_qgemv.py checks it.)"""
    if DEVICE.type == "cuda":
        pytest.skip("the CPU kernels' side of the comparison needs the model on the CPU")
    cpu, tri = (
        tiny_tied_llama(torch.bfloat16),
        tiny_tied_llama(torch.bfloat16),
    )  # a tied head: int8 from the embedding
    quantize_model(cpu, mode, group_size=32, kernels="cpu")  # type: ignore[arg-type]  # from parametrize
    quantize_model(tri, mode, group_size=32, kernels="triton")  # type: ignore[arg-type]  # from parametrize
    assert isinstance(cpu.lm_head, QuantLinear) and isinstance(tri.lm_head, TritonQuantLinear)
    cpu_logits, tri_logits = five_token_logits(cpu), five_token_logits(tri)
    assert torch.equal(tri_logits.argmax(-1), cpu_logits.argmax(-1))
    # both round each layer's float32 result to bf16 once (equal here under the interpreter); compiled code may
    # sum in another order and round a layer's output the other way: one bf16 step of the logits' range
    spread = float(cpu_logits.abs().max())
    assert float((tri_logits - cpu_logits).abs().max()) <= 2**-8 * spread


def test_quantize_model_picks_kernels_by_device() -> None:
    """Without `kernels`, a CPU model gets the CPU kernels' layers and a CUDA model Triton's."""
    model = _tiny_llama()
    quantize_model(model, "int8")
    want = TritonQuantLinear if DEVICE.type == "cuda" else QuantLinear
    kinds = {type(m) for m in model.modules() if isinstance(m, QuantLinear | TritonQuantLinear)}
    assert kinds == {want}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_on_the_cuda_path_with_quantized_layers(tmp_path: Path, mode: str) -> None:
    """The whole engine on the Triton backend with Triton-quantized linears (Qwen2: qkv biases; decode through the
    graphs' static buffers, captured on a GPU, run eagerly here) gives the same greedy tokens as the engine on the
    reference backend over a float model holding the dequantized weights."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from tests.inference.test_hf_equivalence import PROMPTS, build_tiny_model, greedy

    build_tiny_model(tmp_path, "qwen2")
    loaded = load_model(str(tmp_path), dtype="float32", device=DEVICE)
    report = quantize_model(loaded.model, mode, group_size=32, kernels="triton")  # type: ignore[arg-type]  # from parametrize
    assert report.layers == sum(isinstance(m, TritonQuantLinear) for m in loaded.model.modules())
    assert any(isinstance(m, TritonQuantLinear) and m.bias is not None for m in loaded.model.modules())
    engine = LLMEngine(loaded, EngineConfig(num_blocks=80, max_num_seqs=4, attention_backend="triton"))
    runner = engine.runner
    graphs = runner.decode_graphs if DEVICE.type == "cuda" else runner.build_decode_graphs(capture=False)
    assert graphs is not None
    outs = engine.generate(PROMPTS[:2], greedy(6))
    assert graphs.replays > 0

    float_model = load_model(str(tmp_path), dtype="float32", device=DEVICE)
    _dequantized_copy(float_model.model, loaded.model)
    reference = LLMEngine(
        float_model, EngineConfig(num_blocks=80, max_num_seqs=4, attention_backend="reference")
    )
    want = reference.generate(PROMPTS[:2], greedy(6))
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]


@pytest.mark.smollm2
@pytest.mark.usefixtures("torch_kernels")
def test_smollm2_gguf_loads_into_triton_layers_holding_its_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged GGUF under `quantize: auto` in bf16, loaded with the layers CUDA gets (forced here on the CPU):
    the same layers and weight bytes as torch's CPU kernels' load, and each layer multiplies by the same weight (its
    codes and bf16 scales: read back through the CPU kernel, exactly)."""
    from inference import loader
    from inference.quant import dequantize_linear

    if DEVICE.type == "cuda":
        pytest.skip("the CPU kernels' side of the comparison needs the CPU")
    cpu = loader.load_model("smollm2-135m-instruct", dtype="bfloat16")
    monkeypatch.setattr(loader, "kernels_for", lambda _device: "triton")
    tri = loader.load_model("smollm2-135m-instruct", dtype="bfloat16")
    assert cpu.quantization is not None and tri.quantization is not None
    assert tri.quantization.source == cpu.quantization.source  # Q4_1 -> int4 g32: 210, Q8_0 -> int8: 1
    assert tri.quantization.bytes_after == cpu.quantization.bytes_after
    cpu_layers = dict(cpu.model.named_modules())
    triton_layers = {n: m for n, m in tri.model.named_modules() if isinstance(m, TritonQuantLinear)}
    assert len(triton_layers) == 30 * 4 + 1
    for name in ("layers.0.self_attn.qkv_proj", "layers.29.mlp.down_proj", "lm_head"):
        want = dequantize_linear(cpu_layers[name])  # type: ignore[arg-type]  # a QuantLinear by construction
        torch.testing.assert_close(
            triton_layers[name].dequantize().to(torch.bfloat16).float(), want, rtol=0, atol=0
        )
