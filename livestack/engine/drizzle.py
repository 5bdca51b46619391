"""Drizzle: each sensor sample dropped onto a finer grid through its own footprint — no interpolation, and for a
colour sensor no demosaic (Bayer drizzle: every CFA sample lands in its own colour plane only).

A sample at sensor pixel q is a square "drop" of side ``pixfrac`` (sensor px) centred on q; an output pixel of the
grid gets Σ v·overlap and a coverage Σ overlap (its area fraction covered by drops; 0 where nothing landed).  The
frame's value there is Σ v·overlap / Σ overlap, and the stack weighs it by the coverage.

How it is computed, and why not with the ``drizzle`` package: that package has no wheels for aarch64 (a Pi could not
install it) and takes 1.7 s per 24 MP plane (turbo kernel, one plane, this 2-core VM; 0.16 s at 2 MP), three
planes for a colour frame.  Here the geometry is split so that OpenCV does the heavy part:

* The sensor is four sub-lattices of samples 2 px apart — (0, 0), (1, 0), (0, 1), (1, 1): the R, G, G, B of a
  Bayer cell, or the four phases of a mono sensor.  A drop reaches at most (pixfrac + 1/scale)/2 ≤ 1 px from its
  centre, so an output pixel overlaps at most one sample of each sub-lattice per axis: the nearest, which
  ``cv2.warpAffine(INTER_NEAREST)`` of the quarter-size sub-image gives (~2.6 ns per output pixel).
* The overlap is approximated as the drizzle package's "turbo" kernel does — the output pixel and the drop as
  squares aligned with one set of axes (here the sensor's; the package uses the output's) — so it is separable,
  K(dx)·K(dy) with d the distance from the output pixel's centre, mapped back to the sensor, to that sample.
  Exact for shifts, 90° turns and flips; for a field rotated by θ the drop's corners are off by ~θ/2 of a pixel.
  Against the package's turbo kernel at zero rotation: the same image to float32 rounding (tests).
* K depends only on the sub-lattice's column phase (x) or row phase (y): four 1-D-shaped planes per band of rows
  serve the four sub-lattices.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import geometry
from .warp import footprint_rows, outside_index

LATTICES = ((0, 0), (1, 0), (0, 1), (1, 1))     # (x, y) phase of each sub-lattice of a 2×2 cell
_CFA_INDEX = {"R": 0, "G": 1, "B": 2}


@dataclass(frozen=True, slots=True)
class DrizzleParams:
    scale: float = 0.0          # output pixels per sensor pixel along an axis (0: no drizzle; 1: Bayer drizzle
                                #     on the sensor's own grid — colour without demosaic; 2: a grid 2× finer)
    pixfrac: float = 1.0        # the drop's side in sensor pixels (0.5–1; smaller: sharper, noisier, holes)
    max_memory_mb: int = 2048   # a session whose stack would need more is refused with a sentence
    compensate: bool = True     # the stack's outputs sharpened by what the drops and the output pixels blur
                                #     (compensation(): stars 6–9 % tighter at any pixfrac; README, drizzle)

    def __post_init__(self):
        if not (self.scale == 0 or 1 <= self.scale <= 4):
            raise ValueError(f"drizzle.scale = {self.scale}: must be 0 (off) or in [1, 4]")
        if not 0.3 <= self.pixfrac <= 1.0:
            raise ValueError(f"drizzle.pixfrac = {self.pixfrac}: must be in [0.3, 1]")
        if self.max_memory_mb < 64:
            raise ValueError(f"drizzle.max_memory_mb = {self.max_memory_mb}: must be ≥ 64")


def lattice_channels(pattern: str | None) -> list[int]:
    """The stack channel of each sub-lattice (LATTICES order): the CFA colour, or 0 for mono."""
    if pattern is None:
        return [0, 0, 0, 0]
    return [_CFA_INDEX[pattern[ox + 2 * oy]] for ox, oy in LATTICES]


def blur_variance(pixfrac: float, scale: float) -> float:
    """The variance (grid px²) the drizzle adds to every star: a drop of side ``pixfrac`` sensor px (pixfrac·scale
    grid px) and the output pixel it is averaged over (1 grid px) are two boxes, (p·s)²/12 + 1/12."""
    return ((pixfrac * scale) ** 2 + 1.0) / 12.0


MAX_COMPENSATED_DROP = 2.0     # grid px


def compensated_drop(pixfrac: float, scale: float) -> float:
    """The width (grid px) of the drop compensation() takes out: the drop's, at most 2 grid px.  A wider box has a
    zero of its transfer inside the grid's band, which a 5-tap filter can only overshoot: at ×3 and ×4 (pixfrac
    1) its taps were (0.15, −1.02, 2.73) and (0.40, −2.30, 4.81), the background noise 1.1× and 1.4× ×2's, and a
    bright star ringed to −15 500 and −75 500 ADU on a sky of 425 (a review; ×2: −750).  A wider drop keeps the
    rest of its blur."""
    return min(pixfrac * scale, MAX_COMPENSATED_DROP)


def compensated_variance(pixfrac: float, scale: float) -> float:
    """The part of blur_variance that compensation() takes out (grid px²): the boxes' with the drop at most 2 grid
    px wide (DRZSHARP is half of it)."""
    return blur_variance(compensated_drop(pixfrac, scale) / scale, scale)


def compensation(pixfrac: float, scale: float) -> tuple[float, float, float, float, float]:
    """The 5-tap filter (c, b, 1 − 2b − 2c, b, c), applied along each grid axis, that takes the drizzle's own blur
    out of its stack — the two boxes of blur_variance — to fourth order: its second and fourth cumulants are
    those boxes' with the sign changed (a box of width w has κ₂ = w²/12, κ₄ = −w⁴/120), so a star convolved
    with the boxes and then filtered keeps the sky's and the sensor's width in both.  The taps sum to
    1 (flux kept).  (scale 2: pixfrac 1 → (0.045, −0.388, 1.687, …), 0.6 → (0.015, −0.161, 1.292, …).)

    The 3-tap [−a, 1 + 2a, −a] with a = blur_variance/2 (the fifth to eighth sessions' filter) cancels the
    second moment only: its fourth cumulant is −2a − 12a², far from the boxes' +0.026…+0.14, and a Gaussian
    fit — which weighs the core — still sees a third of the blur.  Measured on noise-free simulated frames dropped
    with their true matrices (bench_drizzle --truth: stars 1.3 px, 20 frames; the stack cannot be tighter than
    the star seen through one sensor pixel, 1.477 px): raw drizzle 1.577 px (pixfrac 0.6) / 1.666 (1.0), 3-tap
    1.505 / 1.532, this filter 1.490 / 1.496, a 7-tap matching κ₆ too 1.486 / 1.485 (its centre 1.89 at
    pixfrac 1: not worth its noise).  Through `livestack stack` (bench_drizzle --sim): README, drizzle."""
    w = compensated_drop(pixfrac, scale)
    v = compensated_variance(pixfrac, scale)
    m2 = -v                                   # the filter's second moment: −κ₂ of the boxes
    m4 = (w ** 4 + 1.0) / 120.0 + 3 * v * v   # its fourth moment: κ₄ = +Σ w⁴/120, m₄ = κ₄ + 3κ₂²
    c = (m4 - m2) / 24.0                      # m₂ = 2b + 8c, m₄ = 2b + 32c
    b = (m2 - 8.0 * c) / 2.0
    return (c, b, 1.0 - 2.0 * b - 2.0 * c, b, c)


def reach(pixfrac: float, scale: float) -> float:
    """How far (sensor px, per axis) from a sample an output pixel's centre can be and still overlap its drop."""
    return 0.5 * pixfrac + 0.5 / scale


def stack_bytes(shape_hw: tuple[int, int], channels: int) -> int:
    """Bytes of a drizzled stack's arrays on a (H, W) grid: the sums and the weights of each channel (2 ×
    channels float32 planes) and the outlier test's statistics (a quarter plane of 3 float32 + 1 uint16), plus the frame's work planes (a value and a coverage plane: one channel at a time)."""
    h, w = shape_hw
    n = h * w
    return n * 4 * 2 * channels + (n // 4) * 14 + n * 4 * 2


def too_big(sensor_hw: tuple[int, int], channels: int, p: DrizzleParams) -> str | None:
    """Why this sensor cannot be drizzled at ``p.scale`` within ``p.max_memory_mb``, or None."""
    shape = grid_shape(sensor_hw, p.scale)
    need = stack_bytes(shape, channels) + channels * 3 * shape[0] * shape[1] * 2 * 2   # + float16 bootstrap
    if need <= p.max_memory_mb * 2 ** 20:
        return None
    h, w = sensor_hw
    per_px = need / (h * w)
    largest = p.max_memory_mb * 2 ** 20 / per_px / 1e6
    # below 1 MP two figures: "~0 MP" (×4 within 64 MB) read as if no frame at all could be drizzled
    mp = f"{largest:.0f}" if largest >= 1 else f"{largest:.2g}"
    return (f"drizzle ×{p.scale:g} of a {w}×{h} {'colour' if channels == 3 else 'mono'} frame needs "
            f"{need / 2 ** 30:.1f} GB for its stack, over the {p.max_memory_mb} MB limit (largest here: "
            f"~{mp} MP): use a smaller [drizzle] scale, or raise max_memory_mb")


def grid_shape(sensor_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    h, w = sensor_hw
    return round(h * scale), round(w * scale)


def sensor_to_grid(scale: float) -> np.ndarray:
    """Sensor pixel -> drizzle grid pixel: the sensor pixel (0, 0) spans grid [-0.5, scale - 0.5), its centre is
    at (scale - 1)/2 (scale 2: x -> 2x + 0.5)."""
    s = float(scale)
    return np.array([[s, 0.0, (s - 1) / 2], [0.0, s, (s - 1) / 2]])


def _kernel_plane(coef: np.ndarray, rows: np.ndarray, cols: np.ndarray, phase: int, half_out: float, pixfrac: float, out: np.ndarray) -> np.ndarray:
    """K(d) on a band of output pixels for one axis and one phase: d = distance (sensor px) from the pixel's centre
    mapped to the sensor (s = coef · (X, Y, 1)) to the nearest sample of the phase's sub-lattice (samples outside
    the sensor are the caller's: footprint_rows).  ``out``: a (len(rows), len(cols)) float32 plane."""
    a, b, c = coef
    u = out
    # u: the position in units of the sub-lattice (samples 2 px apart), its nearest sample at rint(u)
    np.add.outer(((b * rows + c - phase) * 0.5).astype(np.float32), (a * 0.5 * cols).astype(np.float32), out=u)
    u -= np.rint(u)
    np.abs(u, out=u)
    # overlap of [d − p/2, d + p/2] with [−h, h] over the output pixel's width 2h, d = 2|u|
    u *= np.float32(-2.0)
    u += np.float32(0.5 * pixfrac + half_out)
    np.maximum(u, np.float32(0.0), out=u)
    np.minimum(u, np.float32(min(pixfrac, 2 * half_out)), out=u)
    u *= np.float32(1.0 / (2 * half_out))
    return u


class Drizzler:
    """Drops one frame's samples onto the grid, a band of rows at a time: per channel a value plane (NaN where
    nothing landed) and a coverage plane.  Reuses its planes from frame to frame."""

    def __init__(self, pattern: str | None, channels: int, pixfrac: float, scale: float):
        self.pattern = pattern
        self.channels = channels
        self.lattice_channel = lattice_channels(pattern)
        self.pixfrac = float(pixfrac)
        self.scale = float(scale)

    def planes(self, cfa: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int], value: np.ndarray,
               coverage: np.ndarray, *, channels: list[int] | None = None, parallel_map=None,
               band_rows: int = 16) -> None:
        """Drizzle the (H, W) float32 mosaic ``cfa`` (normalised; NaN samples are left out) by ``matrix``
        (sensor px -> grid px) into ``value`` and ``coverage``, two (len(channels), h, w) float32 arrays —
        by default every channel; the pipeline asks for one at a time (two planes in memory instead of six:
        the overlap planes are then made once per channel, ~+30 % of this stage's time for a Bayer frame)."""
        channels = list(range(self.channels)) if channels is None else list(channels)
        slot = {c: i for i, c in enumerate(channels)}
        wanted = [(lat, slot[c]) for lat, c in zip(LATTICES, self.lattice_channel) if c in slot]
        h, w = shape_hw
        m = np.asarray(matrix, np.float64)
        inv = geometry.invert(m)
        lin = np.sqrt(abs(np.linalg.det(m[:, :2])))        # output px per sensor px
        half_out = 0.5 / lin                               # an output pixel's half-width in sensor px
        subs = []
        for (ox, oy), _ in wanted:
            sub = np.ascontiguousarray(cfa[oy::2, ox::2])
            # sub-lattice index (i, j) -> sensor (2i + ox, 2j + oy) -> grid
            to_grid = geometry.compose(m, np.array([[2.0, 0, ox], [0, 2.0, oy]]))
            x0, x1 = footprint_rows(to_grid, sub.shape, (h, w), reach=0.5)
            subs.append((sub, to_grid, x0, x1, bool(np.isnan(sub).any())))
        cols = np.arange(w, dtype=np.float64)

        def band(r0: int) -> None:
            r1 = min(h, r0 + band_rows)
            rows = np.arange(r0, r1, dtype=np.float64)
            n = r1 - r0
            kx = {ph: _kernel_plane(inv[0], rows, cols, ph, half_out, self.pixfrac, np.empty((n, w), np.float32))
                  for ph in {ox for (ox, _), _ in wanted}}
            ky = {ph: _kernel_plane(inv[1], rows, cols, ph, half_out, self.pixfrac, np.empty((n, w), np.float32))
                  for ph in {oy for (_, oy), _ in wanted}}
            first = [True] * len(channels)
            v = np.empty((n, w), np.float32)
            cov = np.empty((n, w), np.float32)
            for ((ox, oy), c), (sub, to_grid, x0, x1, has_nan) in zip(wanted, subs):
                # the band of the grid as its own image: shift the map up by r0 rows
                band_map = to_grid.copy()
                band_map[1, 2] -= r0
                cv2.warpAffine(sub, band_map, (w, n), dst=v, flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
                np.multiply(kx[ox], ky[oy], out=cov)
                idx = outside_index(x0[r0:r1], x1[r0:r1], w)
                if len(idx):
                    cov.reshape(-1)[idx] = 0.0
                if has_nan:     # samples the calibration could not repair are left out
                    bad = np.isnan(v)
                    cov[bad] = 0.0
                    v[bad] = 0.0
                v *= cov
                if first[c]:
                    value[c, r0:r1] = v
                    coverage[c, r0:r1] = cov
                    first[c] = False
                else:
                    value[c, r0:r1] += v
                    coverage[c, r0:r1] += cov
            for c in range(len(channels)):
                vb, cb = value[c, r0:r1], coverage[c, r0:r1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    np.divide(vb, cb, out=vb)       # 0/0: NaN where nothing landed

        run = parallel_map or (lambda fn, items: [fn(i) for i in items])
        run(band, list(range(0, h, band_rows)))
