"""The API server's view of the in-process engine: its model name, tokenizer facts, grammar compilation for
constrained answers, and a request stream whose cancellation aborts the engine request."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import structlog

from agent_runtime.server.errors import bad_request
from inference.grammar import GrammarCompilerCache, GrammarError, GrammarLogitsProcessor, GrammarSpec

log = structlog.get_logger(__name__)


class EngineService:
    """Wraps an `inference` AsyncEngine (duck-typed: `generate`, `tokenizer`, `model_config`, `metrics`)."""

    def __init__(self, engine: Any, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self._grammar: GrammarCompilerCache | None = None
        self.grammar_specs: dict[str, int] = {}  # spec key -> requests served (metrics)
        self._grammar_lock = anyio.Lock()
        self._tool_role_ok: bool | None = None

    @property
    def max_model_len(self) -> int:
        for owner in (self.engine, getattr(self.engine, "engine", None)):
            value = getattr(owner, "max_model_len", None)
            if isinstance(value, int):
                return value
        return int(self.model_config.max_position_embeddings)

    @property
    def tool_role_ok(self) -> bool:
        """Whether the chat template renders `tool` messages (ChatML-style templates do; some raise)."""
        if self._tool_role_ok is None:
            probe = [{"role": "user", "content": "q"}, {"role": "tool", "content": "zz_tool_probe_91"}]
            try:
                self._tool_role_ok = "zz_tool_probe_91" in self.tokenizer.render_chat(probe)
            except Exception:  # a template that rejects the role cannot render it
                self._tool_role_ok = False
        return self._tool_role_ok

    def metrics(self) -> Any:
        return self.engine.metrics()

    async def grammar_processor(self, spec: GrammarSpec) -> Any:
        """A fresh logits processor for `spec`; compilation (cached per spec) runs off the event loop."""
        async with self._grammar_lock:
            if self._grammar is None:
                hf, vocab = self.tokenizer.hf, self.model_config.vocab_size
                self._grammar = await anyio.to_thread.run_sync(lambda: GrammarCompilerCache(hf, vocab))
        cache = self._grammar
        try:
            compiled = await anyio.to_thread.run_sync(cache.compile, spec)
        except GrammarError as exc:
            raise bad_request(
                str(exc), param="response_format" if spec.kind == "json_schema" else None
            ) from None
        self.grammar_specs[spec.key] = self.grammar_specs.get(spec.key, 0) + 1
        return GrammarLogitsProcessor(
            compiled, cache.vocab_size, cache.stop_token_ids, batch_matcher=cache.batch_matcher
        )

    async def stream(self, prompt: Any, params: Any, request_id: str) -> AsyncGenerator[Any, None]:
        """Engine outputs for one request; leaving the loop early (or being cancelled) aborts it."""
        async with aclosing(self.engine.generate(prompt, params, request_id=request_id)) as outputs:
            async for out in outputs:
                yield out
