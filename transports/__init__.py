"""How to open an MCP session to one server: stdio, streamable HTTP, legacy SSE, WebSocket (`connect`, in
`transports.connection`: the module is not named after the function, so `transports.connect` is always it).

Only the target types load eagerly; the rest imports the MCP SDK (about a second of cold start), so it
loads on first use. Config-only CLI paths stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget

if TYPE_CHECKING:
    from transports.connection import Connection, connect
    from transports.errors import (
        CallTimeout,
        ConnectError,
        ConnectionLost,
        ServerRequestError,
        StartupTimeout,
        TransportError,
    )
    from transports.stdio import StderrRing

_LAZY = {
    "Connection": "transports.connection",
    "connect": "transports.connection",
    "CallTimeout": "transports.errors",
    "ConnectError": "transports.errors",
    "ConnectionLost": "transports.errors",
    "ServerRequestError": "transports.errors",
    "StartupTimeout": "transports.errors",
    "TransportError": "transports.errors",
    "StderrRing": "transports.stdio",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transports' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CallTimeout",
    "ConnectError",
    "Connection",
    "ConnectionLost",
    "HttpTarget",
    "ServerRequestError",
    "StartupTimeout",
    "StderrRing",
    "StdioTarget",
    "Target",
    "TransportError",
    "WebSocketTarget",
    "connect",
]
