"""The sky of a simulated night: stars and a faint nebula in sky coordinates.

Sky coordinates are frame 0's pixel grid (x = column, y = row, 0-based, pixel centres at integers) extended
by `MARGIN` of the frame size on each side, so that drifted, rotated or flipped frames still see stars.
Everything here is in electrons per second (stars) or per pixel per frame of cfg.exptime (nebula), before the
optics' flat and before transparency; `camera.py` turns it into a frame, `filters.py` says what a filter passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 0.2  # fraction of the frame added on each side of the sky field
N_KNOTS = 6   # Hα knots: the last N_KNOTS rows of SkyField.lines[0]


@dataclass(frozen=True, slots=True)
class SkyField:
    xy: np.ndarray      # (N, 2) float64 sky coordinates (x, y), brightest first
    rate: np.ndarray    # (N,) float64 e-/s, total over the colour channels (what a mono pixel sums)
    rgb: np.ndarray     # (N, 3) float32 colour weights (R, G, B), mean 1 over the three channels
    blobs: np.ndarray   # (M, 9) float64 nebula blobs: x, y, sigma_major, sigma_minor, angle, amp, r, g, b
    # the same nebula as emission lines, seen through filters: Hα, [OIII], [SII], each (K, 6) float64 blobs
    # x, y, sigma_major, sigma_minor, angle, amp (e-/px per frame), Hα's knots last; () without a nebula
    lines: tuple[np.ndarray, ...] = ()


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
        val = _blob(sx, sy, bx, by, sa, sb, ang, amp)
        out[0] += r * val
        out[1] += g * val
        out[2] += b * val
    return out


def _blob(sx: np.ndarray, sy: np.ndarray, bx, by, sa, sb, ang, amp) -> np.ndarray:
    """An elliptical Gaussian of peak `amp` at (bx, by), sigmas sa × sb, major axis at `ang` rad: float32."""
    dx, dy = sx - bx, sy - by
    c, s = np.cos(ang), np.sin(ang)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (amp * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))).astype(np.float32)


def make_lines(sky: SkyField, width: int, height: int, sky_level: float, *,
               rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The nebula as three emission lines, each (K, 6) float64 blobs (x, y, sigma_major, sigma_minor, angle,
    amp e-/px per frame), in sky coordinates; () when `sky` has no nebula.

    Hα: the red blobs of sky.blobs at 0.6 × their amplitude (peaks 2–5 % of `sky_level`; they overlap), plus
    N_KNOTS knots in them (the last rows), FWHM 20–80 px, peaks 3–6 %: compact, what a star finder mistakes for
    a fuzzy star. [OIII]: 3 blobs where Hα is faint (peaks 3–6 %). [SII]: 2 thin blobs on the flanks of Hα
    blobs (partly overlapping them) at 60–90 % of their peak, and 1 faint one (1.5–3 %) where neither Hα nor
    [OIII] is. Through its filter at 3 × exptime, each line's peak is 3–14 × the per-frame sky noise (Hα
    8–14, [OIII] 5–8, [SII] 3–6 at the default sky_level, seeds 1–5). The lines differ in structure:
    pairwise correlation over the frame ≤ 0.25 for seeds 1–40 at 400×300, 600×600, 800×600 and 1200×400.
    The lines are drawn from `rng` alone, so they change neither the stars nor sky.blobs.
    """
    if not len(sky.blobs):
        return ()
    s = min(width, height)
    red = sky.blobs[sky.blobs[:, 6] > 1][:, :6] * [1, 1, 1, 1, 1, 0.6]   # they overlap: 0.6 keeps the sum sane
    # each knot in an Hα blob, ~N(0, 0.8 sigma) off its centre; of 8 such places, the one farthest from the knots
    # placed before, so that knots stay separate (overlapping knots would add up to one too bright)
    knots = np.zeros((N_KNOTS, 6))
    for i in range(N_KNOTS):
        bx, by, sa, sb, ang, _ = red[rng.integers(0, len(red))]
        u, v = rng.normal(0, 0.8, 8) * sa, rng.normal(0, 0.8, 8) * sb
        px = np.clip(bx + np.cos(ang) * u - np.sin(ang) * v, 0.05 * width, 0.95 * width)
        py = np.clip(by + np.sin(ang) * u + np.cos(ang) * v, 0.05 * height, 0.95 * height)
        gap = np.hypot(px[:, None] - knots[None, :i, 0], py[:, None] - knots[None, :i, 1]).min(axis=1,
                                                                                             initial=np.inf)
        j = int(np.argmax(gap))
        sigma = rng.uniform(20, 80) / (2 * np.sqrt(2 * np.log(2)))
        knots[i] = [px[j], py[j], sigma, sigma * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi),
                    rng.uniform(0.03, 0.06) * sky_level]
    ha = np.vstack([red, knots])

    # candidate centres; each new blob goes where the lines placed so far are faintest (relative to their
    # peak), which keeps the lines apart
    cand = np.column_stack([rng.uniform(0.15, 0.85, 96) * width, rng.uniform(0.15, 0.85, 96) * height])

    def faintest(blobs: np.ndarray) -> np.ndarray:
        level = np.zeros(len(cand))
        for b in blobs:
            level += _blob(cand[:, 0], cand[:, 1], *b[:5], 1.0)
        return cand[np.argmin(level)]

    oiii = np.zeros((0, 6))
    for _ in range(3):
        x, y = faintest(np.vstack([red, oiii]))
        oiii = np.vstack([oiii, [x, y, rng.uniform(0.08, 0.16) * s, rng.uniform(0.04, 0.09) * s,
                                 rng.uniform(0, np.pi), rng.uniform(0.03, 0.06) * sky_level]])

    # [SII] on flanks of Hα blobs: beside one across its minor axis, a bit shorter and half as wide; of the 2
    # sides of each Hα blob, the 2 where the other Hα and the [OIII] blobs are faintest, so that [SII] repeats
    # neither
    n = len(red)
    major, minor = red[:, 2] * rng.uniform(0.6, 0.9, n), red[:, 3] * rng.uniform(0.4, 0.6, n)
    turn, amp = red[:, 4] + rng.uniform(-0.3, 0.3, n), red[:, 5] * rng.uniform(0.6, 0.9, n)
    flanks = np.vstack([np.column_stack([red[:, 0] - side * (1.5 * red[:, 3] + minor) * np.sin(red[:, 4]),
                                         red[:, 1] + side * (1.5 * red[:, 3] + minor) * np.cos(red[:, 4]),
                                         major, minor, turn, amp]) for side in (-1.0, 1.0)])
    others = sum(_blob(flanks[:, 0], flanks[:, 1], *b[:5], 1.0) for b in np.vstack([red, oiii]))
    sii = flanks[np.argsort(others, kind="stable")[:2]]
    x, y = faintest(np.vstack([red, oiii]))
    sii = np.vstack([sii, [x, y, rng.uniform(0.06, 0.12) * s, rng.uniform(0.03, 0.06) * s, rng.uniform(0, np.pi),
                           rng.uniform(0.015, 0.03) * sky_level]])
    return ha, oiii, sii


def line_images(lines: tuple[np.ndarray, ...], sx: np.ndarray, sy: np.ndarray) -> list[np.ndarray]:
    """Surface brightness of each line at sky points (sx, sy): a list of (*sx.shape) float32 e-/px per frame,
    in the order of `lines` (Hα, [OIII], [SII])."""
    out = []
    for blobs in lines:
        img = np.zeros(sx.shape, np.float32)
        for b in blobs:
            img += _blob(sx, sy, *b)
        out.append(img)
    return out
