"""One request's state inside the engine: its tokens, KV block table, progress and stop/text bookkeeping."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """A request in flight. `token_ids` is prompt + generated; the first `num_computed_tokens` have KV in the cache.

    A sequence samples a token whenever a step brings `num_computed_tokens` up to `num_tokens`.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # prefix-cache bookkeeping: how many leading blocks are hashed and the hash of the last one
    num_hashed_blocks: int = 0
    last_block_hash: bytes | None = None
    num_cached_tokens: int = 0  # tokens served from the prefix cache on the latest admission
    cache_extra_key: tuple[Any, ...] = ()  # mixed into block hashes (reserved for adapters)
    # X-LoRA: a second KV cache for the scaling pass (inference/lora.py), block for block beside `block_table` and
    # hashed under its own extra key; None for every other request (no second cache)
    pass_cache_key: tuple[Any, ...] | None = None
    pass_block_table: list[int] = field(default_factory=list)
    pass_last_block_hash: bytes | None = None
    generator: torch.Generator | None = None  # a seeded request's own, on the model's device
    sampler_state: Any = None  # the sampler's per-request device state (penalty statistics)
    finish_reason: str | None = None
    # timing for metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    preempted_time: float | None = None  # when last preempted, until re-admitted (the KV-block wait)
    admitted: bool = False  # queue wait recorded
    # text bookkeeping: full decoded text, how much of it was streamed, and pending ids since the last output
    detokenizer: Any = None
    text: str = ""
    emitted_text_len: int = 0
    emitted_token_count: int = 0
    logprobs: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
