"""The Llama-style decoder over the paged KV cache; covers Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (qk norm)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from inference.attention_backends import REFERENCE, AttentionBackend
from inference.cpu_linear import packed_linear
from inference.layer_ops import EAGER_OPS, LayerOps
from inference.metadata import AttentionMetadata
from inference.model_config import ModelConfig
from inference.models.layers import CausalLM, GatedMLP, RMSNorm, RotaryEmbedding


class Attention(nn.Module):
    """Fused qkv projection, optional per-head q/k RMSNorm, RoPE, cache write, paged attention, output projection."""

    layer_ops: LayerOps = EAGER_OPS

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.eps = config.rms_norm_eps
        # The reference until the model runner sets the device's backend (attention_backends).
        self.attn_backend: AttentionBackend = REFERENCE

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_layer: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q_norm, k_norm = self.q_norm, self.k_norm
        q, k = self.layer_ops.norm_rotary(
            q,
            k,
            cos,
            sin,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            self.eps,
        )
        self.attn_backend.write_kv(kv_layer, k, v, meta.slot_mapping)
        o = self.attn_backend.paged_attention(q, kv_layer, meta, self.scale)
        out: torch.Tensor = self.o_proj(o.reshape(t, self.q_size))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried beside the hidden states, so that each residual add is fused
    with the norm that follows it (`RMSNorm.forward_add`): the same sums as `x + attn(norm(x))`, fewer passes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's MLP output, the residual stream before it); the next block adds the two."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.forward_add(x, residual)
        x = self.self_attn(x, rope, meta, kv_layer)
        x, residual = self.post_attention_layernorm.forward_add(x, residual)
        return self.mlp(x), residual


# HF checkpoint suffix -> (our parameter suffix, shard index) for the fused projections.
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(CausalLM):
    """`model(input_ids [T], positions [T], meta, kv_cache) -> hidden [T, hidden]`; `compute_logits` -> float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # the tied head's weight in oneDNN's layout, set on the CPU by inference.cpu_linear (not a parameter)
        self.packed_head: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, meta, kv_cache[:, i])
        if residual is None:
            normed: torch.Tensor = self.norm(x)
            return normed
        return self.norm.forward_add(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            logits: torch.Tensor = self.lm_head(hidden)
            return logits.float()
        if self.packed_head is not None:
            return packed_linear(hidden, self.packed_head, None).float()
        return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()

    # ---- weights -------------------------------------------------------------------------------------------

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...) into our fused parameters.

        Raises KeyError naming any expected parameter that never arrived.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name.startswith("lm_head.") and self.lm_head is None:
                continue  # tied: the embedding is the head
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            packed = _PACKED.get(parts[-2]) if len(parts) >= 2 else None
            if packed is not None:
                fused, shard = packed
                target = ".".join([*parts[:-2], fused, parts[-1]])
                param = params[target]
                sizes = self._shard_sizes(fused)
                offset = sum(sizes[:shard])
                with torch.no_grad():
                    param.data[offset : offset + sizes[shard]].copy_(tensor)
                loaded.add(f"{target}#{shard}")
                continue
            if name not in params:
                raise KeyError(f"unexpected weight {hf_name!r}")
            with torch.no_grad():
                params[name].data.copy_(tensor)
            loaded.add(name)
        missing = []
        for name in params:
            fused = name.split(".")[-2] if "." in name else ""
            if fused in ("qkv_proj", "gate_up_proj"):
                shards = len(self._shard_sizes(fused))
                if any(f"{name}#{i}" not in loaded for i in range(shards)):
                    missing.append(name)
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise KeyError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")
