"""The `policies` config section: validation with file/line errors and per-tool resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.config import load_config
from agent_runtime.config.policies import load_policies
from agent_runtime.errors import ConfigError


def write(tmp_path: Path, policies: object) -> Path:
    cfg = {
        "mcpServers": {
            "fs": {"command": "python3", "args": ["-V"]},
            "web": {"url": "http://127.0.0.1:9/mcp"},
        },
        "policies": policies,
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def test_defaults_without_a_section(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mcpServers": {"fs": {"command": "python3"}}}))
    pc = load_policies(load_config(path))
    p = pc.for_tool("fs", "read")
    assert p.approval == "never" and p.roots is None and p.egress is not None
    assert p.breaker.window_size == 20 and p.retry.max_attempts == 3 and p.timeout is None
    assert pc.lock_file == tmp_path / "agent-runtime.lock.json" and pc.audit_path is None


def test_layering_global_server_tool(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "deny": ["*delete*"],
            "approval": "destructive",
            "roots": ["./work"],
            "breaker": {"failure_rate": 0.25, "minimum_calls": 3},
            "retry": {"max_attempts": 4},
            "safe_tools": ["get_*"],
            "audit_path": "logs/audit.jsonl",
            "egress_allow": ["10.0.0.0/8"],
            "tools": {"fs/write_*": {"approval": "always"}},
            "servers": {
                "fs": {
                    "deny": ["rm"],
                    "path_args": ["path"],
                    "breaker": {"minimum_calls": 9, "per_tool": True},
                    "max_concurrent_calls": 2,
                    "tools": {"read_file": {"timeout": 5, "safe": True, "max_output_chars": 100}},
                },
                "web": {"egress": False, "approval": "never", "allow": ["fetch"]},
            },
        },
    )
    pc = load_policies(load_config(path))
    read = pc.for_tool("fs", "read_file")
    assert read.timeout == 5 and read.safe is True and read.max_output_chars == 100
    assert read.roots == (str(tmp_path / "work"),) and read.path_args == ("path",)
    assert read.breaker.failure_rate == 0.25 and read.breaker.minimum_calls == 9  # merged field by field
    assert read.tool_breaker == read.breaker and read.retry.max_attempts == 4
    assert (
        read.filter.denial("fs", "rm")
        and read.filter.denial("fs", "x_delete")
        and not read.filter.denial("fs", "ls")
    )
    assert pc.for_tool("fs", "write_file").approval == "always"
    assert pc.for_tool("fs", "get_x").safe is True and pc.for_tool("fs", "put_x").safe is None
    web = pc.for_tool("web", "fetch")
    assert web.egress is None and web.approval == "never" and web.tool_breaker is None
    assert web.filter.denial("web", "other") and not web.filter.denial("web", "fetch")
    assert pc.max_concurrent_calls("fs", 5) == 2 and pc.max_concurrent_calls("web", 5) == 5
    assert pc.audit_path == tmp_path / "logs" / "audit.jsonl"
    assert pc.for_tool("fs", "read_file") is read  # cached


@pytest.mark.parametrize(
    ("policies", "where", "words"),
    [
        ({"approval": "sometimes"}, "policies.approval", "destructive"),
        ({"breaker": {"window_size": 0}}, "policies.breaker.window_size", "greater"),
        ({"servers": {"fs": {"bogus": 1}}}, "policies.servers.fs.bogus", "known keys"),
        ({"servers": {"nope": {}}}, "policies.servers.nope", "no server named"),
        ({"breaker": {"open_seconds": 10, "open_max_seconds": 1}}, "policies.breaker", "open_max_seconds"),
        (
            {"servers": {"fs": {"tools": {"t": {"timeout": -1}}}}},
            "policies.servers.fs.tools.t.timeout",
            "greater",
        ),
    ],
)
def test_errors_name_file_line_and_path(tmp_path: Path, policies: object, where: str, words: str) -> None:
    path = write(tmp_path, policies)
    with pytest.raises(ConfigError) as info:
        load_policies(load_config(path))
    err = info.value
    assert err.json_path == where and err.file == str(path) and err.line is not None
    assert words in str(err)


def test_launch_allowlist_is_enforced_before_spawning(tmp_path: Path) -> None:
    path = write(tmp_path, {"launch": {"allowed_commands": ["node", "uvx"]}})
    with pytest.raises(ConfigError) as info:
        load_policies(load_config(path))
    assert "'fs'" in str(info.value) and "allowlist" in str(info.value)
    assert info.value.json_path == "policies.launch.allowed_commands"
    path = write(tmp_path, {"launch": {"allowed_commands": ["python3"]}})
    assert load_policies(load_config(path)).launch.allowed_commands == ("python3",)
    cfg = tmp_path / "shell.json"
    cfg.write_text(json.dumps({"mcpServers": {"sh": {"command": "bash", "args": ["-c", "curl x | sh"]}}}))
    with pytest.raises(ConfigError, match="shell command line"):
        load_policies(load_config(cfg))
