"""Luminance image -> Stars and Quality, with sep (SExtractor's background and extraction as a library)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from .frame import Quality, Stars

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True, slots=True)
class StarParams:
    sigma: float = 5.0        # detection threshold, × background RMS
    min_area: int = 5         # connected pixels above threshold
    max_stars: int = 300      # brightest kept (matching and photometry need no more)
    box: int = 64             # background mesh, px of the detection image
    window: bool = True       # refine centroids with sep.winpos (Gaussian-windowed, ~0.02 px on bright stars)

    def __post_init__(self):
        if not 0 < self.sigma <= 100:
            raise ValueError(f"stars.sigma = {self.sigma}: must be in (0, 100]")
        if self.max_stars < 3:
            raise ValueError(f"stars.max_stars = {self.max_stars}: must be at least 3")
        if self.box < 8:
            raise ValueError(f"stars.box = {self.box}: must be at least 8 px")


def detect_stars(lum: np.ndarray, p: StarParams, *, saturation: float = np.inf) -> tuple[Stars, Quality]:
    """Find stars in a (H, W) float32 luminance image.

    Returns the stars (brightest first, coordinates in ``lum``'s pixels) and the frame quality (FWHM and
    eccentricity from the unsaturated, well-measured half of the stars; background and noise from sep's
    background mesh).  ``lum`` is not modified (sep works on a background-subtracted copy).
    Zero stars is a valid result (empty arrays, nan FWHM), not an error.
    """
    data = np.ascontiguousarray(lum, dtype=np.float32)
    bkg = sep.Background(data, bw=p.box, bh=p.box, fw=3, fh=3)
    background, noise = float(bkg.globalback), float(bkg.globalrms)
    sub = data - bkg.back(dtype=np.float32)
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
    if len(obj) == 0:
        return Stars.empty(), Quality(0, float("nan"), float("nan"), background, noise)
    obj = obj[np.argsort(-obj["flux"])][: p.max_stars]
    a = obj["a"].astype(np.float64)
    b = obj["b"].astype(np.float64)
    fwhm = _FWHM_PER_SIGMA * np.sqrt((a * a + b * b) / 2.0)
    x, y = obj["x"].astype(np.float64), obj["y"].astype(np.float64)
    if p.window:
        sig = np.clip(fwhm / _FWHM_PER_SIGMA, 0.5, 10.0)
        xw, yw, flag = sep.winpos(sub, x, y, sig)
        good = (flag == 0) & (np.hypot(xw - x, yw - y) < 2.0)
        x, y = np.where(good, xw, x), np.where(good, yw, y)
    # Quality from stars that are neither saturated nor faint nor blended.
    peak_ok = (obj["peak"] + bkg.globalback) < 0.8 * saturation
    clean = peak_ok & (obj["flag"] & (sep.OBJ_MERGED | sep.OBJ_TRUNC) == 0)
    idx = np.flatnonzero(clean)
    if idx.size >= 6:
        idx = idx[: max(6, idx.size // 2)]  # brightest half: their moments are not noise-dominated
    else:
        idx = np.arange(len(obj))
    ecc = np.sqrt(np.clip(1.0 - (b[idx] / a[idx]) ** 2, 0.0, 1.0))
    q = Quality(len(obj), float(np.median(fwhm[idx])), float(np.median(ecc)), background, noise)

    # Photometry for transparency: isophotal fluxes depend on seeing, so measure in an aperture of 2 × FWHM
    # (> 99.9 % of a Gaussian star) and keep the brightest-first order by that flux.
    radius = max(3.0, 2.0 * q.fwhm)
    flux, _, aflag = sep.sum_circle(sub, x, y, radius)
    flux = np.where((aflag & sep.APER_TRUNC) != 0, obj["flux"], flux).astype(np.float64)
    order = np.argsort(-flux, kind="stable")
    xy = np.column_stack([x, y])[order]
    return Stars(xy, flux[order], fwhm[order], a[order], b[order]), q

