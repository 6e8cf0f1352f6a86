"""Sampling by a server (`sampling/createMessage`): whether it is allowed, how many tokens, which of our models.

Pure decisions on plain values; the tools layer turns the SDK's request into these values and runs the model
the agents layer installed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

SamplingApproval = Literal["never", "always"]
DEFAULT_MAX_TOKENS = 512  # what a server gets at most when its policy names no cap
MAX_MESSAGES = 64  # messages one request may carry
MAX_PROMPT_CHARS = 64 * 1024  # the text of all messages and the system prompt together
# Keys of `models` chosen by the server's strongest priority when no hint matched.
PRIORITY_KEYS = ("intelligence", "speed", "cost")


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """One server's sampling rules (config `sampling` of the server). Off unless `allow` is set."""

    allow: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    approval: SamplingApproval = "never"
    # model-hint glob (or a priority key: intelligence/speed/cost) -> our model source; "*" for the rest
    models: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SamplingAsk:
    """What a request asks, reduced to what the decision needs."""

    max_tokens: int
    messages: int
    prompt_chars: int
    non_text: tuple[str, ...] = ()  # content types we cannot render (image, audio, tool_use...)
    wants_tools: bool = False
    hints: tuple[str, ...] = ()
    intelligence: float | None = None
    speed: float | None = None
    cost: float | None = None


@dataclass(frozen=True, slots=True)
class SamplingDecision:
    allowed: bool
    reason: str  # why it was refused, or how it was granted
    max_tokens: int = 0  # the clamped budget when allowed
    model: str | None = None  # our model source to use (None: the default model)
    needs_approval: bool = False


def decide(policy: SamplingPolicy, ask: SamplingAsk, *, sampler_available: bool) -> SamplingDecision:
    """Allowed or not, and on what terms: refusals name the config key or the limit that refused."""
    if not policy.allow:
        return SamplingDecision(False, "sampling is not allowed for this server (config: sampling.allow)")
    if not sampler_available:
        return SamplingDecision(False, "no model is loaded in this client, so it cannot sample")
    if ask.wants_tools:
        return SamplingDecision(False, "sampling with tools is not supported by this client")
    if ask.non_text:
        return SamplingDecision(
            False, f"only text content can be sampled, not {', '.join(sorted(set(ask.non_text)))}"
        )
    if ask.messages == 0:
        return SamplingDecision(False, "the request has no messages")
    if ask.messages > MAX_MESSAGES:
        return SamplingDecision(False, f"the request has {ask.messages} messages (at most {MAX_MESSAGES})")
    if ask.prompt_chars > MAX_PROMPT_CHARS:
        return SamplingDecision(
            False, f"the prompt has {ask.prompt_chars} characters (at most {MAX_PROMPT_CHARS})"
        )
    if ask.max_tokens < 1:
        return SamplingDecision(False, "maxTokens must be at least 1")
    budget = min(ask.max_tokens, policy.max_tokens)
    reason = "allowed" if budget == ask.max_tokens else f"allowed; maxTokens clamped to {budget}"
    return SamplingDecision(
        True,
        reason,
        max_tokens=budget,
        model=choose_model(policy.models, ask),
        needs_approval=policy.approval == "always",
    )


def choose_model(models: Mapping[str, str], ask: SamplingAsk) -> str | None:
    """Our model for the request's preferences: the first hint (in order, as the spec says) that a key of
    `models` matches (a glob, or a substring as hints are meant), else the model under the key of its
    strongest priority (over 0.5), else `models["*"]`, else None (the default model)."""
    for hint in ask.hints:
        lowered = hint.lower()
        for key, model in models.items():
            if key in PRIORITY_KEYS or key == "*":
                continue
            pattern = key.lower()
            if fnmatch.fnmatchcase(lowered, pattern) or pattern in lowered:
                return model
    priorities = [
        (value, key)
        for key, value in (("intelligence", ask.intelligence), ("speed", ask.speed), ("cost", ask.cost))
        if value is not None and value > 0.5 and key in models
    ]
    if priorities:
        return models[max(priorities)[1]]
    return models.get("*")


def approval_arguments(
    system_prompt: str | None, messages: Sequence[tuple[str, str]], max_tokens: int
) -> dict[str, object]:
    """What an approver is shown for a sampling request (shortened: a prompt can be long)."""
    shown = [{"role": role, "text": text[:500]} for role, text in messages[-4:]]
    return {
        "system_prompt": (system_prompt or "")[:500],
        "messages": shown,
        "message_count": len(messages),
        "max_tokens": max_tokens,
    }
