"""Prometheus metrics: per-MCP-server figures from a real supervisor + executor + monitor, stream timings, and
event-loop lag, read back through the text exposition format."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_runtime.server.metrics import LATENCY_BUCKETS, ServerMetrics, StreamTimer
from tests.agent_runtime.faulty_harness import harness

pytestmark = pytest.mark.anyio


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    data, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_per_server_metrics_from_the_monitor(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        m = ServerMetrics()
        m.attach_servers(h.supervisor.servers, h.executor.monitor)
        assert (await h.executor.execute("faulty__echo", {"text": "hi"})).ok
        assert (await h.executor.execute("faulty__echo", {"text": "again"})).ok
        assert (await h.executor.execute("faulty__fail", {})).kind == "tool_error"
        s = samples(m)
        srv = (("server", "faulty"),)
        assert s[("agent_runtime_mcp_server_up", srv)] == 1
        assert s[("agent_runtime_mcp_server_state", srv)] == 0
        assert s[("agent_runtime_mcp_server_breaker_state", srv)] == 0
        assert s[("agent_runtime_mcp_server_tools", srv)] > 5
        assert s[("agent_runtime_mcp_server_restarts_total", srv)] == 0
        assert s[("agent_runtime_mcp_calls_total", (("outcome", "result"), ("server", "faulty")))] == 2
        assert s[("agent_runtime_mcp_calls_total", (("outcome", "tool_error"), ("server", "faulty")))] == 1
        assert s[("agent_runtime_mcp_errors_total", srv)] == 0
        assert s[("agent_runtime_mcp_call_duration_seconds_count", srv)] == 3
        assert s[("agent_runtime_mcp_call_duration_seconds_sum", srv)] > 0

        # the histogram stays cumulative across scrapes and only folds in new calls
        assert samples(m)[("agent_runtime_mcp_call_duration_seconds_count", srv)] == 3
        await h.executor.execute("faulty__echo", {"text": "more"})
        s = samples(m)
        assert s[("agent_runtime_mcp_call_duration_seconds_count", srv)] == 4
        inf = s[("agent_runtime_mcp_call_duration_seconds_bucket", (("le", "+Inf"), ("server", "faulty")))]
        top = s[
            (
                "agent_runtime_mcp_call_duration_seconds_bucket",
                (("le", str(float(LATENCY_BUCKETS[-1]))), ("server", "faulty")),
            )
        ]
        assert inf == 4 and top == 4

        # a crashed server shows as down, then restarted
        crashed = await h.executor.execute("faulty__crash", {})
        assert not crashed.ok
        assert await h.supervisor.wait_for(lambda: h.supervisor.server("faulty").restarts > 0, 20)
        s = samples(m)
        assert s[("agent_runtime_mcp_server_restarts_total", srv)] >= 1
        assert s[("agent_runtime_mcp_errors_total", srv)] >= 1


async def test_stream_timer_and_event_loop_lag() -> None:
    m = ServerMetrics()
    timer = StreamTimer(m, "model-a", arrival=0.0)
    import time

    timer.arrival = time.perf_counter()
    timer.submitted()
    timer.tokens(1)
    await anyio.sleep(0.01)  # the gap under test: the inter-token latency must show it
    timer.tokens(3)  # three tokens in one output: three inter-token gaps
    timer.finished("stop", prompt_tokens=7, completion_tokens=4)

    def lag() -> tuple[float, float]:
        s = samples(m)
        return s[("agent_runtime_event_loop_lag_seconds_count", ())], s[
            ("agent_runtime_event_loop_lag_seconds_sum", ())
        ]

    async def until(cond: Any) -> None:  # the sampler's own observations, polled (it sets no event)
        with anyio.fail_after(10):
            while not cond():  # noqa: ASYNC110
                await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(m.watch_event_loop, 0.01)
        await until(lambda: lag()[0] >= 2)  # the sampler runs
        count, lag_sum = lag()
        time.sleep(0.05)  # noqa: ASYNC251 - block the loop on purpose: the next sample must show the lag
        await until(lambda: lag()[0] > count)  # the sample that spans the block
        tg.cancel_scope.cancel()
    s = samples(m)
    model = (("model", "model-a"),)
    assert s[("agent_runtime_time_to_first_token_seconds_count", model)] == 1
    assert s[("agent_runtime_inter_token_latency_seconds_count", model)] == 3
    assert s[("agent_runtime_inter_token_latency_seconds_sum", model)] >= 0.009
    assert s[("agent_runtime_prompt_tokens_total", model)] == 7
    assert s[("agent_runtime_generation_tokens_total", model)] == 4
    assert (
        s[("agent_runtime_requests_finished_total", (("finish_reason", "stop"), ("model", "model-a")))] == 1
    )
    assert s[("agent_runtime_event_loop_lag_seconds_count", ())] >= 3
    assert s[("agent_runtime_event_loop_lag_last_seconds", ())] >= 0
    assert s[("agent_runtime_event_loop_lag_seconds_sum", ())] - lag_sum >= 0.04


def test_engine_snapshot_is_exported() -> None:
    from inference.metrics import MetricsCollector

    c = MetricsCollector()
    c.record_admitted(0.25, 10)
    c.record_tokens(1, [0.5], [])
    c.record_step(2, 12, 0.1, 5, 2)
    snap = c.snapshot(
        running=2, waiting=3, kv_total=100, kv_used=25, prefix_query=10, prefix_hit=4, preemptions=1
    )
    m = ServerMetrics()
    m.attach_engine("model-a", lambda: snap)
    s = samples(m)
    model = (("model", "model-a"),)
    assert s[("agent_runtime_kv_cache_usage_ratio", model)] == 0.25
    assert s[("agent_runtime_prefix_cache_hit_rate", model)] == 0.4
    assert s[("agent_runtime_engine_requests_waiting", model)] == 3
    assert s[("agent_runtime_engine_requests_running", model)] == 2
    assert s[("agent_runtime_engine_preemptions_total", model)] == 1
    assert s[("agent_runtime_engine_queue_wait_seconds", (("model", "model-a"), ("quantile", "0.5")))] == 0.25
    assert s[("agent_runtime_engine_tokens_per_second", model)] == pytest.approx(10.0)


def test_servers_without_monitor() -> None:
    m = ServerMetrics()
    status = SimpleNamespace(name="s1", state="failed", tool_count=0, restarts=2)
    m.attach_servers(lambda: [status])
    s = samples(m)
    assert s[("agent_runtime_mcp_server_up", (("server", "s1"),))] == 0
    assert s[("agent_runtime_mcp_server_state", (("server", "s1"),))] == 4
    assert s[("agent_runtime_mcp_server_restarts_total", (("server", "s1"),))] == 2


def test_grafana_dashboard_uses_exported_metrics() -> None:
    import json
    import re

    from agent_runtime.tools.audit import AuditLog
    from agent_runtime.tools.monitor import Monitor
    from inference.metrics import MetricsCollector
    from tests.conftest import EXAMPLES

    m = ServerMetrics()
    snap = MetricsCollector().snapshot(
        running=0, waiting=0, kv_total=1, kv_used=0, prefix_query=0, prefix_hit=0, preemptions=0
    )
    m.attach_engine("m", lambda: snap)
    m.attach_servers(lambda: [SimpleNamespace(name="s", state="ready", tool_count=1, restarts=0)], Monitor())
    m.attach_audit(AuditLog())
    m.observe_http("/v1/models", "GET", 200, 0.01)
    m.rejected.labels("401").inc()
    m.http_in_flight.labels("/v1/models")
    timer = StreamTimer(m, "m", 0.0)
    timer.submitted()
    timer.tokens(1)
    timer.tokens(1)
    timer.finished("stop", 1, 2)
    m.event_loop_lag.observe(0.001)
    exported = {name for name, _ in samples(m)}
    dashboard = json.loads((EXAMPLES / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"agent_runtime_[a-z_]+", e)}
    assert len(used) > 20
    assert used <= exported, sorted(used - exported)
