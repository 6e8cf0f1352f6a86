"""Paged KV block allocation with ref counts and hash-chained prefix caching (freed blocks are reused LRU)."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Any

from inference.sequence import Sequence

NULL_BLOCK = 0


@dataclass(slots=True)
class Block:
    """One physical KV block. `block_hash` is set only once the block is full and its KV written."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    parent_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


def hash_block(
    parent_hash: bytes | None, token_ids: SequenceT[int], extra_key: tuple[Any, ...] = ()
) -> bytes:
    """Chained content hash of a full block: 128-bit BLAKE2b of (parent hash, token ids, extra keys)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"\x00")
    h.update(array("q", token_ids).tobytes())
    if extra_key:
        h.update(repr(extra_key).encode())
    return h.digest()


class BlockManager:
    """Owns blocks 1..num_blocks-1 (block 0 is the null/scratch block and is never handed out).

    Invariants: a block's ref count is the number of live block tables holding it; a block is in the free
    list iff its ref count is 0; every hashed block is full, written, and registered in `_hash_to_block`.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("need at least two blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # insertion order is eviction order: the head is the least recently freed block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def cached_block_ids(self) -> dict[bytes, int]:
        return dict(self._hash_to_block)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least its last token to compute (for a
        sequence with a scaling-pass cache, only as far as that cache's prefix is cached too)."""
        return self._prefix_hits(seq)[0]

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """The cached prefix of `seq`'s blocks and of its scaling-pass blocks (empty without that cache), as long
        as each other: a hit must bring both caches to the same token."""
        if not self.enable_prefix_caching:
            return [], []
        hits = self._cached_chain(
            seq.token_ids, seq.cache_extra_key, (len(seq.token_ids) - 1) // self.block_size
        )
        if seq.pass_cache_key is None or not hits:
            return hits, []
        pass_hits = self._cached_chain(seq.token_ids, seq.pass_cache_key, len(hits))
        return hits[: len(pass_hits)], pass_hits

    def _cached_chain(self, tokens: list[int], extra_key: tuple[Any, ...], max_blocks: int) -> list[int]:
        bs = self.block_size
        hits: list[int] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            chunk = tokens[i * bs : (i + 1) * bs]
            h = hash_block(parent, chunk, extra_key)
            bid = self._hash_to_block.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            # confirm content, so a hash collision can never serve another prompt's KV
            if block.parent_hash != parent or block.token_ids != tuple(chunk):
                break
            hits.append(bid)
            parent = h
        return hits

    # ---- mutations -----------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq.block_table` (and its scaling-pass table, if it has one: the two grow together) to hold
        `num_computed_tokens + num_new_tokens` tokens; False if it cannot.

        On a sequence's first allocation the cached prefix is attached and `num_computed_tokens` advanced.
        Nothing changes when it returns False.
        """
        table = seq.block_table
        two = seq.pass_cache_key is not None
        if table:  # a sequence that already has blocks (every decode): no prefix lookup, usually no new block
            computed = seq.num_computed_tokens
            total = computed + min(num_new_tokens, len(seq.token_ids) - computed)
            need = -(-total // self.block_size) - len(table)
            if need <= 0:
                return True
            if need * (1 + two) > len(self._free):
                return False
            for _ in range(need):
                table.append(self._take_free())
            if two:
                for _ in range(need):
                    seq.pass_block_table.append(self._take_free())
            return True
        hits: list[int] = []
        pass_hits: list[int] = []
        first = not seq.block_table and seq.num_computed_tokens == 0
        if first:
            hits, pass_hits = self._prefix_hits(seq)
        num_computed = seq.num_computed_tokens + len(hits) * self.block_size
        total = num_computed + min(num_new_tokens, seq.num_tokens - num_computed)
        have = len(seq.block_table) + len(hits)
        need = max(0, self.blocks_needed(total) - have)
        revived = sum(1 for b in hits + pass_hits if self.blocks[b].ref_count == 0)
        if need * (1 + two) + revived > len(self._free):
            return False
        if first:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += len(hits) * self.block_size
        for bid in hits + pass_hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
        seq.block_table.extend(hits)
        seq.pass_block_table.extend(pass_hits)
        if hits:
            seq.num_computed_tokens = num_computed
            seq.num_cached_tokens = num_computed
            seq.num_hashed_blocks = len(hits)
            seq.last_block_hash = self.blocks[hits[-1]].block_hash
            if pass_hits:
                seq.pass_last_block_hash = self.blocks[pass_hits[-1]].block_hash
        elif first:
            seq.num_cached_tokens = 0
        for _ in range(need):
            seq.block_table.append(self._take_free())
        if two:
            for _ in range(need):
                seq.pass_block_table.append(self._take_free())
        return True

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` (and of its scaling-pass table) that became full and written since the last
        commit."""
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full <= seq.num_hashed_blocks or not self.enable_prefix_caching:
            return
        tokens = seq.token_ids
        pass_key, pass_table = seq.pass_cache_key, seq.pass_block_table
        for i in range(seq.num_hashed_blocks, full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            seq.last_block_hash = self._hash(
                seq.block_table[i], seq.last_block_hash, chunk, seq.cache_extra_key
            )
            if pass_key is not None:
                seq.pass_last_block_hash = self._hash(
                    pass_table[i], seq.pass_last_block_hash, chunk, pass_key
                )
            seq.num_hashed_blocks = i + 1

    def _hash(
        self, bid: int, parent: bytes | None, chunk: tuple[int, ...], extra_key: tuple[Any, ...]
    ) -> bytes:
        """Register full block `bid` under its chain hash (unless it or an equal block already is); the hash."""
        h = hash_block(parent, chunk, extra_key)
        block = self.blocks[bid]
        if block.block_hash is None and h not in self._hash_to_block:
            block.block_hash = h
            block.parent_hash = parent
            block.token_ids = chunk
            self._hash_to_block[h] = bid
        return h

    def free(self, seq: Sequence) -> None:
        """Release the blocks of `seq` (both tables); blocks that drop to zero refs keep their hash for later
        hits."""
        # tail blocks first, so that the shared-prefix head of a table is the last to be evicted (a scaling-pass
        # block beside its partner: a prefix hit needs both)
        tables = (seq.block_table, seq.pass_block_table) if seq.pass_block_table else (seq.block_table,)
        for i in range(len(seq.block_table) - 1, -1, -1):
            for table in tables:
                block = self.blocks[table[i]]
                block.ref_count -= 1
                if block.ref_count == 0:
                    self._free[block.block_id] = None
        seq.block_table = []
        seq.pass_block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None
        seq.pass_last_block_hash = None

    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            if self._hash_to_block.get(block.block_hash) == bid:
                del self._hash_to_block[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None
        block.ref_count = 1
        return bid
