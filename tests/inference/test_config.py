"""EngineConfig: the engine's defaults, its checks (typed errors with a hint), and the context length it gives
a model."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from inference.config import DEFAULT_GPU_MEMORY_UTILIZATION, EngineConfig
from inference.errors import EngineError
from tests.inference.test_cuda_graphs import tiny_config


def test_defaults() -> None:
    config = EngineConfig()
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (64, 2048, 16)
    assert config.max_model_len is None and config.kv_cache_memory is None and config.num_blocks is None
    assert config.gpu_memory_utilization == DEFAULT_GPU_MEMORY_UTILIZATION == 0.9
    assert config.enable_prefix_caching and not config.enforce_eager and config.attention_backend == "auto"
    assert (config.max_loras, config.max_lora_rank, config.lora_kernels) == (4, 16, "auto")


def test_frozen() -> None:
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 1  # type: ignore[misc]  # on purpose: the test checks the frozen dataclass refuses it
    assert dataclasses.replace(config, max_num_seqs=1).max_num_seqs == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an integer >= 1"),
        ({"block_size": 2.0}, "block_size must be an integer >= 1"),
        ({"max_model_len": 0}, "max_model_len must be an integer >= 1"),
        ({"num_blocks": -1}, "num_blocks must be an integer >= 1"),
        ({"max_num_seqs": True}, "max_num_seqs must be an integer >= 1"),
        ({"kv_cache_memory": 0}, "kv_cache_memory must be a positive number"),
        ({"kv_cache_memory": "1GiB"}, "kv_cache_memory must be a positive number"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 0}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"enforce_eager": "yes"}, "enforce_eager must be true or false"),
        ({"compile": 1}, "compile must be true or false"),
        ({"attention_backend": ""}, "attention_backend must be a backend name"),
        ({"max_loras": 0}, "max_loras must be an integer >= 1"),
        ({"max_lora_rank": 0}, "max_lora_rank must be an integer >= 1"),
        ({"lora_kernels": "cuda"}, "lora_kernels must be a kernel choice"),
    ],
)
def test_invalid_settings_raise_a_typed_error(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(EngineError, match=reason) as info:
        EngineConfig(**fields)
    assert info.value.hint


def test_memory_is_bytes_or_a_fraction() -> None:
    assert EngineConfig(kv_cache_memory=0.25).kv_cache_memory == 0.25
    assert EngineConfig(kv_cache_memory=512 * 2**20).kv_cache_memory == 512 * 2**20
    assert EngineConfig(gpu_memory_utilization=1).gpu_memory_utilization == 1


def test_max_model_len_for_a_model() -> None:
    model = tiny_config(max_position_embeddings=8192)
    assert EngineConfig().max_model_len_for(model) == 8192  # unset: the model's own
    assert EngineConfig(max_model_len=2048).max_model_len_for(model) == 2048
    assert EngineConfig(max_model_len=10_000).max_model_len_for(model) == 8192  # never past the model's
