"""Each live server's resources, resource templates and prompts, and the subscribers of resource updates.

The supervisor fills it (listed when a server advertises the capability, refreshed on list_changed, dropped
when the server goes); `notifications/resources/updated` reaches subscribers through bounded queues whose
overflow is counted, so a server that floods updates costs memory for `max_queued` updates at most.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agent_runtime.logging import get_logger

if TYPE_CHECKING:  # mcp costs ~0.8 s to import; the CLI's config-only paths must not pay it
    from mcp_types import Prompt, Resource, ResourceTemplate

log = get_logger(__name__)

DEFAULT_MAX_QUEUED = 100  # updates a subscriber may leave unread before new ones are dropped (and counted)


@dataclass(frozen=True, slots=True)
class ResourceEntry:
    server: str
    resource: Resource


@dataclass(frozen=True, slots=True)
class TemplateEntry:
    server: str
    template: ResourceTemplate

    @property
    def prefix(self) -> str:
        """The template's literal text before its first variable: which URIs it can produce."""
        return self.template.uri_template.split("{", 1)[0]


@dataclass(frozen=True, slots=True)
class PromptEntry:
    server: str
    prompt: Prompt


@dataclass(frozen=True, slots=True)
class ResourceUpdate:
    """A `notifications/resources/updated` for a subscribed URI: re-read it to see the new contents."""

    server: str
    uri: str
    at: float  # wall-clock time it arrived


@dataclass(slots=True, eq=False)
class ResourceSubscription:
    """Updates of one URI on one server, as an async iterator; `dropped` counts updates lost to a full queue."""

    server: str
    uri: str
    max_queued: int
    dropped: int = 0
    delivered: int = 0
    _offered: anyio.Event = field(init=False, default_factory=anyio.Event)
    _send: MemoryObjectSendStream[ResourceUpdate] = field(init=False)
    _receive: MemoryObjectReceiveStream[ResourceUpdate] = field(init=False)

    def __post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[ResourceUpdate](self.max_queued)

    def offer(self, update: ResourceUpdate) -> None:
        """Queue an update without waiting (called from the session's receive loop, which must not block)."""
        try:
            self._send.send_nowait(update)
            self.delivered += 1
        except anyio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("resource updates dropped", server=self.server, dropped=self.dropped)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return  # the subscriber has gone; its removal is under way
        self._offered.set()
        self._offered = anyio.Event()

    async def wait_offered(self, count: int) -> None:
        """Wait until `count` updates have arrived in all (queued or dropped); bound it with a deadline."""
        while self.delivered + self.dropped < count:
            await self._offered.wait()

    def pending(self) -> int:
        return self._receive.statistics().current_buffer_used

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    def __aiter__(self) -> ResourceSubscription:
        return self

    async def __anext__(self) -> ResourceUpdate:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None


class Catalog:
    """Resources, templates and prompts per server, plus the update subscribers; single event-loop use."""

    def __init__(self) -> None:
        self._resources: dict[str, list[ResourceEntry]] = {}
        self._templates: dict[str, list[TemplateEntry]] = {}
        self._prompts: dict[str, list[PromptEntry]] = {}
        self._subscribers: dict[tuple[str, str], list[ResourceSubscription]] = {}

    # -- listings ---------------------------------------------------------------------------------------

    def set_server(
        self,
        server: str,
        *,
        resources: Sequence[Resource] | None = None,
        templates: Sequence[ResourceTemplate] | None = None,
        prompts: Sequence[Prompt] | None = None,
    ) -> None:
        """Replace what `server` offers; a None listing is left as it was (not refetched this time)."""
        if resources is not None:
            self._resources[server] = [ResourceEntry(server, r) for r in resources]
        if templates is not None:
            self._templates[server] = [TemplateEntry(server, t) for t in templates]
        if prompts is not None:
            self._prompts[server] = [PromptEntry(server, p) for p in prompts]

    def remove_server(self, server: str) -> None:
        """Drop the listings of a server that disconnected; its subscribers stay for when it comes back."""
        self._resources.pop(server, None)
        self._templates.pop(server, None)
        self._prompts.pop(server, None)

    def resources(self, server: str | None = None) -> builtins.list[ResourceEntry]:
        return _pick(self._resources, server)

    def templates(self, server: str | None = None) -> builtins.list[TemplateEntry]:
        return _pick(self._templates, server)

    def prompts(self, server: str | None = None) -> builtins.list[PromptEntry]:
        return _pick(self._prompts, server)

    def servers_for_uri(self, uri: str) -> builtins.list[str]:
        """Servers that list `uri`, else those with a template whose literal prefix it starts with."""
        listed = [e.server for e in self.resources() if e.resource.uri == uri]
        if listed:
            return sorted(set(listed))
        return sorted({e.server for e in self.templates() if e.prefix and uri.startswith(e.prefix)})

    # -- subscriptions ----------------------------------------------------------------------------------

    def add_subscriber(
        self, server: str, uri: str, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> ResourceSubscription:
        sub = ResourceSubscription(server, uri, max(1, max_queued))
        self._subscribers.setdefault((server, uri), []).append(sub)
        return sub

    def remove_subscriber(self, sub: ResourceSubscription) -> bool:
        """Forget `sub`; True when it was the URI's last subscriber (time to unsubscribe on the server)."""
        sub.close()
        key = (sub.server, sub.uri)
        subs = self._subscribers.get(key, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subscribers.pop(key, None)
            return True
        return False

    def subscribed(self, server: str) -> builtins.list[str]:
        """URIs of `server` somebody is subscribed to (re-sent after a reconnection)."""
        return sorted(uri for s, uri in self._subscribers if s == server)

    def subscribers_of(self, server: str, uri: str) -> int:
        return len(self._subscribers.get((server, uri), []))

    def updated(self, server: str, uri: str) -> int:
        """Hand a resources/updated to every subscriber of (server, uri); returns how many were offered it."""
        subs = self._subscribers.get((server, uri), [])
        if subs:
            update = ResourceUpdate(server, uri, time.time())
            for sub in subs:
                sub.offer(update)
        return len(subs)


_Entry = TypeVar("_Entry", ResourceEntry, TemplateEntry, PromptEntry)


def _pick(table: dict[str, list[_Entry]], server: str | None) -> list[_Entry]:
    if server is not None:
        return list(table.get(server, []))
    return [entry for entries in table.values() for entry in entries]
