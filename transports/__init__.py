"""How to open an MCP session to one server: stdio, streamable HTTP, legacy SSE, WebSocket."""

from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget

__all__ = ["HttpTarget", "StdioTarget", "Target", "WebSocketTarget"]
