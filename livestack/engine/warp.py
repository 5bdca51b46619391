"""Image + transform -> image on the stack grid, with NaN outside the frame's footprint (OpenCV).

cv2.warpAffine is ~25× faster than scipy.ndimage.affine_transform (0.03 s vs 0.8 s for a 24 MP plane,
bilinear). Pixels that map from outside the source come out NaN, so the footprint needs no second warp.
"""
from __future__ import annotations

import cv2
import numpy as np

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "lanczos": cv2.INTER_LANCZOS4}


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
