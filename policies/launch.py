"""Stdio launch policy: which commands may be spawned, with no shell, and which environment they get.

Parent secrets (AWS_*, tokens, keys) never reach a child unless the config names them for that server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

# What a child gets from the parent environment by default: enough to find binaries and a home.
SAFE_INHERITED = (
    "HOME",
    "LOGNAME",
    "PATH",
    "SHELL",
    "TERM",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "SYSTEMROOT",
)
_SHELLS = frozenset(
    {"sh", "bash", "zsh", "dash", "ksh", "fish", "csh", "tcsh", "cmd", "cmd.exe", "powershell", "pwsh"}
)
_SHELL_META = re.compile(r"[;&|`$<>\n\r\x00]|\$\(")
_SECRET_NAME = re.compile(
    r"(^AWS_|^AZURE_|^GCP_|^GOOGLE_|TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE|CREDENTIAL|^SSH_AUTH_SOCK$)",
    re.I,
)


@dataclass(frozen=True, slots=True)
class LaunchPolicy:
    allowed_commands: tuple[str, ...] = ()  # globs on the command as written or its basename; empty: any
    inherit: tuple[str, ...] = SAFE_INHERITED  # parent variables passed through (secret-looking ones never)


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


def child_environment(
    configured: Mapping[str, str],
    parent: Mapping[str, str] | None = None,
    inherit: Iterable[str] = SAFE_INHERITED,
) -> dict[str, str]:
    """The full environment of a child: the inherited safe variables plus exactly what config sets."""
    parent = os.environ if parent is None else parent
    env = {k: parent[k] for k in inherit if k in parent and not _SECRET_NAME.search(k)}
    # Exported bash functions (`() { ...`) are code, not data (Shellshock).
    env = {k: v for k, v in env.items() if not v.startswith("()")}
    env.update(configured)
    return env


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))
