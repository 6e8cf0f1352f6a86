"""The action grammar on SmolLM2's tokenizer: every action generated under it parses and validates."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import torch

from inference.formats import parse_json_protocol
from inference.grammar import GrammarCompilerCache, GrammarLogitsProcessor, ToolSchema, json_action_schema

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def cache(smollm2_fp32: Any) -> GrammarCompilerCache:
    return GrammarCompilerCache(smollm2_fp32.tokenizer.hf, smollm2_fp32.config.vocab_size)


def _random_value_schema(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "enum", "integer", "number", "boolean"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "enum":
        return {
            "type": "string",
            "enum": rng.sample(["red", "green", "blue", "a b", "x/y", "Ω"], rng.randint(1, 4)),
        }
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": -1.5, "maximum": 99.5}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": _random_value_schema(rng, depth + 1), "minItems": 0, "maxItems": 3}
    return _random_object(rng, depth + 1)


def _random_object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(["city", "count", "mode", "tags", "opts", "limit", "unit", "deep"], rng.randint(1, 4))
    props = {n: _random_value_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required}


def _structural_ids(cache: GrammarCompilerCache, vocab: list[bytes]) -> list[int]:
    # Bias random decoding towards short completions so most samples terminate within the step limit.
    wanted = {b'"', b"}", b"]", b",", b"0", b"1", b"5", b"true", b" ", b"{", b"["}
    return [i for i, tok in enumerate(vocab) if tok in wanted] + list(cache.stop_token_ids)


def test_two_hundred_random_actions_parse_and_validate(cache: GrammarCompilerCache) -> None:
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    vocab = (
        cache.info.decoded_vocab
    )  # the property rebuilds the whole list (0.5 s) on every read: read it once
    bias_ids = torch.tensor(_structural_ids(cache, vocab))
    done = unterminated = calls = 0
    while done < 200:
        tools = [ToolSchema(f"srv__tool{i}", _random_object(rng, 0)) for i in range(rng.randint(1, 3))]
        choice = rng.choice(["auto", "required", tools[0].name])
        compiled, _ = cache.compile_actions(tools, choice, max_parallel=rng.choice([1, 3]))
        by_name = {t.name: t for t in tools}
        for _sample in range(4):  # several actions per grammar: compiling dominates otherwise
            proc = GrammarLogitsProcessor(compiled, cache.vocab_size, cache.stop_token_ids)
            out: list[int] = []
            finished = False
            for _ in range(300):
                logits = torch.randn(cache.vocab_size, generator=gen)
                logits[bias_ids] += 4.0
                proc(out, logits)
                token = int(torch.argmax(logits))
                if token in cache.stop_token_ids:
                    finished = True
                    break
                out.append(token)
            if not finished:
                unterminated += 1
                assert unterminated < 100, "random decoding rarely terminates: the test lost its power"
                continue
            assert proc.stats.rejected_tokens == 0
            text = b"".join(vocab[i] for i in out).decode("utf-8")
            json.loads(text)  # the whole reply is one JSON value
            action = parse_json_protocol(text)
            assert action.error is None, (text, action)
            if choice != "auto":
                assert action.answer is None
            for call in action.calls:
                assert call.name in by_name, text
                if choice not in ("auto", "required"):
                    assert call.name == choice
                jsonschema.validate(call.arguments, by_name[call.name].parameters)
                calls += 1
            done += 1
    assert calls >= 100  # most actions were tool calls, not answers


def test_schema_embeds_definitions_and_choices() -> None:
    schema = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}},
        "required": ["where"],
        "$defs": {
            "Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        },
    }
    action = json_action_schema([ToolSchema("geo__find", schema)], "auto")
    assert action["$defs"]["t0_Place"]["required"] == ["city"]
    call = action["anyOf"][0]
    assert call["properties"]["arguments"]["properties"]["where"] == {"$ref": "#/$defs/t0_Place"}
    jsonschema.validate({"tool": "geo__find", "arguments": {"where": {"city": "Oslo"}}}, action)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool": "geo__find", "arguments": {"where": {}}}, action)
    none = json_action_schema([ToolSchema("geo__find", schema)], "none")
    assert none["required"] == ["answer"]
    with pytest.raises(ValueError, match="not among the offered tools"):
        json_action_schema([ToolSchema("geo__find", schema)], "other")


def test_terminated_grammar_forces_stop_and_compiles_are_cached(cache: GrammarCompilerCache) -> None:
    tools = [ToolSchema("t__x", {"type": "object", "properties": {}})]
    _, spec = cache.compile_actions(tools, "required")
    before = cache.compiles
    again, spec2 = cache.compile_actions(tools, "required")
    assert spec2.key == spec.key and cache.compiles == before
    proc = GrammarLogitsProcessor(again, cache.vocab_size, cache.stop_token_ids)
    text = '{"tool": "t__x", "arguments": {}}'
    assert proc.matcher.accept_string(text)
    logits = torch.zeros(cache.vocab_size)
    proc([], logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= set(cache.stop_token_ids)
