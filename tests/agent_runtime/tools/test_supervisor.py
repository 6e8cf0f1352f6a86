"""The supervisor against real server processes: concurrent start, isolation of bad servers, crash and
reconnect, list_changed refresh, HTTP restart, bounded shutdown that leaves no child process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import psutil
import pytest

from agent_runtime.config.types import (
    ReconnectPolicy,
    RuntimeConfig,
    RuntimeSettings,
    ServerConfig,
    ServerTimeouts,
)
from agent_runtime.tools.registry import ToolRegistry
from agent_runtime.tools.supervisor import (
    ServerState,
    ServerUnavailable,
    Supervisor,
    UnknownServer,
    backoff_delay,
)
from tests.conftest import EXAMPLES, PYTHON, wait_for_call
from transports.errors import CallTimeout, ConnectionLost
from transports.targets import HttpTarget, StdioTarget

DEMO = str(EXAMPLES / "servers" / "demo_server.py")
FAST = RuntimeSettings(
    reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.3, multiplier=2.0, jitter=0.2),
    shutdown_timeout=8.0,
)


def demo(name: str, *flags: str, startup: float = 15.0, **kw: object) -> ServerConfig:
    return ServerConfig(
        name, StdioTarget(PYTHON, (DEMO, *flags)), timeouts=ServerTimeouts(startup=startup, tool=10.0), **kw
    )


def config(*servers: ServerConfig, settings: RuntimeSettings = FAST) -> RuntimeConfig:
    return RuntimeConfig(servers=servers, runtime=settings)


def our_descendants() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = {p.pid for p in our_descendants()}
    yield
    deadline = time.monotonic() + 5  # polled: exited children may wait a moment to be reaped
    while (left := [p for p in our_descendants() if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:  # clean up before failing, so one broken test does not poison the rest
        p.kill()
    assert not left, f"processes survived the supervisor: {[p.cmdline() for p in left]}"


# -- pure -------------------------------------------------------------------------------------------------


def test_backoff_is_capped_exponential_with_bounded_jitter() -> None:
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=30.0, multiplier=2.0, jitter=0.2)
    mid = [backoff_delay(policy, n, rand=lambda: 0.5) for n in range(1, 9)]
    assert mid == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(policy, 1, rand=lambda: 0.0) == pytest.approx(0.4)
    assert backoff_delay(policy, 1, rand=lambda: 1.0) == pytest.approx(0.6)
    assert backoff_delay(policy, 20, rand=lambda: 1.0) == 30.0  # jitter never exceeds the cap
    assert backoff_delay(policy, 10_000, rand=lambda: 0.5) == 30.0  # no overflow


# -- start-up ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bad_servers_do_not_block_or_crash_the_good_ones() -> None:
    cfg = config(
        demo("hang", "--hang-in-init", startup=3.0),  # first, so a serial start would wait on it
        demo("good1"),
        ServerConfig("missing", StdioTarget("no-such-mcp-server-xyz")),
        demo("dies", "--exit-during-init"),
        demo("good2"),
    )
    started = time.monotonic()
    async with Supervisor(cfg) as sup:
        assert await sup.wait_for(
            lambda: all(sup.server(n).state is ServerState.READY for n in ("good1", "good2")), timeout=20
        )
        # Both good servers got ready while the hanging one was still inside its 3 s startup timeout.
        assert time.monotonic() - started < 3.0 or sup.server("hang").state is ServerState.STARTING
        assert sup.registry.get("good1__echo") is not None and sup.registry.get("good2__echo") is not None

        assert await sup.wait_ready(timeout=15)
        st = {s.name: s for s in sup.servers()}
        assert st["missing"].state is ServerState.FAILED and "not found" in (st["missing"].last_error or "")
        assert st["dies"].state is ServerState.FAILED
        assert "cannot load configuration" in (st["dies"].last_error or "")
        assert st["hang"].state is ServerState.FAILED
        assert "did not finish initializing" in (st["hang"].last_error or "")
        assert st["good1"].tool_count == len(sup.registry.list("good1")) > 5
        assert st["good1"].pid is not None and psutil.pid_exists(st["good1"].pid)
        assert st["good1"].protocol_version

        # Failed servers keep retrying with backoff, and say when.
        assert await sup.wait_for(lambda: sup.server("missing").restarts >= 2, timeout=5)
        with pytest.raises(ServerUnavailable) as info:
            await sup.call_tool("missing", "echo", {"text": "x"}, timeout=5)
        assert info.value.state is ServerState.FAILED and "not found" in str(info.value)
        with pytest.raises(UnknownServer):
            await sup.call_tool("nope", "echo", {}, timeout=5)
        result = await sup.call_tool("good2", "echo", {"text": "still fine"}, timeout=5)
        assert result.content[0].text == "still fine"


@pytest.mark.anyio
async def test_disabled_server_is_stopped_and_never_spawned() -> None:
    cfg = config(demo("off", enabled=False), demo("on"))
    async with Supervisor(cfg) as sup:
        assert await sup.wait_ready(timeout=15)
        off = sup.server("off")
        assert off.state is ServerState.STOPPED and not off.enabled and off.pid is None
        assert sup.registry.list("off") == []


@pytest.mark.anyio
async def test_secrets_are_redacted_from_errors() -> None:
    cfg = config(ServerConfig("s", StdioTarget("no-such-s3cr3t-cmd"), secrets=("s3cr3t",)))
    async with Supervisor(cfg) as sup:
        assert await sup.wait_ready(timeout=10)
        err = sup.server("s").last_error or ""
        assert "not found" in err and "s3cr3t" not in err and "***" in err


# -- crash, reconnect, refresh --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_crash_tools_vanish_then_come_back_and_calls_work() -> None:
    async with Supervisor(config(demo("d"))) as sup:
        assert await sup.wait_ready(timeout=15)
        first_pid = sup.server("d").pid
        seen_gone = anyio.Event()
        sup.registry.subscribe(lambda ch: seen_gone.set() if "d__echo" in ch.removed else None)

        with pytest.raises(ConnectionLost):
            await sup.call_tool("d", "crash", {}, timeout=5)
        with anyio.fail_after(5):
            await seen_gone.wait()  # tools disappeared as soon as the transport died
        assert await sup.registry.wait_until(lambda r: "d__echo" in r, timeout=15)
        st = sup.server("d")
        assert st.state is ServerState.READY and st.restarts == 1 and st.pid not in (None, first_pid)
        result = await sup.call_tool("d", "echo", {"text": "back"}, timeout=5)
        assert result.content[0].text == "back"


@pytest.mark.anyio
async def test_server_killed_mid_call_fails_promptly_and_comes_back(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    async with Supervisor(config(demo("d", "--calls-log", str(log)))) as sup:
        assert await sup.wait_ready(timeout=15)
        pid = sup.server("d").pid
        assert pid is not None
        outcome: list[BaseException] = []
        failed = anyio.Event()

        async def long_call() -> None:
            try:
                await sup.call_tool("d", "sleep", {"seconds": 60}, timeout=60)
            except Exception as exc:
                outcome.append(exc)
            failed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await wait_for_call(log, "sleep")  # the request reached the server: it is mid-call now
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(5):  # the death is noticed, not waited out (the call's timeout is 60 s)
                await failed.wait()
        assert isinstance(outcome[0], ConnectionLost) and outcome[0].sent
        assert await sup.wait_for(
            lambda: sup.server("d").state is ServerState.READY and sup.server("d").restarts == 1, timeout=15
        )
        result = await sup.call_tool("d", "add", {"a": 2, "b": 3}, timeout=5)
        assert result.structured_content == {"result": 5}


@pytest.mark.anyio
async def test_call_timeout_is_typed_and_the_session_survives() -> None:
    async with Supervisor(config(demo("d"))) as sup:
        assert await sup.wait_ready(timeout=15)
        with pytest.raises(CallTimeout):
            await sup.call_tool("d", "sleep", {"seconds": 5}, timeout=0.3)
        result = await sup.call_tool("d", "echo", {"text": "ok"}, timeout=5)
        assert result.content[0].text == "ok" and sup.server("d").restarts == 0


@pytest.mark.anyio
async def test_tools_list_changed_refreshes_the_registry() -> None:
    async with Supervisor(config(demo("d"))) as sup:
        assert await sup.wait_ready(timeout=15)
        assert "d__shout" not in sup.registry
        events = []
        sup.registry.subscribe(events.append)
        await sup.call_tool("d", "register_tool", {"name": "shout"}, timeout=5)
        assert await sup.registry.wait_until(lambda r: "d__shout" in r, timeout=10)
        assert any("d__shout" in ch.added for ch in events)
        assert sup.server("d").tool_count == len(sup.registry.list("d"))
        result = await sup.call_tool("d", "shout", {"text": "hi"}, timeout=5)
        assert result.content[0].text == "shout: hi"


# -- HTTP -------------------------------------------------------------------------------------------------


def start_http_demo(port: int = 0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [PYTHON, DEMO, "--transport", "http", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("LISTENING "), line
    return proc, line.split()[1]


@pytest.mark.anyio
async def test_http_server_restarted_session_lost_then_reconnected() -> None:
    proc, url = start_http_demo()
    try:
        cfg = config(ServerConfig("web", HttpTarget(url), timeouts=ServerTimeouts(startup=10.0)))
        async with Supervisor(cfg) as sup:
            assert await sup.wait_for(lambda: sup.server("web").state is ServerState.READY, timeout=15)
            assert (await sup.call_tool("web", "echo", {"text": "1"}, timeout=5)).content[0].text == "1"

            proc.kill()
            proc.wait()
            # The session is gone: calls fail typed (never hang), tools leave the registry.
            with anyio.fail_after(10):
                while "web__echo" in sup.registry:
                    try:
                        await sup.call_tool("web", "echo", {"text": "x"}, timeout=2)
                    except (ConnectionLost, ServerUnavailable, CallTimeout):
                        pass
                    await anyio.sleep(0.05)
            assert sup.server("web").state in (ServerState.STARTING, ServerState.FAILED)

            port = int(url.rsplit(":", 1)[1].split("/")[0])
            proc, _ = start_http_demo(port)  # a new process: the old Mcp-Session-Id means nothing to it
            assert await sup.wait_for(lambda: sup.server("web").state is ServerState.READY, timeout=15)
            assert sup.server("web").restarts >= 1
            assert (await sup.call_tool("web", "echo", {"text": "2"}, timeout=5)).content[0].text == "2"
    finally:
        proc.kill()
        proc.wait()


# -- shutdown ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shutdown_is_bounded_and_leaves_no_child_process() -> None:
    cfg = config(
        demo("plain"),
        demo("stubborn", "--ignore-sigterm"),
        demo("parent"),
        demo("hang", "--hang-in-init", startup=30.0),
        settings=replace(FAST, shutdown_timeout=8.0),
    )
    registry = ToolRegistry()
    async with Supervisor(cfg, registry) as sup:
        assert await sup.wait_for(
            lambda: all(sup.server(n).state is ServerState.READY for n in ("plain", "stubborn", "parent")),
            timeout=20,
        )
        result = await sup.call_tool("parent", "spawn_grandchild", {}, timeout=5)
        grandchild = int(result.structured_content["result"])
        assert psutil.pid_exists(grandchild)
        assert len(our_descendants()) >= 5  # 4 servers + the grandchild
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert elapsed < 8.0 + 1.0
    assert [s.state for s in sup.servers()] == [ServerState.STOPPED] * 4
    assert len(registry) == 0
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert our_descendants() == []
