"""The engine's settings: one frozen `EngineConfig`, validated when it is built, taken by `LLMEngine`,
`ModelRunner` and `Scheduler` (and `AsyncEngine.from_model`). Imports no torch: the config file's `model`
section is turned into one without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

from inference.errors import EngineError

if TYPE_CHECKING:
    from inference.model_config import ModelConfig

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# Weight quantization at load (`inference.loader.load_model(quantize=...)`, docs/engine.md "Quantization"):
# "auto" keeps a GGUF file's quantized tensors where the model runs in bfloat16 on the CPU (or bf16/fp16 on CUDA with
# triton) and loads everything else in float; "none" is always float (the oracle path); "int8" / "int4" quantize the linear layers at load
# (int4 group-wise with `quantize_group_size` inputs per scale); the output head is int8 in every mode.
QUANTIZE_MODES = ("auto", "none", "int8", "int4")
QUANTIZE_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel (and our Triton one) takes
DEFAULT_QUANTIZE_GROUP_SIZE = 32  # GGUF's Q4 block size; 64 measured no faster and slightly less accurate


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How big the engine's batches and KV cache are, and how it runs on CUDA.

    KV cache size: `num_blocks` if given, else `kv_cache_memory` (bytes, or a fraction <= 1 of free memory).
    On CUDA without either, a profiling step measures peak memory and the cache gets what
    `gpu_memory_utilization` of the GPU leaves (inference/memory_profile.py); on the CPU the default is a
    quarter of free RAM, capped (inference/model_runner.py). `max_model_len` None is the model's
    `max_position_embeddings` (see `max_model_len_for`). `enforce_eager` turns CUDA-graph decode off.
    `attention_backend` is "auto" (Triton on CUDA, the reference elsewhere), "reference" or "triton"
    (inference/attention_backends.py, which rejects other names). `max_loras` is how many LoRA adapters may be
    resident on the device, and so run in one step (inference/lora.py); `lora_kernels` is how their updates run:
    "auto" (the Triton kernels of inference/triton_lora.py on CUDA, torch elsewhere), "torch" or "triton";
    `max_lora_rank` is the rank each projection's Triton LoRA buffers hold (larger adapters run on torch, eagerly).
    `compile` runs CPU decode steps of up to 8 rows through torch.compile (inference/compiled_decode.py): compiled at
    start (one to three minutes the first time, then inductor's disk cache), eager where it cannot compile.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | float | None = None
    num_blocks: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    enforce_eager: bool = False
    attention_backend: str = "auto"
    max_loras: int = 4
    lora_kernels: str = "auto"
    max_lora_rank: int = 16
    compile: bool = False
    fused_decode: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank"):
            _check_count(name, getattr(self, name))
        for name in ("max_model_len", "num_blocks"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        memory = self.kv_cache_memory
        if memory is not None and not (_is_number(memory) and memory > 0):
            raise EngineError(
                f"kv_cache_memory must be a positive number, got {memory!r}",
                "give bytes (such as 536870912) or a fraction <= 1 of free memory (such as 0.3)",
            )
        utilization = self.gpu_memory_utilization
        if not (_is_number(utilization) and 0 < utilization <= 1):
            raise EngineError(
                f"gpu_memory_utilization must be in (0, 1], got {utilization!r}",
                "use a fraction such as 0.9 (the share of the GPU's memory the engine may use)",
            )
        for name in ("enable_prefix_caching", "enforce_eager", "compile", "fused_decode"):
            if not isinstance(getattr(self, name), bool):
                raise EngineError(f"{name} must be true or false, got {getattr(self, name)!r}", "use a bool")
        if not (isinstance(self.attention_backend, str) and self.attention_backend):
            raise EngineError(
                f"attention_backend must be a backend name, got {self.attention_backend!r}",
                'use "auto", "reference" or "triton"',
            )
        if self.lora_kernels not in ("auto", "torch", "triton"):
            raise EngineError(
                f"lora_kernels must be a kernel choice, got {self.lora_kernels!r}",
                'use "auto", "torch" or "triton"',
            )

    def max_model_len_for(self, model_config: ModelConfig) -> int:
        """The context length the engine serves for this model: `max_model_len`, at most the model's
        `max_position_embeddings` (which it is when unset)."""
        limit = model_config.max_position_embeddings
        return min(self.max_model_len or limit, limit)


def check_quantize(mode: object, group_size: object) -> None:
    """EngineError unless `mode` is one of QUANTIZE_MODES and `group_size` one of QUANTIZE_GROUP_SIZES."""
    if mode not in QUANTIZE_MODES:
        raise EngineError(f"unknown quantize mode {mode!r}", f"use one of: {', '.join(QUANTIZE_MODES)}")
    if not (_is_int(group_size) and group_size in QUANTIZE_GROUP_SIZES):
        raise EngineError(
            f"quantize_group_size must be one of {', '.join(map(str, QUANTIZE_GROUP_SIZES))}, got {group_size!r}",
            "32 (the default) matches GGUF's 4-bit blocks",
        )


def _check_count(name: str, value: object) -> None:
    if not (_is_int(value) and value >= 1):
        raise EngineError(f"{name} must be an integer >= 1, got {value!r}", f"set {name} to 1 or more")
