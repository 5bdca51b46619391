"""Atomic file writes shared by every driver: the daemon must never see half a file, and a power cut on a Pi
must leave the previous complete file, never a torn one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, data: bytes | Callable[[object], None]) -> Path:
    """Write `data` (bytes, or a function given the open binary file) to a hidden temporary file beside
    `path`, fsync it, rename it onto `path` and fsync the folder. A reader (or a crash) sees the whole file
    or nothing; the temporary name starts with '.' so folder watchers ignore it. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a power cut on a Pi is an ordinary event)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
