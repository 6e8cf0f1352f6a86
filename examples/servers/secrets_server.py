"""A stdio MCP server that spills secrets wherever it can, for the redaction tests.

    python examples/servers/secrets_server.py

On start it writes to stderr the value of $SERVICE_TOKEN (a secret the config gives it) and some
secret-shaped strings (a GitHub token, `password=...`, a bearer JWT, an AWS secret key, a JSON password, a
database URL with a password). Its tools put the same into its
stderr, into tool errors and into JSON-RPC errors:
  spill(text)        write `text` to stderr, then answer "spilled"
  fail_with(text)    a tool error (isError) whose message is `text`
  reject_with(text)  a JSON-RPC error whose message is `text` (not a tool result)
"""

from __future__ import annotations

import os
import sys

import anyio
import mcp_types as types
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
PASSWORD = "password=hunter2-correct-horse"
BEARER = "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
AWS = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
JSON_CONFIG = '{"user": "svc", "password": "json-pw-8d7f6e5c"}'
DSN = "postgres://svc:dsn-pw-1a2b3c@db.internal:5432/app"


def build_server() -> MCPServer:
    mcp = MCPServer("secrets", log_level="WARNING")
    ro = types.ToolAnnotations(read_only_hint=True)

    @mcp.tool(annotations=ro)
    async def spill(text: str) -> str:
        """Write text to stderr."""
        print(text, file=sys.stderr, flush=True)
        return "spilled"

    @mcp.tool(annotations=ro)
    async def fail_with(text: str) -> str:
        """Fail with this message (a tool error)."""
        raise ToolError(text)

    @mcp.tool(annotations=ro)
    async def reject_with(text: str) -> str:
        """Answer the request with a JSON-RPC error carrying this message."""
        raise MCPError(types.INTERNAL_ERROR, text)

    return mcp


def main() -> None:
    token = os.environ.get("SERVICE_TOKEN", "")
    print(f"secrets server starting; upstream credential {token}", file=sys.stderr, flush=True)
    print(f"using {GITHUB_TOKEN} and {PASSWORD}", file=sys.stderr, flush=True)
    print(f"forwarding {BEARER}", file=sys.stderr, flush=True)
    print(f"environment {AWS}; config {JSON_CONFIG}; database {DSN}", file=sys.stderr, flush=True)
    anyio.run(build_server().run_stdio_async)


if __name__ == "__main__":
    main()
