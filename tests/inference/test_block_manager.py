"""Block manager: allocation, prefix hits, LRU reuse, and invariants under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.block_manager import NULL_BLOCK, BlockManager, hash_block
from inference.params import SamplingParams
from inference.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def write(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What the engine does around a step: allocate, 'write' KV for n tokens, commit hashes."""
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += min(n, seq.num_uncomputed_tokens)
    bm.commit(seq)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(seq.block_table) == len(set(seq.block_table)), "a table holds a block twice"
        for b in seq.block_table:
            refs[b] += 1
        assert NULL_BLOCK not in seq.block_table
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    free = set(bm.free_block_ids())
    assert NULL_BLOCK not in free
    assert len(free) == bm.num_free_blocks
    for block in bm.blocks[1:]:
        assert block.ref_count == refs[block.block_id]
        assert (block.block_id in free) == (block.ref_count == 0), "free list and ref counts disagree"
    assert bm.blocks[NULL_BLOCK].ref_count == 0
    cached = bm.cached_block_ids()
    for h, bid in cached.items():
        block = bm.blocks[bid]
        assert block.block_hash == h
        assert block.token_ids is not None and len(block.token_ids) == bm.block_size
        assert hash_block(block.parent_hash, block.token_ids) == h
    for block in bm.blocks:
        if block.block_hash is not None:
            assert cached.get(block.block_hash) == block.block_id
    # hashes only on blocks whose KV was written by a live or past sequence: check live ones precisely
    for seq in live:
        for i, b in enumerate(seq.block_table):
            block = bm.blocks[b]
            if block.block_hash is not None:
                assert (i + 1) * bm.block_size <= seq.num_computed_tokens, "hashed block not fully written"
                assert list(block.token_ids) == seq.token_ids[i * BS : (i + 1) * BS]


def test_null_block_never_handed_out_and_exhaustion() -> None:
    bm = BlockManager(5, BS)
    seq = make_seq(list(range(100)))
    assert not bm.allocate(seq, 17)  # needs 5 blocks, only 4 usable
    assert seq.block_table == [] and bm.num_free_blocks == 4
    assert bm.allocate(seq, 16)
    assert sorted(seq.block_table) == [1, 2, 3, 4]
    bm.free(seq)
    assert bm.num_free_blocks == 4


def test_prefix_hit_reuses_blocks_and_leaves_last_token() -> None:
    bm = BlockManager(32, BS)
    a = make_seq(list(range(12)), "a")
    write(bm, a, 12)
    assert len(bm.cached_block_ids()) == 3
    # the same 12-token prompt can reuse only 2 blocks: the last token must be computed for logits
    b = make_seq(list(range(12)), "b")
    assert bm.allocate(b, 12)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert len(b.block_table) == 3 and b.block_table[2] != a.block_table[2]
    check_invariants(bm, [a, b])


def test_freed_blocks_keep_hash_and_revive_lru() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([7] * 4 + [8] * 4 + [9], "a")
    write(bm, a, 9)
    kept = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 7
    b = make_seq([7] * 4 + [8] * 4 + [1, 2], "b")
    assert bm.allocate(b, 10)
    assert b.block_table[:2] == kept[:2] and b.num_computed_tokens == 8
    check_invariants(bm, [b])
    # filling the cache evicts the least recently freed hashed blocks, never the live ones
    c = make_seq(list(range(100, 116)), "c")
    assert bm.allocate(c, 16)
    assert bm.num_free_blocks == 0 and bm.find_cached_prefix(make_seq([7] * 4 + [8] * 4 + [5])) == kept[:2]
    check_invariants(bm, [b, c])
    assert set(b.block_table).isdisjoint(c.block_table)


def test_hash_collision_is_confirmed_by_tokens() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5], "a")
    write(bm, a, 5)
    # corrupt the stored tokens as if another prompt had produced the same hash
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)
    b = make_seq([1, 2, 3, 4, 5], "b")
    assert bm.find_cached_prefix(b) == []


def test_extra_key_separates_caches() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5], "a")
    a.cache_extra_key = ("adapter-a",)
    write(bm, a, 5)
    b = make_seq([1, 2, 3, 4, 5], "b")
    assert bm.find_cached_prefix(b) == []
    b.cache_extra_key = ("adapter-a",)
    assert bm.find_cached_prefix(b) == a.block_table[:1]


def test_decode_appends_blocks_and_hashes_when_full() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3], "a")
    write(bm, a, 3)
    assert bm.cached_block_ids() == {}
    a.token_ids.append(4)
    write(bm, a, 1)
    assert len(bm.cached_block_ids()) == 1  # block became full and written
    table = list(a.block_table)
    a.token_ids.append(5)
    write(bm, a, 1)
    assert a.block_table[: len(table)] == table  # append-only
    assert len(a.block_table) == 2


OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "step", "decode", "free"]),
        st.integers(0, 7),
        st.lists(st.integers(0, 2), min_size=1, max_size=20),
        st.integers(1, 12),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 24), ops=OPS)
def test_random_operations_keep_invariants(num_blocks: int, ops: list) -> None:
    bm = BlockManager(num_blocks, BS)
    live: list[Sequence] = []
    counter = 0
    for op, pick, tokens, n in ops:
        if op == "new":
            counter += 1
            # tiny alphabet so that prefixes collide often and hits happen
            seq = make_seq(tokens, f"s{counter}")
            if bm.allocate(seq, min(n, seq.num_tokens)):
                seq.num_computed_tokens += min(n, seq.num_uncomputed_tokens)
                bm.commit(seq)
                live.append(seq)
            else:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        elif live:
            seq = live[pick % len(live)]
            if op == "step" and seq.num_uncomputed_tokens:
                before = list(seq.block_table)
                k = min(n, seq.num_uncomputed_tokens)
                if bm.allocate(seq, k):
                    seq.num_computed_tokens += k
                    bm.commit(seq)
                assert seq.block_table[: len(before)] == before
            elif op == "decode" and not seq.num_uncomputed_tokens:
                seq.token_ids.append(tokens[0])
                if bm.allocate(seq, 1):
                    seq.num_computed_tokens += 1
                    bm.commit(seq)
                else:
                    seq.token_ids.pop()
            elif op == "free":
                bm.free(seq)
                live.remove(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == num_blocks - 1


def test_too_few_blocks_rejected() -> None:
    with pytest.raises(ValueError):
        BlockManager(1, BS)
