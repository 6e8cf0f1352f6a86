"""`agent-runtime serve`: the OpenAI-compatible HTTP API over the in-process engine and the configured agents.

Binds 127.0.0.1 by default and prints `LISTENING <url>` on stdout once bound (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from agent_runtime.cli.common import (
    API_KEY_ENV,
    add_device_argument,
    add_kv_argument,
    bind_socket,
    load_engine,
    resolve_model,
    url_of,
    uvicorn_server,
)
from agent_runtime.config import RuntimeConfig, default_config_path, load_config
from agent_runtime.errors import ConfigError

if TYPE_CHECKING:
    from agent_runtime.server.app import ServerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="config file (MCP servers, model, agents)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--model", help="model to load, overriding the config (default smollm2-135m-instruct)"
    )
    parser.add_argument("--served-model-name", help="the model id clients use (default: the model name)")
    parser.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32")
    add_device_argument(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` (default ${API_KEY_ENV}; mandatory off loopback)",
    )
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME", help="extra Host header name to accept"
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="extra browser Origin to accept (scheme://host:port); loopback origins always are",
    )
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit")
    parser.add_argument(
        "--max-concurrent", type=int, default=256, help="generations in flight before answering 429"
    )
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size (sequences)")
    parser.add_argument("--max-model-len", type=int, default=None, help="engine context length cap")
    add_kv_argument(parser)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    # starlette, pydantic and the engine's types: only when serving, not for every command's parser
    from agent_runtime.server.app import ServerSettings
    from agent_runtime.server.security import SecuritySettings

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    security = SecuritySettings(
        bind_host=args.host,
        api_key=key,
        allowed_hosts=tuple(args.allowed_host),
        allowed_origins=tuple(args.allowed_origin),
        max_body_bytes=args.max_body_bytes,
    )
    problem = security.problem()
    if problem:
        raise ConfigError(problem, f"pass --api-key or set ${API_KEY_ENV}, or bind 127.0.0.1")
    if args.max_concurrent < 1:
        raise ConfigError("--max-concurrent must be at least 1")
    return ServerSettings(
        security=security,
        max_concurrent_requests=args.max_concurrent,
        served_model_name=args.served_model_name,
    )


def run(args: argparse.Namespace) -> int:
    path = args.config or default_config_path()
    config = load_config(path) if path is not None else None
    settings = settings_from_args(args)
    model = resolve_model(config, args)
    engine = None
    model_name = None
    if getattr(model, "backend", "local") != "openai":
        engine, model_name = load_engine(model)
    return anyio.run(_serve, args, config, settings, engine, model_name, model)


async def _serve(
    args: argparse.Namespace,
    config: RuntimeConfig | None,
    settings: ServerSettings,
    engine: Any,
    model_name: str | None,
    model: Any,
) -> int:
    from agent_runtime.server.agent_host import open_agent_host  # torch and starlette: see settings_from_args
    from agent_runtime.server.app import create_app
    from agent_runtime.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    sock = bind_socket(args.host, args.port)
    exit_code = 0
    async with contextlib.AsyncExitStack() as stack:
        if engine is not None:
            stack.push_async_callback(engine.aclose)
        agents = await stack.enter_async_context(
            open_agent_host(config, engine=engine, model=model, metrics=metrics)
        )
        server = create_app(engine, settings=settings, agents=agents, metrics=metrics, model_id=model_name)
        uv = uvicorn_server(server.app)
        async with anyio.create_task_group() as tg:

            async def watch_signals(
                *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
            ) -> None:
                nonlocal exit_code
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                        exit_code = 0 if signum == signal.SIGTERM else 128 + signum
                        if uv.should_exit:
                            uv.force_exit = True
                        uv.should_exit = True

            # The handler is in place before anyone learns the address: a SIGTERM right after LISTENING is a
            # graceful stop, not the default action.
            await tg.start(watch_signals)
            print(f"LISTENING {url_of(sock)}", flush=True)
            await uv.serve(sockets=[sock])
            tg.cancel_scope.cancel()
    return exit_code
