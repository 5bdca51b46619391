"""Per-stage and total seconds per frame, and peak memory, for large colour frames.

    python benchmarks/bench_frame.py [--width 6000 --height 4000 --frames 6 --format dng]
                                     [--debayer mhc|bilinear|superpixel] [--interpolation bilinear|bicubic|lanczos]
                                     [--no-read-ahead]

Frames are rendered by the simulator in a separate process first, so the peak RSS printed is the stacking
process's own.  Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--format", choices=("dng", "fits"), default="dng")
    ap.add_argument("--debayer", default="mhc", help="mhc (the default) | bilinear | superpixel")
    ap.add_argument("--interpolation", default="bilinear")
    ap.add_argument("--no-read-ahead", action="store_true", help="[engine] read_ahead = false")
    ap.add_argument("--keep", help="render into this folder and keep it (re-used when it has the frames)")
    args = ap.parse_args()

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="livestack-bench-"))
    if not sorted(folder.glob(f"light_*.{args.format}")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "drivers.simulator", str(folder), "--frames", str(args.frames),
                        "--width", str(args.width), "--height", str(args.height), "--format", args.format,
                        "--rotation-deg", "0.02", "--n-stars", "2000"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"rendered {args.frames} frames in {time.perf_counter() - t:.1f} s (not counted)")
    files = sorted(folder.glob(f"light_*.{args.format}"))[: args.frames]

    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer=args.debayer,
                                                              interpolation=args.interpolation,
                                                              read_ahead=not args.no_read_ahead))
    eng = Engine(cfg)
    rows = []
    for i, f in enumerate(files):
        rec = eng.process(f, next_path=files[i + 1] if i + 1 < len(files) else None)   # as `livestack stack`
        rows.append((rec, dict(eng.timings)))
        print(f"{rec.file}: {rec.status:9s} {rec.seconds:6.3f} s  " +
              " ".join(f"{k} {v:.3f}" for k, v in eng.timings.items()))
    t = time.perf_counter()
    eng.snapshot(folder / "out")
    snap = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Steady state: after the reference and the bootstrap frames (the frame that ends the bootstrap also
    # combines the buffered frames into the accumulators: printed above, not in the median).
    boot = max(1, cfg.stack.bootstrap)
    stacked = [(r, tm) for r, tm in rows[boot:] if r.status == "stacked"]
    once = max((tm.get("bootstrap", 0.0) for _, tm in rows), default=0.0)
    stages = [k for k in dict.fromkeys(k for _, tm in stacked for k in tm) if k != "bootstrap"]
    print()
    print(f"frame {args.width}×{args.height} ({args.width * args.height / 1e6:.0f} MP) {args.format}, "
          f"debayer {args.debayer}, warp {args.interpolation}, read-ahead {not args.no_read_ahead}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    if stacked:
        def median(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2]
        print(f"median s/frame per stage ({len(stacked)} frames after the reference and the bootstrap):")
        for k in stages:
            print(f"  {k:10s} {median([tm.get(k, 0.0) for _, tm in stacked]):.3f}")
        print(f"  {'total':10s} {median([r.seconds for r, _ in stacked]):.3f}")
    print(f"bootstrap combine (once, before frame {boot + 1}): {once:.2f} s")
    print(f"snapshot (stack.fits + preview.jpg): {snap:.2f} s")
    print(f"peak RSS: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
