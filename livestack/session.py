"""The files of a session folder: frames.jsonl (one record per frame, appended as each frame is processed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .engine.frame import FrameRecord

FRAMES_LOG = "frames.jsonl"


class FramesLog:
    """Append-only frames.jsonl.  Each record is one line, flushed and fsynced: a crash loses at most the line
    being written, and a torn last line is ignored (and repaired) when the log is read back."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line (power lost mid-append) so the next record starts on a line of its own."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, rec: FrameRecord | dict) -> None:
        d = rec.to_dict() if isinstance(rec, FrameRecord) else rec
        line = json.dumps(d, ensure_ascii=False, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_frames_log(self.path)


def read_frames_log(path: Path | str) -> list[dict]:
    """All complete records of a frames.jsonl (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
