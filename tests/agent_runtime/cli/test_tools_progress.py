"""`agent-runtime tools call` shows a tool's progress as a bar on a terminal (a real pseudo-terminal here), and
nothing when its output is piped: stdout stays exactly the result."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import subprocess
import time

from tests.agent_runtime.cli.test_tools import cli
from tests.conftest import EXAMPLES, PYTHON, ROOT

NOTIFY = f"{shlex.quote(PYTHON)} {shlex.quote(str(EXAMPLES / 'servers' / 'notify_server.py'))}"
ADHOC = ["--stdio", NOTIFY]  # ad-hoc server named after the script: notify_server
ARGS = json.dumps({"steps": 4, "delay": 0.25})


def test_tools_call_draws_a_progress_bar_on_a_terminal() -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [PYTHON, "-m", "agent_runtime", "tools", "call", "notify_server__progress", ARGS, *ADHOC],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    terminal = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                terminal += chunk
            elif proc.poll() is not None:
                break
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        assert proc.wait(10) == 0, terminal.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = terminal.decode(errors="replace")
    assert "notify_server__progress" in shown and "step 3 of 4" in shown and "3/4" in shown
    assert out.strip() == "done 4"  # the bar is on stderr only


def test_tools_call_piped_output_stays_clean() -> None:
    res = cli("tools", "call", "notify_server__progress", ARGS, *ADHOC, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["text"] == "done 4"
    assert "step" not in res.stderr and "━" not in res.stderr

    plain = cli("tools", "call", "notify_server__progress", ARGS, *ADHOC)
    assert plain.returncode == 0 and plain.stdout == "done 4\n" and "step" not in plain.stderr
