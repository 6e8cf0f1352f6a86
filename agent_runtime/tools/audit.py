"""The audit log: one JSON line per policy decision and per call, appended to a configured file.

Records are queued by the call path and encoded + appended by `run()` (every 50 ms, in the runtime's task
group), so the work happens while calls wait on their servers rather than on their critical path; the
queue is also flushed when it grows past FLUSH_AT records and on `close()`. A sync write of a few KiB to a
local file costs microseconds, far less than a thread hop; the file is readable by its owner only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio

from agent_runtime.logging import DEBUG, enabled_for, get_logger
from policies.audit import AuditRecord, argument_digest
from transports.files import open_private

log = get_logger(__name__)  # structlog, imported on the first record that passes the level
FLUSH_AT = 256  # queued records that force a flush from the call path
FLUSH_INTERVAL = 0.05


class AuditLog:
    """Appends records to `path` (JSONL) when set; always hands them to `listeners` (tests, the monitor)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.listeners: list[Callable[[AuditRecord], None]] = []
        self._file: TextIO | None = None
        self._lock = threading.Lock()  # the engine thread never writes here, but sync callers might
        self._failed = False
        self._pending: list[AuditRecord] = []

    def wants_records(self) -> bool:
        """Whether a record written now reaches anyone (the file, a listener, debug logs): the call path
        builds none when it would not."""
        return self.path is not None or bool(self.listeners) or enabled_for(DEBUG)

    def write(self, *records: AuditRecord) -> None:
        """Queue records (a call's decision and its outcome go together); listeners see them at once."""
        for record in records:
            for listener in self.listeners:
                listener(record)
        if self.path is None:
            for record in records:
                log.debug("audit", event_kind=record.event, tool=record.tool, outcome=record.outcome)
            return
        self._pending.extend(records)
        if len(self._pending) >= FLUSH_AT:
            self.flush()

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Flush queued records until cancelled (then once more)."""
        if self.path is None:  # records never queue without a file: no wake-up every interval
            await anyio.sleep_forever()
        try:
            while True:
                await anyio.sleep(interval)
                if self._pending:
                    self.flush()
        finally:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self.path is None:
            return
        records, self._pending = self._pending, []
        # A call's decision and outcome records share its arguments: digest them once. The records keep the
        # argument objects alive until the loop ends, so their ids cannot be reused meanwhile.
        digests: dict[int, str] = {}
        for record in records:
            args = record.args
            if not isinstance(args, str):
                digest = digests.get(id(args))
                if digest is None:
                    digest = digests[id(args)] = argument_digest(args)
                record.args = digest
        text = "".join(record.to_json() + "\n" for record in records)
        with self._lock:
            try:
                if self._file is None:
                    self._file = self._open(self.path)
                self._file.write(text)
                self._file.flush()
            except OSError as exc:
                if not self._failed:  # say it once; the calls themselves must not fail over the audit
                    log.error("audit log write failed", path=str(self.path), error=str(exc))
                    self._failed = True

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @staticmethod
    def _open(path: Path) -> TextIO:
        return open_private(path)  # created 0600 (an existing file narrowed to it), its directory 0700
