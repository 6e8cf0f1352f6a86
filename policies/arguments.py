"""Tool arguments checked before sending: size and nesting limits, then the tool's JSON Schema."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # jsonschema costs ~25 ms to import: only a tool with an inputSchema needs it
    from jsonschema.protocols import Validator

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ArgumentLimits:
    max_string_bytes: int = MiB - 1  # a string of 1 MiB or more is refused
    max_depth: int = 32  # nesting of objects and arrays
    max_total_bytes: int = 4 * MiB - 64 * 1024  # servers reject request bodies over 4 MiB
    max_items: int = 100_000  # values in the whole tree
    max_errors: int = 3  # schema errors reported in the reason


def limit_problem(arguments: Any, limits: ArgumentLimits) -> str | None:
    """Walk the arguments iteratively (a deep tree must not blow our own stack) and check the limits."""
    total = 0
    items = 0
    stack: list[tuple[Any, int, str]] = [(arguments, 1, "arguments")]
    while stack:
        value, depth, where = stack.pop()
        items += 1
        if items > limits.max_items:
            return f"arguments hold more than {limits.max_items} values"
        if isinstance(value, str):
            # isascii() is O(1) in CPython: ASCII needs no encoding to count its bytes
            size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
            if size > limits.max_string_bytes:
                return f"{where} is a string of {size} bytes (limit {limits.max_string_bytes})"
            total += size
        elif (is_map := type(value) is dict or isinstance(value, Mapping)) or isinstance(value, list | tuple):
            if depth > limits.max_depth:
                return f"{where} is nested deeper than {limits.max_depth} levels"
            if is_map:
                for key, child in cast(Mapping[Any, Any], value).items():
                    if not isinstance(key, str):
                        return f"{where} has a non-string key {key!r}"
                    total += len(key)
                    stack.append((child, depth + 1, f"{where}.{key}"))
            else:
                for i, child in enumerate(value):
                    stack.append((child, depth + 1, f"{where}[{i}]"))
        elif value is None or isinstance(value, bool | int | float):
            total += 8
        else:
            return f"{where} has a value of type {type(value).__name__}, which JSON cannot carry"
        if total > limits.max_total_bytes:
            return f"arguments are larger than {limits.max_total_bytes} bytes"
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

    def valid(arguments: Mapping[str, Any]) -> bool:
        for name in required:
            if name not in arguments:
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
            if isinstance(value, bool) and bool not in types:
                return False
            if not isinstance(value, types):
                return False
        return True

    return valid


@dataclass(slots=True)
class ArgumentValidator:
    """A compiled inputSchema; build once per tool definition, call per call."""

    validator: Validator | None
    schema_problem: str | None  # set when the server's schema itself is invalid
    limits: ArgumentLimits
    fast: Any = None  # _fast_check's answer for the schema, when it applies

    @classmethod
    def compile(
        cls, schema: Mapping[str, Any] | None, limits: ArgumentLimits | None = None
    ) -> ArgumentValidator:
        limits = limits or ArgumentLimits()
        if not schema:
            return cls(None, None, limits)
        import jsonschema
        from jsonschema.exceptions import SchemaError

        try:
            validator_cls = jsonschema.validators.validator_for(
                schema, default=jsonschema.Draft202012Validator
            )
            validator_cls.check_schema(schema)  # type: ignore[arg-type]  # types-jsonschema's protocol says dict; any Mapping works
        except SchemaError as exc:
            return cls(None, f"the tool's inputSchema is invalid: {exc.message}", limits)
        return cls(validator_cls(schema), None, limits, _fast_check(schema))

    def problem(self, arguments: Any) -> str | None:
        """Why the arguments are refused, or None. Limits are checked first: the schema walk is recursive."""
        if type(arguments) is not dict and not isinstance(arguments, Mapping):  # dict: no ABC check
            return f"arguments must be a JSON object, not {type(arguments).__name__}"
        found = limit_problem(arguments, self.limits)
        if found is not None:
            return found
        if self.schema_problem is not None:
            return self.schema_problem
        if self.validator is None:
            return None
        if self.fast is not None and self.fast(arguments):
            return None
        errors = []
        for error in self.validator.iter_errors(arguments):
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            errors.append(f"{where}: {_short(error.message)}")
            if len(errors) >= self.limits.max_errors:
                break
        return "; ".join(errors) if errors else None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
