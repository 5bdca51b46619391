"""Sky offset, sky gradient and transparency: bring each frame to the reference's photometric scale.

    normalised_c(x, y) = (v_c(x, y) - P_c(x, y)) * scale + R_c(M(x, y))

``P_c`` is the frame's sky in channel c, modelled as a plane (offset + linear gradient: light pollution, moon and
twilight change both level and gradient during a night); ``R_c`` is the reference's sky plane, read at the
position ``M(x, y)`` the pixel lands on in the stack; ``scale`` is the transparency factor (grey: thin cloud,
haze, altitude) from matched star fluxes.  Planes stay planes under an affine map, so the whole correction is
one multiply and one plane per channel.
"""
from __future__ import annotations

import cv2
import numpy as np

from .debayer import colour_offsets


def _channel_planes(cfa: np.ndarray, pattern: str | None):
    """[(channel views, their (row, col) offset and step in CFA pixels)] for each output channel."""
    if pattern is None:
        return [[(cfa, 0, 0, 1)]]
    offs = colour_offsets(pattern)
    return [[(cfa[i::2, j::2], i, j, 2) for (i, j) in offs[ch]] for ch in "RGB"]


def sky_model(cfa: np.ndarray, pattern: str | None, *, cells: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Sky plane and background noise of each channel of a calibrated mosaic.

    Returns ``planes`` (C, 3) float64 — sky(x, y) = a0 + ax·x + ay·y in CFA pixel coordinates (x = column) — and
    ``noise`` (C,) float64, the per-pixel background σ in ADU.  C = 3 (R, G, B) or 1 (mono).
    The plane is a least-squares fit, with two rounds of 3σ clipping, to the medians of ``cells`` × ``cells``
    blocks (stars and small nebulae do not move a median).  The noise comes from differences of horizontally
    adjacent same-colour pixels (a gradient or a nebula does not count as noise), clipped at 4σ so stars do not
    either.  Both work on samples (~10⁵ pixels for the plane, ~10⁵ pixel pairs for the noise per channel
    view), so the cost does not grow with the frame: a few ms at 24 MP.
    """
    planes, noises = [], []
    for group in _channel_planes(cfa, pattern):
        xs, ys, vs, diffs = [], [], [], []
        for view, i, j, step in group:
            s = max(1, int(np.sqrt(view.size / 1e5)))          # sample every s-th row and column
            sub = view[::s, ::s]
            h, w = sub.shape
            bh, bw = max(1, h // cells), max(1, w // cells)
            gy, gx = h // bh, w // bw
            blocks = np.ascontiguousarray(sub[: gy * bh, : gx * bw]).reshape(gy, bh, gx, bw)
            med = np.median(blocks.transpose(0, 2, 1, 3).reshape(gy, gx, bh * bw), axis=2)
            cy = (np.arange(gy) * bh + (bh - 1) / 2.0) * s * step + i  # block centres in CFA pixel coords
            cx = (np.arange(gx) * bw + (bw - 1) / 2.0) * s * step + j
            X, Y = np.meshgrid(cx, cy)
            xs.append(X.ravel()), ys.append(Y.ravel()), vs.append(med.ravel())
            r = max(1, int(view.size / 1e5))  # every r-th full row: ~1e5 adjacent pairs
            diffs.append(np.diff(view[::r], axis=1).ravel())
        x, y, v = np.concatenate(xs), np.concatenate(ys), np.concatenate(vs).astype(np.float64)
        A = np.column_stack([np.ones_like(x), x, y])
        keep = np.ones(v.size, bool)
        coef = np.array([np.median(v), 0.0, 0.0])
        for _ in range(3):
            if keep.sum() < 4:
                break
            coef, *_ = np.linalg.lstsq(A[keep], v[keep], rcond=None)
            r = v - A @ coef
            s = 1.4826 * np.median(np.abs(r[keep])) + 1e-9
            keep = np.abs(r) < 3 * s
        planes.append(coef)
        noises.append(pair_noise(np.concatenate(diffs)))
    return np.array(planes), np.array(noises)


def pair_noise(d: np.ndarray) -> float:
    """Per-pixel σ from differences ``d`` of neighbouring pixels (σ√2 each), clipped at 4σ of their MAD so
    that stars do not count; gradients cancel in a difference."""
    d = np.asarray(d, np.float64)
    dev = np.abs(d - np.median(d))
    s0 = 1.4826 * np.median(dev) + 1e-12
    core = d[dev < 4 * s0]
    return float(core.std()) / np.sqrt(2.0) if core.size > 10 else s0 / np.sqrt(2.0)


def plane_on_grid(plane_cfa: np.ndarray, debayer: str | None) -> np.ndarray:
    """Plane coefficients (C, 3) in CFA pixel coordinates -> in the debayered image's pixel coordinates
    (superpixel: cell (i, j) is centred on CFA pixel (2i + 0.5, 2j + 0.5))."""
    p = np.array(plane_cfa, dtype=np.float64)
    return plane_halved(p) if debayer == "superpixel" else p


def plane_halved(plane: np.ndarray) -> np.ndarray:
    """Plane coefficients (C, 3) on a pixel grid -> on the grid of its 2×2 cells (cell i centred on 2i + 0.5)."""
    p = np.asarray(plane, dtype=np.float64).reshape(-1, 3)
    a0, ax, ay = p[:, 0], p[:, 1], p[:, 2]
    return np.column_stack([a0 + 0.5 * ax + 0.5 * ay, 2 * ax, 2 * ay])


def sky_level(plane: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """(C,) sky of each channel at the image centre."""
    h, w = shape_hw
    return plane[:, 0] + plane[:, 1] * (w - 1) / 2.0 + plane[:, 2] * (h - 1) / 2.0


def transparency_scale(ref_flux: np.ndarray, flux: np.ndarray, *, min_pairs: int = 3) -> float:
    """Median ratio ref_flux / flux over matched star pairs: the factor that brings the frame's stars to the
    reference's brightness (> 1 for a frame dimmed by cloud).  1.0 when fewer than ``min_pairs`` usable pairs."""
    ok = np.isfinite(ref_flux) & np.isfinite(flux) & (ref_flux > 0) & (flux > 0)
    if ok.sum() < min_pairs:
        return 1.0
    r = ref_flux[ok] / flux[ok]
    # Bright stars carry the information; the faintest third is noise-dominated.
    keep = max(min_pairs, int(np.ceil(ok.sum() * 2 / 3)))
    order = np.argsort(-ref_flux[ok])[:keep]
    return float(np.median(r[order]))


def normalize_inplace(img: np.ndarray, plane: np.ndarray, scale: float, ref_plane: np.ndarray,
                      matrix: np.ndarray, *, parallel_map=None, block_rows: int = 64) -> None:
    """Apply (v_c - P_c) * scale + R_c(M(x, y)) to a (C, H, W) float32 image in place (NaN stays NaN).

    ``plane``/``ref_plane``: (C, 3) coefficients in the image's / the stack's pixel coordinates; ``matrix``:
    (2, 3) image -> stack.  The combined offset is one plane per channel, added as a row term + a column term.
    Done in blocks of ``block_rows`` rows (all three steps while a block is in cache), by
    ``parallel_map(fn, items)`` when given (worker threads: 55 -> 24 ms at 24 MP on 2 cores).
    """
    _, h, w = img.shape
    n = Normalisation(plane, scale, ref_plane, matrix, (h, w))

    def block(r0: int) -> None:
        n.apply(img[:, r0:min(h, r0 + block_rows)], r0, 0)

    _by_blocks(block, h, block_rows, parallel_map)


class Normalisation:
    """normalize_inplace's offsets for an image of ``shape_hw``, to be applied to any window of it (render.py
    makes a superpixel frame a window at a time): the same arithmetic, so the same values."""

    def __init__(self, plane: np.ndarray, scale: float, ref_plane: np.ndarray, matrix: np.ndarray,
                 shape_hw: tuple[int, int]):
        h, w = shape_hw
        a, b, c = matrix[0]
        d, e, f = matrix[1]
        xs = np.arange(w, dtype=np.float64)
        ys = np.arange(h, dtype=np.float64)
        self.terms = []
        for ch in range(len(plane)):
            p0, px, py = plane[ch]
            r0, rx, ry = ref_plane[ch]
            # R(M(x, y)) - scale * P(x, y), expanded into const + kx * x + ky * y
            const = r0 + rx * c + ry * f - scale * p0
            kx = rx * a + ry * d - scale * px
            ky = rx * b + ry * e - scale * py
            self.terms.append(((const + ky * ys).astype(np.float32), (kx * xs).astype(np.float32)))
        self.scale = float(scale)

    def apply(self, x: np.ndarray, r0: int, c0: int) -> None:
        """Normalise ``x`` (C, n, m), the image's rows r0:r0 + n and columns c0:c0 + m, in place."""
        n, m = x.shape[1:]
        s = np.float32(self.scale)
        for ch, (rows, cols) in enumerate(self.terms):
            v = x[ch]
            if self.scale != 1.0:
                v *= s
            v += rows[r0:r0 + n, None]
            v += cols[None, c0:c0 + m]


def normalize_mosaic(cfa: np.ndarray, pattern: str | None, plane: np.ndarray, scale: float, ref_plane: np.ndarray,
                     matrix: np.ndarray, *, parallel_map=None, block_rows: int = 64) -> None:
    """normalize_inplace for an (H, W) mosaic, in place, before it is demosaiced: each sample by its own
    colour's planes (``plane``: (C, 3) in sensor pixels; ``ref_plane``: the stack's, in grid pixels;
    ``matrix``: sensor -> grid).  The offsets are linear in x and y for each colour, and the demosaics are
    exact on a linear gradient of each colour, so demosaicing after this gives the demosaiced image
    normalised, with a third of the work.  Mono (``pattern`` None): normalize_inplace.

    A row of the mosaic holds two colours, alternating: its offset is a column term plus the row's y times
    a per-column slope (each column its colour's), one pass of x·scale + offset over whole rows."""
    if pattern is None:
        return normalize_inplace(cfa[None], plane, scale, ref_plane, matrix, parallel_map=parallel_map,
                                 block_rows=block_rows)
    h, w = cfa.shape
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    xs = np.arange(w, dtype=np.float64)
    terms = []       # per row phase: the offset at y = 0 and its change per row, of each column
    for py in (0, 1):
        at0, per_row = np.empty(w), np.empty(w)
        for px in (0, 1):
            ch = "RGB".index(pattern[2 * py + px])
            p0, ppx, ppy = plane[ch]
            q0, qx, qy = ref_plane[ch]
            # R(M(x, y)) − scale·P(x, y) = const + kx·x + ky·y for this colour
            at0[px::2] = q0 + qx * c + qy * f - scale * p0 + (qx * a + qy * d - scale * ppx) * xs[px::2]
            per_row[px::2] = qx * b + qy * e - scale * ppy
        terms.append((at0.astype(np.float32), per_row.astype(np.float32)))
    block_rows += block_rows % 2

    def block(r0: int) -> None:
        r1 = min(h, r0 + block_rows)
        for py, (at0, per_row) in enumerate(terms):
            rows = cfa[r0 + py:r1:2]
            if len(rows):
                offset = np.arange(r0 + py, r1, 2, dtype=np.float32)[:, None] * per_row[None]
                offset += at0[None]
                cv2.scaleAdd(rows, float(scale), offset, dst=rows)

    _by_blocks(block, h, block_rows, parallel_map)


def _by_blocks(block, h: int, block_rows: int, parallel_map) -> None:
    """block(r0) for each block of ``block_rows`` rows of ``h``, on ``parallel_map``'s threads when given."""
    starts = list(range(0, h, block_rows))
    if parallel_map is not None:
        parallel_map(block, starts)
    else:
        for r0 in starts:
            block(r0)
