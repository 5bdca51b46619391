"""Two source trees (or two configurations) on the same frames, paired frame by frame: what a change costs.

    git worktree add /tmp/old <commit>
    python benchmarks/bench_versions.py --keep /tmp/bench24 --a /tmp/old --b . [--pairs 24] [--cpus 0]
                                        [--a-mode mhc,bilinear,plain] [--b-mode mhc,compensated,smooth]
                                        [--preview]

This VM's speed drifts by 20–40 % within minutes, so two runs one after the other measure the drift as much as
the change.  Here each tree runs in its own worker process (its own imports: the code of that tree) and each
frame goes through both in turn — which goes first alternates — while the other waits, so the drift cancels
in the per-frame differences.  After the reference and the bootstrap (4 frames, not counted), ``--pairs``
frames cycle through the folder's files.  A mode is debayer,interpolation,smooth|plain.  Read-ahead is off
(a worker's read-ahead thread would run during the other's frame).  Prints each side's median seconds a frame
(wall and CPU) and the median and quartiles of the differences b − a; asserts nothing.  ``--preview``: each
frame's time includes drawing the page's preview after it and encoding it as JPEG, as the daemon does after a
live frame — the daemon's latency less the watcher's hand-over (~0.01 s).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(tree: str, mode: str, preview: bool = False) -> int:
    """Stack the files named on stdin (one "path next" a line) with ``tree``'s code; print seconds a frame."""
    sys.path.insert(0, str(Path(tree).resolve()))
    from livestack.config import Config
    from livestack.engine.memory import keep_freed_memory
    from livestack.engine.pipeline import Engine

    keep_freed_memory()
    debayer, interp, smooth = mode.split(",")
    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer=debayer, interpolation=interp,
                                                              smooth_background=smooth == "smooth",
                                                              read_ahead=False))
    eng = Engine(cfg)
    print("ready", flush=True)
    for line in sys.stdin:
        path = Path(line.strip())
        c, t = time.process_time(), time.perf_counter()
        rec = eng.process(path)
        if preview and rec.status in ("reference", "stacked"):
            import cv2

            ok, _ = cv2.imencode(".jpg", eng.preview()[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        print(f"{time.perf_counter() - t:.4f} {time.process_time() - c:.4f} {rec.status}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", required=True, help="folder of frames (e.g. bench_frame.py's --keep folder)")
    ap.add_argument("--a", default=str(ROOT), help="source tree A (default: this one)")
    ap.add_argument("--b", default=str(ROOT), help="source tree B (default: this one)")
    ap.add_argument("--a-mode", default="mhc,bilinear,plain", help="debayer,interpolation,smooth|plain")
    ap.add_argument("--b-mode", default="mhc,compensated,smooth")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--cpus", help="run both on these CPUs only (as taskset -c), e.g. 0")
    ap.add_argument("--preview", action="store_true", help="each frame's time includes the page's preview")
    ap.add_argument("--worker", nargs=2, metavar=("TREE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, preview=args.preview)
    files = sorted(p for p in Path(args.keep).iterdir() if p.suffix.lower() in (".dng", ".fits", ".fit", ".cr2"))
    if not files:
        raise SystemExit(f"{args.keep}: no frames")
    sides = [(args.a, args.a_mode), (args.b, args.b_mode)]
    procs = []
    for tree, mode in sides:
        cmd = [sys.executable, __file__, "--keep", args.keep, "--worker", tree, mode] + \
            (["--preview"] if args.preview else [])
        if args.cpus:
            cmd = ["taskset", "-c", args.cpus, *cmd]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"{tree}: the worker did not start")
        procs.append(p)

    def one(k: int, i: int) -> tuple[float, float]:
        procs[k].stdin.write(f"{files[i % len(files)]}\n")
        procs[k].stdin.flush()
        wall, cpu, status = procs[k].stdout.readline().split()
        if status not in ("reference", "stacked"):
            raise SystemExit(f"{files[i % len(files)].name}: {status} in {sides[k][0]}")
        return float(wall), float(cpu)

    for i in range(4):                  # the reference and the bootstrap: not counted
        one(0, i)
        one(1, i)
    res: list[list[tuple[float, float]]] = [[], []]
    for j in range(args.pairs):
        for k in ((0, 1) if j % 2 == 0 else (1, 0)):
            res[k].append(one(k, 4 + j))
    for p in procs:
        p.stdin.close()
        p.wait()

    def q(xs, f):
        xs = sorted(xs)
        return xs[round(f * (len(xs) - 1))]
    cpus = f"CPU {args.cpus}" if args.cpus else f"{os.cpu_count()} CPUs"
    print(f"{args.pairs} pairs of {files[0].name}…; {platform.machine()}, {cpus}, "
          f"Python {platform.python_version()}; read-ahead off"
          + ("; each frame with its preview (JPEG)" if args.preview else ""))
    for k, (tree, mode) in enumerate(sides):
        print(f"  {'ab'[k]}: {tree} {mode}: median {q([w for w, _ in res[k]], .5):.3f} s a frame, "
              f"{q([c for _, c in res[k]], .5):.3f} CPU s")
    dw = [b[0] - a[0] for a, b in zip(*res)]
    dc = [b[1] - a[1] for a, b in zip(*res)]
    print(f"  b − a: wall median {q(dw, .5):+.3f} s (quartiles {q(dw, .25):+.3f} … {q(dw, .75):+.3f}); "
          f"CPU median {q(dc, .5):+.3f} s (quartiles {q(dc, .25):+.3f} … {q(dc, .75):+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
