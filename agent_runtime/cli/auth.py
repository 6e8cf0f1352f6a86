"""`agent-runtime auth login|status|logout`: OAuth tokens of the configured HTTP/SSE servers (the browser
login on a loopback redirect, what is stored, forgetting it). Never prints a token."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from agent_runtime.errors import AgentRuntimeError, ConfigError

if TYPE_CHECKING:
    from agent_runtime.config import RuntimeConfig
    from transports.targets import HttpTarget
    from transports.tokens import StoredGrant

# The transports' OAuth module imports the MCP SDK: it loads inside run(), never for building the parser.

DEFAULT_LOGIN_TIMEOUT = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="auth_action", metavar="ACTION", required=True)
    login = sub.add_parser(
        "login",
        help="log in to an OAuth-protected server (opens the browser)",
        description="Discover the server's authorization server, register if needed, open the browser (or "
        "print the URL) and wait for the redirect on 127.0.0.1; the tokens are stored outside the config.",
    )
    login.add_argument("server", metavar="SERVER", help="the server's name in the config")
    login.add_argument("--no-browser", action="store_true", help="print the URL instead of opening a browser")
    login.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_LOGIN_TIMEOUT,
        metavar="SECS",
        help=f"give up after this many seconds (default {DEFAULT_LOGIN_TIMEOUT:g})",
    )
    status = sub.add_parser("status", help="show the stored OAuth tokens' state (never the tokens)")
    status.add_argument(
        "server", nargs="?", metavar="SERVER", help="one server (default: every OAuth server)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    logout = sub.add_parser("logout", help="delete a server's stored OAuth tokens")
    logout.add_argument("server", metavar="SERVER", help="the server's name in the config")
    for cmd in (login, status, logout):
        cmd.add_argument("--config", metavar="FILE", help="config file (default: the user config file)")


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.auth_action == "login":
        return _login(config, args)
    if args.auth_action == "status":
        return _status(config, args)
    return _logout(config, args)


def _config(args: argparse.Namespace) -> RuntimeConfig:
    from agent_runtime.config import default_config_path, load_config

    path = args.config or default_config_path()
    if path is None:
        raise ConfigError(
            "no config file: ./MCP_CONFIG.json does not exist and $AGENT_RUNTIME_CONFIG is not set",
            "pass --config FILE",
        )
    return load_config(path)


def _oauth_servers(config: RuntimeConfig) -> list[tuple[str, HttpTarget]]:
    from transports.targets import HttpTarget

    return [
        (s.name, s.target)
        for s in config.servers
        if isinstance(s.target, HttpTarget) and s.target.oauth is not None
    ]


def _target(config: RuntimeConfig, name: str) -> HttpTarget:
    servers = dict(_oauth_servers(config))
    if name in servers:
        return servers[name]
    known = ", ".join(servers) or "none"
    what = (
        "has no OAuth (`auth`) settings" if name in {s.name for s in config.servers} else "is not configured"
    )
    raise ConfigError(f"server {name!r} {what}", f"OAuth servers in this config: {known}")


def _login(config: RuntimeConfig, args: argparse.Namespace) -> int:
    import anyio

    from agent_runtime.cli.common import run_with_signals
    from transports.oauth import login

    target = _target(config, args.server)
    interactive = not args.no_browser and _has_display()

    async def open_url(url: str) -> None:
        print(f"Open this URL to log in to {args.server}:\n{url}", flush=True)
        if interactive:
            import webbrowser

            await anyio.to_thread.run_sync(webbrowser.open, url)
        print("Waiting for the browser to come back to 127.0.0.1 ...", file=sys.stderr, flush=True)

    async def main() -> int:
        try:
            grant = await login(target, open_url=open_url, timeout=args.timeout)
        except TimeoutError:
            raise AgentRuntimeError(
                f"the login to {args.server} did not finish within {args.timeout:g}s",
                "finish it in the browser, or raise --timeout",
            ) from None
        print(f"Logged in to {args.server}: {_describe(grant)}", flush=True)
        return 0

    return run_with_signals(main)


def _has_display() -> bool:
    if sys.platform == "darwin" or os.name == "nt":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _describe(grant: StoredGrant | None) -> str:
    if grant is None:
        return "none"
    state = grant.state()
    if state == "none":
        return "none"
    when = (
        f" until {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(grant.expires_at))}"
        if grant.expires_at is not None and state == "valid"
        else ""
    )
    scopes = f"; scopes: {grant.scope}" if grant.scope else ""
    return f"{state}{when}{scopes}"


def _status(config: RuntimeConfig, args: argparse.Namespace) -> int:
    from transports.errors import TransportError
    from transports.oauth import token_store

    servers = [(args.server, _target(config, args.server))] if args.server else _oauth_servers(config)
    rows: list[dict[str, Any]] = []
    for name, target in servers:
        row: dict[str, Any] = {"server": name, "url": target.url}
        try:
            store = token_store(target)
            grant = store.grant()
        except TransportError as exc:
            row.update(state="unavailable", error=exc.reason)
        else:
            row.update(
                state=grant.state() if grant else "none",
                expires_at=grant.expires_at if grant else None,
                scope=grant.scope if grant else None,
                refreshable=bool(grant and grant.has_refresh_token),
                store=str(store.path) if store.path is not None else "keyring",
            )
            row["summary"] = _describe(grant)
        rows.append(row)
    if args.json:
        print(json.dumps({"servers": rows}, indent=2))
    elif not rows:
        print("no OAuth servers in this config")
    else:
        for row in rows:
            print(f"{row['server']}: {row.get('summary') or row['state'] + ': ' + row.get('error', '')}")
    return 0


def _logout(config: RuntimeConfig, args: argparse.Namespace) -> int:
    from transports.oauth import token_store

    store = token_store(_target(config, args.server))
    if store.delete():
        print(f"Logged out of {args.server}: stored tokens deleted")
    else:
        print(f"No tokens stored for {args.server}")
    return 0
