"""Registration model (auto | similarity | affine) against the simulator's truth and on real sequences.

    python benchmarks/bench_register.py [--frames 12] [--seeds 11 12 13] [--real] [--keep DIR]

(a) Simulated nights with field rotation and a meridian flip (SimConfig rotation_deg, flip_at), rendered to FITS
and run through the engine (default config) so that the stars are the engine's own: colour fields where the
engine finds ~90 and ~22 stars a frame, and a mono Hα one with ~15 (a narrowband frame's count). Every frame after
the reference is registered again onto the reference's stars with each forced model and with auto (pattern
match, no prediction, rng seeded), and compared with the truth (the simulator's frame_to_sky): per frame the RMS
over the frame (geometry.rms_error) and the largest error, which for an affine error is at a corner. Printed:
RMS over frames of the per-frame RMS, their median, the largest error of any frame, frames with no matrix, how
often the affine was the model, median ms per registration; and the engine's own matrices (auto, previous-frame
prediction first; none for a frame the judge rejected before registering it).

(b) With --real: the Seestar M94 sequences of ../shared/data/sequences (MANIFEST.md) through the engine; per frame
the stars matched, the model auto chose, and how far apart the similarity and the affine put each corner of
the frame (px on the grid; the largest of the four, and their RMS). No truth there: a corner difference well
above the similarity's own error (~0.1 px with 20 stars) is an affine term the stars show, or noise the affine
follows. The kstars_asi1600mm folder holds two frames of two different fields (NGC 4535, Kocab): nothing to
register one onto the other, so it is skipped.

Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQUENCES = ROOT.parent / "shared" / "data" / "sequences"

MODELS = ("auto", "similarity", "affine")


def corners(shape_hw) -> np.ndarray:
    h, w = shape_hw
    return np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]])


def max_error(m_est, m_true, shape_hw) -> float:
    """Largest distance between where two transforms send a pixel of the frame: the difference of two affine
    maps is affine, so its largest length over a rectangle is at a corner."""
    from livestack.engine import geometry as geo

    pts = corners(shape_hw)
    return float(np.linalg.norm(geo.apply(m_est, pts) - geo.apply(m_true, pts), axis=1).max())


def engine_frames(files):
    """Run the engine over ``files``; yield (index, record, frame stars, reference index, reference stars, grid)
    per frame. The reference is the first frame good enough to be one, not always frame 0."""
    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    eng = Engine(Config())
    for i, f in enumerate(files):
        rec = eng.process(f)
        ref = eng.ref
        # a frame that failed before its stars were found leaves the previous frame's in last_stars
        stars = eng.last_stars if rec.status != "failed" else None
        if ref is None:
            yield i, rec, stars, None, None, eng.grid
        else:
            yield i, rec, stars, [f.name for f in files].index(ref.file), ref.stars, eng.grid


def register_all(stars, ref_stars):
    """{model: Registration | error text} and {model: seconds}: the frame's stars onto the reference's."""
    from livestack.engine.register import RegisterParams, RegistrationError, register

    out, secs = {}, {}
    for model in MODELS:
        t = time.perf_counter()
        try:
            out[model] = register(stars.xy, ref_stars.xy, RegisterParams(model=model), rng=np.random.default_rng(0),
                                  src_flux=stars.flux, ref_flux=ref_stars.flux)
        except RegistrationError as err:
            out[model] = str(err)
        secs[model] = time.perf_counter() - t
    return out, secs


def simulated(args, work: Path) -> None:
    from drivers.simulator import SimConfig, render_night
    from livestack.engine import geometry as geo

    # stars found by the engine a frame (seed 11): ~90, ~22 (tests/engine/test_pipeline.py's nights), ~15
    nights = {
        "colour 640x480, 2000 sky stars": {"n_stars": 2000},
        "colour 640x480, 600 sky stars": {"n_stars": 600},
        "mono Ha 640x480, 150 sky stars": {"n_stars": 150, "mono": True, "filter": "Ha"},
    }
    print("(a) simulator: rotation_deg 0.05 per frame, meridian flip at frame "
          f"{args.frames // 2}, drift (0.7, -0.4) px/frame, dither 2 px; errors in px against frame_to_sky")
    for label, kw in nights.items():
        agg = {m: {"rms": [], "max": [], "secs": [], "fail": 0, "affine": 0, "matches": [],
                   "why": []} for m in
               (*MODELS, "engine")}
        skipped = 0
        for seed in args.seeds:
            cfg = SimConfig(width=640, height=480, n_frames=args.frames, seed=seed, rotation_deg=0.05,
                            flip_at=args.frames // 2, dither_px=2.0, **kw)
            folder = work / f"night{len(list(work.iterdir()))}"
            truth = render_night(folder, cfg)
            files = [folder / f["file"] for f in truth["frames"]]
            for i, rec, stars, k, ref_stars, grid in engine_frames(files):
                if ref_stars is None or i == k or stars is None:
                    skipped += 1
                    continue
                s = grid.sensor_to_grid
                m_i = np.array(truth["frames"][i]["frame_to_sky"])
                m_0 = np.array(truth["frames"][k]["frame_to_sky"])
                t_sensor = geo.compose(geo.invert(m_0), m_i)
                t_grid = geo.compose(s, geo.compose(t_sensor, geo.invert(s)))
                gshape = grid.stack_shape[1:]
                regs, secs = register_all(stars, ref_stars)
                for model, reg in regs.items():
                    a = agg[model]
                    a["secs"].append(secs[model])
                    if isinstance(reg, str):
                        a["fail"] += 1
                        a["why"].append(f"{files[i].name} (seed {seed}): {reg}")
                        continue
                    a["rms"].append(geo.rms_error(reg.matrix, t_grid, gshape))
                    a["max"].append(max_error(reg.matrix, t_grid, gshape))
                    a["affine"] += reg.model == "affine"
                    a["matches"].append(reg.matches)
                a = agg["engine"]
                if rec.matrix is None:      # rejected before it was registered, or registration failed
                    a["fail"] += 1
                    a["why"].append(f"{files[i].name} (seed {seed}): {rec.status}, {rec.reason}")
                else:
                    a["rms"].append(geo.rms_error(np.array(rec.matrix), t_grid, gshape))
                    a["max"].append(max_error(np.array(rec.matrix), t_grid, gshape))
        n, pairs = len(agg["auto"]["secs"]), agg["auto"]["matches"] or [0]
        print(f"  {label}: {len(args.seeds)} nights of {args.frames} frames, {n} registered onto their reference "
              f"({skipped} not: the references, and frames before them with too few stars to be one); pairs "
              f"matched median {np.median(pairs):.0f} (min {min(pairs)}, max {max(pairs)})")
        print(f"    {'model':<10} {'RMS of frame RMS':>16} {'median frame RMS':>16} {'max error':>10} "
              f"{'none':>6} {'affine chosen':>13} {'ms/frame':>8}")
        for model, a in agg.items():
            rms = np.sqrt(np.mean(np.square(a["rms"]))) if a["rms"] else float("nan")
            med = np.median(a["rms"]) if a["rms"] else float("nan")
            mx = max(a["max"]) if a["max"] else float("nan")
            ms = f"{1e3 * np.median(a['secs']):8.1f}" if a["secs"] else f"{'-':>8}"
            chosen = f"{a['affine']}/{len(a['rms'])}" if model != "engine" else "-"
            print(f"    {model:<10} {rms:16.4f} {med:16.4f} {mx:10.4f} {a['fail']:6d} {chosen:>13} {ms}")
        for model, a in agg.items():
            for why in a["why"]:
                print(f"      {model}: no matrix for {why}")


def real(args) -> None:
    from livestack.engine import geometry as geo

    print("\n(b) real sequences: per frame onto the engine's reference (the first good frame); corner = |similarity - "
          "affine| at the 4 frame corners, grid px")
    for name in ("seestar_m94_night1", "seestar_m94_night2"):
        folder = SEQUENCES / name
        files = sorted(folder.glob("*.fit"))
        if not files:
            print(f"  {name}: no frames at {folder}")
            continue
        print(f"  {name} ({len(files)} frames)")
        print(f"    {'frame':<42} {'stars':>5} {'pairs':>5} {'auto':>10} {'rms px':>7} {'corner max':>10} "
              f"{'corner rms':>10}  engine")
        for i, rec, stars, k, ref_stars, grid in engine_frames(files):
            fname = files[i].name
            if ref_stars is None or i == k or stars is None:
                print(f"    {fname:<42} {len(stars.xy) if stars is not None else 0:5d}  reference "
                      f"({rec.status})")
                continue
            regs, _ = register_all(stars, ref_stars)
            auto, sim, aff = regs["auto"], regs["similarity"], regs["affine"]
            if isinstance(auto, str):
                print(f"    {fname:<42} {len(stars.xy):5d}  auto failed: {auto}")
                continue
            if isinstance(sim, str) or isinstance(aff, str):
                print(f"    {fname:<42} {len(stars.xy):5d} {auto.matches:5d} {auto.model:>10}  "
                      f"similarity: {sim if isinstance(sim, str) else 'ok'}; affine: "
                      f"{aff if isinstance(aff, str) else 'ok'}")
                continue
            pts = corners(grid.stack_shape[1:])
            d = np.linalg.norm(geo.apply(sim.matrix, pts) - geo.apply(aff.matrix, pts), axis=1)
            # the same pairs? (the two fits may keep different stars after the 3-sigma clip)
            same = "" if (sim.matches == aff.matches) else f" (similarity {sim.matches}, affine {aff.matches} pairs)"
            print(f"    {fname:<42} {len(stars.xy):5d} {auto.matches:5d} {auto.model:>10} {auto.rms_px:7.3f} "
                  f"{d.max():10.3f} {np.sqrt(np.mean(d * d)):10.3f}  {rec.status}"
                  f"{'' if rec.status != 'rejected' else ': ' + (rec.reason or '')}{same}")
    print("  kstars_asi1600mm: skipped — its two frames are two different fields (NGC 4535 and Kocab)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--real", action="store_true", help="also the Seestar sequences of ../shared/data/sequences")
    ap.add_argument("--keep", help="render the simulated nights into this folder and keep them")
    args = ap.parse_args()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, numpy {np.__version__}")
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        simulated(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="livestack-bench-register-") as d:
            simulated(args, Path(d))
    if args.real:
        real(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
