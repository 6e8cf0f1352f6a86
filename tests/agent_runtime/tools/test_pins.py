"""Tool-definition pinning against a real server whose definitions change between runs (rug pull)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from agent_runtime.cli import approve as approve_command
from agent_runtime.errors import ConfigError
from agent_runtime.tools.pins import LockFile, PinStore, tool_flags
from tests.agent_runtime.faulty_harness import harness
from tests.conftest import EXAMPLES, PYTHON

FAULTY = str(EXAMPLES / "servers" / "faulty_server.py")


@pytest.mark.anyio
async def test_rug_pull_quarantines_until_approved(tmp_path: Path) -> None:
    lock_path = tmp_path / "agent-runtime.lock.json"
    async with harness(tmp_path) as h:  # first sight: every tool pinned (trust on first use)
        assert (await h.executor.execute("faulty__echo", {"text": "v0"})).ok
    lock = json.loads(lock_path.read_text())
    assert lock["version"] == 1 and "echo" in lock["servers"]["faulty"]["tools"]
    assert len(lock["servers"]["faulty"]["tools"]["echo"]["sha256"]) == 64

    async with harness(tmp_path, None, "--variant", "1", calls_log=tmp_path / "v1.jsonl") as h:  # reworded
        out = await h.executor.execute("faulty__echo", {"text": "v1"})
        assert (
            out.kind == "denied"
            and "quarantined" in (out.reason or "")
            and "description" in (out.reason or "")
        )
        assert (await h.executor.execute("faulty__work", {})).ok  # unchanged tools still work
        entry = h.registry.get("faulty__echo")
        assert entry is not None
        assert tool_flags(h.executor.pins, entry) == ["quarantined: description changed since approval"]
        assert h.received("echo") == []
        h.executor.pins.approve("faulty", [entry.definition])
        assert (await h.executor.execute("faulty__echo", {"text": "approved"})).ok

    async with harness(tmp_path, None, "--variant", "2", calls_log=tmp_path / "v2.jsonl") as h:
        # poisoned description and a brand-new tool on an already-pinned server
        for name, args in [("faulty__echo", {"text": "x"}), ("faulty__exfil", {"data": "x"})]:
            out = await h.executor.execute(name, args)
            assert out.kind == "denied" and "quarantined" in (out.reason or ""), out
        echo, exfil = h.registry.get("faulty__echo"), h.registry.get("faulty__exfil")
        assert echo is not None and exfil is not None
        flags = tool_flags(h.executor.pins, echo)
        assert flags[0].startswith("quarantined") and any("zero-width" in f for f in flags)
        assert any("hidden-instruction" in f for f in flags) and any("secret file" in f for f in flags)
        assert "quarantined: new tool, not approved" in tool_flags(h.executor.pins, exfil)
        assert any("instruction override" in f for f in tool_flags(h.executor.pins, exfil))
        assert h.received() == []


@pytest.mark.anyio
async def test_strict_and_off_modes(tmp_path: Path) -> None:
    async with harness(tmp_path, policies={"pinning": "strict"}) as h:
        out = await h.executor.execute("faulty__echo", {"text": "x"})
        assert out.kind == "denied" and "new" in (out.reason or "")
    assert not (tmp_path / "agent-runtime.lock.json").exists()
    async with harness(tmp_path, None, "--variant", "2", policies={"pinning": "off"}) as h:
        assert (await h.executor.execute("faulty__exfil", {})).ok


def test_lock_file_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "lock.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError):
        LockFile(bad)
    bad.write_text(json.dumps({"version": 99, "servers": {}}))
    with pytest.raises(ConfigError):
        PinStore.open(bad, "tofu")


def approve(config: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    approve_command.add_arguments(parser)
    return approve_command.run(parser.parse_args([*argv, "--config", str(config)]))


def test_tools_approve_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write(variant: int) -> Path:
        path = tmp_path / "MCP_CONFIG.json"
        server = {"command": PYTHON, "args": [FAULTY, "--variant", str(variant)]}
        path.write_text(json.dumps({"mcpServers": {"faulty": server}}))
        return path

    config = write(0)
    assert approve(config) == 0  # first run pins everything: nothing to approve
    assert "no quarantined tools" in capsys.readouterr().out
    config = write(2)
    assert approve(config) == 1  # lists what changed, approves nothing without names or --all
    out = capsys.readouterr()
    assert "faulty__echo" in out.out and "faulty__exfil" in out.out and "WARNING" in out.out
    assert approve(config, "faulty__echo") == 1  # stdin is not a terminal: fails closed
    assert approve(config, "faulty__echo", "--yes") == 0
    lock = LockFile(tmp_path / "agent-runtime.lock.json")
    assert "\u200b" in lock.servers["faulty"]["echo"]["definition"]["description"]
    assert "exfil" not in lock.servers["faulty"]
    assert approve(config, "--all", "--yes") == 0
    assert "exfil" in LockFile(tmp_path / "agent-runtime.lock.json").servers["faulty"]
    assert approve(config) == 0
