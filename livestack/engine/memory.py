"""How this process's C allocator treats the work memory of a stack: set once by the shells (cli.main), and
free memory given back before the one moment it matters (the bootstrap's combination, the session's peak).

numpy and OpenCV allocate through malloc.  glibc's defaults suit a program that allocates a little and keeps
it, not one that allocates the same few-megabyte to 32 MB temporaries for every frame:

- a freed block above the mmap threshold (128 KB at first, raised as such blocks are freed) goes back to the
  system, and so does free memory at the top of the heap (trim threshold): the next frame's temporary of the
  same size is new pages, which the kernel zeroes on first touch (system time);
- each thread (read-ahead, the stack's row workers, OpenCV's) gets its own arena, and each arena keeps its
  own free memory: the same temporaries, resident once per thread.

keep_freed_memory() fixes the mmap threshold at glibc's largest (32 MB: smaller blocks stay in the heap for
reuse; frame-sized planes, which the engine keeps in its own buffers, are still mapped and unmapped whole),
never trims the heap, and gives every thread the one arena.  Measured: see the commit that added this file.
"""
from __future__ import annotations

import ctypes
import os

# mallopt() parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 2 ** 20    # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2 ** 30         # free memory at the top of the heap kept up to this much (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Set the allocator as the module says, for this process.  Call it early, before worker threads start (an
    arena a thread already has stays its own).  True when glibc took every setting; False (nothing changed)
    on a C library without mallopt (macOS, musl's stub) or when the user set glibc's own MALLOC_* or
    GLIBC_TUNABLES environment variables, which are left to decide."""
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = [mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                          (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                          (_M_ARENA_MAX, 1))]
    return all(ok)


def release_free_memory() -> None:
    """Give the free memory the heap keeps back to the system now (glibc malloc_trim; nothing elsewhere): before
    a step that needs more memory than a frame, so that the temporaries kept for the frames do not add to
    it.  The next frame's temporaries are new pages again, once."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
