"""Path confinement: path-like arguments must resolve (symlinks followed) inside the configured roots.

Which arguments are paths (all of them, at any depth, covering everything below them):
- names declared in policy (`path_args` globs);
- names that look like paths (`path`, `file`, `dir`, `source`, `destination`, `uri`, `*_path`, `inputFile`...)
  and properties the tool's schema marks as paths (`format: uri`/`path`..., or a description saying path,
  directory, folder, file name) -- unless excluded with a `!name` entry in `path_args`. A value of such an
  argument that is a network URL (`https://...`) is left to the egress check;
- every string that starts with `file:` (whatever its schema format).

Each value is checked in every form a server might interpret it in (raw, percent-decoded to a fixed point,
backslashes as separators, `~` expanded); all must stay inside. A relative value is judged against every
directory the server may resolve it against: its working directory (configured, or the runtime's, which it
inherits), the directories among its arguments (servers such as server-filesystem resolve against their
allowed directories), and the first root; where none is known (a network server), relative paths are denied.
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
# A URL with a scheme of two letters or more (one letter is a Windows drive): not a filesystem path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# The last word of an argument name (snake, kebab, dotted or camelCase) that makes it a path.
_PATH_WORDS = frozenset(
    "path paths pathname pathnames filepath filepaths filename filenames file files dir dirs directory "
    "directories folder folders cwd root roots uri uris source sources destination destinations dest src "
    "dst".split()
)
_WORD_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
_PATH_FORMATS = frozenset(
    {"uri", "uri-reference", "iri", "iri-reference", "path", "file-path", "filepath", "directory", "file"}
)
# A description that says its value is a path: "Path to ...", "The directory ...", "A file name ...".
_PATH_DESCRIPTION = re.compile(
    r"\b(paths?|pathname|file ?paths?|file ?names?|director(y|ies)|folders?|uri)\b"
    r"|^\W*(the |a |an )?(\w+ )?files?\b",
    re.IGNORECASE,
)
_SCHEMA_DEPTH = 8  # levels of nested properties a schema walk follows (schemas are server-supplied)
_SCHEMA_NODES = 2000  # schema nodes a walk visits at most


@dataclass(frozen=True, slots=True)
class PathPolicy:
    roots: tuple[str, ...]  # absolute directories; resolved with realpath when checked
    path_args: tuple[str, ...] = ()  # argument names (globs) that hold paths; `!name` excludes a detected one
    cwd: str | None = None  # the server's working directory, when known (relative paths resolve there too)
    bases: tuple[str, ...] = ()  # other directories the server may resolve relative paths against
    deny_relative: bool = False  # where the server resolves relative paths is unknown: refuse them
    detect: bool = True  # also confine arguments whose name or schema says path (see the module doc)
    schema_names: frozenset[str] = frozenset()  # property names the tool's schema marks as paths


def looks_like_path_name(name: str) -> bool:
    """True for argument names such as `path`, `file_path`, `inputFile`, `output-dir`, `source`, `uri`."""
    words = [w for w in _WORD_SPLIT.split(name) if w]
    return bool(words) and words[-1].lower() in _PATH_WORDS


def schema_path_names(schema: Any) -> frozenset[str]:
    """Names of the properties (at any depth, within bounds) that a tool's input schema marks as paths by
    their `format` or `description`. Never follows `$ref`; bounded in depth and size (hostile schemas)."""
    found: set[str] = set()
    stack: list[tuple[Any, int]] = [(schema, 0)]
    visited = 0
    while stack and visited < _SCHEMA_NODES:
        node, depth = stack.pop()
        visited += 1
        if not isinstance(node, Mapping) or depth > _SCHEMA_DEPTH:
            continue
        props = node.get("properties")
        if isinstance(props, Mapping):
            for name, sub in props.items():
                if isinstance(name, str) and isinstance(sub, Mapping) and _schema_says_path(sub):
                    found.add(name)
                stack.append((sub, depth + 1))
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), Mapping):
                stack.append((node[key], depth + 1))
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list):
                stack.extend((sub, depth + 1) for sub in node[key][:64])
    return frozenset(found)


def _schema_says_path(sub: Mapping[str, Any]) -> bool:
    fmt = sub.get("format")
    if isinstance(fmt, str) and fmt.lower() in _PATH_FORMATS:
        return True
    items = sub.get("items")
    if isinstance(items, Mapping) and isinstance(items.get("format"), str):
        if items["format"].lower() in _PATH_FORMATS:
            return True
    desc = sub.get("description")
    return isinstance(desc, str) and bool(_PATH_DESCRIPTION.search(desc[:500]))


def path_values(
    arguments: Mapping[str, Any],
    path_args: Sequence[str],
    *,
    detect: bool = False,
    schema_names: frozenset[str] | set[str] = frozenset(),
) -> Iterator[tuple[str, str]]:
    """Yield (argument path, value) for every string argument that must be confined: below a name in
    `path_args` (everything), below a name that looks like a path or `schema_names` lists (`detect`; network
    URLs there are the egress check's), and any `file:` string."""
    include = [p for p in path_args if not p.startswith("!")]
    exclude = [p[1:] for p in path_args if p.startswith("!")]
    # (value, where, declared, detected)
    stack: list[tuple[Any, str, bool, bool]] = [(arguments, "", False, False)]
    while stack:
        value, where, declared, detected = stack.pop()
        if isinstance(value, str):
            if declared or _FILE_URI.match(value) or (detected and not _URL.match(value)):
                yield where or "arguments", value
        elif isinstance(value, Mapping):
            for key, child in value.items():
                name = str(key)
                key_declared = declared or any(fnmatchcase(name, p) for p in include)
                key_detected = detected or (
                    detect
                    and (name in schema_names or looks_like_path_name(name))
                    and not any(fnmatchcase(name, p) for p in exclude)
                )
                stack.append((child, f"{where}.{name}" if where else name, key_declared, key_detected))
        elif isinstance(value, list | tuple):
            for i, child in enumerate(value):
                stack.append((child, f"{where}[{i}]", declared, detected))


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
    bases = [roots[0]] + [realpath(os.path.abspath(b)) for b in (policy.cwd, *policy.bases) if b]
    for form in forms:
        if "\x00" in form:
            return "path contains a NUL byte"
        if not os.path.isabs(form) and policy.deny_relative:
            return (
                f"relative path {value!r} cannot be judged: where the server resolves it is unknown; "
                "give an absolute path"
            )
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
