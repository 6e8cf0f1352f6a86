"""Config keys for servers' requests to the client: `sampling`, `elicitation`, `roots` (per server) and
`runtime.roots`, with located errors for bad values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent_runtime.config import parse_config
from agent_runtime.errors import ConfigError
from policies.sampling import SamplingPolicy


def load(tmp_path: Path, server: dict[str, Any], **top: Any) -> Any:
    text = json.dumps({"mcpServers": {"s": {"command": "srv", **server}}, **top}, indent=1)
    return parse_config(text, file=str(tmp_path / "MCP_CONFIG.json"))


def test_defaults_are_off_and_roots_inherit(tmp_path: Path) -> None:
    server = load(tmp_path, {}).server("s")
    assert server.sampling == SamplingPolicy() and not server.sampling.allow
    assert server.elicitation == "decline" and server.roots is None


def test_keys_are_read(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {
            "sampling": {"allow": True, "max_tokens": 64, "approval": "always", "models": {"*": "m"}},
            "elicitation": "ask",
            "roots": ["docs", {"path": "file:///srv", "name": "srv"}],
        },
        runtime={"roots": ["~/work"]},
    )
    server = cfg.server("s")
    assert server.sampling == SamplingPolicy(allow=True, max_tokens=64, approval="always", models={"*": "m"})
    assert server.elicitation == "ask"
    assert [(r.uri, r.name) for r in server.roots] == [
        ((tmp_path / "docs").resolve().as_uri(), None),
        ("file:///srv", "srv"),
    ]
    assert [r.uri for r in cfg.runtime.roots] == [(Path.home() / "work").resolve().as_uri()]


@pytest.mark.parametrize(
    ("server", "where", "why"),
    [
        ({"sampling": {"allow": "yes"}}, "mcpServers.s.sampling.allow", "expected true or false"),
        ({"sampling": {"max_tokens": 0}}, "mcpServers.s.sampling.max_tokens", "must be > 0"),
        ({"sampling": {"approval": "sometimes"}}, "mcpServers.s.sampling.approval", "never"),
        ({"sampling": {"alow": True}}, "mcpServers.s.sampling.alow", "unknown key"),
        ({"elicitation": "always"}, "mcpServers.s.elicitation", "decline"),
        ({"roots": ["https://example.com/x"]}, "mcpServers.s.roots[0]", "not a file:// URI"),
        ({"roots": [{"name": "x"}]}, "mcpServers.s.roots[0]", ""),
    ],
)
def test_bad_values_are_located(tmp_path: Path, server: dict[str, Any], where: str, why: str) -> None:
    with pytest.raises(ConfigError) as bad:
        load(tmp_path, server)
    assert bad.value.json_path is not None and bad.value.json_path.startswith(where)
    assert bad.value.line is not None and why in str(bad.value)
