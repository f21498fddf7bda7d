"""Files that hold payload bytes or name connections: created 0600 from the start, never readable by others."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


def open_private(path: str | Path, mode: str = "wb") -> IO:  # type: ignore[type-arg]
    """Open `path` for writing (truncated), mode 0600 even when the file already existed with wider bits."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise
