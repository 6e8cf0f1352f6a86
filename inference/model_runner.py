"""Owns the model and its paged KV cache: sizes the cache, flattens a scheduled batch into model inputs,
runs one forward pass and returns logits for the sequences that sample this step."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import structlog
import torch

from inference.attention_backends import get_attention_backend, set_attention_backend
from inference.compiled_decode import (
    DEFAULT_MAX_COMPILED_ROWS,
    CompiledDecode,
    compile_unsupported,
    failure_reason,
)
from inference.config import EngineConfig
from inference.cpu_linear import pack_linear_weights
from inference.cuda_graphs import DecodeGraphRunner, cuda_graphs_unsupported
from inference.errors import KVBudgetError
from inference.fused_decode import CHECK_TOLERANCE, FusedDecode, failure_line, fused_unsupported
from inference.metadata import AttentionMetadata, HostBatch
from inference.model_config import ModelConfig
from inference.models.llama import LlamaForCausalLM
from inference.sequence import Sequence

if TYPE_CHECKING:
    from inference.lora import LoRAManager
    from inference.models.layers import CausalLM

log = structlog.get_logger(__name__)

DEFAULT_KV_FRACTION = 0.25
# without an explicit budget, take at most this much (or two maximal requests if that is more): a fraction of a
# big host's free memory would be many GiB of zeroed cache that an agent never fills
DEFAULT_KV_CAP = 1 << 30


def configure_threads() -> int:
    """Use every core this process may run on (2 here); torch's default can oversubscribe shared machines."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    return cores


def make_current(device: torch.device) -> None:
    """Make `device` the calling thread's current GPU (nothing to do off CUDA). Triton launches on the current
    device, and CUDA graph capture streams and events are created there, whatever device the tensors are on;
    the current device is per thread."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """`kv[2, layers, num_blocks, block_size, kv_heads, head_dim]` in the model's dtype."""
    # zeros, not empty: the attention gathers whole blocks and masks the tail, and 0 * NaN garbage is NaN
    return torch.zeros(
        2,
        config.num_layers,
        num_blocks,
        block_size,
        config.num_kv_heads,
        config.head_dim,
        dtype=config.dtype,
        device=device,
    )


def plan_num_blocks(
    model_config: ModelConfig, config: EngineConfig, device: torch.device, *, planned: int | None = None
) -> int:
    """Number of KV blocks (null block included): `planned` (a count sized elsewhere: the CUDA memory profile),
    else the config's `num_blocks`, else its `kv_cache_memory` budget, else a capped share of free memory.
    KVBudgetError if one maximal request cannot fit."""
    block_size, max_model_len = config.block_size, config.max_model_len_for(model_config)
    kv_cache_memory = config.kv_cache_memory
    num_blocks = planned if planned is not None else config.num_blocks
    per_block = model_config.kv_bytes_per_token() * block_size
    need = -(-max_model_len // block_size) + 1
    if num_blocks is None:
        if kv_cache_memory is None:
            free = int(free_memory_bytes(device) * DEFAULT_KV_FRACTION)
            budget = min(free, max(DEFAULT_KV_CAP, 2 * need * per_block))
        elif isinstance(kv_cache_memory, float) and 0 < kv_cache_memory <= 1:
            budget = int(free_memory_bytes(device) * kv_cache_memory)
        else:
            budget = int(kv_cache_memory)
        num_blocks = budget // per_block
    if num_blocks < need:
        have_mib = num_blocks * per_block / 2**20
        need_mib = need * per_block / 2**20
        raise KVBudgetError(
            f"KV cache of {num_blocks} blocks ({have_mib:.1f} MiB) cannot hold one {max_model_len}-token request "
            f"({need_mib:.1f} MiB)",
            "raise kv_cache_memory / num_blocks, or lower max_model_len",
        )
    return int(num_blocks)


class BlockTableCache:
    """The previous step's padded block tables, so that steady decoding copies rows and writes only the blocks
    added since, instead of flattening every table again (O(total blocks) Python work per step).

    Rows are keyed by the block-table list itself: block tables are append-only lists, and freeing a sequence's
    blocks gives it a new list, so a list seen last step holds last step's row plus new entries at its end. The
    cache keeps last step's lists alive, which keeps their ids unique.
    """

    __slots__ = ("_index", "_lens", "_lists", "_tables")

    def __init__(self) -> None:
        self._lists: list[list[int]] = []
        self._index: dict[int, int] = {}
        self._lens = np.zeros(0, dtype=np.int64)
        self._tables = np.zeros((0, 0), dtype=np.int32)

    def build(self, lists: list[list[int]], lens: np.ndarray) -> np.ndarray:
        """`[len(lists), max(lens)]` int32 tables padded with 0 (a new array each step: last step's may still be
        in use as a zero-copy model input)."""
        n, width = len(lists), int(lens.max())
        get = self._index.get
        rows = np.fromiter((get(id(t), -1) for t in lists), dtype=np.int64, count=n)
        hit = rows >= 0
        if hit.sum() * 2 < n:  # mostly new lists (admissions, preemptions): one flattening is cheaper
            tables = _flatten_tables(lists, lens, width)
        else:
            tables = np.zeros((n, width), dtype=np.int32)
            w = min(width, self._tables.shape[1])
            src = rows[hit]
            tables[hit, :w] = self._tables[src, :w]
            done = np.zeros(n, dtype=np.int64)
            done[hit] = self._lens[src]
            changed = np.flatnonzero(done != lens).tolist()  # grown tables (about one in block_size), misses
            for i in changed:
                a = int(done[i])
                if a > lens[i]:  # not append-only after all: rewrite the row
                    tables[i] = 0
                    a = 0
                tables[i, a : lens[i]] = lists[i][a:]
        self._lists, self._lens, self._tables = lists, lens, tables
        self._index = {id(t): i for i, t in enumerate(lists)}
        return tables


def _flatten_tables(lists: list[list[int]], lens: np.ndarray, width: int) -> np.ndarray:
    tables = np.zeros((len(lists), width), dtype=np.int32)
    # row-major mask order is the concatenation order of the tables: one vectorised fill instead of n row copies
    flat = itertools.chain.from_iterable(lists)
    tables[np.arange(width) < lens[:, None]] = np.fromiter(flat, dtype=np.int32, count=int(lens.sum()))
    return tables


def build_host_batch(
    items: SequenceT[tuple[Sequence, int]], block_size: int, tables: BlockTableCache | None = None
) -> tuple[HostBatch, list[Sequence]]:
    """Flatten `(sequence, num_new_tokens)` pairs into host arrays; also returns the sequences that sample this step.

    Each sequence's new tokens start at its `num_computed_tokens`; it samples when the step reaches its last token.
    `tables` (the runner's, reused step after step) makes the block tables cost O(new blocks) in steady decoding.
    """
    n = len(items)
    seqs = [s for s, _ in items]
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=n)
    lens = np.fromiter((k for _, k in items), dtype=np.int64, count=n)
    ends = starts + lens
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=qsl[1:])
    total = int(qsl[-1])
    token_lists = [s.token_ids for s in seqs]
    if total == n:  # one new token each (decodes, 1-token prefill chunks): the token at num_computed_tokens
        ids = np.fromiter(map(list.__getitem__, token_lists, starts.tolist()), np.int64, n)
        seq_of_token = np.arange(n)
        positions = starts
    else:
        chunks = (t[a:b] for t, a, b in zip(token_lists, starts.tolist(), ends.tolist(), strict=True))
        ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=total)
        seq_of_token = np.repeat(np.arange(n), lens)
        positions = np.repeat(starts - qsl[:-1], lens) + np.arange(total)
    block_lists = [s.block_table for s in seqs]
    table_lens = np.fromiter(map(len, block_lists), dtype=np.int64, count=n)
    if tables is None:
        block_tables = _flatten_tables(block_lists, table_lens, int(table_lens.max()))
    else:
        block_tables = tables.build(block_lists, table_lens)
    slots = (
        block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    num_tokens = np.fromiter(map(len, token_lists), dtype=np.int64, count=n)
    sample_rows = np.flatnonzero(ends == num_tokens)
    host = HostBatch(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=qsl.astype(np.int32),
        context_lens=ends.astype(np.int32),
        block_tables=block_tables,
        sample_indices=qsl[1:][sample_rows] - 1,
        max_query_len=int(lens.max()),
        max_context_len=int(ends.max()),
    )
    return host, seqs if len(sample_rows) == n else [seqs[i] for i in sample_rows.tolist()]


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the hidden states whose logits are needed
    sample_seqs: list[Sequence]
    samples_every_row: bool = False  # sample_indices is every row in order: the hidden states need no gather


@dataclass(slots=True)
class _Staging:
    """One pinned int64 and one pinned int32 host buffer, grown to a power of two, and the event of their copies."""

    b64: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    b32: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    np64: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    np32: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    event: torch.cuda.Event | None = None


class HostStager:
    """Moves a step's host arrays to the device in two copies (all int64 fields, then all int32 fields) from
    reusable staging buffers, pinned on CUDA so that the copies are non-blocking.

    Two staging sets alternate; a set is rewritten only after the event recorded behind its previous copies, since a
    step that samples nothing returns without synchronising with the device.
    """

    def __init__(self, device: torch.device, *, pin: bool | None = None, sets: int = 2) -> None:
        self.device = device
        self.pin = device.type == "cuda" if pin is None else pin
        self._sets = [_Staging(event=torch.cuda.Event() if self.pin else None) for _ in range(sets)]
        self._turn = 0

    def _buffers(self, st: _Staging, n64: int, n32: int) -> None:
        if st.b64.numel() < n64:
            st.b64 = torch.empty(_capacity(n64), dtype=torch.int64, pin_memory=self.pin)
            st.np64 = st.b64.numpy()
        if st.b32.numel() < n32:
            st.b32 = torch.empty(_capacity(n32), dtype=torch.int32, pin_memory=self.pin)
            st.np32 = st.b32.numpy()

    def upload(self, host: HostBatch, sample_seqs: list[Sequence], block_size: int) -> StepInputs:
        t, s, k = host.num_tokens, host.num_seqs, int(host.sample_indices.shape[0])
        w = host.block_tables.shape[1]
        # Every field starts 16-byte aligned: Triton specialises kernels on pointer alignment, and a field whose
        # alignment changed with the batch size would compile a second variant of each kernel mid-run.
        t2 = _align(t, 2)
        pos, slot, samp = t2, 2 * t2, 3 * t2
        ctx = _align(s + 1, 4)
        tab = ctx + _align(s, 4)
        n64, n32 = samp + k, tab + s * w
        st = self._sets[self._turn]
        self._turn = (self._turn + 1) % len(self._sets)
        if st.event is not None:
            st.event.synchronize()  # this set's previous copies have left the buffers
        self._buffers(st, n64, n32)
        a64, a32 = st.np64, st.np32
        a64[:t] = host.input_ids
        a64[pos : pos + t] = host.positions
        a64[slot : slot + t] = host.slot_mapping
        a64[samp:n64] = host.sample_indices
        a32[: s + 1] = host.query_start_loc
        a32[ctx : ctx + s] = host.context_lens
        a32[tab:n32] = host.block_tables.reshape(-1)
        # copy=True: a device tensor of its own even when the device is the CPU (tests), never a view of staging
        d64 = st.b64[:n64].to(self.device, non_blocking=True, copy=True)
        d32 = st.b32[:n32].to(self.device, non_blocking=True, copy=True)
        if st.event is not None:
            st.event.record()
        meta = AttentionMetadata(
            slot_mapping=d64[slot : slot + t],
            query_start_loc=d32[: s + 1],
            context_lens=d32[ctx : ctx + s],
            block_tables=d32[tab:n32].view(s, w),
            max_query_len=host.max_query_len,
            max_context_len=host.max_context_len,
            block_size=block_size,
        )
        return StepInputs(
            input_ids=d64[:t],
            positions=d64[pos : pos + t],
            meta=meta,
            sample_indices=d64[samp:n64],
            sample_seqs=sample_seqs,
            samples_every_row=k == t,
        )


def _align(n: int, elements: int) -> int:
    """n rounded up to a multiple of `elements` (16 bytes of int64 or int32 values)."""
    return -(-n // elements) * elements


def _capacity(n: int) -> int:
    return max(1024, 1 << (n - 1).bit_length())


def zero_copy_inputs(host: HostBatch, sample_seqs: list[Sequence], block_size: int) -> StepInputs:
    """CPU tensors that share memory with the host arrays (no copies at all)."""
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(host.slot_mapping),
        query_start_loc=torch.from_numpy(host.query_start_loc),
        context_lens=torch.from_numpy(host.context_lens),
        block_tables=torch.from_numpy(host.block_tables),
        max_query_len=host.max_query_len,
        max_context_len=host.max_context_len,
        block_size=block_size,
    )
    return StepInputs(
        input_ids=torch.from_numpy(host.input_ids),
        positions=torch.from_numpy(host.positions),
        meta=meta,
        sample_indices=torch.from_numpy(host.sample_indices),
        sample_seqs=sample_seqs,
        samples_every_row=host.sample_indices.shape[0] == host.num_tokens,
    )


class ModelRunner:
    """Runs the model over flattened varlen batches against one preallocated KV cache.

    On CUDA with the Triton backend, decode-only steps of up to min(max_num_seqs, 256) sequences replay CUDA graphs
    (see inference.cuda_graphs) unless `enforce_eager`; prefill, mixed and larger steps run eagerly.
    """

    def __init__(
        self, model: CausalLM, model_config: ModelConfig, engine_config: EngineConfig, *, num_blocks: int
    ) -> None:
        """`num_blocks` is the planned KV cache size (plan_num_blocks), null block included."""
        self.model = model
        self.model_config = model_config
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.num_blocks = num_blocks
        self.max_model_len = engine_config.max_model_len_for(model_config)
        self.device = next(model.parameters()).device
        self.attention = get_attention_backend(self.device, engine_config.attention_backend)
        set_attention_backend(model, self.attention)
        configure_threads()
        if self.device.type == "cpu":
            pack_linear_weights(model)  # bf16 only; same results, about half the matmul time at decode sizes
        self.kv_cache = allocate_kv_cache(model_config, num_blocks, self.block_size, self.device)
        self._stager = HostStager(self.device) if self.device.type != "cpu" else None
        self._tables = BlockTableCache()
        self.lora: LoRAManager | None = None  # set by the engine: LoRA adapters applied per row group
        self.decode_graphs: DecodeGraphRunner | None = None
        self.compiled: CompiledDecode | None = None
        self.fused: FusedDecode | None = None
        if engine_config.fused_decode:
            self.build_fused_decode()
        if engine_config.compile and self.fused is not None:
            # the fused step takes every decode step: graphs would only cost their minutes of compiling
            log.info("compiled_decode_off", reason="the fused decode step serves every decode step")
        elif engine_config.compile:
            self.build_compiled_decode()
        why_not = cuda_graphs_unsupported(
            self.device, self.attention.name, model_config, enforce_eager=engine_config.enforce_eager
        )
        if why_not is None:
            self.build_decode_graphs()
        elif self.device.type == "cuda":
            log.info("cuda_graphs_off", reason=why_not)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @property
    def decode_path(self) -> str:
        """How decode steps run now: "cuda graphs", "fused" (one C++ call), "compiled" (torch.compile) or "eager"
        (op by op; also what a failed fused or compiled step leaves)."""
        if self.decode_graphs is not None:
            return "cuda graphs"
        if self.fused is not None and self.fused.failed is None:
            return "fused"
        if self.compiled is not None and self.compiled.failed is None:
            return "compiled"
        return "eager"

    def build_decode_graphs(
        self, *, capture: bool | None = None, batch_sizes: SequenceT[int] | None = None
    ) -> DecodeGraphRunner:
        """Route decode steps through static buffers: captured CUDA graphs, or (`capture=False`, any device) the
        same padded static-buffer path run eagerly. Capturing is the default on CUDA."""
        self.decode_graphs = DecodeGraphRunner(
            self.model,
            self.kv_cache,
            max_num_seqs=self.engine_config.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            capture=self.device.type == "cuda" if capture is None else capture,
            batch_sizes=batch_sizes,
        )
        return self.decode_graphs

    def build_compiled_decode(
        self, *, backend: str | Callable[..., Any] = "inductor"
    ) -> CompiledDecode | None:
        """Compile the decode step now (`backend` other than inductor: tests); where it cannot run, or compiling
        fails, log why and stay eager."""
        why_not = compile_unsupported(self.device, self.attention.name, self.model_config)
        if why_not is not None:
            log.warning("compiled_decode_off", reason=why_not)
            return None
        compiled = CompiledDecode(
            self.model,
            self.kv_cache,
            max_rows=min(self.engine_config.max_num_seqs, DEFAULT_MAX_COMPILED_ROWS),
            backend=backend,
        )
        eager = self.attention
        set_attention_backend(self.model, compiled.attention)
        log.info(
            "compiling_decode",
            max_rows=compiled.max_rows,
            note="a minute or more the first time; later starts read inductor's disk cache",
        )
        try:
            seconds = compiled.warm_up()
        except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...: eager serves every step
            log.warning("compiled_decode_failed", reason=failure_reason(exc), fallback="eager")
            set_attention_backend(self.model, eager)
            self.compiled = None
            return None
        self.attention = compiled.attention  # the reference when eager, the traceable pair while compiling
        log.info(
            "decode_compiled",
            seconds=round(seconds, 1),
            max_rows=compiled.max_rows,
            backend=getattr(backend, "__name__", backend),
        )
        self.compiled = compiled
        return compiled

    def build_fused_decode(self) -> FusedDecode | None:
        """Run decode steps in one C++ call where the model allows it (inference/fused_decode.py), checked against
        the eager step first; where it does not, or the check fails, log why and stay op by op."""
        why_not = fused_unsupported(self.model, self.kv_cache, self.attention.name)
        if why_not is not None:
            log.debug("fused_decode_off", reason=why_not)
            return None
        fused = FusedDecode(cast(LlamaForCausalLM, self.model), self.kv_cache)
        try:
            error = fused.check()
        except RuntimeError as exc:
            log.warning("fused_decode_failed", reason=failure_line(exc), fallback="eager")
            return None
        if not error < CHECK_TOLERANCE:
            log.warning("fused_decode_wrong", relative_error=error, fallback="eager")
            return None
        log.debug("fused_decode_ready", relative_error=error)
        self.fused = fused
        return fused

    def _to_device(self, host: HostBatch, sample_seqs: list[Sequence]) -> StepInputs:
        if self._stager is None:
            return zero_copy_inputs(host, sample_seqs, self.block_size)
        return self._stager.upload(host, sample_seqs, self.block_size)

    def _adapters_hooked(self) -> bool:
        """Whether LoRA hooks sit on the model: the compiled graphs were traced without them."""
        return self.lora is not None and self.lora.hooked

    @torch.inference_mode()
    def run(self, items: SequenceT[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, list[Sequence]]:
        """One forward pass; returns `[num_sampling, vocab]` float32 logits (or None) and the sequences they belong to."""
        lora = self.lora
        if lora is None:
            return self._run(items, graphs_ok=True)
        items = lora.begin_step(items, self.kv_cache)  # each adapter's rows contiguous; X-LoRA gates
        try:
            # the base graphs hold no adapters; steps on the Triton LoRA kernels have graphs of their own
            kernels = lora.kernel_step
            return self._run(items, graphs_ok=kernels or not lora.active, lora=lora if kernels else None)
        finally:
            lora.end_step()

    def _run(
        self, items: SequenceT[tuple[Sequence, int]], *, graphs_ok: bool, lora: LoRAManager | None = None
    ) -> tuple[torch.Tensor | None, list[Sequence]]:
        host, sample_seqs = build_host_batch(items, self.block_size, self._tables)
        graphs = self.decode_graphs
        if graphs is not None and graphs_ok and graphs.fits(host):
            hidden = graphs.run(host, lora)
            if not sample_seqs:
                return None, []
            if len(sample_seqs) != host.num_tokens:
                hidden = hidden[torch.from_numpy(host.sample_indices).to(self.device)]
            return self.model.compute_logits(hidden), sample_seqs
        inputs = self._to_device(host, sample_seqs)
        compiled, fused = self.compiled, self.fused
        ran: torch.Tensor | None = None
        if fused is not None and graphs_ok and not self._adapters_hooked() and fused.fits(host):
            ran = fused.run(inputs.input_ids, inputs.positions, inputs.meta)
        elif compiled is not None and graphs_ok and not self._adapters_hooked() and compiled.fits(host):
            ran = compiled.run(inputs.input_ids, inputs.positions, inputs.meta)
        hidden = (
            ran
            if ran is not None
            else self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        )
        if not sample_seqs:
            return None, []
        if not inputs.samples_every_row:
            hidden = hidden[inputs.sample_indices]
        return self.model.compute_logits(hidden), sample_seqs
