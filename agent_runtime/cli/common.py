"""What several commands share: the server-source flags and the config they name, the signal-aware runner,
the terminal approval prompt, the model and device flags, the listening socket, and the agent run with its
live view (run and chat).

Commands that never run a model import this module too, so torch, the agent loop, the MCP SDK and rich load
only inside the helpers that need them (each such import says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from agent_runtime.cli.elicit import terminal_elicitor
from agent_runtime.config import RuntimeConfig, adhoc_config, default_config_path, load_config
from agent_runtime.errors import AgentRuntimeError, ConfigError
from agent_runtime.tools.executor import ApprovalHook
from agent_runtime.tools.runtime import Runtime
from policies.approval import ApprovalRequest

if TYPE_CHECKING:
    from agent_runtime.agents.events import AgentEvent, AgentResult
    from agent_runtime.agents.loop import Agent, AgentSession
    from agent_runtime.tools.supervisor import ServerStatus


def add_server_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--config F, or repeatable ad-hoc --stdio/--url/--sse/--ws flags (not both), plus readiness and --json."""
    src = parser.add_argument_group("servers")
    src.add_argument("--config", metavar="FILE", help="config file (default: the user config file)")
    src.add_argument(
        "--stdio", action="append", default=[], metavar="CMD", help="ad-hoc stdio server command"
    )
    src.add_argument(
        "--url", action="append", default=[], metavar="URL", help="ad-hoc streamable HTTP server"
    )
    src.add_argument(
        "--sse", action="append", default=[], metavar="URL", help="ad-hoc legacy HTTP+SSE server"
    )
    src.add_argument("--ws", action="append", default=[], metavar="URL", help="ad-hoc WebSocket server")
    src.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for servers to start (default: the largest startup timeout)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    adhoc = bool(args.stdio or args.url or args.sse or args.ws)
    if adhoc and args.config:
        raise ConfigError(
            "--config cannot be combined with --stdio/--url/--sse/--ws",
            "use either a config file or ad-hoc flags",
        )
    if adhoc:
        return adhoc_config(stdio=args.stdio, url=args.url, sse=args.sse, ws=args.ws)
    path = args.config or default_config_path()
    if path is None:
        raise ConfigError(
            "no config file: ./MCP_CONFIG.json does not exist and $AGENT_RUNTIME_CONFIG is not set",
            "pass --config FILE, or ad-hoc servers with --stdio CMD / --url URL / --sse URL / --ws URL",
        )
    return load_config(path)


def run_with_signals(main: Callable[[], Awaitable[int]]) -> int:
    """Run `main` under anyio; SIGINT/SIGTERM cancel it, so the runtime shuts its servers down (bounded)."""

    async def runner() -> int:
        result = 0
        async with anyio.create_task_group() as tg:

            async def watch_signals(
                *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
            ) -> None:
                nonlocal result
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    task_status.started()
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: shutting down", file=sys.stderr)
                        result = 128 + signum
                        tg.cancel_scope.cancel()
                        return

            async def body() -> None:
                nonlocal result
                result = await main()
                tg.cancel_scope.cancel()

            await tg.start(watch_signals)  # before main: a signal at any point of it is a clean shutdown
            tg.start_soon(body)
        return result

    return anyio.run(runner)


def open_runtime(config: RuntimeConfig, args: argparse.Namespace) -> Runtime:
    # Calls that policy says need approval are asked on the terminal; with no terminal they are denied. So are
    # servers' questions (servers with "elicitation": "ask"): declined without a terminal.
    return Runtime(
        config,
        ready_timeout=args.ready_timeout,
        approval_hook=terminal_approver(),
        elicitation_handler=terminal_elicitor(),
    )


API_KEY_ENV = "AGENT_RUNTIME_API_KEY"


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


QUANTIZE_CHOICES = (
    "auto",
    "none",
    "int8",
    "int4",
)  # inference.config.QUANTIZE_MODES (torch-free, not imported)
QUANTIZE_GROUP_SIZES = (32, 64, 128, 256)  # inference.config.QUANTIZE_GROUP_SIZES, likewise


def add_quantize_argument(parser: argparse.ArgumentParser, *, from_config: bool = True) -> None:
    """`--quantize auto|none|int8|int4` and `--quantize-group-size 32|64|128|256`; with `from_config` they
    override the config's `model.quantize` and `model.quantize_group_size`."""
    where = "the config's `model.quantize`, else auto" if from_config else "auto"
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None if from_config else "auto",
        help=f"model weights (default: {where}: a GGUF stays quantized on a bf16 CPU model or a 16-bit CUDA one, "
        "else float): none (float), int8 or int4 (quantized at load; on CUDA through Triton kernels)",
    )
    group_where = "the config's `model.quantize_group_size`, else 32" if from_config else "32"
    parser.add_argument(
        "--quantize-group-size",
        type=int,
        choices=QUANTIZE_GROUP_SIZES,
        default=None if from_config else 32,
        metavar="{" + ",".join(map(str, QUANTIZE_GROUP_SIZES)) + "}",
        help=f"int4: inputs per scale and zero (default: {group_where}); a GGUF's 4-bit blocks keep their 32",
    )


def add_compile_argument(parser: argparse.ArgumentParser, *, from_config: bool = True) -> None:
    """`--compile` / `--no-compile`; with `from_config` it overrides the config's `model.compile`."""
    where = "the config's `model.compile`, else off" if from_config else "off"
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None if from_config else False,
        help=f"CPU: run decode steps through torch.compile (default: {where}); the first start compiles for one to "
        "three minutes, later ones read inductor's disk cache (about 15 s); skipped where the fused decode step of "
        "a quantized model serves them",
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
    `agent_runtime.config.agents.ModelSettings` for the in-process engine, or an
    `agent_runtime.agents.openai_backend.OpenAIBackendSettings` for `backend: "openai"` (no local model then)."""
    from agent_runtime.agents.openai_backend import (
        OpenAIBackendSettings,  # pydantic and httpx: model commands
    )
    from agent_runtime.config.agents import ModelSettings, load_model_settings

    raw = config.sections.get("model") if config is not None else None
    if isinstance(raw, dict) and raw.get("backend") == "openai" and getattr(args, "model", None) is None:
        return OpenAIBackendSettings.from_section(raw, config)
    settings = load_model_settings(config) if config is not None else ModelSettings()
    overrides = {
        "source": getattr(args, "model", None),
        "dtype": getattr(args, "dtype", None),
        "device": getattr(args, "device", None),
        "quantize": getattr(args, "quantize", None),
        "quantize_group_size": getattr(args, "quantize_group_size", None),
        "compile": getattr(args, "compile", None),
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "max_model_len": getattr(args, "max_model_len", None),
        "kv_cache_memory": getattr(args, "kv_cache_memory", None),
    }
    update = {k: v for k, v in overrides.items() if v is not None}
    adapters = parse_adapters(getattr(args, "adapter", None))
    if adapters:
        update["adapters"] = {**settings.adapters, **adapters}
    return ModelSettings.model_validate({**settings.model_dump(), **update}) if update else settings


def load_engine(settings: Any) -> tuple[Any, str]:
    """Start the in-process engine for validated ModelSettings; returns (engine, model name)."""
    # the engine's modules: only commands that run one
    from agent_runtime.agents.llm import engine_config, load_options
    from inference.async_engine import AsyncEngine  # torch: only commands that serve a local model

    engine = AsyncEngine.from_model(
        settings.source, engine_config(settings), adapters=settings.adapters, **load_options(settings)
    )
    return engine, os.path.basename(str(settings.source).rstrip("/"))


def bind_socket(host: str, port: int) -> socket.socket:
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


def uvicorn_server(app: Any, *, drain_seconds: float = 5.0) -> Any:
    """A uvicorn server for `app` that leaves signals to us; on `should_exit` it stops accepting, lets the
    requests in flight finish for up to `drain_seconds`, then cancels what is left."""
    import uvicorn  # only the HTTP servers need it

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]  # uvicorn: a @contextmanager, typed by its private class
            return _no_signal_capture()

    config = uvicorn.Config(
        app,
        lifespan="auto",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=drain_seconds,  # type: ignore[arg-type]  # annotated int, used as asyncio.timeout's delay
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=64 * 1024,
    )
    return Server(config)


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="load a LoRA adapter (PEFT folder) under NAME; repeatable; adds to the config's model.adapters",
    )


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """`--adapter NAME=PATH` values as a dict; AgentRuntimeError for one without `=`."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise AgentRuntimeError(
                f"--adapter {value!r} is not NAME=PATH", "pass e.g. --adapter tools=./adapters/tools"
            )
        adapters[name] = path
    return adapters


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="config file (default ./MCP_CONFIG.json)")
    parser.add_argument(
        "--agent", "-a", default="default", help="agent name from the config (default: default)"
    )
    parser.add_argument("--model", default=None, help="model source overriding the config's `model` section")
    add_device_argument(parser)
    add_adapter_argument(parser)
    add_quantize_argument(parser)
    add_compile_argument(parser)
    parser.add_argument("--quiet", "-q", action="store_true", help="no live view, only the answer")


@contextlib.asynccontextmanager
async def open_agent(args: argparse.Namespace, console: Any) -> AsyncIterator[Agent]:
    """Start the runtime of the config, load the model (with progress on a terminal) and yield the agent;
    leaving stops the servers and releases the engine."""
    from agent_runtime.agents.host import AgentHost  # torch and the agent loop: only commands that run agents

    rt = Runtime.from_config(args.config, elicitation_handler=terminal_elicitor())
    host = AgentHost(rt)  # validates the agents and model sections before any server starts
    host.model_override = args.model
    flags = {k: getattr(args, k, None) for k in ("device", "quantize", "quantize_group_size", "compile")}
    if any(v is not None for v in flags.values()):
        host.model = host.model.model_copy(update={k: v for k, v in flags.items() if v is not None})
    adapters = parse_adapters(getattr(args, "adapter", None))
    if adapters:
        host.model = host.model.model_copy(update={"adapters": {**host.model.adapters, **adapters}})
    if args.agent not in host.agents:
        host.agent(args.agent)  # raises the typed "no agent named ..." error
    live = console is not None and console.is_terminal
    async with contextlib.AsyncExitStack() as stack:
        with console.status("starting MCP servers...") if live else contextlib.nullcontext():
            await stack.enter_async_context(rt)
        await stack.enter_async_context(host)
        agent = host.agent(args.agent)
        host.progress = live
        source = args.model or agent.config.model or host.model.source
        with console.status(f"loading model {source}...") if live else contextlib.nullcontext():
            await host.backend(agent.config.model)
        yield agent


class LiveView:
    """Steps, tool calls and results as they happen, on stderr (rich); nothing when not a terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._text = ""

    def show(self, event: AgentEvent) -> None:
        from rich.markup import escape

        c = self.console
        if c is None:
            return
        if event.type == "step_start":
            c.print(f"[bold cyan]step {event.step}[/]")
        elif event.type == "tool_call":
            args = json.dumps(event.arguments, ensure_ascii=False)
            server = f" [dim]({event.server})[/]" if event.server else ""
            c.print(f"  [yellow]→ {escape(event.name)}[/]{server} {escape(args)}")
        elif event.type == "tool_progress":
            done = f"{event.progress:g}" + (f"/{event.total:g}" if event.total is not None else "")
            note = f" {escape(event.message)}" if event.message else ""
            c.print(f"  [dim]… {escape(event.name)} {done}{note}[/]")
        elif event.type == "tool_result":
            style = "red" if event.is_error else "green"
            body = event.observation
            short = body if len(body) <= 300 else body[:300] + "…"
            c.print(f"  [{style}]← {event.outcome}[/] [dim]{event.duration * 1000:.0f} ms[/] {escape(short)}")
        elif event.type == "invalid_reply":
            c.print(f"  [red]invalid reply:[/] {escape(event.error)}")
        elif event.type == "stopped":
            c.print(f"[bold red]stopped: {event.reason}[/] {escape(event.detail)}")
        elif event.type == "usage":
            u = event.usage
            c.print(
                f"[dim]{u.steps} steps, {u.tool_calls} tool calls, {u.prompt_tokens}+{u.completion_tokens} tokens, "
                f"model {u.model_seconds:.2f} s, tools {u.tool_seconds:.2f} s, total {u.wall_seconds:.2f} s[/]"
            )


def make_console(quiet: bool) -> Any:
    if quiet:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


async def run_task(
    agent: Agent, task: str, view: LiveView, *, history: AgentSession | None = None
) -> AgentResult:
    from agent_runtime.agents.events import RunFinished  # torch: see open_agent

    result = None
    events = agent.stream(task) if history is None else history.stream(task)
    async for event in events:
        if isinstance(event, RunFinished):
            result = event.result
        else:
            view.show(event)
    assert result is not None
    return result


def terminal_approver(*, stream: Any = None) -> ApprovalHook:
    """The CLI's approval prompt. Fails closed: no terminal, EOF, or anything but yes denies."""

    async def ask(request: ApprovalRequest) -> bool:
        stdin = stream or sys.stdin
        if not stdin.isatty():
            return False
        args = json.dumps(dict(request.arguments), ensure_ascii=True)
        question = f"\n{request.server}/{request.tool} wants to run ({request.reason}):\n  arguments: {args[:2000]}\nallow? [y/N] "

        def prompt() -> str:
            print(question, end="", file=sys.stderr, flush=True)
            return stdin.readline()

        answer = await anyio.to_thread.run_sync(prompt, abandon_on_cancel=True)
        return answer.strip().lower() in ("y", "yes")

    return ask


def status_rows(statuses: list[ServerStatus]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in statuses]
