"""Argument grounding: a tool's input schema narrowed for one call to the values the run has seen, so a small
model copies values instead of inventing them, and routing's measure of which tool's inputs a task supplies.

- A path argument is one of the paths the run has seen (written in the task or in a tool result), or a
  folder it has seen plus a name the task uses ("a folder called archive inside /x" -> `/x/archive`).
- A timezone argument documented as IANA is one of the zones of the places the run names (`New York` ->
  America/New_York), else any zone this machine knows; an `HH:MM` time is one of the clock times the task
  states (`3 pm` -> 15:00) when it states some.
- A pair of arguments named source/target (or from/to) over the same values takes them in the order the task
  names them ("9:00 in New York ... in Tokyo": New York is the source).
- Optional arguments nobody asked for are left out (a model that fills `head` or `dryRun` by itself breaks
  calls that needed none of them).

Values stay valid for the original schema: grounding only narrows it, and the executor still validates.
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
    r"(^|_|-)(path|paths|file|files|filename|dir|directory|folder|source|destination|src|dst)$", re.I
)
_ABS_PATH = re.compile(r"(?<![\w.])(/(?:[\w.@%+~-]+/?)+)")
_IANA_HINT = re.compile(r"\bIANA\b|\btimezone name\b|America/New_York|Europe/London", re.I)
_TZ_NAME = re.compile(r"time_?zone|tz$", re.I)
_HHMM = re.compile(r"HH:MM", re.I)
_CLOCK_VALUE = re.compile(
    r"\b(\d{1,2}):(\d{2})\s*(am|pm|a\.m\.|p\.m\.)?|\b(\d{1,2})\s*(am|pm|a\.m\.|p\.m\.)|\b(noon|midnight)\b",
    re.I,
)
_NUMBER_VALUE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_FILE_NAME = re.compile(r"\b[\w-]+\.[A-Za-z0-9]{1,5}\b")
_NAME_WORD = re.compile(
    r"""['"`]([\w.-]{1,64})['"`]|\b([\w-]+\.[A-Za-z0-9]{1,5})\b|\b([A-Za-z][\w-]{1,40})\b"""
)
_DIRECTORY_WORDS = re.compile(r"\b(directory|directories|folder|folders|dir)\b", re.I)
_FILE_WORDS = re.compile(r"\b(file|files|text|contents?)\b", re.I)
_FOLDER_NAME_WORDS = frozenset({"directory", "directories", "dir", "dirs", "folder", "folders", "tree"})
_RECURSIVE = re.compile(r"\brecursive(ly)?\b", re.I)
_EITHER_KIND = re.compile(r"\bfiles? (?:or|and) (?:directory|directories|folders?)\b", re.I)
_QUOTED = re.compile(r"""['"`]([\w./:+-]{1,40})['"`]""")
_CHOICE_WORDS = re.compile(r"\bor\b|\bone of\b|\beither\b|\|", re.I)
_CALLED = re.compile(r"\b(?:called|named|titled)\s+['\"`]?([\w.-]{1,64})", re.I)
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)([A-Z]\w*)")
_CAPITALISED_RUN = re.compile(r"\b[A-Z]\w*(?:[ -][A-Z]\w*)*")
MAX_FREE_STRING = 400  # characters of a string argument nothing else bounds: a small model's loops end there
MAX_FREE_ITEMS = 16  # items of an array argument nothing else bounds, for the same reason
_SOURCE = re.compile(r"^(source|from|origin|src)(_|$)", re.I)
_TARGET = re.compile(r"^(target|to|destination|dest|dst)(_|$)", re.I)
MAX_PATH_CANDIDATES = 64
MAX_NUMBER_CANDIDATES = 16


@functools.cache
def iana_timezones() -> tuple[str, ...]:
    """The IANA zone names this machine knows (zoneinfo), sorted; empty when it has none."""
    from zoneinfo import available_timezones  # the stdlib's reader of the system's tz database

    return tuple(sorted(z for z in available_timezones() if "/" in z or z == "UTC"))


def _clean_path(raw: str) -> str:
    return raw.rstrip("/.,;:'\")]}?!") or "/"


@dataclass(slots=True)
class GroundingContext:
    """What a run has seen that arguments may be copied from: the task and the tools' results, in order."""

    texts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # absolute paths, in order of first mention
    results: list[str] = field(default_factory=list)  # the tools' results alone, in order
    # the lines of the newest result that fit the task (agent_runtime/agents/focus.py), set by the loop
    focus: list[str] = field(default_factory=list)

    def add_result(self, text: str) -> None:
        self.results.append(text)
        self.add(text)

    def add(self, text: str) -> None:
        self.texts.append(text)
        for raw in _ABS_PATH.findall(text):
            path = _clean_path(raw)
            if path != "/" and path not in self.paths:
                self.paths.append(path)

    def for_part(self, part: str | None) -> GroundingContext:
        """The context for one part of a task in several ("Read /x/a.csv, ... and write the total to
        /x/total.txt"): the paths that part names, when it names any; else the whole run's."""
        named = [p for p in self.paths if part and p in part]
        if not named:
            return self
        return GroundingContext(self.texts, named, self.results, self.focus)

    @property
    def task(self) -> str:
        return self.texts[0] if self.texts else ""

    def mentions(self, name: str) -> bool:
        """Whether the run's text mentions an argument's name (its words), e.g. `head` or `exclude patterns`."""
        wanted = set(words(name))
        if not wanted:
            return False
        seen = {w for t in self.texts for w in words(t)}
        return wanted <= seen

    def given_names(self) -> list[str]:
        """The names the task gives a new thing: "a branch called release-1.0", "named 'draft'", a quoted word;
        failing those, before any result, the names it writes capitalised ("Priya's favourite drink is mint
        tea" is about Priya). After a result the thing may be named there ("store that person"): none then."""
        named = [m.group(1).rstrip(".") for m in _CALLED.finditer(self.task)]
        given = [n for n in dict.fromkeys([*named, *_QUOTED.findall(self.task)]) if n]
        return given or ([] if self.results else capitalised_names(self.task))

    def path_candidates(self, *, creating: bool = False) -> list[str]:
        """Every path seen, and each seen folder joined with a name the task gives something ("a folder called
        archive", a quoted name, a file name), bounded. When `creating` and the task names the new thing, only
        the joined paths (and the files seen): a tool that makes something must not get the folder itself."""
        folders = [p for p in self.paths if not _FILE_NAME.fullmatch(p.rsplit("/", 1)[-1])]
        named = [m.group(1) for m in _CALLED.finditer(self.task)]
        names = list(dict.fromkeys([*named, *_QUOTED.findall(self.task), *_FILE_NAME.findall(self.task)]))
        joined = [f"{f.rstrip('/')}/{n}" for f in folders for n in names if "/" not in n]
        if creating and named:
            files = [p for p in self.paths if p not in folders]
            return list(dict.fromkeys([*joined, *files]))[:MAX_PATH_CANDIDATES]
        return list(dict.fromkeys([*self.paths, *joined]))[:MAX_PATH_CANDIDATES]


def capitalised_names(text: str) -> list[str]:
    """The names `text` writes with capitals other than to start a sentence, runs of such words joined
    ("Acme Corp"), in order, once each."""
    starts = {m.start(1) for m in _SENTENCE_START.finditer(text)}
    names: list[str] = []
    for m in _CAPITALISED_RUN.finditer(text):
        run = m.group()
        if m.start() in starts:  # "Ask Acme Corp": the sentence's first word is capitalised for the sentence
            run = run.split(" ", 1)[1] if " " in run else ""
        if run:
            names.append(run)
    return list(dict.fromkeys(names))


def clock_values(text: str) -> list[str]:
    """The clock times `text` states, as 24-hour HH:MM (`3 pm` -> 15:00, `9:00` -> 09:00), in order."""
    out: list[str] = []
    for m in _CLOCK_VALUE.finditer(text):
        if m.group(6):
            value = "12:00" if m.group(6).lower() == "noon" else "00:00"
        else:
            hour = int(m.group(1) or m.group(4))
            minute = m.group(2) or "00"
            suffix = (m.group(3) or m.group(5) or "").lower()
            if suffix.startswith("p") and hour < 12:
                hour += 12
            if suffix.startswith("a") and hour == 12:
                hour = 0
            if hour > 23 or int(minute) > 59:
                continue
            value = f"{hour:02d}:{minute}"
        if value not in out:
            out.append(value)
    return out


def is_path_argument(name: str, schema: Mapping[str, Any]) -> bool:
    if _PATH_NAME.search(name):
        return True
    fmt = schema.get("format")
    return isinstance(fmt, str) and fmt in ("path", "uri-reference", "file-path")


def is_name_argument(name: str) -> bool:
    """An argument that names the thing a tool makes: `name`, `branch_name`, `newName`, `title`, `branch`."""
    parts = words(name)
    return bool(parts) and parts[-1] in ("name", "title", "branch")


def is_timezone_argument(name: str, schema: Mapping[str, Any]) -> bool:
    desc = str(schema.get("description", ""))
    return bool(_TZ_NAME.search(name)) and bool(_IANA_HINT.search(desc) or "timezone" in name.lower())


@functools.cache
def _zone_cities() -> tuple[tuple[str, str, str], ...]:
    """Each IANA zone with its lowercased name and its city (or region) as people write it."""
    return tuple(
        (zone, zone.lower(), zone.rsplit("/", 1)[-1].replace("_", " ").lower()) for zone in iana_timezones()
    )


def zones_named_in(texts: Iterable[str]) -> list[str]:
    """IANA zones whose city (or region) the texts name, e.g. "New York" -> America/New_York, and zone names
    written out in full, in order of first mention."""
    found: dict[str, int] = {}
    lowered = [t.lower() for t in texts]
    for zone, zone_lower, city in _zone_cities():
        for i, text in enumerate(lowered):
            at = text.find(zone_lower)
            # the word-boundary search only where the city's name occurs at all: one regex per zone and call
            # would recompile hundreds of patterns (re's cache holds 512) on every routed step
            if at < 0 and len(city) > 3 and city in text:
                m = re.search(rf"(?<![a-z]){re.escape(city)}(?![a-z])", text)
                at = m.start() if m else -1
            if at >= 0:
                found.setdefault(zone, i * 1_000_000 + at)
                break
    return sorted(found, key=found.__getitem__)


def path_kinds(text: str) -> set[str]:
    """The kinds of path `text` gives: `file` for a file name (`notes.txt`, or a path ending in one), `folder`
    for an absolute path whose last part has no extension."""
    kinds = {"file"} if _FILE_NAME.search(text) else set()
    for raw in _ABS_PATH.findall(text):
        path = _clean_path(raw)
        if path == "/" or not _FILE_NAME.fullmatch(path.rsplit("/", 1)[-1]):
            kinds.add("folder")
    return kinds


def _argument_operand(name: str) -> str | None:
    """What a path argument names by its own name: `repo_path`, `directory`, `folder` a folder; `file_path`,
    `filename` a file; else None (the tool says)."""
    parts = set(words(name))
    if parts & {"repo", "repository", "directory", "dir", "folder"}:
        return "folder"
    if parts & {"file", "filename"}:
        return "file"
    return None


def path_operand(name: str, description: str) -> str | None:
    """What a tool's path argument names: `folder` (the tool's name says directory, folder or tree, or it works
    recursively), `file` (its name says file, its description does not add "or directory"), else None (either
    kind, or the tool does not say). A tool without those words in its name goes by its first line's words."""
    tool_words = set(re.split(r"[^a-z]+", name.rsplit("__", 1)[-1].lower()))
    first = description.strip().split("\n", 1)[0]
    sentence = first.split(". ", 1)[0]
    if tool_words & _FOLDER_NAME_WORDS or _RECURSIVE.search(sentence):
        return "folder"
    if _EITHER_KIND.search(sentence):
        return None
    if tool_words & {"file", "files"}:
        return "file"
    if _FILE_WORDS.search(first) and not _DIRECTORY_WORDS.search(first):
        return "file"
    if _DIRECTORY_WORDS.search(first) and not _FILE_WORDS.search(first):
        return "folder"
    return None


def evidence(
    parameters: Mapping[str, Any], text: str, description: str = "", tool: str = "", later: bool = False
) -> float:
    """How well `text` supplies a tool's required arguments: +0.5 for each required argument with a value of
    its kind in the text (numbers for numbers, a clock time for an HH:MM time, a path for a path: each value
    serves one argument, a place for a timezone, one of an enum's values), -1 for each without; and for a path,
    +0.5 when the text gives one of the kind the tool works on (`path_operand`: a file name, or a folder), -1.5
    when it gives only the other kind (a folder tool on `notes.txt` fails with "not a directory"). Routing adds
    it to the relevance score: of two tools that fit the words of a task, the one whose inputs it gives wins.
    `later`: the text is a later part of a task ("add them with the sum tool"), so a number it does not state
    may come from an earlier part's result: it costs nothing."""
    props = parameters.get("properties")
    if not isinstance(props, Mapping):
        return 0.0
    numbers = len(_NUMBER_VALUE.findall(text))
    # each absolute path, and each file name outside them ("Stage TODO.txt in /x/repo": two)
    paths = len({_clean_path(p) for p in _ABS_PATH.findall(text)}) + len(
        _FILE_NAME.findall(_ABS_PATH.sub(" ", text))
    )
    zones = len(zones_named_in([text]))
    given_kinds = path_kinds(text)
    score = 0.0
    for name in parameters.get("required") or ():
        schema = props.get(name)
        if not isinstance(schema, Mapping):
            continue
        kind = schema.get("type")
        desc = str(schema.get("description", ""))
        if kind in ("number", "integer"):
            numbers -= 1
            score += 0.5 if numbers >= 0 else (0.0 if later else -1.0)
        elif kind == "string" and "enum" in schema:
            score += 0.5 if any(str(v).lower() in text.lower() for v in schema["enum"]) else -1.0
        elif kind == "string" and _HHMM.search(desc):
            score += 0.5 if clock_values(text) else -1.0
        elif kind == "string" and is_timezone_argument(name, schema):
            zones -= 1  # each place serves one zone argument
            score += 0.5 if zones >= 0 else -1.0
        elif is_path_argument(name, schema):
            paths -= 1
            if paths < 0:
                score -= 1.0
                continue
            score += 0.5
            operand = _argument_operand(name) or path_operand(tool, description)
            if operand is not None:
                score += 0.5 if operand in given_kinds else -1.5
    return score


def quoted_choices(description: str) -> list[str]:
    """The values a description offers as a choice ("'local', 'remote' or 'all'"), else none."""
    values = list(dict.fromkeys(_QUOTED.findall(description)))
    return values if len(values) >= 2 and _CHOICE_WORDS.search(description) else []


def number_values(texts: Iterable[str], *, integers: bool = False) -> list[int | float]:
    """The numbers `texts` state, in order of first mention, once each (`integers`: only whole ones); digits in
    a path are part of its name ("/tmp/pytest-563/budget.csv" states no 563)."""
    out: list[int | float] = []
    for text in texts:
        for raw in _NUMBER_VALUE.findall(_ABS_PATH.sub(" ", text)):
            value: int | float = int(raw) if "." not in raw else float(raw)
            if integers and not float(value).is_integer():
                continue
            if integers:
                value = int(value)
            if value not in out:
                out.append(value)
    return out


def _narrow_number(schema: dict[str, Any], context: GroundingContext) -> None:
    """A number is copied far more often than computed: one of the numbers the run has seen (the task's
    first), within the schema's bounds; unconstrained when the run has seen none. When lines of the newest
    result fit the task ("the laptop and the office chair" in a CSV), the numbers of the task and those lines."""
    if "enum" in schema or "const" in schema:
        return
    integers = schema.get("type") == "integer"
    focused = number_values(context.focus, integers=integers)
    values = number_values([context.task, *context.focus] if focused else context.texts, integers=integers)
    low, high = schema.get("minimum"), schema.get("maximum")
    values = [
        v
        for v in values
        if (not isinstance(low, int | float) or v >= low) and (not isinstance(high, int | float) or v <= high)
    ][:MAX_NUMBER_CANDIDATES]
    if values:
        schema["enum"] = values


def _narrow(
    name: str, schema: dict[str, Any], context: GroundingContext, *, creating: bool, making: bool = False
) -> None:
    """Narrow one string, number or array argument in place. `making`: the tool changes something (it is not
    read-only), so a name argument takes a name the task gives."""
    if schema.get("type") in ("number", "integer"):
        _narrow_number(schema, context)
        return
    if schema.get("type") == "array" and "maxItems" not in schema:
        schema["maxItems"] = MAX_FREE_ITEMS
    items = schema.get("items")
    if schema.get("type") == "array" and isinstance(items, Mapping) and items.get("type") == "object":
        # a list of records to make ({"entityName": ..., "contents": [...]}): each record's fields as arguments
        schema["items"] = ground_schema(items, context, read_only=False if making else None)
        return
    if schema.get("type") == "array" and is_path_argument(name, schema):
        candidates = context.path_candidates(creating=creating)
        if (
            isinstance(items, Mapping)
            and items.get("type") == "string"
            and candidates
            and "enum" not in items
        ):
            schema["items"] = {**items, "enum": candidates}
        return
    if schema.get("type") != "string" or "enum" in schema or "pattern" in schema:
        return
    if is_timezone_argument(name, schema) and iana_timezones():
        schema["enum"] = zones_named_in(context.texts) or list(iana_timezones())
    elif _HHMM.search(str(schema.get("description", ""))):
        clocks = clock_values(context.task)
        if clocks:
            schema["enum"] = clocks
        else:
            schema["pattern"] = "^([01][0-9]|2[0-3]):[0-5][0-9]$"
    elif is_path_argument(name, schema):
        candidates = context.path_candidates(creating=creating)
        if candidates:
            schema["enum"] = candidates
    elif making and is_name_argument(name) and (given := context.given_names()):
        schema["enum"] = given
    elif choices := quoted_choices(str(schema.get("description", ""))):
        schema["enum"] = choices
    elif "maxLength" not in schema and "format" not in schema:
        schema["maxLength"] = MAX_FREE_STRING


def _one_number_each(props: dict[str, Any], required: set[str]) -> None:
    """Required number arguments offered the same candidates, exactly as many as there are arguments ("the
    laptop and the office chair": 1299.00 and 249.99 for `a` and `b`), take one each, in the order they were
    seen: a small model otherwise gives both the first ("1299 + 1299")."""
    numeric = [
        s
        for n, s in props.items()
        if n in required and isinstance(s, dict) and s.get("type") in ("number", "integer") and "enum" in s
    ]
    if len(numeric) < 2 or any(s["enum"] != numeric[0]["enum"] for s in numeric):
        return
    values = list(numeric[0]["enum"])
    if len(values) == len(numeric):
        for schema, value in zip(numeric, values, strict=True):
            schema["enum"] = [value]


def _order_pairs(props: dict[str, Any]) -> None:
    """A source/target pair over the same candidates takes them in the order the task names them."""
    for source, s in props.items():
        if not _SOURCE.match(source) or not isinstance(s, dict) or not isinstance(s.get("enum"), list):
            continue
        rest = _SOURCE.sub("", source)
        for target, t in props.items():
            if target == source or not _TARGET.match(target) or _TARGET.sub("", target) != rest:
                continue
            if isinstance(t, dict) and t.get("enum") == s["enum"] and len(s["enum"]) >= 2:
                s["enum"] = s["enum"][:1]
                t["enum"] = t["enum"][1:]


def ground_schema(
    parameters: Mapping[str, Any], context: GroundingContext, *, read_only: bool | None = None
) -> dict[str, Any]:
    """`parameters` (an object schema) narrowed for this call; a copy of the original when nothing applies.
    `read_only` is the tool's hint: a tool that is not read-only may be making what the task names."""
    props = parameters.get("properties")
    if not isinstance(props, Mapping) or not props:
        return dict(parameters)
    required = set(parameters.get("required") or ())
    out = copy.deepcopy(dict(parameters))
    narrowed: dict[str, Any] = {}
    # A tool that changes something and whose only required inputs are paths makes what the task names there
    # ("a folder called archive" -> .../archive); one with a name argument of its own (`branch_name`) takes
    # the name there and its path stays a path the run has seen.
    names_elsewhere = any(
        isinstance(s, Mapping) and s.get("type") == "string" and not is_path_argument(n, s)
        for n, s in props.items()
        if n in required
    )
    creating = read_only is False and not names_elsewhere
    for name, schema in props.items():
        if not isinstance(schema, Mapping):
            narrowed[name] = schema
            continue
        if name not in required and not context.mentions(name):
            continue  # optional and never asked for: not offered
        s = copy.deepcopy(dict(schema))
        _narrow(name, s, context, creating=creating, making=read_only is False)
        narrowed[name] = s
    _order_pairs(narrowed)
    _one_number_each(narrowed, required)
    out["properties"] = narrowed
    if "required" in out:
        out["required"] = [r for r in out["required"] if r in narrowed]
    return out
