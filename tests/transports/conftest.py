"""Fixtures for transport tests: demo-server targets and network servers started on ephemeral ports."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, PEERS, PYTHON
from transports import StdioTarget

DEMO = str(EXAMPLES / "servers" / "demo_server.py")
EVERYTHING = PEERS / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
needs_everything = pytest.mark.skipif(
    not EVERYTHING.exists() or shutil.which("node") is None,
    reason="npm peer server-everything not installed under .peers/ (run `make peers`) or node missing",
)


def demo_target(*flags: str, **kw: object) -> StdioTarget:
    return StdioTarget(command=PYTHON, args=(DEMO, *flags), **kw)  # type: ignore[arg-type]  # kw: StdioTarget's other fields, e.g. env, eof_grace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def listening_script(
    script: str | Path, *args: str, timeout: float = 20.0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a Python example server on a network transport; yield (process, url) once it prints
    `LISTENING <url>` (it picks its own free port)."""
    proc = subprocess.Popen(
        [PYTHON, str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"{Path(script).name} {args} did not print LISTENING within {timeout}s")
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"{Path(script).name} {args} exited before listening (rc={proc.wait()})")
            line += chunk
        word, url = line.decode().split()
        assert word == "LISTENING"
        yield proc, url
    finally:
        _kill(proc)


@contextmanager
def listening_demo(*flags: str, timeout: float = 20.0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the demo server on a network transport; yield (process, url) once it prints LISTENING."""
    with listening_script(DEMO, "--port", "0", *flags, timeout=timeout) as started:
        yield started


@contextmanager
def everything_server(
    mode: str, path: str, timeout: float = 30.0, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start server-everything in `mode` (sse|streamableHttp) on a free port; yield (process, endpoint URL).
    With `log`, its stdout and stderr (a line per message it receives) go to that file."""
    port = _free_port()
    with open(log or os.devnull, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            ["node", str(EVERYTHING), mode],
            env={**os.environ, "PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server-everything {mode} exited early (rc={proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server-everything {mode} not listening within {timeout}s") from None
                time.sleep(0.05)
        yield proc, f"http://127.0.0.1:{port}{path}"
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def demo() -> Callable[..., StdioTarget]:
    return demo_target
