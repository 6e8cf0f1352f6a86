"""`agent-runtime serve`: the OpenAI-compatible HTTP API over the in-process engine and the configured agents.

Binds 127.0.0.1 by default (port 0 picks a free port) and answers `/health` at once, while the model loads and
the MCP servers start in the background; `/ready` and the API answer 503 until both are done, and then
`LISTENING <url>` is printed on stdout. SIGTERM (or SIGINT) drains: no new connections, the requests in flight
get `--drain-seconds` to finish, then the rest are cancelled and the engine and MCP servers stop; a second
signal stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from agent_runtime.cli.common import (
    API_KEY_ENV,
    add_adapter_argument,
    add_compile_argument,
    add_device_argument,
    add_kv_argument,
    add_quantize_argument,
    bind_socket,
    load_engine,
    resolve_model,
    url_of,
    uvicorn_server,
)
from agent_runtime.config import RuntimeConfig, default_config_path, load_config
from agent_runtime.errors import ConfigError
from agent_runtime.logging import get_logger

if TYPE_CHECKING:
    from agent_runtime.server.app import OpenAIServer, ServerSettings

log = get_logger(__name__)
T = TypeVar("T")
DEFAULT_DRAIN_SECONDS = 30.0


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
    add_adapter_argument(parser)
    add_quantize_argument(parser)
    add_compile_argument(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` (default ${API_KEY_ENV}; mandatory off loopback)",
    )
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="read the API key from FILE (a container secret); overrides --api-key",
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
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        metavar="S",
        help=f"on SIGTERM, how long requests in flight may finish before they are cancelled (default {DEFAULT_DRAIN_SECONDS:g})",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    # starlette, pydantic and the engine's types: only when serving, not for every command's parser
    from agent_runtime.server.app import ServerSettings
    from agent_runtime.server.security import SecuritySettings

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    key_file = getattr(args, "api_key_file", None)
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.read().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"cannot read --api-key-file {key_file}: {exc.strerror or exc}",
                "mount the secret file readable by the server's user",
            ) from None
        if key is None:
            raise ConfigError(f"--api-key-file {key_file} is empty", "write the key into the file")
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
    if not args.drain_seconds >= 0:
        raise ConfigError("--drain-seconds must be 0 or more")
    model = resolve_model(config, args)  # validated here: a bad model section fails before anything starts
    code: int = anyio.run(_serve, args, config, settings, model)
    if any(t.name.startswith(_STARTUP_THREAD) and t.is_alive() for t in threading.enumerate()):
        # A signal abandoned a model load that is still running in torch's C++ code. The interpreter's normal
        # shutdown would destroy C++ state under that thread ("terminate called without an active exception",
        # exit -6: 1 of 48 tries here); leave without it, once our output is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


async def _serve(
    args: argparse.Namespace, config: RuntimeConfig | None, settings: ServerSettings, model: Any
) -> int:
    from agent_runtime.server.app import create_app  # starlette, pydantic: see settings_from_args
    from agent_runtime.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    sock = bind_socket(args.host, args.port)
    url = url_of(sock)
    server = create_app(None, settings=settings, metrics=metrics, starting=True)
    uv = uvicorn_server(server.app, drain_seconds=args.drain_seconds)
    exit_code = 0
    http_done = anyio.Event()
    startup = anyio.CancelScope()  # cancelled by a signal that comes before the server is ready
    started = False

    async def serve_http() -> None:
        try:
            await uv.serve(sockets=[sock])
        finally:
            http_done.set()

    async def watch_signals(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal exit_code
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                exit_code = 0 if signum == signal.SIGTERM else 128 + signum
                server.readiness.draining = True  # /ready answers 503 from now on
                if not started:
                    startup.cancel()  # a model still loading is abandoned
                if uv.should_exit:
                    uv.force_exit = True
                uv.should_exit = True
                log.info("draining", in_flight=server.capacity.in_flight, grace_seconds=args.drain_seconds)

    async with anyio.create_task_group() as tg:
        # The handler is in place before anything is announced or served: a SIGTERM right after LISTENING (or
        # while the model loads) is a graceful stop, not the default action.
        await tg.start(watch_signals)
        tg.start_soon(serve_http)
        log.info("http server up; loading the model and starting MCP servers", url=url)
        try:
            with startup:
                async with contextlib.AsyncExitStack() as stack:
                    await _start(stack, server, config, model, metrics)
                    started = True
                    print(f"LISTENING {url}", flush=True)
                    log.info("ready", url=url)
                    # uvicorn returns once the requests in flight are done (or cancelled after the grace
                    # period); then the stack closes: the MCP servers and the engine stop after the last request
                    await http_done.wait()
        except BaseException:  # startup failed (a model or config error): stop the HTTP server, then report
            uv.should_exit = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await http_done.wait()
            raise
        await http_done.wait()  # stopped while starting: uvicorn stops by itself
        tg.cancel_scope.cancel()
    return exit_code


async def _start(
    stack: contextlib.AsyncExitStack,
    server: OpenAIServer,
    config: RuntimeConfig | None,
    model: Any,
    metrics: Any,
) -> None:
    """Load the engine (off the event loop, which keeps answering /health) and start the MCP servers and agents;
    then the server is ready. What started is closed by `stack`, in reverse."""
    from agent_runtime.server.agent_host import open_agent_host  # torch and the agent loop: serving only

    engine = None
    model_name = None
    if getattr(model, "backend", "local") != "openai":
        engine, model_name = await _in_daemon_thread(load_engine, model)
        stack.push_async_callback(engine.aclose)
    server.readiness.model_loaded = True  # /ready now waits for the MCP servers only
    agents = await stack.enter_async_context(
        open_agent_host(config, engine=engine, model=model, metrics=metrics)
    )
    server.attach(engine, agents, model_name)


_STARTUP_THREAD = (
    "serve-startup-"  # the prefix of `_in_daemon_thread`'s threads, which `run` looks for at exit
)


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a daemon thread. Cancelling the wait abandons the thread, and being a daemon it cannot hold
    the process up at exit (anyio's worker threads would: a SIGTERM during a long model load must not wait)."""
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:
            outcome.append((False, exc))
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except RuntimeError:
            pass  # the event loop is gone: nobody waits any more

    name = f"{_STARTUP_THREAD}{getattr(fn, '__name__', 'work')}"
    threading.Thread(target=work, name=name, daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
