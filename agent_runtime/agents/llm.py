"""The LLM backend interface the agent loop talks to, and its implementation on the in-process engine
(chat template rendering, grammar-constrained sampling through the engine's logits-processor hook).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import anyio
import structlog
import torch

from agent_runtime.config.agents import ModelSettings
from inference.config import EngineConfig
from inference.formats import detect_format
from inference.grammar import GrammarCompilerCache, GrammarLogitsProcessor, GrammarSpec
from inference.params import MAX_LOGIT_BIAS, OutputKind, SamplingParams

log = structlog.get_logger(__name__)


def engine_config(settings: ModelSettings) -> EngineConfig:
    """The engine's settings from the config file's `model` section: every field the two share by name (the
    section's own pydantic checks ran at load; EngineConfig checks again)."""
    shared = ModelSettings.model_fields.keys()
    return EngineConfig(
        **{f.name: getattr(settings, f.name) for f in fields(EngineConfig) if f.name in shared}
    )


# The `model` section's fields that are arguments of `inference.loader.load_model` (and AsyncEngine.from_model)
LOAD_OPTIONS = ("dtype", "device", "quantize", "quantize_group_size")


def load_options(settings: ModelSettings) -> dict[str, Any]:
    """The loader's keyword arguments from the config file's `model` section (how the weights are loaded)."""
    return {name: getattr(settings, name) for name in LOAD_OPTIONS}


@dataclass(slots=True)
class GenerationRequest:
    """One model turn: chat messages (the template's shape), optional template tools, an optional grammar."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    grammar: GrammarSpec | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    request_id: str | None = None
    adapter: str | None = None  # a LoRA adapter loaded in the engine (None: the base model)
    # Text the assistant's turn already starts with: the model continues it (a two-stage action's tool name,
    # the start of its arguments). Not repeated in the chunks' text.
    assistant_prefix: str = ""
    frequency_penalty: float = 0.0  # on the output's own tokens (breaks a small model's loops: "0000...")
    # A copy bias: `copy_bias` is added to the logits of the word tokens of `copy_text` (a tool's result), so a
    # small model answers with the result's names and values rather than from its priors. Only a local model
    # has it (a remote API's token ids are not ours to know); other backends ignore it.
    copy_text: str = ""
    copy_bias: float = 0.0
    # The values of the result lines that fit the task (agent_runtime/agents/focus.py): their word tokens get
    # `copy_bias` twice, so of two values of one kind the model copies the one that answers.
    copy_focus: str = ""


@dataclass(slots=True)
class GenerationChunk:
    delta_text: str
    text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(slots=True)
class BackendStats:
    requests: int = 0
    constrained_requests: int = 0
    grammar_compiles: int = 0
    grammar_seconds: float = 0.0  # compile time (cache misses)
    rejected_tokens: int = 0  # tokens the grammar refused after sampling (should stay 0)
    masked_steps: int = 0


class LLMBackend(Protocol):
    """Where the model runs. The loop only needs these; the local engine is one implementation."""

    name: str
    stats: BackendStats

    def tool_format(self) -> str:
        """`json`, `hermes`, `llama3` or `mistral`: the model's native tool format, else our protocol."""
        ...

    @property
    def supports_grammar(self) -> bool: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]: ...

    @property
    def supports_prefix(self) -> bool:
        """Whether `GenerationRequest.assistant_prefix` is honoured (and `score` works): the two-stage actions
        need it; a backend without it gets whole actions under one grammar."""
        ...

    async def score(self, request: GenerationRequest, continuations: list[str]) -> list[float]:
        """The model's log-probability of each continuation of the request's prompt (and prefix)."""
        ...

    async def aclose(self) -> None: ...


class ContinuationScorer:
    """A logits processor that forces a given token sequence and adds up the log-probability the model gave
    each of its tokens (read from the raw logits, before the forcing)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.logprob = 0.0

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_token_ids)
        if step >= len(self.token_ids):
            return logits
        token = self.token_ids[step]
        self.logprob += float(torch.log_softmax(logits.float(), dim=-1)[token])
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced


@dataclass(slots=True)
class _Grammars:
    cache: GrammarCompilerCache
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class LocalEngineBackend:
    """The in-process engine shared by every agent of a runtime; requests batch together in its scheduler."""

    name = "local"

    def __init__(self, engine: Any, *, owns_engine: bool = True) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.owns_engine = owns_engine
        self.stats = BackendStats()
        self._grammars: _Grammars | None = None
        self._format: str | None = None
        self._word_tokens: dict[int, bool] = {}  # token id -> whether it carries a letter or digit

    @classmethod
    async def load(
        cls, settings: ModelSettings, *, source: str | None = None, progress: bool = False
    ) -> LocalEngineBackend:
        """Load the model on a worker thread (the event loop keeps serving MCP traffic meanwhile)."""
        from inference.async_engine import AsyncEngine

        src = source or settings.source
        started = time.perf_counter()

        def load() -> Any:
            return AsyncEngine.from_model(
                src,
                engine_config(settings),
                progress=progress,
                adapters=settings.adapters,
                **load_options(settings),
            )

        engine = await anyio.to_thread.run_sync(load)
        log.info("model ready", source=src, seconds=round(time.perf_counter() - started, 2))
        return cls(engine)

    # -- facts --------------------------------------------------------------------------------------------

    def tool_format(self) -> str:
        if self._format is None:
            hf = self.tokenizer.hf
            self._format = detect_format(
                getattr(hf, "chat_template", None), self.tokenizer.has_tool_template()
            )
        return self._format

    @property
    def supports_grammar(self) -> bool:
        return True

    @property
    def supports_prefix(self) -> bool:
        return True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def grammar_cache(self) -> GrammarCompilerCache:
        if self._grammars is None:
            vocab = int(getattr(self.engine.model_config, "vocab_size", 0) or len(self.tokenizer.hf))
            self._grammars = _Grammars(GrammarCompilerCache(self.tokenizer.hf, vocab))
        return self._grammars.cache

    async def _processor(self, spec: GrammarSpec) -> Any:
        cache = self.grammar_cache()
        before = cache.compiles
        started = time.perf_counter()
        compiled = await anyio.to_thread.run_sync(cache.compile, spec)
        if cache.compiles != before:
            self.stats.grammar_compiles += 1
            self.stats.grammar_seconds += time.perf_counter() - started
        stops = tuple(self.tokenizer.eos_token_ids) or cache.stop_token_ids
        return GrammarLogitsProcessor(compiled, cache.vocab_size, stops, batch_matcher=cache.batch_matcher)

    # -- generation ---------------------------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> list[int]:
        ids: list[int] = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, tools=request.tools
        )
        if request.assistant_prefix:
            ids = ids + self.tokenizer.encode(request.assistant_prefix)
        return ids

    async def score(self, request: GenerationRequest, continuations: list[str]) -> list[float]:
        """Each continuation's log-probability after the prompt, from one forced request per continuation:
        they run together in the engine's batch and share the prompt's KV through the prefix cache."""
        prompt = self.render(request)
        results = [0.0] * len(continuations)

        async def one(i: int, text: str) -> None:
            ids = self.tokenizer.encode(text)
            if not ids:
                return
            scorer = ContinuationScorer(ids)
            params = SamplingParams(
                max_tokens=len(ids),
                temperature=0.0,
                logits_processor=scorer,
                output_kind=OutputKind.FINAL_ONLY,
                ignore_eos=True,
                adapter=request.adapter,
            )
            rid = f"{request.request_id}-score-{i}" if request.request_id else None
            async for _ in self.engine.generate(prompt, params, request_id=rid):
                pass
            results[i] = scorer.logprob

        async with anyio.create_task_group() as tg:
            for i, text in enumerate(continuations):
                tg.start_soon(one, i, text)
        return results

    def _copy_bias(self, text: str, bias: float, focus: str = "") -> dict[int, float] | None:
        """`bias` on each token of `text` that carries a letter or digit (punctuation and spaces are left to the
        grammar and the model), the text's last tokens first, at most MAX_LOGIT_BIAS of them; twice `bias` on
        those of `focus`."""
        if not (text or focus) or not bias:
            return None
        picked: dict[int, float] = {}
        for tid in self.tokenizer.encode(focus)[:MAX_LOGIT_BIAS] if focus else ():
            if tid not in picked and self._word_token(tid):
                picked[tid] = 2 * bias
        ids = self.tokenizer.encode(text) if text else []
        if len(ids) > 4 * MAX_LOGIT_BIAS:
            ids = ids[-4 * MAX_LOGIT_BIAS :]
        for tid in reversed(ids):
            if len(picked) >= MAX_LOGIT_BIAS:
                break
            if tid not in picked and self._word_token(tid):
                picked[tid] = bias
        return picked or None

    def _word_token(self, tid: int) -> bool:
        known = self._word_tokens.get(tid)
        if known is None:
            known = self._word_tokens[tid] = any(c.isalnum() for c in self.tokenizer.decode([tid]))
        return known

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        ids = self.render(request)
        processor = await self._processor(request.grammar) if request.grammar is not None else None
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            frequency_penalty=request.frequency_penalty,
            logits_processor=processor,
            output_kind=OutputKind.DELTA,  # the engine sends deltas; the running text is kept here
            adapter=request.adapter,
            logit_bias=self._copy_bias(request.copy_text, request.copy_bias, request.copy_focus),
        )
        self.stats.requests += 1
        if processor is not None:
            self.stats.constrained_requests += 1
        try:
            text = ""
            async for out in self.engine.generate(ids, params, request_id=request.request_id):
                text = out.text if out.finished else text + out.delta_text
                yield GenerationChunk(
                    out.delta_text,
                    text,
                    out.finished,
                    out.finish_reason,
                    out.prompt_tokens,
                    out.completion_tokens,
                    out.cached_tokens,
                )
        finally:
            if processor is not None:
                self.stats.rejected_tokens += processor.stats.rejected_tokens
                self.stats.masked_steps += processor.stats.masked_steps

    def metrics(self) -> Any:
        return self.engine.metrics()

    async def aclose(self) -> None:
        if self.owns_engine:
            await self.engine.aclose()
