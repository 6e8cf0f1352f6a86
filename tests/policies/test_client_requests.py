"""Pure decisions on servers' requests to the client: sampling terms, elicitation schemas and answers, roots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policies.elicitation import (
    MAX_ENUM,
    MAX_PROPERTIES,
    MAX_TEXT,
    AnswerInvalid,
    ElicitationSchemaError,
    audit_answer,
    check_schema,
    parse_text,
    validate_answer,
)
from policies.roots import RootError, make_root
from policies.sampling import SamplingAsk, SamplingPolicy, choose_model, decide


def ask(**kw: Any) -> SamplingAsk:
    return SamplingAsk(**{"max_tokens": 100, "messages": 1, "prompt_chars": 10, **kw})


def test_sampling_is_refused_unless_allowed_and_a_model_is_there() -> None:
    assert not decide(SamplingPolicy(), ask(), sampler_available=True).allowed
    no_model = decide(SamplingPolicy(allow=True), ask(), sampler_available=False)
    assert not no_model.allowed and "no model" in no_model.reason
    ok = decide(SamplingPolicy(allow=True, max_tokens=40), ask(), sampler_available=True)
    assert ok.allowed and ok.max_tokens == 40 and "clamped to 40" in ok.reason
    assert decide(SamplingPolicy(allow=True), ask(max_tokens=7), sampler_available=True).max_tokens == 7


@pytest.mark.parametrize(
    ("request_kw", "why"),
    [
        ({"non_text": ("image",)}, "only text content"),
        ({"wants_tools": True}, "with tools"),
        ({"messages": 0}, "no messages"),
        ({"messages": 65}, "65 messages"),
        ({"prompt_chars": 10**6}, "characters"),
        ({"max_tokens": 0}, "at least 1"),
    ],
)
def test_sampling_refuses_what_it_cannot_or_should_not_do(request_kw: dict[str, Any], why: str) -> None:
    decision = decide(SamplingPolicy(allow=True), ask(**request_kw), sampler_available=True)
    assert not decision.allowed and why in decision.reason


def test_approval_is_asked_when_the_policy_says_always() -> None:
    assert decide(SamplingPolicy(allow=True, approval="always"), ask(), sampler_available=True).needs_approval
    assert not decide(SamplingPolicy(allow=True), ask(), sampler_available=True).needs_approval


def test_model_preferences_map_hints_in_order_then_priorities_then_the_fallback() -> None:
    models = {"*sonnet*": "big", "haiku": "small", "speed": "fast", "*": "default"}
    assert choose_model(models, ask(hints=("claude-3-5-sonnet", "haiku"))) == "big"
    assert choose_model(models, ask(hints=("gpt-4o", "claude-haiku"))) == "small"  # substring, second hint
    assert choose_model(models, ask(hints=("gpt-4o",), speed=0.9)) == "fast"
    assert choose_model(models, ask(speed=0.3)) == "default"
    assert choose_model({}, ask(hints=("anything",))) is None


def form(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


def test_the_spec_subset_is_accepted() -> None:
    schema = form(
        name={"type": "string", "maxLength": 5},
        age={"type": "integer", "minimum": 0, "maximum": 150},
        ok={"type": "boolean", "default": True},
        color={"type": "string", "enum": ["red", "blue"]},
        hero={"type": "string", "oneOf": [{"const": "h1", "title": "Superman"}]},
        tags={"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 1},
    )
    schema["required"] = ["name"]
    checked = check_schema(schema)
    assert [(f.name, f.kind) for f in checked.fields] == [
        ("name", "string"),
        ("age", "integer"),
        ("ok", "boolean"),
        ("color", "enum"),
        ("hero", "enum"),
        ("tags", "multi"),
    ]
    assert validate_answer(checked, {"name": "Ann", "age": 3, "tags": ["a"]}) == {
        "name": "Ann",
        "age": 3,
        "tags": ["a"],
    }
    for bad, why in [
        ({}, "name is required"),
        ({"name": "toolong"}, "at most 5"),
        ({"name": "a", "age": 200}, "at most 150"),
        ({"name": "a", "age": 1.5}, "whole number"),
        ({"name": "a", "color": "green"}, "one of red, blue"),
        ({"name": "a", "tags": ["a", "b"]}, "at most 1 choices"),
        ({"name": "a", "extra": 1}, "unknown field"),
        ({"name": "a", "ok": "yes"}, "true or false"),
    ]:
        with pytest.raises(AnswerInvalid) as invalid:
            validate_answer(checked, bad)
        assert why in invalid.value.reason


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        (form(**{f"f{i}": {"type": "string"} for i in range(MAX_PROPERTIES + 1)}), "properties (at most 32)"),
        (form(c={"type": "string", "enum": [str(i) for i in range(MAX_ENUM + 1)]}), "choices (at most 100)"),
        (form(d={"type": "string", "description": "x" * (MAX_TEXT + 1)}), "characters (at most 2000)"),
        (form(nested={"type": "object", "properties": {}}), "only flat primitive"),
        (form(list={"type": "array", "items": {"type": "number"}}), "multi-select enums"),
        (form(p={"type": "string", "pattern": "(a+)+$"}), "unsupported keys: pattern"),
        (form(r={"$ref": "#/definitions/x"}), "r has no type"),
        (form(f={"type": "string", "format": "hostname"}), "format"),
        ({"type": "array"}, '"type": "object"'),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
            "unknown properties",
        ),
    ],
)
def test_hostile_or_oversized_schemas_are_refused(schema: dict[str, Any], why: str) -> None:
    with pytest.raises(ElicitationSchemaError) as refused:
        check_schema(schema)
    assert why in refused.value.reason


def test_typed_answers_are_parsed_and_checked() -> None:
    checked = check_schema(
        form(
            n={"type": "number", "minimum": 1},
            b={"type": "boolean"},
            e={"type": "string", "enum": ["pet-1", "pet-2"], "enumNames": ["Cats", "Dogs"]},
            m={
                "type": "array",
                "items": {"anyOf": [{"const": "x", "title": "Ex"}, {"const": "y", "title": "Why"}]},
            },
            mail={"type": "string", "format": "email"},
            day={"type": "string", "format": "date"},
        )
    )
    n, b, e, m, mail, day = checked.fields
    assert parse_text(n, " 2.5 ") == 2.5
    assert parse_text(b, "Yes") is True and parse_text(b, "n") is False
    assert parse_text(e, "dogs") == "pet-2" and parse_text(e, "1") == "pet-1"
    assert parse_text(m, "Ex, y") == ["x", "y"]
    assert parse_text(mail, "a@b.org") == "a@b.org" and parse_text(day, "2026-12-07") == "2026-12-07"
    for field, text in [(n, "0"), (n, "abc"), (b, "maybe"), (e, "fish"), (mail, "not-mail"), (day, "07/12")]:
        with pytest.raises(AnswerInvalid):
            parse_text(field, text)


def test_answers_are_redacted_for_the_audit() -> None:
    checked = check_schema(
        form(api_key={"type": "string"}, pin={"type": "string", "title": "Password"}, note={"type": "string"})
    )
    kept = audit_answer(
        checked, {"api_key": "k-123456", "pin": "1234", "note": "token=abcdef123 ok"}, ("zzz",)
    )
    assert kept == {"api_key": "***", "pin": "***", "note": "token=*** ok"}
    assert audit_answer(checked, None) is None


def test_roots_are_file_uris_of_resolved_paths(tmp_path: Path) -> None:
    assert make_root("sub/../x", base=tmp_path).uri == (tmp_path.resolve() / "x").as_uri()
    assert make_root("file:///srv/a%20b", base=tmp_path, name="A").path == Path("/srv/a b")
    for bad in ("https://example.com/x", "file://otherhost/x", "", "a\x00b", "file://relative"):
        with pytest.raises(RootError):
            make_root(bad, base=tmp_path)
