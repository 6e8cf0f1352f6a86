"""Tool allow/deny lists with shell-style globs; deny wins, an empty allow list allows everything."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class ToolFilter:
    """Patterns match the tool's own name, or `server/tool` for patterns that contain a slash."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @classmethod
    def of(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> ToolFilter:
        return cls(tuple(allow), tuple(deny))

    def denial(self, server: str, tool: str) -> str | None:
        """Why the tool is not allowed, or None when it is."""
        for pattern in self.deny:
            if _matches(pattern, server, tool):
                return f"tool {server}/{tool} is denied by policy pattern {pattern!r}"
        if self.allow and not any(_matches(p, server, tool) for p in self.allow):
            return f"tool {server}/{tool} is not in the allow list"
        return None


def _matches(pattern: str, server: str, tool: str) -> bool:
    if "/" in pattern:
        return fnmatchcase(f"{server}/{tool}", pattern)
    return fnmatchcase(tool, pattern)
