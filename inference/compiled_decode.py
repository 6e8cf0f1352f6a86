"""Compiled decode steps on the CPU: the model's forward through torch.compile (inductor's C++ backend), with a
static-shape decode attention, the step's K/V handed out of the graph and written after it; eager is the reference
and the fallback.

One graph serves one row, one serves 2..`max_rows` rows; the block table's width is dynamic in both, so contexts
grow without recompiling. Inductor caches the compiled code on disk: the first start compiles for one to three
minutes on 2 cores, later starts take 13-17 s (docs/engine.md, "Compiled decode")."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch

from inference import attention as reference
from inference.attention_backends import AttentionBackend
from inference.metadata import AttentionMetadata, HostBatch
from inference.model_config import ModelConfig

if TYPE_CHECKING:
    from inference.models.layers import CausalLM

log = structlog.get_logger(__name__)

# Decode steps of more rows run eagerly: the static attention gathers every row's whole block table, padded to the
# longest, which for a large batch of mixed contexts copies far more K/V than the reference's length-sorted groups.
DEFAULT_MAX_COMPILED_ROWS = 8
# ... and so do steps whose rows' contexts differ so much that the padded gather would copy more than this many times
# the blocks they hold.
MAX_PADDING = 1.5


def static_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention whose shapes follow the block table's width alone: every block of the table gathered,
    positions past each row's context masked. No host sync and no data-dependent size, so it traces whole.

    With `new_kv` (the step's `[rows, kv_heads, head_dim]` K and V, not yet in the cache) the last position of
    each row reads them instead of the cache: the compiled step leaves the cache unwritten until it returns."""
    batch, heads, head_dim = q.shape
    block_size, kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    length = meta.block_tables.shape[1] * block_size
    ids = meta.block_tables.long().reshape(-1)
    k = kv_layer[0].index_select(0, ids).view(batch, length, kv_heads, head_dim)
    v = kv_layer[1].index_select(0, ids).view(batch, length, kv_heads, head_dim)
    position = torch.arange(length, device=q.device)[None, :]
    context = meta.context_lens.long()[:, None]
    if new_kv is not None:
        last = (position == context - 1).view(batch, length, 1, 1)
        k = torch.where(last, new_kv[0].to(k.dtype).unsqueeze(1), k)
        v = torch.where(last, new_kv[1].to(v.dtype).unsqueeze(1), v)
    mask = (position < context).view(batch, 1, 1, length)
    qg = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.reshape(batch, heads, head_dim)


def _own_forward(model: CausalLM, name: str) -> Callable[..., torch.Tensor]:
    """`model`'s undecorated forward (its inference_mode cannot be traced around the cache writes) as a function with
    a code object of its own (a new object on every call), named `name`: the same name in every process, since
    inductor's disk cache must find the graphs of an earlier start."""
    forward = type(model).forward.__wrapped__  # type: ignore[attr-defined]

    def step(
        input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        hidden: torch.Tensor = forward(model, input_ids, positions, meta, kv_cache)
        return hidden

    code = step.__code__.replace(co_name=name, co_qualname=name)
    own: Callable[..., torch.Tensor] = types.FunctionType(
        code, step.__globals__, name, None, step.__closure__
    )
    return own


def failure_reason(exc: BaseException) -> str:
    """A compiler exception in one log-sized line (inductor's messages run to pages): its first line, and the first
    line of its root cause when it wraps one (dynamo's BackendCompilerFailed says only which backend raised)."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).strip()
        parts.append(f"{type(seen).__name__}: {text.splitlines()[0][:200]}" if text else type(seen).__name__)
        inner = getattr(seen, "inner_exception", None) or seen.__cause__
        seen = inner if isinstance(inner, BaseException) and inner is not seen and len(parts) < 8 else None
    return parts[0] if len(parts) == 1 else f"{parts[0]} {parts[-1]}"


def compile_unsupported(device: torch.device, backend_name: str, config: ModelConfig) -> str | None:
    """Why decode steps cannot be compiled here, or None when they can."""
    if device.type != "cpu":
        return f"compiled decode is for the CPU (on {device.type}, decode runs CUDA graphs)"
    if backend_name != "reference":
        return f"compiled decode traces the reference attention, not {backend_name}"
    if config.dynamic_rope:
        return "dynamic NTK RoPE sizes its tables from the longest position on the host"
    return None


class CompiledDecode:
    """The model's forward compiled for decode steps of 1..`max_rows` rows (`fits`); `run` returns the hidden
    states, or None once compiling or running failed, after which the caller runs every step eagerly."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        *,
        max_rows: int = DEFAULT_MAX_COMPILED_ROWS,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.max_rows = max_rows
        self.steps = 0  # decode steps served compiled
        # Each layer's new (K, V), appended while tracing and so, replayed by dynamo, by every compiled call. Traced,
        # a write into the cache (a graph input) was functionalized into copies of whole cache layers, and as an
        # opaque custom op it cost ~90 us a call in dispatch: the graph hands K and V out instead, `run` writes them.
        self._new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The reference when eager (prefill, mixed and large steps), the traceable pair while compiling: one backend
        # for both, set on the modules once (the graphs do not check it).
        self.attention = AttentionBackend("reference", self._write_kv, self._paged_attention)
        self.failed: str | None = None  # why compiled steps stopped, once they did
        options: dict[str, str | int | bool | Callable[..., Any]] = (
            {"emulate_precision_casts": True} if backend == "inductor" else {}
        )
        # No guards on the modules (every weight is one: ~1 ms a SmolLM2 step to check them all): they do not change
        # while serving; adapters add hooks, and then the runner stops calling this. Without them nothing would stop
        # dynamo from serving another model's graphs, since it keeps graphs per code object: hence a code object of
        # this instance's own.
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        self._forward: Callable[..., torch.Tensor] = torch.compile(
            _own_forward(model, "compiled_decode_step"),
            backend=backend,
            fullgraph=True,
            dynamic=None,
            options=options,
        )

    def _write_kv(
        self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        if torch.compiler.is_compiling():
            self._new_kv.append((k, v))
        else:
            reference.write_kv(kv_layer, k, v, slot_mapping)

    def _paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return static_decode_attention(q, kv_layer, meta, scale, self._new_kv[-1])
        return reference.paged_attention(q, kv_layer, meta, scale)

    def fits(self, host: HostBatch) -> bool:
        """Whether this step runs compiled: decode only, at most `max_rows` rows, and rows whose block tables are
        close in length (the static attention pads every row to the longest: at most `MAX_PADDING` times the
        blocks the rows hold)."""
        n = host.num_seqs
        if self.failed is not None or not host.is_decode_only or host.num_tokens != n or n > self.max_rows:
            return False
        if n == 1:
            return True
        block_size = self.kv_cache.shape[3]
        held = int((-(-host.context_lens.astype(np.int64) // block_size)).sum())
        return bool(n * host.block_tables.shape[1] <= MAX_PADDING * held)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile both graphs now (one row, then two) on padding rows, which write only the null block; returns
        the seconds it took. Raises what compiling raised. The inputs are inference tensors, as the runner's are
        (the graphs guard on it)."""
        started = time.perf_counter()
        for rows in (1, 2) if self.max_rows > 1 else (1,):
            ids, positions = torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(rows, dtype=torch.int64),
                query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
                context_lens=torch.ones(rows, dtype=torch.int32),
                block_tables=torch.zeros(rows, 2, dtype=torch.int32),
                max_query_len=1,
                max_context_len=1,
                block_size=self.kv_cache.shape[3],
            )
            if rows == 1:
                # eagerly first, so that what the model builds lazily (the RoPE tables) exists when it is traced:
                # traced missing, the graph would build them in every step
                self.model(ids, positions, meta, self.kv_cache)
            self._call(ids, positions, meta)
        return time.perf_counter() - started

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Hidden states `[rows, hidden]` of a decode step that `fits`, or None if the compiled step failed (logged
        once; the step's KV writes are idempotent, so the caller reruns it eagerly)."""
        if meta.block_tables.shape[1] < 2:
            # a one-block table would be a width of 1, which the compiler specialises (a third graph): pad with the
            # null block, which the mask hides
            meta.block_tables = torch.nn.functional.pad(meta.block_tables, (0, 1))
        try:
            hidden = self._call(input_ids, positions, meta)
        except Exception as exc:  # any compiler or runtime failure: eager takes over, the request goes on
            self.failed = failure_reason(exc)
            log.warning("compiled_decode_failed", reason=self.failed, fallback="eager")
            return None
        self.steps += 1
        return hidden

    def _call(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # batch and table width vary step to step: dynamic from the first compile, not after a recompile
        torch._dynamo.maybe_mark_dynamic(meta.block_tables, 1)
        if input_ids.shape[0] > 1:
            for t in (input_ids, positions, meta.slot_mapping, meta.context_lens, meta.block_tables):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        self._new_kv.clear()
        try:
            with torch.inference_mode(False), torch.no_grad():
                hidden = self._forward(input_ids, positions, meta, self.kv_cache)
            new_kv = self._new_kv
            if len(new_kv) != self.kv_cache.shape[1]:
                raise RuntimeError(f"the compiled step returned K/V of {len(new_kv)} layers")
            for i, (k, v) in enumerate(new_kv):
                reference.write_kv(self.kv_cache[:, i], k, v, meta.slot_mapping)
        finally:
            self._new_kv.clear()
        return hidden
