"""Stdio launch policy: which commands may be spawned, always without a shell.

What it stops: a config that smuggles a shell or an interpreter one-liner into a server entry -- shell
syntax in the command, `sh -c ...` / `bash -lc ...`, `python3 -c ...`, `node -e ...`, `perl -e ...` and the
like, also behind launch wrappers (`env`, `nice`, `timeout`, `nohup`, `setsid`, `stdbuf`, `sudo`,
`busybox` ...) -- and, with `allowed_commands`, any command (and wrapped command) not listed.
What it cannot stop: code in a script or package the command runs (`python server.py`, `npx pkg`, `uvx
pkg` run whatever those contain), or programs that take code in other forms (`awk`, `find -exec`, `make`).
An inline-code form is allowed only when its interpreter is listed in `allowed_commands` by name.

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
    {
        "sh",
        "bash",
        "zsh",
        "dash",
        "ksh",
        "mksh",
        "ash",
        "fish",
        "csh",
        "tcsh",
        "cmd",
        "cmd.exe",
        "powershell",
        "pwsh",
    }
)
_SHELL_META = re.compile(r"[;&|`$<>\n\r\x00]|\$\(")
# Commands that run the command in their arguments; the policy judges that one too.
_WRAPPERS = frozenset(
    {
        "env",
        "nice",
        "nohup",
        "timeout",
        "stdbuf",
        "setsid",
        "sudo",
        "doas",
        "time",
        "ionice",
        "taskset",
        "chrt",
        "command",
        "exec",
        "xargs",
        "busybox",
        "unbuffer",
        "flock",
        "chroot",
        "runuser",
        "su",
    }
)
# env options that take code or a whole command line rather than a command.
_ENV_SPLIT = re.compile(r"^(-S|--split-string)")
# Interpreters and the options that make them run code given on the command line.
_INLINE_CODE: tuple[tuple[re.Pattern[str], re.Pattern[str], frozenset[str]], ...] = (
    # (interpreter basename, option that runs inline code, options that take a separate value)
    (
        re.compile(r"^(python|pypy)[0-9.]*w?(\.exe)?$"),
        re.compile(r"^-[bBdEhiIOPqRsSuvx]*c"),
        frozenset({"-W", "-X"}),
    ),
    (
        re.compile(r"^(node|nodejs|bun)(\.exe)?$"),
        re.compile(r"^(-[a-zA-Z]*[ep]|--eval|--print)"),
        frozenset({"-r", "--require", "--import", "--loader", "--experimental-loader", "-C", "--conditions"}),
    ),
    (re.compile(r"^deno$"), re.compile(r"^eval$"), frozenset()),
    (re.compile(r"^perl[0-9.]*$"), re.compile(r"^-[a-zA-Z]*[eE]"), frozenset({"-I", "-M", "-m"})),
    (re.compile(r"^ruby[0-9.]*$"), re.compile(r"^-[a-zA-Z]*e"), frozenset({"-I", "-r"})),
    (re.compile(r"^php[0-9.]*$"), re.compile(r"^-[a-zA-Z]*r"), frozenset({"-d", "-c"})),
    (re.compile(r"^(lua|luajit)[0-9.]*$"), re.compile(r"^-[a-zA-Z]*e"), frozenset({"-l"})),
    (re.compile(r"^(Rscript|osascript|tclsh|wish)$"), re.compile(r"^-e"), frozenset()),
)
_SHELL_CODE = re.compile(r"^-[a-zA-Z]*c")  # -c, -lc, -ec, -xc ...


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
    argv = [command, *args]
    for _ in range(8):  # wrappers of wrappers, bounded
        problem = _judge(argv[0], argv[1:], policy)
        if problem is not None:
            return problem
        inner = _unwrap(argv)
        if inner is None:
            return None
        argv = inner
    return f"command {command!r} nests too many launch wrappers"


def _judge(command: str, args: Sequence[str], policy: LaunchPolicy) -> str | None:
    base = os.path.basename(command)
    if policy.allowed_commands and not _listed(command, policy, globs=True):
        return f"command {command!r} is not in the launch allowlist"
    listed = _listed(command, policy, globs=False)
    if base in _SHELLS and not listed and any(_SHELL_CODE.match(a) for a in args):
        return f"running {base} -c is a shell command line; list {command!r} explicitly to allow it"
    for name, flag, takes_value in _INLINE_CODE:
        if name.match(base) and not listed:
            skip = False
            for arg in args:
                if skip:
                    skip = False
                    continue
                if flag.match(arg):
                    return (
                        f"running {base} {arg.split('=', 1)[0][:12]} runs code from the command line; "
                        f"list {command!r} explicitly to allow it"
                    )
                if arg in takes_value:
                    skip = True
                elif not arg.startswith("-") or arg == "--":
                    break  # the script or subcommand: what follows is its own arguments
    if base == "env" and not listed and any(_ENV_SPLIT.match(a) for a in args):
        return "running env -S splits a command line like a shell; list 'env' explicitly to allow it"
    return None


def _listed(command: str, policy: LaunchPolicy, *, globs: bool) -> bool:
    base = os.path.basename(command)
    if globs:
        return any(fnmatchcase(command, p) or fnmatchcase(base, p) for p in policy.allowed_commands)
    return command in policy.allowed_commands or base in policy.allowed_commands


def _unwrap(argv: list[str]) -> list[str] | None:
    """The command a launch wrapper runs (`env A=1 nice -n 5 cmd ...` -> `cmd ...`), or None."""
    base = os.path.basename(argv[0])
    if base not in _WRAPPERS:
        return None
    rest = argv[1:]
    if base in ("su", "runuser", "flock") and any(_SHELL_CODE.match(a) or a == "--command" for a in rest):
        return ["sh", "-c", *rest]  # su/flock -c CMD: a shell command line
    if base in ("su", "runuser"):
        return None
    skip_values = {
        "-n",
        "-u",
        "-C",
        "-g",
        "-o",
        "-e",
        "-i",
        "-s",
        "-k",
        "-p",
        "-c",
        "-r",
        "--signal",
        "--chdir",
    }
    i = 0
    positional_skipped = False
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("-"):
            i += 2 if arg in skip_values and base not in ("setsid", "nohup", "time") else 1
            continue
        if base == "env" and "=" in arg:  # VAR=value
            i += 1
            continue
        # timeout DURATION, taskset MASK, chrt PRIO, flock FILE, chroot DIR: one positional before the command
        if base in ("timeout", "taskset", "chrt", "flock", "chroot") and not positional_skipped:
            positional_skipped = True
            i += 1
            continue
        break
    return rest[i:] or None
