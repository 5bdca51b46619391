"""The allocator settings (memory.py): glibc takes them, a freed temporary's pages are reused by the next one of
its size, and glibc's own environment variables, when the user set any, are left to decide."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A 24 MB temporary allocated, freed and allocated again (a binned 24 MP plane, as every frame makes): how many
# of the second one's pages are new (page faults), as a fraction of its pages.
PROBE = """
import resource, sys
import numpy as np
from livestack.engine.memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "on" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(6_000_000, np.float32); del a
f0 = faults()
a = np.ones(6_000_000, np.float32)
print(took, (faults() - f0) * resource.getpagesize() / a.nbytes)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")


def probe(mode: str, **env) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    # without numpy's transparent huge pages a page fault is one 4 KB page, so faults count pages
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                       env={**clean, "NUMPY_MADVISE_HUGEPAGE": "0", **env}, timeout=60, check=True)
    took, new = r.stdout.split()
    return took, float(new)


def test_a_freed_temporary_is_reused_not_faulted_in_again():
    took, new = probe("on")
    assert took == "True"
    assert new < 0.05
    _, new_default = probe("off")
    assert new_default > 0.5          # glibc's default gave the first one back to the system


def test_the_users_malloc_environment_wins():
    took, _ = probe("on", MALLOC_ARENA_MAX="4")
    assert took == "False"


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
def test_the_bootstrap_buffers_are_huge_pages():
    # a float16 frame buffered for the bootstrap, written whole: 64 MB in 4 KB pages would be 16 384 faults
    code = """
import resource, numpy as np
from livestack.engine.stack import _anonymous
a = _anonymous((2, 4096, 4096), np.float16)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a[...] = 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
    clean = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=clean,
                       timeout=60, check=True)
    assert int(r.stdout) < 16384 // 8
