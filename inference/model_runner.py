"""Owns the model and its paged KV cache: sizes the cache, flattens a scheduled batch into model inputs,
runs one forward pass and returns logits for the sequences that sample this step."""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inference.attention_backends import get_attention_backend, set_attention_backend
from inference.errors import KVBudgetError
from inference.metadata import AttentionMetadata
from inference.model_config import ModelConfig
from inference.sequence import Sequence

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


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def plan_num_blocks(
    config: ModelConfig,
    *,
    device: torch.device,
    block_size: int,
    max_model_len: int,
    kv_cache_memory: int | float | None,
    num_blocks: int | None,
) -> int:
    """Number of KV blocks (null block included) for the given budget; KVBudgetError if one request can't fit."""
    per_block = config.kv_bytes_per_token() * block_size
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


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the hidden states whose logits are needed
    sample_seqs: list[Sequence]


class ModelRunner:
    """Runs the model over flattened varlen batches against one preallocated KV cache."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        attention_backend: str = "auto",
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = next(model.parameters()).device
        self.attention = get_attention_backend(self.device, attention_backend)
        set_attention_backend(model, self.attention)
        configure_threads()
        # zeros, not empty: the attention gathers whole blocks and masks the tail, and 0 * NaN garbage is NaN
        self.kv_cache = torch.zeros(
            2,
            config.num_layers,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=config.dtype,
            device=self.device,
        )

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def prepare(self, items: SequenceT[tuple[Sequence, int]]) -> StepInputs:
        """Flatten `(sequence, num_new_tokens)` pairs; each sequence's new tokens start at `num_computed_tokens`."""
        bs = self.block_size
        num_seqs = len(items)
        starts = np.fromiter((s.num_computed_tokens for s, _ in items), dtype=np.int64, count=num_seqs)
        lens = np.fromiter((n for _, n in items), dtype=np.int64, count=num_seqs)
        ends = starts + lens
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(lens, out=qsl[1:])
        total = int(qsl[-1])
        if total == num_seqs:  # all decodes: one token each, the last one of the sequence
            ids = [s.token_ids[-1] for s, _ in items]
        else:
            ids = []
            for (s, _), a, b in zip(items, starts.tolist(), ends.tolist(), strict=True):
                ids.extend(s.token_ids[a:b])
        max_blocks = max(len(s.block_table) for s, _ in items)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for i, (s, _) in enumerate(items):
            tables[i, : len(s.block_table)] = s.block_table
        seq_of_token = np.repeat(np.arange(num_seqs), lens)
        positions = np.repeat(starts - qsl[:-1], lens) + np.arange(total)
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        # a sequence samples when this step reaches the end of its known tokens
        sample_rows = [i for i, (s, _) in enumerate(items) if ends[i] == s.num_tokens]
        sample_seqs = [items[i][0] for i in sample_rows]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            context_lens=torch.from_numpy(ends.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            max_query_len=int(lens.max()),
            max_context_len=int(ends.max()),
            block_size=bs,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.from_numpy(positions).to(dev),
            meta=meta,
            sample_indices=torch.from_numpy(qsl[1:][sample_rows] - 1).to(dev),
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def run(self, items: SequenceT[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, list[Sequence]]:
        """One forward pass; returns `[num_sampling, vocab]` float32 logits (or None) and the sequences they belong to."""
        inputs = self.prepare(items)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        if not inputs.sample_seqs:
            return None, []
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        return logits, inputs.sample_seqs
