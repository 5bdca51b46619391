"""Where one `livestack stack` run's time goes: each frame, the final snapshot, and what inside it waits.

    python benchmarks/bench_timeline.py FRAMES_DIR [--out DIR] [--repeat 2] [--warm-mb 4096] [-- extra stack args]

Runs `livestack stack FRAMES_DIR -o OUT --no-solve -q` inside this process (the command's own code path: cli.main)
with `Engine.process` and `Engine.snapshot` timed, and this process's CPU (user + system, all threads) and the
disk's written sectors (/sys/block/<disk>/stat, Linux) sampled every 20 ms.  For each run it prints one line per
frame and for the snapshot — wall seconds, CPU seconds, busy cores — then, inside the snapshot, the calls that
make it up (fsyncs, the preview, the commit of stack.fits, preview.jpg) with their start and end relative to
the last frame's end, and how many MB the disk had taken by then.  Each run writes into a new output folder
(removed after it, then os.sync) so that none replaces the last one's files.  Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_seconds() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _disk_of(folder: Path) -> Path | None:
    """/sys/block/<disk>/stat of the disk holding ``folder`` (None where it cannot be told: not Linux, a partition
    of a disk whose name this does not guess, a loop or network mount)."""
    try:
        dev = os.stat(folder).st_dev
        link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    except OSError:
        return None
    for d in (link, link.parent):
        if (d / "stat").is_file() and d.parent.name == "block":
            return d / "stat"
    return None


def _sectors(stat: Path | None) -> int:
    if stat is None:
        return 0
    return int(stat.read_text().split()[6])


class Sampler:
    """(time, CPU seconds, MB written to the disk) every ``every`` s in a thread, until stop()."""

    def __init__(self, disk: Path | None, every: float = 0.02):
        self.disk, self.every = disk, every
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._s0 = _sectors(disk)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _cpu_seconds(), (_sectors(self.disk) - self._s0) * 512 / 2 ** 20))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> tuple[float, float]:
        """(CPU seconds, MB written) at the sample nearest ``t``."""
        s = min(self.samples, key=lambda x: abs(x[0] - t))
        return s[1], s[2]


def _timed(owner, name: str, log: list, label=None) -> None:
    """Wrap ``owner.name`` so that each call appends (label, start, end) to ``log``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            log.append((label(a, k) if label else name, t, time.perf_counter()))

    setattr(owner, name, wrapper)


def instrument(calls: list) -> None:
    """Time the engine's frames and snapshot, and the calls inside a snapshot."""
    from livestack.engine import outputs, pipeline, write

    _timed(pipeline.Engine, "process", calls, label=lambda a, k: f"frame {Path(a[1]).name}")
    _timed(pipeline.Engine, "snapshot", calls)
    for mod, name in ((outputs, "preview"), (outputs, "write_stacks"), (write, "_commit"), (write, "fsync_dir"),
                      (write, "write_jpeg"), (write.StreamedFits, "commit")):
        _timed(mod, name, calls, label=lambda a, k, n=name: f"  {n}")
    _timed(os, "fsync", calls, label=lambda a, k: "  os.fsync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("frames", help="folder of frames (e.g. the one bench_frame.py --keep renders)")
    ap.add_argument("--out", help="output folders are made inside this folder (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--warm-mb", type=int, default=0,
                    help="before each run, a child process writes this much memory (see bench_frame.py)")
    ap.add_argument("extra", nargs="*", help="more `livestack stack` arguments (after --)")
    args = ap.parse_args()

    from livestack import cli

    calls: list = []
    instrument(calls)
    cli._exit_now = lambda code: None          # (the command leaves without Python's teardown: not here)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="livestack-timeline-"))
    base.mkdir(parents=True, exist_ok=True)
    for run in range(args.repeat):
        out = base / f"out{run}"
        if args.warm_mb > 0:
            subprocess.run([sys.executable, "-c", "import numpy as np; np.ones(%d << 20, np.uint8)" % args.warm_mb],
                           check=True)
        os.sync()
        calls.clear()
        sampler = Sampler(_disk_of(base))
        t0 = time.perf_counter()
        sys.argv = ["livestack", "stack", args.frames, "-o", str(out), "--no-solve", "-q", *args.extra]
        try:
            cli.main()
        except SystemExit as end:
            if end.code not in (None, 0):
                raise
        t_end = time.perf_counter()
        sampler.stop()
        print(f"run {run + 1}: {t_end - t0:.2f} s, CPU {sampler.at(t_end)[0] - sampler.at(t0)[0]:.2f} s")
        prev = t0
        for name, a, e in calls:
            if name.startswith("  "):
                continue
            c0, c1 = sampler.at(prev)[0], sampler.at(e)[0]
            print(f"  {name:32s} wall {e - prev:6.3f} s  CPU {c1 - c0:6.3f} s  cores {(c1 - c0) / max(e - prev, 1e-9):4.2f}")
            prev = e
        frames = [e for name, _, e in calls if name.startswith("frame ")]
        if frames:
            last = frames[-1]
            print(f"  inside the snapshot (seconds from the last frame's end; MB the disk had taken by then: "
                  f"{sampler.at(last)[1]:.0f} at it)")
            for name, a, e in calls:
                if name.startswith("  ") and a >= last - 1e-3:
                    print(f"  {name:30s} {a - last:6.3f} → {e - last:6.3f}  ({e - a:.3f} s)  disk {sampler.at(e)[1]:5.0f} MB")
        shutil.rmtree(out, ignore_errors=True)
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
