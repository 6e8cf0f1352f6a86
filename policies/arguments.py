"""Tool arguments checked before sending: size, nesting and encodability limits, then the tool's JSON Schema
(without fetching anything, within a time budget: policies.schemas)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:  # jsonschema costs ~25 ms to import: only a tool with an inputSchema needs it
    from jsonschema.protocols import Validator

MiB = 1024 * 1024
MAX_INT_BITS = 1024  # integers beyond +/-2**1024 are refused: JSON peers cannot use them, Python cannot print 4300+ digits


@dataclass(frozen=True, slots=True)
class ArgumentLimits:
    max_string_bytes: int = MiB - 1  # a string of 1 MiB or more is refused
    max_depth: int = 32  # nesting of objects and arrays
    max_total_bytes: int = 4 * MiB - 64 * 1024  # servers reject request bodies over 4 MiB
    max_items: int = 100_000  # values in the whole tree
    max_errors: int = 3  # schema errors reported in the reason
    max_validation_seconds: float = 0.1  # schema validation budget per call (never past the call's deadline)


@dataclass(frozen=True, slots=True)
class ArgumentProblem:
    """Why a call's arguments are refused: `invalid_arguments` (the caller's mistake: limits, encoding,
    schema) or `denied` (the tool's schema cannot be applied, or validation ran out of time)."""

    kind: Literal["invalid_arguments", "denied"]
    reason: str
    over_limits: bool = False  # the arguments broke a size/depth/encoding limit: nothing may walk them again


def _bad_text(text: str) -> str | None:
    """Why a non-ASCII string cannot travel as UTF-8 JSON (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which UTF-8 cannot carry"
    return None


_FLAT_KEYS = 64
_FLAT_BYTES = 64 * 1024


def _flat_and_small(arguments: dict[Any, Any], limits: ArgumentLimits) -> bool:
    """The common call in one pass, no stack: at most 64 ASCII keys whose values are ASCII strings, bools,
    None, small ints and finite floats, 64 KiB at most all told. False only means "walk it properly"."""
    if len(arguments) > _FLAT_KEYS or limits.max_items <= _FLAT_KEYS:
        return False
    budget = min(_FLAT_BYTES, limits.max_total_bytes, limits.max_string_bytes)
    for key, value in arguments.items():
        if type(key) is not str or not key.isascii():
            return False
        t = type(value)
        if t is str:
            if not value.isascii():
                return False
            budget -= len(value) + len(key)
        elif t is int:
            if value.bit_length() > 64:
                return False
            budget -= 8 + len(key)
        elif t is bool or value is None:
            budget -= 8 + len(key)
        elif t is float:
            if value - value != 0.0:  # NaN and +/-Infinity
                return False
            budget -= 8 + len(key)
        else:
            return False
    return budget >= 0


def limit_problem(arguments: Any, limits: ArgumentLimits) -> str | None:
    """Walk the arguments iteratively (a deep tree must not blow our own stack) and check the limits and
    that every value can travel as JSON: no lone surrogates, no NaN/Infinity, no integers past 2**1024."""
    if type(arguments) is dict and _flat_and_small(arguments, limits):
        return None
    total = 0
    items = 0
    stack: list[tuple[Any, int, str]] = [(arguments, 1, "arguments")]
    max_depth, max_string, max_total, max_items = (
        limits.max_depth,
        limits.max_string_bytes,
        limits.max_total_bytes,
        limits.max_items,
    )
    while stack:
        value, depth, where = stack.pop()
        items += 1
        t = type(value)
        if t is str or (t is not dict and isinstance(value, str)):
            # isascii() is O(1) in CPython: ASCII needs no encoding to count its bytes
            if value.isascii():
                size = len(value)
            else:
                bad = _bad_text(value)
                if bad is not None:
                    return f"{where} {bad}"
                size = len(value.encode("utf-8"))
            if size > max_string:
                return f"{where} is a string of {size} bytes (limit {max_string})"
            total += size
        elif (is_map := t is dict or isinstance(value, Mapping)) or isinstance(value, list | tuple):
            if depth > max_depth:
                return f"{where} is nested deeper than {max_depth} levels"
            if items + len(value) > max_items:
                return f"arguments hold more than {max_items} values"
            if is_map:
                for key, child in cast(Mapping[Any, Any], value).items():
                    if type(key) is not str and not isinstance(key, str):
                        return f"{where} has a non-string key {key!r}"
                    if not key.isascii() and (bad := _bad_text(key)) is not None:
                        return f"{where} has a key that {bad}"
                    total += len(key)
                    stack.append((child, depth + 1, f"{where}.{key}"))
            else:
                for i, child in enumerate(value):
                    stack.append((child, depth + 1, f"{where}[{i}]"))
        elif value is None or t is bool:
            total += 8
        elif t is int or (isinstance(value, int) and not isinstance(value, bool)):
            if value.bit_length() > MAX_INT_BITS:
                return f"{where} is an integer larger than 2**{MAX_INT_BITS}"
            total += 8
        elif t is float or isinstance(value, float):
            if not math.isfinite(value):
                return f"{where} is {value!r}, which JSON cannot carry"
            total += 8
        else:
            return f"{where} has a value of type {t.__name__}, which JSON cannot carry"
        if items > max_items:
            return f"arguments hold more than {max_items} values"
        if total > max_total:
            return f"arguments are larger than {max_total} bytes"
    return None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated"})


def _fast_check(schema: Mapping[str, Any]) -> Any:
    """A plain-Python check for the common flat schema (typed properties, required, additionalProperties),
    or None when the schema uses anything else. It only answers "valid"; on "invalid" the caller asks
    jsonschema for the message, so both always agree on what is refused."""
    if set(schema) - {"type", "properties", "required", "additionalProperties", "$schema"} - _ANNOTATIONS:
        return None
    if schema.get("type", "object") != "object":
        return None
    props: dict[str, tuple[type, ...] | None] = {}
    for name, sub in (schema.get("properties") or {}).items():
        if not isinstance(sub, Mapping) or set(sub) - {"type"} - _ANNOTATIONS:
            return None
        t = sub.get("type")
        if t is None:
            props[name] = None
        elif isinstance(t, str) and t in _JSON_TYPES:
            props[name] = _JSON_TYPES[t]
        else:
            return None
    required = tuple(schema.get("required") or ())
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        return None

    required_keys = frozenset(required)

    def valid(arguments: Mapping[str, Any]) -> bool:
        if required_keys and not required_keys <= arguments.keys():
            return False
        for name, value in arguments.items():
            if name not in props:
                if not extra:
                    return False
                continue
            types = props[name]
            if types is None:
                continue
            # bool is an int in Python but not in JSON Schema
            if not isinstance(value, types) or ((value is True or value is False) and bool not in types):
                return False
        return True

    return valid


@dataclass(slots=True)
class ArgumentValidator:
    """A compiled inputSchema; build once per tool definition, call per call."""

    validator: Validator | None
    schema_problem: str | None  # set when the server's schema itself is invalid or cannot be applied safely
    limits: ArgumentLimits
    fast: Any = None  # _fast_check's answer for the schema, when it applies

    @classmethod
    def compile(
        cls, schema: Mapping[str, Any] | None, limits: ArgumentLimits | None = None
    ) -> ArgumentValidator:
        """Never raises for a bad schema (it fails closed: every call is refused) and never fetches or reads
        anything: only `#...` references are applied, and patterns run on RE2 or under a timeout."""
        limits = limits or ArgumentLimits()
        if not schema:
            return cls(None, None, limits)
        from policies.schemas import no_retrieval, safe_validator_class, schema_problems

        problems = schema_problems(schema)
        if problems:
            return cls(None, "the tool's inputSchema cannot be used: " + "; ".join(problems), limits)
        import jsonschema
        from jsonschema.exceptions import SchemaError
        from referencing import Registry

        try:
            validator_cls = jsonschema.validators.validator_for(
                schema, default=jsonschema.Draft202012Validator
            )
            validator_cls.check_schema(schema)  # type: ignore[arg-type]  # types-jsonschema's protocol says dict; any Mapping works
            registry: Registry[Any] = Registry(retrieve=no_retrieval)  # type: ignore[call-arg]  # an attrs field mypy does not see
            validator = safe_validator_class(validator_cls)(schema, registry=registry)
        except SchemaError as exc:
            return cls(None, f"the tool's inputSchema is invalid: {_short(exc.message)}", limits)
        except Exception as exc:  # RecursionError, a pattern `re` cannot compile...: fail closed
            return cls(None, f"the tool's inputSchema is invalid: {type(exc).__name__}", limits)
        return cls(validator, None, limits, _fast_check(schema))

    def check(self, arguments: Any, time_limit: float | None = None) -> ArgumentProblem | None:
        """Why the arguments are refused, or None. Limits are checked first, iteratively: the schema walk is
        recursive. Schema validation gets `time_limit` seconds (default: the limits' budget) all told."""
        if type(arguments) is not dict and not isinstance(arguments, Mapping):  # dict: no ABC check
            return ArgumentProblem(
                "invalid_arguments", f"arguments must be a JSON object, not {type(arguments).__name__}"
            )
        found = limit_problem(arguments, self.limits)
        if found is not None:
            return ArgumentProblem("invalid_arguments", found, over_limits=True)
        if self.schema_problem is not None:
            return ArgumentProblem("denied", self.schema_problem)
        if self.validator is None:
            return None
        if self.fast is not None and self.fast(arguments):
            return None
        return self._validate(arguments, time_limit)

    def _validate(self, arguments: Mapping[str, Any], time_limit: float | None) -> ArgumentProblem | None:
        from policies.schemas import CURRENT_RUN, SchemaBudgetExceeded, ValidationRun

        assert self.validator is not None
        budget = self.limits.max_validation_seconds if time_limit is None else time_limit
        token = CURRENT_RUN.set(ValidationRun(budget))
        errors = []
        try:
            for error in self.validator.iter_errors(arguments):
                where = "/".join(str(p) for p in error.absolute_path) or "arguments"
                errors.append(f"{where}: {_short(error.message)}")
                if len(errors) >= self.limits.max_errors:
                    break
        except SchemaBudgetExceeded:
            return ArgumentProblem(
                "denied",
                f"the arguments could not be checked against the tool's inputSchema within {budget:.3g}s "
                "(a slow pattern or an exploding schema)",
            )
        except RecursionError:
            return ArgumentProblem("denied", "the tool's inputSchema recurses without end (a $ref cycle)")
        except Exception as exc:  # an unresolvable $ref, a schema jsonschema chokes on: fail closed
            return ArgumentProblem(
                "denied", f"the tool's inputSchema could not be applied: {type(exc).__name__}"
            )
        finally:
            CURRENT_RUN.reset(token)
        return ArgumentProblem("invalid_arguments", "; ".join(errors)) if errors else None

    def problem(self, arguments: Any, time_limit: float | None = None) -> str | None:
        """`check`'s reason alone."""
        found = self.check(arguments, time_limit)
        return None if found is None else found.reason


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
