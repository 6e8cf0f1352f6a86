"""Which of our requests a server has not answered yet, so that a transport that drops an oversized message
can fail the request it answered (instead of leaving it to hang until its timeout)."""

from __future__ import annotations

import json
import re

import mcp_types as types
from mcp.shared.message import SessionMessage

_MAX_TRACKED = 4096  # ids of requests in flight kept at most (cancelled requests may never be answered)
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,19}|"(?:[^"\\]|\\.){0,256}")')
_METHOD = re.compile(rb'"method"\s*:')


class PendingRequests:
    """Ids of requests sent and not yet answered, oldest first."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[types.RequestId, None] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def sent(self, message: types.JSONRPCMessage) -> None:
        if isinstance(message, types.JSONRPCRequest):
            self._ids[message.id] = None
            if len(self._ids) > _MAX_TRACKED:
                del self._ids[next(iter(self._ids))]
        elif isinstance(message, types.JSONRPCNotification) and message.method == "notifications/cancelled":
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, int | str):
                self._ids.pop(request_id, None)

    def answered(self, message: types.JSONRPCMessage) -> None:
        if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
            self._ids.pop(message.id, None)  # type: ignore[arg-type]  # an error's id may be null (None), never a key: nothing to pop then

    def fail_oversized(self, head: bytes, tail: bytes, reason: str) -> list[SessionMessage]:
        """Error replies for the request(s) an oversized message answered, judged from its first and last
        bytes: the pending id it names (first in the head, else last in the tail); none when it is a
        server's own request or notification; every pending request when it cannot be told."""
        in_head = [_decode(m.group(1)) for m in _ID.finditer(head)]
        in_tail = [_decode(m.group(1)) for m in _ID.finditer(tail)]
        ids = [i for i in (*in_head[:1], *reversed(in_tail[-1:]), *in_head, *in_tail) if i in self._ids]
        if ids:
            targets = ids[:1]
        elif _METHOD.search(head) or _METHOD.search(tail):
            targets = []  # the server's own request or notification: none of ours to fail
        else:
            targets = list(self._ids)
        return [self.fail(request_id, reason) for request_id in targets]

    def fail_all(self, reason: str) -> list[SessionMessage]:
        return [self.fail(request_id, reason) for request_id in list(self._ids)]

    def fail(self, request_id: types.RequestId, reason: str) -> SessionMessage:
        self._ids.pop(request_id, None)
        error = types.ErrorData(code=types.INTERNAL_ERROR, message=reason)
        return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error))


def _decode(raw: bytes) -> types.RequestId | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None
