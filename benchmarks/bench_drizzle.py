"""Drizzle: sharpness, noise, speed and memory against the ordinary stack of the same frames.

    python benchmarks/bench_drizzle.py [--sim] [--real] [--speed] [--truth] [--frames 20 --fwhm 1.3 --seed 11]

--sim    simulated undersampled nights (800×600, stars FWHM --fwhm px, dithers ±3 px, field rotation):
         colour (RGGB) and mono, each stacked by `livestack stack` as is (MHC demosaic, compensated warp, smooth
         background), with `--debayer bilinear`, and with `--drizzle 2` at several pixfracs (and `--drizzle 1`
         for colour); the drizzles as configured ([drizzle] compensate: on by default).
--real   the Seestar S50 M94 nights of ../shared/data/sequences (GRBG, stars ~1.6 px in a binned luminance):
         the same stacks, before/after.
--truth  the drizzle alone, without noise, registration or rejection: noise-free frames, their true matrices,
         each compensation (3, 5, 7 taps) against the tightest possible stack (the star seen through a pixel).
--speed  the drop stage alone (Drizzler.planes, both cores) at 2 MP ×2 and 24 MP ×1, against the `drizzle`
         package's turbo kernel when it is installed (one plane each), and the peak RSS of `livestack stack
         --drizzle 2` of the Seestar night (whole process), and the largest frame a 2 GB limit allows.

Sharpness: one star set for every stack (isolated, unsaturated stars of the ordinary stack), carried to a drizzle
grid by its sensor -> grid map; FWHM of a fitted circular Gaussian and HFD, in reference (sensor) pixels.  Noise:
robust σ (ADU: a drizzled pixel is a mean of samples, in the same units) of the luminance per pixel of each
stack's own grid and of the means of the same sky area (4×4 reference pixels: 8×8 on a 2× grid).  Prints figures; asserts nothing (tests/engine/test_drizzle.py does).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SEQUENCES = ROOT.parent / "shared" / "data" / "sequences"

from bench_sharpness import luminance, measure, pick_stars  # noqa: E402


def stack(frames: Path, out: Path, *args: str) -> tuple[float, int, int]:
    """`livestack stack` -> (wall s, frames stacked, peak RSS in MB of the process, from GNU time; 0 without
    it).  (getrusage of children would report the parent's size at fork.)"""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "livestack.cli", "stack", str(frames), "-o", str(out), "-q", "--no-solve", *args]
    timer = Path("/usr/bin/time")
    rss_file = out.parent / f".{out.name}.rss"
    out.parent.mkdir(parents=True, exist_ok=True)
    if timer.exists():
        cmd = [str(timer), "-f", "%M", "-o", str(rss_file), *cmd]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    wall = time.perf_counter() - t
    rss = int(rss_file.read_text().split()[-1]) // 1024 if rss_file.exists() else 0
    recs = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    return wall, sum(r["status"] in ("reference", "stacked") for r in recs), rss


def noise_area(lum: np.ndarray, k: int, edge: int, scale: float) -> tuple[float, float]:
    """Robust σ per pixel and of k×k means (the sky area of 4×4 reference pixels), sources masked; the sky
    background (sep, 64 reference pixels a mesh box: ``scale``× more on a finer grid) subtracted first."""
    import cv2
    import sep

    d = np.ascontiguousarray(np.nan_to_num(lum), np.float64)
    box = int(round(64 * scale))
    bkg = sep.Background(d, bw=box, bh=box)
    sub, rms = d - bkg.back(), float(bkg.globalrms)
    sub = np.ascontiguousarray(sub[edge:-edge, edge:-edge])
    sep.set_extract_pixstack(max(300_000, sub.size // 10))
    _, seg = sep.extract(sub, 3.0, err=rms, minarea=3, segmentation_map=True)
    grow = 4 * k // 4 * 2 + 1
    mask = cv2.dilate((seg > 0).astype(np.uint8), np.ones((grow, grow), np.uint8)).astype(bool)

    def rsig(v):
        v = v[np.isfinite(v)]
        return 1.4826 * float(np.median(np.abs(v - np.median(v))))

    h, w = (s // k * k for s in sub.shape)
    b = sub[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    bm = mask[:h, :w].reshape(h // k, k, w // k, k).any(axis=(1, 3))
    return rsig(sub[~mask]), rsig(b[~bm])


def compare(frames: Path, work: Path, runs: dict[str, tuple[float, list[str]]], label: str) -> None:
    """Stack ``frames`` once per run (name -> (scale, flags)) and print a row per run."""
    print(f"\n{label}")
    print(f"  {'stack':<22}{'frames':>7}{'s/frame':>9}{'FWHM':>8}{'vs 1st':>8}{'HFD':>8}{'vs 1st':>8}"
          f"{'noise/px':>10}{'4×4 ref px':>12}{'vs 1st':>8}")
    base = None
    for name, (scale, flags) in runs.items():
        out = work / name.replace(" ", "_")
        wall, n, _ = stack(frames, out, *flags)
        lum = luminance(out / "stack.fits")
        if base is None:
            xy = pick_stars(lum)
        pos = xy * scale + (scale - 1) / 2
        m = measure(lum, pos, half=int(round(8 * scale)))
        fwhm, hfd = np.nanmedian(m["fwhm"]) / scale, np.nanmedian(m["hfd"]) / scale
        k = int(round(4 * scale))
        n1, nk = noise_area(lum, k, edge=int(40 * scale), scale=scale)
        if base is None:
            base = (fwhm, hfd, nk)
        print(f"  {name:<22}{n:>7}{wall / max(n, 1):>9.2f}{fwhm:>8.3f}{fwhm / base[0] - 1:>+8.1%}{hfd:>8.3f}"
              f"{hfd / base[1] - 1:>+8.1%}{n1:>10.3f}{nk:>12.3f}{nk / base[2]:>8.2f}")


def sim(args, work: Path) -> None:
    from drivers.simulator import SimConfig, render_night

    for mono in (False, True):
        frames = work / ("mono" if mono else "colour") / "frames"
        render_night(frames, SimConfig(width=800, height=600, n_frames=args.frames, seed=args.seed, n_stars=2500,
                                       fwhm_px=args.fwhm, dither_px=3.0, rotation_deg=0.05, mono=mono,
                                       defects={5: "satellite"}))
        runs = {"default": (1, [])}
        if not mono:
            runs["--debayer bilinear"] = (1, ["--debayer", "bilinear"])
            runs["drizzle 1"] = (1, ["--drizzle", "1"])
        # the default the issue measured drizzle against (MHC demosaic, bilinear warp: until the fifth session)
        runs["--interp. bilinear"] = (1, ["--interpolation", "bilinear"])
        for pf in (1.0, 0.7, 0.6):
            runs[f"drizzle 2 pixfrac {pf}"] = (2, ["--drizzle", "2", "--pixfrac", str(pf)])
        compare(frames, frames.parent, runs, f"simulated {'mono' if mono else 'colour (RGGB)'} night, "
                f"{args.frames} × 800×600, stars FWHM {args.fwhm} px, dithers ±3 px, seed {args.seed}")
    print("  (noise: σ in ADU — every stack is in its reference frame's ADU per pixel, whatever its grid —;"
          " '4×4 ref px' is the same sky area: 8×8 pixels of a 2× grid)")


def real(work: Path) -> None:
    for night in ("seestar_m94_night1", "seestar_m94_night2"):
        frames = SEQUENCES / night
        if not frames.is_dir():
            print(f"{frames}: missing, skipped")
            continue
        runs = {"default": (1, []), "--debayer bilinear": (1, ["--debayer", "bilinear"]),
                "drizzle 1": (1, ["--drizzle", "1"]), "drizzle 2 pixfrac 1.0": (2, ["--drizzle", "2"]),
                "drizzle 2 pixfrac 0.7": (2, ["--drizzle", "2", "--pixfrac", "0.7"])}
        compare(frames, work / night, runs, f"{night} (Seestar S50, 1080×1920 GRBG, 10 s subs)")


def speed(work: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from livestack.engine.drizzle import DrizzleParams, Drizzler, too_big

    pool = ThreadPoolExecutor(2)
    rng = np.random.default_rng(0)
    print("\nthe drop stage alone (Drizzler.planes, 2 threads), best of 3")
    for (h, w), s, pattern in (((1080, 1920), 2, "GRBG"), ((1080, 1920), 2, None), ((4000, 6000), 1, "RGGB"),
                               ((4000, 6000), 1, None)):
        cfa = rng.normal(1000, 30, (h, w)).astype(np.float32)
        m = np.array([[s * np.cos(0.01), -s * np.sin(0.01), 1.3], [s * np.sin(0.01), s * np.cos(0.01), 0.7]])
        c = 1 if pattern is None else 3
        value = np.empty((c, h * s, w * s), np.float32)
        cov = np.empty_like(value)
        dz = Drizzler(pattern, c, 1.0, s)
        best = min(_timed(lambda: dz.planes(cfa, m, (h * s, w * s), value, cov,
                                            parallel_map=lambda f, it: list(pool.map(f, it)))) for _ in range(3))
        line = f"  {w}×{h} {'mono' if pattern is None else 'Bayer'} ×{s}: {best:.2f} s"
        try:
            from drizzle.resample import Drizzle

            yy, xx = np.indices((h, w), dtype=np.float64)
            pix = np.dstack([m[0, 0] * xx + m[0, 1] * yy + m[0, 2], m[1, 0] * xx + m[1, 1] * yy + m[1, 2]])
            del yy, xx
            d = Drizzle(kernel="turbo", out_shape=(h * s, w * s))
            t = _timed(lambda: d.add_image(cfa, exptime=1.0, pixmap=pix, pixfrac=1.0, pixel_scale_ratio=1 / s))
            line += f"; drizzle package turbo, one plane: {t:.2f} s" + (f" (×3 planes for colour)" if c == 3 else "")
            del pix, d
        except ImportError:
            line += "; drizzle package not installed"
        print(line)
        del value, cov
    p = DrizzleParams(scale=2)
    for shape, c in (((1080, 1920), 3), ((4000, 6000), 3), ((4000, 6000), 1), ((3000, 4000), 3)):
        print(f"  ×2 {shape[1]}×{shape[0]} {'colour' if c == 3 else 'mono'}: {too_big(shape, c, p) or 'fits in 2 GB'}")
    night = SEQUENCES / "seestar_m94_night1"
    if night.is_dir():
        wall, n, rss = stack(night, work / "rss", "--drizzle", "2")
        print(f"  livestack stack --drizzle 2 of seestar_m94_night1 ({n} frames, 1080×1920 -> 2160×3840×3): "
              f"{wall:.1f} s, peak RSS {rss} MB")


def truth(args) -> None:
    """The drizzle alone, without noise, registration or rejection: noise-free colour frames of the simulated night
    (no rotation, no hot pixels, flat or nebula) dropped with their true matrices (Drizzler.planes), combined by
    coverage, and the luminance measured raw and through each compensation (3 taps: second moment only; 5 taps:
    engine/drizzle.compensation; 7 taps: the sixth cumulant too) at the stars' true positions; against the
    tightest possible, the star seen through one sensor pixel (pixel-integrated Gaussian of each frame's seeing,
    sampled on the fine grid, the same fit)."""
    from scipy.ndimage import convolve1d
    from scipy.spatial import cKDTree
    from scipy.special import erf

    from drivers.simulator import SimConfig
    from drivers.simulator.camera import invert_affine, render_frame, sky_field
    from livestack.engine import geometry
    from livestack.engine.drizzle import Drizzler, blur_variance, compensation, sensor_to_grid

    s = 2
    cfg = SimConfig(width=800, height=600, n_frames=args.frames, seed=args.seed, n_stars=2500, fwhm_px=args.fwhm,
                    dither_px=3.0, rotation_deg=0.0, mono=False, n_hot=0, prnu=0.0, n_dust=0, vignetting=0.0,
                    nebula=False)
    h, w = cfg.height * s, cfg.width * s
    rendered = [render_frame(cfg, i, noise=False) for i in range(cfg.n_frames)]
    m0 = np.array(rendered[0][1]["frame_to_sky"])
    inv0 = invert_affine(m0)
    xy = sky_field(cfg).xy @ inv0[:, :2].T + inv0[:, 2]
    print(f"\nnoise-free colour frames, true matrices: {cfg.n_frames} × 800×600, stars {args.fwhm} px, seed "
          f"{args.seed}, scale {s}; FWHM in sensor px")
    lum = None
    for pixfrac in (1.0, 0.7, 0.6):
        num = np.zeros((3, h, w))
        den = np.zeros((3, h, w))
        value, cov = (np.empty((3, h, w), np.float32) for _ in range(2))
        dz = Drizzler("RGGB", 3, pixfrac, s)
        for raw, meta in rendered:
            to_ref = geometry.compose(inv0, np.array(meta["frame_to_sky"]))
            dz.planes(raw.astype(np.float32) - cfg.bias, geometry.compose(sensor_to_grid(s), to_ref), (h, w),
                      value, cov)
            num += np.where(cov > 0, value * cov, 0)
            den += cov
        with np.errstate(invalid="ignore"):
            lum = np.nan_to_num((num / den).mean(axis=0))
        if pixfrac == 1.0:       # stars: isolated and bright on the binned image, at their true positions
            found = pick_stars(lum.reshape(cfg.height, s, cfg.width, s).mean(axis=(1, 3)))
            d, j = cKDTree(xy).query(found)
            pos = xy[j[d < 0.5]] * s + (s - 1) / 2
        v, wd = blur_variance(pixfrac, s), pixfrac * s
        k2, k4, k6 = -v, (wd ** 4 + 1) / 120, -(wd ** 6 + 1) / 252
        mom = np.linalg.solve(2 * np.array([[1, 4, 9], [1, 16, 81], [1, 64, 729]], float),
                              [k2, k4 + 3 * k2 ** 2, k6 + 15 * k4 * k2 + 15 * k2 ** 3])
        kernels = {"raw": None, "3 taps": [-v / 2, 1 + v, -v / 2], "5 taps": list(compensation(pixfrac, s)),
                   "7 taps": [*mom[::-1], 1 - 2 * mom.sum(), *mom]}
        row = []
        for name, k in kernels.items():
            img = lum if k is None else convolve1d(convolve1d(lum, np.array(k), axis=0), np.array(k), axis=1)
            row.append(f"{name} {np.nanmedian(measure(img.astype(np.float32), pos, half=8 * s)['fwhm']) / s:.3f}")
        print(f"  pixfrac {pixfrac}: " + ", ".join(row) + f"  ({len(pos)} stars)")
    # the tightest possible: each frame's pixel-integrated star, averaged, point-sampled on the fine grid
    u = np.arange(w, dtype=np.float64)
    ideal = np.zeros((h, w))
    for raw, meta in rendered:
        sig = meta["fwhm"] / 2.3548 * s

        def prof(c):
            return 0.5 * (erf((u - c + s / 2) / (np.sqrt(2) * sig)) - erf((u - c - s / 2) / (np.sqrt(2) * sig)))

        for x, y in pos:
            ideal += np.outer(prof(y)[:h], prof(x))
    print(f"  the star seen through one sensor pixel: "
          f"{np.nanmedian(measure(ideal.astype(np.float32), pos, half=8 * s)['fwhm']) / s:.3f}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", action="store_true")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--truth", action="store_true", help="the drizzle alone: noise-free frames, true matrices")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--fwhm", type=float, default=1.3)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    if not (args.sim or args.real or args.speed or args.truth):
        args.sim = args.real = args.speed = True
    print(f"machine: {platform.machine()}, {platform.python_version()}, {__import__('os').cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-drizzle-") as tmp:
        work = Path(tmp)
        if args.sim:
            sim(args, work)
        if args.real:
            real(work)
        if args.speed:
            speed(work)
        if args.truth:
            truth(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
