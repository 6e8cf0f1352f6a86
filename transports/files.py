"""Files the runtime writes that may hold server output (stderr logs, the audit log): owner-only.

Light on purpose (no MCP SDK import): the audit log uses it on the tool-call path's import chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


def open_private(path: Path, *, buffering: int = -1) -> IO[str]:
    """Open `path` for appending, readable by its owner only: created 0600 (its directory 0700 when
    created), an existing file narrowed to 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise
