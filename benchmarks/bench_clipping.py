"""Does the stack's outlier rejection clip star cores when the seeing varies, and do the normalisation or the
weights favour soft frames?  (Issue #12: our stars are a few % wider than Siril's.)

    python benchmarks/bench_clipping.py [--width 1200 --height 900 --frames 12 --seeing 2.5 4.0 --seed 1]
                                        [--mono] [--real] [--no-sim] [--no-defects] [--ways default ...]
                                        [--keep DIR]

Simulated nights (seeded, RGGB FITS unless --mono; truth known): the seeing alternates frame by frame between
the two values of --seeing (sharp frame first, soft frame first), improves from the soft value to the sharp
one over the night, worsens the other way, or stays at their geometric mean (the simulator adds ±10 % to each
frame).  With --real also the Seestar M94 sequences of ../shared/data/sequences.  Each night is stacked
in-process by the Engine several ways (WAYS: monkeypatched, no engine file is changed):

    no rejection          the plain weighted mean of the same normalised frames (the outlier test keeps all)
    default               the engine as it is: κσ rejection (rel_floor 0.3 kept for good since this benchmark),
                          weights from noise (sharpness_weight = 0)
    before                the engine before: rel_floor 0.1, dropped once a cell has 5 frames (min_empirical 5)
    uniform weights       rejection on, every frame weight 1
    uniform, no rejection
    sharpness_weight 1    [engine] sharpness_weight = 1
    no rejection, mesh sky  transparency photometry on the background mesh alone (before; the engine now takes
                          the sky from an annulus round each star), no rejection
    rel_floor 0.3 only    rel_floor = 0.3, dropped after 5 frames as before
    stats: every frame    every cell of a frame enters the outlier test's running statistics, rejected or not
                          (rejected cells still stay out of the stack's sums): tried, not proposed
    rel 0.5 always        rel_floor 0.5 whatever a cell's frame count

The frame judge's FWHM test is widened ([reject] fwhm_factor = 3) so that the soft frames reach the stack: with
the default 1.5 a 4 px frame after 2.5 px ones is rejected before the stack sees it.

Per night and way (stars: isolated, unsaturated, picked on the no-rejection stack, the same in every stack):
  * FWHM and HFD of the stacked stars (bench_sharpness.measure), medians; FWHM/0, HFD/0, flux/0: mean over the
    stars of the ratio to the no-rejection stack's; "wider": stars whose FWHM grew by more than 2 %;
  * rejected cells (2×2 px) on star cores (the cell of each star's centre and its 8 neighbours) as a % of
    those cells, sharp and soft frames apart (split at the night's median FWHM), and on the background
    (cells ≥ 6 px from every source);
  * "lost": the % of each frame's star flux (apertures of r = 8 px) in rejected cells, sharp / soft frames.
Then per night: the frames' weights and, for simulated nights, the transparency scale's error against truth
(scale · T_frame / T_ref − 1), sharp and soft frames apart, for the engine's photometry and the sky annulus.
A night with satellites and cosmic rays (and its clean twin, identical noise) checks that every way still
removes them.  Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SEQUENCES = ROOT.parent / "shared" / "data" / "sequences"

from bench_sharpness import background_sub, measure, pick_stars
from livestack.engine import geometry
from livestack.engine import stars as stars_mod
from livestack.engine.pipeline import Engine
from livestack.engine.settings import Config
from livestack.engine.stack import RunningStack


# ---------------------------------------------------------------------------------------------- nights

def render_seeing_night(folder: Path, cfg, fwhms: list[float]) -> list[dict]:
    """Render len(fwhms) lights of ``cfg`` into ``folder``, light i at median seeing fwhms[i] (the simulator's
    ±10 % jitter on top; every other draw of a frame is the one of a steady night).  Returns per frame: file,
    true FWHM (px), transparency, frame_to_sky, satellite and cosmics (as render_frame's meta)."""
    from drivers.simulator import frame_name, render_frame, write_frame

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(fwhms):
        c = dataclasses.replace(cfg, fwhm_px=float(f))
        raw, meta = render_frame(c, i)
        name = frame_name("light", i, meta["exptime"], c.fmt)
        write_frame(folder / name, raw, meta, c)
        out.append({"file": name, **{k: meta[k] for k in ("fwhm", "transparency", "frame_to_sky", "satellite",
                                                          "cosmics")}})
    return out


def seeing_nights(a: float, b: float, n: int) -> dict[str, list[float]]:
    """Median FWHM per frame of each simulated night: ``a`` sharp, ``b`` soft (px)."""
    return {f"alternating {a}/{b} px, sharp first": [a, b] * (n // 2) + [a] * (n % 2),
            f"alternating {b}/{a} px, soft first": [b, a] * (n // 2) + [b] * (n % 2),
            f"seeing improving {b} -> {a} px": list(np.geomspace(b, a, n)),
            f"seeing worsening {a} -> {b} px": list(np.geomspace(a, b, n)),
            f"steady {np.sqrt(a * b):.2f} px": [float(np.sqrt(a * b))] * n}


# ---------------------------------------------------------------------------------------------- stacking

@dataclasses.dataclass
class Log:
    """What the main stack saw, per stacked frame in order: its cells − sky (the 2×2-binned luminance the
    outlier test judges), the weight it was added with, and which cells were rejected."""
    cells: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    bad: list = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def instrumented(log: Log, *, reject: bool = True, uniform: bool = False, every_frame: bool = False,
                 mesh_sky: bool = False):
    """RunningStack patched for one run, recording into ``log``.  ``reject`` False: no cell is an outlier;
    ``uniform``: every frame's weight is 1; ``every_frame``: every cell of a frame in the footprint enters the
    outlier test's running statistics (Σ w·b, Σ w·b², n), rejected or not (rejected ones still stay out of the
    stack's sums); ``mesh_sky``: star photometry (transparency) relies on the background mesh alone, as before
    (the engine now subtracts the local sky in an annulus from r + 1 to r + 4 px around each aperture)."""
    saved = (RunningStack.add_channels, RunningStack._accumulate_pixels, RunningStack._threshold,
             RunningStack._accumulate_cells, stars_mod.sep)
    orig_add, orig_acc, orig_thr, orig_cells, sep = saved

    def add_channels(self, cells, channel, weight, noise, **kw):
        log.cells.append(cells - self.sky_lum)
        w = 1.0 if uniform else weight
        log.weights.append(w)
        return orig_add(self, cells, channel, w, noise, **kw)

    def accumulate(self, channel, bad_cells, weight, saturated, sums=None, wsum=None, span=None):
        # not a temporary combination (result() in the bootstrap); once (the bootstrap's comes in spans of rows)
        if (sums is None or sums is self.sums) and (span is None or span[0] == 0):
            log.bad.append(bad_cells.copy())
        return orig_acc(self, channel, bad_cells, weight, saturated, sums, wsum, span)

    def threshold(self, b, centre, var):
        return orig_thr(self, b, centre, var) if reject else np.zeros(b.shape, bool)

    def accumulate_cells(self, b, valid, weight, lsum, lw, sq, count):
        return orig_cells(self, b, np.isfinite(b) if every_frame else valid, weight, lsum, lw, sq, count)

    RunningStack.add_channels, RunningStack._accumulate_pixels = add_channels, accumulate
    RunningStack._threshold, RunningStack._accumulate_cells = threshold, accumulate_cells
    if mesh_sky:
        shim = types.SimpleNamespace(**{k: getattr(sep, k) for k in dir(sep) if not k.startswith("__")})
        shim.sum_circle = lambda data, x, y, r, **kw: sep.sum_circle(
            data, x, y, r, **{k: v for k, v in kw.items() if k != "bkgann"})
        stars_mod.sep = shim
    try:
        yield log
    finally:
        (RunningStack.add_channels, RunningStack._accumulate_pixels, RunningStack._threshold,
         RunningStack._accumulate_cells, stars_mod.sep) = saved


def config(*, sharpness: float = 0.0, stack_params: dict | None = None) -> Config:
    """The engine's defaults, the frame judge's FWHM test widened to 3× (soft frames reach the stack),
    [engine] sharpness_weight and [stack] fields as given."""
    cfg = Config()
    return dataclasses.replace(cfg, reject=dataclasses.replace(cfg.reject, fwhm_factor=3.0),
                               engine=dataclasses.replace(cfg.engine, sharpness_weight=sharpness),
                               stack=dataclasses.replace(cfg.stack, **(stack_params or {})))


def stack(files: list[Path], way: dict):
    """(records, (C, H, W) stack, Log, seconds) of ``files`` through a fresh Engine, stacked ``way``."""
    log = Log()
    cfg = config(sharpness=way.get("sharpness", 0.0), stack_params=way.get("stack"))
    t = time.perf_counter()
    with instrumented(log, **way.get("kw", {})):
        eng = Engine(cfg)
        recs = [eng.process(f) for f in files]
        img, _ = eng.result()
        eng.close()
    return recs, img, log, time.perf_counter() - t


WAYS = {
    "no rejection": {"kw": {"reject": False}},
    "default": {},
    "before": {"stack": {"rel_floor": 0.1, "min_empirical": 5}},
    "uniform weights": {"kw": {"uniform": True}},
    "uniform, no rejection": {"kw": {"reject": False, "uniform": True}},
    "sharpness_weight 1": {"sharpness": 1.0},
    "no rejection, mesh sky": {"kw": {"reject": False, "mesh_sky": True}},
    "rel_floor 0.3 only": {"stack": {"rel_floor": 0.3, "min_empirical": 5}},
    "stats: every frame": {"kw": {"every_frame": True}},
    "rel 0.5 always": {"stack": {"rel_floor": 0.5, "min_empirical": 0}},
}


# ---------------------------------------------------------------------------------------------- measuring

def cell_classes(lum: np.ndarray, xy: np.ndarray, cells: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bool cell masks: star cores (the cell holding each star's centre and its 8 neighbours) and background
    (cells 6 px or more from every source sep finds at 2σ on ``lum``)."""
    import cv2
    import sep

    core = np.zeros(cells, bool)
    cx, cy = (xy[:, 0] / 2).astype(int), (xy[:, 1] / 2).astype(int)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core[np.clip(cy + dy, 0, cells[0] - 1), np.clip(cx + dx, 0, cells[1] - 1)] = True
    sub, rms = background_sub(lum)
    sep.set_extract_pixstack(max(300_000, sub.size // 10))
    _, seg = sep.extract(np.ascontiguousarray(sub), 2.0, err=rms, minarea=3, segmentation_map=True)
    src = cv2.dilate((seg > 0).astype(np.uint8), np.ones((13, 13), np.uint8))
    h, w = lum.shape
    src = np.pad(src, ((0, h % 2), (0, w % 2)), mode="edge")
    return core, ~src.reshape(cells[0], 2, cells[1], 2).max(axis=(1, 3)).astype(bool)


def aperture_cells(xy: np.ndarray, cells: tuple[int, int], r_px: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the cells whose centres lie within ``r_px`` grid px of a star (each star's cells once)."""
    rows, cols = [], []
    rc = int(np.ceil(r_px / 2)) + 1
    for x, y in xy:
        cy, cx = np.mgrid[int(y / 2) - rc:int(y / 2) + rc + 1, int(x / 2) - rc:int(x / 2) + rc + 1]
        ok = (np.hypot(2 * cx + 0.5 - x, 2 * cy + 0.5 - y) <= r_px) & (cy >= 0) & (cx >= 0) & \
             (cy < cells[0]) & (cx < cells[1])
        rows.append(cy[ok]), cols.append(cx[ok])
    return np.concatenate(rows), np.concatenate(cols)


def flux_lost(log: Log, apertures: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per stacked frame: the fraction of its star flux (the stars' aperture cells) in rejected cells."""
    rows, cols = apertures
    out = []
    for b, bad in zip(log.cells, log.bad):
        v = np.nan_to_num(b[rows, cols])
        out.append(float(v[bad[rows, cols]].sum() / max(v.sum(), 1e-30)))
    return np.array(out)


def luminance(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float64).mean(axis=0)


# ---------------------------------------------------------------------------------------------- one night

def run_night(name: str, files: list[Path], ways: dict, *, truth: list[dict] | None,
              peak_max: float | None) -> None:
    results = {label: stack(files, way) for label, way in ways.items()}
    recs0, img0, log0, _ = results["no rejection"]
    lum0 = luminance(img0)
    xy = pick_stars(lum0, peak_max=peak_max)
    cells = log0.cells[0].shape
    core, bg = cell_classes(lum0, xy, cells)
    aps = aperture_cells(xy, cells)
    base = measure(lum0, xy)
    stacked = [i for i, r in enumerate(recs0) if r.status in ("reference", "stacked")]
    fw = np.array([recs0[i].fwhm for i in stacked], float)
    sharp = fw < np.median(fw)
    h, w = lum0.shape
    print(f"\n== {name}: {len(files)} frames ({len(stacked)} stacked), {w}×{h}, {len(xy)} stars; frame FWHM "
          f"(measured) sharp half {np.median(fw[sharp]):.2f} px, soft half {np.median(fw[~sharp]):.2f} px")
    print(f"{'way':22s} {'FWHM':>6s} {'HFD':>6s} {'FWHM/0':>7s} {'HFD/0':>7s} {'flux/0':>7s} {'wider':>6s}  "
          f"{'core rej % sharp/soft':>21s} {'bg rej %':>8s}  {'lost % sharp/soft':>17s} {'s':>5s}")
    for label, (recs, img, log, sec) in results.items():
        r = measure(luminance(img), xy)
        ok = np.isfinite(r["fwhm"]) & np.isfinite(base["fwhm"])
        ratio = {k: r[k][ok] / base[k][ok] for k in ("fwhm", "hfd", "flux")}
        lost = flux_lost(log, aps)
        core_rej = np.array([b[core].mean() for b in log.bad])
        bg_rej = np.array([b[bg].mean() for b in log.bad])
        print(f"{label:22s} {np.median(r['fwhm'][ok]):6.3f} {np.median(r['hfd'][ok]):6.3f} "
              f"{ratio['fwhm'].mean():7.4f} {ratio['hfd'].mean():7.4f} {ratio['flux'].mean():7.4f} "
              f"{100 * (ratio['fwhm'] > 1.02).mean():5.0f}%  "
              f"{100 * core_rej[sharp].mean():10.2f} /{100 * core_rej[~sharp].mean():8.2f} "
              f"{100 * bg_rej.mean():8.3f}  {100 * lost[sharp].mean():7.2f} /{100 * lost[~sharp].mean():7.2f} "
              f"{sec:5.1f}")
    for label in ("default", "no rejection, mesh sky"):
        if label not in results:
            continue
        recs, _, log, _ = results[label]
        wt = np.array(log.weights)
        line = f"{label}: weight sharp {wt[sharp].mean():.3f}, soft {wt[~sharp].mean():.3f}"
        sc = np.array([recs[i].scale or 1.0 for i in stacked])
        if truth is not None:
            tr = np.array([truth[i]["transparency"] for i in stacked])
            err = 100 * (sc * tr / tr[0] - 1)[1:]
            s1 = sharp[1:]
            line += (f"; transparency scale error vs truth: sharp {err[s1].mean():+.2f} ± {err[s1].std():.2f} %, "
                     f"soft {err[~s1].mean():+.2f} ± {err[~s1].std():.2f} % (reference "
                     f"{'sharp' if sharp[0] else 'soft'})")
        else:
            line += f"; scale sharp {sc[sharp].mean():.3f}, soft {sc[~sharp].mean():.3f}"
        print(line)
    recs, _, log, _ = results["default"]
    core_rej = [b[core].mean() for b in log.bad]
    print("default, per frame (FWHM, % of core cells rejected): " + " ".join(
        f"{recs[i].fwhm:.2f}:{100 * c:.0f}" for i, c in zip(stacked, core_rej)))


def block_noise(img: np.ndarray) -> float:
    """Per-pixel background σ of a stack plane from differences of neighbouring pixels (stars and a nebula
    hardly count), as tests/engine/test_pipeline.py measures it."""
    d = np.diff(img, axis=1).ravel()
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)


def run_defects(name: str, clean: list[Path], defect: list[Path], truth: list[dict], ways: dict) -> None:
    """Satellite trails and cosmic-ray hits must still vanish: each way stacks the night with defects and its
    clean twin (identical noise); their difference along the true trails and at the true hits, in units of
    the clean stack's pixel noise."""
    m0 = geometry.invert(np.array(truth[0]["frame_to_sky"]))
    trails, hits = [], []
    for t in truth:
        to_grid = geometry.compose(m0, np.array(t["frame_to_sky"]))
        if t["satellite"]:
            x0, y0, x1, y1 = t["satellite"]
            u = np.linspace(0.02, 0.98, 600)
            trails.append(geometry.apply(to_grid, np.column_stack([x0 + u * (x1 - x0), y0 + u * (y1 - y0)])))
        if t["cosmics"]:
            hits.append(geometry.apply(to_grid, np.array(t["cosmics"], float)))
    print(f"\n== {name}: {len(defect)} frames, {len(trails)} satellite trails (one in the reference), "
          f"{sum(len(h) for h in hits)} cosmic-ray pixels; (stack with defects − clean stack) / pixel σ")
    print(f"{'way':22s} {'trail max':>9s} {'trail mean':>10s} {'hits max':>8s} {'rejected px/frame':>18s}")
    for label, way in ways.items():
        _, img_c, _, _ = stack(clean, way)
        _, img_d, log, _ = stack(defect, way)
        sigma = block_noise(img_c[img_c.shape[0] // 2])
        h, w = img_c.shape[1:]
        out = []
        for pts in (np.concatenate(trails), np.concatenate(hits)):
            ok = (pts[:, 0] > 3) & (pts[:, 0] < w - 4) & (pts[:, 1] > 3) & (pts[:, 1] < h - 4)
            xi, yi = np.rint(pts[ok]).astype(int).T
            out.append((img_d - img_c)[:, yi, xi] / sigma)
        print(f"{label:22s} {np.abs(out[0]).max():9.2f} {out[0].mean():10.3f} {np.abs(out[1]).max():8.2f} "
              f"{4 * np.mean([b.sum() for b in log.bad]):18.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeing", type=float, nargs=2, default=[2.5, 4.0], help="sharp and soft FWHM, px")
    ap.add_argument("--n-stars", type=int, default=1000)
    ap.add_argument("--mono", action="store_true", help="a mono camera (default: RGGB)")
    ap.add_argument("--real", action="store_true", help="also the Seestar M94 sequences")
    ap.add_argument("--no-sim", action="store_true", help="no simulated night")
    ap.add_argument("--no-defects", action="store_true", help="no night with satellites and cosmic rays")
    ap.add_argument("--ways", nargs="+", choices=list(WAYS), help="stack only these ways (and 'no rejection')")
    ap.add_argument("--keep", help="work in this folder")
    args = ap.parse_args()

    from drivers.simulator import SimConfig

    ways = WAYS if not args.ways else {k: WAYS[k] for k in WAYS if k in args.ways or k == "no rejection"}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="livestack-clip-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; work in {work}")
    cfg = SimConfig(width=args.width, height=args.height, n_frames=args.frames, seed=args.seed, fmt="fits",
                    dither_px=3.0, rotation_deg=0.05, n_stars=args.n_stars, mono=args.mono)
    a, b = args.seeing
    if not args.no_sim:
        for name, fwhms in seeing_nights(a, b, args.frames).items():
            d = work / name.replace(" ", "_").replace("/", "-").replace(",", "").replace(">", "")
            shutil.rmtree(d, ignore_errors=True)
            truth = render_seeing_night(d, cfg, fwhms)
            run_night(f"simulated {'mono' if args.mono else 'RGGB'} night, {name}", [d / t["file"] for t in truth],
                      ways, truth=truth, peak_max=0.5 * (cfg.white - cfg.bias))
    if not args.no_defects:
        n = args.frames
        defects = {0: "satellite", 3: "cosmic", n // 2 - 1: "satellite", n // 2 + 2: "cosmic", n - 2: "satellite"}
        files = {}
        for key, dfx in (("clean", {}), ("defects", defects)):
            d = work / f"defects_{key}"
            shutil.rmtree(d, ignore_errors=True)
            truth = render_seeing_night(d, dataclasses.replace(cfg, defects=dfx), [b, a] * (n // 2) + [b] * (n % 2))
            files[key] = [d / t["file"] for t in truth]
        run_defects(f"simulated night with defects, alternating {b}/{a} px", files["clean"], files["defects"], truth,
                    {k: v for k, v in ways.items() if "weight" not in k})
    if args.real:
        for name in ("seestar_m94_night1", "seestar_m94_night2"):
            src = SEQUENCES / name
            if src.is_dir():
                files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".fit", ".fits"))
                run_night(name, files, ways, truth=None, peak_max=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
