"""`agent-runtime servers status` and `tools list|call` as a user runs them: real processes, exit codes,
output, signals, and the rule that these commands never import torch."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import EXAMPLES, PYTHON, ROOT, wait_for_call_sync

DEMO = f"{shlex.quote(PYTHON)} {shlex.quote(str(EXAMPLES / 'servers' / 'demo_server.py'))}"
ADHOC = ["--stdio", DEMO]  # ad-hoc server named after the script: demo_server


def cli(
    *args: str, timeout: float = 60, python_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [PYTHON, *python_flags, "-m", "agent_runtime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_tools_list_json_and_never_imports_torch() -> None:
    res = cli("tools", "list", *ADHOC, "--json", python_flags=("-X", "importtime"))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    names = {t["name"] for t in doc["tools"]}
    assert {"demo_server__echo", "demo_server__add", "demo_server__fail"} <= names
    echo = next(t for t in doc["tools"] if t["name"] == "demo_server__echo")
    assert echo["server"] == "demo_server" and echo["tool_name"] == "echo"
    assert echo["input_schema"]["properties"]["text"]["type"] == "string"
    assert doc["servers"][0]["state"] == "ready" and doc["problems"] == []
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")
    }
    assert "agent_runtime.tools.runtime" in imported  # the importtime trace is real
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "tools list imported torch"


def test_tools_call_prints_text_and_exit_codes() -> None:
    ok = cli("tools", "call", "demo_server__echo", '{"text": "hello there"}', *ADHOC)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "hello there"

    as_json = cli("tools", "call", "demo_server__add", '{"a": 2, "b": 40}', *ADHOC, "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["is_error"] is False and doc["structured_content"] == {"result": 42} and doc["text"] == "42"

    tool_error = cli("tools", "call", "demo_server__fail", '{"message": "broken on purpose"}', *ADHOC)
    assert tool_error.returncode == 1
    assert "broken on purpose" in tool_error.stderr and "Traceback" not in tool_error.stderr


def test_usage_errors_exit_2_without_traceback() -> None:
    cases = [
        ("tools", "call", "demo_server__echo", "{not json", *ADHOC),
        ("tools", "call", "demo_server__echo", "[1, 2]", *ADHOC),
        ("tools", "call", "demo_server__ecoh", '{"text": "x"}', *ADHOC),
        ("tools", "list", "--config", "x.json", *ADHOC),
        ("tools", "list", "--server", "nope", *ADHOC),
        ("tools", "list", "--config", "/nonexistent/MCP_CONFIG.json"),
    ]
    results = [cli(*args) for args in cases]
    for args, res in zip(cases, results, strict=True):
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert "not valid JSON" in results[0].stderr
    assert "demo_server__echo" in results[2].stderr  # the close-match hint


def test_servers_status_json_shows_ready_and_failed() -> None:
    res = cli("servers", "status", *ADHOC, "--stdio", "no-such-mcp-server-xyz --flag", "--json")
    assert res.returncode == 1  # not every server is ready
    servers = {s["name"]: s for s in json.loads(res.stdout)["servers"]}
    assert servers["demo_server"]["state"] == "ready" and servers["demo_server"]["tool_count"] > 5
    assert servers["demo_server"]["pid"] and servers["demo_server"]["protocol_version"]
    failed = servers["no-such-mcp-server-xyz"]
    assert failed["state"] == "failed" and "not found" in failed["last_error"]


def test_time_server_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "MCP_CONFIG.json"
    config.write_text(json.dumps({"mcpServers": {"time": {"command": "mcp-server-time"}}}))
    res = cli(
        "tools",
        "call",
        "time__get_current_time",
        '{"timezone": "Asia/Tokyo"}',
        "--config",
        str(config),
        "--json",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["is_error"] is False and "Asia/Tokyo" in doc["text"]
    listed = cli("tools", "list", "--config", str(config), "--server", "time", "--json")
    assert {t["name"] for t in json.loads(listed.stdout)["tools"]} >= {
        "time__get_current_time",
        "time__convert_time",
    }


def test_sigterm_shuts_down_servers_and_exits(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    server = ["--stdio", f"{DEMO} --calls-log {shlex.quote(str(log))}"]
    proc = subprocess.Popen(
        [PYTHON, "-m", "agent_runtime", "tools", "call", "demo_server__sleep", '{"seconds": 60}', *server],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_for_call_sync(log, "sleep", timeout=60)  # the call reached the server: the CLI waits on it now
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the CLI's server is not its child"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "SIGTERM" in err and "Traceback" not in err
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv", [("tools", "list", "--json"), ("servers", "status", "--json")])
def test_empty_config_is_fine(tmp_path: Path, argv: tuple[str, ...]) -> None:
    config = tmp_path / "empty.json"
    config.write_text('{"mcpServers": {}}')
    res = cli(*argv, "--config", str(config))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc.get("tools", []) == [] and doc["servers"] == []
