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
_HHMM = re.compile(r"HH:MM", re.I)
_CLOCK_VALUE = re.compile(r"\b\d{1,2}(:\d{2})\b|\b\d{1,2}\s*(am|pm|a\.m\.|p\.m\.)", re.I)
_NUMBER_VALUE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_FILE_VALUE = re.compile(r"(/[\w.@%+~-]+)+|\b[\w-]+\.[a-z0-9]{1,5}\b")
_FILE_NAME = re.compile(r"\b[\w-]+\.[A-Za-z0-9]{1,5}\b")
_DIRECTORY_WORDS = re.compile(r"\b(directory|directories|folder|folders|dir)\b", re.I)
_FILE_WORDS = re.compile(r"\b(file|files|text|contents?)\b", re.I)


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


def zones_named_in(texts: Iterable[str]) -> list[str]:
    """IANA zones whose city (or region) the texts name, e.g. "New York" -> America/New_York, and zone names
    written out in full, in order of first mention."""
    found: dict[str, int] = {}
    lowered = [t.lower() for t in texts]
    for zone in iana_timezones():
        city = zone.rsplit("/", 1)[-1].replace("_", " ").lower()
        for i, text in enumerate(lowered):
            at = text.find(zone.lower())
            if at < 0 and len(city) > 3:
                m = re.search(rf"(?<![a-z]){re.escape(city)}(?![a-z])", text)
                at = m.start() if m else -1
            if at >= 0:
                found.setdefault(zone, i * 1_000_000 + at)
                break
    return sorted(found, key=found.__getitem__)


def evidence(parameters: Mapping[str, Any], text: str, description: str = "") -> float:
    """How well `text` supplies a tool's required arguments: +0.5 for each required argument with a value of
    its kind in the text (numbers for numbers, a clock time for an HH:MM time, a path or file name for a
    path, a named place for a timezone, one of an enum's values), -1 for each without; and for a path, +0.5
    when the path's kind (a file name, or a folder) is what the tool's description is about. Routing adds it
    to the relevance score: of two tools that fit the words of a task, the one whose inputs it gives wins."""
    props = parameters.get("properties")
    if not isinstance(props, Mapping):
        return 0.0
    numbers = len(_NUMBER_VALUE.findall(text))
    score = 0.0
    has = 0.5
    first_line = description.strip().split("\n", 1)[0]
    for name in parameters.get("required") or ():
        schema = props.get(name)
        if not isinstance(schema, Mapping):
            continue
        kind = schema.get("type")
        desc = str(schema.get("description", ""))
        if kind in ("number", "integer"):
            numbers -= 1
            score += has if numbers >= 0 else -1.0
        elif kind == "string" and "enum" in schema:
            score += has if any(str(v).lower() in text.lower() for v in schema["enum"]) else -1.0
        elif kind == "string" and _HHMM.search(desc):
            score += has if _CLOCK_VALUE.search(text) else -1.0
        elif kind == "string" and is_timezone_argument(name, schema):
            score += has if zones_named_in([text]) else -1.0
        elif is_path_argument(name, schema):
            if not _FILE_VALUE.search(text):
                score -= 1.0
                continue
            score += has
            names_a_file = bool(_FILE_NAME.search(text))
            about_folders = bool(_DIRECTORY_WORDS.search(first_line)) and not _FILE_WORDS.search(first_line)
            about_files = bool(_FILE_WORDS.search(first_line)) and not _DIRECTORY_WORDS.search(first_line)
            if (names_a_file and about_files) or (not names_a_file and about_folders):
                score += 0.5
    return score


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
                # the zones of the places the run names, when it names some; else any valid zone
                s["enum"] = zones_named_in(context.texts) or list(iana_timezones())
            elif _HHMM.search(str(s.get("description", ""))):
                s["pattern"] = "^([01][0-9]|2[0-3]):[0-5][0-9]$"
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
