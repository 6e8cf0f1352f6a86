"""stdio transport: spawn an MCP server in its own process group and exchange JSON-RPC lines with it.

Our own (not the SDK's stdio_client) for: stderr captured into a ring (redacted, lines capped), garbage stdout
skipped, stdout lines capped at max_message_bytes, prompt EOF when the server dies even if a grandchild holds
its stdout, and a shutdown that always reaps the whole group and every descendant that left it
(transports.reaper).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import anyio
import anyio.abc
import anyio.to_thread
import mcp_types as types
import psutil
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.client.stdio import get_default_environment
from mcp.shared.message import SessionMessage

from transports.errors import ConnectError, too_large_reason
from transports.files import open_private
from transports.pending import PendingRequests
from transports.reaper import (
    MARKER,
    SAMPLE_INTERVAL,
    Lineage,
    acquire_subreaper,
    new_marker,
    release_subreaper,
)
from transports.targets import StdioTarget

log = structlog.get_logger(__name__)

_EXIT_POLL = 0.02  # seconds between returncode polls; asyncio's wait() also waits for pipe EOF
_STDOUT_DRAIN_GRACE = 0.1  # after exit, time for already-written stdout to arrive before we force EOF
_WRITER_FLUSH = 0.5  # bound for flushing accepted messages before stdin closes
_REAP_TIMEOUT = 2.0  # after SIGKILL, time for the event loop to observe the death
_MAX_LOGGED_GARBAGE = 200  # characters of a bad stdout line that reach the log
_STDERR_LINE_LIMIT = 64 * 1024  # a longer stderr line is cut (kept: its first _STDERR_LINE_KEEP bytes)
_STDERR_LINE_KEEP = 2048


Redact = Callable[[str], str]


class StderrRing:
    """The last `maxlen` stderr lines of one server, optionally mirrored to a log file (created 0600, in a
    directory created 0700). Every line goes through `redact` first: the ring, the file and the log records
    made from it never hold what it removes (the caller's secrets)."""

    __slots__ = ("_file", "_lines", "_log_path", "_redact")

    def __init__(self, maxlen: int, log_path: Path | None = None, redact: Redact | None = None) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max(1, maxlen))
        self._log_path = Path(log_path) if log_path is not None else None
        self._file: IO[str] | None = None
        self._redact = redact

    def append(self, line: str) -> str:
        """Keep (and log to the file) one line; returns it as kept (redacted)."""
        if self._redact is not None:
            line = self._redact(line)
        self._lines.append(line)
        if self._log_path is None:
            return line
        try:
            if self._file is None:
                self._file = open_private(self._log_path, buffering=1)
            self._file.write(line + "\n")
        except OSError as exc:
            # A broken log file must not take the server's session down: keep the ring, drop the file.
            log.warning(
                "cannot write server stderr log; disabling it", path=str(self._log_path), error=str(exc)
            )
            self._log_path = None
            self.close()
        return line

    def tail(self, n: int = 20) -> list[str]:
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the limit, dropped as it streamed in: its size and its first and last bytes."""

    size: int
    head: bytes
    tail: bytes


class LineSplitter:
    """Splits a byte stream into newline-terminated lines of at most `limit` bytes. A longer line is never
    held whole: past the limit its bytes are counted and dropped, keeping `keep` bytes of each end."""

    __slots__ = ("_head", "_keep", "_limit", "_pending", "_skipped", "_tail")

    def __init__(self, limit: int, keep: int = 4096) -> None:
        self._limit = limit
        self._keep = keep
        self._pending = bytearray()
        self._skipped = 0  # > 0 while inside an oversized line: its size so far
        self._head = b""
        self._tail = b""

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held now (never more than the limit)."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> Iterator[bytes | Oversized]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if self._skipped:
                self._skipped += len(piece)
                self._tail = (self._tail + piece[-self._keep :])[-self._keep :]
            elif len(self._pending) + len(piece) > self._limit:
                pending = self._pending
                self._head = bytes(pending[: self._keep]) + piece[: max(0, self._keep - len(pending))]
                self._tail = (bytes(pending[-self._keep :]) + piece[-self._keep :])[-self._keep :]
                self._skipped = len(pending) + len(piece)
                self._pending = bytearray()
            else:
                self._pending += piece
            if end < 0:
                return
            start = end + 1
            if self._skipped:
                yield Oversized(self._skipped, self._head, self._tail)
                self._skipped, self._head, self._tail = 0, b"", b""
            else:
                line = bytes(self._pending)
                self._pending.clear()
                yield line

    def flush(self) -> bytes | Oversized | None:
        """What is left after the stream ended without a final newline (None: nothing)."""
        if self._skipped:
            rest: bytes | Oversized | None = Oversized(self._skipped, self._head, self._tail)
        else:
            rest = bytes(self._pending) or None
        self._pending, self._skipped, self._head, self._tail = bytearray(), 0, b"", b""
        return rest


def resolve_command(command: str, env_path: str | None) -> str:
    """PATH (the child's) first, then the directory of sys.executable, so venv scripts resolve unactivated."""
    if os.sep in command:
        if os.access(command, os.X_OK) and not os.path.isdir(command):
            return command
        raise ConnectError(f"command not found or not executable: {command}", "check the path in the config")
    found = shutil.which(command, path=env_path) or shutil.which(
        command, path=os.path.dirname(sys.executable)
    )
    if found is None:
        raise ConnectError(
            f"command not found: {command}",
            "install it or give its absolute path; PATH and the runtime's own bin directory were searched",
        )
    return found


def build_env(target: StdioTarget) -> dict[str, str]:
    """The SDK's small allowlist plus exactly the target's env; nothing else of the parent leaks."""
    return get_default_environment() | dict(target.env)


def _prepare(target: StdioTarget) -> tuple[str, dict[str, str]]:
    """The resolved executable and the child's environment; a bad command or cwd is a ConnectError."""
    env = build_env(target)
    command = resolve_command(target.command, env.get("PATH"))
    if target.cwd is not None and not os.path.isdir(target.cwd):
        raise ConnectError(f"working directory does not exist: {target.cwd}", "fix `cwd` in the config")
    return command, env


class StdioTransport:
    """An SDK `Transport`: entering spawns the server and yields (read_stream, write_stream)."""

    def __init__(self, target: StdioTarget, *, redact: Redact | None = None) -> None:
        self.target = target
        self.stderr = StderrRing(target.stderr_lines, target.stderr_log, redact)
        self.requests = PendingRequests()  # ours, unanswered: what an oversized reply fails
        self.lineage: Lineage | None = None  # the server's descendants, once it runs
        self._marker = new_marker()
        self.pid: int | None = None
        self.returncode: int | None = None
        self.exited = anyio.Event()
        self._cm: (
            contextlib.AbstractAsyncContextManager[
                tuple[
                    MemoryObjectReceiveStream[SessionMessage | Exception],
                    MemoryObjectSendStream[SessionMessage],
                ]
            ]
            | None
        ) = None

    async def __aenter__(
        self,
    ) -> tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]:
        self._cm = self._open()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    async def _spawn(self) -> anyio.abc.Process:
        t = self.target
        command, env = _prepare(t)
        env[MARKER] = self._marker  # inherited by descendants: how shutdown finds those that leave the tree
        try:
            # Shielded: cancelled mid-spawn, asyncio would SIGKILL the server alone without reaping it (its
            # group and descendants live on). Spawning is bounded; the caller's next await sees the cancel
            # and the normal shutdown (_stop) handles the process.
            with anyio.CancelScope(shield=True):
                process = await anyio.open_process(
                    [command, *t.args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=t.cwd,
                    start_new_session=True,  # own session and process group: the group kill reaches grandchildren
                )
        except OSError as exc:
            raise ConnectError(
                f"could not start {command}: {exc.strerror or exc}", "check the command"
            ) from exc
        return process

    @contextlib.asynccontextmanager
    async def _open(
        self,
    ) -> AsyncIterator[
        tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]
    ]:
        acquire_subreaper()  # before the spawn: an orphan made during startup must come to us too
        try:
            process = await self._spawn()
        except BaseException:
            release_subreaper()
            raise
        # No awaits between the spawn and the task group: a cancellation there would leak the process.
        self.pid = process.pid
        lineage = self.lineage = Lineage(process.pid, self._marker)
        read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
        stdout_scope = anyio.CancelScope()
        stdout_done = anyio.Event()
        writer_done = anyio.Event()
        log.debug("stdio server started", command=self.target.command, pid=process.pid)

        async def stdout_reader() -> None:
            assert process.stdout is not None
            lines = LineSplitter(self.target.max_message_bytes)
            try:
                with stdout_scope:
                    async with read_writer:
                        async for chunk in process.stdout:
                            for line in lines.feed(chunk):
                                if isinstance(line, Oversized):
                                    for reply in self._oversized(line):
                                        await read_writer.send(reply)
                                    continue
                                message = self._parse(line)
                                if message is not None:
                                    self.requests.answered(message.message)
                                    await read_writer.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                pass  # the session or the pipe is gone; EOF reaches the session either way
            finally:
                read_writer.close()
                stdout_done.set()

        async def stderr_reader() -> None:
            assert process.stderr is not None
            lines = LineSplitter(_STDERR_LINE_LIMIT, keep=_STDERR_LINE_KEEP)

            def keep(line: bytes | Oversized) -> None:
                if isinstance(line, Oversized):
                    text = f"{line.head.decode('utf-8', 'replace')} [... a {line.size}-byte line, cut]"
                else:
                    text = line.decode("utf-8", "replace").rstrip("\r")
                text = self.stderr.append(text)
                log.debug("server stderr", pid=process.pid, line=text)

            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                async for chunk in process.stderr:
                    for line in lines.feed(chunk):
                        keep(line)
            rest = lines.flush()
            if rest:
                keep(rest)

        async def stdin_writer() -> None:
            assert process.stdin is not None
            try:
                async with write_reader:
                    async for session_message in write_reader:
                        data = session_message.message.model_dump_json(by_alias=True, exclude_unset=True)
                        self.requests.sent(session_message.message)  # before sending: the reply may be quick
                        await process.stdin.send(data.encode() + b"\n")
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                # The server stopped reading: end the session instead of letting requests hang.
                read_writer.close()
            finally:
                writer_done.set()

        async def exit_watcher() -> None:
            # Polled: asyncio's Process.wait() also waits for pipe EOF, which a grandchild can withhold.
            while process.returncode is None:  # noqa: ASYNC110
                await anyio.sleep(_EXIT_POLL)
            self.returncode = process.returncode
            self.exited.set()
            # A grandchild holding the stdout pipe keeps EOF away forever: force it shortly after the exit.
            with anyio.move_on_after(_STDOUT_DRAIN_GRACE):
                await stdout_done.wait()
            stdout_scope.cancel()

        async def lineage_watcher() -> None:
            # Descendants are remembered while they can still be found from the server: a later setsid or
            # an exited parent does not hide them at shutdown.
            while True:
                with contextlib.suppress(OSError):
                    lineage.sample()
                await anyio.sleep(SAMPLE_INTERVAL)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stdout_reader)
                tg.start_soon(stderr_reader)
                tg.start_soon(stdin_writer)
                tg.start_soon(exit_watcher)
                tg.start_soon(lineage_watcher)
                try:
                    yield read_stream, write_stream
                finally:
                    with anyio.CancelScope(shield=True):
                        write_stream.close()
                        with anyio.move_on_after(_WRITER_FLUSH):
                            await writer_done.wait()
                        await self._stop(process)
                        read_stream.close()
                        self.stderr.close()
                    tg.cancel_scope.cancel()
        finally:
            release_subreaper()

    def _oversized(self, line: Oversized) -> list[SessionMessage]:
        """Error replies for the request an oversized stdout line answered (the line itself is gone)."""
        reason = too_large_reason(line.size, self.target.max_message_bytes)
        replies = self.requests.fail_oversized(line.head, line.tail, reason)
        log.warning(
            "dropped an oversized message from a stdio server",
            command=self.target.command,
            size=line.size,
            limit=self.target.max_message_bytes,
            failed_requests=len(replies),
        )
        return replies

    def _parse(self, line: bytes) -> SessionMessage | None:
        if not line.strip():
            return None
        try:
            return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
        except ValueError:
            # Servers that print banners or debug text on stdout are common; skip the line, keep the session.
            text = line[:_MAX_LOGGED_GARBAGE].decode("utf-8", "replace")
            log.warning(
                "skipped a non-JSON-RPC line on server stdout", command=self.target.command, line=text
            )
            return None

    async def _stop(self, process: anyio.abc.Process) -> None:
        """Close stdin, wait eof_grace, SIGTERM the group, wait term_grace, SIGKILL the group.

        The group is signalled even when the server exited by itself: its grandchildren would survive
        otherwise. Descendants that left the group (setsid, double fork) are found by the lineage
        (transports.reaper) and get the same signals; those adopted by us are reaped.
        """
        t = self.target
        pgid = process.pid  # start_new_session makes the server the leader of its own group
        lineage = self.lineage
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            assert process.stdin is not None
            await process.stdin.aclose()
        await _wait_until(lambda: process.returncode is not None, t.eof_grace)
        escaped: list[psutil.Process] = []
        if lineage is not None:
            escaped = await anyio.to_thread.run_sync(lineage.sweep)

        def descendants_alive() -> bool:
            if lineage is None:
                return False
            lineage.reap()
            return bool(lineage.alive())

        if process.returncode is None or _group_alive(pgid) or escaped:
            _signal_group(pgid, signal.SIGTERM)
            if lineage is not None:
                lineage.signal(signal.SIGTERM)
            await _wait_until(
                lambda: process.returncode is not None and not _group_alive(pgid) and not descendants_alive(),
                t.term_grace,
            )
            if process.returncode is None or _group_alive(pgid) or descendants_alive():
                log.warning(
                    "stdio server or its descendants ignored SIGTERM; killing them",
                    pid=process.pid,
                    outside_group=len(escaped),
                )
                _signal_group(pgid, signal.SIGKILL)
                if lineage is not None:
                    lineage.signal(signal.SIGKILL)
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                if not await _wait_until(
                    lambda: process.returncode is not None and not descendants_alive(), _REAP_TIMEOUT
                ):
                    log.error("stdio server or a descendant survived SIGKILL", pid=process.pid)
        if lineage is not None:
            lineage.reap()
        self.returncode = process.returncode
        self.exited.set()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await pipe.aclose()
        # asyncio keeps the subprocess transport open while a pipe end lives on in a killed-late child.
        transport = getattr(getattr(process, "_process", None), "_transport", None)
        close = getattr(transport, "close", None)
        if callable(close):
            with contextlib.suppress(PermissionError):
                close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group (zombies of reparented children do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


async def _wait_until(predicate: object, seconds: float) -> bool:
    assert callable(predicate)
    deadline = anyio.current_time() + seconds
    while not predicate():
        if anyio.current_time() >= deadline:
            return False
        await anyio.sleep(_EXIT_POLL)
    return True
