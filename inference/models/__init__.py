"""Our model implementations over the paged KV cache and the architecture -> class registry."""

from __future__ import annotations

from inference.model_config import ModelConfig
from inference.models.layers import CausalLM
from inference.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def build_model(config: ModelConfig) -> CausalLM:
    """An uninitialised model of `config.architecture` (parameters allocated, values arbitrary)."""
    return MODEL_REGISTRY[config.architecture](config)


__all__ = ["MODEL_REGISTRY", "CausalLM", "LlamaForCausalLM", "build_model"]
