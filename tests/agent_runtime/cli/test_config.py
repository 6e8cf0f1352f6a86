"""`agent-runtime config check`: exit codes, one-line errors, redaction, and no torch on the import path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

CLI = str(Path(PYTHON).parent / "agent-runtime")
TOKEN = "tok-H2-do-not-print-9f8e7d"

SECRET_CONFIG = {
    "mcpServers": {
        "api": {
            "url": "https://api.example.com/mcp",
            "bearer_token": "${env:TOKEN}",
            "headers": {"X-Api-Key": "${env:TOKEN}", "X-Client": "tests"},
        },
        "local": {
            "command": "mcp-server-time",
            "args": ["--token", "${env:TOKEN}"],
            "env": {"SERVICE_PASSWORD": "${env:TOKEN}", "PLAIN": "visible-value"},
        },
    }
}


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "AGENT_RUNTIME_CONFIG"}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_shipped_config_table() -> None:
    result = cli("config", "check")  # defaults to ./MCP_CONFIG.json
    assert result.returncode == 0, result.stderr
    assert "time" in result.stdout and "mcp-server-time --local-timezone UTC" in result.stdout
    assert "stdio" in result.stdout and "time__" in result.stdout


def test_check_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"mcpServers": {"t": {"url": "ws://127.0.0.1:9/mcp", "enabled": false}}, "model": {}}')
    result = cli("config", "check", str(path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["file"] == str(path.resolve())
    (server,) = data["servers"]
    assert server["name"] == "t" and server["enabled"] is False and server["tool_prefix"] == "t__"
    assert server["target"] == {
        "transport": "websocket",
        "url": "ws://127.0.0.1:9/mcp",
        "headers": {},
        "bearer_token": None,
    }
    assert data["sections"] == ["model"]
    assert data["runtime"]["tool_timeout_secs"] == 30


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_secrets_never_printed(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(SECRET_CONFIG))
    result = cli("config", "check", str(path), *(["--json"] if as_json else []), env={"TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert TOKEN[:12] not in result.stdout  # not even a wrapped fragment of it
    assert "***" in result.stdout and "visible-value" in result.stdout
    if as_json:
        local = json.loads(result.stdout)["servers"][1]["target"]
        assert local["args"] == ["--token", "***"] and local["env"]["SERVICE_PASSWORD"] == "***"


def test_invalid_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "mcpServers": {\n    "time": {"command": "x", "args": ["a", 5]}\n  }\n}\n')
    result = cli("config", "check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f'error: {path}:3:44 at mcpServers.time.args[1]: expected a string (hint: quote the value, e.g. "8080")'
    ]


def test_unset_variable_and_missing_file_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(SECRET_CONFIG))
    result = cli("config", "check", str(path))
    assert result.returncode == 2 and "environment variable TOKEN is not set" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("config", "check", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "config file not found" in result.stderr and "hint:" in result.stderr


def test_no_file_anywhere_exits_2(tmp_path: Path) -> None:
    result = cli("config", "check", cwd=tmp_path)
    assert result.returncode == 2 and "AGENT_RUNTIME_CONFIG" in result.stderr
    (tmp_path / "elsewhere.json").write_text('{"mcpServers": {}}')
    result = cli(
        "config", "check", cwd=tmp_path, env={"AGENT_RUNTIME_CONFIG": str(tmp_path / "elsewhere.json")}
    )
    # The table's title is the file's path: a long temporary path wraps it over lines.
    assert result.returncode == 0 and "0 server(s)" in " ".join(result.stdout.split())


def test_config_check_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from agent_runtime.cli.main import main\n"
        "rc = main(['config', 'check', 'MCP_CONFIG.json', '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'inference', 'xgrammar') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "HEAVY [] 0" in result.stderr, result.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "torch" not in imported and "agent_runtime.config.loader" in imported


def test_cold_start_is_measured() -> None:
    """Measures (does not assert) the cold start of `agent-runtime config check`; prints it with -s."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = cli("config", "check")
        runs.append(time.perf_counter() - start)
        assert result.returncode == 0
    print(
        f"\nagent-runtime config check cold start: best {min(runs) * 1000:.0f} ms of {len(runs)}",
        file=sys.stderr,
    )
