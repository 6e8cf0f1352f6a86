"""`agent-runtime serve` as a service manager runs it: live before ready (model loading, MCP servers starting),
request ids in every log line of a request, SIGTERM draining the requests in flight within `--drain-seconds`,
and a SIGTERM during startup. Real processes, the packaged SmolLM2, a real MCP server."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.smollm2
TIME = str(Path(PYTHON).parent / "mcp-server-time")
MODEL = "smollm2-135m-instruct"


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    logs: list[dict[str, Any]] = field(default_factory=list)  # stderr JSON lines, as they come
    stdout: queue.Queue[str] = field(default_factory=queue.Queue)

    def wait_stdout(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.stdout.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line


def start(tmp: Path, *flags: str, mcp_delay: float = 0.0) -> Served:
    """Start serve with info logs (JSON on stderr, not a terminal) and return once its HTTP server is up,
    before it is ready. `mcp_delay` holds the MCP server's start up (the model loads meanwhile)."""
    config = tmp / "MCP_CONFIG.json"
    command = ["sh", "-c", f"sleep {mcp_delay}; exec {TIME} --local-timezone UTC"]
    server = {"command": command[0], "args": command[1:]}
    # the launch policy refuses inline shell code unless the shell is listed by name
    policies = {"launch": {"allowed_commands": ["sh", TIME]}}
    config.write_text(json.dumps({"mcpServers": {"time": server}, "policies": policies}))
    proc = subprocess.Popen(
        [
            PYTHON, "-m", "agent_runtime", "--log-level", "info", "serve", "--config", str(config),
            "--port", "0", "--kv-cache-memory", "64MiB", "--max-model-len", "2048", *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    logs: list[dict[str, Any]] = []
    up: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"event": line.strip()}
            logs.append(record)
            if record.get("event", "").startswith("http server up"):
                up.put(record["url"])

    served = Served(proc, "", logs)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            served.stdout.put(line)

    threading.Thread(target=read_stderr, daemon=True).start()
    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        served.url = up.get(timeout=60)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"serve did not come up: {logs[-5:]}") from None
    return served


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def stream_completion(url: str, max_tokens: int, events: list[str], started: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as exc:
        events.append(f"cut: {type(exc).__name__}")
    finally:
        started.set()


def test_live_before_ready_request_ids_and_drain(tmp_path: Path, cleanup: list[Any]) -> None:
    s = start(tmp_path, "--drain-seconds", "60", mcp_delay=4)
    cleanup.append(s.proc)
    http = httpx.Client(base_url=s.url, timeout=30)
    # live at once, not ready: the model loads and the MCP server is held up for 4 s
    assert http.get("/health").status_code == 200
    ready = http.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "starting"
    assert "mcp_servers" in ready.json()["waiting_for"]
    refused = http.get("/v1/models")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    deadline = time.monotonic() + 60
    while http.get("/ready").json()["waiting_for"] != ["mcp_servers"]:  # the model is in, the server not
        assert time.monotonic() < deadline and s.proc.poll() is None
        time.sleep(0.1)
    assert http.get("/ready").status_code == 503
    assert s.wait_stdout("LISTENING ", 60).split()[1] == s.url  # printed once ready
    assert http.get("/ready").status_code == 200
    assert MODEL in [m["id"] for m in http.get("/v1/models").json()["data"]]

    # request ids: the client's is echoed, in the error body, and in the request's log lines
    r = http.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-Id": "lifecycle-test-1"},
    )
    assert r.status_code == 404 and r.headers["x-request-id"] == "lifecycle-test-1"
    assert r.json()["error"]["request_id"] == "lifecycle-test-1"
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        headers={"X-Request-Id": "lifecycle-test-2"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "lifecycle-test-2"
    generated = r.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while not [x for x in s.logs if x.get("request_id") == generated and x.get("event") == "request"]:
        assert time.monotonic() < deadline, s.logs[-5:]
        time.sleep(0.05)
    line = next(x for x in s.logs if x.get("request_id") == "lifecycle-test-1")
    assert line["event"] == "request" and line["status"] == 404 and line["path"] == "/v1/chat/completions"
    other = http.get("/health")
    assert other.headers["x-request-id"] not in ("lifecycle-test-1", "lifecycle-test-2")

    # SIGTERM while a 120-token stream runs: no new connections, the stream finishes, exit 0
    events: list[str] = []
    started = threading.Event()
    client = threading.Thread(target=stream_completion, args=(s.url, 120, events, started))
    client.start()
    assert started.wait(60) and events and not events[0].startswith("cut")
    s.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    deadline = t0 + 10
    while True:  # the listening socket closes at once
        try:
            httpx.get(s.url + "/health", timeout=1)
        except httpx.HTTPError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    client.join(120)
    assert events[-1] == "[DONE]", events[-3:]
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text
    assert s.proc.wait(60) == 0
    assert any(x.get("event") == "draining" and x.get("in_flight") == 1 for x in s.logs), s.logs[-10:]


def test_drain_grace_cancels_what_is_left_and_sigterm_while_starting(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    # a stream far longer than the grace period is cut when it runs out, and the process exits
    s = start(tmp_path, "--drain-seconds", "1")
    cleanup.append(s.proc)
    s.wait_stdout("LISTENING ", 90)
    events: list[str] = []
    started = threading.Event()
    client = threading.Thread(target=stream_completion, args=(s.url, 1800, events, started))
    client.start()
    assert started.wait(60) and events and not events[0].startswith("cut")
    s.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert s.proc.wait(30) == 0
    stopped_after = time.monotonic() - t0
    client.join(30)
    assert "[DONE]" not in events and events[-1].startswith("cut"), events[-3:]
    assert 1 <= stopped_after < 20, stopped_after

    # SIGTERM before the server is ready: startup is abandoned and the process exits at once, cleanly
    s = start(tmp_path, mcp_delay=30)
    cleanup.append(s.proc)
    assert httpx.get(s.url + "/ready").status_code == 503
    s.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert s.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
