"""Warnings silenced while a block runs, from any thread: ``with quiet_warnings(): …``.

``warnings.catch_warnings()`` saves and restores the process's one filter list, so two threads that use it at
once undo each other: the frame read ahead (astropy reading a camera's non-standard FITS cards) and the frame in
hand (astropy parsing its WCS) — one thread's exit restored the filters while the other was still reading, and a
warning it meant to silence escaped (under the tests' ``filterwarnings = error`` a frame failed; in the daemon a
line on stderr).  Here the first block to enter silences warnings and the last to leave restores the filters,
whichever threads they run in.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_saved: warnings.catch_warnings | None = None


@contextmanager
def quiet_warnings():
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = warnings.catch_warnings()
            _saved.__enter__()
            warnings.simplefilter("ignore")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                saved, _saved = _saved, None
                saved.__exit__(None, None, None)
