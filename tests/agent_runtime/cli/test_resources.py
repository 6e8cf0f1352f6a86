"""`agent-runtime resources list|templates|read` and `prompts list|get` as a user runs them: real processes,
output, files written, and exit codes (0 done, 1 the request failed, 2 a usage error)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.agent_runtime.cli.test_tools import cli
from tests.conftest import EXAMPLES, PYTHON

SERVER = f"{shlex.quote(PYTHON)} {shlex.quote(str(EXAMPLES / 'servers' / 'resources_server.py'))}"
ADHOC = ["--stdio", SERVER]  # ad-hoc server named after the script: resources_server


def test_resources_list_table_and_json() -> None:
    res = cli("resources", "list", *ADHOC)
    assert res.returncode == 0, res.stderr
    assert "4 resources" in res.stdout and "note://blob" in res.stdout
    res = cli("resources", "list", *ADHOC, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["resources"]
    assert [(r["uri"], r["server"]) for r in rows][:2] == [
        ("note://1", "resources_server"),
        ("note://2", "resources_server"),
    ]
    res = cli("resources", "templates", *ADHOC, "--json")
    assert json.loads(res.stdout)["templates"][0]["uri_template"] == "note://{id}"


def test_resources_read_text_blob_and_errors(tmp_path: Path) -> None:
    res = cli("resources", "read", "note://2", *ADHOC)
    assert res.returncode == 0 and res.stdout == "note 2: the launch code is 2222\n", res.stderr
    res = cli("resources", "read", "note://blob", *ADHOC)  # binary: summarised, never dumped on a terminal
    assert res.returncode == 0 and "256 bytes: use -o FILE" in res.stdout
    out = tmp_path / "blob.bin"
    res = cli("resources", "read", "note://blob", "-o", str(out), *ADHOC)
    assert res.returncode == 0 and out.read_bytes() == bytes(range(256))
    res = cli("resources", "read", "note://77", *ADHOC)  # the server's own error: the request failed
    assert res.returncode == 1 and "no resource note://77" in res.stderr
    res = cli("resources", "read", "https://elsewhere/x", *ADHOC)  # nobody offers it: a usage error
    assert res.returncode == 2 and "no server lists the resource" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli(
        "resources", "read", "note://1", "--server", "resources_server", "--stdio", SERVER + " --tools-only"
    )
    assert res.returncode == 2 and "does not offer resources" in res.stderr


def test_prompts_list_and_get() -> None:
    res = cli("prompts", "list", *ADHOC, "--json")
    assert res.returncode == 0, res.stderr
    prompts = {p["name"]: p for p in json.loads(res.stdout)["prompts"]}
    assert [a["name"] for a in prompts["greet"]["arguments"]] == ["name", "style"]
    res = cli("prompts", "get", "greet", "--arg", "name=Ada", "--arg", "style=formal", *ADHOC)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "# a greeting",
        "[user] Write a formal greeting for Ada.",
        "[assistant] Of course.",
    ]
    res = cli("prompts", "get", "greet", "--arg", "nmae=Ada", *ADHOC)
    assert res.returncode == 2 and "unknown argument(s) nmae" in res.stderr and "Traceback" not in res.stderr
    res = cli("prompts", "get", "greet", "--arg", "oops", *ADHOC)
    assert res.returncode == 2 and "is not KEY=VALUE" in res.stderr
    res = cli("prompts", "get", "gret", *ADHOC)
    assert res.returncode == 2 and "did you mean 'greet'" in res.stderr
