"""Prometheus against what `agent-runtime serve` really exports: the alert rules pass promtool's checks and unit
tests, every metric they and the Grafana dashboard read is one /metrics serves, and a real Prometheus (the Debian binary on 127.0.0.1)
scrapes a running server, loads the rules and answers queries for our metrics over its HTTP API."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLES
from tests.ops.conftest import ALERTS, ALERTS_TEST, Served, tool

pytestmark = pytest.mark.smollm2
MODEL = "smollm2-135m-instruct"
DASHBOARD = EXAMPLES / "grafana_dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
SELECTOR = re.compile(r"\b(agent_runtime_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # every alert has a unit test that expects it to fire
    tested = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {c["alertname"] for t in tested for c in t["alert_rule_test"] if c.get("exp_alerts")}
    assert fired == {r["alert"] for r in rules()}


def test_the_rules_and_the_dashboard_read_metrics_that_serve_exports(served: Served) -> None:
    http = httpx.Client(base_url=served.url, timeout=60)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200  # the labelled series (TTFT by model, requests by route) exist from now on

    def scrape() -> dict[str, set[str]]:
        text = http.get("/metrics").text
        if 'agent_runtime_mcp_server_up{server="time"} 1.0' not in text:
            return {}  # the MCP server is still starting
        labels: dict[str, set[str]] = {}  # sample name -> label names seen on it
        for family in text_string_to_metric_families(text):
            for suffix in SUFFIXES.get(family.type, ("",)):
                labels.setdefault(family.name + suffix, set())
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
        return labels

    exported = wait_until(scrape, 30, "the time MCP server up in /metrics")
    readers = [(rule["alert"], rule["expr"]) for rule in rules()]
    dashboard = json.loads(DASHBOARD.read_text())
    readers += [
        (f"dashboard panel {panel['title']!r}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    used = 0
    for reader, expr in readers:
        for name, selector in SELECTOR.findall(expr):
            used += 1
            assert name in exported, f"{reader} reads {name}, which /metrics does not serve"
            wanted = set(MATCHER.findall(selector)) - {"le", "job", "instance"}
            if exported[name]:  # a series exists: the labels matched on must be its labels
                assert wanted <= exported[name], f"{reader}: {name} has no label {wanted - exported[name]}"
    assert used >= 40


@pytest.fixture
def prometheus(served: Served, tmp_path: Path) -> Iterator[str]:
    """The Debian prometheus binary scraping `served` every second with our alert rules loaded, on a free
    127.0.0.1 port, its storage in a temporary directory; yields its URL."""
    binary = tool("prometheus")
    target = served.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{"job_name": "agent-runtime", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    for _attempt in range(3):  # the free port found here could be taken before prometheus binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with log.open("w") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            if proc.poll() is None:
                assert time.monotonic() < deadline, f"prometheus not ready in 30 s: {log.read_text()[-2000:]}"
                yield url
                return
            if "address already in use" not in log.read_text():
                raise AssertionError(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    raise AssertionError("no free port for prometheus in three tries")


def test_a_real_prometheus_scrapes_serve_and_loads_the_rules(served: Served, prometheus: str) -> None:
    api = httpx.Client(base_url=prometheus + "/api/v1", timeout=10)

    def query(promql: str) -> list[dict[str, Any]]:
        body = api.get("/query", params={"query": promql}).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    # an engine gauge, as Prometheus stored it from our /metrics, with the scrape job's labels
    blocks = wait_until(
        lambda: query("agent_runtime_kv_cache_blocks_total"), 30, "agent_runtime_kv_cache_blocks_total"
    )
    assert blocks[0]["metric"]["job"] == "agent-runtime" and blocks[0]["metric"]["model"] == MODEL
    assert float(blocks[0]["value"][1]) > 0
    assert [float(r["value"][1]) for r in query('up{job="agent-runtime"}')] == [1.0]
    # counters work across scrapes: Prometheus' own scrapes of /metrics are requests it sees counted
    rate = wait_until(
        lambda: query('sum(rate(agent_runtime_http_requests_total{route="/metrics"}[5s])) > 0'),
        30,
        "a rate of /metrics requests",
    )
    assert 0 < float(rate[0]["value"][1]) < 10

    # the alert rules loaded and evaluate without errors against the real series; none fires on a healthy server
    def evaluated() -> list[dict[str, Any]]:
        groups = api.get("/rules").json()["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        return loaded if loaded and all(r.get("lastEvaluation", "").startswith("20") for r in loaded) else []

    loaded = wait_until(evaluated, 30, "the alert rules evaluated")
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
    alerts = api.get("/alerts").json()["data"]["alerts"]
    firing = [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"]
    assert firing == [], firing
