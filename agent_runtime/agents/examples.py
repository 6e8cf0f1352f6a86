"""Worked examples without hand-writing: example arguments derived from a tool's schema (examples, defaults,
enums, "e.g." values in descriptions), and the calls that succeeded in earlier runs, remembered on disk by the
tool definition's hash and shown to later runs as real chat turns.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.formats import ExampleCall, ToolSpec, WorkedExample

_EG = re.compile(r"""(?:e\.g\.,?|for example,?|such as|like)\s*[:(]?\s*['"`]([^'"`]{1,80})['"`]""", re.I)
MAX_REMEMBERED = 3  # per tool: the most recent successful calls
MAX_RESULT_CHARS = 400  # of a remembered result; examples must stay short
MAX_EXAMPLES = 2  # shown per run


def _example_value(name: str, schema: Mapping[str, Any]) -> tuple[bool, Any]:
    for key in ("examples", "example"):
        value = schema.get(key)
        if isinstance(value, list) and value:
            return True, value[0]
        if key == "example" and value is not None:
            return True, value
    if "default" in schema:
        return True, schema["default"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return True, schema["enum"][0]
    m = _EG.search(str(schema.get("description", "")))
    if m:
        text = m.group(1)
        kind = schema.get("type")
        if kind in ("number", "integer"):
            try:
                return True, int(text) if kind == "integer" else float(text)
            except ValueError:
                return False, None
        return True, text
    return False, None


def example_arguments(parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """Arguments for a tool's required inputs taken from its own schema, or None when one has no example."""
    props = parameters.get("properties")
    if not isinstance(props, Mapping):
        return None
    out: dict[str, Any] = {}
    for name in parameters.get("required") or ():
        schema = props.get(name)
        if not isinstance(schema, Mapping):
            return None
        ok, value = _example_value(name, schema)
        if not ok:
            return None
        out[name] = value
    return out


def definition_key(tool: ToolSpec) -> str:
    """What a remembered call is filed under: the tool's name, description and schema (a changed tool starts
    with no memory, so an example never shows arguments the new definition rejects)."""
    payload = json.dumps([tool.name, tool.description, tool.parameters], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(slots=True)
class CallMemory:
    """Successful calls on disk, one small JSON file per tool definition (0600, in a 0700 folder)."""

    folder: Path

    @classmethod
    def default(cls) -> CallMemory:
        from inference import envs

        return cls(envs.examples_dir())

    def _file(self, tool: ToolSpec) -> Path:
        return self.folder / f"{definition_key(tool)}.json"

    def recall(self, tool: ToolSpec) -> list[WorkedExample]:
        try:
            items = json.loads(self._file(tool).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        out: list[WorkedExample] = []
        for item in items if isinstance(items, list) else []:
            try:
                call = ExampleCall(tool.name, dict(item["arguments"]), str(item["result"]))
                out.append(WorkedExample(str(item["task"]), (call,), str(item["answer"])))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def remember(
        self, tool: ToolSpec, task: str, arguments: Mapping[str, Any], result: str, answer: str
    ) -> None:
        """Keep this call (the newest MAX_REMEMBERED per tool); a write failure only loses the memory."""
        path = self._file(tool)
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
            items = items if isinstance(items, list) else []
        except (OSError, ValueError):
            items = []
        entry = {
            "task": task,
            "arguments": dict(arguments),
            "result": result[:MAX_RESULT_CHARS],
            "answer": answer,
        }
        items = [i for i in items if isinstance(i, dict) and i.get("task") != task][-(MAX_REMEMBERED - 1) :]
        items.append(entry)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(items, f, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError:
            pass


def examples_for(tools: Sequence[ToolSpec], memory: CallMemory | None) -> list[WorkedExample]:
    """The remembered calls of the offered tools (newest first, at most MAX_EXAMPLES)."""
    if memory is None:
        return []
    found: list[WorkedExample] = []
    for tool in tools:
        found.extend(reversed(memory.recall(tool)))
    return found[:MAX_EXAMPLES]
