"""Every process a stdio server starts dies with it, also those that leave its process group.

A server runs in its own session and process group, and shutdown signals the group. A descendant that
calls `setsid` (or `setpgid`), or double-forks so that its parent exits, is outside the group and would
outlive the runtime. Three things find them:

- the **subreaper**: on Linux, while any stdio server of this process runs, the process is a child
  subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so an orphaned descendant is re-parented to us instead of
  to init -- we can see it, and we must reap it (`Lineage.reap`: only processes known to be descendants
  of our servers are waited for; the runtime's own children stay with whoever started them);
- **tracking**: while the server runs, its descendants are sampled (`/proc/PID/task/*/children`), each
  remembered with its start time (a reused pid is never signalled);
- a **marker and the session**: the server's environment carries `AGENT_RUNTIME_SERVER_ID`, inherited by
  its descendants, and at shutdown every process of the machine that carries it, or that is still in the
  server's session, is found (`Lineage.sweep`).

What it cannot find: a descendant that clears its environment, leaves the session and the process tree
between two samples (`SAMPLE_INTERVAL`), and is adopted by another subreaper or init because this process
is not a subreaper (not Linux). Nothing survives a runtime that is killed with SIGKILL unless the
operating system does it (a cgroup, a container).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field

import psutil

MARKER = "AGENT_RUNTIME_SERVER_ID"
SAMPLE_INTERVAL = 0.25  # seconds between two samples of a running server's descendants
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

# Process-wide: the number of stdio transports open in this process, and whether we turned the subreaper
# attribute on (then we turn it off when the last one closes; if someone else had set it, we leave it).
_subreaper_users = 0
_subreaper_ours = False


def _prctl(option: int, arg: int | ctypes.c_int | object) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0  # type: ignore[no-any-return]  # a CDLL function returns Any; prctl returns a C int, so this is a bool
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    value = ctypes.c_int(0)
    return _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value)) and value.value != 0


def acquire_subreaper() -> None:
    """One more stdio server runs: orphaned descendants must come to us (Linux only; a no-op elsewhere)."""
    global _subreaper_users, _subreaper_ours
    _subreaper_users += 1
    if _subreaper_users == 1 and sys.platform.startswith("linux") and not is_subreaper():
        _subreaper_ours = _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def release_subreaper() -> None:
    """One stdio server fewer: when none is left, orphans go back to init (if we made us a subreaper)."""
    global _subreaper_users, _subreaper_ours
    _subreaper_users = max(0, _subreaper_users - 1)
    if _subreaper_users == 0 and _subreaper_ours:
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        _subreaper_ours = False


def new_marker() -> str:
    return f"{os.getpid()}.{secrets.token_hex(8)}"


@dataclass(slots=True)
class Lineage:
    """The descendants of one server process: tracked while it runs, swept, signalled and reaped at its end."""

    root: int
    marker: str
    known: dict[int, float] = field(default_factory=dict)  # pid -> start time (psutil create_time)
    _checked: set[tuple[int, float]] = field(default_factory=set)  # our children judged not to be ours

    def sample(self) -> None:
        """Cheap: the root's process tree, and our own children (adopted orphans) that carry the marker."""
        stack = [self.root]
        seen = 0
        while stack and seen < 10_000:
            pid = stack.pop()
            seen += 1
            for child in _children(pid):
                if child not in self.known:
                    self._track(child)
                stack.append(child)
        me = os.getpid()
        for child in _children(me):
            if child == self.root or child in self.known:
                continue
            start = _start_time(child)
            if start is None or (child, start) in self._checked:
                continue
            if _environ_has(child, self.marker):
                self.known[child] = start
            else:
                self._checked.add((child, start))
        self.reap()

    def sweep(self) -> list[psutil.Process]:
        """Thorough (a scan of every process; run it off the event loop): every live descendant -- in the
        root's tree or session, carrying the marker, or tracked earlier -- except the root itself."""
        with contextlib.suppress(OSError):
            self.sample()
        me = os.getpid()
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            pid = proc.pid
            if pid in (me, self.root) or pid in found:
                continue
            try:
                mine = (pid in self.known and proc.create_time() == self.known[pid]) or _session(
                    pid
                ) == self.root
                if not mine:
                    mine = _environ_has(pid, self.marker)
                if mine and proc.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = proc
                    self.known.setdefault(pid, proc.create_time())
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def alive(self) -> list[psutil.Process]:
        """Tracked descendants still running (the same processes: start times match; zombies excluded)."""
        out = []
        for pid, start in list(self.known.items()):
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def signal(self, sig: signal.Signals) -> None:
        for proc in self.alive():
            with contextlib.suppress(psutil.Error, OSError):
                proc.send_signal(sig)

    def reap(self) -> None:
        """Wait for tracked descendants that were adopted by this process and have died (no zombies left);
        forget those gone. Only these pids are waited for: other children belong to their own spawners."""
        me = os.getpid()
        for pid, start in list(self.known.items()):
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != start:
                    del self.known[pid]  # gone, the pid reused
                    continue
                if proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() == me:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
            except psutil.NoSuchProcess:
                del self.known[pid]
            except (psutil.Error, OSError):
                continue

    def _track(self, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self.known[pid] = start


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc; psutil where /proc has no children files."""
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        tids = []
    found: list[int] = []
    readable = False
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/children", encoding="ascii") as f:
                found.extend(int(x) for x in f.read().split())
            readable = True
        except (OSError, ValueError):
            continue
    if readable or not tids:
        return found
    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _environ_has(pid: int, marker: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(MARKER) == marker
    except (psutil.Error, OSError):
        return False
