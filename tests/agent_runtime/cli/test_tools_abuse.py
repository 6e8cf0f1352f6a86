"""`agent-runtime tools` against hostile servers and bad input, as a user runs it: real processes, exit codes,
one-line errors, no tracebacks, nothing fetched or read for a server, nothing written to the cwd."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.agent_runtime.faulty_harness import FAULTY, network_server
from tests.agent_runtime.tools.test_abuse_definitions import HOSTILE, SECRET, recording_http_server
from tests.conftest import PYTHON, ROOT


def cli(
    *args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(
        [PYTHON, "-m", "agent_runtime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        input=stdin,
    )


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def hostile(*flags: str) -> str:
    return " ".join(shlex.quote(x) for x in (PYTHON, HOSTILE, *flags))


def write_config(tmp: Path, servers: dict[str, Any], policies: dict[str, Any] | None = None) -> Path:
    path = tmp / "MCP_CONFIG.json"
    path.write_text(json.dumps({"mcpServers": servers, "policies": policies or {}}))
    return path


def test_schema_references_are_neither_fetched_nor_read(tmp_path: Path) -> None:
    secret_file = tmp_path / "local.json"
    secret_file.write_text(json.dumps({"type": "string", "description": SECRET}))
    with recording_http_server() as (url, hits):
        server = hostile("--ref-url", url, "--ref-file", str(secret_file))
        results = [
            cli("tools", "call", "--stdio", server, name, '{"x": "y"}', "--json")
            for name in ("fetch_ref", "file_ref")
        ]
        listed = cli("tools", "list", "--stdio", server, "--json")
        assert hits == []
    for res in results:
        assert res.returncode == 1, res.stderr
        assert "definition is invalid" in one_line_error(res)
        assert json.loads(res.stdout)["is_error"] is True
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert "hostile_schema_server__ok" in {t["name"] for t in doc["tools"]}
    assert {p["tool_name"] for p in doc["problems"] if p["kind"] == "invalid_definition"} == {
        "fetch_ref",
        "file_ref",
    }
    everything = "".join(r.stdout + r.stderr for r in [*results, listed])
    assert SECRET not in everything


def test_an_unqualified_name_resolves_when_unambiguous(tmp_path: Path) -> None:
    ok = cli("tools", "call", "--stdio", hostile(), "ok", '{"text": "bare name"}')
    assert ok.returncode == 0 and ok.stdout.strip() == "bare name", ok.stderr
    with network_server("http", calls_log=tmp_path / "calls.jsonl") as target:
        url = target.url  # type: ignore[union-attr]  # network_server("http") yields an HttpTarget
        res = cli("tools", "call", "--url", url, "echo", '{"text": "over http"}')
        assert res.returncode == 0 and res.stdout.strip() == "over http", res.stderr
    # Two servers offering `ok`: ambiguous, so it stays unknown (and the error says so).
    two = cli("tools", "call", "--stdio", hostile(), "--stdio", hostile("--malformed"), "ok", "{}")
    assert two.returncode == 2 and "no tool named 'ok'" in one_line_error(two)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"n": NaN}', "NaN"),
        ('{"n": Infinity}', "Infinity"),
        ('{"n": -Infinity}', "Infinity"),
        ('{"n": 1e999}', "out of range"),
        ('{"n": ' + "9" * 5000 + "}", "5000 digits"),
        ("[" * 1200 + "]" * 1200, "nested too deeply"),
        ('{"a": ' * 1200 + "1" + "}" * 1200, "nested too deeply"),
    ],
)
def test_json_arguments_json_cannot_carry_are_usage_errors(text: str, why: str) -> None:
    res = cli("tools", "call", "--stdio", "no-such-server-is-started", "ok", text)
    assert res.returncode == 2, res.stderr
    assert why in one_line_error(res)


@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf", "soon"])
def test_timeout_must_be_positive_and_finite(value: str) -> None:
    res = cli("tools", "call", "--stdio", "no-such-server-is-started", "ok", "{}", "--timeout", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "timeout" in res.stderr


def test_deep_arguments_from_a_file_are_denied_and_audited(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"h": {"command": PYTHON, "args": [HOSTILE]}}, {"audit_path": "audit.jsonl"}
    )
    deep = tmp_path / "deep.json"
    deep.write_text('{"text": "x", "deep": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}")
    res = cli("tools", "call", "h__ok", f"@{deep}", "--config", str(config))
    assert res.returncode == 1 and "nested deeper" in one_line_error(res), res.stderr
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["decision"], r["args"].split(":")[0]) for r in records] == [("deny", "unhashed")]
    assert "invalid_arguments" in records[0]["reason"]
    # Arguments over argv's 128 KiB per-argument cap come from stdin (`-`) or a file (`@FILE`).
    big = "é" * 100_000  # 200 KB of UTF-8
    piped = cli("tools", "call", "h__ok", "-", "--config", str(config), stdin=json.dumps({"text": big}))
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert (
        piped.stdout.startswith(big[:65536]) and "65536 of 100000 characters" in piped.stdout
    )  # all arrived
    missing = cli("tools", "call", "h__ok", f"@{tmp_path / 'nope.json'}", "--config", str(config))
    assert missing.returncode == 2 and "cannot read tool arguments" in one_line_error(missing)


def test_adhoc_runs_write_no_lock_file(tmp_path: Path) -> None:
    res = cli("tools", "call", "--stdio", hostile(), "ok", '{"text": "x"}', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    listed = cli("tools", "list", "--stdio", hostile(), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert list(tmp_path.iterdir()) == []


def test_table_flags_and_denial_hints(tmp_path: Path) -> None:
    def servers(variant: int) -> dict[str, Any]:
        return {"faulty": {"command": PYTHON, "args": [FAULTY, "--variant", str(variant)]}}

    config = write_config(tmp_path, servers(0), {"deny": ["*mutate*"]})
    first = cli("tools", "list", "--config", str(config))  # pins every tool (trust on first use)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "agent-runtime.lock.json").exists()
    write_config(tmp_path, servers(1), {"deny": ["*mutate*"]})  # the server now rewords `echo`
    table = cli("tools", "list", "--config", str(config))
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "description" in line)
    assert "flags" in header
    echo_row = next(line for line in table.stdout.splitlines() if "faulty__echo" in line)
    assert "quarantined" in echo_row
    assert all("quarantined" not in line for line in table.stdout.splitlines() if "faulty__work" in line)
    quarantined = cli("tools", "call", "faulty__echo", '{"text": "x"}', "--config", str(config))
    assert quarantined.returncode == 1
    assert "tools approve faulty__echo" in one_line_error(quarantined)
    denied = cli("tools", "call", "faulty__mutate", '{"payload": "x"}', "--config", str(config))
    line = one_line_error(denied)
    assert denied.returncode == 1 and "deny" in line and "tools approve" not in line
