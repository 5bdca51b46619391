"""The sky of a simulated night: stars and a faint nebula in sky coordinates.

Sky coordinates are frame 0's pixel grid (x = column, y = row, 0-based, pixel centres at integers) extended
by `MARGIN` of the frame size on each side, so that drifted, rotated or flipped frames still see stars.
Everything here is in electrons per second (stars) or per pixel per frame (nebula), before the optics' flat
and before transparency; `camera.py` turns it into a frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 0.2  # fraction of the frame added on each side of the sky field


@dataclass(frozen=True, slots=True)
class SkyField:
    xy: np.ndarray      # (N, 2) float64 sky coordinates (x, y), brightest first
    rate: np.ndarray    # (N,) float64 e-/s, total over the colour channels (what a mono pixel sums)
    rgb: np.ndarray     # (N, 3) float32 colour weights (R, G, B), mean 1 over the three channels
    blobs: np.ndarray   # (M, 9) float64 nebula blobs: x, y, sigma_major, sigma_minor, angle, amp, r, g, b


def make_sky(width: int, height: int, n_stars: int, sky_level: float, *, nebula: bool,
             rng: np.random.Generator) -> SkyField:
    """Draw a star field and nebula for a `width` × `height` frame, in sky coordinates.

    Star fluxes follow a power law (cumulative N(>F) ∝ F^-0.8: many faint, few bright). At 60 s the
    faintest has ~300 e- in total, near the sky noise; the three brightest get 0.6–2 Me-, which saturates a
    14-bit sensor at a 3 px FWHM. Colours come from a temperature-like t in [0, 1]: R/G from 1.4 to 0.6 and
    B/G from 0.6 to 1.4. The nebula is 4 smooth elliptical Gaussians peaking at 3–8 % of `sky_level`,
    mostly red (Hα), one teal (OIII).
    """
    x = rng.uniform(-MARGIN * width, (1 + MARGIN) * width, n_stars)
    y = rng.uniform(-MARGIN * height, (1 + MARGIN) * height, n_stars)
    f_min, f_max, slope = 300.0, 6e5, 0.8
    u = rng.uniform(0, 1, n_stars)
    flux60 = np.minimum(f_min * (1 - u) ** (-1 / slope), f_max)
    flux60 = np.sort(flux60)[::-1].copy()
    n_bright = min(3, n_stars)
    flux60[:n_bright] = np.sort(np.exp(rng.uniform(np.log(6e5), np.log(2e6), n_bright)))[::-1]
    t = rng.uniform(0, 1, n_stars)
    rgb = np.stack([1.4 - 0.8 * t, np.ones_like(t), 0.6 + 0.8 * t], axis=1)
    rgb = (rgb / rgb.mean(axis=1, keepdims=True)).astype(np.float32)

    blobs = np.zeros((0, 9))
    if nebula:
        m = 4
        s = min(width, height)
        colours = np.array([[2.2, 0.4, 0.4]] * (m - 1) + [[0.3, 1.3, 1.4]])  # mean 1 per row
        blobs = np.column_stack([
            rng.uniform(0.2, 0.8, m) * width,
            rng.uniform(0.2, 0.8, m) * height,
            rng.uniform(0.10, 0.25, m) * s,
            rng.uniform(0.05, 0.12, m) * s,
            rng.uniform(0, np.pi, m),
            rng.uniform(0.03, 0.08, m) * sky_level,
            colours,
        ])
    return SkyField(xy=np.column_stack([x, y]), rate=flux60 / 60.0, rgb=rgb, blobs=blobs)


def nebula_rgb(blobs: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Nebula surface brightness at sky points (sx, sy): (3, *sx.shape) float32, e-/px per frame for the
    R, G and B channels (a mono pixel sees their mean)."""
    out = np.zeros((3, *sx.shape), np.float32)
    for bx, by, sa, sb, ang, amp, r, g, b in blobs:
        dx, dy = sx - bx, sy - by
        c, s = np.cos(ang), np.sin(ang)
        u, v = c * dx + s * dy, -s * dx + c * dy
        val = (amp * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))).astype(np.float32)
        out[0] += r * val
        out[1] += g * val
        out[2] += b * val
    return out
