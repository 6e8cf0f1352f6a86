"""Path confinement: path-like arguments must resolve (symlinks followed) inside the configured roots.

Which arguments are paths: names declared in policy (globs on argument names, at any depth, covering
everything below them) and every string that starts with `file:` (whatever its schema format). Each value is checked in every form a server might interpret it in (raw,
percent-decoded to a fixed point, backslashes as separators, `~` expanded); all must stay inside.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import unquote, urlsplit

Realpath = Callable[[str], str]

_FILE_URI = re.compile(r"^file:", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PathPolicy:
    roots: tuple[str, ...]  # absolute directories; resolved with realpath when checked
    path_args: tuple[str, ...] = ()  # argument names (globs) that hold paths
    cwd: str | None = None  # the server's working directory, when known (relative paths resolve there too)


def path_values(arguments: Mapping[str, Any], path_args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Yield (argument path, value) for every string argument that must be confined."""
    stack: list[tuple[Any, str, bool]] = [(arguments, "", False)]
    while stack:
        value, where, declared = stack.pop()
        if isinstance(value, str):
            if declared or _FILE_URI.match(value):
                yield where or "arguments", value
        elif isinstance(value, Mapping):
            for key, child in value.items():
                key_declared = declared or any(fnmatchcase(str(key), p) for p in path_args)
                stack.append((child, f"{where}.{key}" if where else str(key), key_declared))
        elif isinstance(value, list | tuple):
            for i, child in enumerate(value):
                stack.append((child, f"{where}[{i}]", declared))


def path_problem(value: str, policy: PathPolicy, *, realpath: Realpath = os.path.realpath) -> str | None:
    """Why `value` escapes the roots (or cannot be judged), or None when every reading stays inside."""
    if "\x00" in value:
        return "path contains a NUL byte"
    roots = [realpath(os.path.abspath(r)) for r in policy.roots]
    if not roots:
        return "no roots are configured for paths"
    try:
        forms = list(_readings(value))
    except ValueError as exc:
        return str(exc)
    bases = [roots[0]] + ([realpath(os.path.abspath(policy.cwd))] if policy.cwd else [])
    for form in forms:
        if "\x00" in form:
            return "path contains a NUL byte"
        candidates = [form] if os.path.isabs(form) else [os.path.join(base, form) for base in bases]
        for candidate in candidates:
            resolved = realpath(os.path.normpath(candidate))
            if not any(_inside(resolved, root) for root in roots):
                return f"path {value!r} resolves to {resolved!r}, outside the allowed roots"
    return None


def _readings(value: str) -> Iterator[str]:
    """The filesystem paths a server could make of `value`."""
    raw = value
    if _FILE_URI.match(raw):
        parts = urlsplit(raw)
        host = (parts.hostname or "").lower()
        if parts.netloc and host not in ("", "localhost"):
            raise ValueError(f"file URI {value!r} names a remote host")
        raw = parts.path
        if not raw:
            raise ValueError(f"file URI {value!r} has no path")
    seen: set[str] = set()
    current = raw
    # Percent-decode to a fixed point: a server (or a library under it) may decode more than once.
    for _ in range(8):
        for form in (current, current.replace("\\", "/"), os.path.expanduser(current)):
            if form not in seen:
                seen.add(form)
                yield form
        decoded = unquote(current)
        if decoded == current:
            return
        current = decoded
    raise ValueError(f"path {value!r} is percent-encoded too many times")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
