"""Where an MCP server lives and how to reach it: one frozen value per transport kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024
# The largest single message (stdio line, HTTP JSON body, SSE event, WebSocket message) a transport reads
# from a server: past it the message is dropped while it streams in, and the request it answers fails with
# MessageTooLarge. Tool outputs are cut to max_output_chars (64 K characters) anyway; a result's text is
# often sent twice (content and structuredContent), so 32 MiB still lets an 8 MiB text result through.
DEFAULT_MAX_MESSAGE_BYTES = 32 * MiB


@dataclass(frozen=True, slots=True)
class StdioTarget:
    """A server launched as a subprocess speaking JSON-RPC lines on stdin/stdout."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to the SDK's small safe allowlist
    cwd: str | None = None
    stderr_log: Path | None = None  # every stderr line is appended here when set
    stderr_lines: int = 200  # size of the in-memory ring of recent stderr lines
    eof_grace: float = 2.0  # seconds to wait for exit after stdin closes
    term_grace: float = 2.0  # seconds to wait after SIGTERM before SIGKILL
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # one stdout line at most


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    """How to obtain and keep tokens for an OAuth-protected HTTP/SSE server (the MCP authorization spec).

    Tokens live outside the config: in `token_file` (0600), or the OS keyring under `keyring_key`.
    """

    grant: Literal["authorization_code", "client_credentials"] = "authorization_code"
    client_id: str | None = None  # pre-registered client; else client ID metadata document or registration
    client_secret: str | None = None
    issuer: str | None = (
        None  # the authorization server a pre-registered client belongs to: only it gets the secret
    )
    scopes: tuple[str, ...] = ()  # requested on top of what the server asks for
    redirect_port: int = 0  # loopback port of `auth login`'s redirect listener; 0: an ephemeral one
    redirect_path: str = "/callback"
    client_metadata_url: str | None = None  # an https URL used as client_id where the server supports it
    client_name: str = "agent-runtime"
    token_file: Path | None = None
    keyring_key: str | None = None  # set: the OS keyring holds the tokens instead of token_file
    login_hint: str = "log in first"  # how a person gets tokens (the CLI names its `auth login` command)


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """A remote server over streamable HTTP (default) or the legacy HTTP+SSE transport."""

    url: str
    kind: Literal["streamable_http", "sse"] = "streamable_http"
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token: str | None = None
    oauth: OAuthSettings | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # one JSON response body or SSE event at most


@dataclass(frozen=True, slots=True)
class WebSocketTarget:
    """A remote server over WebSocket (subprotocol `mcp`, one JSON-RPC message per text frame)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token: str | None = None
    open_timeout: float = 10.0
    ping_interval: float | None = 20.0
    close_timeout: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # one WebSocket message at most


Target = StdioTarget | HttpTarget | WebSocketTarget
