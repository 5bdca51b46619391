"""Frame + masters -> calibrated CFA (float32, black/bias removed, flat-fielded, bad pixels replaced).

Everything happens on the mosaic before debayering, and each CFA colour is treated as its own plane so that
hot-pixel replacement and flat normalisation never mix colours.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .frame import Frame


@dataclass(frozen=True, slots=True)
class CosmeticParams:
    enabled: bool = True
    sigma: float = 6.0    # a hot pixel stands this many × the plane's noise above its same-colour median
    ratio: float = 4.0    # … and this many × higher than its brightest same-colour neighbour (stars are not)

    def __post_init__(self):
        if self.sigma <= 0 or self.ratio <= 1:
            raise ValueError(f"cosmetic: sigma must be > 0 and ratio > 1 (got {self.sigma}, {self.ratio})")


@dataclass(slots=True)
class Masters:
    """Masters chosen for one light frame (all optional), in ADU on the light's CFA grid.

    bias: (H, W) float32 including the pedestal; dark: (H, W) float32 master dark *including* bias, taken with
    ``dark_exptime``; flat: (H, W) float32 normalised per CFA colour to mean 1; bad: (H, W) bool bad-pixel map.
    """

    bias: np.ndarray | None = None
    dark: np.ndarray | None = None
    dark_exptime: float | None = None
    flat: np.ndarray | None = None
    bad: np.ndarray | None = None
    names: dict = field(default_factory=dict)   # which files were used, for frames.jsonl and the header
    notes: dict = field(default_factory=dict)   # copied into calibrate()'s info: e.g. {"dark_skipped": reason}


def same_exposure(t: float | None, t_dark: float | None) -> bool:
    """True when a dark of ``t_dark`` s is used as is for ``t`` s (no scaling): equal within 0.1 %, or both
    unknown."""
    if t is None or t_dark is None:
        return t is None and t_dark is None
    return abs(t - t_dark) <= 1e-3 * max(t, t_dark, 1e-3)


def calibrate(frame: Frame, masters: Masters | None, cosmetic: CosmeticParams) -> tuple[np.ndarray, dict]:
    """Return the calibrated (H, W) float32 mosaic and a dict saying what was applied.

    Allocates one (H, W) float32 plane (a copy of ``frame.data``); ``frame`` is not modified.
    Without masters the per-channel black level is removed and hot pixels are corrected cosmetically.
    """
    img = frame.data.astype(np.float32, copy=True)
    info: dict = {}
    m = masters or Masters()
    if m.dark is not None:
        t, td = frame.meta.exptime, m.dark_exptime
        if t and td and not same_exposure(t, td) and (m.bias is not None or frame.black.any()):
            # Thermal signal scales with exposure: dark(t) = bias + (dark(td) - bias) * t / td.  Without a
            # master bias the file's black level stands in for it (LibRaw's, or FITS BLKLEVEL).
            k = np.float32(t / td)
            base = m.bias if m.bias is not None else _black_plane(frame)
            img -= base
            thermal = m.dark - base          # one (H, W) float32 temporary
            thermal *= k
            img -= thermal
            del thermal
            info["dark_scaled"] = float(f"{t / td:.6g}")
            if m.bias is not None:
                info["bias"] = m.names.get("bias", True)
            else:
                info["dark_base"] = "black level"
        else:
            img -= m.dark
            if t and td and not same_exposure(t, td):
                info["dark_unscaled"] = f"dark of {td:g} s used for {t:g} s: no bias or black level to scale it"
        info["dark"] = m.names.get("dark", True)
    elif m.bias is not None:
        img -= m.bias
        info["bias"] = m.names.get("bias", True)
    else:
        img -= _black_plane(frame)
    if m.flat is not None:
        img /= m.flat
        info["flat"] = m.names.get("flat", True)
    if m.bad is not None:
        replace_from_neighbours(img, m.bad, colour=frame.is_color)
        info["bad_pixels"] = int(m.bad.sum())
    if cosmetic.enabled:
        info["hot_pixels"] = cosmetic_correct(img, cosmetic, colour=frame.is_color)
    info.update(m.notes)
    return img, info


def _black_plane(frame: Frame) -> np.ndarray:
    """(H, W) float32 black level of each pixel, from the (2, 2) per-CFA-position levels."""
    h, w = frame.shape
    return np.tile(frame.black.astype(np.float32), (h // 2 + 1, w // 2 + 1))[:h, :w]


def _planes(shape: tuple[int, int], colour: bool):
    """Slices selecting each same-colour plane of a mosaic (one plane for mono)."""
    if not colour:
        return [(slice(None), slice(None))]
    return [(slice(i, None, 2), slice(j, None, 2)) for i in range(2) for j in range(2)]


_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8)


def cosmetic_correct(img: np.ndarray, p: CosmeticParams, *, colour: bool) -> int:
    """Replace isolated hot pixels in place by the median of their same-colour neighbours; return the count.

    A pixel is hot when it stands ``p.sigma`` × noise above the 3×3 same-colour median *and* ``p.ratio`` × above
    its brightest same-colour neighbour (both relative to that median): even an undersampled star spills light
    into its neighbours; a hot pixel or a cosmic-ray hit does not.
    """
    count = 0
    for sl in _planes(img.shape, colour):
        plane = np.ascontiguousarray(img[sl])
        med = cv2.medianBlur(plane, 3)
        nbmax = cv2.dilate(plane, _RING)
        d = plane - med
        sample = d[::7, ::7]
        sigma = 1.4826 * float(np.median(np.abs(sample - np.median(sample)))) or float(np.std(sample)) or 1.0
        hot = (d > p.sigma * sigma) & (d > p.ratio * (nbmax - med))
        n = int(hot.sum())
        if n:
            plane[hot] = med[hot]
            img[sl] = plane
        count += n
    return count


def replace_from_neighbours(img: np.ndarray, bad: np.ndarray, *, colour: bool) -> None:
    """Replace pixels flagged in ``bad`` in place by the median of their same-colour 3×3 neighbourhood."""
    for sl in _planes(img.shape, colour):
        mask = bad[sl]
        if not mask.any():
            continue
        plane = np.ascontiguousarray(img[sl])
        # Isolated bad pixels take the 3×3 same-colour median; in a cluster (≥ 3 bad neighbours) bad values
        # could dominate that median, so they take the 5×5 one.
        crowded = cv2.filter2D(mask.astype(np.float32), -1, _RING.astype(np.float32)) >= 3
        fill = np.where(crowded, cv2.medianBlur(plane, 5), cv2.medianBlur(plane, 3))
        plane[mask] = fill[mask]
        img[sl] = plane
