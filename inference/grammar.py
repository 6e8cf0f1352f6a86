"""Constrained decoding of agent actions: xgrammar grammars built from the offered tools' input schemas,
applied through the engine's logits-processor hook: per request, or to all of a step's constrained rows at
once (`GrammarLogitsProcessor.apply_batch`, which the engine's sampler calls when a step has several).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
import torch
import xgrammar as xgr

log = structlog.get_logger(__name__)

# What a grammar is built from: a JSON schema (our protocol), an xgrammar structural tag (chat-template tool
# formats: free text, with JSON arguments constrained between the format's tags), or a sequence of parts (literal
# text, a choice of literals, a JSON schema, a JSON string) that must follow one another: the two-stage actions
# (a tool name from a choice, then that tool's arguments followed by the closing text).
GrammarKind = Literal["json_schema", "structural_tag", "sequence"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    payload: str  # canonical JSON text (schema or structural tag)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.payload}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """A tool as the grammar sees it: its (namespaced) name and its input JSON schema."""

    name: str
    parameters: Mapping[str, Any]


# -- schemas -------------------------------------------------------------------------------------------

_UNCONSTRAINED_ARGS: dict[str, Any] = {"type": "object"}


def normalise_parameters(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """A tool input schema made safe to embed: an object schema without `$schema`/`$id` noise."""
    if not schema:
        return {"type": "object", "properties": {}}
    out = {k: copy.deepcopy(v) for k, v in schema.items() if k not in ("$schema", "$id", "title")}
    out.setdefault("type", "object")
    return out


def _hoist_defs(schema: dict[str, Any], prefix: str, root_defs: dict[str, Any]) -> dict[str, Any]:
    """Move a sub-schema's `$defs`/`definitions` to the root (renamed with `prefix`) and rewrite its refs.

    Tool schemas refer to their own definitions as `#/$defs/X`; once embedded under `anyOf` in a larger
    schema those refs would point at the wrong root.
    """
    local: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        defs = schema.pop(key, None)
        if isinstance(defs, dict):
            for name, sub in defs.items():
                local[f"#/{key}/{name}"] = f"{prefix}{name}"
                root_defs[f"{prefix}{name}"] = sub

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref in local:
                    node = {**node, "$ref": f"#/$defs/{local[ref]}"}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    rewritten: dict[str, Any] = rewrite(schema)
    for name in [local[k] for k in local]:
        root_defs[name] = rewrite(root_defs[name])
    return rewritten


def json_action_schema(
    tools: Sequence[ToolSchema],
    tool_choice: str = "auto",
    *,
    thought: bool = False,
    max_parallel: int = 1,
) -> dict[str, Any]:
    """The JSON schema of one action in our protocol.

    A tool call is `{"tool": NAME, "arguments": {...}}` with arguments matching that tool's schema; a
    final answer is `{"answer": "..."}`; several calls in one step are a JSON array of tool calls. With
    `thought`, each object may start with an optional `"thought"` string. `tool_choice` is `auto`,
    `required`, `none` or the name of one tool.
    """
    root_defs: dict[str, Any] = {}
    thought_prop = {"thought": {"type": "string"}} if thought else {}
    if tool_choice not in ("auto", "required", "none"):
        tools = [t for t in tools if t.name == tool_choice]
        if not tools:
            raise ValueError(f"tool_choice names {tool_choice!r}, which is not among the offered tools")
    calls: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        params = _hoist_defs(normalise_parameters(tool.parameters), f"t{i}_", root_defs)
        calls.append(
            {
                "type": "object",
                "properties": {**thought_prop, "tool": {"const": tool.name}, "arguments": params},
                "required": ["tool", "arguments"],
                "additionalProperties": False,
            }
        )
    answer = {
        "type": "object",
        "properties": {**thought_prop, "answer": {"type": "string", "minLength": 1}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    options: list[dict[str, Any]] = []
    if tool_choice != "none":
        options.extend(calls)
        if max_parallel > 1 and calls:
            one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
            options.append({"type": "array", "items": one_call, "minItems": 2, "maxItems": max_parallel})
    if tool_choice in ("auto", "none") or not calls:
        options.append(answer)
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if root_defs:
        schema = {**schema, "$defs": root_defs}
    return schema


def json_schema_spec(schema: Mapping[str, Any]) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


SequencePart = Mapping[str, Any]  # {"literal": text} | {"choice": [texts]} | {"json_schema": schema}


def sequence_spec(*alternatives: Sequence[SequencePart]) -> GrammarSpec:
    """Text that is one of `alternatives`, each a sequence of parts matched one after the other:
    `{"literal": text}` exactly that text, `{"choice": [texts]}` one of the texts, `{"json_schema": schema}` a
    JSON value matching the schema (compact: `", "` and `": "` separators, as our protocol writes JSON)."""
    return GrammarSpec("sequence", json.dumps([list(a) for a in alternatives], separators=(",", ":")))


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # EBNF string literals use JSON's escapes


def _sequence_grammar(payload: str) -> xgr.Grammar:
    alternatives: list[xgr.Grammar] = []
    for parts in json.loads(payload):
        grammars: list[xgr.Grammar] = []
        for part in parts:
            if "literal" in part:
                grammars.append(xgr.Grammar.from_ebnf(f"root ::= {_ebnf_literal(part['literal'])}"))
            elif "choice" in part:
                options = " | ".join(_ebnf_literal(c) for c in part["choice"])
                grammars.append(xgr.Grammar.from_ebnf(f"root ::= {options}"))
            else:
                grammars.append(
                    xgr.Grammar.from_json_schema(
                        json.dumps(part["json_schema"]),
                        any_whitespace=False,
                        separators=(", ", ": "),
                        strict_mode=True,
                    )
                )
        alternatives.append(grammars[0] if len(grammars) == 1 else xgr.Grammar.concat(*grammars))
    return alternatives[0] if len(alternatives) == 1 else xgr.Grammar.union(*alternatives)


def structural_tag_spec(tag: Mapping[str, Any]) -> GrammarSpec:
    return GrammarSpec("structural_tag", json.dumps(tag, separators=(",", ":")))


# -- compilation -----------------------------------------------------------------------------------------


class GrammarError(Exception):
    """A grammar could not be compiled (an input schema xgrammar does not support)."""


@dataclass(slots=True)
class _Compiled:
    grammar: xgr.CompiledGrammar
    spec: GrammarSpec


class GrammarCompilerCache:
    """One xgrammar compiler per tokenizer, and compiled grammars cached by spec hash (tool sets repeat)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, *, max_threads: int = 2) -> None:
        # The model's vocab (embedding rows) may exceed the tokenizer's; the bitmask must cover the logits.
        self.vocab_size = int(vocab_size)
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self.stop_token_ids: tuple[int, ...] = tuple(self.info.stop_token_ids)
        # Fills the bitmasks of a step's constrained rows in one threaded call (GrammarLogitsProcessor.apply_batch).
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads=max_threads)
        self._cache: dict[str, _Compiled] = {}
        self._lock = threading.Lock()
        self.compiles = 0

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """Compile (or fetch) the grammar for `spec`; raises GrammarError when xgrammar rejects it."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                return hit.grammar
        try:
            if spec.kind == "json_schema":
                grammar = self.compiler.compile_json_schema(
                    spec.payload, any_whitespace=False, separators=(", ", ": "), strict_mode=True
                )
            elif spec.kind == "sequence":
                grammar = self.compiler.compile_grammar(_sequence_grammar(spec.payload))
            else:
                grammar = self.compiler.compile_structural_tag(spec.payload)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError variously
            raise GrammarError(f"cannot compile {spec.kind} grammar: {exc}") from exc
        with self._lock:
            self._cache[spec.key] = _Compiled(grammar, spec)
            self.compiles += 1
        return grammar

    def compile_actions(
        self,
        tools: Sequence[ToolSchema],
        tool_choice: str = "auto",
        *,
        thought: bool = False,
        max_parallel: int = 1,
    ) -> tuple[xgr.CompiledGrammar, GrammarSpec]:
        """The action grammar of our JSON protocol; a tool whose schema xgrammar rejects keeps its name
        constrained but gets free-form object arguments (the executor still validates them)."""
        spec = json_schema_spec(
            json_action_schema(tools, tool_choice, thought=thought, max_parallel=max_parallel)
        )
        try:
            return self.compile(spec), spec
        except GrammarError:
            fixed: list[ToolSchema] = []
            for tool in tools:
                try:
                    self.compile(json_schema_spec(json_action_schema([tool], "required")))
                    fixed.append(tool)
                except GrammarError as exc:
                    log.warning(
                        "tool schema not constrainable; arguments left free-form",
                        tool=tool.name,
                        error=str(exc),
                    )
                    fixed.append(ToolSchema(tool.name, _UNCONSTRAINED_ARGS))
            spec = json_schema_spec(
                json_action_schema(fixed, tool_choice, thought=thought, max_parallel=max_parallel)
            )
            return self.compile(spec), spec


# -- the logits processor ----------------------------------------------------------------------------------


@dataclass(slots=True)
class GrammarStats:
    steps: int = 0
    masked_steps: int = 0
    rejected_tokens: int = 0  # sampled tokens the grammar refused (should stay 0)
    fill_seconds: float = 0.0


class GrammarLogitsProcessor:
    """Masks one request's logits to the tokens its grammar allows; forces EOS once the grammar is complete.

    The engine calls it every step with the ids generated so far; the processor feeds the ones it has not
    seen to its matcher first (so the sampled token is accepted on the next call), and rolls back when the
    list shrank (a recompute after preemption may replay a shorter prefix).
    """

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        batch_matcher: xgr.BatchGrammarMatcher | None = None,
    ) -> None:
        """`batch_matcher` (usually the compiler cache's) serves `apply_batch`; without one a batch makes its own."""
        self.matcher = xgr.GrammarMatcher(compiled)
        self.batch_matcher = batch_matcher
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = tuple(stop_token_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._accepted = 0
        self.broken = False  # a token outside the grammar was generated: stop constraining, force EOS
        self.stats = GrammarStats()

    @property
    def done(self) -> bool:
        return self.broken or self.matcher.is_terminated()

    def sync(self, output_token_ids: Sequence[int]) -> None:
        n = len(output_token_ids)
        if n < self._accepted:
            self.matcher.rollback(self._accepted - n)
            self._accepted = n
        while self._accepted < n and not self.done:
            token = int(output_token_ids[self._accepted])
            if not self.matcher.accept_token(token):
                self.stats.rejected_tokens += 1
                self.broken = True
                log.warning("generated token rejected by the grammar", token=token, position=self._accepted)
                break
            self._accepted += 1

    def _force_stop(self, logits: torch.Tensor) -> None:
        if not self.stop_token_ids:
            logits.fill_(float("-inf"))
            return
        # an index tensor already on the logits' device: a Python list would be a blocking host copy on CUDA
        stops = _on_device(torch.tensor(self.stop_token_ids, dtype=torch.long), logits.device)
        keep = logits.index_select(-1, stops)
        logits.fill_(float("-inf"))
        # Keep the model's preference among stop tokens but make one of them certain.
        logits.index_copy_(-1, stops, torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep)))

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self.sync(output_token_ids)
        self.stats.steps += 1
        if self.done:
            self._force_stop(logits)
            return logits
        self.matcher.fill_next_token_bitmask(self._bitmask)
        view = logits.view(1, -1)
        xgr.apply_token_bitmask_inplace(
            view, _on_device(self._bitmask, logits.device), vocab_size=self.vocab_size
        )
        self.stats.masked_steps += 1
        return logits

    @staticmethod
    def apply_batch(
        processors: Sequence[GrammarLogitsProcessor],
        outputs: Sequence[Sequence[int]],
        logits: torch.Tensor,
        *,
        batch_matcher: xgr.BatchGrammarMatcher | None = None,
    ) -> torch.Tensor:
        """Mask a `[batch, vocab]` logits tensor row by row in one pass: one bitmask fill over all
        matchers (threaded in xgrammar) and one masking kernel, instead of one call per request."""
        live: list[int] = []
        for i, (proc, out) in enumerate(zip(processors, outputs, strict=True)):
            proc.sync(out)
            proc.stats.steps += 1
            if proc.done:
                proc._force_stop(logits[i])
            else:
                live.append(i)
        if not live:
            return logits
        vocab = processors[live[0]].vocab_size
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
        matcher = batch_matcher or processors[live[0]].batch_matcher or xgr.BatchGrammarMatcher(max_threads=2)
        matcher.batch_fill_next_token_bitmask([processors[i].matcher for i in live], bitmask, indices=live)
        xgr.apply_token_bitmask_inplace(
            logits, _on_device(bitmask, logits.device), vocab_size=vocab, indices=live
        )
        for i in live:
            processors[i].stats.masked_steps += 1
        return logits


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (bitmask, stop ids) on the logits' device; to a GPU through pinned memory, so the copy
    does not wait for the model's queued work (the engine's sampler syncs once per step, reading the ids)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
