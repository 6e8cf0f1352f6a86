"""Stdio launch policy: which commands may be spawned, always without a shell.

A child's environment is not decided here: `transports.stdio.build_env` gives it the MCP SDK's short allowlist
of parent variables plus exactly the server's configured `env`, so parent secrets never reach it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

_SHELLS = frozenset(
    {"sh", "bash", "zsh", "dash", "ksh", "fish", "csh", "tcsh", "cmd", "cmd.exe", "powershell", "pwsh"}
)
_SHELL_META = re.compile(r"[;&|`$<>\n\r\x00]|\$\(")


@dataclass(frozen=True, slots=True)
class LaunchPolicy:
    allowed_commands: tuple[str, ...] = ()  # globs on the command as written or its basename; empty: any


def launch_problem(command: str, args: Sequence[str], policy: LaunchPolicy) -> str | None:
    """Why spawning `command args` is refused, or None. The runtime never runs a shell, so a command
    that looks like shell syntax is an injection attempt, not a convenience."""
    if not command or command != command.strip():
        return "the command is empty or has surrounding whitespace"
    if _SHELL_META.search(command):
        return f"command {command!r} contains shell syntax; commands run without a shell"
    if any("\x00" in a for a in args):
        return "a command argument contains a NUL byte"
    base = os.path.basename(command)
    if policy.allowed_commands and not any(
        fnmatchcase(command, p) or fnmatchcase(base, p) for p in policy.allowed_commands
    ):
        return f"command {command!r} is not in the launch allowlist"
    if base in _SHELLS and "-c" in args and command not in policy.allowed_commands:
        return f"running {base} -c is a shell command line; list {command!r} explicitly to allow it"
    return None
