"""Honesty checks on a final answer: the values it states (numbers, clock times, dates) must come from the task
or from what the tools returned, and a run whose every tool call failed says what failed instead of answering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from agent_runtime.agents.events import ToolCallRecord

_DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")
_CLOCK = re.compile(r"(?<!\d)(\d{1,2}):(\d{2})(?::\d{2})?\s*(am|pm|a\.m\.|p\.m\.)?", re.I)
_NUMBER = re.compile(r"(?<![\w.:-])-?\d+(?:[.,]\d+)*(?![\w:])")


def _numbers(text: str) -> set[str]:
    out = set()
    for raw in _NUMBER.findall(text):
        value = raw.replace(",", "")
        try:
            number = float(value)
        except ValueError:
            continue
        out.add(f"{number:g}")
    return out


def _clocks(text: str) -> set[str]:
    out = set()
    for h, m, suffix in _CLOCK.findall(text):
        hour = int(h)
        if suffix and suffix.lower().startswith("p") and hour < 12:
            hour += 12
        if suffix and suffix.lower().startswith("a") and hour == 12:
            hour = 0
        out.add(f"{hour:02d}:{m}")
    return out


def ungrounded_values(answer: str, sources: Iterable[str]) -> list[str]:
    """The values stated in `answer` that none of `sources` (the task, the observations) contains: clock
    times, dates and numbers, compared by value (`2:26 PM` is `14:26`, `6,912` is `6912`)."""
    text = " ".join(sources)
    known_clocks, known_numbers, known_dates = _clocks(text), _numbers(text), set(_DATE.findall(text))
    missing: list[str] = []
    rest = answer
    for date in _DATE.findall(answer):
        if date not in known_dates:
            missing.append(date)
        rest = rest.replace(date, " ")
    for match in _CLOCK.finditer(answer):
        clock = next(iter(_clocks(match.group(0))))
        if clock not in known_clocks:
            missing.append(match.group(0).strip())
    rest = _CLOCK.sub(" ", rest)
    for number in _numbers(rest):
        if number not in known_numbers:
            missing.append(number)
    return missing


def failure_summary(calls: Sequence[ToolCallRecord]) -> str | None:
    """When calls were made and none returned a result, an answer saying what failed (never an invented
    value); None when at least one call succeeded or none was made."""
    if not calls or any(c.outcome == "result" for c in calls):
        return None
    last = calls[-1]
    reason = last.observation.splitlines()[0] if last.observation else last.outcome
    reason = reason.removeprefix("Error: ").strip()
    return f"I could not complete this: {last.name} failed ({reason[:300]})."
