"""Shared by the executor, monitor, pinning and fault tests: a supervisor + executor over the faulty server,
and a reader of what reached that server (its calls log)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from agent_runtime.config.types import RuntimeConfig, RuntimeSettings, ServerConfig, ServerTimeouts
from agent_runtime.tools.executor import Executor
from agent_runtime.tools.registry import ToolRegistry
from agent_runtime.tools.supervisor import Supervisor
from tests.conftest import EXAMPLES, PYTHON
from transports.targets import HttpTarget, StdioTarget, Target, WebSocketTarget

FAULTY = str(EXAMPLES / "servers" / "faulty_server.py")


@dataclass(slots=True)
class Harness:
    supervisor: Supervisor
    registry: ToolRegistry
    executor: Executor
    config: RuntimeConfig
    calls_log: Path
    tmp: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def received(self, tool: str | None = None) -> list[dict[str, Any]]:
        """What the server side saw (one entry per tools/call, written before acting)."""
        if not self.calls_log.exists():
            return []
        lines = [json.loads(line) for line in self.calls_log.read_text().splitlines() if line.strip()]
        return [e for e in lines if tool is None or e["tool"] == tool]


def stdio_target(*flags: str, calls_log: Path, env: Mapping[str, str] | None = None) -> StdioTarget:
    return StdioTarget(PYTHON, (FAULTY, "--calls-log", str(calls_log), *flags), env=dict(env or {}))


@contextlib.contextmanager
def network_server(kind: str, *flags: str, calls_log: Path) -> Iterator[Target]:
    """A faulty server over http or ws, kept alive across crashes by --respawn."""
    proc = subprocess.Popen(
        [PYTHON, FAULTY, "--transport", kind, "--respawn", "--calls-log", str(calls_log), *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("LISTENING "), line
        url = line.split()[1]
        yield HttpTarget(url) if kind == "http" else WebSocketTarget(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def make_config(
    tmp: Path,
    target: Target,
    *,
    policies: Mapping[str, Any] | None = None,
    name: str = "faulty",
    trusted: bool = False,
    tool_timeout: float = 10.0,
    max_concurrent_calls: int | None = None,
    reconnect_delay: float = 0.05,
) -> RuntimeConfig:
    from agent_runtime.config.types import ReconnectPolicy

    server = ServerConfig(
        name=name,
        target=target,
        timeouts=ServerTimeouts(startup=30.0, connect=5.0, request=30.0, tool=tool_timeout),
        trusted=trusted,
        max_concurrent_calls=max_concurrent_calls,
    )
    runtime = RuntimeSettings(
        reconnect=ReconnectPolicy(initial_delay=reconnect_delay, max_delay=0.5, multiplier=2.0, jitter=0.1),
        shutdown_timeout=10.0,
    )
    return RuntimeConfig(
        servers=(server,),
        runtime=runtime,
        path=tmp / "MCP_CONFIG.json",
        sections={"policies": dict(policies or {})},
    )


@contextlib.asynccontextmanager
async def harness(
    tmp: Path,
    target: Target | None = None,
    *flags: str,
    policies: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    calls_log: Path | None = None,
    **executor_kw: Any,
) -> AsyncIterator[Harness]:
    calls_log = calls_log or tmp / "calls.jsonl"
    target = target or stdio_target(*flags, calls_log=calls_log, env=env)
    config_kw = {
        k: executor_kw.pop(k)
        for k in list(executor_kw)
        if k in ("trusted", "tool_timeout", "max_concurrent_calls")
    }
    config = make_config(tmp, target, policies=policies, **config_kw)
    registry = ToolRegistry()
    async with Supervisor(config, registry) as supervisor:
        assert await supervisor.wait_ready(30), supervisor.servers()
        executor = Executor(supervisor, registry, config, **executor_kw)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(executor.serve)
                yield Harness(supervisor, registry, executor, config, calls_log, tmp)
                tg.cancel_scope.cancel()
        finally:
            executor.close()
