"""Calibrated CFA (H, W) -> linear colour (3, H, W) or (3, H/2, W/2); mono passes through as (1, H, W).

OpenCV's demosaicing takes only 8/16-bit integers, and calibrated data is float (fractions, negatives after dark
subtraction), so the full-resolution methods are written as float32 convolutions:

- bilinear: the nearest samples of each colour averaged — four 3×3 kernels on the mosaic, each kept at the
  sites it is for, as MHC's are.  Each output pixel averages its 3×3 neighbourhood: an undersampled star is
  widened.
- mhc: Malvar, He & Cutler, "High-quality linear interpolation for demosaicing of Bayer-patterned color images"
  (ICASSP 2004): bilinear plus a correction by the Laplacian of the colour sampled at the pixel (the other
  colours' detail is assumed to follow it), four fixed 5×5 kernels applied to the whole mosaic.  Still linear,
  exact on flat fields and linear gradients of each colour; stars come out tighter (README, debayer step).
"""
from __future__ import annotations

import cv2
import numpy as np

DEBAYER_METHODS = ("bilinear", "mhc", "superpixel")

# Malvar-He-Cutler kernels (the paper's coefficients), applied to the whole mosaic; each is used at the sites
# named.  Weights on the colour wanted sum to 1, on the colour sampled at the centre to 0 (a Laplacian: zero on
# flat and linear signals); all are multiples of 1/16, so flat fields come out exact in float32.
_MHC_G = np.array([[0, 0, -1, 0, 0],          # G at R and B sites
                   [0, 0, 2, 0, 0],
                   [-1, 2, 4, 2, -1],
                   [0, 0, 2, 0, 0],
                   [0, 0, -1, 0, 0]], np.float32) / 8
_MHC_ROW = np.array([[0, 0, 0.5, 0, 0],       # at a G site, the colour left and right of it (R in an R row)
                     [0, -1, 0, -1, 0],
                     [-1, 4, 5, 4, -1],
                     [0, -1, 0, -1, 0],
                     [0, 0, 0.5, 0, 0]], np.float32) / 8
_MHC_COL = np.ascontiguousarray(_MHC_ROW.T)   # at a G site, the colour above and below it
_MHC_DIAG = np.array([[0, 0, -1.5, 0, 0],     # R at B sites, B at R sites
                      [0, 2, 0, 2, 0],
                      [-1.5, 0, 6, 0, -1.5],
                      [0, 2, 0, 2, 0],
                      [0, 0, -1.5, 0, 0]], np.float32) / 8
# How far a CFA sample reaches in the output, per axis (px): the kernels' half-widths.
REACH = {"bilinear": 1, "mhc": 2}


def colour_offsets(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """{'R': [(row, col)], 'G': [(r, c), (r, c)], 'B': [(r, c)]} offsets inside the 2×2 cell."""
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for k, ch in enumerate(pattern):
        out[ch].append((k // 2, k % 2))
    return out


def debayer(cfa: np.ndarray, pattern: str | None, method: str = "bilinear", *,
            out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Return float32 (3, H, W) [R, G, B] (bilinear, mhc), (3, H//2, W//2) (superpixel) or (1, H, W) for mono.

    Allocates the output (3 planes for colour) unless ``out`` (float32 of the right shape, reused across frames:
    first-touch page faults of a fresh 24 MP plane cost more than the convolution) is given; ``cfa`` is not
    modified.  The full-resolution methods work in bands of BAND_ROWS rows with band-sized temporaries (~7 MB
    at 6000 px wide), so ``scratch`` is not used (it is accepted from callers that still pass a plane).
    Reflecting borders (BORDER_REFLECT_101) keep the CFA phase, so edge pixels are interpolated correctly.
    (The pipeline demosaics a window at a time: debayer_window.)
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
    tmp = np.empty((4, BAND_ROWS + 2 * REACH[method], cfa.shape[1]), np.float32)   # shared by the bands
    for r0 in range(0, cfa.shape[0], BAND_ROWS):
        r1 = min(cfa.shape[0], r0 + BAND_ROWS)
        _BANDS[method](cfa, r0, r1, offs, out[:, r0:r1], tmp)
    return out


# Rows per band (even: a band starts on the CFA's first row phase).  A band's source rows, the kernels' results
# and its output rows stay in the cache while the colour sites are picked from them: 2.5× less CPU at 24 MP
# than four full-plane convolutions and strided copies through memory (Xeon, one thread).
BAND_ROWS = 64


def _filtered(cfa: np.ndarray, r0: int, r1: int, reach: int, kernels, tmp: np.ndarray) -> list[np.ndarray]:
    """Rows r0:r1 of cfa convolved with each kernel (views into ``tmp``).  Each convolution reads the band
    and ``reach`` rows either side (reflected only at the mosaic's own edges), so its rows are exactly those
    of the whole mosaic's convolution."""
    a, e = max(0, r0 - reach), min(cfa.shape[0], r1 + reach)
    src, o = cfa[a:e], r0 - a
    res = []
    for k, kernel in enumerate(kernels):
        cv2.filter2D(src, -1, kernel, dst=tmp[k, : e - a], borderType=cv2.BORDER_REFLECT_101)
        res.append(tmp[k, o:o + r1 - r0])
    return res


def _mhc_band(cfa: np.ndarray, r0: int, r1: int, offs: dict, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Malvar-He-Cutler for rows r0:r1 (r0 even): four 5×5 convolutions, each kept at the sites it is for (a
    quarter or half of the plane), and the samples copied at their own sites.  ``out`` as _sites_band's."""
    return _sites_band(cfa, r0, r1, offs, out, tmp, REACH["mhc"], (_MHC_G, _MHC_ROW, _MHC_COL, _MHC_DIAG))


# Bilinear as four kernels on the mosaic itself, kept at their sites as MHC's are: the same averages as the
# sparse planes' convolutions (G: the 4 nearest; R/B: the 2 beside along the row or column, or the 4 diagonal),
# with 3×3 kernels — cheaper than three convolutions of zero-filled planes (no fills, no strided copies).
_BIL_G = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32) / 4
_BIL_ROW = np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0]], np.float32) / 2
_BIL_COL = np.ascontiguousarray(_BIL_ROW.T)
_BIL_DIAG = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]], np.float32) / 4


def _bilinear_band(cfa: np.ndarray, r0: int, r1: int, offs: dict, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Bilinear for rows r0:r1 (r0 even): four 3×3 kernels on the mosaic, each kept at the sites it is for, and
    the samples copied at their own sites.  ``out`` as _sites_band's."""
    return _sites_band(cfa, r0, r1, offs, out, tmp, REACH["bilinear"], (_BIL_G, _BIL_ROW, _BIL_COL, _BIL_DIAG))


def band_rows(h: int, r0: int, r1: int, reach: int) -> tuple[int, int]:
    """The mosaic rows a band r0:r1 of a method of ``reach`` reads (its kernels' support; reflected only at the
    mosaic's own edges): what an ``out`` of _sites_band with room for them covers."""
    return max(0, r0 - reach), min(h, r1 + reach)


def _sites_band(cfa: np.ndarray, r0: int, r1: int, offs: dict, out: np.ndarray, tmp: np.ndarray, reach: int,
                kernels) -> np.ndarray:
    """Rows r0:r1 of a linear demosaic given by four kernels on the mosaic: G at R and B sites; at a G site the
    colour beside it in its row, and in its column; R at B sites and B at R sites.  Returns them, (3, r1 - r0, W).

    ``out`` (3, r1 - r0, W) receives them; or, with room for the rows the kernels read (3, e - a, W) for
    (a, e) = band_rows(...), the kernels write their results straight into its planes — G's into G, the row
    kernel's into R and the column kernel's into B, each right at most of its sites — and the rows r0:r1 of it
    are returned (a view): three plane copies fewer a band (the demosaic's site picking was as costly as its
    convolutions).  ``tmp`` holds the other kernels' results: 4 or 1 planes of e - a rows."""
    (ri, rj), (bi, bj) = offs["R"][0], offs["B"][0]
    # A G site shares its row with R (g_r) or with B (g_b): R is interpolated from its row (the row kernel) at
    # the former, from its column at the latter, and B the other way round.
    gi, gj = next(ij for ij in offs["G"] if ij[0] != ri)     # g_b
    c = cfa[r0:r1]
    a, e = band_rows(cfa.shape[0], r0, r1, reach)
    if out.shape[1] == e - a:
        src = cfa[a:e]
        g_k, row_k, col_k, diag_k = kernels
        for plane, kernel in ((out[1], g_k), (out[0], row_k), (out[2], col_k), (tmp[0, : e - a], diag_k)):
            cv2.filter2D(src, -1, kernel, dst=plane, borderType=cv2.BORDER_REFLECT_101)
        out = out[:, r0 - a:r1 - a]
        diag_k = tmp[0, r0 - a:r1 - a]
        r, g, b = out
        swap = r[gi::2, gj::2].copy()               # at g_b R takes the column kernel's value, B the row's
        r[gi::2, gj::2] = b[gi::2, gj::2]
        b[gi::2, gj::2] = swap
    else:
        g_k, row_k, col_k, diag_k = _filtered(cfa, r0, r1, reach, kernels, tmp)
        r, g, b = out
        g[...] = g_k
        r[...] = row_k                              # right for R at g_r
        r[gi::2, gj::2] = col_k[gi::2, gj::2]       # … and from the column at g_b
        b[...] = col_k                              # right for B at g_r
        b[gi::2, gj::2] = row_k[gi::2, gj::2]
    for (i, j) in offs["G"]:
        g[i::2, j::2] = c[i::2, j::2]
    r[bi::2, bj::2] = diag_k[bi::2, bj::2]
    r[ri::2, rj::2] = c[ri::2, rj::2]
    b[ri::2, rj::2] = diag_k[ri::2, rj::2]
    b[bi::2, bj::2] = c[bi::2, bj::2]
    return out


_BANDS = {"mhc": _mhc_band, "bilinear": _bilinear_band}    # full-resolution method -> its band function


def debayer_window(cfa: np.ndarray, pattern: str, method: str, rows: tuple[int, int], cols: tuple[int, int],
                   tmp: np.ndarray | None = None, out: np.ndarray | None = None, *,
                   reach: int | None = None) -> tuple[np.ndarray, int, int]:
    """At least the rows ``rows`` = (r0, r1) and columns ``cols`` = (c0, c1) of debayer(cfa, pattern, method),
    with the same values as the whole mosaic's (the kernels read the mosaic around the window; only the
    mosaic's own edges are reflected), without demosaicing the rest.  Returns a float32 (3, m, n) array (new,
    or a view of ``out``) and the mosaic row and column of its first pixel (≤ r0, ≤ c0: the window starts on
    the CFA's phase and is widened by the kernels' reach along the rows; the columns of that widening are
    reflected, not the mosaic's: use rows r0:r1 and columns c0:c1).  ``tmp``: float32 scratch, reused when it
    holds at least 4 × (m + 2·reach) × n values; ``out``: float32 memory for the result, used when it holds
    3 × (m + 2·reach) × n values (the array returned is then a view of it: each plane m rows of a plane of up
    to m + 2·reach, where the kernels wrote).  ``reach``: widen the window as a method of that reach would (at
    least the method's own), so that two methods' windows of the same rows and columns line up."""
    reach = max(REACH[method], reach or 0)
    h, w = cfa.shape
    r0, r1 = rows[0] & ~1, rows[1]
    p, q = max(0, cols[0] - reach) & ~1, min(w, cols[1] + reach)
    a = max(0, r0 - reach) & ~1          # the rows the kernels read: from the CFA's first row phase
    sub = cfa[a:min(h, r1 + reach), p:q]
    n = q - p
    need = 4 * (r1 - r0 + 2 * reach + 2) * n
    if tmp is None or tmp.size < need:
        tmp = np.empty(need, np.float32)
    tmp = tmp.reshape(-1)[:need].reshape(4, -1, n)
    ba, be = band_rows(sub.shape[0], r0 - a, r1 - a, REACH[method])
    size = 3 * (be - ba) * n          # with room for the rows the kernels read: they write into it (_sites_band)
    out = out.reshape(-1)[:size].reshape(3, be - ba, n) if out is not None and out.size >= size \
        else np.empty((3, be - ba, n), np.float32)
    return _BANDS[method](sub, r0 - a, r1 - a, colour_offsets(pattern), out, tmp), r0, p


def debayer_mask(mask: np.ndarray | None, pattern: str | None, method: str = "bilinear") -> np.ndarray | None:
    """Carry a CFA-level bool mask (e.g. saturation) to the debayered grid: a pixel is flagged when any CFA
    sample that feeds it is flagged (3×3 neighbourhood for bilinear, 5×5 for mhc, the 2×2 cell for
    superpixel).  For mhc the square is a little wider than the kernels' support (which leaves out the corners
    and the (±1, ±2) knight's moves), as wide as warp.warp_points' square reach: both saturation paths agree."""
    if mask is None or pattern is None:
        return mask
    if method == "superpixel":
        h, w = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
        return mask[0:h:2, 0:w:2] | mask[0:h:2, 1:w:2] | mask[1:h:2, 0:w:2] | mask[1:h:2, 1:w:2]
    if method not in REACH:
        raise ValueError(f"unknown debayer method '{method}' (known: {', '.join(DEBAYER_METHODS)})")
    k = 2 * REACH[method] + 1
    return cv2.dilate(mask.view(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def bin2x2_mean(cfa: np.ndarray) -> np.ndarray:
    """Mean of each 2×2 cell: for a Bayer mosaic a luminance ((R + 2G + B) / 4) at half resolution.
    Returns float32 (H//2, W//2) (an odd last row or column is dropped); ``cfa`` is not modified.
    OpenCV's area resize computes exactly this in one pass (4× faster than four strided numpy adds)."""
    h, w = cfa.shape[0] // 2 * 2, cfa.shape[1] // 2 * 2
    return cv2.resize(cfa[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
