"""stdio transport against the real demo server: calls, big results, pagination, faults and process hygiene."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import anyio
import mcp_types as types
import psutil
import pytest

from tests.conftest import wait_for_call
from tests.transports.conftest import demo_target
from transports import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ServerRequestError,
    StartupTimeout,
    StdioTarget,
    connect,
)
from transports.stdio import StdioTransport, build_env

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


def _same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _exists(path: Path) -> bool:
    return path.exists()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_for_line(conn: object, prefix: str, within: float = 5.0) -> str:
    with anyio.fail_after(within):
        while True:
            for line in conn.stderr.tail(200):  # type: ignore[attr-defined]  # conn: a stdio Connection, typed object here; its stderr ring is set
                if line.startswith(prefix):
                    return line
            await anyio.sleep(0.02)


async def test_roundtrip_tools_and_annotations() -> None:
    async with connect(demo_target(), startup_timeout=15) as conn:
        assert conn.protocol_version == "2026-07-28"
        tools = {t.name: t for t in await conn.list_all_tools(timeout=5)}
        assert {"echo", "add", "sleep", "big_output", "fail", "crash", "lookup", "delete_item"} <= set(tools)
        assert tools["lookup"].annotations is not None and tools["lookup"].annotations.read_only_hint is True
        assert tools["lookup"].annotations.idempotent_hint is True
        assert (
            tools["delete_item"].annotations is not None and tools["delete_item"].annotations.destructive_hint
        )
        result = await conn.call_tool("add", {"a": 2, "b": 40}, timeout=5)
        assert not result.is_error and result.content[0].text == "42"  # type: ignore[union-attr]  # add answers in a text block
        failed = await conn.call_tool("fail", {"message": "boom"}, timeout=5)
        assert failed.is_error and "boom" in failed.content[0].text  # type: ignore[union-attr]  # fail's error is a text block
        me = await conn.call_tool("whoami", {}, timeout=5)
        assert me.structured_content is not None
        assert me.structured_content["pid"] == conn.pid
        assert me.structured_content["pgid"] == conn.pid  # its own process group
    assert conn.closed.is_set()
    assert _gone(conn.pid)  # type: ignore[arg-type]  # a stdio connection has a pid


async def test_eight_mib_result() -> None:
    async with connect(demo_target(), startup_timeout=15) as conn:
        result = await conn.call_tool("big_output", {"n_bytes": 8 * MiB}, timeout=30)
        text = result.content[0].text  # type: ignore[union-attr]  # big_output answers in one text block
        assert len(text) == 8 * MiB and text.startswith("0123456789abc")


async def test_pagination_is_followed() -> None:
    target = demo_target("--page-size", "4", "--extra-tools", "30")
    async with connect(target, startup_timeout=15) as conn:
        first = await conn.client.list_tools(cursor=None, cache_mode="bypass")
        assert len(first.tools) == 4 and first.next_cursor is not None  # the server really paginates
        tools = await conn.list_all_tools(timeout=10)
        names = [t.name for t in tools]
        assert len(names) == len(set(names)) == 14 + 30
        assert "filler_0029" in names and "echo" in names


async def test_json_rpc_error_is_typed() -> None:
    async with connect(demo_target(), startup_timeout=15) as conn:
        with pytest.raises(ServerRequestError) as info:
            await conn.call_tool("rpc_error", {"code": -32042, "message": "nope"}, timeout=5)
        assert info.value.code == -32042 and info.value.message == "nope"
        unknown = await conn.call_tool("no_such_tool", {}, timeout=5)
        assert unknown.is_error  # MCPServer answers unknown tools with a tool error, not a JSON-RPC error


async def test_call_timeout_then_connection_still_usable() -> None:
    async with connect(demo_target(), startup_timeout=15) as conn:
        with (
            anyio.fail_after(5),
            pytest.raises(CallTimeout),
        ):  # the 10 s sleep is cut at 0.5 s, not waited out
            await conn.call_tool("sleep", {"seconds": 10}, timeout=0.5)
        echoed = await conn.call_tool("echo", {"text": "still here"}, timeout=5)
        assert echoed.content[0].text == "still here"  # type: ignore[union-attr]  # echo answers in a text block


async def test_crash_mid_call_is_connection_lost_fast() -> None:
    async with connect(demo_target(), startup_timeout=15) as conn:
        with anyio.fail_after(5), pytest.raises(ConnectionLost) as info:  # the death, not the 30 s timeout
            await conn.call_tool("crash", {}, timeout=30)
        assert info.value.sent is True
        with anyio.fail_after(1):
            await conn.closed.wait()
        with pytest.raises(ConnectionLost) as after:
            await conn.call_tool("echo", {"text": "x"}, timeout=5)
        assert after.value.sent is False  # provably never left: safe to retry anywhere


async def test_killed_by_signal_mid_call(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    async with connect(demo_target("--calls-log", str(log)), startup_timeout=15) as conn:
        lost: list[ConnectionLost] = []
        ended = anyio.Event()

        async def call() -> None:
            with pytest.raises(ConnectionLost) as info:
                await conn.call_tool("sleep", {"seconds": 30}, timeout=60)
            lost.append(info.value)
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_for_call(log, "sleep")  # the request reached the server: it is mid-call now
            os.kill(conn.pid, signal.SIGKILL)  # type: ignore[arg-type]  # a stdio connection has a pid
            with anyio.fail_after(5):  # the death is noticed, not waited out (the call's timeout is 60 s)
                await ended.wait()
        assert lost and lost[0].sent is True


async def test_grandchild_holding_stdout_does_not_hang_a_call() -> None:
    async with connect(demo_target("--spawn-grandchild-and-exit"), startup_timeout=15) as conn:
        grandchild = int((await _wait_for_line(conn, "GRANDCHILD ")).split()[1])
        assert not _gone(grandchild)
        with anyio.fail_after(5), pytest.raises(ConnectionLost):  # not a 30 s wait on the grandchild's pipe
            await conn.call_tool("crash", {}, timeout=30)
    assert _gone(grandchild)


async def test_grandchild_killed_even_when_server_exits_cleanly() -> None:
    async with connect(demo_target("--spawn-grandchild-and-exit"), startup_timeout=15) as conn:
        grandchild = int((await _wait_for_line(conn, "GRANDCHILD ")).split()[1])
        spawned = await conn.call_tool("spawn_grandchild", {}, timeout=5)
        second = int(spawned.content[0].text)  # type: ignore[union-attr]  # spawn_grandchild answers the pid as text
        assert not _gone(grandchild) and not _gone(second)
        start = time.monotonic()
    assert time.monotonic() - start < conn.target.eof_grace + conn.target.term_grace + 1.0  # type: ignore[union-attr]  # demo_target() is a StdioTarget
    assert _gone(grandchild) and _gone(second)


async def test_server_ignoring_sigterm_is_killed_within_bound() -> None:
    target = demo_target("--ignore-sigterm", eof_grace=0.5, term_grace=0.5)
    async with connect(target, startup_timeout=15) as conn:
        pid = conn.pid
        await conn.call_tool("echo", {"text": "hi"}, timeout=5)
        start = time.monotonic()
    assert time.monotonic() - start < 0.5 + 0.5 + 1.5
    assert _gone(pid)  # type: ignore[arg-type]  # a stdio connection has a pid


async def test_garbage_on_stdout_is_skipped() -> None:
    async with connect(demo_target("--garbage-stdout"), startup_timeout=15) as conn:
        for i in range(5):
            result = await conn.call_tool("echo", {"text": f"m{i}"}, timeout=5)
            assert result.content[0].text == f"m{i}"  # type: ignore[union-attr]  # echo answers in a text block
        assert len(await conn.list_all_tools(timeout=5)) == 14


async def test_exit_during_init_reports_stderr() -> None:
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        async with connect(demo_target("--exit-during-init"), startup_timeout=15):
            pytest.fail("connected to a server that exits during init")
    assert time.monotonic() - start < 5.0
    assert not isinstance(info.value, StartupTimeout)
    assert any("cannot load configuration" in line for line in info.value.stderr_tail)
    assert "cannot load configuration" in info.value.reason


def _children_with(flag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if flag in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def test_hang_in_init_times_out_and_kills() -> None:
    target = demo_target("--hang-in-init", eof_grace=0.3, term_grace=0.3)
    start = time.monotonic()
    with pytest.raises(StartupTimeout) as info:
        async with connect(target, startup_timeout=1.5):
            pytest.fail("connected to a hanging server")
    assert time.monotonic() - start < 1.5 + 0.3 + 0.3 + 1.5
    assert any("hanging before the handshake" in line for line in info.value.stderr_tail)
    assert _children_with("--hang-in-init") == []


async def test_env_is_allowlisted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("OPENAI_API_KEY", "do-not-leak-either")
    target = demo_target(env={"DEMO_SETTING": "from-config"})
    async with connect(target, startup_timeout=15) as conn:

        async def env(name: str) -> str:
            result = await conn.call_tool("env", {"name": name}, timeout=5)
            return result.content[0].text  # type: ignore[union-attr]  # env answers in a text block

        assert await env("AWS_SECRET_ACCESS_KEY") == "<unset>"
        assert await env("OPENAI_API_KEY") == "<unset>"
        assert await env("DEMO_SETTING") == "from-config"
        assert await env("PATH") == os.environ["PATH"]


def test_build_env_is_the_sdk_allowlist_plus_exactly_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one source of a child's environment: parent secrets, other variables and exported bash functions
    (Shellshock) never pass; what the config sets always does."""
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_do_not_leak")
    monkeypatch.setenv("RANDOM_VAR", "x")
    monkeypatch.setenv("SHELL", "() { :; }; echo pwned")
    env = build_env(StdioTarget(command="srv", env={"MY_SETTING": "1", "SERVICE_TOKEN": "configured"}))
    assert "GITHUB_TOKEN" not in env and "RANDOM_VAR" not in env and "SHELL" not in env
    assert env["MY_SETTING"] == "1" and env["SERVICE_TOKEN"] == "configured"
    assert env["PATH"] == os.environ["PATH"]


async def test_cwd_and_stderr_log(tmp_path: os.PathLike[str]) -> None:
    log_path = Path(tmp_path) / "logs" / "demo.stderr"
    target = demo_target(cwd=str(tmp_path), stderr_log=log_path)
    async with connect(target, startup_timeout=15) as conn:
        me = await conn.call_tool("whoami", {}, timeout=5)
        assert me.structured_content is not None
        assert _same_path(me.structured_content["cwd"], tmp_path)
        await conn.call_tool("fail", {"message": "logged-failure"}, timeout=5)
        with anyio.fail_after(5):
            while "logged-failure" not in " ".join(conn.stderr.tail(50)):  # type: ignore[union-attr]  # noqa: ASYNC110
                await anyio.sleep(0.02)
    assert "logged-failure" in log_path.read_text()


async def test_missing_command_is_connect_error() -> None:
    with pytest.raises(ConnectError) as info:
        async with connect(StdioTarget(command="no-such-mcp-server-xyz"), startup_timeout=5):
            pytest.fail("connected to a missing command")
    assert "not found" in info.value.reason and info.value.hint


async def test_no_shell_interpretation(tmp_path: os.PathLike[str]) -> None:
    marker = Path(tmp_path) / "pwned"
    target = StdioTarget(command=sys.executable, args=("-c", "import sys; sys.exit(0)", f"; touch {marker}"))
    with pytest.raises(ConnectError):
        async with connect(target, startup_timeout=5):
            pass
    assert not _exists(marker)


async def test_tools_list_changed_reaches_message_handler() -> None:
    seen: list[object] = []
    arrived = anyio.Event()

    async def handler(message: object) -> None:
        seen.append(message)
        if isinstance(message, types.ToolListChangedNotification):
            arrived.set()

    async with connect(demo_target(), startup_timeout=15, message_handler=handler) as conn:
        assert len(await conn.list_all_tools(timeout=5)) == 14
        # The 2026-era notification rides a subscriptions/listen stream that connect opens in the background.
        with anyio.fail_after(5):
            while True:
                await conn.call_tool("register_tool", {"name": f"dyn_{len(seen)}"}, timeout=5)
                with anyio.move_on_after(0.5):
                    await arrived.wait()
                if arrived.is_set():
                    break
        names = {t.name for t in await conn.list_all_tools(timeout=5)}
        assert any(n.startswith("dyn_") for n in names)


async def test_owner_cancelled_inside_connection_cleans_up(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    pids: list[int] = []

    async def cancel_mid_call(scope: anyio.CancelScope) -> None:
        await wait_for_call(log, "sleep")
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with connect(demo_target("--calls-log", str(log)), startup_timeout=15) as conn:
            pids.append(conn.pid)  # type: ignore[arg-type]  # a stdio connection has a pid
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_mid_call, scope)
                await conn.call_tool("sleep", {"seconds": 30}, timeout=60)
    assert scope.cancelled_caught
    assert pids and _gone(pids[0])


async def test_owner_cancelled_during_startup_leaves_no_process(tmp_path: Path) -> None:
    stderr_log = tmp_path / "server.stderr"

    async def cancel_mid_startup(scope: anyio.CancelScope) -> None:
        with anyio.fail_after(15):  # the server says so on stderr: connect waits on its handshake now
            while "hanging before the handshake" not in _text(stderr_log):  # noqa: ASYNC110 - another process
                await anyio.sleep(0.01)
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_mid_startup, scope)
            target = demo_target("--hang-in-init", eof_grace=0.2, term_grace=0.2, stderr_log=stderr_log)
            async with connect(target, startup_timeout=30):
                pytest.fail("connected to a hanging server")
    assert scope.cancelled_caught
    assert _children_with("--hang-in-init") == []


async def test_cancelled_mid_spawn_leaves_no_process() -> None:
    """A cancel that lands while the process is being spawned must still end in our shutdown, which waits for
    the process to be gone: asyncio alone would SIGKILL the server without waiting (a supervisor stopping during
    a respawn left a live child behind)."""
    target = StdioTarget(
        command=sys.executable, args=("-c", "import time; time.sleep(60)"), eof_grace=0.05, term_grace=0.5
    )
    leaked = []
    for i in range(40):  # cancels spread across the spawn: 0 to 4 ms after it starts
        with anyio.move_on_after(i * 0.0001):
            async with StdioTransport(target):
                await anyio.sleep_forever()
        leaked += [p.pid for p in psutil.Process().children(recursive=True)]
    assert leaked == []


async def test_caller_exception_is_not_wrapped() -> None:
    with pytest.raises(KeyError):
        async with connect(demo_target(), startup_timeout=15) as conn:
            await conn.call_tool("echo", {"text": "x"}, timeout=5)
            raise KeyError("caller's own error")
