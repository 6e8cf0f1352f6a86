"""How to open an MCP session to one server: stdio, streamable HTTP, legacy SSE, WebSocket."""

from transports.connect import Connection, connect
from transports.errors import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ServerRequestError,
    StartupTimeout,
    TransportError,
)
from transports.stdio import StderrRing
from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget

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
