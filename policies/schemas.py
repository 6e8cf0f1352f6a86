"""Server-supplied JSON Schemas, treated as hostile: checked before use, applied without I/O and within a
time budget.

- `schema_problems` walks a schema iteratively (depth and size bounded) and names what the runtime will not
  apply: references that leave the document (`$ref: "http://..."`, `"file:///..."`, relative ones that
  resolve against an `$id`), patterns no safe engine compiles, and `unevaluatedProperties` next to
  `patternProperties` (jsonschema matches those with Python's backtracking `re`, out of our reach).
- `safe_validator_class` is jsonschema's validator for the schema's draft with `pattern`,
  `patternProperties` and `additionalProperties` matched by `Patterns` (RE2: linear time; patterns RE2
  cannot take, such as look-arounds and back-references, by the `regex` package under a timeout), and every
  keyword charged against a `ValidationRun`'s deadline.
- `no_retrieval` is the registry `retrieve` hook: nothing is ever fetched or read for a schema.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

MAX_SCHEMA_DEPTH = 64  # nesting of a tool's schema (objects and arrays)
MAX_SCHEMA_NODES = 20_000  # values in one schema
MAX_PATTERN_CHARS = 8_192
REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # their values are data, not schemas


class SchemaBudgetExceeded(Exception):
    """Validation ran past its time budget (a slow pattern, or a schema that makes validation explode)."""


def schema_problems(schema: Any, where: str = "inputSchema") -> list[str]:
    """What makes `schema` unusable, each as `path: problem` (empty when it is fine). Never recursive, never
    reads or fetches anything."""
    if schema is None:
        return []
    if not isinstance(schema, Mapping | bool):
        return [f"{where}: a schema must be an object, not {type(schema).__name__}"]
    problems: list[str] = []
    nodes = 0
    has_pattern_properties = has_unevaluated = False
    stack: list[tuple[Any, int, str, bool]] = [(schema, 1, where, False)]
    while stack:
        node, depth, path, data = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return [*problems, f"{where}: more than {MAX_SCHEMA_NODES} values"]
        if isinstance(node, Mapping):
            if depth > MAX_SCHEMA_DEPTH:
                return [*problems, f"{path}: nested deeper than {MAX_SCHEMA_DEPTH} levels"]
            for key, value in node.items():
                sub = f"{path}.{key}"
                if not data and isinstance(value, str):
                    if key in REF_KEYS and not value.startswith("#"):
                        problems.append(
                            f"{sub}: {_show(value)} is not a local reference (only '#...' references "
                            "are applied; nothing is fetched or read for a schema)"
                        )
                    elif key == "pattern":
                        problem = pattern_problem(value)
                        if problem is not None:
                            problems.append(f"{sub}: {problem}")
                if not data and key == "patternProperties" and isinstance(value, Mapping):
                    has_pattern_properties = True
                    for pattern in value:
                        problem = pattern_problem(pattern) if isinstance(pattern, str) else "not a string"
                        if problem is not None:
                            problems.append(f"{sub}[{_show(pattern)}]: {problem}")
                if not data and key == "unevaluatedProperties":
                    has_unevaluated = True
                if isinstance(value, Mapping | list):
                    stack.append((value, depth + 1, sub, data or key in _DATA_KEYS))
        elif isinstance(node, list):
            if depth > MAX_SCHEMA_DEPTH:
                return [*problems, f"{path}: nested deeper than {MAX_SCHEMA_DEPTH} levels"]
            for i, value in enumerate(node):
                if isinstance(value, Mapping | list):
                    stack.append((value, depth + 1, f"{path}[{i}]", data))
            nodes += len(node)
        if len(problems) >= 5:
            break
    if has_pattern_properties and has_unevaluated:
        problems.append(
            f"{where}: unevaluatedProperties together with patternProperties is not supported "
            "(its pattern matching could not be bounded)"
        )
    return problems


def _show(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# -- patterns -----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> tuple[Callable[..., Any], bool]:
    """`(search, linear)`: RE2's search (linear time) when RE2 takes the pattern, else the `regex` package's
    (backtracking, so it is given a timeout). Raises ValueError when neither compiles it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of {len(pattern)} characters (limit {MAX_PATTERN_CHARS})")
    import re2  # google-re2: ~3 ms to import, only once a schema has a pattern

    options = re2.Options()
    options.log_errors = False  # RE2 prints every rejected pattern to stderr otherwise
    try:
        return re2.compile(pattern, options).search, True
    except re2.error:
        pass
    import regex  # look-arounds and back-references: RE2 refuses them by design

    try:
        return regex.compile(pattern, regex.VERSION0).search, False
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ValueError(f"the pattern does not compile: {exc}") from None


def pattern_problem(pattern: str) -> str | None:
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return None


class ValidationRun:
    """The budget of one validation: a deadline every keyword is charged against."""

    __slots__ = ("deadline",)

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def tick(self) -> None:
        if time.perf_counter() > self.deadline:
            raise SchemaBudgetExceeded

    def search(self, pattern: str, text: str) -> bool:
        try:
            search, linear = compile_pattern(pattern)
        except ValueError:
            return False  # unreachable for checked schemas: schema_problems refuses them
        if linear:
            return search(text) is not None
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise SchemaBudgetExceeded
        try:
            return search(text, timeout=left) is not None
        except TimeoutError:
            raise SchemaBudgetExceeded from None


# The run of the validation in progress. Validation is synchronous, so one run is current at a time per
# thread/task context; keywords called outside `ArgumentValidator.check` get a fresh default budget.
CURRENT_RUN: ContextVar[ValidationRun | None] = ContextVar("CURRENT_RUN", default=None)
DEFAULT_BUDGET = 0.1


def _run() -> ValidationRun:
    run = CURRENT_RUN.get()
    return run if run is not None else ValidationRun(DEFAULT_BUDGET)


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _run().search(pattern, instance):
        from jsonschema.exceptions import ValidationError

        yield ValidationError(f"{_show(instance, 60)} does not match {_show(pattern, 60)}")


def _pattern_properties(validator: Any, pattern_properties: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    run = _run()
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            if run.search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    from jsonschema.exceptions import ValidationError

    run = _run()
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties and not any(run.search(p, k) for p in patterns)]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        shown = ", ".join(repr(k) for k in sorted(extras, key=str)[:10])
        if patterns:
            yield ValidationError(
                f"{shown} do not match any of the regexes: {', '.join(map(repr, patterns))}"
            )
        else:
            yield ValidationError(f"Additional properties are not allowed ({shown} unexpected)")


def _charged(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def charged(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        run = CURRENT_RUN.get()
        if run is not None:
            run.tick()
        return keyword(validator, value, instance, schema)

    return charged


@functools.cache
def safe_validator_class(base: type[Validator]) -> type[Validator]:
    """`base` with our pattern keywords, every keyword charged against the current run."""
    import jsonschema.validators

    keywords = dict(base.VALIDATORS)
    replaced = {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    }
    for name, fn in replaced.items():
        if name in keywords:
            keywords[name] = fn
    extended = jsonschema.validators.extend(base, validators={k: _charged(f) for k, f in keywords.items()})
    return cast("type[Validator]", extended)


def no_retrieval(uri: str) -> Any:
    """The registry's `retrieve`: a schema never makes the runtime fetch or read anything."""
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # an attrs exception: mypy does not see its fields
