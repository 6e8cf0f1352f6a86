"""The terminal's answers to servers' elicitations: typed answers checked against the schema (asked again when
they do not fit), URLs opened only with consent, and a declined question when there is no terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import time
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
    assert (
        asked["reason"] == "no terminal to ask on"
    )  # the terminal prompt was installed, and saw no terminal


class Terminal:
    """A pseudo-terminal for a CLI process: read what it shows (with deadlines), type answers."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.seen = ""

    def expect(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never shown; the terminal shows: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.seen += os.read(self.master, 65536).decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def test_tools_call_on_a_terminal_asks_the_person(tmp_path: Path) -> None:
    doc = {"mcpServers": {"cf": {"command": PYTHON, "args": [SERVER], "elicitation": "ask"}}}
    config = tmp_path / "MCP_CONFIG.json"
    config.write_text(json.dumps(doc))
    term = Terminal()
    proc = subprocess.Popen(
        [PYTHON, "-m", "agent_runtime", "tools", "call", "cf__ask_contact", "--config", str(config)],
        stdin=term.slave,
        stdout=subprocess.PIPE,
        stderr=term.slave,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"},
    )
    try:
        term.expect("cf asks: Who are you?")
        term.expect("answer? [y]es")
        term.type("y")
        term.expect("Name: ")
        term.type("Grace")
        term.expect("Age: ")
        term.type("-3")
        term.expect("age must be at least 0")
        term.type("85")
        term.expect("Newsletter (optional) [y/n] [False]: ")
        term.type("yes")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(term.master)
        os.close(term.slave)
    assert proc.returncode == 0, term.seen
    first = out.decode().splitlines()[0]  # the text block; the structured result follows
    assert json.loads(first) == {"action": "accept", "data": {"name": "Grace", "age": 85, "newsletter": True}}
