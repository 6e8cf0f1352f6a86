"""Continuous batching: picks each step's tokens under a token and sequence budget, with chunked prefill
and preemption by recompute (newest first) when KV blocks run out."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: `(sequence, number of new tokens)` pairs, decodes first, who was preempted, and who
    was admitted from the waiting queue."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    """Decides which sequences run each step. Every sequence is either waiting (FIFO, preempted ones in
    front) or running; running sequences keep admission order so the newest is preempted first."""

    def __init__(self, block_manager: BlockManager, config: EngineConfig) -> None:
        """Each step schedules at most `config.max_num_batched_tokens` tokens of at most `config.max_num_seqs`
        running sequences."""
        self.block_manager = block_manager
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        items = batch.items
        budget = self.config.max_num_batched_tokens
        max_num_seqs = self.config.max_num_seqs
        allocate = self.block_manager.allocate
        scheduled: set[int] = set()
        # decodes first (one token each, latency-sensitive), then running prefill chunks, each in running order
        decodes = [s for s in self.running if len(s.token_ids) - s.num_computed_tokens <= 1]
        if len(decodes) == len(self.running):
            queue = decodes
        else:
            queue = decodes + [s for s in self.running if len(s.token_ids) - s.num_computed_tokens > 1]
        running = SequenceStatus.RUNNING
        for seq in queue:
            if budget == 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not allocate(seq, num_new):
                victim = self._pick_victim(scheduled)
                if victim is None:
                    break
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                items.append((seq, num_new))
                scheduled.add(id(seq))
                budget -= num_new
                continue
            if seq.status is not running:
                continue
            # nothing left to preempt but seq itself is not schedulable: preempt it so that it retries later
            self._preempt(seq)
            batch.preempted.append(seq)
        # admit waiting sequences only when nobody was preempted (otherwise they would just thrash)
        if not batch.preempted:
            while self.waiting and budget > 0 and len(self.running) < max_num_seqs:
                seq = self.waiting[0]
                if not allocate(seq, min(seq.num_uncomputed_tokens, budget)):
                    break
                self.waiting.popleft()
                num_new = min(seq.num_uncomputed_tokens, budget)
                seq.status = running
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                self.running.append(seq)
                items.append((seq, num_new))
                batch.admitted.append(seq)
                budget -= num_new
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done, aborted or failed) and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _pick_victim(self, scheduled: set[int]) -> Sequence | None:
        # newest running sequence not already given tokens this step; a scheduled one cannot give its blocks back
        for seq in reversed(self.running):
            if id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.preempted_time = time.monotonic()
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
