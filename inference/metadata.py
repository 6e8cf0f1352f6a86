"""What one engine step tells the model about its batch: where new tokens go and which KV they attend to."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    """A flattened (varlen) batch of S sequences holding T new tokens in total.

    The KV cache is `kv[2, layers, num_blocks, block_size, kv_heads, head_dim]`; block 0 is the
    null/scratch block, so padding entries in `block_tables` and `slot_mapping` point there.
    """

    slot_mapping: (
        torch.Tensor
    )  # [T] int64: block_id * block_size + offset where each new token's K/V is written
    query_start_loc: torch.Tensor  # [S + 1] int32: cumulative count of new tokens per sequence
    context_lens: torch.Tensor  # [S] int32: tokens in the cache for each sequence after this step's writes
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    max_query_len: int
    # An upper bound on context_lens, used only to size launches: the step's longest context in eager steps, the
    # model's max_model_len in CUDA-graph decode (a captured launch must not depend on the step's lengths).
    max_context_len: int
    block_size: int = 16
    # Per-step work a backend derives once from the fields above and reuses in every layer (the reference
    # decode keeps its length-sorted chunk plan here); None until a backend fills it.
    backend_cache: dict[Hashable, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(slots=True)
class HostBatch:
    """One step's model inputs as host (numpy) arrays, before they reach the device: S sequences, T new tokens."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    context_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, W] int32, W = the longest block table in the batch, padded with 0
    sample_indices: np.ndarray  # [K] int64: token rows whose logits are needed (their sequence samples)
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """One new token per sequence: the shape CUDA-graph decode replays."""
        return self.max_query_len == 1
