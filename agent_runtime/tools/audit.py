"""The audit log: one JSON line per policy decision and per call, appended to a configured file.

Records are queued by the call path and encoded + appended by `run()` (every 50 ms, in the runtime's task
group), so the work happens while calls wait on their servers rather than on their critical path; the
queue is also flushed when it grows past FLUSH_AT records and on `close()`. A sync write of a few KiB to a
local file costs microseconds, far less than a thread hop; the file is readable by its owner only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import anyio

from agent_runtime.logging import DEBUG, enabled_for, get_logger
from policies.audit import AuditRecord, argument_digest, call_record, decision_record
from transports.files import open_private

log = get_logger(__name__)  # structlog, imported on the first record that passes the level
FLUSH_AT = 256  # queued records that force a flush from the call path
FLUSH_INTERVAL = 0.05


class AuditLog:
    """Appends records to `path` (JSONL) when set; always hands them to `listeners` (tests, the monitor)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.listeners: list[Callable[[AuditRecord], None]] = []
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # the engine thread never writes here, but sync callers might
        self._failed = False
        # what went wrong so far (exported as metrics): writes of the file that failed, records they lost,
        # and records that could not be encoded
        self.write_failures = 0
        self.records_lost = 0
        self.encode_failures = 0
        self._pending: list[
            AuditRecord | tuple[Any, ...]
        ] = []  # records, or executed calls to make records of

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

    def write_call(
        self,
        agent: str | None,
        server: str,
        tool: str,
        args: Mapping[str, Any],
        approval: str | None,
        decided_at: float,
        outcome: str,
        reason: str | None,
        duration: float,
        attempts: int,
        truncated: bool,
        secrets: tuple[str, ...],
    ) -> None:
        """An executed call's two records (its `allow` decision and its outcome). With only a file to write
        them to, they are built by the flusher, off the call's critical path."""
        entry = (
            agent,
            server,
            tool,
            args,
            approval,
            decided_at,
            outcome,
            reason,
            duration,
            attempts,
            truncated,
        )
        if self.listeners or self.path is None:
            self.write(*_call_records(entry, secrets, time.time()))
            return
        self._pending.append((*entry, secrets, time.time()))
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
        pending, self._pending = self._pending, []
        records: list[AuditRecord] = []
        for item in pending:
            if isinstance(item, AuditRecord):
                records.append(item)
            else:
                records.extend(_call_records(item[:11], item[11], item[12]))
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
        lines = []
        for record in records:
            try:
                lines.append(record.to_json() + "\n")
            except Exception as exc:  # one bad record must not take the writer (and the runtime) down
                self.encode_failures += 1
                log.error("audit record could not be encoded", tool=record.tool, error=repr(exc)[:200])
        text = "".join(lines)
        with self._lock:
            try:
                if self._file is None:
                    self._file = self._open(self.path)
                self._file.write(text)
                self._file.flush()
            except OSError as exc:
                self.write_failures += 1
                self.records_lost += len(lines)
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
    def _open(path: Path) -> IO[str]:
        return open_private(path)  # created 0600 (an existing file narrowed to it), its directory 0700


def _call_records(
    entry: tuple[Any, ...], secrets: tuple[str, ...], finished_at: float
) -> tuple[AuditRecord, AuditRecord]:
    agent, server, tool, args, approval, decided_at, outcome, reason, duration, attempts, truncated = entry
    return (
        decision_record(
            agent=agent,
            server=server,
            tool=tool,
            digest=args,
            allowed=True,
            reason=f"approved: {approval}" if approval else None,
            secrets=secrets,
            at=decided_at,
        ),
        call_record(
            agent=agent,
            server=server,
            tool=tool,
            digest=args,
            outcome=outcome,
            reason=reason,
            duration=duration,
            attempts=attempts,
            truncated=truncated,
            secrets=secrets,
            at=finished_at,
        ),
    )
