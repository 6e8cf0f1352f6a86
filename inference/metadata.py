"""What one engine step tells the model about its batch: where new tokens go and which KV they attend to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    max_context_len: int
    block_size: int = 16
    # Per-step work a backend derives once from the fields above and reuses in every layer (the reference
    # decode keeps its length-sorted chunk plan here); None until a backend fills it.
    backend_cache: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
