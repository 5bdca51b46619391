"""2-D affine transforms as (2, 3) float64 matrices, and least-squares fits of them to point pairs.

Conventions are those of ``frame.py``: points are (N, 2) arrays of (x = column, y = row), 0-based, pixel centres
at integers; a matrix ``[[a, b, c], [d, e, f]]`` maps ``(x, y)`` to ``(a x + b y + c, d x + e y + f)``.
Angles are in degrees and use ``[[cos, -sin], [sin, cos]]``: with y pointing down (image rows) a positive angle
turns the picture clockwise as displayed.

Every function returns a new float64 array and leaves its inputs unchanged.
"""
from __future__ import annotations

import math

import numpy as np


def identity() -> np.ndarray:
    """The (2, 3) float64 identity transform."""
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _check(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"a transform is a (2, 3) matrix, got shape {m.shape}")
    return m


def to3x3(m) -> np.ndarray:
    """(2, 3) -> (3, 3) homogeneous matrix with last row (0, 0, 1)."""
    m3 = np.zeros((3, 3))
    m3[:2] = _check(m)
    m3[2, 2] = 1.0
    return m3


def from3x3(m3) -> np.ndarray:
    """(3, 3) homogeneous affine matrix -> (2, 3). Raises ValueError if the last row is not (0, 0, 1)."""
    m3 = np.asarray(m3, dtype=np.float64)
    if m3.shape != (3, 3):
        raise ValueError(f"expected a (3, 3) matrix, got shape {m3.shape}")
    if not np.allclose(m3[2], (0.0, 0.0, 1.0), rtol=0.0, atol=1e-9):
        raise ValueError(f"last row {m3[2].tolist()} is not (0, 0, 1): not an affine transform")
    return m3[:2].copy()


def compose(outer, inner) -> np.ndarray:
    """The transform x -> outer(inner(x)), e.g. compose(frame_to_stack, raw_to_frame)."""
    o, i = _check(outer), _check(inner)
    out = np.empty((2, 3))
    out[:, :2] = o[:, :2] @ i[:, :2]
    out[:, 2] = o[:, :2] @ i[:, 2] + o[:, 2]
    return out


def invert(m) -> np.ndarray:
    """Inverse transform. Raises ValueError for a singular (zero-area) matrix."""
    m = _check(m)
    a = m[:, :2]
    det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
    # Relative to the matrix's size, so a legitimately tiny scale (e.g. 1e-3 px/px) is still invertible.
    if not np.isfinite(det) or abs(det) <= 1e-12 * max(float(np.abs(a).max()) ** 2, 1e-300):
        raise ValueError(f"transform is singular (determinant {det:.3g}); cannot invert")
    ainv = np.array([[a[1, 1], -a[0, 1]], [-a[1, 0], a[0, 0]]]) / det
    out = np.empty((2, 3))
    out[:, :2] = ainv
    out[:, 2] = -ainv @ m[:, 2]
    return out


def apply(m, xy: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through ``m``; returns (N, 2) float64. A single (2,) point gives a (2,) result."""
    m = _check(m)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape[-1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {xy.shape}")
    return xy @ m[:, :2].T + m[:, 2]


def similarity(scale, angle_deg, tx, ty, *, center=(0.0, 0.0)) -> np.ndarray:
    """Rotate by ``angle_deg`` and scale by ``scale`` about ``center``, then shift by (tx, ty).

    The centre therefore lands on ``center + (tx, ty)``; ``decompose(m, center=center)`` gives the values back.
    """
    th = math.radians(angle_deg)
    c, s = scale * math.cos(th), scale * math.sin(th)
    cx, cy = float(center[0]), float(center[1])
    return np.array([
        [c, -s, cx - (c * cx - s * cy) + tx],
        [s, c, cy - (s * cx + c * cy) + ty],
    ])


def halved(m) -> np.ndarray:
    """The same transform between the grids of 2×2 cells (cell i centred on pixel 2i + 0.5, both sides)."""
    m = _check(m)
    out = m.copy()
    out[:, 2] = (m[:, :2] @ [0.5, 0.5] + m[:, 2] - 0.5) / 2.0
    return out


def decompose(m, *, center=(0.0, 0.0)) -> tuple[float, float, float, float]:
    """(dx, dy, rotation_deg, scale) of a transform, seen from ``center``.

    dx, dy:   where the centre moves, px (``apply(m, center) - center``).
    rotation: degrees in (-180, 180], the rotation closest to the linear part (exact for a similarity).
    scale:    sqrt(|det|), the mean linear scale (exact for a similarity).
    """
    m = _check(m)
    cx, cy = float(center[0]), float(center[1])
    moved = apply(m, np.array([cx, cy]))
    a, b, d, e = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
    # atan2 of the antisymmetric / symmetric parts: the polar decomposition's angle in 2-D.
    rot = math.degrees(math.atan2(d - b, a + e))
    if rot <= -180.0:
        rot += 360.0
    scale = math.sqrt(abs(a * e - b * d))
    return float(moved[0] - cx), float(moved[1] - cy), rot, scale


def _pairs(src, dst, weights, need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"src and dst must both be (N, 2), got {src.shape} and {dst.shape}")
    if src.shape[0] < need:
        raise ValueError(f"{src.shape[0]} point pairs: need at least {need}")
    if weights is None:
        w = np.ones(src.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (src.shape[0],) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be (N,) = ({src.shape[0]},), finite, >= 0 and not all zero")
    return src, dst, w / w.sum()


def fit_affine(src, dst, *, weights=None) -> np.ndarray:
    """Weighted least-squares affine transform mapping (N, 2) ``src`` onto (N, 2) ``dst``, N >= 3.

    weights: (N,) >= 0, proportional to 1 / variance of each pair. Raises ValueError when the points with
    weight are collinear (the affine is then undetermined).
    """
    src, dst, w = _pairs(src, dst, weights, 3)
    # Centring on the weighted means keeps the normal equations well conditioned for coordinates ~ 1e3-1e4 px.
    ms, md = w @ src, w @ dst
    s, d = src - ms, dst - md
    sw = s * np.sqrt(w)[:, None]
    dw = d * np.sqrt(w)[:, None]
    sv = np.linalg.svd(sw, compute_uv=False)
    if sv[0] == 0.0 or sv[1] <= 1e-9 * sv[0]:
        raise ValueError("points are collinear (or coincide): an affine transform is undetermined")
    lin, *_ = np.linalg.lstsq(sw, dw, rcond=None)   # (2, 2): d = s @ lin
    out = np.empty((2, 3))
    out[:, :2] = lin.T
    out[:, 2] = md - lin.T @ ms
    return out


def fit_similarity(src, dst, *, weights=None) -> np.ndarray:
    """Weighted least-squares rotation + uniform scale + shift mapping ``src`` onto ``dst``, N >= 2; never a
    reflection.

    This is Umeyama's solution restricted to det > 0, which in 2-D is the closed form over complex numbers
    z = x + i y: dst ~ a src + t with a = sum(w conj(s) d) / sum(w |s|^2) on centred points. Raises ValueError
    when all weighted src points coincide.
    """
    src, dst, w = _pairs(src, dst, weights, 2)
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    ms, md = w @ zs, w @ zd
    s, d = zs - ms, zd - md
    den = float(w @ (s.real ** 2 + s.imag ** 2))
    if den <= 0.0:
        raise ValueError("source points coincide: a similarity transform is undetermined")
    a = (w @ (np.conj(s) * d)) / den
    t = md - a * ms
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]])


def rms_error(m_est, m_true, shape_hw) -> float:
    """RMS distance (px) between where two transforms send the points of an (H, W) image.

    The registration accuracy metric. Uses a 21 x 21 grid spanning pixel centres (0, 0) .. (W-1, H-1): the
    error of an affine is affine in position, so a grid this fine is within 1 % of the continuous RMS.
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    gx, gy = np.meshgrid(np.linspace(0.0, w - 1.0, 21), np.linspace(0.0, h - 1.0, 21))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    diff = apply(m_est, pts) - apply(m_true, pts)
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))
