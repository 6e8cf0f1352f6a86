"""Loading with `quantize` (inference.loader.load_model): the packaged SmolLM2 GGUF kept quantized by default in
bf16 and re-targeted to int8, in-situ quantization of a float model, and the typed errors of bad input (truncated
or foreign files, unsupported tensor types, unknown modes and group sizes, int8/int4 where no kernels run them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from torch import nn

from inference import loader
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import (
    GGUFFormatError,
    ModelLoadError,
    QuantError,
    QuantizeUnsupportedError,
    UnsupportedQuantTypeError,
)
from inference.gguf_file import GGUFFile
from inference.gguf_quant import check_supported_types
from inference.loader import check_quantize_device, load_model, smollm2_gguf_path
from inference.params import OutputKind, SamplingParams
from inference.quant import QuantEmbedding, QuantLinear, kernel_available
from tests.inference.test_loader import _tiny_config
from tests.inference.test_qgemv import lookup_shares_head

needs_kernels = pytest.mark.skipif(
    not (kernel_available("int8") and kernel_available("int4")),
    reason="torch's int8/int4 CPU kernels do not run on this CPU/build",
)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY)


def _write_gguf(path: Path, attn_q_type: T = T.Q4_0) -> Path:
    """A minimal `llama` GGUF: two head counts, one attention matrix of `attn_q_type` (zero blocks), a norm."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.attention.head_count_kv", 2)
    block, size = {T.Q4_0: (32, 18), T.Q2_K: (256, 84)}[attn_q_type]
    writer.add_tensor(
        "blk.0.attn_q.weight", np.zeros((64, 256 // block * size), np.uint8), raw_dtype=attn_q_type
    )
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _texts(loaded: Any, prompts: list[str]) -> list[str]:
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=2))
    return [o.text for o in engine.generate(prompts, GREEDY)]


# ---- bad input -------------------------------------------------------------------------------------------------


def test_truncated_or_foreign_files_are_typed_errors(tmp_path: Path) -> None:
    whole = _write_gguf(tmp_path / "whole.gguf").read_bytes()
    assert [t.name for t in GGUFFile(tmp_path / "whole.gguf").tensors] == [
        "blk.0.attn_q.weight",
        "output_norm.weight",
    ]
    for cut in (10, 60, len(whole) - 100):  # in the header, in the metadata, in the tensor data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(GGUFFormatError, match="truncated") as info:
            GGUFFile(path)
        assert info.value.hint and "re-download" in info.value.hint
        with pytest.raises(GGUFFormatError, match="truncated"):  # the loader reads the header first
            load_model(path, dtype="bfloat16")
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_model(foreign)
    assert issubclass(GGUFFormatError, ModelLoadError)  # the CLI's exit 2 with the hint


@needs_kernels
def test_an_unsupported_tensor_type_is_named_before_anything_is_converted(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q2k.gguf", T.Q2_K)
    with pytest.raises(UnsupportedQuantTypeError) as info:
        check_supported_types(GGUFFile(path))
    assert "blk.0.attn_q.weight" in str(info.value) and "Q2_K" in str(info.value)
    assert info.value.hint and "quantize none" in info.value.hint and "Q4_K" in info.value.hint
    with pytest.raises(UnsupportedQuantTypeError, match="Q2_K"):
        load_model(path, dtype="bfloat16")  # auto keeps GGUF blocks on a bf16 CPU model: refused up front
    check_supported_types(GGUFFile(_write_gguf(tmp_path / "q4.gguf", T.Q4_0)))  # supported: no error


def test_unknown_modes_group_sizes_and_devices_are_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantError, match="unknown quantize mode 'int3'") as info:
        load_model("smollm2-135m-instruct", quantize="int3")
    assert info.value.hint and "int4" in info.value.hint
    with pytest.raises(QuantError, match="quantize_group_size"):
        load_model("smollm2-135m-instruct", quantize="int4", quantize_group_size=48)
    cuda = torch.device("cuda", 0)
    for mode in ("int8", "int4", "auto", "none"):  # CUDA runs int8/int4 through the Triton kernels
        check_quantize_device(mode, 32, cuda)
    for mode in ("int8", "int4"):
        with pytest.raises(QuantizeUnsupportedError, match="MPS") as unsupported:
            check_quantize_device(mode, 32, torch.device("mps"))
        assert unsupported.value.hint and "device cpu" in unsupported.value.hint
    monkeypatch.setattr(loader, "triton_available", lambda: False)
    for mode in ("int8", "int4"):
        with pytest.raises(QuantizeUnsupportedError, match="CUDA needs the triton package") as unsupported:
            check_quantize_device(mode, 32, cuda)
        assert unsupported.value.hint and "pip install triton" in unsupported.value.hint
    check_quantize_device("int4", 128, torch.device("cpu"))


def test_gguf_auto_stays_quantized_on_cuda_in_16_bits_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    assert loader._gguf_quantize_mode("auto", cuda, torch.bfloat16, True) == "auto"
    assert loader._gguf_quantize_mode("auto", cuda, torch.float16, True) == "auto"
    assert loader._gguf_quantize_mode("auto", cuda, torch.float32, True) == "none"
    assert loader._gguf_quantize_mode("auto", cuda, torch.bfloat16, False) == "none"  # a float file
    assert loader._gguf_quantize_mode("int4", cuda, torch.float32, True) == "int4"
    monkeypatch.setattr(loader, "triton_available", lambda: False)
    assert loader._gguf_quantize_mode("auto", cuda, torch.bfloat16, True) == "none"


# ---- in-situ quantization of a float model ---------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize(("mode", "dtype"), [("int8", "bfloat16"), ("int4", "bfloat16"), ("int4", "float32")])
def test_isq_quantizes_a_float_model_and_the_engine_runs_it(tmp_path: Path, mode: str, dtype: str) -> None:
    cfg = _tiny_config(tmp_path / "tiny")
    float_model = load_model(cfg, load_format="dummy", dtype=dtype)
    assert float_model.quantization is None  # auto on a float source: float weights
    loaded = load_model(cfg, load_format="dummy", dtype=dtype, quantize=mode, quantize_group_size=32)
    report = loaded.quantization
    assert report is not None and report.mode == mode and report.source == "isq"
    assert report.layers == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the tied head
    assert report.fallback_layers == 0
    # a tied model's embedding lookup shares the int8 head's codes: no float table left
    assert lookup_shares_head(loaded.model)
    assert report.bytes_after < report.bytes_before * (0.6 if dtype == "bfloat16" else 0.3)
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.modules())
    kinds = {m.mode for m in loaded.model.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({"int8"} if mode == "int8" else {"int8", "int4"})  # the head is int8 in every mode
    out = _texts(loaded, ["hello", "a longer prompt than the other one"])
    assert len(out) == 2 and all(out)


# ---- the packaged SmolLM2 GGUF (Q4_1 layers, Q8_0 embedding) -------------------------------------------------


@pytest.mark.smollm2
@needs_kernels
def test_smollm2_gguf_stays_quantized_by_default_in_bf16(smollm2_fp32: Any) -> None:
    assert smollm2_fp32.quantization is None  # float32 (the oracle dtype): dequantized, as before
    loaded = load_model("smollm2-135m-instruct", dtype="bfloat16")
    report = loaded.quantization
    assert report is not None and report.mode == "gguf" and report.source.startswith("gguf")
    assert "Q4_1->int4 g32: 210" in report.source  # the file's blocks, kept as they are
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.modules())
    head, lookup = loaded.model.lm_head, loaded.model.embed_tokens
    if (
        head.qgemv is not None
    ):  # our kernel: the head holds the Q8_0 table's own blocks, and the lookup reads them
        assert "Q8_0->int8 g32: 1" in report.source and lookup_shares_head(loaded.model)
    else:  # torch's kernels: an int8 head re-quantized per row, and the table's own blocks for the lookup
        assert isinstance(lookup, QuantEmbedding)
    file_size = smollm2_gguf_path().stat().st_size
    assert report.bytes_after <= 1.3 * file_size  # the bound on resident weights
    assert report.bytes_before > 2.5 * file_size  # what the bf16 float model holds
    prompts = ["The capital of France is", "def fibonacci(n):"]
    quant, oracle = _texts(loaded, prompts), _texts(smollm2_fp32, prompts)
    assert "Paris" in quant[0] and "Paris" in oracle[0]


@pytest.mark.smollm2
@needs_kernels
def test_smollm2_gguf_retargeted_to_int8_and_int4() -> None:
    int8 = load_model("smollm2-135m-instruct", dtype="bfloat16", quantize="int8")
    assert int8.quantization is not None and int8.quantization.mode == "int8"
    assert "Q4_1->int8: 210" in int8.quantization.source
    assert {m.mode for m in int8.model.modules() if isinstance(m, QuantLinear)} == {"int8"}
    assert "Paris" in _texts(int8, ["The capital of France is"])[0]
    # int4 keeps 4-bit blocks as they are (group 32, exact): the group size is for what gets re-quantized
    int4 = load_model("smollm2-135m-instruct", dtype="bfloat16", quantize="int4", quantize_group_size=64)
    assert int4.quantization is not None and "Q4_1->int4 g32: 210" in int4.quantization.source
    assert "Paris" in _texts(int4, ["The capital of France is"])[0]


@needs_kernels
def test_isq_int4_with_a_group_that_does_not_divide_the_inputs_says_so(tmp_path: Path) -> None:
    loaded = load_model(
        _tiny_config(tmp_path / "tiny"), load_format="dummy", quantize="int4", quantize_group_size=128
    )  # hidden 64, intermediate 96: no input size is a multiple of 128
    report = loaded.quantization
    assert report is not None and report.source == "isq, 8 layers int8: inputs not a multiple of 128"
    assert {m.mode for m in loaded.model.modules() if isinstance(m, QuantLinear)} == {"int8"}
