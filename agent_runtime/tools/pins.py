"""The tool lock file (pinned definitions) and the pin checks the executor makes against it.

Trust on first use: the first time a server is seen (no entry in the lock file) all its tools are pinned.
Afterwards a tool whose definition changed, or a tool new to the server, is quarantined (calls refused)
until approved. `pinning: "strict"` pins nothing on its own; `"off"` disables the check.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_runtime.config.types import PinningMode
from agent_runtime.errors import ConfigError
from agent_runtime.logging import get_logger
from policies.pinning import PinCheck, check_pins, definition_hash, pinned_view, poisoning_signs

if TYPE_CHECKING:
    from mcp_types import Tool

    from agent_runtime.tools.registry import ToolEntry

log = get_logger(__name__)  # structlog, imported on the first record that passes the level
LOCK_VERSION = 1


def wire_definition(tool: Tool) -> dict[str, Any]:
    """A tool definition as it travels (camelCase keys), which is what gets hashed and stored."""
    return tool.model_dump(by_alias=True, exclude_none=True, mode="json")


class LockFile:
    """`{"version": 1, "servers": {name: {"tools": {tool: {"sha256", "approved_at", "definition"}}}}}`.

    With `path` None the pins live in memory only (ad-hoc servers: nothing is written to the cwd)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.servers: dict[str, dict[str, dict[str, Any]]] = {}
        self.load()

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.servers = {}
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the tool lock file {self.path}: {exc}",
                "fix or delete it; deleting re-pins every tool on next use",
            ) from None
        if (
            not isinstance(data, dict)
            or data.get("version") != LOCK_VERSION
            or not isinstance(data.get("servers"), dict)
        ):
            raise ConfigError(
                f"{self.path} is not a version {LOCK_VERSION} tool lock file", "delete it to re-pin"
            )
        self.servers = {name: dict(entry.get("tools", {})) for name, entry in data["servers"].items()}

    def save(self) -> None:
        """Atomic replace: a crash never leaves a half-written lock file."""
        if self.path is None:
            return
        data = {
            "version": LOCK_VERSION,
            "servers": {
                name: {"tools": dict(sorted(tools.items()))} for name, tools in sorted(self.servers.items())
            },
        }
        import tempfile  # not at import: `tools list` with nothing to pin never writes

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def pin(self, server: str, definition: Mapping[str, Any]) -> None:
        self.servers.setdefault(server, {})[definition["name"]] = {
            "sha256": definition_hash(definition),
            "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "definition": pinned_view(definition),
        }


@dataclass(slots=True)
class PinStore:
    """Pin checks for the executor, cached per definition object (the registry replaces them on change)."""

    lock: LockFile | None  # None when pinning is off
    mode: PinningMode = "tofu"
    _cache: dict[tuple[str, str], tuple[Any, PinCheck]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | None, mode: PinningMode) -> PinStore:
        return cls(None if mode == "off" else LockFile(path), mode)

    def observe(self, server: str, tools: Iterable[Tool]) -> dict[str, PinCheck]:
        """A server's current listing: pins everything on first sight (tofu), else reports what changed."""
        definitions = {t.name: wire_definition(t) for t in tools}
        if self.lock is None:
            return {n: PinCheck(n, "pinned", "") for n in definitions}
        if self.mode == "tofu" and server not in self.lock.servers and definitions:
            for definition in definitions.values():
                self.lock.pin(server, definition)
            try:
                self.lock.save()
            except OSError as exc:  # the pins still hold for this process; say why they will not persist
                log.warning("cannot write the tool lock file", lock=str(self.lock.path), error=str(exc))
            log.info(
                "tools pinned on first use", server=server, tools=len(definitions), lock=str(self.lock.path)
            )
        checks = check_pins(self.lock.servers.get(server, {}), definitions)
        for check in checks.values():
            if check.quarantined:
                log.warning(
                    "tool quarantined",
                    server=server,
                    tool=check.tool,
                    status=check.status,
                    changed=list(check.changed),
                )
        return checks

    def check(self, server: str, tool: Tool) -> PinCheck:
        key = (server, tool.name)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is tool:
            return cached[1]
        if self.lock is None:
            result = PinCheck(tool.name, "pinned", "")
        else:
            if self.mode == "tofu" and server not in self.lock.servers:
                self.observe(server, [tool])
            result = check_pins(self.lock.servers.get(server, {}), {tool.name: wire_definition(tool)})[
                tool.name
            ]
        self._cache[key] = (tool, result)
        return result

    def approve(self, server: str, tools: Iterable[Tool]) -> list[str]:
        if self.lock is None:
            return []
        names = []
        for tool in tools:
            self.lock.pin(server, wire_definition(tool))
            names.append(tool.name)
        self.lock.save()
        self._cache = {k: v for k, v in self._cache.items() if k[0] != server or k[1] not in names}
        return names

    def reload(self) -> None:
        """Re-read the lock file (another process, or a runtime of this one, may have pinned since)."""
        if self.lock is not None:
            self.lock.load()
        self._cache.clear()


def tool_flags(store: PinStore | None, entry: ToolEntry) -> list[str]:
    """What `tools list` should show next to a tool: quarantine and signs of poisoning."""
    flags = []
    if store is not None:
        check = store.check(entry.server, entry.definition)
        if check.status == "new":
            flags.append("quarantined: new tool, not approved")
        elif check.status == "changed":
            flags.append(f"quarantined: {', '.join(check.changed)} changed since approval")
    flags.extend(f"suspicious {sign}" for sign in poisoning_signs(wire_definition(entry.definition)))
    return flags
