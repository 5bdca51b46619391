"""Star sharpness and background noise of our stacks (bilinear / bicubic / lanczos warp) against Siril's.

    python benchmarks/bench_sharpness.py [--width 1600 --height 1200 --frames 12 --seeds 1 2 --fwhm 2.7]
                                         [--dither 3 --rotation 0.05] [--siril] [--variants] [--real]
                                         [--debayers mhc bilinear] [--keep DIR]

Renders simulated colour nights (RGGB FITS, seeded), stacks each with `livestack stack` for every warp
interpolation and every demosaic of `--debayers` ([engine] debayer) — and with `--variants` also without outlier
rejection ([stack] kappa = 20) and with sharpness weights ([engine] sharpness_weight = 1) — and with `--siril`
with Siril 1.0 (siril-cli: convert -debayer, register, stack rej s 3 3 -norm=addscale -weighted; HOME in a temp
folder).  `--real` adds the Seestar M94 sequences of ../shared/data/sequences (GRBG FITS).

One star set for every stack: isolated, unsaturated, well-exposed stars found (sep) on the luminance of the
first stack; their positions are carried to a stack on another grid (Siril's) by a fitted similarity, trying both
row orders (Siril writes FITS bottom-up).  Per star: FWHM of a least-squares circular Gaussian with background,
and the half-flux diameter (HFD) in an aperture of radius 4 × FWHM.  Noise: robust σ (1.4826 MAD) of the
luminance away from stars and edges, per pixel and in 4×4 bins (what faint extended signal sees), as a fraction
of the star set's median flux so that stacks in other units (Siril's 0–1) compare.  Prints figures; asserts
nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQUENCES = ROOT.parent / "shared" / "data" / "sequences"

SIRIL_SCRIPT = """requires 1.0.0
convert light -debayer
register light
stack r_light rej s 3 3 -norm=addscale -weighted -out=siril_stack
"""


# ---------------------------------------------------------------------------------------------- stacking

def stack_livestack(frames: Path, out: Path, *, interpolation: str, toml: str = "") -> tuple[Path, float]:
    """`livestack stack` of a folder; returns (stack.fits, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "livestack.cli", "stack", str(frames), "-o", str(out), "-q", "--no-solve",
           "--interpolation", interpolation]
    if toml:
        (out / "bench.toml").write_text(toml)
        cmd += ["--config", str(out / "bench.toml")]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "stack.fits", time.perf_counter() - t


def stack_siril(frames: list[Path], work: Path, *, mono: bool = False) -> tuple[Path, float]:
    """Siril 1.0's standard colour workflow on copies (symlinks) of ``frames``; returns (stack, seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    for f in frames:
        link = work / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    (work / "bench.ssf").write_text(SIRIL_SCRIPT.replace(" -debayer", "") if mono else SIRIL_SCRIPT)
    home = Path(tempfile.mkdtemp(prefix="siril-home-"))
    t = time.perf_counter()
    r = subprocess.run(["siril-cli", "-d", str(work), "-s", str(work / "bench.ssf")], cwd=work,
                       env={**os.environ, "HOME": str(home)}, capture_output=True, text=True)
    dt = time.perf_counter() - t
    shutil.rmtree(home, ignore_errors=True)
    found = sorted(work.glob("siril_stack.fit*"))
    if r.returncode or not found:
        raise RuntimeError(f"siril-cli failed ({r.returncode}): {r.stdout[-800:]} {r.stderr[-400:]}")
    return found[0], dt


# ---------------------------------------------------------------------------------------------- measuring

def luminance(path: Path) -> np.ndarray:
    """(H, W) float64 mean of the channels of a stack FITS (first image HDU)."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        data = next(h.data for h in hdul if h.data is not None and h.data.ndim >= 2)
    data = np.asarray(data, np.float64)
    return data.mean(axis=0) if data.ndim == 3 else data


def background_sub(lum: np.ndarray) -> tuple[np.ndarray, float]:
    import sep

    d = np.ascontiguousarray(np.nan_to_num(lum), np.float64)
    bkg = sep.Background(d, bw=64, bh=64)
    return d - bkg.back(), float(bkg.globalrms)


def pick_stars(lum: np.ndarray, *, edge: int = 30, isolation: float = 15.0,
               peak_max: float | None = None) -> np.ndarray:
    """(N, 2) x, y of isolated, unblended, unsaturated, well-measured stars on ``lum``."""
    import sep

    sub, rms = background_sub(lum)
    obj = sep.extract(sub, 10.0, err=rms, minarea=5)
    h, w = lum.shape
    xy = np.column_stack([obj["x"], obj["y"]])
    ok = ((obj["flag"] & 3) == 0) & (xy[:, 0] > edge) & (xy[:, 0] < w - edge) & (xy[:, 1] > edge) & \
         (xy[:, 1] < h - edge) & (obj["peak"] > 30 * rms)
    if peak_max is not None:
        ok &= obj["peak"] < peak_max
    else:   # the brightest 5 % may be saturated or non-linear
        ok &= obj["peak"] < np.percentile(obj["peak"], 95)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    ok &= d[:, 1] > isolation
    return xy[ok]


def measure(lum: np.ndarray, xy: np.ndarray, *, half: int = 8) -> dict[str, np.ndarray]:
    """Per star at ``xy``: Gaussian FWHM (px), HFD (px), flux; NaN where the fit fails."""
    from scipy.optimize import least_squares

    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    fwhm, hfd, flux = (np.full(len(xy), np.nan) for _ in range(3))
    for i, (x, y) in enumerate(xy):
        cx, cy = int(round(x)), int(round(y))
        cut = lum[cy - half:cy + half + 1, cx - half:cx + half + 1]
        if cut.shape != yy.shape or not np.isfinite(cut).all():
            continue
        bg0 = float(np.median(np.concatenate([cut[0], cut[-1], cut[:, 0], cut[:, -1]])))

        def model(p):
            a, x0, y0, s, b = p
            return a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)) + b

        p0 = [cut.max() - bg0, x - cx, y - cy, 1.2, bg0]
        try:
            r = least_squares(lambda p: (model(p) - cut).ravel(), p0, method="lm")
        except ValueError:
            continue
        a, x0, y0, s, b = r.x
        if not (r.success and a > 0 and 0.3 < abs(s) < half / 2 and abs(x0) < 2 and abs(y0) < 2):
            continue
        fwhm[i] = 2.3548 * abs(s)
        rad = np.hypot(xx - x0, yy - y0)
        inside = rad <= min(half, 4 * fwhm[i])
        f = (cut - b)[inside]
        flux[i] = f.sum()
        hfd[i] = 2 * (f * rad[inside]).sum() / f.sum()
    return {"fwhm": fwhm, "hfd": hfd, "flux": flux}


def noise(lum: np.ndarray, *, edge: int = 40, mask: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """Robust σ of the luminance away from sources and edges: per pixel and of 4×4 means; and the mask of the
    sources (pass it back to measure another stack on the same grid over the same pixels)."""
    import cv2
    import sep

    sub, rms = background_sub(lum)
    sub = np.ascontiguousarray(sub[edge:-edge, edge:-edge])
    if mask is None:
        sep.set_extract_pixstack(max(300_000, sub.size // 10))
        _, seg = sep.extract(sub, 3.0, err=rms, minarea=3, segmentation_map=True)
        mask = cv2.dilate((seg > 0).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)

    def rsig(v):
        v = v[np.isfinite(v)]
        return 1.4826 * float(np.median(np.abs(v - np.median(v))))

    px = rsig(sub[~mask])
    h, w = (s // 4 * 4 for s in sub.shape)
    b = sub[:h, :w].reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    bm = mask[:h, :w].reshape(h // 4, 4, w // 4, 4).any(axis=(1, 3))
    return px, rsig(b[~bm]), mask


def carry(xy_ref: np.ndarray, lum_ref: np.ndarray, lum: np.ndarray) -> np.ndarray | None:
    """The reference star positions on another stack's grid (Siril: another reference frame, maybe bottom-up),
    by a similarity fitted to the two stacks' stars (the project's registration); None if none fits."""
    from livestack.engine.register import RegisterParams, RegistrationError, register
    from livestack.engine import geometry

    def stars(img):
        import sep

        sub, rms = background_sub(img)
        o = sep.extract(sub, 10.0, err=rms, minarea=5)
        o = o[np.argsort(-o["flux"])][:200]
        return np.column_stack([o["x"], o["y"]]), o["flux"]

    ref_xy, ref_f = stars(lum_ref)
    best = None
    for flip in (False, True):
        img = lum[::-1] if flip else lum
        xy, f = stars(img)
        try:
            reg = register(ref_xy, xy, RegisterParams(), rng=np.random.default_rng(0), src_flux=ref_f,
                           ref_flux=f)
        except RegistrationError:
            continue
        if best is None or reg.matches > best[0]:
            best = (reg.matches, flip, reg.matrix)
    if best is None:
        return None
    _, flip, m = best
    out = geometry.apply(m, xy_ref)
    if flip:
        out[:, 1] = lum.shape[0] - 1 - out[:, 1]
    return out


def refine(lum: np.ndarray, xy: np.ndarray, half: int = 4) -> np.ndarray:
    """Background-subtracted centroids in a (2·half+1)² window around ``xy`` (Siril's grid differs by a
    sub-pixel offset from the fitted similarity's prediction)."""
    out = xy.copy()
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    for i, (x, y) in enumerate(xy):
        cx, cy = int(round(x)), int(round(y))
        cut = lum[cy - half:cy + half + 1, cx - half:cx + half + 1]
        if cut.shape != xx.shape:
            continue
        c = np.clip(cut - np.median(cut), 0, None)
        if c.sum() > 0:
            out[i] = cx + (c * xx).sum() / c.sum(), cy + (c * yy).sum() / c.sum()
    return out


# ---------------------------------------------------------------------------------------------- one night

def run_night(name: str, frames_dir: Path, frames: list[Path], work: Path, args, truth_fwhm: float | None,
              peak_max: float | None) -> None:
    stacks: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    # the demosaic and smooth_background are always named in the config: the labels stay true whatever the
    # engine's defaults
    d0 = f'debayer = "{args.debayers[0]}"\nsmooth_background = false\n'
    if len(args.debayers) == 1:
        methods = [(i, i, "[engine]\n" + d0) for i in args.interpolations]
    else:
        methods = [(f"{d} demosaic, {i} warp", i, f'[engine]\ndebayer = "{d}"\nsmooth_background = false\n')
                   for d in args.debayers for i in args.interpolations]
    if args.smooth:     # each again with the sharpening only where the frames have signal
        methods += [(label + ", smooth background", interp, toml.replace("smooth_background = false",
                                                                         "smooth_background = true"))
                    for label, interp, toml in methods if "mhc" in toml or interp == "compensated"]
    if args.variants:
        methods += [("bilinear, no rejection (kappa 20)", "bilinear", f"[engine]\n{d0}[stack]\nkappa = 20.0\n"),
                    ("bicubic, no rejection (kappa 20)", "bicubic", f"[engine]\n{d0}[stack]\nkappa = 20.0\n"),
                    ("bilinear, sharpness_weight 1", "bilinear", f"[engine]\n{d0}sharpness_weight = 1.0\n"),
                    ("bicubic, sharpness_weight 1", "bicubic", f"[engine]\n{d0}sharpness_weight = 1.0\n")]
    for label, interp, toml in methods:
        out = work / ("ls_" + label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))
        stacks[label], seconds[label] = stack_livestack(frames_dir, out, interpolation=interp, toml=toml)
    if args.siril:
        try:
            stacks["Siril 1.0"], seconds["Siril 1.0"] = stack_siril(frames, work / "siril", mono=args.mono)
        except RuntimeError as err:
            print(f"{name}: Siril failed: {err}")

    base = next(iter(stacks))
    lums = {k: luminance(p) for k, p in stacks.items()}
    xy0 = pick_stars(lums[base], peak_max=peak_max)
    positions = {}
    for k, lum in lums.items():
        if lum.shape == lums[base].shape and k != "Siril 1.0":
            positions[k] = xy0          # same grid (same reference frame)
        else:
            xy = carry(xy0, lums[base], lum)
            positions[k] = None if xy is None else refine(lum, xy)
    res = {k: measure(lums[k], positions[k]) if positions[k] is not None else None for k in lums}
    ok = np.ones(len(xy0), bool)
    for r in res.values():
        if r is not None:
            ok &= np.isfinite(r["fwhm"]) & np.isfinite(r["hfd"])
    ref_key = "Siril 1.0" if res.get("Siril 1.0") is not None else base
    print(f"\n== {name}: {len(frames)} frames, {lums[base].shape[1]}×{lums[base].shape[0]}, {int(ok.sum())} "
          f"stars (isolated, unsaturated, measured on every stack)"
          + (f"; simulated seeing median {truth_fwhm:.2f} px" if truth_fwhm else ""))
    print(f"{'stack':50s} {'FWHM':>6s} {'HFD':>6s} {'FWHM/' + ref_key[:5]:>11s} {'HFD/' + ref_key[:5]:>10s} "
          f"{'noise px':>9s} {'noise 4x4':>9s} {'σ px/1st':>9s} {'σ 4x4/1st':>9s} {'s':>6s}")
    _, _, mask0 = noise(lums[base])
    adu0 = None
    for k, r in res.items():
        if r is None:
            print(f"{k:50s} (no star match)")
            continue
        rf = res[ref_key]
        f, d = r["fwhm"][ok], r["hfd"][ok]
        ratio_f = np.median(f / rf["fwhm"][ok])
        ratio_d = np.median(d / rf["hfd"][ok])
        npx, nbin, _ = noise(lums[k])
        scale = float(np.median(r["flux"][ok]))
        rel = ""
        if lums[k].shape == lums[base].shape and k != "Siril 1.0":     # same grid, same units, same pixels
            apx, abin, _ = noise(lums[k], mask=mask0)
            adu0 = adu0 or (apx, abin)
            rel = f"{apx / adu0[0]:9.3f} {abin / adu0[1]:9.3f}"
        print(f"{k:50s} {np.median(f):6.3f} {np.median(d):6.3f} {ratio_f:11.4f} {ratio_d:10.4f} "
              f"{1e4 * npx / scale:9.3f} {1e4 * nbin / scale:9.3f} {rel or '        -         -':19s} "
              f"{seconds[k]:6.1f}")
    print("(FWHM, HFD: medians over the stars, px; ratios: median of per-star ratios; noise: robust σ × 10⁴ / "
          "median star flux, each stack's own sources masked; σ/1st: robust σ in ADU over the first stack's "
          "background pixels, ÷ the first stack's)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="none: only --real")
    ap.add_argument("--fwhm", type=float, default=2.7, help="simulated seeing, px (±10 %% frame to frame)")
    ap.add_argument("--dither", type=float, default=3.0)
    ap.add_argument("--rotation", type=float, default=0.05, help="degrees per frame")
    ap.add_argument("--n-stars", type=int, default=1500)
    ap.add_argument("--interpolations", nargs="+", default=["bilinear", "bicubic", "lanczos"])
    ap.add_argument("--debayers", nargs="+", default=["mhc"], help="[engine] debayer methods to compare (one: "
                    "the variants use it too)")
    ap.add_argument("--mono", action="store_true", help="a mono camera (no demosaic: isolates the warp)")
    ap.add_argument("--siril", action="store_true", help="also stack with siril-cli (Siril 1.0)")
    ap.add_argument("--variants", action="store_true", help="also: no rejection, sharpness weights")
    ap.add_argument("--smooth", action="store_true",
                    help="also each stack with [engine] smooth_background = true (sharpening only on signal)")
    ap.add_argument("--real", action="store_true", help="also the Seestar M94 sequences")
    ap.add_argument("--keep", help="work in this folder (frames re-used when present)")
    args = ap.parse_args()

    from drivers.simulator import SimConfig, render_night

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="livestack-sharp-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; work in {work}")
    for seed in args.seeds:
        cfg = SimConfig(width=args.width, height=args.height, n_frames=args.frames, seed=seed, fmt="fits",
                        fwhm_px=args.fwhm, dither_px=args.dither, rotation_deg=args.rotation,
                        n_stars=args.n_stars, mono=args.mono)
        d = work / f"sim_{'mono' if args.mono else 'rggb'}_seed{seed}"
        frames_dir = d / "frames"
        if not sorted(frames_dir.glob("light_*.fits")):
            truth = render_night(frames_dir, cfg)
        else:
            import json
            truth = json.loads((frames_dir / "truth.json").read_text())
        fw = float(np.median([f["fwhm"] for f in truth["frames"]]))
        frames = sorted(frames_dir.glob("light_*.fits"))
        for sub in d.glob("ls_*"):
            shutil.rmtree(sub)
        shutil.rmtree(d / "siril", ignore_errors=True)
        # saturation in the stack's units: the simulator's white − bias, ADU; keep the cores well below it
        run_night(f"simulated {'mono' if args.mono else 'RGGB'} night, seed {seed}, dither {args.dither} px, rotation {args.rotation}°/frame", frames_dir,
                  frames, d, args, fw, peak_max=0.5 * (cfg.white - cfg.bias))
    if args.real:
        for name in ("seestar_m94_night1", "seestar_m94_night2"):
            src = SEQUENCES / name
            if not src.is_dir():
                continue
            frames = sorted(p for p in src.iterdir() if p.suffix.lower() in (".fit", ".fits"))
            d = work / name
            shutil.rmtree(d, ignore_errors=True)
            run_night(name, src, frames, d, args, None, peak_max=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
