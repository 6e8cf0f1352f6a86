"""Which lines of a tool's result answer the task: a small model shown nine `key: value` lines answers with the
wrong one of two times, so the lines that fit the question are repeated after the result, where it reads last.

A line fits when its key names what the task asks for ("time" in `target.datetime`, "date" in `datetime`), its
record (the lines sharing its key's prefix, or a CSV row) holds what the task names ("Sydney" in
`target.timezone: Australia/Sydney`, "monitor" in `Monitor,hardware,329.50`), and its value is new: a value the
task already states (the 15:00 of "3 pm London time") is the question, not the answer.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent_runtime.agents.grounding import capitalised_names, clock_values, number_values, zones_named_in
from agent_runtime.agents.routing import words

MAX_FOCUS_LINES = 2
MAX_RESULT_LINES = 200  # a longer result is a document, not a record: its lines are not scored
KEY_WEIGHT = 1.0  # a task word in the line's key: what is asked for ("time" in `datetime`)
HEAD_BONUS = 0.2  # up to this share more for a later word of the task
ASKED_WEIGHT = 1.5  # a key a question word asks for: "Who ...?" is answered by an `Author:` line
CONTENT_WEIGHT = 1.0  # a task word (not a name) in the line's value: "based" in `["based in Rotterdam"]`
RECORD_WEIGHT = 0.5  # a name the task gives in another value of the same record: the record it is about
SUBJECT_PENALTY = 0.5  # a name the task gives in the line's own value: the subject restated, not the answer
# the line's value is a clock time or number the task states: the question, not the answer
GIVEN_PENALTY = 1.5
_KEYED = re.compile(r"^\s*([^:\n]{1,80}?):\s+(.+)$")
_GROUP = re.compile(r"^(.*?)(?:\.[^.\[\]]+)$")
_CLOCK = re.compile(r"(?<!\d)(\d{1,2}):(\d{2})(?!\d)")


@dataclass(slots=True)
class _Line:
    text: str
    key: list[str]
    value: list[str]
    group: str | None
    cells: bool  # a CSV row: every word is a cell
    raw_value: str | None = None  # the text after a `key:`, as the result wrote it


# What a question word asks for, as the keys tools write it: "Who made the first commit?" is an `Author:` line.
_ASKS_FOR: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"\bwho\b", re.I), ("author", "owner", "by", "person", "user", "creator", "assignee")),
    (re.compile(r"\bwhen\b", re.I), ("date", "time", "datetime", "timestamp")),
    (re.compile(r"\bwhere\b", re.I), ("location", "city", "place", "address", "based")),
    (
        re.compile(r"\bhow (?:much|many)\b|\bcost\b|\bprice\b", re.I),
        ("amount", "price", "cost", "total", "count"),
    ),
)
_OLDEST = re.compile(r"\b(first|earliest|oldest)\b", re.I)


def asked_for(task: str) -> dict[str, float]:
    """What a key may match, and its weight: the keys the question words ask for ("who" -> `author`) weigh
    most, then the task's own words, the later ones a little more (the head of "the last commit message" is
    "message", not "commit")."""
    own = list(dict.fromkeys(words(task)))
    weights = {w: KEY_WEIGHT * (1 + HEAD_BONUS * i / max(len(own), 1)) for i, w in enumerate(own)}
    for pattern, keys in _ASKS_FOR:
        if pattern.search(task):
            weights.update({key: ASKED_WEIGHT for key in keys})
    return weights


def _matches(task_word: str, line_word: str) -> bool:
    # "time" fits "datetime" and "date" fits "datetime": tools join words that people write apart
    return task_word == line_word or (len(task_word) >= 4 and task_word in line_word)


def _hits(task_words: set[str], line_words: list[str]) -> set[str]:
    return {t for t in task_words if any(_matches(t, w) for w in line_words)}


def names_in(task: str) -> set[str]:
    """The names of what the task is about: the words it writes capitalised other than to start a sentence
    ("Tokyo", "Priya", "Acme Corp"), and the places it names however written ("london")."""
    names = {w for name in capitalised_names(task) for w in words(name)}
    return names | {w for zone in zones_named_in([task]) for w in words(zone.rsplit("/", 1)[-1])}


def _parse(result: str) -> list[_Line]:
    raw = [line for line in result.splitlines() if line.strip() and not line.rstrip().endswith(":")]
    header: list[str] | None = None
    if len(raw) >= 3 and "," in raw[0] and ":" not in raw[0]:
        width = raw[0].count(",")
        if sum(1 for line in raw[1:] if line.count(",") == width) >= 2:
            header = words(raw[0].replace(",", " "))
    lines: list[_Line] = []
    for i, text in enumerate(raw):
        if header is not None:
            if i == 0:
                continue  # the header names the columns of every row: it says nothing about one
            lines.append(_Line(_labelled(raw[0], text), list(header), words(text), None, True))
            continue
        keyed = _KEYED.match(text)
        if keyed is None:
            lines.append(_Line(text, [], words(text), None, False))
            continue
        key, value = keyed.group(1).strip(), keyed.group(2).strip()
        group = _GROUP.match(key)
        lines.append(_Line(text, words(key), words(value), group.group(1) if group else None, False, value))
    return lines


def _labelled(header: str, row: str) -> str:
    """A CSV row with its columns' names ("item: Monitor, category: hardware, amount: 329.50"): read alone, and
    quoted in an answer, "Monitor,hardware,329.50" says less (and runs a name into its number)."""
    names = next(csv.reader([header]))
    cells = next(csv.reader([row]))
    if len(names) != len(cells) or not all(n.strip() for n in names):
        return row
    return ", ".join(f"{n.strip()}: {c.strip()}" for n, c in zip(names, cells, strict=True))


def _given(value: str, times: set[str], numbers: set[float]) -> bool:
    """Whether a value's clock time (its first: an ISO timestamp's offset is not one) or the value as a plain
    number is one the task states."""
    clock = _CLOCK.search(value)
    if clock is not None and f"{int(clock.group(1)):02d}:{clock.group(2)}" in times:
        return True
    try:
        return float(value.strip().replace(",", "")) in numbers
    except ValueError:
        return False


def focus_lines(task: str, result: str, *, limit: int = MAX_FOCUS_LINES) -> list[str]:
    """The lines of `result` that best fit `task`, best first; none when the result is short or long, or when
    no line fits (repeating lines that do not stand out would only add noise)."""
    lines = _parse(result)
    if len(lines) < 3 or len(lines) > MAX_RESULT_LINES:
        return []
    task_words = set(words(task))
    key_words = asked_for(task)
    names = names_in(task)
    given_times = set(clock_values(task))
    given_numbers = {float(n) for n in number_values([task])}
    record_names: dict[str, set[str]] = {}
    for line in lines:
        if line.group is not None:
            record_names.setdefault(line.group, set()).update(_hits(names, line.value))
    # a task word that names a field ("commit" in "the last commit message") picks fields, not contents:
    # it does not make the value "Initial commit" an answer
    field_words = {w for line in lines if not line.cells for w in _hits(task_words, line.key)}
    scored: list[tuple[float, int, str]] = []
    keyed_hit = False  # some line's key names what is asked (not only rows that mention it)
    for i, line in enumerate(lines):
        if not line.value:
            continue
        value_hits = _hits(task_words - field_words, line.value)
        key_hits = set() if line.cells else _hits(set(key_words), line.key)
        if line.cells:
            score = CONTENT_WEIGHT * bool(value_hits)  # a row is about the task or not
        else:
            subject = value_hits & names
            record = record_names.get(line.group, set()) if line.group is not None else set()
            score = (
                sum(key_words[w] for w in key_hits)
                + CONTENT_WEIGHT * len(value_hits - names)
                + RECORD_WEIGHT * len(record - subject)
                - SUBJECT_PENALTY * len(subject)
            )
            if line.raw_value is not None and _given(line.raw_value, given_times, given_numbers):
                score -= GIVEN_PENALTY
        if score > 0:
            scored.append((score, i, line.text.strip()))
            keyed_hit = keyed_hit or bool(key_hits)
    if not scored:
        return []
    best = max(score for score, _, _ in scored)
    # a log lists the newest first: the first commit is the last one shown
    oldest_first = -1 if _OLDEST.search(task) else 1
    ranked = sorted(scored, key=lambda s: (-s[0], oldest_first * s[1]))
    # within the head bonus of the best is as good: "the temperature and conditions" asks for both
    close = best - HEAD_BONUS * KEY_WEIGHT - 1e-9
    top = list(dict.fromkeys(text for score, _, text in ranked if score >= close))
    if len(top) > limit and not keyed_hit:
        return []  # "What files are in X?" matches every [FILE] line: a list is the answer, not two of it
    return top[:limit]


def text_value(line: str) -> str | None:
    keyed = _KEYED.match(line)
    return keyed.group(2) if keyed else None


def focus_value(line: str) -> str:
    """What a focus line says without its key: the value to copy, not the field's name to parrot (a labelled
    CSV row stays whole: its labels say which number is which)."""
    value = text_value(line)
    return line if value is None or ": " in value else value


FOCUS_HEADING = "Most relevant:"


def focus_note(lines: Sequence[str]) -> str:
    """What follows a result in the model's view: its lines that fit the task (`focus_lines`) again, under a
    heading; empty when none stands out."""
    return f"\n\n{FOCUS_HEADING}\n" + "\n".join(lines) if lines else ""
