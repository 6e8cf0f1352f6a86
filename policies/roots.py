"""Roots the client advertises (`roots/list`): configured paths turned into validated `file://` URIs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from policies.errors import PolicyError

MAX_ROOTS = 64


class RootError(PolicyError):
    """A configured root is not a local path or a file:// URI."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            reason, 'write an absolute path, a path relative to the config file, or "file:///..."'
        )


@dataclass(frozen=True, slots=True)
class Root:
    uri: str  # file:// URI of an absolute, normalised path
    name: str | None = None

    @property
    def path(self) -> Path:
        return Path(unquote(urlsplit(self.uri).path))


def make_root(value: str, *, base: Path, name: str | None = None) -> Root:
    """A Root for a path (absolute, `~`, or relative to `base`) or a `file://` URI; RootError otherwise."""
    if not value or "\x00" in value:
        raise RootError("a root is empty or contains a NUL character")
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme.lower() != "file":
            raise RootError(f"root {value[:80]!r} is not a file:// URI (roots are local directories)")
        if parts.netloc not in ("", "localhost"):
            raise RootError(f"root {value[:80]!r} names host {parts.netloc!r}; roots are local")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise RootError(f"root {value[:80]!r} has no absolute path")
    else:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base / path
    # Normalised (.. and symlinks resolved where they exist) so a server sees the directory it will use.
    return Root(path.resolve(strict=False).as_uri(), name)
