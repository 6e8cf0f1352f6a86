"""Fixtures of the operations tests (`make test-ops`): the Prometheus tools, found on PATH, and one running
`agent-runtime serve` with an MCP server and an audit log, shared by the tests of a module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, model_cache_env

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
TIME = str(Path(PYTHON).parent / "mcp-server-time")
INSTALL_HINT = "`make test-ops` installs it (Debian package `prometheus`)"


def tool(name: str) -> str:
    """The path of a Prometheus binary; the test is skipped, saying why, where it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return path


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    audit: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`agent-runtime serve` on 127.0.0.1 (a free port) with the packaged SmolLM2, the time MCP server and an
    audit log, ready (LISTENING printed) when the fixture returns."""
    tmp = tmp_path_factory.mktemp("ops-serve")
    audit = tmp / "audit.jsonl"
    config = tmp / "MCP_CONFIG.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {"time": {"command": TIME, "args": ["--local-timezone", "UTC"]}},
                "policies": {"audit_path": str(audit)},
            }
        )
    )
    proc = subprocess.Popen(
        [
            PYTHON, "-m", "agent_runtime", "serve", "--config", str(config), "--port", "0",
            "--kv-cache-memory", "64MiB", "--max-model-len", "1024",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **model_cache_env()},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once ready; a failed start closes stdout (an empty line)
    try:
        assert line.startswith("LISTENING http://127.0.0.1:"), f"serve did not start: {line!r}"
        yield Served(proc, line.split()[1], audit)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
