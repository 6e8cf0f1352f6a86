"""The secrets a config holds (recorded while loading, plus secret-named strings of its sections), and servers'
targets shown with them masked. Redaction itself is `policies.secrets.redact`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent_runtime.config.types import RuntimeConfig, ServerConfig
from policies.secrets import MIN_SECRET_LEN, REDACTED, is_secret_name, redact
from transports.targets import StdioTarget, WebSocketTarget


def secret_values(config: RuntimeConfig) -> list[str]:
    """Every secret the config holds: servers' recorded secrets and secret-keyed strings of the sections."""
    found = {s for server in config.servers for s in server.secrets}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and is_secret_name(key) and len(node) >= MIN_SECRET_LEN:
            found.add(node)

    walk(config.sections, "")
    return sorted(found, key=len, reverse=True)  # longest first, so a secret inside another goes too


def redact_config(text: str, config: RuntimeConfig) -> str:
    """`policies.secrets.redact` with every secret value `config` holds."""
    return redact(text, secret_values(config))


def redacted_target(server: ServerConfig, redactor: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The target of `server` as plain JSON data with secret fields masked (for display)."""
    clean = redactor or (lambda s: s)
    t = server.target
    if isinstance(t, StdioTarget):
        return {
            "transport": "stdio",
            "command": clean(t.command),
            "args": [clean(a) for a in t.args],
            "env": {k: REDACTED if is_secret_name(k) else clean(v) for k, v in t.env.items()},
            "cwd": t.cwd,
        }
    out: dict[str, Any] = {
        "transport": "websocket" if isinstance(t, WebSocketTarget) else t.kind,
        "url": clean(t.url),
        "headers": {k: REDACTED if is_secret_name(k) else clean(v) for k, v in t.headers.items()},
        "bearer_token": REDACTED if t.bearer_token else None,
    }
    if not isinstance(t, WebSocketTarget) and t.oauth is not None:
        out["auth"] = {
            "type": "oauth",
            "grant": t.oauth.grant,
            "client_id": t.oauth.client_id,
            "client_secret": REDACTED if t.oauth.client_secret else None,
            "scopes": list(t.oauth.scopes),
            "tokens": str(t.oauth.token_file) if t.oauth.token_file else "keyring",
        }
    return out
