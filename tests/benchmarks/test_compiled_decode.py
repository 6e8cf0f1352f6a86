"""benchmarks/compiled_decode.py's inputs: each row's new token goes to its own block, at its last position."""

from __future__ import annotations

import torch

from benchmarks.compiled_decode import decode_inputs


def test_rows_write_and_read_their_own_blocks() -> None:
    ids, positions, meta_of = decode_inputs(3, 10, 4)
    meta = meta_of()
    assert ids.shape == positions.shape == (3,) and set(positions.tolist()) == {9}
    assert meta.block_tables.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # block 0 is the null block
    assert meta.slot_mapping.tolist() == [
        3 * 4 + 1,
        6 * 4 + 1,
        9 * 4 + 1,
    ]  # position 9: block 2 of 3, offset 1
    assert meta.context_lens.tolist() == [10, 10, 10] and meta.is_decode_only
    assert meta_of().block_tables is not meta.block_tables  # a fresh table per step: the runner may pad it
    assert torch.equal(meta_of().block_tables, meta.block_tables)
