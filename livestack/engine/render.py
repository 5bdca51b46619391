"""A frame's pixels on the grid, a block of grid rows at a time: demosaic (Bayer) and warp fused.

The stack adds a frame in blocks of rows (stack.py); each block is made here when it is needed — the mosaic
window its pixels come from is demosaiced, warped onto the block and handed on while it is in the cache — so
a colour frame never exists whole at full resolution: at 24 MP that is 288 MB of RGB planes (and a warped
plane) fewer, and three passes over them through memory.  The values are the whole-frame path's
(debayer.debayer then warp.warp): each window is demosaiced as the whole mosaic would be around it, and each
block warped with the same map and footprint.

The window a block needs: its corners mapped back onto the frame, plus the interpolation's reach.  When the
frame is rotated against the grid a full-width block would need a tall window (a 10° rotation of a 6000 px
wide frame: 1000 rows for a block of 64), so a rotated frame is made in squares of 256 × 256 grid pixels,
whose windows are the least demosaicing for their area; a meridian flip (180°) or a drift needs none.
"""
from __future__ import annotations

import math
import threading

import cv2
import numpy as np

from . import geometry
from .debayer import debayer_window
from .warp import INTERPOLATIONS, REACH, compensation, footprint_rows, outside_index, sharpen

_local = threading.local()      # each worker thread's demosaic scratch (reused from block to block)
BLOCK_ROWS = 64                 # grid rows a block (even): a 24 MP colour block is 4.6 MB, made in the cache
ROTATED_BLOCK_ROWS = 256        # … of a rotated frame, made in squares (see FrameOnGrid.__init__)


class FrameOnGrid:
    """``rows(r0, r1)``: grid rows r0:r1 of a frame, as a list of C float32 (r1 - r0, w) arrays, NaN outside its
    footprint — views of the calling thread's own work memory, valid until its next call (the stack modifies
    them), or views of ``src`` when the frame is already on the grid (then ``src`` is modified too).
    Thread-safe: blocks are made on the stack's worker threads, each into memory it keeps from block to block
    (no heap traffic of a few MB a block: freed blocks interleaved across threads grew the heap's high-water
    mark by tens of MB over a night).

    ``src``: a (H, W) Bayer mosaic with ``pattern`` and ``debayer`` ("bilinear" or "mhc"), or (C, H, W)
    planes (mono, or a superpixel image) with ``pattern`` None; ``matrix``: (2, 3) frame pixel -> grid pixel;
    ``shape``: the grid's (h, w)."""

    def __init__(self, src: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], *, interpolation: str,
                 pattern: str | None = None, debayer: str | None = None):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}' (known: {', '.join(INTERPOLATIONS)})")
        self.mosaic = pattern is not None
        if self.mosaic and (src.ndim != 2 or debayer not in ("bilinear", "mhc")):
            raise ValueError("a mosaic is rendered with the bilinear or mhc demosaic")
        self.src, self.pattern, self.method = src, pattern, debayer
        self.src_hw = src.shape[-2:]
        self.channels = 3 if self.mosaic else src.shape[0]
        self.matrix = np.asarray(matrix, np.float64)
        self.shape = tuple(int(v) for v in shape)
        self.interpolation = interpolation
        self.on_grid = np.array_equal(self.matrix, geometry.identity()) and tuple(self.src_hw) == self.shape
        self.inv = geometry.invert(self.matrix)
        if not self.on_grid:
            self.x0, self.x1 = footprint_rows(self.matrix, self.src_hw, self.shape, reach=REACH[interpolation])
        self.taps = math.ceil(REACH[interpolation])     # source px either side of a position it reads
        # A block's window grows with the rotation: the whole grid width spans w·|dy/dx| source rows (0.5° of a
        # 6000 px frame: 52, nearly doubling a 64-row block's demosaic).  Beyond 8 such rows the frame is made in
        # squares of 256 × 256 grid pixels, whose windows are (1 + sin 2θ) times their area — the least for a
        # square; 256 keeps the per-square overhead small (~400 squares at 24 MP).  The stack adds rows in blocks
        # of block_rows.
        self.rotated = not self.on_grid and abs(float(self.inv[1, 0])) * self.shape[1] > 8
        self.block_rows = ROTATED_BLOCK_ROWS if self.rotated else BLOCK_ROWS

    def rows(self, r0: int, r1: int) -> list[np.ndarray]:
        w = self.shape[1]
        if self.on_grid:
            if not self.mosaic:
                return [self.src[c, r0:r1] for c in range(self.channels)]
            img, a, p = debayer_window(self.src, self.pattern, self.method, (r0, r1), (0, w),
                                       _scratch(r1 - r0, w), _window(r1 - r0, w))
            return list(img[:, r0 - a:, p:p + w])
        out = _work("out", self.channels * (r1 - r0) * w)[: self.channels * (r1 - r0) * w]
        out = out.reshape(self.channels, r1 - r0, w)
        for c0, c1 in self._segments(r0, r1):
            self._segment(out[:, :, c0:c1], r0, r1, c0, c1)
        idx = outside_index(self.x0[r0:r1], self.x1[r0:r1], w)
        if len(idx):
            for c in range(self.channels):
                out[c].reshape(-1)[idx] = np.float32(np.nan)
        return list(out)

    def _segments(self, r0: int, r1: int):
        """Column ranges of the grid rows r0:r1 made one at a time: the whole width, or for a rotated frame
        squares as wide as the block (see block_rows)."""
        w = self.shape[1]
        n = w if not self.rotated else self.block_rows
        for c0 in range(0, w, n):
            yield c0, min(w, c0 + n)

    def _segment(self, out: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
        """Warp the source window that grid rows r0:r1, columns c0:c1 read into ``out`` (C, r1 - r0, c1 - c0).
        Only footprint pixels must be right: their taps lie inside the frame and inside this window."""
        H, W = self.src_hw
        corners = np.array([[c0, r0], [c1 - 1, r0], [c0, r1 - 1], [c1 - 1, r1 - 1]], np.float64)
        s = geometry.apply(self.inv, corners)
        k = self.taps
        xa, xe = max(0, int(np.floor(s[:, 0].min())) - k), min(W, int(np.floor(s[:, 0].max())) + k + 2)
        ya, ye = max(0, int(np.floor(s[:, 1].min())) - k), min(H, int(np.floor(s[:, 1].max())) + k + 2)
        if xa >= xe or ya >= ye:            # the block lies beyond the frame: all outside the footprint
            out.fill(np.nan)
            return
        if self.mosaic:
            win, a, p = debayer_window(self.src, self.pattern, self.method, (ya, ye), (xa, xe),
                                       _scratch(ye - ya, xe - xa), _window(ye - ya, xe - xa))
        else:
            win, a, p = self.src[:, ya:ye, xa:xe], ya, xa
        if self.interpolation == "compensated":
            k = compensation(self.inv, (c0, c1), (r0, r1))
            if k != (0.0, 0.0):     # a whole-pixel shift reads no fraction: nothing to compensate
                # a demosaiced window is this thread's own memory (sharpened in place); planes are the frame's
                mine = win if self.mosaic else _work("sharp", win.size)[: win.size].reshape(win.shape)
                for c in range(self.channels):
                    sharpen(win[c], k, mine[c])
                win = mine
        # window pixel (u, v) is frame (u + p, v + a); the segment's pixel (X, Y) is grid (X + c0, Y + r0)
        m = geometry.compose(np.array([[1.0, 0, -c0], [0, 1.0, -r0]]),
                             geometry.compose(self.matrix, np.array([[1.0, 0, p], [0, 1.0, a]])))
        flags = INTERPOLATIONS[self.interpolation]
        for c in range(self.channels):
            cv2.warpAffine(win[c], m, (c1 - c0, r1 - r0), dst=out[c], flags=flags, borderMode=cv2.BORDER_REPLICATE)



def _work(name: str, size: int) -> np.ndarray:
    """This thread's float32 work memory ``name``, at least ``size`` values (grown when a block needs more)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        setattr(_local, name, buf)
    return buf


def _window(rows: int, cols: int) -> np.ndarray:
    """This thread's memory for a demosaiced window of rows × cols (debayer_window widens it by a phase row and
    the kernels' reach and phase columns)."""
    return _work("window", 3 * (rows + 2) * (cols + 6))


def _scratch(rows: int, cols: int) -> np.ndarray:
    """This thread's demosaic scratch, enough for a window of rows × cols (debayer_window's four kernel
    results with their reach and phase rows)."""
    return _work("tmp", 4 * (rows + 8) * (cols + 8))
