"""Image + transform -> image on the stack grid, with NaN outside the frame's footprint (OpenCV).

cv2.warpAffine is ~25× faster than scipy.ndimage.affine_transform (0.03 s vs 0.8 s for a 24 MP plane,
bilinear).  The footprint — the grid pixels that get a value — is computed here from the matrix and the
kernel's reach, not left to OpenCV's border handling: with a NaN border OpenCV's bicubic and Lanczos warps leave
NaN bands whose width depends on its SIMD code (on x86-64, OpenCV 4.x/5.0: 8 px on the left edge of a bicubic
warp where the kernel reaches 1; narrower on aarch64), so the same frames would give other edges on a Pi.  The
source is read with a replicated border (never NaN) and every grid pixel whose kernel would reach outside the
source is set to NaN: the same pixels on every platform, and 1–3 px of margin instead of up to 8.

"compensated": a bilinear warp of the source after a 3-tap sharpening [−a, 1 + 2a, −a] along each source axis.
A bilinear read at fraction t is the 2-tap kernel [1 − t, t], whose variance t(1 − t) is the blur it adds
(1/6 px² on average: a star 3 px wide comes out ~5 % wider); with a = t(1 − t)/2 the two kernels together are
Keys' cubic convolution (a = −½) at that t, tap for tap (their 4 taps have the same sum and first two moments).
``compensation`` picks a from the fractions the warp reads — exact for a shift, their mean when a rotation sweeps
them — so a stack of dithered frames is as sharp as with OpenCV's bicubic warp (README, warp step) for a
separable 3×3 filter (0.04–0.06 s per 24 MP plane, one thread) instead of a 4×4 kernel at every pixel
(OpenCV's bicubic: +0.07–0.11 s a plane over its bilinear).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from . import geometry

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "compensated": cv2.INTER_LINEAR,
                  "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}
# How far (source px, per axis) each interpolation reads around the source position: its kernel's half-width
# (compensated: the sharpening's 1 px and then the bilinear read's).
REACH = {"nearest": 0.5, "bilinear": 1.0, "compensated": 2.0, "bicubic": 2.0, "lanczos": 4.0}
# Interpolations whose kernel has negative lobes, clamped from below (clamp_below): a star clipped at the
# sensor's white level rings to a dark halo of −250 ADU on a sky of 500 (noise 10) after a bicubic or Lanczos
# warp; Siril clamps its bicubic and Lanczos-4 for the same reason.  (The compensated warp's mild sharpening rings
# by −50 there: left as it is, the default's cost counts.)
CLAMPED = frozenset({"bicubic", "lanczos"})
_K2 = np.ones((2, 2), np.uint8)
# OpenCV rounds source positions to 1/32 px (INTER_BITS = 5) before it picks the kernel's taps: a position just
# below the upper limit can be rounded onto it, and Lanczos's table then gives the tap beyond the edge a weight
# of ~1e-8 (not 0): the footprint keeps this much more away from the upper limit.
TAP_ROUNDING = 1.0 / 32


def footprint_rows(matrix: np.ndarray, src_hw: tuple[int, int], shape_hw: tuple[int, int], *,
                   reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Per grid row, the half-open range [x0, x1) of grid columns that a warp by ``matrix`` (source px -> grid
    px) fills from a (H, W) = ``src_hw`` source without reaching outside it.

    A grid pixel X is inside when its source position s = M⁻¹(X) has every tap of the kernel on the source on
    both axes: reach − 1 ≤ s < size − reach − 1/32 (bilinear: 0 ≤ s < W − 1; bicubic, taps ⌊s⌋−1 … ⌊s⌋+2:
    1 ≤ s < W − 2; Lanczos-4: 3 ≤ s < W − 4; less TAP_ROUNDING at the top).  Exact geometry in float64,
    independent of OpenCV's border handling.  The
    footprint of an affine map is convex, so each row's is one range.  Returns two (h,) int64 arrays,
    0 ≤ x0 ≤ x1 ≤ w (x0 == x1: the row is empty)."""
    h, w = shape_hw
    inv = geometry.invert(matrix)
    y = np.arange(h, dtype=np.float64)
    x0 = np.zeros(h, np.float64)
    x1 = np.full(h, float(w))
    for axis, size in ((0, src_hw[1]), (1, src_hw[0])):
        a, b, c = (float(v) for v in inv[axis])      # s = a·x + b·y + c along this source axis
        lo, hi = reach - 1.0, size - reach - TAP_ROUNDING
        off = b * y + c
        if a > 0:       # lo ≤ a·x + off < hi
            np.maximum(x0, np.ceil((lo - off) / a), out=x0)
            np.minimum(x1, np.ceil((hi - off) / a), out=x1)
        elif a < 0:
            np.maximum(x0, np.floor((hi - off) / a) + 1, out=x0)
            np.minimum(x1, np.floor((lo - off) / a) + 1, out=x1)
        else:           # this axis does not change along a row: the whole row is in or out
            x1[(off < lo) | (off >= hi)] = 0
    x0 = np.clip(x0, 0, w).astype(np.int64)
    x1 = np.clip(x1, 0, w).astype(np.int64)
    return x0, np.maximum(x1, x0)


def _ranges(n: np.ndarray) -> np.ndarray:
    """Concatenated arange(n_i) for each count n_i."""
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


def outside_index(x0: np.ndarray, x1: np.ndarray, w: int) -> np.ndarray:
    """Flat (row-major) indices of the pixels outside each row's [x0, x1) in an (h, w) plane: work in the
    number of edge pixels (a few per row), not in the pixels of the plane."""
    start = np.arange(len(x0), dtype=np.int64) * w
    left, right = x0, w - x1
    return np.concatenate([np.repeat(start, left) + _ranges(left),
                           np.repeat(start + x1, right) + _ranges(right)])


def compensation(inv: np.ndarray, cols: tuple[int, int], rows: tuple[int, int]) -> tuple[float, float]:
    """The compensated warp's (a_x, a_y) for the grid pixels in ``cols`` × ``rows`` (half-open ranges): half
    the mean t(1 − t) of the fractions t of their source positions along each source axis (``inv``: grid px
    -> source px).  Exact for a shift, a flip or a quarter turn (one fraction); the fractions' mean when a
    rotation or scale sweeps them across the range.

    At integer grid pixels a source coordinate s = a·X + b·Y + c has the fraction of (a − [a])·X + (b − [b])·Y
    + c ([·]: the nearest integer), which drifts slowly: along each of 5 rows of the range it is averaged as a
    continuous sweep, from the integral of t(1 − t) (1/6 a period).  Plain float arithmetic: this runs for every
    block of every frame (~400 squares of a rotated 24 MP frame), ~10 µs."""
    out = []
    y0, y1 = rows[0], rows[1] - 1
    x0, x1 = cols[0], cols[1] - 1
    for k in (0, 1):
        a, b, c = (float(v) for v in inv[k])
        a, b = a - round(a), b - round(b)
        total = 0.0
        for i in range(5):
            y = y0 + (y1 - y0) * i / 4
            u0, u1 = a * x0 + b * y + c, a * x1 + b * y + c
            if abs(u1 - u0) < 1e-9:
                t = u0 - math.floor(u0)
                total += t * (1 - t)
            else:
                total += (_sweep(u1) - _sweep(u0)) / (u1 - u0)
        out.append(total / 10)
    return out[0], out[1]


def _sweep(u: float) -> float:
    """∫₀ᵘ t(1 − t) dv with t = v − ⌊v⌋."""
    n = math.floor(u)
    t = u - n
    return n / 6 + t * t / 2 - t * t * t / 3


def sharpen(plane: np.ndarray, a: tuple[float, float], out: np.ndarray) -> np.ndarray:
    """``plane`` filtered by [−a_x, 1 + 2a_x, −a_x] along rows and [−a_y, 1 + 2a_y, −a_y] along columns into
    ``out`` (may be ``plane``).  The border is reflected; a compensated warp's footprint never reads it."""
    kx = np.array([-a[0], 1 + 2 * a[0], -a[0]], np.float32)
    ky = np.array([-a[1], 1 + 2 * a[1], -a[1]], np.float32)
    return cv2.sepFilter2D(plane, -1, kx, ky, dst=out, borderType=cv2.BORDER_REFLECT_101)


def clamp_below(src: np.ndarray, matrix: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Raise each pixel of ``dst`` — ``src`` (H, W) warped by ``matrix`` (source px -> dst px) — to the least of
    the 2×2 source pixels around its source position (the samples it lies between: a bilinear read's), where
    it is below them: the dark ring a kernel with negative lobes leaves beside a bright star goes, a peak
    between samples stays (stars keep their width).  In pure noise it lifts the few values that undershoot
    all four samples: +0.03 σ on the background's mean for OpenCV's bicubic, +0.1 σ for Lanczos-4 (a simulated
    sky of 500 ± 10 ADU).  NaN stays NaN.  Returns ``dst``."""
    lo = cv2.erode(src, _K2, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)    # min of [y, y+1] × [x, x+1]
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    inv[:, 2] -= 0.5                    # a nearest read at s − ½ is the pixel at ⌊s⌋: the 2×2 block's corner
    floor = np.empty(dst.shape, np.float32)
    cv2.warpAffine(lo, inv, (dst.shape[1], dst.shape[0]), dst=floor, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                   borderMode=cv2.BORDER_REPLICATE)
    np.copyto(dst, floor, where=floor > dst)
    return dst


def warp(img: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int], *, interpolation: str = "bilinear",
         out: np.ndarray | None = None) -> np.ndarray:
    """Resample a (C, H, W) float32 image onto a stack grid of ``shape_hw``.

    ``matrix`` (2×3) maps the image's pixel coordinates to the grid's (forward map: OpenCV inverts it).  Output
    (C, h, w) float32, NaN outside the footprint (footprint_rows(): where the kernel would read outside the
    image), finite inside it when ``img`` is; bicubic and Lanczos clamped from below (clamp_below); written
    into ``out`` when given.  ``img`` is unchanged.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{interpolation}' (known: {', '.join(INTERPOLATIONS)})")
    h, w = shape_hw
    if out is None:
        out = np.empty((img.shape[0], h, w), np.float32)
    m = np.asarray(matrix, np.float64)
    a = compensation(geometry.invert(m), (0, w), (0, h)) if interpolation == "compensated" else None
    # The replicated border only feeds pixels that are set to NaN below (and taps of zero weight).
    for c in range(img.shape[0]):
        src = img[c] if a is None else sharpen(img[c], a, np.empty_like(img[c], np.float32))
        cv2.warpAffine(src, m, (w, h), dst=out[c], flags=INTERPOLATIONS[interpolation],
                       borderMode=cv2.BORDER_REPLICATE)
        if interpolation in CLAMPED:
            clamp_below(src, m, out[c])
    x0, x1 = footprint_rows(m, img.shape[1:], (h, w), reach=REACH[interpolation])
    idx = outside_index(x0, x1, w)
    if len(idx):
        for c in range(img.shape[0]):
            out[c].reshape(-1)[idx] = np.float32(np.nan)   # out[c] is C-contiguous: reshape is a view
    return out

def warp_mask(mask: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int], *, reach: float = 1.0) -> np.ndarray:
    """Carry a bool (H, W) mask to the stack grid (a grid pixel is set when any source pixel near it is): within
    ``reach`` source px on both axes, warp_points()' rule — the bilinear read's own 1 px, and a wider kernel's
    (bicubic, compensated: 2) by growing the mask first."""
    h, w = shape_hw
    grow = math.ceil(reach) - 1
    if grow > 0:
        mask = cv2.dilate(mask.view(np.uint8), np.ones((2 * grow + 1,) * 2, np.uint8)).view(bool)
    src = mask.astype(np.uint8) * np.uint8(255)  # 0/1 would round fractional contributions down to 0
    m = cv2.warpAffine(src, np.asarray(matrix, np.float64), (w, h), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return m > 0


def warp_points(rows: np.ndarray, cols: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int], *,
                reach: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The grid pixels whose value a warp reads from within ``reach`` source pixels of the given points.

    A grid pixel X is returned when its source position s = M⁻¹(X) lies within ``reach`` of a point q on both
    axes (|s − q| < reach): reach 1 is warp_mask()'s rule for a bilinear warp (a tap of non-zero weight is
    flagged); reach 2 also covers a bilinear debayer before it (each CFA sample feeds its 3×3 neighbourhood).
    For a few points this is far cheaper than warping a whole mask: work in the number of points, not pixels.
    Returns (rows, cols) int32 arrays, possibly with repeats.
    """
    h, w = shape_hw
    m = np.asarray(matrix, np.float64)
    q = np.column_stack([np.asarray(cols, np.float64), np.asarray(rows, np.float64)])
    centre = geometry.apply(m, q)                            # where the points land on the grid
    ext = reach * np.abs(m[:, :2]).sum(axis=1)               # the image of the ±reach square, per axis
    n = np.ceil(2 * ext).astype(int) + 1
    lo = np.floor(centre - ext).astype(np.int64) + 1         # first integer strictly inside, per point
    ox, oy = np.meshgrid(np.arange(n[0]), np.arange(n[1]))
    gx = (lo[:, 0:1] + ox.ravel()[None]).ravel()
    gy = (lo[:, 1:2] + oy.ravel()[None]).ravel()
    s = geometry.apply(geometry.invert(m), np.column_stack([gx, gy]))   # their source positions
    far = np.abs(s - np.repeat(q, ox.size, axis=0)).max(axis=1)
    keep = (far < reach) & (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)
    return gy[keep].astype(np.int32), gx[keep].astype(np.int32)
