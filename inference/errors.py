"""Errors the engine raises to its users: a one-line reason and a hint (same shape as agent_runtime's)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of user-facing inference errors."""

    user_facing = True

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return self.reason if not self.hint else f"{self.reason} (hint: {self.hint})"


class ModelLoadError(EngineError):
    """A model could not be found, read or built (missing files, unknown architecture, no network)."""


class DeviceUnavailableError(ModelLoadError):
    """The requested device cannot be used here (`cuda` without a visible GPU or a CUDA build of torch)."""


class KVBudgetError(EngineError):
    """The KV cache budget cannot hold even one maximal request of this model."""


class RequestError(EngineError):
    """One request is invalid (empty or over-long prompt, bad sampling parameters); others are unaffected."""


class EngineStoppedError(EngineError):
    """The engine was closed, or its step thread died, while a request was waiting on it."""


class AdapterError(EngineError):
    """A LoRA adapter cannot be loaded or used with this model (missing files, a module we do not adapt, a rank
    or shape mismatch, an adapter made for another base model)."""


class UnknownAdapterError(RequestError):
    """A request names an adapter that is not loaded (or is being unloaded); other requests are unaffected."""


class QuantError(ModelLoadError):
    """Weights cannot be quantized, or loaded into our quantized layouts (inference/quant.py)."""


class UnsupportedQuantTypeError(QuantError):
    """A GGUF tensor is stored in a quantization type we cannot keep in our int8/int4 layouts."""


class QuantizeUnsupportedError(QuantError):
    """The requested quantization cannot run where the model is placed (CUDA, for now)."""


class GGUFFormatError(ModelLoadError):
    """A GGUF file is truncated or malformed."""
