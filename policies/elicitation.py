"""Elicitation (`elicitation/create`): the requested schema checked against the spec's flat, bounded subset,
answers checked against it, text typed by a person turned into values, and answers redacted for the audit.

A server's schema is hostile input: only top-level primitive properties (string, number, integer, boolean,
single- and multi-select enums) are accepted, within the bounds below, before anyone is asked anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from policies.errors import PolicyError
from policies.secrets import REDACTED, is_secret_name, redact

ElicitationMode = Literal["decline", "ask"]
FieldKind = Literal["string", "number", "integer", "boolean", "enum", "multi"]

MAX_PROPERTIES = 32
MAX_ENUM = 100  # choices of one enum
MAX_TEXT = 2000  # a message, title or description, in characters
MAX_STRING = 10_000  # an answer string when the schema sets no smaller maxLength
MAX_NAME = 64  # a property name
_FORMATS = ("email", "uri", "date", "date-time")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ANNOTATIONS = {"title", "description", "default", "$schema"}  # keys allowed beside a property's own


class ElicitationSchemaError(PolicyError):
    """The server's requested schema is not the spec's flat primitive subset, or exceeds our bounds."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"elicitation schema refused: {reason}", "the server must ask for flat primitive fields"
        )


class AnswerInvalid(PolicyError):
    """An answer does not satisfy the requested schema."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "answer again with a value the form accepts")


@dataclass(frozen=True, slots=True)
class FormField:
    """One property of a checked form schema."""

    name: str
    kind: FieldKind
    title: str
    description: str = ""
    required: bool = False
    choices: tuple[str, ...] = ()  # enum / multi values
    choice_titles: tuple[str, ...] = ()  # shown beside the values when the schema titles them
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    format: str | None = None
    min_items: int | None = None
    max_items: int | None = None
    default: Any = None

    @property
    def secret(self) -> bool:
        """Whether the field's name or title says credential (its answer is never written out)."""
        return is_secret_name(self.name) or is_secret_name(self.title)


@dataclass(frozen=True, slots=True)
class FormSchema:
    title: str
    fields: tuple[FormField, ...] = field(default_factory=tuple)


def check_message(message: Any) -> str:
    if not isinstance(message, str):
        raise ElicitationSchemaError("the message is not a string")
    if len(message) > MAX_TEXT:
        raise ElicitationSchemaError(f"the message has {len(message)} characters (at most {MAX_TEXT})")
    return message


def check_schema(schema: Any) -> FormSchema:
    """The schema as a FormSchema, or ElicitationSchemaError naming the first thing wrong with it."""
    if not isinstance(schema, Mapping):
        raise ElicitationSchemaError("requestedSchema is not an object")
    if schema.get("type") != "object":
        raise ElicitationSchemaError('requestedSchema must have "type": "object"')
    extra = set(schema) - {"type", "properties", "required", "title", "description", "$schema"}
    if extra:
        raise ElicitationSchemaError(f"unsupported keys at the top: {', '.join(sorted(extra)[:5])}")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise ElicitationSchemaError("properties is not an object")
    if len(props) > MAX_PROPERTIES:
        raise ElicitationSchemaError(f"{len(props)} properties (at most {MAX_PROPERTIES})")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ElicitationSchemaError("required is not a list of names")
    missing = [r for r in required if r not in props]
    if missing:
        raise ElicitationSchemaError(f"required names unknown properties: {', '.join(missing[:5])}")
    fields = tuple(_field(str(name), spec, name in required) for name, spec in props.items())
    return FormSchema(_text(schema.get("title", ""), "title"), fields)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ElicitationSchemaError(f"{what} is not a string")
    if len(value) > MAX_TEXT:
        raise ElicitationSchemaError(f"{what} has {len(value)} characters (at most {MAX_TEXT})")
    return value


def _number(spec: Mapping[str, Any], key: str, name: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ElicitationSchemaError(f"{name}.{key} is not a finite number")
    return float(value)


def _count(spec: Mapping[str, Any], key: str, name: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ElicitationSchemaError(f"{name}.{key} is not a non-negative integer")
    return value


def _choices(values: Any, name: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise ElicitationSchemaError(f"{name} has no choices")
    if len(values) > MAX_ENUM:
        raise ElicitationSchemaError(f"{name} has {len(values)} choices (at most {MAX_ENUM})")
    if not all(isinstance(v, str) for v in values):
        raise ElicitationSchemaError(f"{name}: choices must be strings")
    return tuple(_text(v, f"{name} choice") for v in values)


def _titled(options: Any, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`oneOf`/`anyOf` of {const, title}: (values, titles)."""
    if not isinstance(options, list) or not options:
        raise ElicitationSchemaError(f"{name} has no choices")
    if len(options) > MAX_ENUM:
        raise ElicitationSchemaError(f"{name} has {len(options)} choices (at most {MAX_ENUM})")
    values, titles = [], []
    for option in options:
        if not isinstance(option, Mapping) or not isinstance(option.get("const"), str):
            raise ElicitationSchemaError(f"{name}: each choice needs a string const")
        values.append(_text(option["const"], f"{name} choice"))
        titles.append(_text(option.get("title", option["const"]), f"{name} choice title"))
    return tuple(values), tuple(titles)


def _field(name: str, spec: Any, required: bool) -> FormField:
    if not name or len(name) > MAX_NAME:
        raise ElicitationSchemaError(f"property name {name[:MAX_NAME]!r} is empty or too long")
    if not isinstance(spec, Mapping):
        raise ElicitationSchemaError(f"{name} is not an object")
    kind = spec.get("type")
    title = _text(spec.get("title", name), f"{name}.title")
    description = _text(spec.get("description", ""), f"{name}.description")
    common: dict[str, Any] = {"title": title, "description": description, "required": required}
    if kind == "string" and ("enum" in spec or "oneOf" in spec):
        _only(spec, name, {"type", "enum", "oneOf", "enumNames"})
        if "oneOf" in spec:
            values, titles = _titled(spec["oneOf"], name)
        else:
            values = _choices(spec["enum"], name)
            names = spec.get("enumNames")
            titles = _choices(names, f"{name}.enumNames") if names is not None else values
            if len(titles) != len(values):
                raise ElicitationSchemaError(f"{name}.enumNames does not match its enum")
        default = spec.get("default")
        if default is not None and default not in values:
            raise ElicitationSchemaError(f"{name}.default is not one of its choices")
        return FormField(name, "enum", choices=values, choice_titles=titles, default=default, **common)
    if kind == "string":
        _only(spec, name, {"type", "minLength", "maxLength", "format"})
        fmt = spec.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise ElicitationSchemaError(
                f"{name}.format {str(fmt)[:40]!r} is not one of {', '.join(_FORMATS)}"
            )
        default = spec.get("default")
        if default is not None and not isinstance(default, str):
            raise ElicitationSchemaError(f"{name}.default is not a string")
        return FormField(
            name,
            "string",
            min_length=_count(spec, "minLength", name),
            max_length=_count(spec, "maxLength", name),
            format=fmt,
            default=default,
            **common,
        )
    if kind in ("number", "integer"):
        _only(spec, name, {"type", "minimum", "maximum"})
        default = spec.get("default")
        if default is not None and (isinstance(default, bool) or not isinstance(default, int | float)):
            raise ElicitationSchemaError(f"{name}.default is not a number")
        return FormField(
            name,
            kind,
            minimum=_number(spec, "minimum", name),
            maximum=_number(spec, "maximum", name),
            default=default,
            **common,
        )
    if kind == "boolean":
        _only(spec, name, {"type"})
        default = spec.get("default")
        if default is not None and not isinstance(default, bool):
            raise ElicitationSchemaError(f"{name}.default is not true or false")
        return FormField(name, "boolean", default=default, **common)
    if kind == "array":
        _only(spec, name, {"type", "items", "minItems", "maxItems"})
        items = spec.get("items")
        if not isinstance(items, Mapping):
            raise ElicitationSchemaError(
                f"{name}.items is not an object (arrays are multi-select enums only)"
            )
        if "anyOf" in items:
            values, titles = _titled(items["anyOf"], name)
        elif items.get("type") == "string" and "enum" in items:
            values = _choices(items["enum"], name)
            titles = values
        else:
            raise ElicitationSchemaError(f"{name}: arrays are multi-select enums of strings only")
        default = spec.get("default")
        if default is not None and (not isinstance(default, list) or any(d not in values for d in default)):
            raise ElicitationSchemaError(f"{name}.default is not a list of its choices")
        return FormField(
            name,
            "multi",
            choices=values,
            choice_titles=titles,
            min_items=_count(spec, "minItems", name),
            max_items=_count(spec, "maxItems", name),
            default=default,
            **common,
        )
    if kind is None:
        raise ElicitationSchemaError(f"{name} has no type: only flat primitive properties are allowed")
    shown = kind if isinstance(kind, str) else type(kind).__name__
    raise ElicitationSchemaError(
        f"{name} has type {shown[:40]!r}: only flat primitive properties are allowed"
    )


def _only(spec: Mapping[str, Any], name: str, allowed: set[str]) -> None:
    extra = set(spec) - allowed - _ANNOTATIONS
    if extra:
        raise ElicitationSchemaError(f"{name} has unsupported keys: {', '.join(sorted(extra)[:5])}")


def validate_answer(form: FormSchema, content: Mapping[str, Any] | None) -> dict[str, Any]:
    """The accepted content, checked against the form; AnswerInvalid names the first field at fault."""
    content = dict(content or {})
    known = {f.name for f in form.fields}
    unknown = [k for k in content if k not in known]
    if unknown:
        raise AnswerInvalid(f"unknown field {unknown[0]!r}")
    out: dict[str, Any] = {}
    for f in form.fields:
        if f.name not in content or content[f.name] is None:
            if f.required:
                raise AnswerInvalid(f"{f.name} is required")
            continue
        out[f.name] = check_value(f, content[f.name])
    return out


def check_value(f: FormField, value: Any) -> Any:
    """`value` if it satisfies the field, else AnswerInvalid."""
    if f.kind == "boolean":
        if not isinstance(value, bool):
            raise AnswerInvalid(f"{f.name} must be true or false")
        return value
    if f.kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise AnswerInvalid(f"{f.name} must be a number")
        if f.kind == "integer" and not float(value).is_integer():
            raise AnswerInvalid(f"{f.name} must be a whole number")
        if f.minimum is not None and value < f.minimum:
            raise AnswerInvalid(f"{f.name} must be at least {f.minimum:g}")
        if f.maximum is not None and value > f.maximum:
            raise AnswerInvalid(f"{f.name} must be at most {f.maximum:g}")
        return int(value) if f.kind == "integer" else value
    if f.kind == "enum":
        if value not in f.choices:
            raise AnswerInvalid(f"{f.name} must be one of {', '.join(f.choices[:10])}")
        return value
    if f.kind == "multi":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AnswerInvalid(f"{f.name} must be a list of choices")
        bad = [v for v in value if v not in f.choices]
        if bad:
            raise AnswerInvalid(f"{f.name}: {bad[0]!r} is not one of its choices")
        if f.min_items is not None and len(value) < f.min_items:
            raise AnswerInvalid(f"{f.name} needs at least {f.min_items} choices")
        if f.max_items is not None and len(value) > f.max_items:
            raise AnswerInvalid(f"{f.name} allows at most {f.max_items} choices")
        return list(value)
    if not isinstance(value, str):
        raise AnswerInvalid(f"{f.name} must be text")
    limit = min(f.max_length, MAX_STRING) if f.max_length is not None else MAX_STRING
    if len(value) > limit:
        raise AnswerInvalid(f"{f.name} has {len(value)} characters (at most {limit})")
    if f.min_length is not None and len(value) < f.min_length:
        raise AnswerInvalid(f"{f.name} needs at least {f.min_length} characters")
    if f.format is not None and not _formatted(f.format, value):
        raise AnswerInvalid(f"{f.name} is not a valid {f.format}")
    return value


def _formatted(fmt: str, value: str) -> bool:
    try:
        if fmt == "email":
            return bool(_EMAIL.match(value))
        if fmt == "uri":
            parts = urlsplit(value)
            return bool(parts.scheme) and bool(parts.netloc or parts.path)
        if fmt == "date":
            date.fromisoformat(value)
            return True
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        return "T" in value or " " in value
    except ValueError:
        return False


def parse_text(f: FormField, text: str) -> Any:
    """A value for `f` from what a person typed (numbers, yes/no, a choice by value, title or number, a
    comma-separated multi-select); AnswerInvalid when it does not fit."""
    text = text.strip()
    if f.kind == "boolean":
        lowered = text.lower()
        if lowered in ("y", "yes", "true", "1"):
            return True
        if lowered in ("n", "no", "false", "0"):
            return False
        raise AnswerInvalid(f"{f.name}: answer yes or no")
    if f.kind in ("number", "integer"):
        try:
            number: float = int(text) if f.kind == "integer" else float(text)
        except ValueError:
            raise AnswerInvalid(
                f"{f.name} must be {'a whole number' if f.kind == 'integer' else 'a number'}"
            ) from None
        return check_value(f, number)
    if f.kind == "enum":
        return check_value(f, _choice(f, text))
    if f.kind == "multi":
        picked = [_choice(f, part.strip()) for part in text.split(",") if part.strip()]
        return check_value(f, picked)
    return check_value(f, text)


def _choice(f: FormField, text: str) -> str:
    if text in f.choices:
        return text
    for value, title in zip(f.choices, f.choice_titles, strict=False):
        if text.lower() == title.lower():
            return value
    if text.isdigit() and 1 <= int(text) <= len(f.choices):
        return f.choices[int(text) - 1]
    return text  # check_value names the choices


def audit_answer(
    form: FormSchema | None, content: Mapping[str, Any] | None, known: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """An answer as the audit log may keep it: secret-looking fields masked, strings redacted."""
    if content is None:
        return None
    secret = {f.name for f in form.fields if f.secret} if form is not None else set()
    out: dict[str, Any] = {}
    for name, value in content.items():
        if name in secret or is_secret_name(name):
            out[name] = REDACTED
        elif isinstance(value, str):
            out[name] = redact(value, known)
        elif isinstance(value, list):
            out[name] = [redact(v, known) if isinstance(v, str) else v for v in value]
        else:
            out[name] = value
    return out
