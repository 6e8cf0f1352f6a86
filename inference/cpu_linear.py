"""oneDNN-packed weights for a bfloat16 model's linear layers on the CPU: the same results as `F.linear`, in about
half the time at decode batch sizes, where a step is bound by reading the weights.

`pack_linear_weights(model)` reorders each bf16 `nn.Linear` weight into oneDNN's blocked layout in place (same
size) and routes the layer through `mkldnn._linear_pointwise`, the kernel PyTorch's own CPU compiler uses for
frozen weights. Both run the bf16 matmul with fp32 accumulation, and their outputs are bit-identical (tested per
layer and on the whole model). A tied output head gets a packed copy of the embedding (the lookup needs the plain
table). oneDNN packs bf16 only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere (AVX2-only CPUs) the
weights stay plain. Set AGENT_RUNTIME_CPU_PACKED_LINEAR=0 to keep plain weights anywhere.
"""

from __future__ import annotations

import functools
import types
from typing import TypeGuard

import structlog
import torch
from torch import nn

from inference import envs

log = structlog.get_logger(__name__)


def packing_enabled() -> bool:
    """Whether this process packs CPU weights: this CPU can (`packing_supported`) and the variable does not turn
    it off."""
    return envs.flag(envs.CPU_PACKED_LINEAR, default=True) and packing_supported()


@functools.cache
def packing_supported() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU, found by packing a small one once: the requirement (which
    instruction sets) is oneDNN's and changes with its versions, so asking it beats reading CPU flags."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        pack_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError as exc:
        log.info("cpu_packed_linear_unsupported", reason=str(exc).splitlines()[0][:200])
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A `[out, in]` bf16 CPU weight in oneDNN's layout for `linear`; the batch-size hint 1 is the decode case (the
    packed weight serves every batch size, measured faster than the plain one from 1 to 1000 rows here)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return packed


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight from `pack_weight`."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.weight, self.bias)


def _plain_cpu_bf16(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not weight.is_mkldnn


def packable(module: nn.Module) -> TypeGuard[nn.Linear]:
    return isinstance(module, nn.Linear) and _plain_cpu_bf16(module.weight)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every bf16 CPU `nn.Linear` of `model` in place (idempotent), and give a model with a tied head
    (`packed_head` attribute, `lm_head` None) a packed copy of its embedding. Returns the layers packed now."""
    linears = [m for m in model.modules() if packable(m)]
    embed = getattr(model, "embed_tokens", None)
    tied_head = (
        hasattr(model, "packed_head")
        and getattr(model, "lm_head", None) is None
        and model.packed_head is None
        and isinstance(embed, nn.Embedding)
        and _plain_cpu_bf16(embed.weight)
    )
    # checked after the dtype so that a float32 model never asks oneDNN (nor logs that this CPU cannot pack)
    if not (linears or tied_head) or not packing_enabled():
        return 0
    with torch.no_grad():
        for module in linears:
            module.weight = nn.Parameter(pack_weight(module.weight), requires_grad=False)
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]  # this layer only
        if tied_head:
            model.packed_head = pack_weight(embed.weight)  # type: ignore[union-attr]  # tied_head: an nn.Embedding
    return len(linears) + int(tied_head)
