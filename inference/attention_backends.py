"""Choose the attention backend for a device, reference or Triton: the write_kv / paged_attention pair plus the
elementwise layer ops that go with it (eager torch ops, or fused Triton kernels)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog
import torch
from torch import nn

from inference import attention as reference
from inference import envs
from inference.errors import EngineError
from inference.layer_ops import EAGER_OPS, LayerOps
from inference.metadata import AttentionMetadata

log = structlog.get_logger(__name__)

BackendName = Literal["auto", "reference", "triton"]
BACKEND_NAMES: tuple[str, ...] = ("auto", "reference", "triton")

WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttention = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


class AttentionBackendError(EngineError):
    """The requested attention backend cannot run on this device or installation."""


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    """One backend's two attention entry points, which keep the contract of inference.attention (the oracle), and
    the layer ops its models run (RMSNorm, SiLU-and-mul, q/k norm + RoPE), which agree with `EAGER_OPS`."""

    name: str
    write_kv: WriteKV
    paged_attention: PagedAttention
    layer_ops: LayerOps = EAGER_OPS


REFERENCE = AttentionBackend("reference", reference.write_kv, reference.paged_attention)


def triton_available() -> bool:
    """Whether the triton package is installed (found without importing it: importing triton is slow)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether TRITON_INTERPRET is on, which lets Triton kernels run (slowly) on CPU tensors."""
    return envs.flag(envs.TRITON_INTERPRET)


def get_attention_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """The backend for `device`: "auto" is Triton on CUDA when triton is installed, the reference otherwise.

    "triton" runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests only). Raises AttentionBackendError for an
    unknown name or a backend this device cannot run. Cached per (device type, name): cheap to call per layer.
    """
    return _resolve(torch.device(device).type, name)


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> int:
    """Point every attention layer of `model` (each module with an `attn_backend` attribute) at `backend`, and every
    module with a `layer_ops` attribute at its layer ops.

    Returns how many attention layers were set, so a caller can tell a model that does not route through backends.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = backend  # type: ignore[assignment]  # nn.Module's stubs: Tensor | Module
            count += 1
        if hasattr(module, "layer_ops"):
            module.layer_ops = backend.layer_ops  # type: ignore[assignment]  # nn.Module's stubs: Tensor | Module
    return count


@functools.cache
def _resolve(device_type: str, name: str) -> AttentionBackend:
    if name not in BACKEND_NAMES:
        raise AttentionBackendError(
            f"unknown attention backend {name!r}", hint=f"use one of: {', '.join(BACKEND_NAMES)}"
        )
    if name == "reference" or (name == "auto" and (device_type != "cuda" or not triton_available())):
        return REFERENCE
    if not triton_available():
        raise AttentionBackendError(
            "the triton attention backend needs the triton package",
            hint="pip install triton, or use 'reference'",
        )
    if device_type != "cuda" and not triton_interpreted():
        raise AttentionBackendError(
            f"the triton attention backend does not run on {device_type}",
            hint="use 'reference' (or set TRITON_INTERPRET=1 before triton is imported, for tests)",
        )
    # imported here: triton must stay out of CPU-only engine imports
    from inference import triton_attention, triton_layers

    spec = envs.text(envs.TRITON_TILES)
    if spec:
        try:
            triton_attention.set_tiles(triton_attention.Tiles.parse(spec))
        except ValueError as exc:
            raise AttentionBackendError(
                f"{envs.TRITON_TILES}={spec!r}: {exc}",
                hint="unset it for the default tiles; see docs/cuda.md for the names",
            ) from None

    log.info("attention_backend", backend="triton", device=device_type, tiles=triton_attention.tiles().spec())
    return AttentionBackend(
        "triton", triton_attention.write_kv, triton_attention.paged_attention, triton_layers.TRITON_OPS
    )
