"""Image + transform -> image on the stack grid, with NaN outside the frame's footprint (OpenCV).

cv2.warpAffine is ~25× faster than scipy.ndimage.affine_transform (0.03 s vs 0.8 s for a 24 MP plane,
bilinear). Pixels that map from outside the source come out NaN, so the footprint needs no second warp.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import geometry

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "lanczos": cv2.INTER_LANCZOS4}
# How far (source px, per axis) each interpolation reads around the source position: its kernel's half-width.
REACH = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 4.0}


def warp(img: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int], *, interpolation: str = "bilinear",
         out: np.ndarray | None = None) -> np.ndarray:
    """Resample a (C, H, W) float32 image onto a stack grid of ``shape_hw``.

    ``matrix`` (2×3) maps the image's pixel coordinates to the grid's (forward map: OpenCV inverts it). Output
    (C, h, w) float32, NaN where the grid sees no data; written into ``out`` when given. ``img`` is unchanged.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{interpolation}' (known: {', '.join(INTERPOLATIONS)})")
    h, w = shape_hw
    if out is None:
        out = np.empty((img.shape[0], h, w), np.float32)
    m = np.asarray(matrix, np.float64)
    for c in range(img.shape[0]):
        cv2.warpAffine(img[c], m, (w, h), dst=out[c], flags=INTERPOLATIONS[interpolation],
                       borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    return out


def warp_mask(mask: np.ndarray, matrix: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Carry a bool (H, W) mask to the stack grid (a grid pixel is set when any source pixel near it is)."""
    h, w = shape_hw
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
