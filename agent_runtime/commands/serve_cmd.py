"""`agent-runtime serve`: the OpenAI-compatible HTTP API over the in-process engine and the configured agents.

Binds 127.0.0.1 by default and prints `LISTENING <url>` on stdout once bound (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent_runtime.config_types import RuntimeConfig
    from agent_runtime.server.app import ServerSettings

API_KEY_ENV = "AGENT_RUNTIME_API_KEY"


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


def add_device_argument(parser: argparse.ArgumentParser, *, from_config: bool = True) -> None:
    """`--device auto|cuda|cpu`; with `from_config` it overrides the config's `model.device` (default None)."""
    default = None if from_config else "auto"
    where = "the config's `model.device`, else auto" if from_config else "auto"
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default=default,
        help=f"where the model runs (default: {where}: the GPU when torch sees one, else the CPU)",
    )


def add_kv_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_memory,
        default=None,
        metavar="SIZE",
        help="KV cache budget: a fraction of free memory (0.3) or a size (512MiB, 2GiB)",
    )


def parse_memory(text: str) -> int | float:
    """`0.3` (fraction of free memory), `512MiB`, `2GiB`, `1.5GB` or plain bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    value = text.strip().lower()
    for unit, scale in units.items():
        if value.endswith(unit):
            try:
                return int(float(value[: -len(unit)]) * scale)
            except ValueError:
                break
    else:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if 0 < number <= 1:
            return number
        if number > 1:
            return int(number)
    raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use 0.3, 512MiB or 2GiB)")


def resolve_model(config: RuntimeConfig | None, args: argparse.Namespace) -> Any:
    """The validated `model` section with command-line overrides (flags win): an
    `agent_runtime.agent_config.ModelSettings` for the in-process engine, or an
    `agent_runtime.openai_backend.OpenAIBackendSettings` for `backend: "openai"` (no local model then)."""
    from agent_runtime.agent_config import ModelSettings, load_model_settings
    from agent_runtime.openai_backend import OpenAIBackendSettings

    raw = config.sections.get("model") if config is not None else None
    if isinstance(raw, dict) and raw.get("backend") == "openai" and getattr(args, "model", None) is None:
        return OpenAIBackendSettings.from_section(raw, config)
    settings = load_model_settings(config) if config is not None else ModelSettings()
    overrides = {
        "source": getattr(args, "model", None),
        "dtype": getattr(args, "dtype", None),
        "device": getattr(args, "device", None),
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "max_model_len": getattr(args, "max_model_len", None),
        "kv_cache_memory": getattr(args, "kv_cache_memory", None),
    }
    update = {k: v for k, v in overrides.items() if v is not None}
    return ModelSettings.model_validate({**settings.model_dump(), **update}) if update else settings


def load_engine(settings: Any) -> tuple[Any, str]:
    """Start the in-process engine for validated ModelSettings; returns (engine, model name)."""
    from inference.async_engine import AsyncEngine

    engine = AsyncEngine.from_model(
        settings.source, dtype=settings.dtype, device=settings.device, **settings.engine_args()
    )
    return engine, os.path.basename(str(settings.source).rstrip("/"))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from agent_runtime.errors import ConfigError
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


def bind_socket(host: str, port: int) -> socket.socket:
    from agent_runtime.errors import AgentRuntimeError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it Nagle's algorithm holds small SSE chunks for a delayed ACK (~40 ms) on keep-alive connections.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AgentRuntimeError(f"cannot bind {host}:{port}: {exc.strerror}", "pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield  # our own signal watcher stops uvicorn gracefully, then the runtime and engine shut down


def uvicorn_server(app: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            return _no_signal_capture()

    config = uvicorn.Config(
        app,
        lifespan="auto",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=64 * 1024,
    )
    return Server(config)


def run(args: argparse.Namespace) -> int:
    import anyio

    from agent_runtime.config import default_config_path, load_config

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
    import signal

    import anyio

    from agent_runtime.prom_metrics import ServerMetrics
    from agent_runtime.server.agent_host import open_agent_host
    from agent_runtime.server.app import create_app

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
        print(f"LISTENING {url_of(sock)}", flush=True)
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal exit_code
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                        exit_code = 0 if signum == signal.SIGTERM else 128 + signum
                        if uv.should_exit:
                            uv.force_exit = True
                        uv.should_exit = True

            tg.start_soon(watch_signals)
            await uv.serve(sockets=[sock])
            tg.cancel_scope.cancel()
    return exit_code
