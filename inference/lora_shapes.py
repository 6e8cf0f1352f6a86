"""LoRA shapes from a model's config alone: each adapted module's input and shard outputs, and the Triton path's
per-slot buffers (what LoRASlots allocates and the KV-cache profile reserves). Imports neither triton nor adapters."""

from __future__ import annotations

import torch

from inference.model_config import ModelConfig

LORA_RANK_STEP = 16  # the Triton buffers hold rank columns in multiples of this (tl.dot's smallest dimension)


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, list[int]]]:
    """Our module -> (input size, output size of each shard)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "self_attn.qkv_proj": (hidden, [q, kv, kv]),
        "self_attn.o_proj": (q, [hidden]),
        "mlp.gate_up_proj": (hidden, [inter, inter]),
        "mlp.down_proj": (inter, [hidden]),
    }


def lora_rank_columns(cols: int) -> int:
    """`cols` rank columns rounded up as the Triton LoRA buffers hold them (a multiple of LORA_RANK_STEP)."""
    return -(-cols // LORA_RANK_STEP) * LORA_RANK_STEP


def lora_buffer_shapes(config: ModelConfig, max_rank: int) -> dict[tuple[int, str], tuple[int, int, int]]:
    """Per (layer, module): `(in, out, rank columns)` of the Triton path's buffers, `max_rank` per projection (a
    fused qkv_proj holds 3x, gate_up_proj 2x), the columns rounded as the buffers round them."""
    return {
        (layer, module): (in_dim, sum(outs), lora_rank_columns(len(outs) * max_rank))
        for layer in range(config.num_layers)
        for module, (in_dim, outs) in module_shapes(config).items()
    }


def lora_buffer_bytes(config: ModelConfig, max_loras: int, max_rank: int) -> int:
    """Device bytes of the Triton path's weight buffers (`max_loras` slots of `max_rank`, model dtype): known from
    the model's shapes alone, so the KV-cache profile reserves them before any adapter exists."""
    elem = torch.empty((), dtype=config.dtype).element_size()
    per_slot = sum(cols * (k + n) for k, n, cols in lora_buffer_shapes(config, max_rank).values())
    return max_loras * per_slot * elem
