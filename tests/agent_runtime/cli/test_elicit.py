"""The terminal's answers to servers' elicitations: typed answers checked against the schema (asked again when
they do not fit), URLs opened only with consent, and a declined question when there is no terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent_runtime import Runtime, parse_config
from agent_runtime.cli.elicit import terminal_elicitor
from tests.conftest import EXAMPLES, PYTHON, ROOT
from tests.transports.conftest import EVERYTHING, needs_everything

SERVER = str(EXAMPLES / "servers" / "client_features_server.py")


class Typed(io.StringIO):
    """What a person types, on something that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def runtime(tmp_path: Path, stdin: Typed, out: io.StringIO, opened: list[str] | None = None) -> Runtime:
    doc = {"mcpServers": {"cf": {"command": PYTHON, "args": [SERVER], "elicitation": "ask"}}}
    cfg = parse_config(json.dumps(doc), file=str(tmp_path / "MCP_CONFIG.json"))
    console = Console(file=out, force_terminal=False, width=200)
    opener = opened.append if opened is not None else None
    return Runtime(cfg, elicitation_handler=terminal_elicitor(stream=stdin, console=console, opener=opener))


@pytest.mark.anyio
async def test_a_form_is_asked_field_by_field_and_bad_answers_are_asked_again(tmp_path: Path) -> None:
    out = io.StringIO()
    typed = Typed("y\nAda\nold\n200\n36\n\n")  # yes; name; two bad ages; a good one; newsletter left default
    async with runtime(tmp_path, typed, out) as rt:
        result = await rt.call_tool("cf__ask_contact", {})
    reply = json.loads(result.content[0].text)  # type: ignore[union-attr]  # the tool answers in a text block
    assert reply == {"action": "accept", "data": {"name": "Ada", "age": 36, "newsletter": False}}
    shown = out.getvalue()
    assert "cf asks: Who are you?" in shown
    assert "age must be a whole number" in shown and "age must be at most 150" in shown


@pytest.mark.anyio
async def test_no_declines_and_end_of_input_cancels(tmp_path: Path) -> None:
    async with runtime(tmp_path, Typed("n\n"), io.StringIO()) as rt:
        declined = await rt.call_tool("cf__ask_contact", {})
    assert json.loads(declined.content[0].text)["action"] == "decline"  # type: ignore[union-attr]  # a text block
    async with runtime(tmp_path, Typed("y\nAda\n"), io.StringIO()) as rt:  # input ends before the age
        cancelled = await rt.call_tool("cf__ask_contact", {})
    assert json.loads(cancelled.content[0].text)["action"] == "cancel"  # type: ignore[union-attr]  # a text block


@needs_everything
@pytest.mark.anyio
async def test_a_url_is_shown_and_opened_only_with_consent(tmp_path: Path) -> None:
    doc = {
        "mcpServers": {
            "every": {"command": "node", "args": [str(EVERYTHING), "stdio"], "elicitation": "ask"}
        },
        "policies": {"egress": False},  # the URL is only shown (and opened by the stand-in browser)
    }
    cfg = parse_config(json.dumps(doc), file=str(tmp_path / "MCP_CONFIG.json"))
    opened: list[str] = []
    out = io.StringIO()
    handler = terminal_elicitor(
        stream=Typed("n\ny\n"),
        console=Console(file=out, force_terminal=False, width=200),
        opener=opened.append,
    )
    async with Runtime(cfg, elicitation_handler=handler) as rt:
        await rt.call_tool("every__trigger-url-elicitation", {"url": "https://login.example.com/consent"})
        assert opened == []  # said no
        await rt.call_tool("every__trigger-url-elicitation", {"url": "https://login.example.com/consent"})
    assert opened == ["https://login.example.com/consent"]
    assert "it wants you to open login.example.com" in out.getvalue()


def test_the_cli_without_a_terminal_declines_and_audits(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    doc = {
        "mcpServers": {"cf": {"command": PYTHON, "args": [SERVER], "elicitation": "ask"}},
        "policies": {"audit_path": str(audit)},
    }
    config = tmp_path / "MCP_CONFIG.json"
    config.write_text(json.dumps(doc))
    res = subprocess.run(
        [PYTHON, "-m", "agent_runtime", "tools", "call", "cf__ask_contact", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert '"action": "decline"' in res.stdout
    records: list[dict[str, Any]] = [json.loads(line) for line in audit.read_text().splitlines()]
    [asked] = [r for r in records if r["event"] == "elicitation"]
    assert asked["server"] == "cf" and asked["outcome"] == "decline" and asked["args"].startswith("sha256:")
