"""`agent-runtime serve` as users start it: a real process with a config, MCP servers and the packaged model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.smollm2
TIME = str(Path(PYTHON).parent / "mcp-server-time")
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], str]]:
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "MCP_CONFIG.json"
    config.write_text(
        json.dumps({"mcpServers": {"time": {"command": TIME, "args": ["--local-timezone", "UTC"]}}})
    )
    proc = subprocess.Popen(
        [
            PYTHON, "-m", "agent_runtime", "serve", "--config", str(config), "--port", "0",
            "--kv-cache-memory", "128MiB", "--max-model-len", "1024",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("LISTENING http://127.0.0.1:"), line
    try:
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serves_the_openai_api(served: tuple[subprocess.Popen[str], str]) -> None:
    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert MODEL in [m.id for m in client.models.list().data]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert r.choices[0].message.content and r.usage is not None and r.usage.completion_tokens <= 4
    port = url.rsplit(":", 1)[1]
    assert httpx.get(url + "/v1/models", headers={"Host": f"rebind.example:{port}"}).status_code == 421
    assert httpx.get(url + "/v1/models", headers={"Origin": "https://rebind.example"}).status_code == 403


def test_metrics_cover_engine_and_mcp_servers(served: tuple[subprocess.Popen[str], str]) -> None:
    _, url = served
    deadline = time.monotonic() + 20
    while True:  # the event-loop sampler and the MCP server come up in the background
        text = httpx.get(url + "/metrics").text
        if (
            'agent_runtime_mcp_server_up{server="time"} 1.0' in text
            and "agent_runtime_event_loop_lag_seconds_count " in text
        ):
            break
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.1)
    assert f'agent_runtime_kv_cache_blocks_total{{model="{MODEL}"}}' in text
    assert 'agent_runtime_mcp_server_tools{server="time"} 2.0' in text


def test_sigterm_stops_server_and_children(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = served
    children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    assert children, "mcp-server-time should be running under the server"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in children):
        assert time.monotonic() < deadline, "a child process outlived the server"
        time.sleep(0.05)
