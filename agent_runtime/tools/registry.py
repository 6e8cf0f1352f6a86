"""The tool registry: namespaced tool names (`prefix + tool`) of every live server, with change events.

Collision policy (the safe choice): a namespaced name offered more than once is kept out of the table
entirely and reported, so no call can reach a server other than the one the caller meant; the name comes
back as soon as only one offer remains. Invalid names are reported and skipped, never rewritten; so are
invalid definitions (a malformed entry of the listing, or a schema the runtime will not apply: a reference
that leaves the document, a pattern no safe engine compiles, nesting past the bounds), one tool at a time:
the server's other tools stay.
"""

from __future__ import annotations

import builtins
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from agent_runtime.logging import get_logger
from policies.schemas import schema_problems

if TYPE_CHECKING:  # mcp costs ~0.8 s to import; the CLI must not pay it when no server is configured
    from mcp.types import Tool

log = get_logger(__name__)  # structlog, imported on the first record that passes the level

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def valid_tool_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """One callable tool: `name` is what agents use, `tool_name` what the server knows it as."""

    name: str
    server: str
    tool_name: str
    definition: Tool


@dataclass(frozen=True, slots=True)
class RegistryProblem:
    """A tool offered by a server that is not in the table, and why."""

    kind: Literal["invalid_name", "invalid_definition", "collision"]
    name: str  # the namespaced name (as it would have been)
    server: str
    tool_name: str
    detail: str


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """What one update did to the visible table (names are namespaced)."""

    server: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # same name, different definition
    version: int

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


Listener = Callable[[RegistryChange], None]


class ToolRegistry:
    """Namespaced tool table rebuilt from each server's offer; single event-loop use (no locks needed)."""

    def __init__(self) -> None:
        self._offers: dict[str, list[ToolEntry]] = {}  # server -> valid entries it offers, in its order
        self._invalid: dict[str, list[RegistryProblem]] = {}
        self._table: dict[str, ToolEntry] = {}
        self._collisions: list[RegistryProblem] = []
        self._listeners: dict[object, Listener] = {}
        self._changed = anyio.Event()
        self.version = 0

    # -- updates ----------------------------------------------------------------------------------------

    def set_server_tools(
        self,
        server: str,
        prefix: str,
        tools: Sequence[Tool],
        rejected: Sequence[tuple[str, str]] = (),
    ) -> RegistryChange:
        """Replace everything `server` offers with `tools` (its complete current listing); `rejected` are
        `(tool name, why)` for entries of the listing that were not even well-formed tool definitions."""
        entries: list[ToolEntry] = []
        invalid: list[RegistryProblem] = [
            RegistryProblem(
                "invalid_definition", prefix + tool_name, server, tool_name, f"{detail}; tool skipped"
            )
            for tool_name, detail in rejected
        ]
        for tool in tools:
            name = prefix + tool.name
            bad = schema_problems(tool.input_schema, "inputSchema") + schema_problems(
                tool.output_schema, "outputSchema"
            )
            if bad:
                invalid.append(
                    RegistryProblem(
                        "invalid_definition",
                        name,
                        server,
                        tool.name,
                        f"tool {tool.name!r}: " + "; ".join(bad) + "; tool skipped",
                    )
                )
                continue
            if not valid_tool_name(name):
                invalid.append(
                    RegistryProblem(
                        "invalid_name",
                        name,
                        server,
                        tool.name,
                        f"{name!r} does not match [A-Za-z0-9_.-]{{1,128}}; tool skipped",
                    )
                )
                continue
            entries.append(ToolEntry(name, server, tool.name, tool))
        for problem in invalid:
            log.warning("tool skipped", server=server, tool=problem.tool_name, reason=problem.detail)
        self._offers[server] = entries
        self._invalid[server] = invalid
        return self._rebuild(server)

    def remove_server(self, server: str) -> RegistryChange:
        """Drop every tool of `server` (it disconnected or stopped)."""
        self._offers.pop(server, None)
        self._invalid.pop(server, None)
        return self._rebuild(server)

    def _rebuild(self, server: str) -> RegistryChange:
        offered: dict[str, list[ToolEntry]] = {}
        for entries in self._offers.values():
            for entry in entries:
                offered.setdefault(entry.name, []).append(entry)
        table: dict[str, ToolEntry] = {}
        collisions: list[RegistryProblem] = []
        for name, offers in offered.items():
            if len(offers) == 1:
                table[name] = offers[0]
                continue
            who = ", ".join(f"{e.server}:{e.tool_name}" for e in offers)
            for entry in offers:
                collisions.append(
                    RegistryProblem(
                        "collision",
                        name,
                        entry.server,
                        entry.tool_name,
                        f"{name!r} is offered by {who}; kept out until only one remains "
                        "(set a distinct `prefix` for one of the servers)",
                    )
                )
        new_collisions = {(p.name, p.server) for p in collisions} - {
            (p.name, p.server) for p in self._collisions
        }
        for problem in collisions:
            if (problem.name, problem.server) in new_collisions:
                log.warning(
                    "tool name collision", tool=problem.name, server=problem.server, reason=problem.detail
                )

        old = self._table
        added = tuple(n for n in table if n not in old)
        removed = tuple(n for n in old if n not in table)
        changed = tuple(n for n in table if n in old and old[n].definition != table[n].definition)
        self._table = table
        self._collisions = collisions
        change = RegistryChange(server, added, removed, changed, self.version + 1)
        if not change.empty:
            self.version = change.version
            self._notify(change)
        return change

    # -- events -----------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(change)` after every change to the table; returns an idempotent unsubscribe."""
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    def _notify(self, change: RegistryChange) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(change)
            except Exception:  # one bad listener must not break the others or the supervisor
                log.exception("registry listener raised", server=change.server)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[ToolRegistry], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (at most `timeout` s) until `predicate(self)` holds; returns whether it does."""
        with anyio.move_on_after(timeout):
            while not predicate(self):
                await self._changed.wait()
            return True
        return predicate(self)

    # -- queries ----------------------------------------------------------------------------------------

    def get(self, name: str) -> ToolEntry | None:
        return self._table.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __len__(self) -> int:
        return len(self._table)

    def list(self, server: str | None = None) -> list[ToolEntry]:
        """Visible tools, sorted by name; only those of `server` when given."""
        entries: Iterable[ToolEntry] = self._table.values()
        if server is not None:
            entries = (e for e in entries if e.server == server)
        return sorted(entries, key=lambda e: e.name)

    def count(self, server: str) -> int:
        return sum(1 for e in self._table.values() if e.server == server)

    def problem(self, name: str) -> RegistryProblem | None:
        """Why the namespaced `name` is offered but not callable (an invalid name or definition), or None."""
        for problems in self._invalid.values():
            for p in problems:
                if p.name == name:
                    return p
        return None

    def problems(self, server: str | None = None) -> builtins.list[RegistryProblem]:
        """Invalid names and collisions, for display (`tools list` shows them)."""
        found = [p for problems in self._invalid.values() for p in problems] + self._collisions
        return [p for p in found if server is None or p.server == server]

    def close_matches(self, name: str, n: int = 3) -> builtins.list[str]:
        return difflib.get_close_matches(name, list(self._table), n=n, cutoff=0.5)
