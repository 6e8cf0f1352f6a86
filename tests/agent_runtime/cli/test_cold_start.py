"""Cold start of `agent-runtime tools list` with no servers: which modules it imports (never a timing),
and the lazy structlog set-up that makes skipping structlog safe."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

from tests.conftest import PYTHON, ROOT

# Heavy packages a config with no servers has no use for. Each was on this path once: structlog pulls
# in rich (~0.1 s), pydantic costs ~0.1 s, jsonschema, psutil and tenacity ~0.02 s each; the MCP SDK and
# torch cost far more.
NEVER = {
    "torch",
    "transformers",
    "mcp",
    "mcp_types",
    "httpx",
    "httpx2",
    "pydantic",
    "pydantic_core",
    "structlog",
    "jsonschema",
    "psutil",
    "tenacity",
    "xgrammar",
}


def _imported(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the CLI under `-X importtime`; returns the process and the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if k != "AGENT_RUNTIME_CONFIG"}
    res = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "agent_runtime.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no ./MCP_CONFIG.json, no lock file: only what --config names
        env=env | {"PYTHONPATH": str(ROOT)},
    )
    modules = {
        line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")
    }
    return res, {m.split(".", 1)[0] for m in modules}


def _empty_config(tmp_path: Path) -> Path:
    config = tmp_path / "empty.json"
    config.write_text('{"mcpServers": {}}', encoding="utf-8")
    return config


def test_tools_list_json_imports_nothing_heavy(tmp_path: Path) -> None:
    res, top = _imported(
        "tools", "list", "--config", str(_empty_config(tmp_path)), "--json", tmp_path=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == {"tools": [], "problems": [], "servers": []}
    assert {"agent_runtime", "anyio", "policies"} <= top  # the trace is real: the runtime did start
    assert not top & (NEVER | {"rich"}), f"tools list --json imported {sorted(top & (NEVER | {'rich'}))}"


def test_tools_list_table_imports_only_rich_on_top(tmp_path: Path) -> None:
    res, top = _imported("tools", "list", "--config", str(_empty_config(tmp_path)), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0 tools" in res.stdout
    assert "rich" in top  # the table needs it, and only the table
    assert not top & NEVER, f"tools list imported {sorted(top & NEVER)}"


def test_resources_and_prompts_list_json_import_nothing_heavy(tmp_path: Path) -> None:
    for command, key in (("resources", "resources"), ("prompts", "prompts")):
        res, top = _imported(
            command, "list", "--config", str(_empty_config(tmp_path)), "--json", tmp_path=tmp_path
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout) == {key: []}
        assert {"agent_runtime", "anyio"} <= top
        assert not top & (NEVER | {"rich"}), f"{command} list --json imported {sorted(top & NEVER)}"


def test_runtime_section_absent_equals_empty(tmp_path: Path) -> None:
    """Without a `runtime` section the loader skips pydantic; the settings must be those of `{}`."""
    from agent_runtime.config import parse_config
    from agent_runtime.config.policies import load_policies

    bare = parse_config('{"mcpServers": {}}', file=str(tmp_path / "a.json"), env={})
    empty = parse_config('{"mcpServers": {}, "runtime": {}}', file=str(tmp_path / "b.json"), env={})
    assert bare.runtime == empty.runtime
    no_section = load_policies(bare)
    section = load_policies(parse_config('{"mcpServers": {}, "policies": {"deny": []}}', env={}))
    assert no_section.section is None and section.section is not None
    for attr in ("pinning", "approval_timeout", "max_concurrent_calls_global"):
        assert getattr(no_section, attr) == getattr(section, attr) == getattr(section.model, attr)
    assert no_section.launch == section.launch
    assert no_section.max_concurrent_calls("x", 7) == section.max_concurrent_calls("x", 7) == 7
    assert no_section.model == section.model.model_copy(update={"deny": None})


def test_logging_configures_structlog_when_something_imports_it(tmp_path: Path) -> None:
    """configure_logging before structlog is imported: records below the level never import it, and
    whoever imports structlog later gets our configuration (JSON on stderr, the level filter)."""
    script = textwrap.dedent(
        """
        import json, sys
        from agent_runtime.logging import configure_logging, get_logger

        configure_logging("info", json=True)
        log = get_logger("probe")
        log.debug("below the level")
        assert "structlog" not in sys.modules, "a filtered record imported structlog"

        import structlog  # as transports/* do at import

        structlog.get_logger("direct").debug("filtered by structlog too")
        structlog.get_logger("direct").info("direct record", token="s3cret")
        log.warning("proxied record", n=1)
        """
    )
    res = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ)
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # logs go to stderr: stdout may carry results or JSON-RPC
    records = [json.loads(line) for line in res.stderr.splitlines()]
    assert [(r["event"], r["level"]) for r in records] == [
        ("direct record", "info"),
        ("proxied record", "warning"),
    ]
    assert records[0]["token"] == "***" and records[1]["n"] == 1
