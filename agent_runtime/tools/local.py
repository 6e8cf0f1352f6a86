"""Python functions as agent tools next to MCP tools: the input schema comes from the type hints, the
description from the docstring; sync functions run on a worker thread, every call has a deadline.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_type_hints

import anyio

from agent_runtime.errors import AgentRuntimeError
from agent_runtime.tools.registry import valid_tool_name

if TYPE_CHECKING:
    from pydantic import BaseModel


class LocalToolError(AgentRuntimeError):
    """A Python function cannot be a tool (bad name, untyped or unsupported parameters, duplicate)."""


@dataclass(frozen=True, slots=True)
class LocalOutcome:
    """How a local call ended; `kind` uses the executor's words (`result`, `tool_error`, `timeout`, ...)."""

    kind: str
    text: str
    reason: str | None
    duration: float


@dataclass(frozen=True, slots=True)
class LocalTool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    parameters: dict[str, Any]  # the input JSON Schema


def tool_from_function(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> LocalTool:
    """A LocalTool for `fn`: every parameter needs a type hint (`Annotated[..., Field(description=...)]` works)."""
    from pydantic import ConfigDict, create_model  # ~0.1 s; a runtime without local tools never pays it

    tool_name = name or fn.__name__
    if not valid_tool_name(tool_name):
        raise LocalToolError(f"{tool_name!r} is not a valid tool name", "use letters, digits, '_', '.', '-'")
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception as exc:  # unresolved forward references
        raise LocalToolError(f"cannot read the type hints of {tool_name!r}: {exc}") from exc
    fields: dict[str, Any] = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise LocalToolError(f"tool {tool_name!r}: *args/**kwargs cannot be described to a model")
        if pname not in hints:
            raise LocalToolError(
                f"tool {tool_name!r}: parameter {pname!r} has no type hint", "annotate every parameter"
            )
        default = ... if param.default is param.empty else param.default
        fields[pname] = (hints[pname], default)
    model = create_model(f"{tool_name}_args", __config__=ConfigDict(extra="forbid"), **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in (schema.get("properties") or {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    schema.setdefault("properties", {})
    doc = inspect.getdoc(fn) or ""
    desc = description or (doc.strip().split("\n\n")[0].replace("\n", " ") if doc else tool_name)
    return LocalTool(tool_name, desc, fn, model, schema)


def render_value(value: Any) -> str:
    """A local tool's return value as text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        value = dump(mode="json")
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


class LocalToolset:
    """The Python tools registered on one runtime."""

    def __init__(self) -> None:
        self._tools: dict[str, LocalTool] = {}

    def register(
        self, fn: Callable[..., Any] | LocalTool, *, name: str | None = None, description: str | None = None
    ) -> LocalTool:
        tool = fn if isinstance(fn, LocalTool) else tool_from_function(fn, name=name, description=description)
        if tool.name in self._tools:
            raise LocalToolError(f"a local tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> LocalTool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __iter__(self) -> Iterator[LocalTool]:
        return iter(self._tools.values())

    async def call(self, name: str, arguments: Mapping[str, Any], *, timeout: float) -> LocalOutcome:  # noqa: ASYNC109
        start = time.perf_counter()
        tool = self._tools.get(name)
        if tool is None:
            return LocalOutcome("unknown_tool", "", f"no local tool {name!r}", 0.0)
        from pydantic import ValidationError  # loaded already: the tool's model is a pydantic model

        try:
            args = tool.args_model.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()[:3]
            )
            return LocalOutcome("invalid_arguments", "", problems, time.perf_counter() - start)
        kwargs = {k: getattr(args, k) for k in tool.args_model.model_fields}
        try:
            with anyio.fail_after(timeout):
                if inspect.iscoroutinefunction(tool.fn):
                    value = await tool.fn(**kwargs)
                else:
                    # A sync function cannot be interrupted; on timeout its thread is abandoned, the call is not.
                    value = await anyio.to_thread.run_sync(lambda: tool.fn(**kwargs), abandon_on_cancel=True)
        except TimeoutError:
            return LocalOutcome("timeout", "", f"no result within {timeout:g} s", time.perf_counter() - start)
        except Exception as exc:  # the tool's own failure is the model's observation, not our crash
            return LocalOutcome(
                "tool_error", f"{type(exc).__name__}: {exc}", None, time.perf_counter() - start
            )
        return LocalOutcome("result", render_value(value), None, time.perf_counter() - start)
