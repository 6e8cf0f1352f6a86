"""KV cache sizing on CUDA: one profiling step (a dummy prefill of the full token budget plus a worst-case
sampler pass) measures peak memory, a dummy decode of the largest graph bucket measures what the decode graphs'
pool will keep, the Triton LoRA path's buffers and scratch are computed from the shapes, and the KV cache gets what
`gpu_memory_utilization` leaves of the GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import torch

from inference.attention_backends import get_attention_backend, set_attention_backend
from inference.config import EngineConfig
from inference.errors import KVBudgetError
from inference.lora import uses_lora_kernels
from inference.lora_shapes import lora_buffer_bytes, lora_buffer_shapes
from inference.metadata import AttentionMetadata
from inference.model_config import ModelConfig
from inference.model_runner import allocate_kv_cache
from inference.params import SamplingParams
from inference.sampler import Sampler, SampleRequest

if TYPE_CHECKING:
    from inference.models.layers import CausalLM

log = structlog.get_logger(__name__)

_GIB = float(2**30)
_MIB = float(2**20)
_FP32 = 4  # bytes: the shrink's scratch is float32, the rows grouped by slot int32


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """Device memory around the profiling step, in bytes."""

    total: int  # the GPU's memory (mem_get_info)
    free: int  # free on the GPU after the step, with torch's unused cached blocks released
    torch_peak: int  # most bytes torch held at once during the step: weights + activations + sampler
    torch_reserved: int  # bytes torch's caching allocator still holds after releasing its unused blocks
    weights: int = 0  # bytes allocated before the step (weights, buffers); for logs
    graph_pool: int = 0  # peak of one decode step of the largest graph bucket: what the graphs' pool keeps
    lora: int = 0  # LoRAReserve.total when adapters will run on the Triton kernels, else 0 (not measured)

    @property
    def non_torch(self) -> int:
        """Memory torch does not account for: the CUDA context, library workspaces, other processes."""
        return max(0, self.total - self.free - self.torch_reserved)

    @property
    def activations(self) -> int:
        return max(0, self.torch_peak - self.weights)


@dataclass(frozen=True, slots=True)
class LoRAReserve:
    """Device bytes the Triton LoRA path (inference/lora.py, inference/triton_lora.py) needs beyond what the
    profiling steps measure, which run without adapters (none exists yet, and the buffers come later)."""

    buffers: int  # the per-slot weight buffers, allocated at the first adapter and kept
    step: (
        int  # a full-budget step's extra peak: the shrink's fp32 `h` (one projection's) and its rows by slot
    )
    graphs: (
        int  # the LoRA decode graphs: their largest bucket's `h` in the shared pool, and their static rows
    )

    @property
    def total(self) -> int:
        return self.buffers + self.step + self.graphs


def lora_reserve(model_config: ModelConfig, limits: StepLimits) -> LoRAReserve:
    """What the Triton LoRA path adds for `limits` (the config's `max_loras` slots at `max_lora_rank`), counted as
    the profile counts the rest: bytes allocated. A hooked projection's `h` is `[rows, R]` float32, `R` the widest
    buffer's rank columns (qkv_proj's), freed before the next projection's, so one is live at a time on top of the
    step's activations; a step's rows grouped by slot are `rows + 2 * max_loras` int32."""
    engine = limits.config
    slots, rows = engine.max_loras, limits.decode_graph_rows
    shapes = lora_buffer_shapes(model_config, engine.max_lora_rank)
    widest = max(cols for _, _, cols in shapes.values())

    def scratch(n: int) -> int:
        return n * widest * _FP32 + (n + 2 * slots) * _FP32

    return LoRAReserve(
        buffers=lora_buffer_bytes(model_config, slots, engine.max_lora_rank),
        step=scratch(engine.max_num_batched_tokens),
        graphs=scratch(rows) if rows > 0 else 0,
    )


def kv_cache_budget(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache (may be negative):
    `total * utilization - torch peak - decode graph pool - LoRA reserve - non-torch usage`.

    The same rule as vLLM: the engine may use `utilization` of the whole GPU, and everything else it needs at
    its peak (weights, the largest step's activations and sampler buffers), keeps for its life (the CUDA graphs'
    private memory pool, captured after the cache exists; the Triton LoRA buffers, made at the first adapter) or
    that is not torch's (CUDA context, cuBLAS/NCCL, other processes on the GPU) comes out of that share first.
    """
    return (
        int(profile.total * gpu_memory_utilization)
        - profile.torch_peak
        - profile.graph_pool
        - profile.lora
        - profile.non_torch
    )


def blocks_for_profile(
    profile: MemoryProfile,
    *,
    gpu_memory_utilization: float,
    bytes_per_block: int,
    block_size: int,
    max_model_len: int,
) -> int:
    """KV blocks (null block included) that fit the profiled budget; KVBudgetError if one request cannot fit."""
    budget = kv_cache_budget(profile, gpu_memory_utilization)
    num_blocks = max(0, budget) // bytes_per_block
    need = -(-max_model_len // block_size) + 1
    if num_blocks < need:
        lora = f", the LoRA buffers ({profile.lora / _GIB:.2f} GiB)" if profile.lora else ""
        lora_hint = " (or max_loras / max_lora_rank, or lora_kernels 'torch')" if profile.lora else ""
        raise KVBudgetError(
            f"gpu_memory_utilization {gpu_memory_utilization:g} of {profile.total / _GIB:.1f} GiB leaves "
            f"{budget / _MIB:.0f} MiB for the KV cache after the weights and peak activations "
            f"({profile.torch_peak / _GIB:.2f} GiB), the decode graphs ({profile.graph_pool / _GIB:.2f} GiB){lora} "
            f"and non-torch memory ({profile.non_torch / _GIB:.2f} GiB); "
            f"one {max_model_len}-token request needs {need * bytes_per_block / _MIB:.0f} MiB",
            "raise gpu_memory_utilization, lower max_model_len, max_num_batched_tokens or max_num_seqs"
            f"{lora_hint}, or free GPU memory held by other processes",
        )
    return int(num_blocks)


def dummy_query_lens(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Query lengths of the profiling prefill: the token budget in as few sequences as possible (at most
    `max_model_len` tokens each, at most `max_num_seqs` of them), since long sequences cost attention most."""
    lens: list[int] = []
    left = max_num_batched_tokens
    while left > 0 and len(lens) < max_num_seqs:
        n = min(left, max_model_len)
        lens.append(n)
        left -= n
    return lens


def dummy_metadata(
    query_lens: list[int], *, context_len: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata of a prefill whose sequences all end at `context_len` (a chunk at the end of a
    maximal context is the widest attention a real step can run). Every block table entry and slot is in the
    null block 0, so the step needs a one-block scratch cache and writes no real KV."""
    positions = torch.cat([torch.arange(context_len - q, context_len, dtype=torch.long) for q in query_lens])
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    n_blocks = -(-context_len // block_size)
    meta = AttentionMetadata(
        slot_mapping=(positions % block_size).to(device),
        query_start_loc=qsl.to(device),
        context_lens=torch.full((len(query_lens),), context_len, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(query_lens), n_blocks, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_context_len=context_len,
        block_size=block_size,
    )
    return positions.to(device), meta


@dataclass(frozen=True, slots=True)
class StepLimits:
    """The largest work the engine will schedule, which the profiling steps run: a prefill of the config's
    `max_num_batched_tokens` against a `max_model_len` context (the config's, for this model), `max_num_seqs`
    sampled rows, and (when > 0) a decode graph of `decode_graph_rows`; with the config's LoRA settings, what the
    Triton LoRA path adds (`lora_reserve`)."""

    config: EngineConfig
    max_model_len: int
    decode_graph_rows: int = 0


@torch.inference_mode()
def run_profile_step(model: CausalLM, config: ModelConfig, limits: StepLimits) -> list[int]:
    """The largest step the engine can schedule, on scratch memory: a prefill of `max_num_batched_tokens`
    tokens against a maximal context, then logits for `max_num_seqs` rows through the full sampler (top-k,
    top-p, min-p, penalties, logprobs, one generator per row). Returns the sampled ids (a real sync)."""
    engine = limits.config
    max_num_seqs, block_size = engine.max_num_seqs, engine.block_size
    device = next(model.parameters()).device
    set_attention_backend(model, get_attention_backend(device, engine.attention_backend))
    query_lens = dummy_query_lens(engine.max_num_batched_tokens, max_num_seqs, limits.max_model_len)
    positions, meta = dummy_metadata(
        query_lens, context_len=limits.max_model_len, block_size=block_size, device=device
    )
    scratch = allocate_kv_cache(config, 1, block_size, device)
    input_ids = torch.zeros(positions.shape[0], dtype=torch.long, device=device)
    hidden = model(input_ids, positions, meta, scratch)
    del scratch
    rows = max(max_num_seqs, len(query_lens))
    last = meta.query_start_loc[1:].long() - 1
    logits = model.compute_logits(hidden[last.repeat(-(-rows // len(query_lens)))[:rows]])
    del hidden
    params = SamplingParams(
        temperature=1.0,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logprobs=20,
    )
    requests = [
        SampleRequest(params, [1], [2], torch.Generator(device=device).manual_seed(i)) for i in range(rows)
    ]
    return Sampler(seed=0)(logits, requests).token_ids


@torch.inference_mode()
def run_decode_profile_step(
    model: CausalLM, config: ModelConfig, *, rows: int, max_model_len: int, block_size: int
) -> torch.Tensor:
    """One decode step of `rows` sequences shaped as a captured graph runs it (context bound `max_model_len`, so
    the widest split-KV launch), on a one-block scratch cache; returns the hidden states. Its transient memory is
    what the decode graphs' private pool will hold."""
    device = next(model.parameters()).device
    positions, meta = dummy_metadata(
        [1] * rows, context_len=max_model_len, block_size=block_size, device=device
    )
    scratch = allocate_kv_cache(config, 1, block_size, device)
    hidden: torch.Tensor = model(torch.zeros(rows, dtype=torch.long, device=device), positions, meta, scratch)
    return hidden


def _allocated_around(step: Callable[[], object]) -> tuple[int, int]:
    """(bytes torch had allocated before `step`, the most it held at once while `step` ran, to completion)."""
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return before, torch.cuda.max_memory_allocated()


def profile_cuda_memory(model: CausalLM, config: ModelConfig, limits: StepLimits) -> MemoryProfile:
    """Run the profiling steps on the model's GPU and read torch's peaks and the driver's free memory."""
    device = next(model.parameters()).device
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        weights, peak = _allocated_around(lambda: run_profile_step(model, config, limits))
        graph_pool = 0
        if limits.decode_graph_rows > 0:
            before, decode_peak = _allocated_around(
                lambda: run_decode_profile_step(
                    model,
                    config,
                    rows=limits.decode_graph_rows,
                    max_model_len=limits.max_model_len,
                    block_size=limits.config.block_size,
                )
            )
            graph_pool = decode_peak - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
    kernels = uses_lora_kernels(limits.config.lora_kernels, device)
    return MemoryProfile(
        total=total,
        free=free,
        torch_peak=peak,
        torch_reserved=reserved,
        weights=weights,
        graph_pool=graph_pool,
        lora=lora_reserve(config, limits).total if kernels else 0,
    )


def plan_cuda_kv_blocks(model: CausalLM, config: ModelConfig, limits: StepLimits) -> int:
    """Profile, then size the KV cache from what the config's `gpu_memory_utilization` of the GPU leaves (in
    blocks)."""
    profile = profile_cuda_memory(model, config, limits)
    gpu_memory_utilization = limits.config.gpu_memory_utilization
    block_size, max_model_len = limits.config.block_size, limits.max_model_len
    bytes_per_block = config.kv_bytes_per_token() * block_size
    num_blocks = blocks_for_profile(
        profile,
        gpu_memory_utilization=gpu_memory_utilization,
        bytes_per_block=bytes_per_block,
        block_size=block_size,
        max_model_len=max_model_len,
    )
    log.info(
        "kv cache sized from profile",
        gpu_gib=round(profile.total / _GIB, 2),
        utilization=gpu_memory_utilization,
        weights_gib=round(profile.weights / _GIB, 2),
        activations_gib=round(profile.activations / _GIB, 2),
        decode_graphs_gib=round(profile.graph_pool / _GIB, 3),
        lora_gib=round(profile.lora / _GIB, 3),
        non_torch_gib=round(profile.non_torch / _GIB, 2),
        kv_gib=round(num_blocks * bytes_per_block / _GIB, 2),
        kv_blocks=num_blocks,
    )
    return num_blocks
