"""Per-request sampling parameters and the logits-processor hook, validated at the engine's edge."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from inference.errors import RequestError


@runtime_checkable
class LogitsProcessor(Protocol):
    """Called every step before sampling with the request's generated ids and its `[vocab]` float32 logits.

    May modify the logits in place; must return the logits to sample from.
    """

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


class OutputKind(enum.Enum):
    """What a request's `RequestOutput`s carry (inference/engine.py). Every output has the delta since the
    request's previous output; the totals (`text`, `token_ids`, `logprobs`) cost O(length) per output."""

    CUMULATIVE = "cumulative"  # totals on every output (the default)
    DELTA = "delta"  # deltas on every output, totals only on the final one: for streaming consumers
    FINAL_ONLY = "final_only"  # one output, when the request ends, with the totals


MAX_LOGIT_BIAS = (
    1024  # token ids one request may bias (OpenAI allows 300; agents bias a tool result's tokens)
)


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops. `temperature == 0` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logits_processor: LogitsProcessor | None = None
    output_kind: OutputKind = OutputKind.CUMULATIVE
    adapter: str | None = None  # a loaded LoRA adapter's name (inference/lora.py); None is the base model
    # Added to the logits of these token ids before sampling (OpenAI's `logit_bias`; -100 all but bans a token).
    logit_bias: Mapping[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_full_sampler(self) -> bool:
        """False when plain argmax over raw logits gives the same token (the batched fast path)."""
        return not (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.logits_processor is None
            and self.logprobs is None
            and not self.logit_bias
        )

    def validate(self) -> None:
        """Raise RequestError naming the first bad field."""
        if isinstance(self.stop, str):  # a single string is a common slip: treat it as one stop string
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.output_kind, OutputKind):
            kinds = ", ".join(k.value for k in OutputKind)
            try:
                self.output_kind = OutputKind(self.output_kind)
            except ValueError:
                raise RequestError(
                    f"invalid sampling parameter: output_kind must be one of {kinds}",
                    "fix `output_kind` in the request",
                ) from None
        checks: list[tuple[bool, str, str]] = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                "max_tokens must be >= 1",
                "max_tokens",
            ),
            (_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0", "temperature"),
            (
                isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
                "top_k must be -1 or >= 1",
                "top_k",
            ),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", "min_p"),
            (
                _finite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty must be > 0",
                "repetition_penalty",
            ),
            (
                _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "presence_penalty must be in [-2, 2]",
                "presence_penalty",
            ),
            (
                _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "frequency_penalty must be in [-2, 2]",
                "frequency_penalty",
            ),
            (
                self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
                "logprobs must be None or in [0, 20]",
                "logprobs",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty strings",
                "stop",
            ),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0", "stop_token_ids"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an int or None", "seed"),
            (
                self.adapter is None or (isinstance(self.adapter, str) and bool(self.adapter)),
                "adapter must be a non-empty adapter name or None",
                "adapter",
            ),
            (
                self.logit_bias is None
                or (
                    isinstance(self.logit_bias, Mapping)
                    and len(self.logit_bias) <= MAX_LOGIT_BIAS
                    and all(
                        isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100
                        for t, b in self.logit_bias.items()
                    )
                ),
                f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (>= 0) to biases in [-100, 100]",
                "logit_bias",
            ),
            (
                self.logits_processor is None or callable(self.logits_processor),
                "logits_processor must be callable",
                "logits_processor",
            ),
        ]
        for ok, reason, field in checks:
            if not ok:
                raise RequestError(f"invalid sampling parameter: {reason}", f"fix `{field}` in the request")


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
