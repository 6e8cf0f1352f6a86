"""CUDA graphs for decode: static input buffers, one graph per batch-size bucket, padding rows on the null block;
with `capture=False` the same static-buffer path runs eagerly (how the CPU tests exercise it). Steps with LoRA rows
on the Triton kernels replay a second set of graphs, captured per bucket at its first such step."""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch

from inference.metadata import AttentionMetadata, HostBatch
from inference.model_config import ModelConfig

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from inference.lora import LoRAManager
    from inference.models.layers import CausalLM
    from inference.triton_lora import LoRASegments

log = structlog.get_logger(__name__)

# Largest batch that gets a graph. Past it decode is weight-bandwidth bound no longer but compute bound, and the
# launch overhead a graph removes is a small share of the step; such batches run eagerly.
MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_num_seqs: int, cap: int = MAX_GRAPH_BATCH) -> tuple[int, ...]:
    """Buckets 1, 2, 4, 8, 16, 24, 32, ... up to min(max_num_seqs, cap), the top always included."""
    top = max(1, min(max_num_seqs, cap))
    sizes = {b for b in (1, 2, 4, 8) if b < top} | set(range(16, top, 8)) | {top}
    return tuple(sorted(sizes))


def cuda_graphs_unsupported(
    device: torch.device, backend_name: str, config: ModelConfig, *, enforce_eager: bool = False
) -> str | None:
    """Why decode graphs cannot (or must not) be used here, or None when they will be."""
    if enforce_eager:
        return "enforce_eager"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if backend_name != "triton":
        # the reference backend reads context lengths back to the host to plan its gathers
        return f"the {backend_name} attention backend sizes its work on the host"
    if config.dynamic_rope:
        return "dynamic NTK RoPE sizes its tables from the longest position on the host"
    return None


def largest_graph_batch(
    device: torch.device, backend_name: str, config: ModelConfig, *, max_num_seqs: int, enforce_eager: bool
) -> int:
    """Rows of the largest decode graph ModelRunner will capture here; 0 when it will capture none."""
    if cuda_graphs_unsupported(device, backend_name, config, enforce_eager=enforce_eager) is not None:
        return 0
    return graph_batch_sizes(max_num_seqs)[-1]


@dataclass(slots=True)
class _LoRAGraphs:
    """The LoRA side of the decode graphs: the step's rows grouped by adapter slot in static buffers (`order`,
    `starts`, `lens` of LoRASegments packed as `[max_batch + 2 * slots]`), and the graphs that read them."""

    num_slots: int
    device_rows: torch.Tensor  # int32, on the device: fixed addresses for the graphs' whole life
    host_rows: torch.Tensor  # int32 staging, pinned on CUDA
    segments: dict[int, LoRASegments] = field(default_factory=dict)  # per bucket: views of device_rows
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)  # buckets whose LoRA path is set up (captured on CUDA)


class DecodeGraphRunner:
    """Runs decode-only steps of up to `max_batch` sequences through static buffers, padded to a bucket size.

    Padding rows read token 0 at position 0, write their K/V into slot 0 of the null block 0 and attend to that one
    key (context length 1, block table of zeros): they never touch a real block, and their softmax has one finite
    term, so they cannot produce NaN. Every row is computed independently of the others, and the padding rows are
    sliced off the output.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        capture: bool,
        batch_sizes: SequenceT[int] | None = None,
    ) -> None:
        sizes = sorted(set(batch_sizes)) if batch_sizes else list(graph_batch_sizes(max_num_seqs))
        if sizes[0] < 1:
            raise ValueError(f"batch sizes must be >= 1, got {sizes}")
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs cannot be captured on {self.device.type}")
        self.batch_sizes: tuple[int, ...] = tuple(sizes)
        self.max_batch = sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.replays = 0  # decode steps served by this runner
        mb, dev = self.max_batch, self.device
        # Graph inputs: fixed addresses for the graphs' whole life. Initial values are padding rows.
        self._i64 = torch.zeros(3, mb, dtype=torch.int64, device=dev)  # input ids, positions, slots
        self._ctx = torch.ones(mb, dtype=torch.int32, device=dev)
        self._tables = torch.zeros(mb, self.max_blocks, dtype=torch.int32, device=dev)
        self._qsl = torch.arange(mb + 1, dtype=torch.int32, device=dev)  # one new token per row, always
        self._out: torch.Tensor | None = None  # [max_batch, hidden], allocated by the first forward pass
        # Host staging, pinned on CUDA so the copies are asynchronous; the block tables are staged contiguous as
        # [bucket, width] and land in the strided [:bucket, :width] corner of the device table.
        pin = dev.type == "cuda"
        self._h64 = torch.zeros(3, mb, dtype=torch.int64, pin_memory=pin)
        self._hctx = torch.ones(mb, dtype=torch.int32, pin_memory=pin)
        self._htables = torch.zeros(mb * self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._h64_np, self._hctx_np, self._htables_np = (
            self._h64.numpy(),
            self._hctx.numpy(),
            self._htables.numpy(),
        )
        # set after each step's copies: the staging buffers are rewritten only once those copies are done
        self._staged = torch.cuda.Event() if pin else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: _POOL_HANDLE | None = None  # what CUDAGraph.pool() returns
        self._capture = capture
        self._lora: _LoRAGraphs | None = None  # made at the first step with LoRA rows
        if capture:
            self._capture_all()

    # ---- stepping ------------------------------------------------------------------------------------------------

    def fits(self, host: HostBatch) -> bool:
        """Whether this step can take the static path: decode-shaped, small enough, within max_model_len."""
        return (
            host.is_decode_only
            and host.num_tokens == host.num_seqs
            and host.num_seqs <= self.max_batch
            and host.block_tables.shape[1] <= self.max_blocks
        )

    def bucket(self, num_seqs: int) -> int:
        """The smallest batch size bucket that holds `num_seqs` rows."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]

    @torch.inference_mode()
    def run(self, host: HostBatch, lora: LoRAManager | None = None) -> torch.Tensor:
        """Hidden states `[S, hidden]` of a decode step (`fits(host)` must hold); a view valid until the next run.
        With `lora` whose current step runs the Triton kernels (`kernel_step`), the bucket's LoRA graph serves it."""
        n = host.num_seqs
        b = self.bucket(n)
        row_slots = lora.step_row_slots if lora is not None else None
        if lora is None or row_slots is None:
            self._stage(host, b)
            graph = self._graphs.get(b)
            if graph is not None:
                graph.replay()
            else:
                self._forward(b)
        else:
            state = self._lora_graphs(lora)
            if b not in state.ready:
                self._prepare_lora(b, lora, state)
            self._stage(host, b, (state, row_slots))
            graph = state.graphs.get(b)
            if graph is not None:
                graph.replay()
            else:
                with lora.kernel_plan(state.segments[b]):
                    self._forward(b)
        self.replays += 1
        assert self._out is not None
        return self._out[:n]

    @property
    def lora_buckets(self) -> frozenset[int]:
        """Buckets whose LoRA path has served a step (captured on CUDA)."""
        return frozenset(self._lora.ready) if self._lora is not None else frozenset()

    def _lora_graphs(self, lora: LoRAManager) -> _LoRAGraphs:
        if self._lora is None:
            slots = lora.slots
            assert slots is not None, "a step on the Triton LoRA kernels has slots"
            size = self.max_batch + 2 * slots.num_slots
            pin = self.device.type == "cuda"
            self._lora = _LoRAGraphs(
                slots.num_slots,
                torch.zeros(size, dtype=torch.int32, device=self.device),
                torch.zeros(size, dtype=torch.int32, pin_memory=pin),
            )
        return self._lora

    def _prepare_lora(self, b: int, lora: LoRAManager, state: _LoRAGraphs) -> None:
        """Bucket `b`'s LoRA segments over the static rows, bounded by `b` rows (so its grid is fixed), and on CUDA
        its graph: captured now, over padding rows and empty segments, so the capture writes nothing real."""
        # imported here: triton loads only where its kernels run (a LoRA step on them implies it is loaded)
        from inference.triton_lora import LoRASegments

        mb, k = self.max_batch, state.num_slots
        rows = state.device_rows
        state.segments[b] = LoRASegments(rows[:mb], rows[mb : mb + k], rows[mb + k :], b, b)
        if self._capture:
            self._stage_padding(b, state)
            with lora.kernel_plan(state.segments[b]):
                state.graphs[b] = self._capture_bucket(b)  # its warm-up compiles this bucket's LoRA kernels
            log.info("cuda_graph_captured_with_lora", batch=b)
        state.ready.add(b)

    def _stage_padding(self, b: int, state: _LoRAGraphs) -> None:
        """Every static row up to `b` a padding row, and no LoRA rows."""
        if self._staged is not None:
            self._staged.synchronize()
        self._i64[:, :b].zero_()
        self._ctx[:b].fill_(1)
        self._tables[:b].zero_()
        state.device_rows.zero_()

    def _stage(self, host: HostBatch, b: int, lora: tuple[_LoRAGraphs, np.ndarray] | None = None) -> None:
        """Write the step (and its padding rows up to bucket `b`) into the staging buffers and copy them over; with
        `lora`, also the rows grouped by slot (`row_slots`, padding rows on no adapter)."""
        n, w = host.num_seqs, host.block_tables.shape[1]
        if self._staged is not None:
            self._staged.synchronize()
        if lora is not None:
            from inference.triton_lora import segment_arrays  # loaded already: this step ran the LoRA kernels

            state, row_slots = lora
            packed, _ = segment_arrays(row_slots, state.num_slots)
            k, mb = packed.size - 2 * state.num_slots, self.max_batch
            staged = state.host_rows.numpy()
            staged[:k] = packed[:k]
            staged[mb:] = packed[k:]
            state.device_rows.copy_(state.host_rows, non_blocking=True)
        h = self._h64_np
        h[0, :n] = host.input_ids
        h[1, :n] = host.positions
        h[2, :n] = host.slot_mapping
        h[:, n:b] = 0  # token 0, position 0, slot 0 (offset 0 of the null block)
        self._hctx_np[:n] = host.context_lens
        self._hctx_np[n:b] = 1
        tables = self._htables_np[: b * w].reshape(b, w)
        tables[:n] = host.block_tables
        tables[n:] = 0
        # Rows past b and columns past w keep stale values: bucket b's graph reads rows < b only, and a row reads
        # table columns only below ceil(context_len / block_size) <= w.
        self._i64.copy_(self._h64, non_blocking=True)
        self._ctx.copy_(self._hctx, non_blocking=True)
        self._tables[:b, :w].copy_(self._htables[: b * w].view(b, w), non_blocking=True)
        if self._staged is not None:
            self._staged.record()

    def _forward(self, b: int) -> None:
        """The model over rows [:b] of the static buffers, into the static output (what a graph captures)."""
        meta = AttentionMetadata(
            slot_mapping=self._i64[2, :b],
            query_start_loc=self._qsl[: b + 1],
            context_lens=self._ctx[:b],
            block_tables=self._tables[:b],
            max_query_len=1,
            # a bound, not the step's longest context: the split-KV decode grid must be the same on every replay
            max_context_len=self.max_model_len,
            block_size=self.block_size,
        )
        hidden = self.model(self._i64[0, :b], self._i64[1, :b], meta, self.kv_cache)
        if self._out is None:
            self._out = torch.empty(
                self.max_batch, *hidden.shape[1:], dtype=hidden.dtype, device=hidden.device
            )
        self._out[:b].copy_(hidden)

    # ---- capture -------------------------------------------------------------------------------------------------

    def _capture_bucket(self, b: int) -> torch.cuda.CUDAGraph:
        """Bucket `b`'s forward captured in the shared memory pool, after an eager warm-up with the same tensors: it
        compiles the bucket's Triton kernels (the split count depends on the batch size) and allocates the output
        and RoPE tables outside the graph."""
        self._forward(b)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(b)
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """One graph per bucket, largest first, all sharing one memory pool (smaller graphs fit in what it left)."""
        started = time.perf_counter()
        for b in reversed(self.batch_sizes):
            self._graphs[b] = self._capture_bucket(b)
        torch.cuda.synchronize(self.device)
        log.info(
            "cuda_graphs_captured",
            batch_sizes=len(self.batch_sizes),
            max_batch=self.max_batch,
            seconds=round(time.perf_counter() - started, 2),
        )

    @property
    def captured(self) -> bool:
        return bool(self._graphs)
