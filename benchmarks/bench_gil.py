"""What the star finder's hold on the GIL costs the frame being stacked beside it.

    python benchmarks/bench_gil.py --keep DIR [--rounds 4]

In a folder or a backlog the next frame's first stages run in the read-ahead thread while the current frame is
warped and stacked on the worker threads (pipeline.Engine.process, next_path).  sep (the star finder) does
not release the GIL while it works (sep-developers/sep#172, open), so for those tens of milliseconds the
worker threads cannot start their next numpy or OpenCV call.  This measures it: frames of DIR (bench_frame.py's
--keep folder; 24 MP) are stacked by one engine without read-ahead while a second thread, once every ~0.75 s
(a frame's period), either runs the real star finder on a binned frame ("sep": its CPU and its GIL), or keeps
a core busy as long without the GIL ("cv2": the same CPU, OpenCV releasing the GIL), or nothing ("none").
The three alternate, --rounds times; prints each one's median seconds a frame.  sep − cv2 is what the GIL
costs a frame beyond the shared CPU.  Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", required=True, help="folder of 24 MP frames (bench_frame.py --keep DIR)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--period", type=float, default=0.75, help="seconds between two star searches")
    args = ap.parse_args()

    import cv2

    from livestack.config import Config
    from livestack.engine import stars
    from livestack.engine.memory import keep_freed_memory
    from livestack.engine.pipeline import Engine
    from livestack.engine.read import read_frame

    keep_freed_memory()
    files = sorted(p for p in Path(args.keep).iterdir() if p.suffix.lower() in (".dng", ".fits", ".fit"))
    if len(files) < 8:
        raise SystemExit(f"{args.keep}: needs 8 frames (bench_frame.py --keep {args.keep} renders them)")
    cfg = Config()
    eng = Engine(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, read_ahead=False)))
    for f in files[:4]:                   # the reference and the bootstrap
        eng.process(f)
    frame = read_frame(files[3]).data
    h, w = frame.shape
    lum = np.ascontiguousarray(cv2.resize(frame, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    del frame
    t = time.perf_counter()
    stars.detect_stars(lum, stars.StarParams())
    busy = time.perf_counter() - t

    def with_gil(stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            stars.detect_stars(lum, stars.StarParams())
            stop.wait(max(0.0, args.period - (time.perf_counter() - t0)))

    def without_gil(stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < busy:
                cv2.GaussianBlur(lum, (0, 0), 3)
            stop.wait(max(0.0, args.period - (time.perf_counter() - t0)))

    seconds: dict[str, list[float]] = {"none": [], "sep": [], "cv2": []}
    for _ in range(args.rounds):
        for kind, fn in (("none", None), ("sep", with_gil), ("cv2", without_gil)):
            stop = threading.Event()
            th = threading.Thread(target=fn, args=(stop,)) if fn else None
            if th:
                th.start()
            for f in files[4:8]:
                seconds[kind].append(eng.process(f).seconds)
            stop.set()
            if th:
                th.join()
    eng.close()
    print(f"{len(files[4:8]) * args.rounds} frames each of {files[0].name}…, {w}×{h}; star finder alone "
          f"{busy:.3f} s every {args.period:g} s")
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    for k, v in med.items():
        print(f"  {k:5s} median {v:.3f} s a frame")
    print(f"  the GIL's cost (sep − cv2): {med['sep'] - med['cv2']:+.3f} s a frame; "
          f"the shared CPU's (cv2 − none): {med['cv2'] - med['none']:+.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
