"""The engine's view of a model's shape (ModelConfig), parsed from a Hugging Face config; the supported architectures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from inference.errors import ModelLoadError

# HF `architectures[0]` -> HF `model_type`; all of them run on our one Llama-style decoder (models/llama.py).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
# RoPE types whose inverse frequencies we take from transformers' ROPE_INIT_FUNCTIONS.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shapes and constants the model, the KV cache and the sampler need; nothing about weights."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # HF rope parameters (rope_type, factor, ...) when not plain RoPE
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    o_proj_bias: bool = False  # the output projection carries a bias (Llama/Qwen3 with attention_bias)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers in the model dtype."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def dynamic_rope(self) -> bool:
        """Dynamic NTK RoPE: its tables are sized from the longest position, on the host (no static graphs)."""
        return bool(self.rope_scaling and self.rope_scaling.get("rope_type") == "dynamic")


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def check_architecture(raw: dict[str, Any], where: str) -> str:
    """The HF architecture name of a raw config.json dict, or a ModelLoadError naming the supported ones."""
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    model_type = raw.get("model_type")
    if not archs and model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise ModelLoadError(
        f"unsupported model architecture {named} in {where}",
        hint=f"supported architectures: {_supported_list()}",
    )


def hf_config_from_dict(raw: dict[str, Any], where: str) -> Any:
    """A transformers PretrainedConfig built from a raw config.json dict (legacy rope fields normalised by it)."""
    from transformers import AutoConfig

    arch = check_architecture(raw, where)
    data = dict(raw)
    data.pop("model_type", None)
    try:
        return AutoConfig.for_model(SUPPORTED_ARCHITECTURES[arch], **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"invalid model config in {where}: {exc}", hint="check config.json") from exc


def _eos_ids(*candidates: Any) -> tuple[int, ...]:
    out: list[int] = []
    for c in candidates:
        if c is None:
            continue
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if int(i) not in out:
                out.append(int(i))
    return tuple(out)


def model_config_from_hf(
    hf: Any,
    dtype: torch.dtype,
    *,
    where: str,
    generation_eos: Any = None,
) -> ModelConfig:
    """Our ModelConfig from a transformers PretrainedConfig, rejecting features our decoder does not implement."""
    raw_archs = list(getattr(hf, "architectures", None) or [])
    arch = check_architecture({"architectures": raw_archs, "model_type": hf.model_type}, where)
    if getattr(hf, "mlp_bias", False):
        raise ModelLoadError(
            f"{where}: MLP biases are not supported", hint=f"supported architectures: {_supported_list()}"
        )
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"{where}: activation {hf.hidden_act!r} is not supported", hint="only SiLU-gated MLPs are"
        )
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{where}: RoPE type {rope_type!r} is not supported",
            hint=f"supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{where}: partial rotary embeddings are not supported")
    max_pos = int(hf.max_position_embeddings)
    window = getattr(hf, "sliding_window", None)
    uses_window = getattr(hf, "use_sliding_window", hf.model_type == "mistral")
    if window and uses_window and int(window) < max_pos:
        # Full attention equals sliding-window attention while a sequence fits in the window, so we cap the
        # context there instead of implementing the window.
        max_pos = int(window)
    qkv_bias = hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False))
    num_heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        rope_theta=rope_theta,
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        # Qwen2 hard-codes q/k/v biases (and none on o_proj); Llama and Qwen3 put `attention_bias` on all four.
        attention_bias=qkv_bias,
        qk_norm=hf.model_type == "qwen3",
        max_position_embeddings=max_pos,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(generation_eos, getattr(hf, "eos_token_id", None)),
        dtype=dtype,
        o_proj_bias=qkv_bias and hf.model_type != "qwen2",
    )
