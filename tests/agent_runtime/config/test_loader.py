"""Config loading: every dialect into the normalised dataclasses, every bad input into a located ConfigError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.config import (
    adhoc_config,
    default_config_path,
    load_config,
    parse_config,
    redact_config,
    section_error,
)
from agent_runtime.config.positions import format_path, parse_path
from agent_runtime.config.types import ReconnectPolicy, RuntimeSettings, ServerTimeouts
from agent_runtime.errors import ConfigError
from tests.conftest import ROOT
from transports.targets import HttpTarget, StdioTarget, WebSocketTarget


def parse(text: str, env: dict[str, str] | None = None, file: str = "cfg.json"):
    return parse_config(text, file=file, env=env or {})


def error_of(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle` in `text`."""
    return text[: text.index(needle)].count("\n") + 1


# ---------------------------------------------------------------------------------------------- formats


def test_claude_desktop_stdio_and_remote() -> None:
    config = parse(
        """{
          "mcpServers": {
            "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"],
                     "env": {"TZ": "UTC"}, "cwd": "/tmp"},
            "remote": {"url": "https://mcp.example.com/mcp", "headers": {"X-Client": "us"}},
            "legacy": {"url": "http://127.0.0.1:9000/sse", "transport": "sse"},
            "cursor": {"url": "http://127.0.0.1:9001/mcp", "type": "streamable_http"},
            "sock": {"url": "wss://mcp.example.com/ws"}
          }
        }"""
    )
    by_name = {s.name: s for s in config.servers}
    assert list(by_name) == ["time", "remote", "legacy", "cursor", "sock"]
    time = by_name["time"]
    assert time.target == StdioTarget(
        command="mcp-server-time", args=("--local-timezone", "UTC"), env={"TZ": "UTC"}, cwd="/tmp"
    )
    assert time.source == "mcpServers" and time.enabled and time.prefix == "time__"
    assert time.timeouts == ServerTimeouts()
    remote = by_name["remote"].target
    assert isinstance(remote, HttpTarget) and remote.kind == "streamable_http"
    assert remote.url == "https://mcp.example.com/mcp" and remote.headers == {"X-Client": "us"}
    assert isinstance(by_name["legacy"].target, HttpTarget) and by_name["legacy"].target.kind == "sse"
    assert by_name["cursor"].target.kind == "streamable_http"
    assert isinstance(by_name["sock"].target, WebSocketTarget)
    assert config.runtime == RuntimeSettings() and config.sections == {}


def test_vscode_format_ignores_inputs_and_accepts_jsonc() -> None:
    config = parse(
        """{
          // VS Code writes JSONC
          "inputs": [{"type": "promptString", "id": "tok", "password": true}],
          "servers": {
            "fetch": {"type": "stdio", "command": "mcp-server-fetch", "args": [],},
            "gh": {"type": "http", "url": "https://api.example.com/mcp/"},
            /* legacy SSE */ "old": {"type": "sse", "url": "http://127.0.0.1:1/sse"}
          },
        }"""
    )
    assert [s.name for s in config.servers] == ["fetch", "gh", "old"]
    assert all(s.source == "vscode" for s in config.servers)
    assert config.servers[0].target == StdioTarget(command="mcp-server-fetch")
    assert config.servers[1].target.kind == "streamable_http"
    assert config.servers[2].target.kind == "sse"


def test_vscode_workspace_folder(tmp_path: Path) -> None:
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "mcp.json").write_text(
        '{"servers": {"fs": {"type": "stdio", "command": "srv", "args": ["${workspaceFolder}/data"]}}}'
    )
    config = load_config(vscode / "mcp.json", env={})
    assert config.servers[0].target.args == (f"{tmp_path.resolve()}/data",)


def test_mistralrs_format() -> None:
    text = """{
          "servers": [
            {"id": "fs", "name": "Filesystem Tools",
             "source": {"type": "Process", "command": "npx", "args": ["-y", "srv", "."], "work_dir": "/tmp",
                        "env": {"MCP_LOG_LEVEL": "info"}},
             "enabled": true, "tool_prefix": "fs", "resources": ["file://**"]},
            {"name": "Hugging Face MCP", "source": {"type": "Http", "url": "https://hf.co/mcp", "timeout_secs": 45,
             "headers": {"User-Agent": "x/1"}}, "bearer_token": "hf_abcdefgh", "enabled": false},
            {"name": "ws", "source": {"type": "WebSocket", "url": "ws://127.0.0.1:8765/mcp", "timeout_secs": 5,
             "headers": null}}
          ],
          "auto_register_tools": true,
          "tool_timeout_secs": 12,
          "max_concurrent_calls": 7
        }"""
    config = parse(text)
    fs, hf, ws = config.servers
    assert fs.name == "Filesystem_Tools" and fs.source == "mistral.rs"
    assert fs.target == StdioTarget(
        command="npx", args=("-y", "srv", "."), env={"MCP_LOG_LEVEL": "info"}, cwd="/tmp"
    )
    assert fs.prefix == "fs_"  # mistral.rs joins prefix and tool with one underscore
    assert fs.timeouts.tool == 12  # top-level tool_timeout_secs is the runtime default
    assert hf.name == "Hugging_Face_MCP" and not hf.enabled
    assert isinstance(hf.target, HttpTarget) and hf.target.bearer_token == "hf_abcdefgh"
    assert hf.target.headers == {"User-Agent": "x/1"}
    assert hf.timeouts.tool == 45 and hf.timeouts.request == 45  # per-source timeout overrides
    assert hf.secrets == ("hf_abcdefgh",)
    assert isinstance(ws.target, WebSocketTarget) and ws.timeouts.tool == 5
    assert ws.timeouts.connect == 5  # bent down to keep connect <= tool
    assert config.runtime.tool_timeout == 12
    assert config.runtime.max_concurrent_calls_global == 7  # mistral.rs's cap is across all servers
    # every tool is registered, as mistral.rs's default; `false` is refused rather than ignored
    refused = text.replace('"auto_register_tools": true', '"auto_register_tools": false')
    with pytest.raises(ConfigError, match="auto_register_tools false is not supported"):
        parse_config(refused, env={})


def test_own_sections_and_per_server_keys(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "$schema": "https://example.com/schema.json",
            "mcpServers": {
                "time": {
                    "command": "mcp-server-time",
                    "timeouts": {
                        "startup_secs": 20,
                        "connect_secs": 2,
                        "request_secs": 15,
                        "tool_secs": 9,
                        "per_tool": {"get_current_time": 3},
                    },
                    "tool_prefix": "t_",
                    "trusted": True,
                    "max_concurrent_calls": 3,
                    "kill_grace_secs": 0.5,
                    "enabled": False,
                }
            },
            "runtime": {
                "tool_timeout_secs": 11,
                "max_concurrent_calls": 4,
                "max_concurrent_calls_global": 40,
                "shutdown_timeout_secs": 5,
                "reconnect": {"initial_delay_secs": 0.1, "max_delay_secs": 4, "multiplier": 3, "jitter": 0},
                "log_dir": "logs",
            },
            "policies": {"deny": ["x"]},
            "model": {"name": "smollm2"},
            "agents": {"default": {}},
        }
    )
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(text)
    config = load_config(path, env={})
    s = config.servers[0]
    assert s.timeouts == ServerTimeouts(
        startup=20, connect=2, request=15, tool=9, per_tool={"get_current_time": 3}
    )
    assert s.prefix == "t_" and s.trusted and s.max_concurrent_calls == 3 and not s.enabled
    assert s.target.term_grace == 0.5
    assert s.target.stderr_log == tmp_path.resolve() / "logs" / "time.log"
    assert config.runtime == RuntimeSettings(
        tool_timeout=11,
        max_concurrent_calls=4,
        max_concurrent_calls_global=40,
        shutdown_timeout=5,
        reconnect=ReconnectPolicy(initial_delay=0.1, max_delay=4, multiplier=3, jitter=0),
        log_dir=tmp_path.resolve() / "logs",
    )
    assert config.sections == {
        "policies": {"deny": ["x"]},
        "model": {"name": "smollm2"},
        "agents": {"default": {}},
    }
    assert config.path == path.resolve()
    assert config.server("time") is s


def test_runtime_tool_timeout_is_the_server_default_and_http_read_timeout_covers_tools() -> None:
    config = parse(
        '{"runtime": {"tool_timeout_secs": 7},'
        ' "mcpServers": {"h": {"url": "http://127.0.0.1:1/mcp", "timeouts": {"per_tool": {"slow": 900}}}}}'
    )
    s = config.servers[0]
    assert s.timeouts.tool == 7
    assert s.target.read_timeout == 900 and s.target.connect_timeout == s.timeouts.connect


def test_empty_config_and_no_servers() -> None:
    assert parse("{}").servers == ()
    assert parse('{"mcpServers": {}}').servers == ()
    assert parse('{"servers": []}').servers == ()


def test_names_are_normalised() -> None:
    config = parse('{"mcpServers": {"my server/v2": {"command": "x"}, "..": {"command": "y"}}}')
    assert [s.name for s in config.servers] == ["my_server_v2", "_."]


def test_env_interpolation_and_defaults() -> None:
    config = parse(
        '{"mcpServers": {"s": {"command": "${env:BIN}", "args": ["--x=${env:MISSING:-fallback}", "$${env:LIT}"],'
        ' "env": {"HOME_DIR": "${env:HOME_DIR}"}}}}',
        env={"BIN": "mcp-server-time", "HOME_DIR": "/home/u"},
    )
    t = config.servers[0].target
    assert t.command == "mcp-server-time"
    assert t.args == ("--x=fallback", "${env:LIT}")
    assert t.env == {"HOME_DIR": "/home/u"}
    # values interpolated into env are treated as secrets, whatever the variable is called
    assert config.servers[0].secrets == ("/home/u",)


def test_secrets_recorded_and_redacted() -> None:
    config = parse(
        """{"mcpServers": {
          "api": {"url": "https://user:hunter22@api.example.com/mcp?api_key=qqqq1111&x=1",
                  "headers": {"Authorization": "Bearer ${env:GH_TOKEN}", "X-Trace": "${env:TRACE}"}},
          "local": {"command": "srv", "args": ["--token", "${env:GH_TOKEN}"], "env": {"OPENAI_API_KEY": "sk-literal"}},
          "bt": {"url": "http://127.0.0.1:1/mcp", "bearer_token": "${env:BT}"}
        }, "model": {"api_key": "model-key-123"}}""",
        env={"GH_TOKEN": "ghp_123456", "TRACE": "trace-value", "BT": "bearer-xyz"},
    )
    api, local, bt = config.servers
    assert set(api.secrets) == {"Bearer ghp_123456", "ghp_123456", "trace-value", "hunter22", "qqqq1111"}
    assert set(local.secrets) == {"ghp_123456", "sk-literal"}  # args: by the variable's name
    assert bt.secrets == ("bearer-xyz",)
    text = "ghp_123456 trace-value hunter22 qqqq1111 sk-literal bearer-xyz model-key-123 ok"
    assert redact_config(text, config) == "*** *** *** *** *** *** *** ok"


def test_short_values_are_not_recorded_as_secrets() -> None:
    config = parse('{"mcpServers": {"s": {"command": "x", "env": {"DEBUG_TOKEN": "1"}}}}')
    assert config.servers[0].secrets == ()


def test_adhoc_config() -> None:
    config = adhoc_config(
        stdio=[
            "mcp-server-time --local-timezone 'Europe/Paris'",
            "python -m examples.servers.echo",
            "mcp-server-time",
        ],
        url=["http://127.0.0.1:8000/mcp"],
        sse=["http://127.0.0.1:8001/sse"],
        ws=["ws://localhost:9/mcp"],
        headers={"X-Api-Key": "key-abcdef"},
        bearer_token="tok-123456",
    )
    names = [s.name for s in config.servers]
    assert names == ["mcp-server-time", "echo", "mcp-server-time-2", "127.0.0.1", "127.0.0.1-2", "localhost"]
    assert config.servers[0].target.args == ("--local-timezone", "Europe/Paris")
    assert config.servers[1].target == StdioTarget(command="python", args=("-m", "examples.servers.echo"))
    http, sse, ws = config.servers[3:]
    assert http.target.kind == "streamable_http" and sse.target.kind == "sse"
    assert isinstance(ws.target, WebSocketTarget) and ws.target.bearer_token == "tok-123456"
    assert http.target.headers == {"X-Api-Key": "key-abcdef"}
    assert set(http.secrets) == {"tok-123456", "key-abcdef"}
    assert all(s.source == "cli" for s in config.servers)


def test_adhoc_config_errors() -> None:
    with pytest.raises(ConfigError, match="--stdio needs a command"):
        adhoc_config(stdio=["  "])
    with pytest.raises(ConfigError, match="not an absolute URL"):
        adhoc_config(url=["127.0.0.1:8000"])
    with pytest.raises(ConfigError, match=r"server 'localhost'.*absolute http"):
        adhoc_config(url=["ftp://localhost/x"])


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENT_RUNTIME_CONFIG", raising=False)
    assert default_config_path() is None
    monkeypatch.setenv("AGENT_RUNTIME_CONFIG", str(tmp_path / "other.json"))
    assert default_config_path() == tmp_path / "other.json"
    (tmp_path / "MCP_CONFIG.json").write_text("{}")
    assert default_config_path() == tmp_path / "MCP_CONFIG.json"


def test_shipped_example_config_is_valid() -> None:
    config = load_config(ROOT / "MCP_CONFIG.json", env={})
    time = config.server("time")
    assert time.target.command == "mcp-server-time"
    assert time.target.args == ("--local-timezone", "UTC")


def test_paths_round_trip() -> None:
    for path in [("mcpServers", "time", "args", 1), ("mcpServers", "my server", "env", "A.B"), ("agents",)]:
        assert parse_path(format_path(path)) == path
    assert format_path(("mcpServers", "time", "args", 1)) == "mcpServers.time.args[1]"
    assert format_path(("mcpServers", "a b")) == 'mcpServers["a b"]'


# ---------------------------------------------------------------------------------------------- errors

BAD: list[tuple[str, str, str, str]] = [
    # (name, config text, expected json path, the text on the line the error points at)
    (
        "wrong type in args",
        '{"mcpServers": {"time": {"command": "x",\n "args": ["a", 5]}}}',
        "mcpServers.time.args[1]",
        "5",
    ),
    (
        "both command and url",
        '{"mcpServers": {\n"t": {"command": "x", "url": "http://a/"}}}',
        "mcpServers.t",
        '"t"',
    ),
    ("neither command nor url", '{"mcpServers": {\n"t": {"args": []}}}', "mcpServers.t", '"t"'),
    (
        "unknown per-server key",
        '{"mcpServers": {"t": {"command": "x",\n"comand": "y"}}}',
        "mcpServers.t.comand",
        "comand",
    ),
    (
        "unknown transport",
        '{"mcpServers": {"t": {"url": "http://a/",\n"transport": "grpc"}}}',
        "mcpServers.t.transport",
        "grpc",
    ),
    (
        "duplicate after normalisation",
        '{"mcpServers": {"a b": {"command": "x"},\n"a_b": {"command": "y"}}}',
        "mcpServers.a_b",
        "a_b",
    ),
    (
        "invalid tool_prefix",
        '{"mcpServers": {"t": {"command": "x",\n"tool_prefix": "a b"}}}',
        "mcpServers.t.tool_prefix",
        "tool_prefix",
    ),
    (
        "zero timeout",
        '{"mcpServers": {"t": {"command": "x", "timeouts":\n{"tool_secs": 0}}}}',
        "mcpServers.t.timeouts.tool_secs",
        "tool_secs",
    ),
    (
        "negative timeout",
        '{"runtime": {\n"tool_timeout_secs": -1}}',
        "runtime.tool_timeout_secs",
        "tool_timeout_secs",
    ),
    (
        "connect >= startup",
        '{"mcpServers": {"t": {"command": "x", "timeouts":\n{"connect_secs": 5, "startup_secs": 5}}}}',
        "mcpServers.t.timeouts.connect_secs",
        "connect_secs",
    ),
    (
        "connect > tool",
        '{"mcpServers": {"t": {"command": "x", "timeouts":\n{"connect_secs": 9, "tool_secs": 3}}}}',
        "mcpServers.t.timeouts.connect_secs",
        "connect_secs",
    ),
    (
        "unset env var",
        '{"mcpServers": {"t": {"command": "x",\n"env": {"A": "${env:H2_SURELY_UNSET}"}}}}',
        "mcpServers.t.env.A",
        "H2_SURELY_UNSET",
    ),
    (
        "plain ${NAME}",
        '{"mcpServers": {"t": {"command": "x",\n"args": ["${TOKEN}"]}}}',
        "mcpServers.t.args[0]",
        "TOKEN",
    ),
    (
        "vscode input",
        '{"servers": {"t": {"type": "stdio", "command": "x",\n"env": {"K": "${input:key}"}}}}',
        "servers.t.env.K",
        "input",
    ),
    ("mixed formats", '{"mcpServers": {},\n"servers": {}}', "servers", "servers"),
    ("unknown top-level key", '{"mcpServers": {},\n"modle": {}}', "modle", "modle"),
    (
        "mistral top key outside mistral",
        '{"mcpServers": {},\n"tool_timeout_secs": 3}',
        "tool_timeout_secs",
        "tool_timeout_secs",
    ),
    (
        "mistral unknown source",
        '{"servers": [{"name": "x",\n"source": {"type": "Pipe"}}]}',
        "servers[0].source.type",
        "Pipe",
    ),
    (
        "mistral missing command",
        '{"servers": [{"name": "x",\n"source": {"type": "Process"}}]}',
        "servers[0].source",
        "Process",
    ),
    (
        "mistral missing name",
        '{"servers": [\n{"source": {"type": "Process", "command": "x"}}]}',
        "servers[0]",
        "source",
    ),
    (
        "duplicate JSON key",
        '{"mcpServers": {"t": {"command": "x"},\n"t": {"command": "y"}}}',
        "mcpServers.t",
        '"t": {"command": "y"',
    ),
    (
        "websocket with http url",
        '{"mcpServers": {"t": {"transport": "websocket",\n"url": "http://a/"}}}',
        "mcpServers.t.url",
        "url",
    ),
    (
        "http with ws url",
        '{"mcpServers": {"t": {"transport": "http",\n"url": "ws://a/"}}}',
        "mcpServers.t.url",
        "url",
    ),
    (
        "stdio with headers",
        '{"mcpServers": {"t": {"command": "x",\n"headers": {"A": "b"}}}}',
        "mcpServers.t.headers",
        "headers",
    ),
    (
        "remote with env",
        '{"mcpServers": {"t": {"url": "http://a/",\n"env": {"A": "b"}}}}',
        "mcpServers.t.env",
        "env",
    ),
    (
        "bool as string",
        '{"mcpServers": {"t": {"command": "x",\n"enabled": "yes"}}}',
        "mcpServers.t.enabled",
        "enabled",
    ),
    (
        "kill grace on remote",
        '{"mcpServers": {"t": {"url": "http://a/",\n"kill_grace_secs": 1}}}',
        "mcpServers.t.kill_grace_secs",
        "kill_grace_secs",
    ),
    (
        "duplicate prefixes",
        '{"mcpServers": {"a": {"command": "x", "tool_prefix": "p_"},\n"b": {"command": "y", "tool_prefix": "p_"}}}',
        "mcpServers.b.tool_prefix",
        '"b"',
    ),
    (
        "bearer and authorization",
        '{"mcpServers": {"t": {"url": "http://a/", "headers": {"Authorization": "x"},\n"bearer_token": "y"}}}',
        "mcpServers.t.bearer_token",
        "bearer_token",
    ),
    (
        "command with spaces",
        '{"mcpServers": {"t": {\n"command": "npx -y some-server"}}}',
        "mcpServers.t.command",
        "npx",
    ),
    ("servers not an object", '{"mcpServers":\n[]}', "mcpServers", "[]"),
    (
        "runtime per-server > global",
        '{"runtime": {\n"max_concurrent_calls": 9, "max_concurrent_calls_global": 2}}',
        "runtime.max_concurrent_calls",
        "max_concurrent_calls",
    ),
    (
        "reconnect inverted",
        '{"runtime": {"reconnect": {\n"initial_delay_secs": 9, "max_delay_secs": 2}}}',
        "runtime.reconnect.initial_delay_secs",
        "initial_delay_secs",
    ),
]


@pytest.mark.parametrize(("text", "json_path", "on_line"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_located(text: str, json_path: str, on_line: str) -> None:
    err = error_of(text)
    assert err.file == "cfg.json"
    assert err.json_path == json_path
    assert err.line == line_of(text, on_line), (err, text)
    assert err.column is not None and err.column >= 1
    assert str(err).startswith(f"cfg.json:{err.line}:{err.column} at {json_path}: ")
    assert "\n" not in str(err)


def test_error_messages_say_what_to_do() -> None:
    assert (
        "H2_SURELY_UNSET" in error_of('{"mcpServers": {"t": {"command": "${env:H2_SURELY_UNSET}"}}}').reason
    )
    err = error_of('{"mcpServers": {"t": {"command": "x", "comand": "y"}}}')
    assert "did you mean 'command'" in (err.hint or "")
    err = error_of('{"mcpServers": {}, "modle": {}}')
    assert "model" in (err.hint or "") and "agents" in (err.hint or "")
    assert "${env:TOKEN}" in (error_of('{"mcpServers": {"t": {"command": "${TOKEN}"}}}').hint or "")
    err = error_of('{"mcpServers": {"t": {"command": "npx -y some-server"}}}')
    assert '["-y", "some-server"]' in (err.hint or "")


def test_json_syntax_error_has_line_and_column() -> None:
    text = '{\n  "mcpServers": {\n    "t": {"command": "x"\n  }\n}'
    err = error_of(text)
    assert err.file == "cfg.json" and (err.line, err.column) == (5, 2)  # the object never closes
    assert err.json_path is None and "invalid JSON" in err.reason
    err = error_of('{"a": NaN}')
    assert "NaN" in err.reason


def test_error_does_not_leak_interpolated_values() -> None:
    err = error_of(
        '{"mcpServers": {"t": {"url": "${env:U}", "bearer_token": "${env:T}"}}}',
        env={"U": "notaurl-secretpart", "T": "tok-abcdef"},
    )
    assert err.json_path == "mcpServers.t.url"
    assert "secretpart" not in str(err) and "tok-abcdef" not in str(err)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.json")
    assert info.value.file == str(tmp_path / "nope.json")
    assert "not found" in info.value.reason and "mcpServers" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_top_level_must_be_object() -> None:
    err = error_of("[1, 2]")
    assert err.line == 1 and "JSON object" in err.reason


def test_section_error_points_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{\n  "mcpServers": {},\n  "agents": {\n    "main": {"max_steps": -1}\n  }\n}\n')
    config = load_config(path, env={})
    err = section_error(config, "agents.main.max_steps", "max_steps must be positive", "e.g. 8")
    assert (err.file, err.json_path, err.line, err.column) == (
        str(path.resolve()),
        "agents.main.max_steps",
        4,
        27,
    )
    assert (
        str(err)
        == f"{path.resolve()}:4:27 at agents.main.max_steps: max_steps must be positive (hint: e.g. 8)"
    )
    # a path that is not in the file still names the file; it points at the nearest existing ancestor
    err = section_error(config, "agents.other", "unknown agent")
    assert err.line == 3 and err.json_path == "agents.other"
    # configs without a file still give the JSON path
    err = section_error(adhoc_config(), "model.name", "bad")
    assert err.file is None and str(err) == "model.name: bad"


def test_comment_keys_are_ignored() -> None:
    config = parse(
        '{"_comment": "top", "//": "also", "mcpServers": {"_comment_1": "x",'
        ' "_private": {"command": "srv", "_comment": "kept out of validation"}}}'
    )
    assert [s.name for s in config.servers] == ["_private"]
