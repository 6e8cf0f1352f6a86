"""`agent-runtime mcp-server`: serve the configured agents to MCP hosts (Claude Desktop) over stdio, or over
streamable HTTP on 127.0.0.1 with `--http PORT`. Exits on stdin EOF and stops every child process."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from agent_runtime.cli.common import (
    API_KEY_ENV,
    add_adapter_argument,
    add_compile_argument,
    add_device_argument,
    add_kv_argument,
    add_quantize_argument,
    bind_socket,
    resolve_model,
    run_with_signals,
    url_of,
    uvicorn_server,
)
from agent_runtime.config import RuntimeConfig, default_config_path, load_config
from agent_runtime.logging import get_logger

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="config file (MCP servers, model, agents)")
    parser.add_argument(
        "--http",
        type=int,
        default=None,
        metavar="PORT",
        help="serve streamable HTTP on 127.0.0.1:PORT (0: any)",
    )
    parser.add_argument(
        "--expose-tools",
        action="store_true",
        help="also re-export the connected servers' tools under their namespaced names (one aggregated server)",
    )
    parser.add_argument("--model", help="model to load, overriding the config")
    parser.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32")
    add_device_argument(parser)
    add_adapter_argument(parser)
    add_quantize_argument(parser)
    add_compile_argument(parser)
    add_kv_argument(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help="with --http: require `Authorization: Bearer KEY` ($AGENT_RUNTIME_API_KEY)",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="with --http: extra Origin to accept",
    )


def run(args: argparse.Namespace) -> int:
    path = args.config or default_config_path()
    config = load_config(path) if path is not None else None
    # The model loads in the background once serving starts (hosts time out slow handshakes); the first
    # run_agent waits for it.
    model = resolve_model(config, args)

    async def main() -> int:
        if args.http is not None:
            return await _serve_http(args, config, model)
        return await _serve_stdio(args, config, model)

    return run_with_signals(main)


async def _serve_stdio(args: argparse.Namespace, config: RuntimeConfig | None, model: Any) -> int:
    # the MCP SDK's server side, torch and the agent loop: only when serving, not for every command's parser
    from agent_runtime.server.agent_host import open_agent_host
    from agent_runtime.server.mcp_server import AgentMCPServer, serve_stdio

    async with open_agent_host(config, model=model, preload=True) as host:
        runtime = host.runtime if host is not None else None
        await serve_stdio(AgentMCPServer(host, runtime, reexport=args.expose_tools))
    print("stdin closed: stopped", file=sys.stderr)
    return 0


async def _serve_http(args: argparse.Namespace, config: RuntimeConfig | None, model: Any) -> int:
    # the MCP SDK's server side, torch and the agent loop: see _serve_stdio
    from agent_runtime.server.agent_host import open_agent_host
    from agent_runtime.server.event_store import BoundedEventStore, SessionScope
    from agent_runtime.server.mcp_server import RETRY_MS, AgentMCPServer
    from agent_runtime.server.security import SecurityMiddleware, SecuritySettings

    security = SecuritySettings(
        bind_host="127.0.0.1",
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allowed_origins=tuple(args.allowed_origin),
        public_paths=frozenset(),
    )
    sock = bind_socket("127.0.0.1", args.http)
    async with open_agent_host(config, model=model, preload=True) as host:
        runtime = host.runtime if host is not None else None
        mcp = AgentMCPServer(host, runtime, reexport=args.expose_tools)
        # The SDK app adds its own Host/Origin checks for 127.0.0.1; ours adds the key and body limit. Its
        # SSE streams are resumable: each opens with a priming event (an id and `retry`), and a host that
        # lost one resumes it with Last-Event-ID from the event store (bounded, one scope per session).
        events = BoundedEventStore()
        sdk_app = mcp.server.streamable_http_app(
            host="127.0.0.1", event_store=events, retry_interval=RETRY_MS
        )
        app = SecurityMiddleware(SessionScope(sdk_app), security)
        uv = uvicorn_server(app)
        print(f"LISTENING {url_of(sock)}/mcp", flush=True)
        try:
            await uv.serve(sockets=[sock])
        finally:
            log.info("SSE event store", **dataclasses.asdict(events.stats))
    return 0
