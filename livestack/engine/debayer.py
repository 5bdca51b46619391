"""Calibrated CFA (H, W) -> linear colour (3, H, W) or (3, H/2, W/2); mono passes through as (1, H, W).

OpenCV's demosaicing takes only 8/16-bit integers, and calibrated data is float (fractions, negatives after dark
subtraction), so bilinear interpolation is written as three float32 convolutions of the sparse colour planes —
exactly bilinear, and as fast as cv2.cvtColor on the integer data.
"""
from __future__ import annotations

import cv2
import numpy as np

DEBAYER_METHODS = ("bilinear", "superpixel")

# Bilinear demosaicing kernels: on a plane that holds one colour's samples and zeros elsewhere, these average the
# nearest samples of that colour (R/B: 1, 2 or 4 of them; G: 1 or 4).
_K_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
_K_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4


def colour_offsets(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """{'R': [(row, col)], 'G': [(r, c), (r, c)], 'B': [(r, c)]} offsets inside the 2×2 cell."""
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for k, ch in enumerate(pattern):
        out[ch].append((k // 2, k % 2))
    return out


def debayer(cfa: np.ndarray, pattern: str | None, method: str = "bilinear", *,
            out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Return float32 (3, H, W) [R, G, B] (bilinear), (3, H//2, W//2) (superpixel) or (1, H, W) for mono.

    Allocates the output (3 planes for colour) and one temporary plane unless ``out``/``scratch`` (float32 of
    the right shapes, reused across frames: first-touch page faults of a fresh 24 MP plane cost more than the
    convolution) are given; ``cfa`` is not modified.
    Reflecting borders (BORDER_REFLECT_101) keep the CFA phase, so edge pixels are interpolated correctly.
    """
    if pattern is None:
        return cfa[None].astype(np.float32, copy=False)
    if method not in DEBAYER_METHODS:
        raise ValueError(f"unknown debayer method '{method}' (known: {', '.join(DEBAYER_METHODS)})")
    offs = colour_offsets(pattern)
    if method == "superpixel":
        h, w = cfa.shape[0] // 2 * 2, cfa.shape[1] // 2 * 2
        if out is None:
            out = np.empty((3, h // 2, w // 2), np.float32)
        for c, ch in enumerate("RGB"):
            (i, j), *rest = offs[ch]
            out[c] = cfa[i:h:2, j:w:2]
            for (i2, j2) in rest:
                out[c] += cfa[i2:h:2, j2:w:2]
            if rest:
                out[c] *= np.float32(1.0 / (1 + len(rest)))
        return out
    if out is None:
        out = np.empty((3,) + cfa.shape, np.float32)
    sparse = scratch if scratch is not None else np.empty_like(out[0])
    sparse.fill(0)
    previous: list[tuple[int, int]] = []
    for ch in "RBG":    # one fill; then only the previous colour's samples are zeroed (a quarter of the plane)
        for (i, j) in previous:
            sparse[i::2, j::2] = 0
        for (i, j) in offs[ch]:
            sparse[i::2, j::2] = cfa[i::2, j::2]
        cv2.filter2D(sparse, -1, _K_G if ch == "G" else _K_RB, dst=out["RGB".index(ch)],
                     borderType=cv2.BORDER_REFLECT_101)
        previous = offs[ch]
    return out


def debayer_mask(mask: np.ndarray | None, pattern: str | None, method: str = "bilinear") -> np.ndarray | None:
    """Carry a CFA-level bool mask (e.g. saturation) to the debayered grid: a pixel is flagged when any CFA
    sample that feeds it is flagged (3×3 neighbourhood for bilinear, the 2×2 cell for superpixel)."""
    if mask is None or pattern is None:
        return mask
    if method == "superpixel":
        h, w = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
        return mask[0:h:2, 0:w:2] | mask[0:h:2, 1:w:2] | mask[1:h:2, 0:w:2] | mask[1:h:2, 1:w:2]
    return cv2.dilate(mask.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def bin2x2_mean(cfa: np.ndarray) -> np.ndarray:
    """Mean of each 2×2 cell: for a Bayer mosaic a luminance ((R + 2G + B) / 4) at half resolution.
    Returns float32 (H//2, W//2) (an odd last row or column is dropped); ``cfa`` is not modified.
    OpenCV's area resize computes exactly this in one pass (4× faster than four strided numpy adds)."""
    h, w = cfa.shape[0] // 2 * 2, cfa.shape[1] // 2 * 2
    return cv2.resize(cfa[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
