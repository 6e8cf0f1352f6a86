"""Building blocks shared by our decoders: RMSNorm, rotary embedding (HF-exact inverse frequencies), SiLU-gated MLP.
Their elementwise work goes through the model's `LayerOps` (inference/layer_ops.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from inference.layer_ops import EAGER_OPS, LayerOps, Tensor
from inference.model_config import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig


class CausalLM(nn.Module):
    """What the engine calls on a model beyond nn.Module's own: `model(input_ids [T], positions [T], meta,
    kv_cache) -> hidden [T, hidden]`, `compute_logits(hidden) -> float32 logits`, and `load_weights` of
    Hugging Face-named tensors. Our decoders derive from it."""

    def compute_logits(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        raise NotImplementedError


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like Hugging Face's LlamaRMSNorm, cast back to the input dtype."""

    # set per model by attention_backends.set_attention_backend, with the attention backend
    layer_ops: LayerOps = EAGER_OPS

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_ops.rms_norm(x, self.weight, self.eps)

    def forward_add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Add the residual first, normalise the sum; returns (normed, new residual)."""
        return self.layer_ops.add_rms_norm(x, residual, self.weight, self.eps)


def _hf_rope_config(config: ModelConfig) -> LlamaConfig:
    from transformers import LlamaConfig

    params = dict(config.rope_scaling or {"rope_type": "default"})
    params["rope_theta"] = config.rope_theta
    return LlamaConfig(
        hidden_size=config.num_heads * config.head_dim,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=params,
    )


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) exactly as transformers computes them for this config."""
    if config.rope_scaling is None:
        dim = config.head_dim
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_scaling["rope_type"]
    fn = ROPE_INIT_FUNCTIONS[rope_type]
    kwargs = {"seq_len": seq_len} if seq_len is not None else {}
    inv, scaling = fn(_hf_rope_config(config), torch.device("cpu"), **kwargs)
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE from cos/sin tables over every position up to max_position_embeddings (computed in float32).

    The model looks the tables up once per forward pass; with a full table no host sync is needed to size it
    (which keeps the forward pass CUDA-graph friendly), except for dynamic NTK scaling, whose frequencies depend on
    the longest position in the pass, exactly as in transformers.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.dynamic = config.dynamic_rope
        # Plain attributes, not buffers: models are built on the meta device and materialised with to_empty(),
        # which would leave buffers uninitialised; the tables follow the model's device and dtype on first use.
        with torch.device("cpu"):
            self.inv_freq, self.scaling = rope_inv_freq(config)
        # One (cos, sin) pair per (device, dtype), kept for the model's life: a captured CUDA graph reads the table
        # by address, so it must never be rebuilt or freed under the graph.
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _build(
        self, inv_freq: torch.Tensor, n: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, head_dim], halves repeated as in HF
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions` [T], each [T, 1, head_dim] in `dtype`."""
        if self.dynamic:
            n_max = int(positions.max()) + 1 if positions.numel() else 1
            if n_max > self.config.max_position_embeddings:
                inv, _ = rope_inv_freq(self.config, seq_len=n_max)
                cos, sin = self._build(inv, n_max, positions.device, dtype)
                return cos.index_select(0, positions).unsqueeze(1), sin.index_select(0, positions).unsqueeze(
                    1
                )
        key = (positions.device, dtype)
        tables = self._tables.get(key)
        if tables is None:
            tables = self._build(self.inv_freq, self.config.max_position_embeddings, positions.device, dtype)
            self._tables[key] = tables
        cos, sin = tables
        return cos.index_select(0, positions).unsqueeze(1), sin.index_select(0, positions).unsqueeze(1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    layer_ops: LayerOps = EAGER_OPS

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(self.layer_ops.silu_and_mul(self.gate_up_proj(x)))
        return out
