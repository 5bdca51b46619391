"""Memory of the live daemon with several filter stacks: a mono camera, 7 filters interleaved frame by frame.

    python benchmarks/bench_filters.py [--width 6252 --height 4176 --rounds 5 --filters L,R,G,B,Ha,OIII,SII]
                                       [--keep DIR] [--memory-mb 600]

Renders the frames with the simulator in a separate process first (not timed; re-used with --keep), then runs
`livestack run --no-web` on them as a backlog — the real daemon: frames.jsonl, checkpoints, stack files,
previews — and samples the daemon's resident memory (/proc/PID/status VmRSS) after every frame and its peak
(VmHWM) at the end.  Prints the peak, the resident memory at the end of each round of filters (flat over the
night is the target), seconds per frame and the stack files.  Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM … of a process in kB (empty when it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.startswith("Vm"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6252)
    ap.add_argument("--height", type=int, default=4176)     # 26.1 MP
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--filters", default="L,R,G,B,Ha,OIII,SII")
    ap.add_argument("--keep", help="render into this folder and keep it (re-used when it has the frames)")
    ap.add_argument("--memory-mb", type=int, help="[stack] memory_mb for the run (default: livestack's)")
    args = ap.parse_args()

    filters = args.filters.split(",")
    n = args.rounds * len(filters)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="livestack-bench-filters-"))
    lights = folder / "lights"
    if len(list(lights.glob("light_*.fits"))) < n:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "drivers.simulator", str(lights), "--frames", str(n), "--mono",
                        "--width", str(args.width), "--height", str(args.height), "--filters", args.filters,
                        "--dither-px", "3", "--n-stars", "3000"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"rendered {n} frames in {time.perf_counter() - t:.0f} s (not counted)")
    out = folder / "out"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "livestack.cli", "run", "--watch", str(lights), "--out", str(out), "--no-web"]
    if args.memory_mb is not None:
        cfg = folder / "bench.toml"
        cfg.write_text(f"[stack]\nmemory_mb = {args.memory_mb}\n")
        cmd += ["--config", str(cfg)]
    t0 = time.perf_counter()
    log_path = folder / "daemon.log"
    log_file = open(log_path, "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=log_file, text=True)
    frames_log = out / "frames.jsonl"
    rss_at: list[tuple[int, int]] = []   # (frames done, VmRSS kB)
    seen = -1
    while p.poll() is None:
        done = len(frames_log.read_text().splitlines()) if frames_log.exists() else 0
        st = proc_status(p.pid)
        if done != seen and st:
            rss_at.append((done, st.get("VmRSS", 0)))
            seen = done
        if done >= n:
            time.sleep(2.0)       # let it write the outputs once idle
            break
        time.sleep(0.1)
    peak = proc_status(p.pid).get("VmHWM", 0)
    wall = time.perf_counter() - t0
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=600)
    log_file.close()
    err = log_path.read_text()
    peak = max(peak, max((r for _, r in rss_at), default=0))
    import json
    recs = [json.loads(line) for line in frames_log.read_text().splitlines()]
    in_frames = sum(r.get("seconds") or 0 for r in recs)

    print(f"{n} frames of {args.width}×{args.height} ({args.width * args.height / 1e6:.1f} MP) mono, filters "
          f"{args.filters} interleaved frame by frame; {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"daemon exit code {p.returncode}; {wall:.0f} s from start to the last record "
          f"({wall / max(n, 1):.2f} s/frame incl. start-up, checkpoints and outputs)")
    print(f"of which in the engine, frame by frame: {in_frames:.0f} s (median "
          f"{sorted(r.get('seconds') or 0 for r in recs)[len(recs) // 2]:.2f} s/frame); the rest: checkpoints, "
          f"stack files, previews (the daemon's log: {log_path})")
    print(f"peak RSS (VmHWM): {peak / 1024:.0f} MB")
    k = len(filters)
    ends = [max((r for d, r in rss_at if d <= (i + 1) * k), default=0) for i in range(args.rounds)]
    print("max RSS during each round of filters (MB): " + ", ".join(f"{e / 1024:.0f}" for e in ends))
    for f in sorted(out.glob("stack*.fits")):
        print(f"  {f.name} {f.stat().st_size / 2**20:.0f} MB")
    if p.returncode != 0:
        print(err[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
