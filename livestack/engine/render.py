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
import weakref

import cv2
import numpy as np

from . import geometry
from .debayer import _BANDS, REACH as DEBAYER_REACH, band_rows, colour_offsets, debayer, debayer_window
from .warp import CLAMPED, INTERPOLATIONS, REACH, clamp_below, compensation, footprint_rows, outside_index, sharpen

_local = threading.local()      # each worker thread's demosaic scratch (reused from block to block)
_all_work: weakref.WeakSet = weakref.WeakSet()   # … every live thread's, for drop_work_memory
_all_lock = threading.Lock()


class _Buffers:
    """A thread's work memory by name; drop_work_memory's WeakSet holds it only while its thread lives."""

    __slots__ = ("named", "__weakref__")

    def __init__(self):
        self.named: dict[str, np.ndarray] = {}
BLOCK_ROWS = 64                 # grid rows a block (even): a 24 MP colour block is 4.6 MB, made in the cache
ROTATED_BLOCK_ROWS = 256        # … of a rotated frame, made in squares (see FrameOnGrid.__init__)
REACH_MHC = DEBAYER_REACH["mhc"]    # every window is widened as mhc's: plain and sharp windows line up
CHUNK_MARGIN = REACH_MHC + 1        # columns a sharp value reads either side: the demosaic's and the sharpening's


class FrameOnGrid:
    """``rows(r0, r1)``: grid rows r0:r1 of a frame, as a list of C float32 (r1 - r0, w) arrays, NaN outside its
    footprint — views of the calling thread's own work memory, valid until its next call (the stack modifies
    them), or views of ``src`` when the frame is already on the grid (then ``src`` is modified too).
    Thread-safe: blocks are made on the stack's worker threads, each into memory it keeps from block to block
    (no heap traffic of a few MB a block: freed blocks interleaved across threads grew the heap's high-water
    mark by tens of MB over a night).

    ``src``: a (H, W) Bayer mosaic with ``pattern`` and ``debayer`` ("bilinear" or "mhc"), or (C, H, W)
    planes (mono) with ``pattern`` None; or a (H, W) Bayer mosaic with ``debayer`` "superpixel": the frame is
    then its (H/2, W/2) superpixel image, each window of it made from the mosaic when it is needed (as
    debayer.debayer's superpixel) and normalised by ``normalise`` (normalize.Normalisation, or None) — the
    whole image is never made.  ``matrix``: (2, 3) frame pixel -> grid pixel; ``shape``: the grid's (h, w).
    ``signal``: signal_cells() of the frame, its cells ``signal_step`` source pixels square — the sharpening
    (an mhc demosaic, a compensated warp) is then applied where it says there is signal and the plain path
    (bilinear demosaic, bilinear read) elsewhere."""

    def __init__(self, src: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], *, interpolation: str,
                 pattern: str | None = None, debayer: str | None = None, signal: np.ndarray | None = None,
                 signal_step: int = 4, normalise=None):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}' (known: {', '.join(INTERPOLATIONS)})")
        self.superpixel = pattern is not None and debayer == "superpixel"
        self.mosaic = pattern is not None and not self.superpixel      # demosaiced at full resolution
        if pattern is not None and (src.ndim != 2 or debayer not in ("bilinear", "mhc", "superpixel")):
            raise ValueError("a mosaic is rendered with the bilinear, mhc or superpixel demosaic")
        self.src, self.pattern, self.method = src, pattern, debayer
        self.normalise = normalise
        self.src_hw = (src.shape[0] // 2, src.shape[1] // 2) if self.superpixel else src.shape[-2:]
        self.channels = 3 if pattern is not None else src.shape[0]
        self.matrix = np.asarray(matrix, np.float64)
        self.shape = tuple(int(v) for v in shape)
        self.interpolation = interpolation
        self.on_grid = np.array_equal(self.matrix, geometry.identity()) and tuple(self.src_hw) == self.shape
        self.inv = geometry.invert(self.matrix)
        if not self.on_grid:
            self.x0, self.x1 = footprint_rows(self.matrix, self.src_hw, self.shape, reach=REACH[interpolation])
        self.taps = math.ceil(REACH[interpolation])     # source px either side of a position it reads
        # A block's window grows with the rotation: the whole grid width spans w·|dy/dx| source rows (0.5° of a
        # 6000 px frame: 52, nearly doubling a 64-row block's demosaic).  Beyond a block's own height of such rows
        # the frame is made in squares of 256 × 256 grid pixels, whose windows are (1 + sin 2θ) times their area
        # — the least for a square; 256 keeps the per-square overhead small (~400 squares at 24 MP).  Below it
        # the rows win (24 MP, two threads, render alone, bilinear / compensated + smooth background: 0.08°
        # rows 0.19–0.22 / 0.22–0.23 s, squares 0.21–0.25 / 0.29–0.35; 0.5° rows 0.22 / 0.27, squares 0.24 /
        # 0.33; 1° rows 0.51 / 0.57, squares 0.23 / 0.41).  The stack adds rows in blocks of block_rows.
        self.rotated = not self.on_grid and abs(float(self.inv[1, 0])) * self.shape[1] > BLOCK_ROWS
        self.block_rows = ROTATED_BLOCK_ROWS if self.rotated else BLOCK_ROWS
        # Sharpening only where there is signal (signal_cells): nothing to choose when nothing sharpens
        sharpens = (self.mosaic and debayer == "mhc") or (interpolation == "compensated" and not self.on_grid)
        self.signal = signal if sharpens else None
        self.signal_step = signal_step

    def rows(self, r0: int, r1: int) -> list[np.ndarray]:
        w = self.shape[1]
        if self.on_grid:
            if not self.mosaic:
                return list(self._planes(r0, r1, 0, w)[0])
            img, a, p = self._source(r0, r1, 0, w)
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
        win, a, p = self._source(ya, ye, xa, xe, (r0, r1, c0, c1))
        # window pixel (u, v) is frame (u + p, v + a); the segment's pixel (X, Y) is grid (X + c0, Y + r0)
        m = geometry.compose(np.array([[1.0, 0, -c0], [0, 1.0, -r0]]),
                             geometry.compose(self.matrix, np.array([[1.0, 0, p], [0, 1.0, a]])))
        flags = INTERPOLATIONS[self.interpolation]
        for c in range(self.channels):
            cv2.warpAffine(win[c], m, (c1 - c0, r1 - r0), dst=out[c], flags=flags, borderMode=cv2.BORDER_REPLICATE)
            if self.interpolation in CLAMPED:
                clamp_below(win[c], m, out[c])

    def _source(self, ya: int, ye: int, xa: int, xe: int, segment: tuple | None = None):
        """The source rows ya:ye, columns xa:xe (at least) as the warp reads them: demosaiced (a mosaic) and, for a
        compensated warp of the grid ``segment`` (r0, r1, c0, c1), sharpened — or where ``signal`` says there
        is no signal, the plain path's values (bilinear demosaic, no sharpening).  Returns (C, m, n) float32 and
        the source row and column of its first pixel."""
        k = None
        if self.interpolation == "compensated" and segment is not None:
            r0, r1, c0, c1 = segment
            k = compensation(self.inv, (c0, c1), (r0, r1))
            k = None if k == (0.0, 0.0) else k      # a whole-pixel shift reads no fraction: nothing to sharpen
        mhc = self.mosaic and self.method == "mhc"
        if k is None and not mhc:       # nothing sharpens this block: the plain values are the sharp ones
            kind = "plain"
        else:
            kind = "sharp" if self.signal is None else self._kind(ya, ye, xa, xe)
        if kind == "sharp":
            if self.mosaic:
                win, a, p = debayer_window(self.src, self.pattern, self.method, (ya, ye), (xa, xe),
                                           _scratch(ye - ya, xe - xa), _window(ye - ya, xe - xa), reach=REACH_MHC)
            else:
                (win, owned), a, p = self._planes(ya, ye, xa, xe), ya, xa
            if k is not None:       # a demosaiced window is this thread's memory; planes are the frame's
                mine = win if self.mosaic or owned else _work("sharp", win.size)[: win.size].reshape(win.shape)
                for c in range(self.channels):
                    sharpen(win[c], k, mine[c])
                win = mine
            return win, a, p
        # The plain path's window, and where there is signal (a few columns of cells: stars are sparse) the
        # sharp path's values copied over it.  The windows of both start where an mhc window would.
        if self.mosaic:
            win, a, p = debayer_window(self.src, self.pattern, "bilinear", (ya, ye), (xa, xe),
                                       _scratch(ye - ya, xe - xa), _window(ye - ya, xe - xa), reach=REACH_MHC)
        else:
            (win, owned), a, p = self._planes(ya, ye, xa, xe), ya, xa
        if kind == "plain":
            return win, a, p
        if not self.mosaic and not owned:       # the frame's planes: the copy that is changed
            mine = _work("sharp", win.size)[: win.size].reshape(win.shape)
            np.copyto(mine, win)
            win = mine
        rows, cols = win.shape[1:]
        cells, y0, x0 = self._cells(a, a + rows, p, p + cols)
        # The window's columns with signal, widened by what their sharp values read (an mhc demosaic's 2 and
        # the sharpening's 1, to even columns: the CFA's phase; else the sharpening's 1), as chunks side by side
        # in one array: one demosaic and one sharpening for all of them (gathered and put back by index).
        # Where two chunks meet, the kernels read the other chunk: only the margins' values are wrong, and
        # those are not copied (no signal there).
        s = self.signal_step
        margin, phase = (CHUNK_MARGIN, ~1) if mhc else (1, ~0)    # (else the sharp values read the sharpening's)
        j0, j1 = _runs(cells.max(axis=0) > 0)
        v0 = np.maximum(0, x0 + j0 * s - p - margin) & phase
        v1 = np.minimum(cols, x0 + j1 * s - p + margin + 1) & phase
        v1[cols - v1 < 2] = cols
        first = np.ones(len(v0), bool)          # chunks that meet or overlap the one before are merged into it
        first[1:] = v0[1:] > v1[:-1]            # (v1 never decreases: the runs are in order)
        v0, v1 = v0[first], v1[np.flatnonzero(np.append(first[1:], True))]
        width = v1 - v0
        n = int(width.sum())
        # the tile's column i is the window's column idx[i]
        idx = np.arange(n) + np.repeat(v0 - (np.cumsum(width) - width), width)
        plain = _work("plain", self.channels * rows * n)[: self.channels * rows * n].reshape(self.channels, rows, n)
        # (indexing, not np.take: a window is a strided view of its padded planes, which np.take first copies
        # whole — 1.3 ms a block, 0.08 s a 24 MP frame on one core)
        np.copyto(plain, win[:, :, idx])
        if mhc:
            ra, re = max(0, a - REACH_MHC), min(self.src_hw[0], a + rows + REACH_MHC)
            cat = _work("cat", (re - ra) * n)[: (re - ra) * n].reshape(re - ra, n)
            np.take(self.src[ra:re], idx + p, axis=1, out=cat)
            tmp = _scratch(rows, n)[: 4 * (re - ra) * n].reshape(4, re - ra, n)
            ba, be = band_rows(re - ra, a - ra, a - ra + rows, REACH_MHC)     # with room for the kernels' rows
            room = _work("tile", 3 * (be - ba) * n)[: 3 * (be - ba) * n].reshape(3, be - ba, n)
            tile = _BANDS["mhc"](cat, a - ra, a - ra + rows, colour_offsets(self.pattern), room, tmp)
            if k is not None:
                for c in range(self.channels):
                    sharpen(tile[c], k, tile[c])
        else:                   # a bilinear demosaic or planes (k is set: see kind): the plain values sharpened
            tile = _work("tile", self.channels * rows * n)[: self.channels * rows * n].reshape(self.channels, rows, n)
            for c in range(self.channels):
                sharpen(plain[c], k, tile[c])
        # which of the tile's pixels lie in a cell with signal: the cells looked up for its rows and columns
        # (only the chunks' columns: the whole window's mask cost ~25 ms a 24 MP frame); elsewhere the plain
        # values go back
        mask = (cells == 0).take((idx + p - x0) // s, axis=1).take(np.arange(a - y0, a + rows - y0) // s, axis=0)
        np.copyto(tile, plain, where=mask)
        win[:, :, idx] = tile
        return win, a, p

    def _planes(self, ya: int, ye: int, xa: int, xe: int) -> tuple[np.ndarray, bool]:
        """Rows ya:ye, columns xa:xe of the frame's planes, (C, ye - ya, xe - xa) float32, and whether it is this
        thread's memory (a superpixel window, made now: it may be changed) or a view of ``src``."""
        if not self.superpixel:
            return self.src[:, ya:ye, xa:xe], False
        n = 3 * (ye - ya) * (xe - xa)
        win = _work("superpixel", n)[:n].reshape(3, ye - ya, xe - xa)
        debayer(self.src[2 * ya:2 * ye, 2 * xa:2 * xe], self.pattern, "superpixel", out=win)
        if self.normalise is not None:
            self.normalise.apply(win, ya, xa)
        return win, True

    def _kind(self, ya: int, ye: int, xa: int, xe: int) -> str:
        """What the source rows ya:ye, columns xa:xe need: "plain" (no signal), "sharp" (signal throughout)
        or "both"."""
        cells = self._cells(ya, ye, xa, xe)[0]
        return "plain" if not cells.any() else "sharp" if cells.all() else "both"

    def _cells(self, ya: int, ye: int, xa: int, xe: int) -> tuple[np.ndarray, int, int]:
        """The signal cells over source rows ya:ye, columns xa:xe (past the map's last cell: its edge cells),
        and the source row and column of the first cell's corner."""
        s, (n, m) = self.signal_step, self.signal.shape
        i0, i1, j0, j1 = ya // s, (ye - 1) // s + 1, xa // s, (xe - 1) // s + 1
        cells = self.signal[min(i0, n - 1):min(i1, n), min(j0, m - 1):min(j1, m)]
        if i1 > n or j1 > m:        # (rows or columns past the map: a frame's last, partial cell)
            cells = np.pad(cells, ((0, i1 - i0 - cells.shape[0]), (0, j1 - j0 - cells.shape[1])), mode="edge")
        return cells, i0 * s, j0 * s


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The starts and ends (half-open) of the True runs in a 1-D bool array, as two int arrays."""
    d = np.diff(np.concatenate([[0], flags.view(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


# A cell has signal above its surroundings by this many times the cells' noise: 4σ leaves ~3e-5 of a frame's
# noise cells sharpened (each grown to 3 × 3); 3.5σ, 4σ and 5σ gave the same stacked star widths to 0.1 %
# (bench_sharpness, the simulated and the Seestar nights)
SIGNAL_SIGMA = 4.0


def signal_cells(lum: np.ndarray, k: float = SIGNAL_SIGMA) -> np.ndarray:
    """Where a frame has signal, as uint8 weights 0 or 255 on cells of 2×2 ``lum`` pixels (the binned image
    the stars were found on: a cell is 4×4 sensor pixels of a full-resolution frame).

    A cell has signal when it stands above the mean of the 7×7 cells around it (a star, a knot of nebula, an
    edge) by more than ``k`` times that difference's robust σ over the frame.  Cells with signal are grown by
    one cell: a star's wings (the sharpening's corrections sum to zero over the whole star, so its flux is
    kept; without the growth stacked stars came out 2–4 % wider, and with a softened edge 0.6 % wider).  The
    sharpening — an mhc demosaic, a compensated warp — adds noise where it has nothing to sharpen (1.6–2× the
    plain path's per pixel): FrameOnGrid applies it where this says, and the background keeps the plain
    path's noise."""
    h, w = lum.shape[0] // 2 * 2, lum.shape[1] // 2 * 2
    q = cv2.resize(lum[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    hp = cv2.blur(q, (7, 7), borderType=cv2.BORDER_REFLECT_101)
    np.subtract(q, hp, out=hp)
    del q
    sub = hp[::4, ::4]            # the noise from 1 cell in 16: ~0.1 M cells at 24 MP (±0.5 %), 4 ms
    med = float(np.median(sub))
    sigma = 1.4826 * float(np.median(np.abs(sub - med)))
    sig = (hp > med + k * sigma).view(np.uint8)
    return cv2.dilate(sig, np.ones((3, 3), np.uint8)) * np.uint8(255)


def _work(name: str, size: int) -> np.ndarray:
    """This thread's float32 work memory ``name``, at least ``size`` values (grown when a block needs more)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = _Buffers()
        with _all_lock:
            _all_work.add(bufs)
    buf = bufs.named.get(name)
    if buf is None or buf.size < size:
        buf = bufs.named[name] = np.empty(size, np.float32)
    return buf


def drop_work_memory() -> None:
    """Let go of every thread's work memory (tens of MB at 24 MP): before a step that needs more memory than a
    frame — the bootstrap's combination, the session's peak —, with no frame being made.  Threads get new
    memory at their next block."""
    with _all_lock:
        for bufs in list(_all_work):
            bufs.named.clear()


def _window(rows: int, cols: int) -> np.ndarray:
    """This thread's memory for a demosaiced window of rows × cols (debayer_window widens it by a phase row and
    the kernels' reach and phase columns, and takes room for the rows its kernels read: 2 either side)."""
    return _work("window", 3 * (rows + 6) * (cols + 6))


def _scratch(rows: int, cols: int) -> np.ndarray:
    """This thread's demosaic scratch, enough for a window of rows × cols (debayer_window's four kernel
    results with their reach and phase rows)."""
    return _work("tmp", 4 * (rows + 8) * (cols + 8))
