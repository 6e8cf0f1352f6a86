"""Scheduler: token/sequence budgets, chunked prefill, decode priority, preemption newest-first."""

from __future__ import annotations

from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.params import SamplingParams
from inference.scheduler import Scheduler
from inference.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int, base: int = 0) -> Sequence:
    return Sequence(rid, [base + i for i in range(n)], SamplingParams())


def run_step(sched: Scheduler) -> list[tuple[str, int]]:
    """Apply a batch as the engine would: advance computed tokens, sample a dummy token when caught up."""
    batch = sched.schedule()
    for s, n in batch.items:
        s.num_computed_tokens += n
        sched.block_manager.commit(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(1000 + s.num_output_tokens)
    return [(s.request_id, n) for s, n in batch.items]


def test_chunked_prefill_under_token_budget() -> None:
    sched = Scheduler(BlockManager(64, 4), EngineConfig(max_num_seqs=8, max_num_batched_tokens=10))
    sched.add(seq("a", 25))
    assert run_step(sched) == [("a", 10)]
    assert run_step(sched) == [("a", 10)]
    assert run_step(sched) == [("a", 5)]  # prompt done: samples now
    assert sched.running[0].num_output_tokens == 1
    assert run_step(sched) == [("a", 1)]


def test_decodes_first_then_prefill_chunks_then_new() -> None:
    sched = Scheduler(BlockManager(64, 4), EngineConfig(max_num_seqs=8, max_num_batched_tokens=8))
    sched.add(seq("a", 3))
    run_step(sched)
    sched.add(seq("b", 20, 100))
    sched.add(seq("c", 4, 200))
    assert run_step(sched) == [("a", 1), ("b", 7)]
    assert run_step(sched) == [("a", 1), ("b", 7)]
    assert run_step(sched) == [("a", 1), ("b", 6), ("c", 1)]  # c's prefill is itself chunked


def test_max_num_seqs() -> None:
    sched = Scheduler(BlockManager(64, 4), EngineConfig(max_num_seqs=2, max_num_batched_tokens=100))
    for r in "abc":
        sched.add(seq(r, 3, ord(r) * 10))
    assert [r for r, _ in run_step(sched)] == ["a", "b"]
    assert len(sched.waiting) == 1


def test_preemption_newest_first_and_resume() -> None:
    # 6 usable blocks of 4 tokens; two sequences of 8 tokens each grow until blocks run out
    sched = Scheduler(BlockManager(7, 4), EngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    a, b = seq("a", 8), seq("b", 8, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    steps = 0
    while b.status is not SequenceStatus.WAITING:
        run_step(sched)
        steps += 1
        assert steps < 20
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_output_tokens > 0
    assert a.status is SequenceStatus.RUNNING and sched.waiting[0] is b
    # a finishes -> b resumes by recomputing its prompt and the tokens it had generated
    produced = b.num_output_tokens
    sched.finish(a, "length")
    items = run_step(sched)
    # its freed blocks kept their hashes, so part of the recompute is a prefix-cache hit
    assert b.num_cached_tokens > 0
    assert items == [("b", 8 + produced - b.num_cached_tokens)]
    assert b.num_output_tokens == produced + 1


def test_lone_sequence_never_preempts_itself_forever() -> None:
    sched = Scheduler(BlockManager(3, 4), EngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    a = seq("a", 5)
    sched.add(a)
    run_step(sched)
    for _ in range(3):
        run_step(sched)
    assert a.num_tokens == 9 and len(a.block_table) == 2
    # the cache is full: a preempts itself and waits rather than crashing
    run_step(sched)
    assert a.status is SequenceStatus.WAITING


def test_finish_releases_blocks() -> None:
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    a = seq("a", 9)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "abort")
    assert bm.num_free_blocks == 15 and not sched.has_unfinished()
    assert a.finish_reason == "abort"
