"""Block manager: allocation, prefix hits, LRU reuse, X-LoRA's second (scaling-pass) block table, and invariants
under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.block_manager import NULL_BLOCK, BlockManager, hash_block
from inference.params import SamplingParams
from inference.sequence import Sequence

BS = 4


# the extra keys the tests hash under: the base model, an adapter's real pass, an X-LoRA adapter's scaling pass
KEYS: list[tuple[object, ...]] = [(), ("lora", 1), ("xlora-pass", 1)]


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def make_xlora_seq(tokens: list[int], rid: str = "x", pass_key: tuple[object, ...] = KEYS[2]) -> Sequence:
    """A sequence as the engine makes one on an X-LoRA adapter: its own key, and a scaling-pass cache."""
    seq = make_seq(tokens, rid)
    seq.cache_extra_key = KEYS[1]
    seq.pass_cache_key = pass_key
    return seq


def write(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What the engine does around a step: allocate, 'write' KV for n tokens, commit hashes."""
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += min(n, seq.num_uncomputed_tokens)
    bm.commit(seq)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        both = seq.block_table + seq.pass_block_table
        assert len(both) == len(set(both)), "a table holds a block twice, or both tables one block"
        for b in both:
            refs[b] += 1
        assert NULL_BLOCK not in both
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
        if seq.pass_cache_key is None:
            assert seq.pass_block_table == []
        else:  # the scaling-pass table grows with the first, block for block
            assert len(seq.pass_block_table) == len(seq.block_table)
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
        assert h in {hash_block(block.parent_hash, block.token_ids, key) for key in KEYS}
    for block in bm.blocks:
        if block.block_hash is not None:
            assert cached.get(block.block_hash) == block.block_id
    # hashes only on blocks whose KV was written by a live or past sequence: check live ones precisely
    for seq in live:
        for table in (seq.block_table, seq.pass_block_table):
            for i, b in enumerate(table):
                block = bm.blocks[b]
                if block.block_hash is not None:
                    assert (i + 1) * bm.block_size <= seq.num_computed_tokens, (
                        "hashed block not fully written"
                    )
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


def test_xlora_sequence_takes_two_blocks_per_block_and_frees_both() -> None:
    bm = BlockManager(7, BS)
    x = make_xlora_seq(list(range(13)))
    assert not bm.allocate(x, 13)  # 4 blocks of context, 8 with the scaling pass's: only 6 usable
    assert x.block_table == x.pass_block_table == [] and bm.num_free_blocks == 6
    assert bm.allocate(x, 8)
    assert len(x.block_table) == len(x.pass_block_table) == 2 and bm.num_free_blocks == 2
    x.num_computed_tokens = 8
    bm.commit(x)
    assert len(bm.cached_block_ids()) == 4  # both tables' full blocks, each under its own key
    assert not bm.allocate(make_seq(list(range(100, 109))), 9)  # the pass's blocks count as used
    assert bm.allocate(x, 1)  # the ninth token: a block in each table
    assert bm.num_free_blocks == 0
    check_invariants(bm, [x])
    bm.free(x)
    assert x.block_table == x.pass_block_table == [] and bm.num_free_blocks == 6
    check_invariants(bm, [])


def test_xlora_prefix_hit_needs_both_caches() -> None:
    bm = BlockManager(32, BS)
    a = make_xlora_seq(list(range(13)), "a")
    write(bm, a, 13)
    b = make_xlora_seq(list(range(13)), "b")
    assert bm.find_cached_prefix(b) == a.block_table[:3]
    assert bm.allocate(b, 13)
    assert b.num_computed_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and b.pass_block_table[:3] == a.pass_block_table[:3]
    check_invariants(bm, [a, b])


def test_xlora_prefix_hit_stops_where_the_scaling_pass_cache_does() -> None:
    bm = BlockManager(32, BS)
    # scaling-pass blocks under the base model's key: the base request's blocks are the X-LoRA request's pass
    # prefix, and they can be evicted while the X-LoRA request's own blocks stay cached
    base = make_seq(list(range(13)), "base")
    write(bm, base, 13)
    a = make_xlora_seq(list(range(13)), "a", pass_key=())
    write(bm, a, 13)
    assert a.num_cached_tokens == 0  # its own blocks were not cached yet
    assert a.pass_block_table[:3] != base.block_table[:3]  # computed again, cached under the base key already
    base_table = list(base.block_table)
    bm.free(base)
    bm.free(a)
    # take every never-used block and then the base request's last two (freed tail first): its third block goes
    other = make_seq(list(range(100, 100 + 4 * (bm.num_free_blocks - 8 - 2))), "other")
    assert bm.allocate(other, other.num_tokens)
    assert base_table[2] in other.block_table and base_table[1] not in other.block_table
    c = make_xlora_seq(list(range(13)), "c", pass_key=())
    assert bm.allocate(c, 13)
    assert c.num_computed_tokens == 8  # the X-LoRA cache holds three blocks, the scaling pass's only two
    assert c.pass_block_table[:2] == base_table[:2]
    check_invariants(bm, [other, c])


def test_scaling_pass_blocks_under_the_base_key_serve_the_base_model() -> None:
    # scaling_pass_value 0: the scaling pass is the base model, so its blocks are the base model's (key ())
    bm = BlockManager(32, BS)
    x = make_xlora_seq(list(range(9)), pass_key=())
    write(bm, x, 9)
    base = make_seq(list(range(9)), "base")
    assert bm.find_cached_prefix(base) == x.pass_block_table[:2]
    assert bm.allocate(base, 9) and base.num_computed_tokens == 8
    check_invariants(bm, [x, base])
    # and a base prefix serves the scaling pass of a later X-LoRA request, whose own cache is still needed
    y = make_xlora_seq(list(range(9)), "y", pass_key=())
    assert bm.find_cached_prefix(y) == x.block_table[:2]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "new-xlora", "new-xlora-base", "step", "decode", "free"]),
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
        if op in ("new", "new-xlora", "new-xlora-base"):
            counter += 1
            # tiny alphabet so that prefixes collide often and hits happen
            if op == "new":
                seq = make_seq(tokens, f"s{counter}")
            else:  # an X-LoRA request, its scaling-pass blocks under their own key or the base model's
                seq = make_xlora_seq(tokens, f"s{counter}", KEYS[2] if op == "new-xlora" else ())
            if bm.allocate(seq, min(n, seq.num_tokens)):
                seq.num_computed_tokens += min(n, seq.num_uncomputed_tokens)
                bm.commit(seq)
                live.append(seq)
            else:
                assert seq.block_table == seq.pass_block_table == [] and seq.num_computed_tokens == 0
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
