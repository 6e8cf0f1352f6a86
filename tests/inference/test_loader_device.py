"""Device and dtype selection: `auto | cuda | cpu`, typed errors without a GPU, bf16/fp16 on CUDA by capability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.errors import DeviceUnavailableError, EngineError, ModelLoadError
from inference.loader import load_model, resolve_device, resolve_dtype

NO_GPU = not torch.cuda.is_available()


def tiny_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 600,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def test_cpu_and_case_insensitive_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_follows_torch_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto").type == ("cpu" if NO_GPU else "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("AUTO") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(not NO_GPU, reason="checks the error raised where CUDA is missing")
def test_cuda_without_a_gpu_is_a_typed_user_facing_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device("cuda")
    err = info.value
    assert isinstance(err, ModelLoadError) and isinstance(err, EngineError) and err.user_facing
    assert "no CUDA device" in err.reason
    assert "auto" in (err.hint or "") and "cpu" in (err.hint or "")
    if torch.version.cuda is None:  # this CPU-only build says why, and how to fix it
        assert "no CUDA support" in err.reason and "CUDA build of torch" in (err.hint or "")
    # load_model checks the device before reading anything
    with pytest.raises(DeviceUnavailableError):
        load_model(tiny_config(tmp_path / "m"), load_format="dummy", device="cuda")
    # auto falls back to the CPU and keeps the CPU's dtype rule
    loaded = load_model(tiny_config(tmp_path / "m"), load_format="dummy", device="auto", dtype="float32")
    assert next(loaded.model.parameters()).device == torch.device("cpu")
    assert loaded.config.dtype == torch.float32


def test_a_gpu_index_past_the_visible_ones_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailableError, match="only 2 GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["tpu", "mps", "cuda:x", ""])
def test_other_devices_are_load_errors(bad: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_device(bad)
    assert "auto, cpu or cuda" in (info.value.hint or "")


def test_auto_dtype_on_cuda_is_bf16_where_native_else_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))  # H100
    assert resolve_dtype("auto", cuda0) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))  # A100
    assert resolve_dtype("auto", cuda0) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))  # T4
    assert resolve_dtype("auto", cuda0) == torch.float16
    # explicit dtypes are never second-guessed
    assert resolve_dtype("bf16", cuda0) == torch.bfloat16
    assert resolve_dtype("float32", cuda0) == torch.float32


def test_cpu_dtype_rule_is_unchanged() -> None:
    from inference.loader import _cpu_has_fast_bf16

    assert resolve_dtype("auto", torch.device("cpu")) == (
        torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    )
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))
