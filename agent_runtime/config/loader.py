"""Load MCP server configs (Claude Desktop/Cursor, VS Code, mistral.rs, plus our sections) into RuntimeConfig.

Errors name the file, the JSON path and the line/column; secrets are recorded so every output can redact them.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

from agent_runtime.config.positions import JsonPath, Positions, format_path, parse_path, strip_jsonc
from agent_runtime.config.types import (
    DEFAULT_SERVER_LOG_LEVEL,
    ReconnectPolicy,
    RuntimeConfig,
    RuntimeSettings,
    ServerConfig,
    ServerTimeouts,
)
from agent_runtime.errors import ConfigError
from policies.roots import MAX_ROOTS, Root, RootError, make_root
from policies.sampling import SamplingPolicy
from policies.secrets import MIN_SECRET_LEN, is_secret_name
from transports.targets import HttpTarget, OAuthSettings, StdioTarget, Target, WebSocketTarget

if TYPE_CHECKING:  # pydantic (~0.1 s) is imported only when a file has entries or sections to validate
    from pydantic import BaseModel, ValidationError

    from agent_runtime.config import models as cm

ENV_VAR = "AGENT_RUNTIME_CONFIG"
STATE_DIR_ENV = "AGENT_RUNTIME_STATE_DIR"  # OAuth tokens live under it (else $XDG_STATE_HOME/agent-runtime)
DEFAULT_FILE = "MCP_CONFIG.json"
SECTION_KEYS = ("policies", "model", "agents")

M = TypeVar("M", bound="BaseModel")

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_-]{0,32}$")  # tool names the models emit allow only these characters
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Doc:
    """One source text being loaded: makes ConfigErrors that point into it."""

    def __init__(self, text: str, file: str | None) -> None:
        self.file = file
        self.text = text
        self.positions: Positions | None = None
        self.base_dir = Path(file).resolve().parent if file else Path.cwd()

    def error(
        self, path: JsonPath, reason: str, hint: str | None = None, *, key: bool = False
    ) -> ConfigError:
        line, col = self.positions.line_col(path, key=key) if self.positions else (None, None)
        return ConfigError(
            reason, hint, file=self.file, json_path=format_path(path) or None, line=line, column=col
        )


def _parse_json(doc: _Doc) -> Any:
    text = strip_jsonc(doc.text)

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        data = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid JSON: {exc.msg}",
            "check for a missing comma, quote or bracket near that position",
            file=doc.file,
            line=exc.lineno,
            column=exc.colno,
        ) from None
    except ValueError as exc:  # NaN / Infinity, which JSON does not allow
        raise ConfigError(f"invalid JSON: {exc} is not a JSON number", file=doc.file) from None
    doc.positions = Positions(text)
    if doc.positions.duplicates:
        dup = doc.positions.duplicates[0]
        raise doc.error(dup, f"duplicate key {dup[-1]!r}", "each key may appear once per object", key=True)
    return data


# ----------------------------------------------------------------------------------------------- ${...}


class _Interpolated:
    """Values substituted from `${env:...}`, by the JSON path of the string they landed in."""

    def __init__(self) -> None:
        self.by_path: dict[JsonPath, list[tuple[str, str]]] = {}  # path -> [(variable, value)]

    def under(self, prefix: JsonPath) -> Iterator[tuple[JsonPath, str, str]]:
        n = len(prefix)
        for path, items in self.by_path.items():
            if path[:n] == prefix:
                for name, value in items:
                    yield path, name, value


def _interpolate(doc: _Doc, node: Any, path: JsonPath, env: Mapping[str, str], seen: _Interpolated) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(doc, v, (*path, k), env, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(doc, v, (*path, i), env, seen) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"  # escape for a literal ${
        expr = m.group(1)
        if expr.startswith("env:"):
            name, sep, default = expr[4:].partition(":-")
            if not _ENV_NAME.match(name):
                raise doc.error(path, f"invalid variable name in ${{{expr}}}", "write ${env:NAME}")
            value = env.get(name)
            if not value and sep:  # shell semantics: the default applies when unset or empty
                return default
            if value is None:
                raise doc.error(
                    path,
                    f"environment variable {name} is not set",
                    f"export {name}=... or write ${{env:{name}:-default}}",
                )
            seen.by_path.setdefault(path, []).append((name, value))
            return value
        if expr == "workspaceFolder":
            return str(_workspace_folder(doc))
        if expr == "userHome":
            return str(Path.home())
        if expr.startswith("input:"):
            raise doc.error(
                path,
                f"${{{expr}}} (VS Code prompted input) is not supported",
                f"set an environment variable and write ${{env:{expr[6:] or 'NAME'}}}",
            )
        head = expr.partition(":-")[0]
        if _ENV_NAME.match(head):
            raise doc.error(path, f"${{{expr}}} is not interpolated", f"write ${{env:{expr}}}")
        raise doc.error(
            path,
            f"unsupported variable ${{{expr}}}",
            "supported: ${env:NAME}, ${env:NAME:-default}, ${workspaceFolder}, ${userHome}; $${ for a literal ${",
        )

    return _VAR.sub(substitute, node)


def _workspace_folder(doc: _Doc) -> Path:
    # VS Code keeps mcp.json in <workspace>/.vscode/
    return doc.base_dir.parent if doc.base_dir.name == ".vscode" else doc.base_dir


# ----------------------------------------------------------------------------------------------- validation

_MESSAGES: dict[str, str] = {
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "list_type": "expected an array",
    "finite_number": "expected a finite number",
}


def _is_comment(key: str) -> bool:
    """JSON has no comments; `"_comment": ...` and `"//": ...` keys (as in mistral.rs's examples) stand in."""
    return key.startswith(("_comment", "//"))


def _models() -> Any:
    from agent_runtime.config import (
        models,  # pydantic's import (~0.1 s) only when there is something to validate
    )

    return models


def _validate(doc: _Doc, model: type[M], data: Any, path: JsonPath) -> M:
    if not isinstance(data, dict):
        raise doc.error(path, "expected an object")
    from pydantic import ValidationError

    try:
        return model.model_validate({k: v for k, v in data.items() if not _is_comment(k)})
    except ValidationError as exc:
        raise _pydantic_error(doc, exc, path, model) from None


def _pydantic_error(doc: _Doc, exc: ValidationError, path: JsonPath, model: type[BaseModel]) -> ConfigError:
    err = exc.errors(include_url=False, include_input=False)[0]  # one line per error: the first one
    loc = (*path, *err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        owner = _model_at(model, err["loc"][:-1])
        fields = list(owner.model_fields) if owner else []
        close = _suggest(str(loc[-1]), fields)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hint += f"known keys: {', '.join(fields)}" if fields else ""
        return doc.error(loc, f"unknown key {loc[-1]!r}", hint or None, key=True)
    if kind == "missing":
        return doc.error(loc[:-1], f"missing required key {loc[-1]!r}")
    if kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than_equal": "<="}[kind]
        bound = ctx.get("gt", ctx.get("ge", ctx.get("le")))
        return doc.error(loc, f"must be {op} {bound:g}" if isinstance(bound, int | float) else err["msg"])
    reason = _MESSAGES.get(kind, err["msg"])
    tip = None
    if kind == "string_type":
        tip = 'quote the value, e.g. "8080"'
    return doc.error(loc, reason, tip)


_ALIASES = {
    "cwd": "work_dir",
    "work_dir": "cwd",
    "transport": "type",
    "disabled": "enabled",
    "timeout": "timeouts",
}


def _suggest(key: str, fields: list[str]) -> list[str]:
    """The known key a misspelt or other-dialect key most likely meant."""
    if _ALIASES.get(key) in fields:
        return [_ALIASES[key]]
    prefixed = [f for f in fields if f.startswith(f"{key}_")]  # `tool` -> `tool_secs`
    return prefixed[:1] or difflib.get_close_matches(key, fields, n=1)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class that owns the field at `loc` (for listing its known keys)."""
    from pydantic import BaseModel

    current: Any = model
    for part in loc:
        info = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        if info is None:
            return None
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        current = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


# ----------------------------------------------------------------------------------------------- dialects

_TRANSPORTS = {
    "stdio": "stdio",
    "http": "streamable_http",
    "streamable_http": "streamable_http",
    "streamable-http": "streamable_http",
    "streamablehttp": "streamable_http",
    "sse": "sse",
    "websocket": "websocket",
    "ws": "websocket",
}


@dataclass(slots=True)
class _Spec:
    """One server entry reduced to what every dialect has in common, before targets are built."""

    name: str
    path: JsonPath
    source: str
    common: cm.Common
    transport: str = "stdio"
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    source_timeout: float | None = None  # mistral.rs per-source timeout_secs
    enabled: bool = True
    tool_prefix: str | None = None
    key_paths: dict[str, JsonPath] = field(default_factory=dict)  # where command/url/env/... were written

    def __post_init__(self) -> None:
        self.enabled = True if self.common.enabled is None else self.common.enabled
        self.tool_prefix = self.common.tool_prefix


def _transport_of(doc: _Doc, path: JsonPath, value: str | None) -> str | None:
    if value is None:
        return None
    kind = _TRANSPORTS.get(value.lower().replace(" ", ""))
    if kind is None:
        raise doc.error(
            path, f"unknown transport {value!r}", "use one of stdio, http (streamable HTTP), sse, websocket"
        )
    return kind


def _claude_like(doc: _Doc, entries: Any, key: str, dialect: str) -> list[_Spec]:
    if not isinstance(entries, dict):
        raise doc.error((key,), "expected an object mapping server names to servers")
    specs: list[_Spec] = []
    if not entries:
        return specs
    cm = _models()
    model = cm.ClaudeServer if dialect == "mcpServers" else cm.VSCodeServer
    for raw_name, entry in entries.items():
        path = (key, raw_name)
        if _is_comment(raw_name):
            continue  # a comment entry
        m = _validate(doc, model, entry, path)
        spec = _Spec(raw_name, path, dialect, m)
        declared = None
        if isinstance(m, cm.ClaudeServer):
            t1 = _transport_of(doc, (*path, "transport"), m.transport)
            t2 = _transport_of(doc, (*path, "type"), m.type)
            if t1 and t2 and t1 != t2:
                raise doc.error((*path, "type"), f"type {m.type!r} contradicts transport {m.transport!r}")
            declared = t1 or t2
            if m.disabled is not None:
                if m.enabled is not None and m.enabled == m.disabled:
                    raise doc.error((*path, "disabled"), "disabled contradicts enabled")
                spec.enabled = not m.disabled
        else:
            declared = _transport_of(doc, (*path, "type"), m.type)
        if m.command is not None and m.url is not None:
            raise doc.error(path, "a server has either 'command' (stdio) or 'url' (remote), not both")
        if m.command is None and m.url is None:
            raise doc.error(path, "a server needs 'command' (stdio) or 'url' (remote)")
        if m.command is not None:
            if declared not in (None, "stdio"):
                raise doc.error(path, f"transport {declared} needs 'url', not 'command'")
            spec.transport = "stdio"
            spec.command, spec.args, spec.env, spec.cwd = m.command, tuple(m.args), dict(m.env), m.cwd
            for key_name, present in (("headers", m.headers), ("bearer_token", m.bearer_token)):
                if present:
                    raise doc.error(
                        (*path, key_name),
                        f"{key_name} applies to remote servers, not stdio",
                        "pass credentials to a stdio server through env",
                    )
        else:
            assert m.url is not None
            if declared == "stdio":
                raise doc.error(path, "transport stdio needs 'command', not 'url'")
            spec.url, spec.headers = m.url, dict(m.headers)
            spec.transport = declared or _transport_for_url(m.url)
            for key_name, present in (("args", m.args), ("env", m.env), ("cwd", m.cwd)):
                if present:
                    raise doc.error(
                        (*path, key_name), f"{key_name} applies to stdio servers, not remote ones"
                    )
        spec.key_paths = {k: (*path, k) for k in ("command", "args", "env", "cwd", "url", "headers")}
        specs.append(spec)
    return specs


def _mistral(doc: _Doc, entries: list[Any]) -> list[_Spec]:
    specs: list[_Spec] = []
    if not entries:
        return specs
    cm = _models()
    for i, entry in enumerate(entries):
        path: JsonPath = ("servers", i)
        m = _validate(doc, cm.MistralServer, entry, path)
        name = m.name if m.name is not None else m.id
        if name is None:
            raise doc.error(path, "missing required key 'name'")
        spec = _Spec(name, path, "mistral.rs", m)
        spath = (*path, "source")
        kind = m.source.get("type")
        if kind == "Process":
            p = _validate(doc, cm.MistralProcess, m.source, spath)
            spec.transport = "stdio"
            spec.command, spec.args, spec.env, spec.cwd = (
                p.command,
                tuple(p.args),
                dict(p.env or {}),
                p.work_dir,
            )
            if m.bearer_token is not None:
                raise doc.error(
                    (*path, "bearer_token"),
                    "bearer_token applies to Http and WebSocket sources, not Process",
                    "pass credentials to a process through source.env",
                )
        elif kind in ("Http", "WebSocket"):
            r = _validate(doc, cm.MistralRemote, m.source, spath)
            spec.url, spec.headers, spec.source_timeout = r.url, dict(r.headers or {}), r.timeout_secs
            spec.transport = "streamable_http" if kind == "Http" else "websocket"
        else:
            shown = f" {kind!r}" if isinstance(kind, str) else ""
            raise doc.error(
                (*spath, "type") if "type" in m.source else spath,
                f"unknown source type{shown}",
                "use Process, Http or WebSocket",
            )
        if m.tool_prefix is not None:
            spec.tool_prefix = f"{m.tool_prefix}_"  # mistral.rs joins prefix and tool name with '_'
        spec.key_paths = {
            "command": (*spath, "command"),
            "args": (*spath, "args"),
            "env": (*spath, "env"),
            "cwd": (*spath, "work_dir"),
            "url": (*spath, "url"),
            "headers": (*spath, "headers"),
        }
        specs.append(spec)
    return specs


def _transport_for_url(url: str) -> str:
    return "websocket" if url.lower().startswith(("ws://", "wss://")) else "streamable_http"


# ----------------------------------------------------------------------------------------------- building


def _normalise_name(name: str) -> str:
    out = _NAME_BAD.sub("_", name.strip())
    # no hidden or `..` names: names become log file names
    return "_" + out[1:] if out.startswith(".") else out


def _timeouts(
    doc: _Doc, spec: _Spec, runtime: RuntimeSettings, runtime_tool_explicit: bool
) -> ServerTimeouts:
    t = spec.common.timeouts or _models().Timeouts()
    tpath = (*spec.path, "timeouts")
    base = ServerTimeouts()
    tool = t.tool_secs or spec.source_timeout or runtime.tool_timeout
    request = t.request_secs or spec.source_timeout or base.request
    # Unset values bend to keep the cascade; values the user wrote must already satisfy it.
    half_startup = t.startup_secs / 2 if t.startup_secs else float("inf")
    connect = t.connect_secs or min(base.connect, request, tool, half_startup)
    startup = t.startup_secs or max(base.startup, 2 * connect)
    if t.connect_secs is not None:
        if connect >= startup:
            raise doc.error(
                (*tpath, "connect_secs"),
                f"connect_secs ({connect:g}) must be less than startup_secs ({startup:g})",
                "startup covers connecting plus initialize and the first tools/list",
            )
        for label, value, where in (
            ("request_secs", request, "timeouts.request_secs" if t.request_secs else "the default"),
            ("tool_secs", tool, _tool_origin(t, spec, runtime_tool_explicit)),
        ):
            if connect > value:
                raise doc.error(
                    (*tpath, "connect_secs"),
                    f"connect_secs ({connect:g}) exceeds {label} ({value:g}, from {where})",
                    "timeouts cascade: connect <= request and connect <= tool",
                )
    return ServerTimeouts(
        startup=startup, connect=connect, request=request, tool=tool, per_tool=dict(t.per_tool)
    )


def _tool_origin(t: cm.Timeouts, spec: _Spec, runtime_tool_explicit: bool) -> str:
    if t.tool_secs:
        return "timeouts.tool_secs"
    if spec.source_timeout:
        return "source.timeout_secs"
    return "runtime.tool_timeout_secs" if runtime_tool_explicit else "the default"


def _check_url(doc: _Doc, spec: _Spec) -> None:
    assert spec.url is not None
    path = spec.key_paths["url"]
    parts = urlsplit(spec.url)
    allowed = ("ws", "wss") if spec.transport == "websocket" else ("http", "https")
    if parts.scheme.lower() not in allowed or not parts.hostname:
        want = "ws:// or wss://" if spec.transport == "websocket" else "http:// or https://"
        label = {"streamable_http": "a streamable HTTP", "sse": "an SSE", "websocket": "a WebSocket"}[
            spec.transport
        ]
        raise doc.error(
            path, f"{label} server needs an absolute {want} URL", f"e.g. {want.split()[0]}host/mcp"
        )


def _secrets_of(doc: _Doc, spec: _Spec, seen: _Interpolated) -> tuple[str, ...]:
    found: list[str] = []
    if spec.common.bearer_token:
        found.append(spec.common.bearer_token)
    if spec.common.auth is not None and spec.common.auth.client_secret:
        found.append(spec.common.auth.client_secret)
    for header, value in spec.headers.items():
        if is_secret_name(header):
            found.append(value)
            scheme, _, credential = value.partition(" ")
            if credential and scheme.lower() in ("bearer", "basic", "token"):
                found.append(credential.strip())
    found.extend(v for k, v in spec.env.items() if is_secret_name(k))
    if spec.url:
        parts = urlsplit(spec.url)
        if parts.password:
            found.append(parts.password)
        found.extend(v for k, v in parse_qsl(parts.query) if is_secret_name(k))
    secret_keys = ("env", "headers")
    secret_paths = [spec.key_paths.get(k, ()) for k in secret_keys] + [
        (*spec.path, "bearer_token"),
        (*spec.path, "auth", "client_secret"),
    ]
    for path, var, value in seen.under(spec.path):
        in_secret_field = any(p and path[: len(p)] == p for p in secret_paths)
        if in_secret_field or is_secret_name(var):
            found.append(value)
    unique = dict.fromkeys(s for s in found if len(s) >= MIN_SECRET_LEN)
    return tuple(sorted(unique, key=len, reverse=True))


def state_dir(env: Mapping[str, str]) -> Path:
    """Where per-user state (OAuth tokens) lives: $AGENT_RUNTIME_STATE_DIR, else
    $XDG_STATE_HOME/agent-runtime, else ~/.local/state/agent-runtime."""
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV]).expanduser()
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]).expanduser() / "agent-runtime"
    return Path.home() / ".local" / "state" / "agent-runtime"


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _oauth(doc: _Doc, spec: _Spec, name: str, env: Mapping[str, str]) -> OAuthSettings:
    a = spec.common.auth
    assert a is not None
    path = (*spec.path, "auth")
    if spec.common.bearer_token is not None:
        raise doc.error(
            (*spec.path, "bearer_token"), "both bearer_token and auth are set", "keep one of them"
        )
    if any(h.lower() == "authorization" for h in spec.headers):
        raise doc.error(path, "both auth and an Authorization header are set", "keep one of them")
    if a.grant == "client_credentials" and not (a.client_id and a.client_secret):
        raise doc.error(
            (*path, "client_id" if not a.client_id else "client_secret"),
            "the client_credentials grant needs client_id and client_secret",
            'e.g. "client_secret": "${env:MY_CLIENT_SECRET}"',
        )
    if a.client_secret and not a.client_id:
        raise doc.error((*path, "client_secret"), "client_secret without client_id")
    if a.issuer is not None and (
        urlsplit(a.issuer).scheme not in ("http", "https") or not urlsplit(a.issuer).netloc
    ):
        raise doc.error((*path, "issuer"), "issuer must be the authorization server's http(s) URL")
    if a.client_metadata_url is not None:
        parts = urlsplit(a.client_metadata_url)
        if parts.scheme != "https" or parts.path in ("", "/"):
            raise doc.error(
                (*path, "client_metadata_url"),
                "client_metadata_url must be an https URL with a path",
                "e.g. https://example.com/agent-runtime/client.json",
            )
    port, redirect_path = a.redirect_port, "/callback"
    if a.redirect_uri is not None:
        parts = urlsplit(a.redirect_uri)
        host = (parts.hostname or "").lower()
        if parts.scheme != "http" or host not in _LOOPBACK:
            raise doc.error(
                (*path, "redirect_uri"),
                f"redirect_uri {a.redirect_uri!r} is not a loopback http URL",
                "use http://127.0.0.1:PORT/callback: the login listens on this machine only",
            )
        if a.redirect_port and parts.port != a.redirect_port:
            raise doc.error((*path, "redirect_port"), "redirect_port contradicts redirect_uri")
        port, redirect_path = parts.port or 0, parts.path or "/"
    return OAuthSettings(
        grant=a.grant,
        client_id=a.client_id,
        client_secret=a.client_secret,
        issuer=a.issuer,
        scopes=tuple(a.scopes),
        redirect_port=port,
        redirect_path=redirect_path,
        client_metadata_url=a.client_metadata_url,
        token_file=state_dir(env) / "oauth" / f"{name}.json" if a.store == "file" else None,
        keyring_key=name if a.store == "keyring" else None,
        login_hint=f"run `agent-runtime auth login {name}`",
    )


def _build_server(
    doc: _Doc, spec: _Spec, name: str, runtime: RuntimeSettings, explicit_tool: bool, env: Mapping[str, str]
) -> ServerConfig:
    c = spec.common
    timeouts = _timeouts(doc, spec, runtime, explicit_tool)
    max_message = c.max_message_bytes or runtime.max_message_bytes
    target: Target
    if c.auth is not None and spec.transport in ("stdio", "websocket"):
        raise doc.error(
            (*spec.path, "auth"),
            f"auth applies to HTTP and SSE servers, not {spec.transport}",
            "pass credentials to a stdio server through env" if spec.transport == "stdio" else None,
        )
    if spec.transport == "stdio":
        assert spec.command is not None
        if not spec.command.strip():
            raise doc.error(spec.key_paths["command"], "command is empty")
        if " " in spec.command.strip() and not spec.args and not Path(spec.command).exists():
            raise doc.error(
                spec.key_paths["command"],
                "command contains spaces but no such file exists",
                f"put the arguments in args: {json.dumps(shlex.split(spec.command)[1:])}",
            )
        for key in spec.env:
            if not _ENV_NAME.match(key):
                raise doc.error((*spec.key_paths["env"], key), f"invalid environment variable name {key!r}")
        cwd = str(_resolve(doc, spec.cwd)) if spec.cwd else None
        kw: dict[str, Any] = {"max_message_bytes": max_message}
        if c.kill_grace_secs is not None:
            kw["term_grace"] = c.kill_grace_secs
        stderr_log = runtime.log_dir / f"{name}.log" if runtime.log_dir else None
        target = StdioTarget(
            command=spec.command, args=spec.args, env=spec.env, cwd=cwd, stderr_log=stderr_log, **kw
        )
    else:
        if c.kill_grace_secs is not None:
            raise doc.error((*spec.path, "kill_grace_secs"), "kill_grace_secs applies to stdio servers only")
        _check_url(doc, spec)
        assert spec.url is not None
        if c.bearer_token is not None and any(h.lower() == "authorization" for h in spec.headers):
            raise doc.error(
                (*spec.path, "bearer_token"),
                "both bearer_token and an Authorization header are set",
                "keep one of them",
            )
        longest = max([timeouts.request, timeouts.tool, *timeouts.per_tool.values()])
        if spec.transport == "websocket":
            target = WebSocketTarget(
                url=spec.url,
                headers=spec.headers,
                bearer_token=c.bearer_token,
                open_timeout=timeouts.connect,
                max_message_bytes=max_message,
            )
        else:
            default_read = cast(float, HttpTarget.__dataclass_fields__["read_timeout"].default)
            target = HttpTarget(
                url=spec.url,
                kind="sse" if spec.transport == "sse" else "streamable_http",
                headers=spec.headers,
                bearer_token=c.bearer_token,
                oauth=_oauth(doc, spec, name, env) if c.auth is not None else None,
                connect_timeout=timeouts.connect,
                # a stream must not be cut by the read timeout before the slowest tool's own deadline
                read_timeout=max(default_read, longest),
                max_message_bytes=max_message,
            )
    sampling = SamplingPolicy()
    if c.sampling is not None:
        sampling = SamplingPolicy(
            allow=c.sampling.allow,
            max_tokens=c.sampling.max_tokens,
            approval=c.sampling.approval,
            models=dict(c.sampling.models),
        )
    return ServerConfig(
        name=name,
        target=target,
        enabled=spec.enabled,
        tool_prefix=spec.tool_prefix,
        timeouts=timeouts,
        max_concurrent_calls=c.max_concurrent_calls,
        trusted=c.trusted,
        log_level=c.log_level if c.log_level is not None else DEFAULT_SERVER_LOG_LEVEL,
        secrets=(),  # filled by the caller, which knows what was interpolated
        source=spec.source,
        sampling=sampling,
        elicitation=c.elicitation or "decline",
        roots=_roots(doc, c.roots, (*spec.path, "roots")) if c.roots is not None else None,
    )


def _roots(doc: _Doc, entries: Sequence[Any], path: JsonPath) -> tuple[Root, ...]:
    """Configured roots as file:// URIs (paths relative to the config file); located errors for bad ones."""
    if len(entries) > MAX_ROOTS:
        raise doc.error(path, f"{len(entries)} roots (at most {MAX_ROOTS})")
    roots: list[Root] = []
    for i, entry in enumerate(entries):
        value, name = (entry, None) if isinstance(entry, str) else (entry.path, entry.name)
        try:
            roots.append(make_root(value, base=doc.base_dir, name=name))
        except RootError as exc:
            raise doc.error((*path, i), exc.reason, exc.hint) from None
    return tuple(roots)


def _resolve(doc: _Doc, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (doc.base_dir / p)


def _runtime(doc: _Doc, data: dict[str, Any], mistral: bool) -> tuple[RuntimeSettings, bool]:
    if "runtime" not in data and not mistral:
        return RuntimeSettings(), False  # what validating an empty section gives, without pydantic
    cm = _models()
    raw = data.get("runtime", {})
    r = _validate(doc, cm.RuntimeSection, raw, ("runtime",))
    if mistral:
        top = {
            k: data[k]
            for k in ("tool_timeout_secs", "max_concurrent_calls", "auto_register_tools")
            if k in data
        }
        m = _validate(doc, cm.MistralTop, top, ())
        # mistral.rs's max_concurrent_calls caps calls across all servers: our global limit
        for ours, theirs, value in (
            ("tool_timeout_secs", "tool_timeout_secs", m.tool_timeout_secs),
            ("max_concurrent_calls_global", "max_concurrent_calls", m.max_concurrent_calls),
        ):
            if value is not None and getattr(r, ours) is not None and getattr(r, ours) != value:
                raise doc.error(
                    ("runtime", ours), f"runtime.{ours} contradicts top-level {theirs}", "set it in one place"
                )
        r = r.model_copy(
            update={
                "tool_timeout_secs": r.tool_timeout_secs or m.tool_timeout_secs,
                "max_concurrent_calls_global": r.max_concurrent_calls_global or m.max_concurrent_calls,
            }
        )
        if m.auto_register_tools is False:
            raise doc.error(
                ("auto_register_tools",),
                "auto_register_tools false is not supported: every tool of a server is registered",
                "remove the key; choose what an agent sees with agents.<name>.tools globs",
            )
    base = RuntimeSettings()
    rc = r.reconnect
    if rc.initial_delay_secs > rc.max_delay_secs:
        raise doc.error(
            ("runtime", "reconnect", "initial_delay_secs"),
            f"initial_delay_secs ({rc.initial_delay_secs:g}) exceeds max_delay_secs ({rc.max_delay_secs:g})",
        )
    per_server = r.max_concurrent_calls or base.max_concurrent_calls
    global_cap = r.max_concurrent_calls_global or base.max_concurrent_calls_global
    if per_server > global_cap:
        raise doc.error(
            ("runtime", "max_concurrent_calls"),
            f"max_concurrent_calls ({per_server}) exceeds max_concurrent_calls_global ({global_cap})",
            "the per-server limit must fit inside the global one",
        )
    settings = RuntimeSettings(
        tool_timeout=r.tool_timeout_secs or base.tool_timeout,
        max_concurrent_calls=per_server,
        max_concurrent_calls_global=global_cap,
        shutdown_timeout=r.shutdown_timeout_secs,
        reconnect=ReconnectPolicy(
            initial_delay=rc.initial_delay_secs,
            max_delay=rc.max_delay_secs,
            multiplier=rc.multiplier,
            jitter=rc.jitter,
        ),
        log_dir=_resolve(doc, r.log_dir) if r.log_dir else None,
        max_message_bytes=r.max_message_bytes or base.max_message_bytes,
        roots=_roots(doc, r.roots, ("runtime", "roots")),
    )
    return settings, r.tool_timeout_secs is not None


_OWN_TOP = ("runtime", *SECTION_KEYS)
_TOLERATED_TOP = ("inputs", "$schema")
_MISTRAL_TOP = ("tool_timeout_secs", "max_concurrent_calls", "auto_register_tools")


def _build(doc: _Doc, data: Any, env: Mapping[str, str]) -> RuntimeConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            "the top level must be a JSON object",
            'e.g. {"mcpServers": {}}',
            file=doc.file,
            line=1 if doc.positions else None,
            column=1 if doc.positions else None,
        )
    if "mcpServers" in data and "servers" in data:
        raise doc.error(
            ("servers",),
            "both 'mcpServers' and 'servers' are present",
            "use one format per file: mcpServers (Claude Desktop), servers (VS Code or mistral.rs)",
            key=True,
        )
    servers_raw = data.get("servers")
    mistral = isinstance(servers_raw, list)
    known = ("mcpServers", "servers", *_OWN_TOP, *_TOLERATED_TOP, *(_MISTRAL_TOP if mistral else ()))
    for key in data:
        if key not in known and not _is_comment(key):
            hint = f"known top-level keys: {', '.join(k for k in known if k not in _TOLERATED_TOP)}"
            if key in _MISTRAL_TOP:
                hint = f"{key} belongs to the mistral.rs format (servers as a list); here set runtime.{key}"
            raise doc.error((key,), f"unknown top-level key {key!r}", hint, key=True)
    seen = _Interpolated()
    data = _interpolate(doc, data, (), env, seen)
    runtime, explicit_tool = _runtime(doc, data, mistral)

    if "mcpServers" in data:
        specs = _claude_like(doc, data["mcpServers"], "mcpServers", "mcpServers")
    elif mistral:
        specs = _mistral(doc, data["servers"])
    elif "servers" in data:
        specs = _claude_like(doc, data["servers"], "servers", "vscode")
    else:
        specs = []

    servers: list[ServerConfig] = []
    names: dict[str, JsonPath] = {}
    prefixes: dict[str, str] = {}
    for spec in specs:
        name = _normalise_name(spec.name)
        name_path = spec.path if spec.source != "mistral.rs" else (*spec.path, "name")
        if not name or not name.strip("_"):
            raise doc.error(name_path, "server name is empty", key=spec.source != "mistral.rs")
        if len(name) > 64:
            raise doc.error(
                name_path, "server name is longer than 64 characters", key=spec.source != "mistral.rs"
            )
        if name in names:
            raise doc.error(
                name_path,
                f"duplicate server name {name!r} (also {format_path(names[name])})",
                "names are normalised to letters, digits, '_', '.', '-': rename one of them",
                key=spec.source != "mistral.rs",
            )
        names[name] = spec.path
        if spec.tool_prefix is not None and not _PREFIX_OK.match(spec.tool_prefix):
            raise doc.error(
                (*spec.path, "tool_prefix"),
                "tool_prefix must be at most 32 letters, digits, '_' or '-'",
                "model tool names allow only [A-Za-z0-9_-]",
            )
        server = _build_server(doc, spec, name, runtime, explicit_tool, env)
        if server.prefix:
            if server.prefix in prefixes:
                raise doc.error(
                    (*spec.path, "tool_prefix"),
                    f"tool prefix {server.prefix!r} is also used by server {prefixes[server.prefix]!r}",
                    "tool names of the two servers would collide: give each a distinct tool_prefix",
                )
            prefixes[server.prefix] = name
        secrets = _secrets_of(doc, spec, seen)
        servers.append(replace(server, secrets=secrets))
    sections = {k: data[k] for k in SECTION_KEYS if k in data}
    return RuntimeConfig(
        servers=tuple(servers),
        runtime=runtime,
        path=Path(doc.file).resolve() if doc.file else None,
        sections=sections,
    )


# ----------------------------------------------------------------------------------------------- public API


def parse_config(
    text: str, *, file: str | None = None, env: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """Validate config `text` (any supported format) and normalise it; raises ConfigError."""
    doc = _Doc(text.removeprefix("\ufeff"), file)
    data = _parse_json(doc)
    return _build(doc, data, os.environ if env is None else env)


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Read and validate the config file at `path`; raises ConfigError (missing file included)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "config file not found",
            'create it, e.g. {"mcpServers": {"time": {"command": "mcp-server-time"}}} (see docs/config.md)',
            file=str(p),
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{str(p)!r} is a directory, not a config file", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", file=str(p)) from None
    return parse_config(text, file=str(p), env=env)


def default_config_path() -> Path | None:
    """./MCP_CONFIG.json when present, else $AGENT_RUNTIME_CONFIG when set, else None."""
    local = Path.cwd() / DEFAULT_FILE
    if local.is_file():
        return local
    from_env = os.environ.get(ENV_VAR)
    return Path(from_env).expanduser() if from_env else None


_INTERPRETERS = {
    "python",
    "python3",
    "node",
    "npx",
    "uvx",
    "uv",
    "pipx",
    "deno",
    "bun",
    "bunx",
    "pnpm",
    "sh",
    "bash",
}


def _adhoc_name(argv: Sequence[str]) -> str:
    """A readable name for `--stdio "..."`: the script, module or package for interpreters, else the command."""
    stem = PurePath(argv[0]).name.removesuffix(".exe")
    if re.sub(r"[\d.]+$", "", stem) in _INTERPRETERS:
        rest = list(argv[1:])
        for i, arg in enumerate(rest):
            if arg in ("-m", "--from") and i + 1 < len(rest):
                return rest[i + 1].rsplit(".", 1)[-1]  # a module's last part: dots make poor tool prefixes
            if arg == "run" or arg.startswith("-"):
                continue
            package = PurePath(arg).name
            package = (
                package.rsplit("@", 1)[0] if package.count("@") and not package.startswith("@") else package
            )
            return PurePath(package).stem or package
    return PurePath(stem).stem if stem.endswith(".py") else stem


def adhoc_config(
    *,
    stdio: Sequence[str] = (),
    url: Sequence[str] = (),
    sse: Sequence[str] = (),
    ws: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    bearer_token: str | None = None,
) -> RuntimeConfig:
    """Servers from CLI flags: `--stdio "cmd args"` (shlex-split, no shell), `--url`, `--sse`, `--ws`."""
    entries: dict[str, Any] = {}

    def add(base: str, entry: dict[str, Any]) -> None:
        name = _normalise_name(base) or "server"
        candidate, n = name, 2
        while candidate in entries:
            candidate, n = f"{name}-{n}", n + 1
        entries[candidate] = entry

    for command in stdio:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(f"--stdio {command!r}: {exc}", "quote the command like a shell would") from None
        if not argv:
            raise ConfigError(
                "--stdio needs a command", 'e.g. --stdio "mcp-server-time --local-timezone UTC"'
            )
        add(_adhoc_name(argv), {"command": argv[0], "args": argv[1:]})
    remote = dict(headers or {})
    for flag, urls, transport in (("--url", url, "http"), ("--sse", sse, "sse"), ("--ws", ws, "websocket")):
        for u in urls:
            host = urlsplit(u).hostname
            if not host:
                raise ConfigError(
                    f"{flag} {u!r} is not an absolute URL", f"e.g. {flag} http://127.0.0.1:8000/mcp"
                )
            entry: dict[str, Any] = {"url": u, "transport": transport, "headers": remote}
            if bearer_token:
                entry["bearer_token"] = bearer_token
            add(host, entry)
    doc = _Doc(json.dumps({"mcpServers": entries}), None)
    doc.positions = None
    try:
        config = _build(doc, {"mcpServers": entries}, {})
    except ConfigError as exc:  # re-word: the user wrote flags, not JSON
        raw = exc.reason.removeprefix(f"{exc.json_path}: ") if exc.json_path else exc.reason
        where = parse_path(exc.json_path)[1] if exc.json_path else None
        raise ConfigError(f"server {where!r}: {raw}" if where else raw, exc.hint) from None
    servers = tuple(replace(s, source="cli") for s in config.servers)
    return RuntimeConfig(servers=servers, runtime=config.runtime)


def section_error(config: RuntimeConfig, json_path: str, reason: str, hint: str | None = None) -> ConfigError:
    """A ConfigError for a later layer's section (policies, model, agents) that points into the file."""
    file = str(config.path) if config.path else None
    line = column = None
    if config.path is not None:
        try:
            path = parse_path(json_path)
            text = config.path.read_text(encoding="utf-8").removeprefix("\ufeff")
            line, column = Positions(strip_jsonc(text)).line_col(path)
        except (OSError, ValueError, UnicodeDecodeError, IndexError):
            pass  # the message still names the file and the JSON path
    return ConfigError(reason, hint, file=file, json_path=json_path, line=line, column=column)
