"""Luminance image -> Stars and Quality, with sep (SExtractor's background and extraction as a library)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import sep

from .frame import Quality, Stars
from .normalize import pair_noise

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True, slots=True)
class StarParams:
    sigma: float = 5.0        # detection threshold, × background RMS
    min_area: int = 5         # connected pixels above threshold
    max_stars: int = 300      # brightest kept (matching and photometry need no more)
    box: int = 64             # background mesh, px of the detection image
    window: bool = True       # refine centroids with sep.winpos (Gaussian-windowed, ~0.02 px on bright stars)
    max_width: float = 2.5    # drop sources wider than this × the frame's median star (nebula knots, galaxies)

    def __post_init__(self):
        if not 0 < self.sigma <= 100:
            raise ValueError(f"stars.sigma = {self.sigma}: must be in (0, 100]")
        if self.max_stars < 3:
            raise ValueError(f"stars.max_stars = {self.max_stars}: must be at least 3")
        if self.box < 8:
            raise ValueError(f"stars.box = {self.box}: must be at least 8 px")
        if not self.max_width > 1:
            raise ValueError(f"stars.max_width = {self.max_width}: must be > 1 (inf keeps every source)")


def _subtract_background(data: np.ndarray, box: int) -> tuple[np.ndarray, float, float]:
    """``data`` − sep's background map (a new array), and the global background level and per-pixel RMS.

    From 2 Mpx on, the map is estimated on a 2×2-averaged copy with half-size meshes and scaled back up: the
    map is smooth on the mesh scale (64 px) by construction, so nothing is lost, and sep.Background, whose cost
    is per pixel, takes a quarter of the time (45 → 12 ms on the 6 Mpx binned mosaic of a 24 MP frame).
    The RMS then comes from differences of adjacent pixels (~10⁵ pairs): a gradient inside a mesh would
    inflate sep's mesh RMS, and more so on the averaged copy, whose noise is halved.
    """
    h, w = data.shape
    if data.size < 2_000_000 or box < 16:
        bkg = sep.Background(data, bw=box, bh=box, fw=3, fh=3)
        return data - bkg.back(dtype=np.float32), float(bkg.globalback), float(bkg.globalrms)
    small = cv2.resize(data[: h // 2 * 2, : w // 2 * 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    bkg = sep.Background(small, bw=box // 2, bh=box // 2, fw=3, fh=3)
    # A 2× linear upscale with pixel centres aligned (cv2's convention: centre of small pixel i at 2i + 0.5).
    back = cv2.resize(bkg.back(dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    rows = data[:: max(1, int(data.size / 1e5))]          # every r-th row: ~10⁵ pairs
    return cv2.subtract(data, back), float(bkg.globalback), pair_noise(np.diff(rows, axis=1).ravel())


def detect_stars(lum: np.ndarray, p: StarParams, *, saturation: float = np.inf,
                 extra_var: float = 0.0) -> tuple[Stars, Quality]:
    """Find stars in a (H, W) float32 luminance image.

    ``extra_var``: blur (px², per axis) that the caller added and that should not count in the FWHM — for a
    2×2-binned mosaic, the binning box adds 1/12 − 1/48 = 0.0625 binned px² beyond the sensor's own pixels.

    Sources much wider than the frame's stars (``p.max_width``; see `extended_sources`) are not stars.
    Returns the stars (brightest first, coordinates in ``lum``'s pixels) and the frame quality (FWHM and
    eccentricity from the unsaturated, well-measured half of the stars; background and noise from sep's
    background mesh).  ``lum`` is not modified (sep works on a background-subtracted copy).
    Zero stars is a valid result (empty arrays, nan FWHM), not an error.
    """
    data = np.ascontiguousarray(lum, dtype=np.float32)
    sub, background, noise = _subtract_background(data, p.box)
    # Big or crowded frames overflow sep's default pixel stack; size it to the image.
    sep.set_extract_pixstack(max(300_000, data.size // 20))
    try:
        obj = sep.extract(sub, p.sigma, err=noise, minarea=p.min_area, deblend_cont=0.005,
                          filter_kernel=sep.default_kernel)
    except Exception as err:  # sep raises plain Exception ("object deblending overflow", …)
        if "overflow" not in str(err):
            raise
        obj = sep.extract(sub, p.sigma * 2, err=noise, minarea=p.min_area, filter_kernel=sep.default_kernel)
    if len(obj):
        ok = (obj["a"] > 0.3) & (obj["b"] > 0.1) & np.isfinite(obj["flux"]) & (obj["flux"] > 0)
        # Drop blends with the edge: their centroids are biased.
        h, w = data.shape
        ok &= (obj["x"] > 2) & (obj["x"] < w - 3) & (obj["y"] > 2) & (obj["y"] < h - 3)
        obj = obj[ok]
        obj = obj[~extended_sources(obj, p.max_width, background=background, saturation=saturation)]
    if len(obj) == 0:
        return Stars.empty(), Quality(0, float("nan"), float("nan"), background, noise)
    obj = obj[np.argsort(-obj["flux"])][: p.max_stars]
    x, y = obj["x"].astype(np.float64), obj["y"].astype(np.float64)
    # Shape from second moments in a circular aperture around each star, after the stamp's own sky: sep's
    # isophotal a/b depend on the threshold and overestimated FWHM by ~40 % on simulated stars.
    sep_fwhm = _FWHM_PER_SIGMA * np.sqrt((obj["a"] ** 2 + obj["b"] ** 2) / 2.0)
    a, b, tensor = aperture_moments(sub, np.column_stack([x, y]), float(np.median(sep_fwhm)),
                                    extra_var=extra_var)
    bad_m = ~(np.isfinite(a) & np.isfinite(b) & (a > 0))
    a = np.where(bad_m, obj["a"], a)
    b = np.where(bad_m, obj["b"], b)
    fwhm = _FWHM_PER_SIGMA * np.sqrt((a * a + b * b) / 2.0)
    if p.window:
        sig = np.clip(fwhm / _FWHM_PER_SIGMA, 0.5, 10.0)
        xw, yw, flag = sep.winpos(sub, x, y, sig)
        good = (flag == 0) & (np.hypot(xw - x, yw - y) < 2.0)
        x, y = np.where(good, xw, x), np.where(good, yw, y)
    # Quality from stars that are neither saturated nor faint nor blended.
    peak_ok = (obj["peak"] + background) < 0.8 * saturation
    clean = peak_ok & (obj["flag"] & (sep.OBJ_MERGED | sep.OBJ_TRUNC) == 0)
    idx = np.flatnonzero(clean)
    if idx.size >= 6:
        idx = idx[: max(6, idx.size // 2)]  # brightest half: their moments are not noise-dominated
    else:
        idx = np.arange(len(obj))
    # Frame eccentricity from the median moment tensor: wind and tracking errors stretch every star the same
    # way, while noise gives small, undersampled stars random elongations that a median of per-star
    # eccentricities would mistake for trailing.
    t = tensor[idx][np.isfinite(tensor[idx]).all(axis=1)]
    if len(t):
        vxx, vyy, vxy = np.median(t, axis=0)
        root = np.sqrt(((vxx - vyy) / 2) ** 2 + vxy ** 2)
        l1, l2 = (vxx + vyy) / 2 + root, (vxx + vyy) / 2 - root
        ecc = float(np.sqrt(np.clip(1.0 - l2 / l1, 0.0, 1.0))) if l1 > 0 else float("nan")
    else:
        ecc = float(np.median(np.sqrt(np.clip(1.0 - (b[idx] / a[idx]) ** 2, 0.0, 1.0))))
    q = Quality(len(obj), float(np.median(fwhm[idx])), ecc, background, noise)

    # Photometry for transparency: isophotal fluxes depend on seeing, so measure in an aperture of 2 × FWHM
    # (> 99.9 % of a Gaussian star) and keep the brightest-first order by that flux.  The sky comes from an
    # annulus around each star, not the background mesh alone: the mesh sits below the unresolved light of
    # faint stars and nebula, which a soft frame's larger aperture collects more of (with 29 stars, sharp
    # frames' transparency scale +11.8 % against a soft reference; +1.4 % with the annulus: bench_clipping.py).
    radius = max(3.0, 2.0 * q.fwhm)
    flux, _, aflag = sep.sum_circle(sub, x, y, radius, bkgann=(radius + 1.0, radius + 4.0))
    flux = np.where((aflag & sep.APER_TRUNC) != 0, obj["flux"], flux).astype(np.float64)
    order = np.argsort(-flux, kind="stable")
    xy = np.column_stack([x, y])[order]
    return Stars(xy, flux[order], fwhm[order], a[order], b[order]), q



def extended_sources(obj: np.ndarray, max_width: float, *, background: float,
                     saturation: float = np.inf) -> np.ndarray:
    """(N,) bool: which detections in ``obj`` (sep.extract's records) are too wide to be stars: nebula knots.

    The width comes from the peak, with no aperture: flux / peak = 2πσ² for a Gaussian, and 2.355 σ from that is
    about the FWHM (3.02 px for 3 px stars: sep's flux is isophotal).  A source is extended when that width is
    over ``max_width`` × the median of the frame's unsaturated detections wider than a pixel, so the rule follows
    the frame: trailed, defocused and undersampled stars are wide together.  Measured on synthetic frames (stars
    FWHM 3 px, noise 5 ADU; 10 seeds): stars 0.64–1.77 × the median (including blends, Moffat wings β 1.5–4, 3:1
    trails, FWHM 1.2 px or 9 px, 2000 stars on 800×600); blobs of FWHM 20–80 px peaking at ≥ 8σ 2.2–22 ×, with an
    8 px core 2.9–17 ×.  The cost: stars on bright nebula, to which sep hands part of the nebula's pixels (so
    their flux and registration weight are partly the nebula's); 2.5 × dropped 7 of 526 stars where one star in
    six sat on a blob (2 × dropped 16, 3 × kept 3 more knots).
    The aperture moments cannot make this cut: inside their 1.5 × FWHM circle a 50 px blob is a flat disc, ~2 ×
    the stars' FWHM, no wider than some noisy faint stars.
    Saturated sources (peak + ``background`` ≥ 0.8 × ``saturation``) are flat-topped and measure 2–5 × (Moffat
    stars clipped at 4–115 × the white level), so they are kept and left out of the median.
    """
    unsat = (obj["peak"] + background) < 0.8 * saturation
    width = _FWHM_PER_SIGMA * np.sqrt(obj["flux"] / (2 * np.pi * np.maximum(obj["peak"], 1e-30)))
    # The reference leaves out what the optics did not shape: a hot pixel or a one-pixel cosmic-ray hit holds
    # all its flux in its peak (width 0.94 px), stars are wider (median ≥ 1.5 px even at FWHM 1.2 px).  In an
    # uncalibrated frame hot pixels are most detections (55 of 75 in a simulated one): in their median, the
    # trailed stars of a windy frame measured 2–4 × and would have gone, with the judge's evidence.
    ref_set = unsat & (width > 1.2)
    if np.count_nonzero(ref_set) < 3 or not np.isfinite(max_width):
        return np.zeros(len(obj), bool)
    # The median, not a lower quantile, which the faint, isophote-truncated stars pull down; a frame that is
    # mostly nebula pulls the median up and keeps its knots, as before.
    ref = np.median(width[ref_set])
    return unsat & (width > max_width * ref)


def aperture_moments(sub: np.ndarray, xy: np.ndarray, fwhm: float, *,
                     extra_var: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-axes (σ along the major and minor axis, px) of each star from unweighted second moments inside a
    circle of radius 1.5 × FWHM (≥ 3 px), after subtracting the median of the stamp's border.

    ``sub``: (H, W) background-subtracted image; returns a, b (N,) float64 and the moment tensor (N, 3)
    [vxx, vyy, vxy] in px², nan where the stamp leaves the image or holds no positive flux.  ``extra_var`` is
    removed from both axes' variance.
    """
    n = len(xy)
    a = np.full(n, np.nan)
    b = np.full(n, np.nan)
    tensor = np.full((n, 3), np.nan)
    if n == 0:
        return a, b, tensor
    h, w = sub.shape
    r = int(max(3, np.ceil(1.5 * fwhm)))
    off = np.arange(-r - 1, r + 2)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    border = (np.abs(oy) == r + 1) | (np.abs(ox) == r + 1)
    cx, cy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    inside = (cx > r + 1) & (cx < w - r - 2) & (cy > r + 1) & (cy < h - r - 2)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return a, b, tensor
    st = sub[cy[idx, None, None] + oy[None], cx[idx, None, None] + ox[None]].astype(np.float64)
    st -= np.median(st[:, border], axis=1)[:, None, None]
    dx = ox[None] - (xy[idx, 0] - cx[idx])[:, None, None]
    dy = oy[None] - (xy[idx, 1] - cy[idx])[:, None, None]
    wgt = np.where(dx * dx + dy * dy <= r * r, st, 0.0)
    s = wgt.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (wgt * dx).sum(axis=(1, 2)) / s
        my = (wgt * dy).sum(axis=(1, 2)) / s
        ddx, ddy = dx - mx[:, None, None], dy - my[:, None, None]
        vxx = (wgt * ddx * ddx).sum(axis=(1, 2)) / s - extra_var
        vyy = (wgt * ddy * ddy).sum(axis=(1, 2)) / s - extra_var
        vxy = (wgt * ddx * ddy).sum(axis=(1, 2)) / s
        tr, det_root = (vxx + vyy) / 2, np.sqrt(((vxx - vyy) / 2) ** 2 + vxy ** 2)
        l1, l2 = tr + det_root, tr - det_root
        ok = (s > 0) & (l2 > 0)
    a[idx[ok]] = np.sqrt(l1[ok])
    b[idx[ok]] = np.sqrt(l2[ok])
    tensor[idx[ok]] = np.column_stack([vxx, vyy, vxy])[ok]
    return a, b, tensor


def stamp_radius(fwhm: float) -> int:
    """Half-width (px) of refine_centroids' stamps for stars of ``fwhm`` px: 3σ of its window and 2 px of sky."""
    return int(np.ceil(3.0 * max(float(fwhm), 1.0) / _FWHM_PER_SIGMA)) + 2


STAMP_MAX_FWHM = 8.0     # refine_centroids does nothing for wider stars


def refine_centroids(img: np.ndarray, xy: np.ndarray, fwhm: float, *, iterations: int = 6,
                     max_fwhm: float = STAMP_MAX_FWHM) -> np.ndarray:
    """Gaussian-windowed centroids (SExtractor's XWIN/YWIN) measured on a full-resolution image.

    ``img``: (C, H, W) float32 (channels are summed into a luminance inside each stamp, so no full-frame
    luminance is allocated); ``xy``: (N, 2) starting positions (e.g. from the 2×2-binned detection, whose
    centroids of undersampled stars carry ~0.1 px pixel-phase errors); ``fwhm`` in px of ``img``.
    Each stamp's local sky is the median of its border.  Returns (N, 2) float64; a star whose stamp leaves the
    image, contains NaN or does not converge keeps its input position.  Above ``max_fwhm`` px nothing is done:
    stars that wide are well sampled on the binned image already, and the stamps would grow as FWHM² (a
    defocused or non-astronomical frame with FWHM 58 px took 3 s at 18 MP).
    """
    n = len(xy)
    if n == 0 or not fwhm <= max_fwhm:
        return xy.astype(np.float64, copy=True)
    _, h, w = img.shape
    sig = max(float(fwhm), 1.0) / _FWHM_PER_SIGMA
    r = stamp_radius(fwhm)
    off = np.arange(-r, r + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    border = (np.abs(oy) == r) | (np.abs(ox) == r)
    pos = xy.astype(np.float64).copy()
    inside = (pos[:, 0] >= r + 1) & (pos[:, 0] < w - r - 2) & (pos[:, 1] >= r + 1) & (pos[:, 1] < h - r - 2)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return pos
    p = pos[idx]
    ok = np.ones(idx.size, bool)
    for _ in range(iterations):
        cx, cy = np.rint(p[:, 0]).astype(np.int64), np.rint(p[:, 1]).astype(np.int64)
        cx = np.clip(cx, r, w - r - 1)
        cy = np.clip(cy, r, h - r - 1)
        yy, xx = cy[:, None, None] + oy[None], cx[:, None, None] + ox[None]
        stamp = img[:, yy, xx].sum(axis=0).astype(np.float64)           # (N, s, s)
        stamp -= np.median(stamp[:, border], axis=1)[:, None, None]
        dx = xx - p[:, 0, None, None]
        dy = yy - p[:, 1, None, None]
        wgt = np.exp(-(dx * dx + dy * dy) / (2 * sig * sig)) * stamp
        norm = wgt.sum(axis=(1, 2))
        good = np.isfinite(norm) & (norm > 0)
        step_x = np.where(good, 2.0 * (wgt * dx).sum(axis=(1, 2)) / np.where(good, norm, 1), 0)
        step_y = np.where(good, 2.0 * (wgt * dy).sum(axis=(1, 2)) / np.where(good, norm, 1), 0)
        ok &= good
        p[:, 0] += np.clip(step_x, -1, 1)
        p[:, 1] += np.clip(step_y, -1, 1)
        if np.all(np.hypot(step_x, step_y) < 1e-4):
            break
    moved = np.hypot(*(p - xy[idx]).T)
    ok &= moved < 2.0
    pos[idx[ok]] = p[ok]
    return pos
