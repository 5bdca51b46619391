"""The daemon's latency and backlog rate: from a file landing in the capture folder to the page's preview
showing it, and how fast a backlog goes.

    python benchmarks/bench_daemon.py --frames DIR [--settle 1.0] [--live 8] [--gap 3] [--backlog N]
                                      [--config livestack.toml] [--give-way]

DIR holds simulated or real frames (e.g. `python -m drivers.simulator DIR --frames 8 --width 6000 --height 4000
--format dng`).  Live: the first --live frames are dropped into the watched folder one at a time (written to a
hidden name, then renamed, as capture programs do), each --gap seconds after the daemon is idle again (a night's
exposures: the writes a frame owes — stack.fits, a checkpoint — are done before the next one lands); the time
from the rename to the status's new preview_id is printed, split into the watcher's settle time and the rest.
Backlog: then all frames at once into a fresh session (``--backlog N``: N files, the folder's hard-linked
under new names in turn); seconds a frame until the last is stacked, overall and after the fourth (the start,
the reference and the bootstrap done: the steady rate), then how long its last stack.fits and checkpoint took
after the last frame (until the eleventh session the rate counted them: ~1.5 s at 24 MP, 0.015 s a frame of a
backlog of 100), and where the time went until idle (Engine.process, previews, stack.fits, checkpoints) —
with Engine.process's own median after the fourth frame, to set beside the engine alone (`bench_frame.py
--night`): what the daemon's outputs cost the frames is then apart from what they cost themselves.
--config: the engine's settings and the [daemon] section (e.g. backlog_share), as `livestack run` reads them.
Each live frame's latency is split into the watcher and the queue, Engine.process, the records, the preview.
--give-way: only how fast a checkpoint written at an idle moment stops for a landing frame (see give_way).
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _service(watch: Path, out: Path, settle: float, cfg):
    import dataclasses

    from livestack.daemon.config import WatchParams, shell_sections
    from livestack.daemon.service import Service

    dp = dataclasses.replace(shell_sections(cfg)[1], out=str(out))     # [daemon] from --config, as `run` reads it
    return Service(cfg, watch, out, WatchParams(dir=str(watch), settle_s=settle, timeout_s=60.0, rescan_s=1.0), dp)


def _timed(cls, names, calls=None) -> dict:
    """Wrap cls's methods ``names`` so that each call's (start, end) (perf_counter) is appended to calls[name]."""
    calls = {} if calls is None else calls
    for name in names:
        fn, spans = getattr(cls, name), calls.setdefault(name, [])

        def wrapper(*a, _fn=fn, _spans=spans, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _spans.append((t, time.perf_counter()))
        setattr(cls, name, wrapper)
    return calls


def _drop(src: Path, watch: Path) -> float:
    tmp = watch / f".{src.name}.part"
    shutil.copy(src, tmp)
    t = time.perf_counter()
    os.replace(tmp, watch / src.name)
    return t


def give_way(files: list[Path]) -> None:
    """How fast an idle write gives way to a landing frame: a checkpoint of a 4-frame stack written whole, and
    asked to stop 0.3 and 0.6 s into its write (write.deferrable), three times each; and closing and removing
    400 MB written to a file created by its writer against one created empty first and truncated on opening
    (ext4 flushes the latter when it is closed: auto_da_alloc)."""
    import threading

    from livestack.config import Config
    from livestack.engine.pipeline import Engine
    from livestack.engine.write import WriteDeferred, deferrable
    from livestack.session import save_engine

    with tempfile.TemporaryDirectory(prefix="livestack-bench-giveway-") as tmp:
        tmp = Path(tmp)
        block = b"\0" * (8 << 20)
        for created in (False, True, False, True):
            path = tmp / f"file{int(created)}"
            if created:
                path.touch()                    # as tempfile.mkstemp did
            with open(path, "wb") as f:
                for _ in range(50):
                    f.write(block)
                t = time.perf_counter()
            t1 = time.perf_counter()
            os.unlink(path)
            print(f"400 MB {'created empty, then truncated' if created else 'created by the writer'}: close "
                  f"{t1 - t:.3f} s, unlink {time.perf_counter() - t1:.3f} s")
        engine = Engine(Config())
        for f in files[:4]:
            engine.process(f)
        out = tmp / "checkpoint.npz"
        whole = []
        for _ in range(3):
            t = time.perf_counter()
            save_engine(engine, out, {})
            whole.append(time.perf_counter() - t)
        print(f"a checkpoint of {files[0].parent}'s first 4 frames, whole: "
              + ", ".join(f"{x:.2f}" for x in whole) + " s")
        for delay in (0.3, 0.6):
            late = []
            for _ in range(3):
                asked: list[float] = []
                timer = threading.Timer(delay, lambda: asked.append(time.perf_counter()))
                timer.start()
                try:
                    with deferrable(lambda: bool(asked)):
                        save_engine(engine, out, {})
                except WriteDeferred:
                    late.append(time.perf_counter() - asked[0])
                timer.cancel()
            print(f"  asked to give way {delay} s in: it stopped " + ", ".join(f"{x:.3f}" for x in late)
                  + " s later" + (f" ({3 - len(late)} finished first)" if len(late) < 3 else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", required=True, help="folder of frames")
    ap.add_argument("--settle", type=float, default=1.0, help="[watch] settle_s (default 1.0, as shipped)")
    ap.add_argument("--live", type=int, default=8, help="frames dropped one at a time")
    ap.add_argument("--gap", type=float, default=3.0, help="seconds between the daemon's idle and the next frame")
    ap.add_argument("--config", help="livestack.toml for the engine and [daemon] settings")
    ap.add_argument("--backlog", type=int, help="frames in the backlog (default: the folder's)")
    ap.add_argument("--give-way", action="store_true", help="only: how fast an idle write gives way (see give_way)")
    args = ap.parse_args()

    from livestack.config import Config, load_config
    from livestack.engine.memory import keep_freed_memory

    # As `livestack run` does (cli.main), before any thread: without it the daemon measured here returned its
    # freed temporaries to the system after every frame and faulted new pages in for the next: Engine.process
    # took 29.7–30.8 s of a 24 MP backlog of 100 without it, 28.5–29.0 s with it (bench_frame.py sets it too).
    keep_freed_memory()

    cfg = load_config(args.config) if args.config else Config()
    cfg.extra.setdefault("solve", {"enabled": False})      # a simulated sky: no plate solve
    files = sorted(p for p in Path(args.frames).iterdir() if p.suffix.lower() in (".dng", ".fits", ".fit", ".cr2"))
    if args.give_way:
        give_way(files)
        return 0
    root = Path(tempfile.mkdtemp(prefix="livestack-bench-daemon-"))

    # live
    watch, out = root / "live", root / "live-out"
    watch.mkdir()
    svc = _service(watch, out, args.settle, cfg)
    from livestack.daemon.service import Service
    from livestack.engine.pipeline import Engine

    calls = _timed(Engine, ("process", "preview"))
    _timed(Service, ("_render_preview", "_write_fits", "_checkpoint"), calls)
    svc.start()
    lat = []
    for i, f in enumerate(files[: args.live]):
        seen = svc.status().get("preview_id")
        for spans in calls.values():
            spans.clear()
        t0 = _drop(f, watch)
        while svc.status().get("preview_id") == seen:
            time.sleep(0.005)
        lat.append(time.perf_counter() - t0)
        while svc.status()["state"] != "idle":      # stack.fits, checkpoint: after the preview, not counted
            time.sleep(0.01)
        (p0, p1), (d0, d1) = (calls[k][-1] if calls[k] else (t0, t0) for k in ("process", "preview"))
        print(f"live frame {i}: {lat[-1]:.2f} s from the rename to the preview on the page: the watcher and the "
              f"queue {p0 - t0:.2f}, Engine.process {p1 - p0:.2f}, the records {d0 - p1:.2f}, the preview drawn "
              f"{d1 - d0:.2f}, published and seen {lat[-1] - (d1 - t0):.2f}")
        time.sleep(args.gap)
    svc.stop(timeout=60)

    # backlog
    watch, out = root / "backlog", root / "backlog-out"
    watch.mkdir()
    n = args.backlog or len(files)
    for i in range(n):
        f = files[i % len(files)]
        dst = watch / (f.name if i < len(files) else f"{f.stem}-{i // len(files)}{f.suffix}")
        try:
            os.link(f, dst)          # same bytes, no copy (a name sorts after its source's: capture order kept)
        except OSError:
            shutil.copy(f, dst)
    t0 = time.perf_counter()
    svc = _service(watch, out, args.settle, cfg)
    for spans in calls.values():
        spans.clear()
    svc.start()
    t4 = t_last = None
    while len(svc.snapshot.frames) < n or svc.status()["state"] != "idle":
        done = len(svc.snapshot.frames)
        if t4 is None and done >= 4:
            t4 = time.perf_counter()
        if t_last is None and done >= n:
            t_last = time.perf_counter()
        time.sleep(0.01)
    idle = time.perf_counter() - t0
    t_last = t_last or time.perf_counter()
    backlog = t_last - t0
    steady_rate = (t_last - t4) / (n - 4) if t4 is not None and n > 4 else float("nan")
    svc.stop(timeout=60)
    shutil.rmtree(root, ignore_errors=True)

    steady = sorted(lat[3:] or lat[1:] or lat)
    print()
    print(f"{len(files)} frames from {args.frames}; {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; [watch] settle_s {args.settle}")
    print(f"live, after the bootstrap: median {steady[len(steady) // 2]:.2f} s (all: "
          f"{', '.join(f'{x:.2f}' for x in steady)}) from the rename to the page (the watcher hands on a whole "
          f"file renamed into place at once; one written in place after 0.25 s when its layout shows a whole "
          f"image, else after [watch] settle_s, {args.settle:.2f} s)")
    print(f"backlog of {n}: {backlog:.1f} s from start to the last frame stacked, "
          f"{backlog / n:.2f} s per frame (includes the start, the reference and the bootstrap); "
          f"{steady_rate:.3f} s per frame after the fourth; idle {idle - backlog:.1f} s later (its last stack.fits "
          f"and checkpoint written)")
    per = sorted(e - s for s, e in calls["process"][4:])
    if per:
        print(f"  Engine.process after the fourth: median {per[len(per) // 2]:.3f} s, quartiles "
              f"{per[len(per) // 4]:.3f}–{per[3 * len(per) // 4]:.3f} s")
    print("  where the backlog's time went (s): " + ", ".join(
        f"{name.strip('_')} {sum(e - s for s, e in calls[name]):.1f} ({len(calls[name])}×)"
        for name in ("_render_preview", "_write_fits", "_checkpoint", "process")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
