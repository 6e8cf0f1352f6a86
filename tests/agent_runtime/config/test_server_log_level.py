"""The per-server `log_level` key: accepted in every dialect, `info` by default, anything else a located error."""

from __future__ import annotations

import json

import pytest

from agent_runtime.config import parse_config
from agent_runtime.errors import ConfigError


def test_log_level_per_server_with_an_info_default() -> None:
    doc = {
        "mcpServers": {
            "quiet": {"command": "srv", "log_level": "error"},
            "plain": {"command": "srv"},
            "web": {"url": "http://127.0.0.1:8000/mcp", "log_level": "debug"},
        }
    }
    config = parse_config(json.dumps(doc), file="cfg.json", env={})
    assert {s.name: s.log_level for s in config.servers} == {
        "quiet": "error",
        "plain": "info",
        "web": "debug",
    }

    vscode = {"servers": {"v": {"type": "stdio", "command": "srv", "log_level": "emergency"}}}
    assert parse_config(json.dumps(vscode), file="cfg.json", env={}).servers[0].log_level == "emergency"


def test_an_unknown_log_level_is_a_located_error() -> None:
    text = '{"mcpServers": {\n  "s": {"command": "srv", "log_level": "verbose"}\n}}'
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="cfg.json", env={})
    message = str(info.value)
    assert "log_level" in message and "cfg.json" in message and ":2" in message
