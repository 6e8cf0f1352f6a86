"""Server log messages, progress and their flood bounds, and cancellation, through a Runtime against real
servers: our notify server (both protocol eras) and server-everything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from agent_runtime.config.types import McpLogLevel, RuntimeConfig, ServerConfig, ServerTimeouts
from agent_runtime.server.metrics import ServerMetrics
from agent_runtime.tools.notices import (
    LOG_BURST,
    MAX_LOG_CHARS,
    MAX_PROGRESS_MESSAGE_CHARS,
    NoticeCounters,
    ProgressRelay,
    ServerLogSink,
)
from agent_runtime.tools.runtime import Runtime
from tests.conftest import EXAMPLES, PYTHON
from tests.transports.conftest import EVERYTHING, needs_everything
from tests.transports.test_cancellation import marked
from transports import StdioTarget
from transports.errors import CallTimeout

pytestmark = pytest.mark.anyio

NOTIFY = str(EXAMPLES / "servers" / "notify_server.py")
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"  # a GitHub-token-shaped value: redacted wherever it shows
ERAS = [pytest.param((), id="2026-07-28"), pytest.param(("--legacy",), id="2025-11-25")]


def notify_config(*flags: str, log_level: McpLogLevel = "info", name: str = "notify") -> RuntimeConfig:
    target = StdioTarget(command=PYTHON, args=(NOTIFY, *flags))
    server = ServerConfig(name, target, log_level=log_level, timeouts=ServerTimeouts(startup=20.0))
    return RuntimeConfig(servers=(server,))


def server_logs(records: list[dict[str, Any]], server: str = "notify") -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == "server log" and r.get("server") == server]


async def until(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until `predicate()` holds: what it watches is fed by notification tasks the SDK spawns, which have no
    event of their own to wait on."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as records:
        yield records


@pytest.mark.parametrize("flags", ERAS)
async def test_server_logs_reach_structlog_filtered_mapped_and_redacted(
    flags: tuple[str, ...], logs: list[dict[str, Any]]
) -> None:
    async with Runtime(notify_config(*flags, log_level="warning")) as rt:
        result = await rt.call_tool("notify__log_levels", {"text": f"token {SECRET}", "logger": "notify.db"})
        assert not result.is_error
        await until(lambda: len(server_logs(logs)) == 5)
        got = server_logs(logs)
        assert [r["server_level"] for r in got] == ["warning", "error", "critical", "alert", "emergency"]
        assert [r["log_level"] for r in got] == ["warning", "error", "critical", "critical", "critical"]
        assert {r["logger"] for r in got} == {"notify.db"}
        assert all(SECRET not in r["data"] and "***" in r["data"] for r in got)
        status = rt.servers()[0]
        # Filtered by the server itself (none reached our own level filter): it was asked for `warning` by
        # logging/setLevel (2025 era) or on the request itself (2026 era).
        assert status.notices.log_messages == 5 and status.notices.log_filtered == 0
        assert rt.health()[0].log_messages == 5


async def test_a_log_flood_is_bounded_counted_and_warned_once(logs: list[dict[str, Any]]) -> None:
    count = 3000
    async with Runtime(notify_config()) as rt:
        result = await rt.call_tool("notify__flood", {"count": count, "kind": "log"}, timeout=30)
        assert result.content[0].text == f"flooded {count}"
        status = rt.supervisor.server("notify")
        await until(lambda: status.notices.log_messages + status.notices.log_dropped == count)
        logged, dropped = status.notices.log_messages, status.notices.log_dropped
        assert dropped > 0 and logged >= LOG_BURST and logged < count
        assert len(server_logs(logs)) == logged
        warnings = [r for r in logs if r.get("event") == "server floods log messages; dropping them"]
        assert len(warnings) == 1 and warnings[0]["server"] == "notify"
        health = rt.health()[0]
        assert health.log_dropped == dropped and rt.servers()[0].to_dict()["log_dropped"] == dropped
        metrics = ServerMetrics()
        metrics.attach_servers(rt.servers)
        exported = metrics.render()[0].decode()
        assert f'_notifications_dropped_total{{kind="log",server="notify"}} {float(dropped)}' in exported


async def test_log_sink_filters_below_its_level_and_cuts_large_data(logs: list[dict[str, Any]]) -> None:
    # A server that ignores logging/setLevel still cannot log below the server's level.
    sink = ServerLogSink("noisy", "warning", (SECRET,))
    sink.receive("info", None, "chatter")
    sink.receive("notice", None, "more chatter")
    sink.receive("error", "x" * 1000, {"blob": "y" * (MAX_LOG_CHARS * 10), "key": SECRET})
    assert (sink.counters.log_filtered, sink.counters.log_messages) == (2, 1)
    (record,) = server_logs(logs, "noisy")
    assert len(record["data"]) < MAX_LOG_CHARS + 50 and "cut at" in record["data"]
    assert len(record["logger"]) < 200 and SECRET not in str(record)


async def test_progress_relay_redacts_cuts_and_ignores_what_is_not_progress() -> None:
    counters = NoticeCounters()
    seen: list[tuple[float, float | None, str | None]] = []
    relay = ProgressRelay(lambda p, t, m: seen.append((p, t, m)), counters, (SECRET,))
    await relay(1, float("inf"), f"uploading with {SECRET} " + "z" * 1000)
    await relay(float("nan"), 3, "not a number")
    relay.close()
    await relay(2, 3, "after the call ended")
    ((progress, total, message),) = seen
    assert (progress, total) == (1, None)
    assert message is not None and SECRET not in message and len(message) < MAX_PROGRESS_MESSAGE_CHARS + 50


@pytest.mark.parametrize("flags", ERAS)
async def test_progress_reaches_the_callback_and_never_extends_the_deadline(flags: tuple[str, ...]) -> None:
    async with Runtime(notify_config(*flags)) as rt:
        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        result = await rt.call_tool("notify__progress", {"steps": 3}, on_progress=on_progress)
        assert result.content[0].text == "done 3"
        await until(lambda: len(seen) == 3)
        assert seen == [(1.0, 3.0, "step 1 of 3"), (2.0, 3.0, "step 2 of 3"), (3.0, 3.0, "step 3 of 3")]

        # Reports every 0.1 s keep coming, yet the 0.6 s deadline holds.
        late: list[float] = []
        outcome = await rt.execute(
            "notify__progress",
            {"steps": 40, "delay": 0.1},
            timeout=0.6,
            on_progress=lambda p, t, m: late.append(p),
        )
        assert outcome.kind == "timeout" and 2 <= len(late) < 40
        with pytest.raises(CallTimeout):
            await rt.call_tool(
                "notify__progress", {"steps": 40, "delay": 0.1}, timeout=0.6, on_progress=print
            )


async def test_a_progress_flood_is_coalesced_for_a_slow_callback() -> None:
    count = 2000
    async with Runtime(notify_config()) as rt:
        release = anyio.Event()
        taken: list[float] = []

        async def slow(progress: float, total: float | None, message: str | None) -> None:
            taken.append(progress)
            await release.wait()  # a terminal that cannot keep up

        result = await rt.call_tool("notify__flood", {"count": count, "kind": "progress"}, on_progress=slow)
        assert result.content[0].text == f"flooded {count}"
        release.set()
        notices = rt.supervisor.server("notify").notices
        await until(lambda: notices.progress_dropped > 0)
        # The callback ran once (then the call ended): the rest was superseded, never queued.
        assert taken[0] == 1.0 and len(taken) <= 2
        assert notices.progress_dropped >= count // 2
        assert rt.health()[0].progress_dropped == notices.progress_dropped


async def test_a_call_past_its_deadline_is_cancelled_on_the_server(tmp_path: Path) -> None:
    # Through the executor's pipeline (its deadline, the monitor's sweep armed); the transports' own tests
    # cover every transport and era (tests/transports/test_cancellation.py).
    marker = tmp_path / "slow.txt"
    async with Runtime(notify_config()) as rt:
        outcome = await rt.execute("notify__slow", {"seconds": 30, "marker": str(marker)}, timeout=0.5)
        assert outcome.kind == "timeout"
        await marked(marker, "cancelled")
        assert rt.health()[0].in_flight == 0


@needs_everything
async def test_server_everything_progress_and_logs() -> None:
    target = StdioTarget(command="node", args=(str(EVERYTHING), "stdio"))
    server = ServerConfig("everything", target, log_level="debug", timeouts=ServerTimeouts(startup=20.0))
    with capture_logs() as records:
        async with Runtime(RuntimeConfig(servers=(server,))) as rt:
            seen: list[tuple[float, float | None]] = []
            result = await rt.call_tool(
                "everything__trigger-long-running-operation",
                {"duration": 0.3, "steps": 3},
                on_progress=lambda p, t, m: seen.append((p, t)),
            )
            assert not result.is_error
            await until(lambda: len(seen) == 3)
            assert seen == [(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)]

            # It logs one random-level message at once when asked to (at `debug`, every level passes).
            await rt.call_tool("everything__toggle-simulated-logging", {})
            await until(lambda: len(server_logs(records, "everything")) >= 1)
            first = server_logs(records, "everything")[0]
            assert "-level message" in first["data"] or "level-message" in first["data"]
            await rt.call_tool("everything__toggle-simulated-logging", {})
