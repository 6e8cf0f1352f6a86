"""Argument grounding: a tool's input schema tightened for one call from what the run has seen, so a small model
copies values instead of inventing them.

- Path-like string arguments must start with a directory the run has seen (an absolute path in the task or in
  an observation, or a directory the server reported), so a file name is put where the task said.
- Timezone arguments whose documentation says IANA are limited to the IANA names this machine knows.
- Optional arguments nobody asked for are left out (a model that fills `head` or `dryRun` by itself breaks
  calls that needed none of them).

Values stay JSON-valid for the original schema: grounding only narrows it, the executor still validates.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent_runtime.agents.routing import words

_PATH_NAME = re.compile(
    r"(^|_|-)(path|paths|file|filename|dir|directory|folder|source|destination|src|dst)$", re.I
)
_ABS_PATH = re.compile(r"(?<![\w.])(/(?:[\w.@%+~-]+/?)+)")
_IANA_HINT = re.compile(r"\bIANA\b|\btimezone name\b|America/New_York|Europe/London", re.I)
_TZ_NAME = re.compile(r"time_?zone|tz$", re.I)


@functools.cache
def iana_timezones() -> tuple[str, ...]:
    """The IANA zone names this machine knows (zoneinfo), sorted; empty when it has none."""
    try:
        from zoneinfo import available_timezones  # the stdlib's tz database reader
    except ImportError:  # pragma: no cover - Python 3.9+ always has it
        return ()
    return tuple(sorted(z for z in available_timezones() if "/" in z or z == "UTC"))


@dataclass(slots=True)
class GroundingContext:
    """What a run has seen that arguments may be copied from: the task, observations, known directories."""

    texts: list[str] = field(default_factory=list)
    directories: set[str] = field(default_factory=set)

    def add(self, text: str) -> None:
        self.texts.append(text)
        for path in _ABS_PATH.findall(text):
            clean = path.rstrip("/.,;:'\")]}") or "/"
            if clean != "/":
                self.directories.add(clean.rsplit("/", 1)[0] or "/")
                self.directories.add(clean)

    def mentions(self, name: str) -> bool:
        """Whether the run's text mentions an argument's name (its words), e.g. `head` or `exclude patterns`."""
        wanted = set(words(name))
        if not wanted:
            return False
        seen = {w for t in self.texts for w in words(t)}
        return wanted <= seen


def is_path_argument(name: str, schema: Mapping[str, Any]) -> bool:
    if _PATH_NAME.search(name):
        return True
    fmt = schema.get("format")
    return isinstance(fmt, str) and fmt in ("path", "uri-reference", "file-path")


def is_timezone_argument(name: str, schema: Mapping[str, Any]) -> bool:
    desc = str(schema.get("description", ""))
    return bool(_TZ_NAME.search(name)) and bool(_IANA_HINT.search(desc) or "timezone" in name.lower())


def _prefix_pattern(directories: Iterable[str]) -> str:
    alts = sorted({re.escape(d.rstrip("/")) for d in directories if d and d != "/"}, key=len, reverse=True)
    return "^(" + "|".join(alts) + ")(/[^/]+)*/?$"


def ground_schema(parameters: Mapping[str, Any], context: GroundingContext) -> dict[str, Any]:
    """`parameters` (an object schema) narrowed for this call; the original when nothing applies."""
    props = parameters.get("properties")
    if not isinstance(props, Mapping) or not props:
        return dict(parameters)
    required = set(parameters.get("required") or ())
    out = copy.deepcopy(dict(parameters))
    new_props: dict[str, Any] = {}
    for name, schema in props.items():
        if not isinstance(schema, Mapping):
            new_props[name] = schema
            continue
        if name not in required and not context.mentions(name):
            continue  # optional and never asked for: not offered
        s = copy.deepcopy(dict(schema))
        if s.get("type") == "string" and "enum" not in s and "pattern" not in s:
            if is_timezone_argument(name, s) and iana_timezones():
                s["enum"] = list(iana_timezones())
            elif is_path_argument(name, s) and context.directories:
                s["pattern"] = _prefix_pattern(context.directories)
        elif s.get("type") == "array" and is_path_argument(name, s) and context.directories:
            items = s.get("items")
            if isinstance(items, Mapping) and items.get("type") == "string" and "pattern" not in items:
                s["items"] = {**items, "pattern": _prefix_pattern(context.directories)}
        new_props[name] = s
    out["properties"] = new_props
    if "required" in out:
        out["required"] = [r for r in out["required"] if r in new_props]
    return out
