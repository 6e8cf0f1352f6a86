"""`agent-runtime run`: the answer on stdout, the transcript with --json, exit codes 0/1/2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.agent_runtime.agent_fixtures import time_agent, time_server, write_config
from tests.conftest import PYTHON, ROOT, model_cache_env

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A fresh HOME (no user config or pins leak in), but the suite's model cache: converting the GGUF again
    # in every run would cost more than the run itself.
    env = {"PATH": str(Path(PYTHON).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd)}
    return subprocess.run(
        [PYTHON, "-m", "agent_runtime", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**env, **model_cache_env()},
    )  # fmt: skip


def test_run_answers_tokyo_with_json_transcript(tmp_path: Path) -> None:
    write_config(tmp_path, {"time": time_server()}, {"default": time_agent()})
    proc = _run("--json", "What time is it in Tokyo?", cwd=tmp_path)  # ./MCP_CONFIG.json by default
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "answer"
    call = doc["tool_calls"][0]
    assert call["name"] == "time__get_current_time" and call["arguments"] == {"timezone": "Asia/Tokyo"}
    assert "datetime: 2026-03-14T14:26:53+09:00" in call["observation"]  # the test server's frozen clock
    assert "14:26" in doc["answer"], doc["answer"]
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert doc["usage"]["steps"] == 2


def test_run_exit_codes_for_budget_stop_and_config_error(tmp_path: Path) -> None:
    write_config(tmp_path, {"time": time_server()}, {"default": time_agent(max_steps=1)})
    stopped = _run("What time is it in Tokyo?", cwd=tmp_path)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert stopped.stdout == "" and "stopped: max_steps" in stopped.stderr
    unknown = _run("--agent", "nope", "hi", cwd=tmp_path)
    assert unknown.returncode == 2 and "no agent named 'nope'" in unknown.stderr
    bad = write_config(tmp_path, {"time": time_server()}, {"default": {"max_tool_calls": -1}})
    invalid = _run("--config", str(bad), "hi", cwd=tmp_path)
    assert invalid.returncode == 2 and "agents.default.max_tool_calls" in invalid.stderr
