"""RunningStack: a weighted mean with per-pixel outlier rejection whose memory does not grow with frames.

Full resolution: the weighted sums S_c = Σ w·x_c of each channel and W = Σ w (C + 1 float32 planes).
Statistics for rejection, on the 2×2-binned luminance b (a weighted mean of the channels, ``lum_weights``),
taken from the sky so that float32 keeps its precision where the noise is small: Σ w·(b − b_sky), Σ w,
Σ w·(b − b_sky)² and the frame count n (a quarter plane each).  Binning costs nothing in what can be caught —
a satellite trail or a cosmic-ray hit keeps most of its signal in its 2×2 cell while the noise halves — and
makes the rejection test, the costliest part of a frame (~27 passes over memory), four times cheaper; a
rejected cell drops its 4 pixels.  The caller may give the cells directly (``add_channels``): the pipeline
averages 2×2 blocks of the Bayer mosaic — (R + 2G + B)/4 — and warps them at half resolution, which costs a
full-resolution luminance plane, its warp and its binning less per frame.  For RGB at 24 MP: ≈ 470 MB.

A new frame's cell is rejected (all channels at once: a satellite or a cosmic ray hits them together after
debayering) when its luminance departs from the running mean by more than κσ, where σ² is the larger of

  * the cell's own weighted variance over the frames so far, and
  * the frame's background noise² plus (rel_floor · signal)²: what seeing and resampling do to a star core,

times (1 + 1/n) for the mean's own noise.  The relative term stays however many frames a cell has: the cell's
own variance is learnt from the frames it kept, so it can never admit a seeing the first frames did not show —
on a night whose seeing improved from 4 to 2.5 px that rejected 37 % of the sharp frames' star flux and left
the stars 2.8 % wider than the plain mean's (benchmarks/bench_clipping.py).  Neighbours of a strong outlier
(> 2κσ) go too: the faint wings of a trail or a cosmic-ray hit, spread by debayering and the warp, sit below κσ
one by one.

A streaming clip cannot judge the first frames against anything, and an outlier in the reference would then
stay forever (and make every later frame look wrong there).  So the first ``bootstrap`` frames are buffered as
float16 (2^-11 relative precision, far below the shot noise; values stored as 2^-8 of themselves, so that up to
1.7e7 fit — a normalised star core of a 16-bit camera passes float16's 65504) and clipped against their
per-cell median; from then on the stack streams.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .stretch import reduce, reduced_size, zero_nan

_GROW = np.ones((3, 3), np.uint8)


def usable_cpus() -> int:
    """The CPUs this process may run on — its affinity, which `taskset` or systemd's CPUAffinity= narrow (a Pi
    that keeps cores for the capture software) —, else all of the machine's.  Workers beyond them only take
    turns: pinned to one core, two stack threads cost 0.949 s a 24 MP frame where one costs 0.896 (paired,
    16 frames)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):        # (no affinity on macOS and Windows)
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class StackParams:
    kappa: float = 3.0          # rejection threshold in σ
    bootstrap: int = 3          # frames buffered to start from a per-pixel median (0 or 1: stream at once)
    # σ of a cell's frame-to-frame variation relative to its signal: a star core's 2×2 cell changes by −30 % /
    # +55 % for ±20 % of seeing, and a bilinear warp lowers an undersampled core (FWHM 1.6 cells) by 21 %, up to
    # 33 %, which the reference frame, never resampled, escapes (0.10 rejected 20 % of a Seestar reference's
    # core cells, and 41 % of the sharp frames' star flux on a night alternating between 4 and 2.5 px)
    rel_floor: float = 0.30
    min_empirical: int = 0      # 0: the relative term stays; N ≥ 2: from N frames on a cell's own scatter alone
                                #     decides (livestack ≤ 2026-11: 5 — it rejects cores of a new seeing)
    saturated_weight: float = 1e-6  # a saturated pixel only counts where no frame has a better value
    chunk_rows: int = 256       # rows per block: bounds the temporaries (a few MB) whatever the frame size
    grow: bool = True           # also reject the 8 neighbours of a strong (> 2κσ) outlier
    # row blocks processed in parallel (1 = in the calling thread): the cores we may use, at most 4 (a Pi 4/5 has 4)
    threads: int = field(default_factory=lambda: max(1, min(4, usable_cpus())))
    # stacks of several filters: those used least recently live in memory-mapped files beyond this many MB
    # (a 26 MP mono stack is ~300 MB, a 24 MP colour one ~470 MB; the stack in use always stays in memory)
    memory_mb: int = 400

    def __post_init__(self):
        if not 1.5 <= self.kappa <= 20:
            raise ValueError(f"stack.kappa = {self.kappa}: must be in [1.5, 20]")
        if not 0 <= self.bootstrap <= 9:
            raise ValueError(f"stack.bootstrap = {self.bootstrap}: must be in [0, 9]")
        if not 0 <= self.memory_mb <= 1_000_000:
            raise ValueError(f"stack.memory_mb = {self.memory_mb}: must be in [0, 1000000]")
        if self.rel_floor < 0 or self.min_empirical == 1 or self.min_empirical < 0 or self.chunk_rows < 8 \
                or not 1 <= self.threads <= 16:
            raise ValueError("stack: rel_floor ≥ 0, min_empirical 0 or ≥ 2, chunk_rows ≥ 8 and threads in [1, 16] "
                             "are required")


def _luminance(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w) float32 Σ weights[c]·x[c] (a new array)."""
    lum = x[0].astype(np.float32) * np.float32(weights[0])
    for c in range(1, x.shape[0]):
        lum += x[c].astype(np.float32) * np.float32(weights[c])
    return lum


def bin2(a: np.ndarray) -> np.ndarray:
    """(H, W) float32 -> (⌈H/2⌉, ⌈W/2⌉) means of 2×2 cells (NaN where any pixel of the cell is NaN); an odd
    last row or column is paired with itself."""
    h, w = a.shape
    if h % 2 or w % 2:
        a = cv2.copyMakeBorder(a, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)


def unbin2(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool cell mask back to full resolution: each cell's value on its 2×2 pixels (OpenCV's nearest-
    neighbour resize at exactly 2×: 3× faster than two np.repeat)."""
    h, w = shape
    full = cv2.resize(np.ascontiguousarray(m).view(np.uint8), (m.shape[1] * 2, m.shape[0] * 2),
                      interpolation=cv2.INTER_NEAREST)
    return full.view(bool)[:h, :w]


_F16_MAX = np.float32(np.finfo(np.float16).max)
# A buffered frame's values are stored as F16_SCALE × themselves: float16 alone ends at 65504, which a 16-bit
# camera's star core passes once normalised to a brighter reference frame (×1.2), and float or 32-bit FITS data
# passed at once — the bootstrap's frames were clipped there and the stack's brightest pixels came out low
# (0.63–0.92 of their value).  A power of two: each value is the float16 it was (the same bits) from 2^-6 up
# to 2^24·0.99; below 2^-6 (0.0156) its absolute error is 2^-16 — a 16-bit source's own step in [0, 1] data.
F16_SCALE = np.float32(2.0 ** -8)


def _to_float16(x: np.ndarray, out: np.ndarray, scale: np.float32 = F16_SCALE) -> None:
    """float32 ``x`` × ``scale`` -> float16 into ``out``, clipped to its range; ``x`` is clipped and scaled in
    place (no 24 MP temporary).  OpenCV converts (same values, NaN kept): 17 ms per 24 MP plane where numpy
    takes 61.  The scaling is numpy's, then a subtraction of 0 converts (the same bits, −0 kept): OpenCV's
    multiplication by a number, which converted in one call, took 0.40 ms a block of 64 × 6000 where this
    takes 0.06 + 0.20."""
    top = _F16_MAX / scale
    np.clip(x, -top, top, out=x)
    if scale != 1:
        np.multiply(x, scale, out=x)
    cv2.subtract(x, 0.0, dst=out, dtype=cv2.CV_16F)


def _from_float16(x: np.ndarray, scale: np.float32 = F16_SCALE) -> np.ndarray:
    """A buffered float16 block (stored as ``scale`` × its values) as float32; a float32 block as it is.  As
    _to_float16: converted by OpenCV, then scaled by numpy (0.49 → 0.23 ms a block of 64 × 6000, the same bits)."""
    if x.dtype == np.float32:
        return x
    y = cv2.subtract(x, 0.0, dtype=cv2.CV_32F)
    if scale != 1:
        np.multiply(y, np.float32(1 / scale), out=y)
    return y


# Rows per block of the full-resolution pass (even: a block starts on a cell row), unless the frame's source
# says (render.FrameOnGrid.block_rows).  A block of a 24 MP colour frame (3 × 64 rows × 6000 px, 4.6 MB) is
# demosaiced, warped and added while it stays in the cache.
BLOCK_ROWS = 64


def _blocks(n: int, span: tuple[int, int] | None = None, rows: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    """[(r0, r1)] blocks of ``rows`` rows of n (of the rows span = (a, b) only: a a multiple of ``rows``)."""
    a, b = (0, n) if span is None else (span[0], min(n, span[1]))
    return [(r0, min(b, r0 + rows)) for r0 in range(a, b, rows)]


COMBINE_ROWS = 8 * BLOCK_ROWS     # rows of the bootstrap's combination added from every frame at a time


def _anonymous(shape, dtype) -> np.ndarray:
    """A zeroed array on its own anonymous memory map (whose pages _discard_rows can give back), in transparent
    huge pages where the kernel has them, as numpy's own large arrays are (unless NUMPY_MADVISE_HUGEPAGE=0): the
    bootstrap's float16 frames (144 MB each at 24 MP) were 35 000 page faults each in 4 KB pages — half of a
    `livestack stack` run's faults and ~0.3–0.6 s of its system time."""
    n = int(np.prod(shape))
    mm = mmap.mmap(-1, max(1, n * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("NUMPY_MADVISE_HUGEPAGE", "1") != "0":
        mm.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mm, dtype, count=n).reshape(shape)


def _discard_rows(a: np.ndarray, r0: int, r1: int) -> None:
    """Give back the memory pages of rows r0:r1 of every plane of a (P, H, W) array that is done with (their
    values become undefined), when it lies on its own memory map (_anonymous, np.memmap); else nothing."""
    mm = getattr(a, "_mmap", None)
    base = a
    while mm is None and isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base      # (np.frombuffer keeps a memoryview)
        mm = base if isinstance(base, mmap.mmap) else getattr(base, "_mmap", None)
    if mm is None or not a.flags.c_contiguous or len(mm) != a.nbytes:     # (a view of part of a map)
        return
    page = mmap.PAGESIZE
    _, h, w = a.shape
    row = w * a.itemsize
    for p in range(a.shape[0]):
        start, end = (p * h + r0) * row, (p * h + r1) * row
        start, end = -(-start // page) * page, end // page * page      # whole pages inside the rows only
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _saved_points(a: np.ndarray) -> np.ndarray:
    """Saturated points as add_channels takes them: (2, N) rows and cols, every channel's — or, for a stack with
    channel_weights (a drizzle: a sample lands in its own channel only), (3, N) rows, cols and channels."""
    return a if a.ndim == 2 and a.shape[0] == 3 else a.reshape(2, -1)


def _channel_points(saturated, c: int):
    """The (rows, cols) of channel ``c`` among saturated points (see _saved_points), or None."""
    if saturated is None or saturated.shape[0] == 2:
        return saturated
    return saturated[:2, saturated[2] == c]


def _points_by_row(saturated):
    """``in_rows(r0, r1)`` -> (rows − r0, cols) of the (rows, cols) points ``saturated`` (or None) that lie in rows
    r0:r1: sorted by row once, each block's taken by a binary search."""
    if saturated is None or not len(saturated[0]):
        empty = np.empty(0, np.int64)
        return lambda r0, r1: (empty, empty)
    order = np.argsort(saturated[0], kind="stable")
    ys, xs = saturated[0][order], saturated[1][order]

    def in_rows(r0: int, r1: int):
        lo, hi = np.searchsorted(ys, (r0, r1))
        return ys[lo:hi] - r0, xs[lo:hi]

    return in_rows


def _rows_of(channel, n_channels: int):
    """``rows(r0, r1)`` -> [C (r1 - r0, W) arrays] of what add_channels takes: an object's own rows(), or views
    of the planes ``channel(c)`` returns."""
    if hasattr(channel, "rows"):
        return channel.rows
    return lambda r0, r1: [channel(c)[r0:r1] for c in range(n_channels)]


def _median_rows(block: np.ndarray) -> np.ndarray:
    """Per-pixel median over axis 0 of a (K, h, w) float32 array that may hold NaN (missing data).

    K = 3 without NaN — the common case — is a + b + c − max − min (no sort).  Elsewhere the median of the
    present values; with two present, the lower (outliers — satellites, cosmic rays, hot pixels — are bright).
    """
    k = block.shape[0]
    if k == 1:
        return block[0].copy()
    if k == 2:
        return np.fmin(block[0], block[1])
    if k == 3 and not np.isnan(block).any():
        return block.sum(axis=0) - block.max(axis=0) - block.min(axis=0)
    if k == 3:
        # Warped frames always have NaN borders: a sorting network instead of np.sort (0.4–0.6 s of a 24 MP
        # bootstrap), the same values — the middle of three, the lower of two, the one, or NaN.  Its min and
        # max carry NaN, so the cells short of three values are the NaN left, and only those (a footprint's
        # edge) are looked at again: 34 → 16 ms for 1.5 M cells, where a NaN-ignoring network over every cell
        # and a test of all three values' finiteness were two passes each more.
        a, b, c = block
        middle = np.minimum(a, b)
        hi = np.maximum(a, b)
        np.minimum(hi, c, out=hi)
        np.maximum(middle, hi, out=middle)
        short = np.isnan(middle)
        if short.any():
            middle[short] = np.fmin(np.fmin(a[short], b[short]), c[short])    # the lower of two, the one, NaN
        return middle
    srt = np.sort(block, axis=0)                   # NaN sorts last
    n = np.isfinite(block).sum(axis=0)
    lower = np.where(n == 2, 0, (n - 1) // 2)
    return np.take_along_axis(srt, np.maximum(lower, 0)[None], axis=0)[0]


def _times_table(x: np.ndarray, table: np.ndarray, count: np.ndarray, where=None):
    """``x *= table[count]`` for C-contiguous float32 ``x`` and uint16 ``count`` of its shape, the same values
    (the same float32 products), without the gather where it can: once a night has streamed a while nearly every
    cell has the same count — all frames but the few it rejected or that did not cover it — so x is multiplied
    by that count's factor and only the other cells are looked up (a gather of a 24 MP frame's 6 M cells took
    20 ms, against ~4 ms for this).  ``where``: (the usual count, the other cells' flat indices) from an earlier
    call with this ``count``, or None (found here).  Returns it, for the next call."""
    cnt = count.reshape(-1)
    if where is None:
        mode = int(count[tuple(n // 2 for n in count.shape)]) if cnt.size else 0   # the middle cell's: the usual
        where = (mode, np.flatnonzero(cnt != mode))
    mode, idx = where
    if len(idx) > len(cnt) // 8 or not x.flags.c_contiguous:   # no count dominates (the first frames): the gather
        x *= table[count]
        return where
    flat = x.reshape(-1)                # a view: x is C-contiguous
    others = flat[idx] * table[cnt[idx]]
    x *= table[mode]
    flat[idx] = others
    return where


def _sharpen_covered(plane: np.ndarray, taps: tuple[float, ...], weak: np.ndarray | None = None) -> None:
    """``plane`` (NaN where nothing covers) filtered in place by the symmetric kernel ``taps`` (2r + 1 of them)
    along both axes where the pixel and its (2r + 1)² neighbours are covered and none is ``weak`` (True: no
    value of its own worth sharpening); the others keep their values: a footprint's edge, and the edge of a
    saturated star — its core holds saturated samples only (weight 1e-6 each), and the pixels around it the
    few unsaturated samples that happened to land there, so the mean steps from the clipped level down by
    thousands of ADU within a pixel; the taps (−0.39 beside 1.69 at pixfrac 1) turned that step into a ring of
    −5 000 … −16 000 ADU on a sky of 420.

    Where the taps read a step sharper than the boxes they undo — a drizzle of few frames, each pixel the mean
    of one to three samples, beside a bright star — they overshoot below everything they read: the value is
    raised to the least of its (2r + 1)² neighbours less RING_FLOOR of their range.  (Seestar S50 M94 night 2,
    six frames at ×2: pixels below the sky by 5 σ 5 985 / 2 845 / 6 266 in R / G / B → 87 / 204 / 65, the
    deepest −285 σ → −87 σ; on 20 dithered simulated frames the stars' FWHM unchanged.  It bites sky noise's
    own overshoots too, seldom: the mean of a drizzle-like sky (white noise under a 2×2 box) +0.045 σ at pixfrac
    1, +0.001 σ at 0.6 — as little as the warps' clamp below bicubic and Lanczos, +0.03 and +0.1 σ.)"""
    k = np.asarray(taps, np.float32)
    r = len(k) // 2
    nan = np.isnan(plane)
    if weak is not None:
        nan |= weak
    filled = np.where(nan, np.float32(0), plane)
    box = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    floor = cv2.erode(filled, box, borderType=cv2.BORDER_REFLECT_101)
    span = cv2.dilate(filled, box, borderType=cv2.BORDER_REFLECT_101)
    span -= floor
    span *= np.float32(RING_FLOOR)
    floor -= span                       # (pixels that read an uncovered one keep their values below)
    cv2.sepFilter2D(filled, -1, k, k, dst=filled, borderType=cv2.BORDER_REFLECT_101)
    np.maximum(filled, floor, out=filled)
    if nan.any():
        nan = cv2.dilate(nan.view(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).view(bool)
        np.copyto(plane, filled, where=~nan)
    else:
        np.copyto(plane, filled)


WEAK_WEIGHT = 1e-4      # see RunningStack._weak_weight
RING_FLOOR = 0.25       # see _sharpen_covered


class RunningStack:
    """Accumulates (C, H, W) float32 frames already on the stack grid, normalised, NaN outside their footprint.

    Memory: C + 1 float32 planes of (H, W) and four quarter planes, allocated when the bootstrap ends; during
    the bootstrap ``bootstrap`` float16 frames.
    """

    def __init__(self, shape: tuple[int, int, int], sky: np.ndarray, p: StackParams,
                 lum_weights: np.ndarray | None = None, cell_samples: np.ndarray | None = None, *, pool=None,
                 channel_weights: bool = False, sharpen: tuple[float, ...] = ()):
        """``channel_weights``: each channel has its own weight per pixel (a drizzle: a sample lands in its own
        colour plane, through its footprint) — ``channel(c)`` gives (value, coverage) planes and the frame counts
        w·coverage there; the weights are then (C, H, W) instead of (H, W).  ``sharpen``: with channel_weights,
        the mean is filtered along each axis by these taps (drizzle.compensation: 5) — where a pixel and its
        5×5 neighbours are covered; the sums are not: an output, like the mean itself."""
        self.channel_weights = bool(channel_weights)
        self.sharpen = tuple(float(t) for t in sharpen) if channel_weights else ()
        self._pool = pool                       # a shared ThreadPoolExecutor (not shut down by close())
        self._own_pool = pool is None
        self.spill_dir: Path | None = None      # set by spill(): arrays live in memory-mapped files there
        self.shape = tuple(int(s) for s in shape)
        self.cells = ((self.shape[1] + 1) // 2, (self.shape[2] + 1) // 2)
        self.sky = np.asarray(sky, np.float32).reshape(-1)
        c = self.shape[0]
        lw = np.full(c, 1.0 / c) if lum_weights is None else np.asarray(lum_weights, np.float64).reshape(-1)
        if lw.shape != (c,) or not np.isclose(lw.sum(), 1.0) or (lw < 0).any():
            raise ValueError(f"lum_weights must be {c} non-negative numbers summing to 1 (got {lw})")
        self.lum_weights = lw
        # Independent samples of each channel's noise in a cell: 2 for debayered and warped pixels (the 4 of a
        # cell half correlated: debayering and the warp interpolate); the pipeline knows better (Bayer cell:
        # 1 R, 2 G, 1 B).
        ns = np.full(c, 2.0) if cell_samples is None else np.asarray(cell_samples, np.float64).reshape(-1)
        if ns.shape != (c,) or (ns <= 0).any():
            raise ValueError(f"cell_samples must be {c} positive numbers (got {ns})")
        self.cell_samples = ns
        self.sky_lum = np.float32(lw @ self.sky)
        self.p = p
        self.sums: np.ndarray | None = None      # (C, H, W) Σ w·x_c
        self.wsum: np.ndarray | None = None      # (H, W) Σ w — per channel, (C, H, W), with channel_weights
        self.lsum: np.ndarray | None = None      # cells: Σ w·(b − b_sky)   (b: 2×2-binned luminance)
        self.lw: np.ndarray | None = None        # cells: Σ w
        self.sq: np.ndarray | None = None        # cells: Σ w·(b − b_sky)²
        self.count: np.ndarray | None = None     # cells: uint16 frames contributing
        # bootstrap: (float16 (C, H, W) frame — with channel_weights (2C, H, W): values, then coverages —,
        #             weight, noise, saturated or None, float32 cells − sky)
        self.buffer: list[tuple[np.ndarray, float, np.ndarray, np.ndarray | None, np.ndarray]] = []
        self.frames = 0
        self.rejected_total = 0
        self.bootstrap_rejected: list[int] = []

    # ------------------------------------------------------------------ adding

    def add(self, img: np.ndarray, weight: float, noise: np.ndarray, *,
            saturated: np.ndarray | None = None) -> int | None:
        """Add one (C, H, W) frame; ``img`` may be modified (NaN and rejected pixels are zeroed in place).

        ``noise``: (C,) per-pixel background σ of this frame in stack units.  ``saturated``: an (H, W) bool mask
        or the (rows, cols) of the saturated pixels — with channel_weights also (rows, cols, channels): each
        flags its own channel only —; they count with ``saturated_weight`` × the frame's weight,
        so only where no frame has a better value.  Returns the number of pixels
        rejected as outliers, or None while the frame waits in the bootstrap buffer (its rejections are counted
        in ``bootstrap_rejected`` when the buffer is combined).
        """
        if img.shape != self.shape:
            raise ValueError(f"frame shape {img.shape} does not match the stack {self.shape}")
        return self.add_channels(self.cells_of(img), lambda c: img[c], weight, noise, saturated=saturated)

    def _points(self, saturated) -> np.ndarray | None:
        """None, an (H, W) bool mask or (rows, cols) -> a new (2, N) int32 array of (rows, cols), or None."""
        if saturated is None:
            return None
        if isinstance(saturated, np.ndarray) and saturated.dtype == bool:
            if saturated.shape != self.shape[1:]:
                raise ValueError(f"saturated mask {saturated.shape} does not match the stack {self.shape[1:]}")
            saturated = np.nonzero(saturated)
        pts = _saved_points(np.array(saturated, np.int32))
        return pts if pts.shape[1] else None

    def cells_of(self, img: np.ndarray) -> np.ndarray:
        """The binned luminance of a (C, H, W) frame on this stack's cell grid (what add_channels takes)."""
        return bin2(_luminance(img, self.lum_weights))

    def add_channels(self, cells: np.ndarray, channel, weight: float, noise: np.ndarray, *,
                     saturated: np.ndarray | None = None, rows_done=None, combine: bool = False) -> int | None:
        """Add one frame given as its binned luminance ``cells`` (``self.cells`` float32: the 2×2 means of
        Σ lum_weights[c]·x_c, NaN outside the footprint) and its pixels, either

        - ``channel(c)``, which returns channel c as an (H, W) float32 array, NaN outside the footprint; or
        - an object with ``rows(r0, r1)`` (render.FrameOnGrid), which returns rows r0:r1 of every channel as a
          list of C (r1 - r0, W) float32 arrays, NaN outside the footprint, called once per block of rows
          from the worker threads: the pipeline makes each block there (demosaic and warp), so a frame never
          exists whole at full resolution.

        With ``channel_weights`` only ``channel(c)`` is taken, and it returns (value, coverage): the coverage
        ≥ 0 scales the frame's weight per pixel (0: nothing landed; the value is then ignored); it stays valid
        until the next call (one buffer may be reused: a drizzle makes one channel at a time).
        ``cells`` and the arrays returned may be modified.  ``saturated`` as in add().  ``rows_done(r0, r1)``:
        called from the worker threads as each block of rows has taken this frame's pixels (after the bootstrap,
        without channel_weights — else never): what the last frame of a batch writes its stack file with as
        the rows become final (outputs.FinalStream).  ``combine``: a frame that fills the bootstrap buffer
        (fills_bootstrap) is combined with the frames buffered at once — see _combine_with — instead of being
        buffered for finish_bootstrap(); the caller says so when nothing will leave a buffered frame out first
        (FilterStack.first_verdict).  Returns as add()."""
        saturated = self._points(saturated)
        if cells.shape != self.cells:
            raise ValueError(f"cells shape {cells.shape} does not match the stack's {self.cells}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (got {weight})")
        if self.channel_weights and hasattr(channel, "rows"):
            raise ValueError("a stack with channel_weights takes channel(c) -> (value, coverage)")
        noise = np.asarray(noise, np.float32).reshape(-1)
        self.frames += 1
        if self.bootstrap_full:
            self.finish_bootstrap()
        if combine and self.fills_bootstrap:
            self._combine_with(cells, channel, weight, noise, saturated)
            return None
        if self.sums is None and self.p.bootstrap > 1:
            c_n = self.shape[0]
            shape16 = (2 * c_n,) + self.shape[1:] if self.channel_weights else self.shape
            frame16 = self._new(shape16, np.float16) if self.spill_dir is not None else _anonymous(shape16, np.float16)
            if self.channel_weights:
                for c in range(c_n):
                    x, a = channel(c)
                    _to_float16(a, frame16[c_n + c], np.float32(1))     # coverage: 0…~4, stored as it is
                    _to_float16(np.nan_to_num(x, copy=False), frame16[c])
            else:
                rows = _rows_of(channel, c_n)

                def to16(r: tuple[int, int]) -> None:
                    for c, x in enumerate(rows(*r)):
                        _to_float16(x, frame16[c, r[0]:r[1]])

                self.parallel_map(to16, _blocks(self.shape[1], rows=getattr(channel, "block_rows", BLOCK_ROWS)))
            b = cells - self.sky_lum
            if self.spill_dir is not None:
                b = self._new(b.shape, b.dtype, like=b)
            self.buffer.append((frame16, float(weight), noise, saturated, b))
            return None
        if self.sums is None:
            self._allocate()
        b = cells
        b -= self.sky_lum
        bad = np.empty(self.cells, bool)

        def judge(rows: tuple[int, int]) -> None:
            # one row of cells either side: the growth of strong outliers (a 3×3 dilation) crosses chunks, so
            # the cells judged do not depend on where the chunks end (as in the bootstrap's combination) —
            # every chunk is judged before any adds its cells to the statistics the halo reads
            r0, r1 = rows
            a, e = max(0, r0 - 1), min(b.shape[0], r1 + 1)
            bad[r0:r1] = self._stream_outliers(b[a:e], noise, a, e)[r0 - a:r1 - a]

        def add(rows: tuple[int, int]) -> int:
            r0, r1 = rows
            valid = np.isfinite(b[r0:r1]) & ~bad[r0:r1]
            self._accumulate_cells(b[r0:r1], valid, weight, self.lsum[r0:r1], self.lw[r0:r1], self.sq[r0:r1],
                                   self.count[r0:r1])
            return int(bad[r0:r1].sum())

        # Row blocks are independent and numpy releases the GIL in elementwise loops: use the cores.
        chunks = list(self._chunks(self.cells[0]))
        self.parallel_map(judge, chunks)
        rejected = 4 * sum(self.parallel_map(add, chunks))
        self._accumulate_pixels(channel, bad, weight, saturated, on_block=rows_done)
        self.rejected_total += rejected
        return rejected

    @property
    def fills_bootstrap(self) -> bool:
        """The next frame added fills the bootstrap buffer (without channel_weights: see add_channels' combine)."""
        return (self.sums is None and self.p.bootstrap > 1 and len(self.buffer) == self.p.bootstrap - 1
                and not self.channel_weights)

    def _combine_with(self, cells: np.ndarray, channel, weight: float, noise: np.ndarray, saturated) -> None:
        """The frame that fills the bootstrap buffer and the frames buffered, combined as finish_bootstrap()
        combines a full buffer — the same cells judged, the same sums in the same order — but this frame's
        pixels go into the accumulators as each block of rows is made, beside the same rows of the buffered
        frames, instead of into a float16 frame of its own that the combination reads back (its values are
        then the float32 ones, not float16's).  The buffered frames' rows are given back as they are added.
        `livestack stack` of 8 × 24 MP frames: 0.3 s less CPU (median of five pairs; wall time within this VM's
        noise), a float16 frame (144 MB) less at the bootstrap's end."""
        b = cells
        b -= self.sky_lum
        frames = self.buffer + [(None, float(weight), noise, saturated, b)]
        self._allocate()
        bads, self.bootstrap_rejected = self._combine_cells(frames, self.lsum, self.lw, self.sq, self.count)
        self.rejected_total += sum(self.bootstrap_rejected)
        buffered, self.buffer = self.buffer, []
        adds = [self._pixel_adder(bads[i], wt, sat, self.sums, self.wsum) for i, (_, wt, _, sat, _) in
                enumerate(frames)]
        rows, c_n = _rows_of(channel, self.shape[0]), self.shape[0]

        def block(r: tuple[int, int]) -> None:
            r0, r1 = r
            for (f16, *_), add in zip(buffered, adds):
                add([f16[c, r0:r1] for c in range(c_n)], r0, r1)
            adds[-1](rows(r0, r1), r0, r1)
            for f16, *_ in buffered:
                _discard_rows(f16, r0, r1)

        self.parallel_map(block, _blocks(self.shape[1], rows=getattr(channel, "block_rows", BLOCK_ROWS)))

    @property
    def bootstrap_full(self) -> bool:
        """The bootstrap buffer holds all its frames and waits to be combined: finish_bootstrap() does it, or
        the next add().  The owner may free its own frame-sized buffers first (the combination allocates the
        accumulators while the buffer still exists: it may be the session's memory peak, combination_excess)."""
        return self.sums is None and self.p.bootstrap > 1 and len(self.buffer) >= self.p.bootstrap

    def combination_excess(self) -> int:
        """Bytes by which the bootstrap's combination outgrows the steady state: the full buffer's frames (float16
        pixels and their cells) less the accumulators that replace them — the combination gives each span of
        the frames' rows back as the accumulators' rows fill (consume), so it holds about the larger of the
        two.  Small for a colour stack of three frames (24 MP: 432 + 72 MB buffered, 468 MB of accumulators:
        +36 MB), below 0 for mono; large when drizzled (coverage planes too) or with a longer bootstrap."""
        c, h, w = self.shape
        cells = self.cells[0] * self.cells[1]
        planes = 2 * c if self.channel_weights else c
        buffered = max(self.p.bootstrap, 0) * (planes * h * w * 2 + cells * 4)
        accumulators = c * h * w * 4 + (c if self.channel_weights else 1) * h * w * 4 + cells * (3 * 4 + 2)
        return buffered - accumulators

    def drop(self, i: int = 0) -> None:
        """Leave buffered frame ``i`` out (judged bad once others were in: FilterStack.judge_first)."""
        if self.sums is not None or not 0 <= i < len(self.buffer):
            raise ValueError("only a frame still in the bootstrap buffer can be left out")
        del self.buffer[i]
        self.frames -= 1

    def finish_bootstrap(self) -> None:
        """Clip the buffered frames against their per-cell median and start the accumulators from them."""
        if not self.bootstrap_full:
            return
        self._allocate()
        self.bootstrap_rejected = self._combine_buffer(self.sums, self.wsum, self.lsum, self.lw, self.sq,
                                                       self.count, consume=True)
        self.rejected_total += sum(self.bootstrap_rejected)
        self.buffer = []

    def _allocate(self) -> None:
        c, h, w = self.shape
        self.sums = self._new((c, h, w), np.float32)
        self.wsum = self._new((c, h, w) if self.channel_weights else (h, w), np.float32)
        self.lsum, self.lw, self.sq = (self._new(self.cells, np.float32) for _ in range(3))
        self.count = self._new(self.cells, np.uint16)

    # ------------------------------------------------------------------ memory: arrays that may live on disk

    def _new(self, shape, dtype, like: np.ndarray | None = None) -> np.ndarray:
        """A zeroed array (or a copy of ``like``): in memory, or after spill() in a memory-mapped file of
        ``spill_dir`` that is unlinked at once — the mapping keeps it alive, the space is freed when the array
        goes, and a crash leaves no file behind."""
        if self.spill_dir is None:
            return np.zeros(shape, dtype) if like is None else np.array(like, dtype)
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".stack-", suffix=".dat", dir=self.spill_dir)
        except OSError:
            return np.zeros(shape, dtype) if like is None else np.array(like, dtype)
        # Unlinked before anything else: a kill while the blocks are reserved (on exFAT/vfat posix_fallocate
        # writes every one of them: seconds at 24 MP) left a file as big as the array that nothing removed.
        os.unlink(name)
        try:
            # The blocks are reserved now: a full disk is an error here (the array stays in memory), not a
            # SIGBUS later when the kernel writes a page back.
            os.posix_fallocate(fd, 0, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            with open(fd, "r+b", closefd=False) as f:    # the mapping keeps its own descriptor
                a = np.memmap(f, dtype=dtype, mode="r+", shape=tuple(shape))
        except OSError:
            a = None
        finally:
            os.close(fd)
        if a is None:
            return np.zeros(shape, dtype) if like is None else np.array(like, dtype)
        if like is not None:
            a[...] = like
        return a

    @property
    def nbytes(self) -> int:
        """Bytes of the stack's frame-sized arrays (accumulators and bootstrap frames)."""
        total = sum(getattr(self, k).nbytes for k in self._ARRAYS if getattr(self, k) is not None)
        return total + sum(b[0].nbytes + b[4].nbytes for b in self.buffer)

    def spill(self, folder: Path | str) -> None:
        """Move the frame-sized arrays into memory-mapped files in ``folder`` (and allocate later ones there):
        after release() they cost no resident memory until they are used again.  For the stacks of filters not
        being captured; idempotent."""
        if self.spill_dir is not None:
            return
        self.spill_dir = Path(folder)
        for k in self._ARRAYS:
            a = getattr(self, k)
            if a is not None:
                setattr(self, k, self._new(a.shape, a.dtype, like=a))
        self.buffer = [(self._new(f.shape, f.dtype, like=f), wt, noise, sat, self._new(b.shape, b.dtype, like=b))
                       for f, wt, noise, sat, b in self.buffer]

    def release(self) -> None:
        """Give the resident pages of spilled arrays back (their data stays in the mapped files: the kernel
        writes dirty pages back and reads them in again on the next use).  A no-op for an in-memory stack."""
        if self.spill_dir is None:
            return
        arrays = [getattr(self, k) for k in self._ARRAYS] + [a for f, *_, b in self.buffer for a in (f, b)]
        for a in arrays:
            mm = getattr(a, "_mmap", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)

    def parallel_map(self, fn, items) -> list:
        """[fn(i) for i in items] on the stack's worker threads (numpy and OpenCV release the GIL): the
        pipeline uses them for its own row blocks too."""
        if self.p.threads <= 1 or len(items) < 2:
            return [fn(i) for i in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.p.threads, thread_name_prefix="stack")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        """Stop the worker threads (they also stop when the stack is garbage-collected); a shared pool is
        its owner's to stop."""
        pool = getattr(self, "_pool", None)
        if pool is not None and self._own_pool:
            pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(self, "_own_pool", False):
            pool.shutdown(wait=False)

    def _cell_noise2(self, noise: np.ndarray) -> np.float32:
        """Background variance of a cell of the binned luminance: Σ w_c² σ_c² / n_c, the channels independent,
        n_c samples of channel c in a cell (``cell_samples``).  A warp after the binning only lowers it (its
        interpolation averages), so this errs on the side of fewer false rejections."""
        var = np.sum(self.lum_weights ** 2 * noise.astype(np.float64) ** 2 / self.cell_samples)
        return np.float32(var)

    def _stream_outliers(self, b, noise, r0, r1) -> np.ndarray:
        """Cells of ``b`` (binned luminance − sky) that are outliers against the running statistics."""
        p = self.p
        lw, count = self.lw[r0:r1], self.count[r0:r1]
        with np.errstate(invalid="ignore", divide="ignore"):
            inv_w = np.float32(1.0) / lw
            mean = self.lsum[r0:r1] * inv_w                              # running mean − sky
            var = self.sq[r0:r1] * inv_w - mean * mean                   # weighted population variance
        bessel, mean_noise = self._factor_tables()
        kept = _times_table(var, bessel, count)                          # n/(n-1): an unbiased estimate
        floor = self._cell_noise2(noise)
        signal = np.maximum(mean, 0) * np.float32(p.rel_floor)
        signal *= signal
        signal += floor
        if p.min_empirical:     # the old rule: a cell's own scatter alone from min_empirical frames on
            np.copyto(signal, floor, where=count >= p.min_empirical)
        np.maximum(var, signal, out=var)
        _times_table(var, mean_noise, count, kept)                       # 1 + 1/n: the mean's own noise
        bad = self._threshold(b, mean, var)
        bad &= count > 0  # first frame on a cell: nothing to compare against
        return bad

    def _factor_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Lookup tables indexed by the uint16 frame count: n/(n-1) and 1 + 1/n (cheaper than computing)."""
        t = getattr(self, "_ftab", None)
        if t is None:
            n = np.arange(65536, dtype=np.float64)
            t = self._ftab = ((n / np.maximum(n - 1, 1)).astype(np.float32),
                              (1 + 1 / np.maximum(n, 1)).astype(np.float32))
        return t

    def _threshold(self, b, centre, var) -> np.ndarray:
        k2 = np.float32(self.p.kappa ** 2)
        with np.errstate(invalid="ignore"):
            d2 = (b - centre) ** 2
            bad = d2 > k2 * var
            if self.p.grow:
                strong = d2 > 4 * k2 * var
                if strong.any():
                    bad |= cv2.dilate(strong.view(np.uint8), _GROW).astype(bool)
        return bad

    def _combine_buffer(self, sums, wsum, lsum, lw, sq, count, *, consume: bool = False) -> list[int]:
        """Clip the buffered frames against their per-cell median luminance and accumulate the survivors.
        A cell never loses every frame: where all are rejected, the one closest to the median stays."""
        frames = list(self.buffer)
        bads, rejected = self._combine_cells(frames, lsum, lw, sq, count)
        if consume:         # finish_bootstrap: the frames go as they are added (the session's memory peak)
            self.buffer = []
        # The pixels a span of rows at a time, every frame's: the frames' rows added are given back (consume)
        # while the accumulators' pages fill, so the two are not resident whole at once (432 + 468 MB at 24 MP)
        h = self.shape[1]
        for a in range(0, h, COMBINE_ROWS):
            for i, (f16, wt, _, sat, _) in enumerate(frames):
                self._accumulate_pixels(self._buffered(f16), bads[i], wt, sat, sums, wsum, span=(a, a + COMBINE_ROWS))
                if consume:
                    _discard_rows(f16, a, min(h, a + COMBINE_ROWS))
        return rejected

    def _combine_cells(self, frames: list, lsum, lw, sq, count) -> tuple[np.ndarray, list[int]]:
        """The bootstrap's frames (as the buffer holds them) judged cell by cell against their median luminance,
        and the cells kept added to the cells' statistics: -> ((K, cells) bool rejected cells, each frame's
        rejected pixels)."""
        k = len(frames)
        # Variance of (b − centre) in units of one frame's: the centre's own noise counts too
        # (median of K: ≈ π/2 · σ²/K; with two frames the centre is one of them).
        centre_var = np.float32(1.0 if k == 2 else (np.pi / 2) / max(k, 1))
        rel = np.float32(self.p.rel_floor)
        lums = np.stack([b for *_, b in frames])                        # (K, cells) − sky
        floors = [self._cell_noise2(noise) for _, _, noise, _, _ in frames]
        bads = np.empty(lums.shape, bool)
        n_cells = lums.shape[1]

        def judge(rows: tuple[int, int]) -> None:
            # one row of cells either side: the growth of strong outliers (a 3×3 dilation) crosses chunks
            r0, r1 = rows
            a, e = max(0, r0 - 1), min(n_cells, r1 + 1)
            part = lums[:, a:e]
            centre = _median_rows(part)
            signal = np.maximum(centre, 0) * rel
            signal *= signal
            bad = np.stack([self._threshold(part[i], centre, (floors[i] + signal) * (1 + centre_var))
                            for i in range(k)])
            if k > 1:
                everyone = np.flatnonzero(np.logical_and.reduce(bad))
                if len(everyone):       # (a few cells: the deviations of those only, not of the whole chunk)
                    flat = part.reshape(k, -1)[:, everyone]
                    dev = np.abs(flat - centre.reshape(-1)[everyone])
                    keep = np.argmin(np.where(np.isnan(dev), np.inf, dev), axis=0)
                    bad.reshape(k, -1)[keep, everyone] = False
            bads[:, r0:r1] = bad[:, r0 - a:r1 - a]

        # Row chunks are independent (but for the growth's halo): the cores share the cells' work too
        self.parallel_map(judge, list(self._chunks(n_cells)))
        rejected = []
        for i, (_, wt, _, _, _) in enumerate(frames):
            rejected.append(4 * int(np.count_nonzero(bads[i])))

            def add_cells(rows: tuple[int, int], i=i, wt=wt) -> None:
                r0, r1 = rows
                b = lums[i, r0:r1]
                self._accumulate_cells(b, np.isfinite(b) & ~bads[i, r0:r1], wt, lsum[r0:r1], lw[r0:r1],
                                       sq[r0:r1], count[r0:r1])

            self.parallel_map(add_cells, list(self._chunks(n_cells)))
        return bads, rejected

    def _accumulate_cells(self, b, valid, weight, lsum, lw, sq, count) -> None:
        """Cells (``b`` = binned luminance − sky): Σ w·b, Σ w, Σ w·b², n += 1 where valid (``b`` is modified)."""
        np.copyto(b, 0, where=~valid)
        w = float(weight)
        cv2.add(lw, w, dst=lw, mask=valid.view(np.uint8))
        cv2.scaleAdd(b, w, lsum, dst=lsum)
        cv2.scaleAdd(cv2.multiply(b, b), w, sq, dst=sq)
        count += valid

    def _buffered(self, f16: np.ndarray):
        """channel(c) of a buffered float16 frame."""
        if self.channel_weights:
            c_n = self.shape[0]
            return lambda c: (f16[c], f16[c_n + c])
        return lambda c: f16[c]

    def _accumulate_pixels(self, channel, bad_cells, weight, saturated, sums=None, wsum=None, span=None, *,
                           on_block=None) -> None:
        """Full resolution: W += w and S_c += w·x_c where valid — inside the footprint (channel 0 not NaN: every
        channel shares it) and not in a rejected cell — a block of rows at a time, every channel of a block
        while it is in the cache.  ``channel``: as add_channels takes it (or a buffered frame's float16
        channels, converted block by block); its arrays are modified (zeroed where not valid).  ``span``:
        (a, b), only the blocks of rows a:b (a a multiple of BLOCK_ROWS).  ``on_block(r0, r1)``: called as each
        block is done (not with channel_weights).

        Saturated pixels (``saturated``: (rows, cols) on the grid, or None) are left out of the block passes
        and added with the weight w·saturated_weight by fancy indexing: they are few, and a per-pixel weight
        map would cost each block with one saturated star a full extra pass per channel."""
        sums = self.sums if sums is None else sums
        wsum = self.wsum if wsum is None else wsum
        if self.channel_weights:
            return self._accumulate_covered(channel, bad_cells, weight, saturated, sums, wsum, span)
        rows = _rows_of(channel, self.shape[0])
        add = self._pixel_adder(bad_cells, weight, saturated, sums, wsum)

        def block(r: tuple[int, int]) -> None:
            add(rows(*r), *r)
            if on_block is not None:
                on_block(*r)

        self.parallel_map(block, _blocks(self.shape[1], span, getattr(channel, "block_rows", BLOCK_ROWS)))

    def _pixel_adder(self, bad_cells, weight, saturated, sums, wsum):
        """``add(xs, r0, r1)``: rows r0:r1 of one frame — ``xs``, its C (r1 − r0, W) arrays, float32 or a buffered
        frame's float16 — into ``sums`` and ``wsum`` as _accumulate_pixels adds them (from any thread; the
        arrays are modified)."""
        w = self.shape[2]
        w_frame, w_sat = float(weight), np.float32(weight * self.p.saturated_weight)
        sat_in = _points_by_row(saturated)

        def add(rows, r0: int, r1: int) -> None:
            xs = [_from_float16(x) for x in rows]
            valid = np.isfinite(xs[0])                  # inside the footprint …
            cells = np.flatnonzero(bad_cells[r0 // 2:(r1 + 1) // 2])     # … and not in a rejected cell (r0 even):
            if len(cells):                              # a few of a block's thousands, so their pixels by index
                ci, cj = np.divmod(cells, bad_cells.shape[1])
                for i in (np.minimum(2 * ci, r1 - r0 - 1), np.minimum(2 * ci + 1, r1 - r0 - 1)):
                    for j in (np.minimum(2 * cj, w - 1), np.minimum(2 * cj + 1, w - 1)):
                        valid[i, j] = False
            ys, xx = sat_in(r0, r1)
            if len(ys):
                ok = valid[ys, xx]
                valid[ys, xx] = False                   # saturated: out of the block passes
                vals = [x[ys, xx] for x in xs]
                wsum[r0 + ys[ok], xx[ok]] += w_sat
                for c, v in enumerate(vals):
                    sums[c, r0 + ys[ok], xx[ok]] += w_sat * v[ok]
            # The pixels left out are few (a footprint's edge, rejected cells): W += w everywhere and their old
            # values put back, their x zeroed by index — not masked passes over the block (the same values)
            out = np.flatnonzero(~valid) if not valid.all() else cells[:0]
            if len(out) > valid.size // 8:
                cv2.add(wsum[r0:r1], w_frame, dst=wsum[r0:r1], mask=valid.view(np.uint8))
                invalid = ~valid
                for x in xs:
                    np.copyto(x, 0, where=invalid)
            else:
                oy, ox = np.divmod(out, w)
                kept = wsum[r0 + oy, ox]
                cv2.add(wsum[r0:r1], w_frame, dst=wsum[r0:r1])
                wsum[r0 + oy, ox] = kept
                for x in xs:
                    x[oy, ox] = 0
            for c, x in enumerate(xs):
                cv2.scaleAdd(x, w_frame, sums[c, r0:r1], dst=sums[c, r0:r1])

        return add

    def _accumulate_covered(self, channel, bad_cells, weight, saturated, sums, wsum, span=None) -> None:
        """_accumulate_pixels with a weight per channel and pixel: W_c += w·a_c and S_c += w·a_c·x_c where the
        cell is not rejected and a_c > 0.  Saturated pixels count with saturated_weight × that."""
        chunks = _blocks(self.shape[1], span)
        for c in range(self.shape[0]):
            x, a = channel(c)
            sat_in = _points_by_row(_channel_points(saturated, c))

            def block(rows, x=x, a=a, c=c):
                r0, r1 = rows
                ab = _from_float16(a[r0:r1], np.float32(1))
                xb = _from_float16(x[r0:r1])
                ys, xs = sat_in(r0, r1)
                if len(ys):
                    ab[ys, xs] *= np.float32(self.p.saturated_weight)
                ok = unbin2(bad_cells[r0 // 2:(r1 + 1) // 2], (r1 - r0, self.shape[2]))    # rejected …
                ok = np.logical_not(ok, out=ok) & (ab > 0)                                  # … to kept
                np.copyto(ab, 0, where=~ok)
                np.copyto(xb, 0, where=~ok)
                ab *= np.float32(weight)
                wsum[c, r0:r1] += ab
                xb *= ab
                sums[c, r0:r1] += xb

            self.parallel_map(block, chunks)

    def _chunks(self, n: int):
        for r0 in range(0, n, self.p.chunk_rows):
            yield r0, min(n, r0 + self.p.chunk_rows)

    # ------------------------------------------------------------------ reading

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 weighted mean (0 where no frame covers) and (H, W) float32 sum of weights, both
        new arrays.  During the bootstrap the buffered frames are combined into temporaries (buffer kept)."""
        c, h, w = self.shape
        if self.sums is None:
            sums = np.zeros((c, h, w), np.float32)
            wsum = np.zeros((c, h, w) if self.channel_weights else (h, w), np.float32)
            if self.buffer:
                cells = [np.zeros(self.cells, np.float32) for _ in range(3)]
                self._combine_buffer(sums, wsum, *cells, np.zeros(self.cells, np.uint16))
        else:
            sums, wsum = self.sums, self.wsum
        mean, w2 = self._mean(sums, wsum)
        return zero_nan(mean), w2

    def _weight_map(self, wsum: np.ndarray) -> np.ndarray:
        """(n, W) float32 weight map (a new array) of rows of the weights: themselves, or with channel_weights
        Σ lum_weights[c]·W_c — 0 only where no channel has a sample."""
        if not self.channel_weights:
            return np.array(wsum, np.float32)
        return np.tensordot(self.lum_weights.astype(np.float32), wsum, axes=1).astype(np.float32, copy=False)

    def _mean(self, sums: np.ndarray, wsum: np.ndarray, channels=None, *,
              sharpen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(len(channels), n, W) weighted mean (default: every channel), NaN where no frame covers, and the
        (n, W) weight map (new arrays) from rows of the sums and weights.  With channel_weights a pixel that
        one channel has no sample of yet (a drizzle's first frames) takes that channel from its 5×5
        neighbourhood — no holes inside the covered area."""
        w2 = self._weight_map(wsum)
        if not self.channel_weights:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = ((sums if channels is None else sums[list(channels)]) / wsum[None]).astype(np.float32,
                                                                                               copy=False)
            np.copyto(mean, np.float32(np.nan), where=~(wsum > 0)[None])
            return mean, w2
        channels = range(sums.shape[0]) if channels is None else channels
        mean = np.empty((len(channels),) + wsum.shape[1:], np.float32)
        for i, c in enumerate(channels):
            with np.errstate(invalid="ignore", divide="ignore"):
                np.divide(sums[c], wsum[c], out=mean[i])
            missing = ~(wsum[c] > 0)
            np.copyto(mean[i], np.float32(np.nan), where=missing)
            holes = missing & (w2 > 0)
            if holes.any():
                k = (5, 5)
                s_b = cv2.boxFilter(np.asarray(sums[c], np.float32), -1, k, normalize=False,
                                    borderType=cv2.BORDER_REFLECT)
                w_b = cv2.boxFilter(np.asarray(wsum[c], np.float32), -1, k, normalize=False,
                                    borderType=cv2.BORDER_REFLECT)
                # only where a neighbour has a sample: OpenCV's running sums leave residues (s_b −1.5e-11 over
                # a w_b of exactly 0 at a ×3 grid's edge gave −inf — −3.4e38 in stack.fits); counted exactly
                n_b = cv2.boxFilter((wsum[c] > 0).view(np.uint8), cv2.CV_32F, k, normalize=False,
                                    borderType=cv2.BORDER_REFLECT)
                fill = holes & (n_b > 0.5) & (w_b > 0)
                mean[i][fill] = s_b[fill] / w_b[fill]
            if self.sharpen and sharpen:
                _sharpen_covered(mean[i], self.sharpen, (wsum[c] > 0) & (wsum[c] < self._weak_weight()))
        return mean, w2

    def _weak_weight(self) -> np.float32:
        """A drizzle pixel's weight in one channel below which (above 0) it holds no value of its own worth
        sharpening (_sharpen_covered): 1e-4 of a frame per frame stacked.  Saturated samples count 1e-6 of their
        frame's weight, so a pixel of saturated samples only stays below it, and so does a sliver of a drop's
        corner; a pixel with one real sample of a tenth of a frame's footprint, of a weight of 0.05 (a frame
        four times shorter), over 50 frames, is above it.  (A pixel without a sample of the channel yet — most
        of a colour plane in a drizzle's first frames — takes its neighbours' and is sharpened as they are.)  A
        number of the stack, not of the rows at hand: the mean is the same written whole or in blocks."""
        return np.float32(WEAK_WEIGHT * max(self.frames, 1))

    def mean_blocks(self):
        """The weighted mean, channel by channel in blocks of rows (FITS order), each a new float32 array, 0 where
        no frame covers: for writing the stack without building it whole (nor, in the bootstrap, combining it
        whole: see _bootstrap_rows)."""
        for c in range(self.shape[0]):
            for r0, r1 in self._chunks(self.shape[1]):
                if self.sums is None:
                    m = self._bootstrap_rows(r0, r1)[0][c]
                    np.nan_to_num(m, copy=False, nan=0.0)
                    yield m
                    continue
                if self.channel_weights:     # this channel only (its hole filling reads 2 rows either side)
                    m = self.mean_rows(r0, r1, channels=[c])[0]
                    np.nan_to_num(m, copy=False, nan=0.0)
                else:
                    m = self.plain_mean_rows(r0, r1, c)
                self.release()      # a spilled stack: only this block's rows stay paged in
                yield m

    def plain_mean_rows(self, r0: int, r1: int, c: int | None = None) -> np.ndarray:
        """After the bootstrap, without channel_weights: rows r0:r1 of the weighted mean of channel ``c`` —
        (r1 - r0, W) — or of every channel — (C, r1 - r0, W) —, 0 where no frame covers: the values stack.fits
        holds (a new array)."""
        w = self.wsum[r0:r1]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.sums[:, r0:r1] / w[None] if c is None else self.sums[c, r0:r1] / w
        np.copyto(m, 0, where=~(w > 0))
        return m

    def bootstrap_blocks(self):
        """In the bootstrap: (r0, (C, n, W) mean, 0 where no frame covers, (n, W) weights) for each block of rows,
        every channel and the weights from one combination of the block's rows (mean_blocks and weight_blocks
        would combine each block once per channel and once more for the weights: 4–5 s at 24 MP)."""
        for r0, r1 in self._chunks(self.shape[1]):
            m, w = self._bootstrap_rows(r0, r1)
            np.nan_to_num(m, copy=False, nan=0.0)
            yield r0, m, w

    def weight_blocks(self):
        """The sum of weights in blocks of rows, each a float32 array (a view of the live array after the
        bootstrap: do not modify)."""
        for r0, r1 in self._chunks(self.shape[1]):
            if self.sums is None:
                yield self._bootstrap_rows(r0, r1)[1]
            elif self.channel_weights:
                yield self._weight_map(self.wsum[:, r0:r1])
            else:
                yield self.wsum[r0:r1]

    def mean_rows(self, r0: int, r1: int, channels=None) -> np.ndarray:
        """Rows r0:r1 of the weighted mean, (C, r1 - r0, W) float32 — only ``channels`` when given —, NaN where
        no frame covers (a new array)."""
        if self.sums is None:
            rows = self._bootstrap_rows(r0, r1)[0]
            return rows if channels is None else rows[list(channels)]
        if not self.channel_weights:
            return self._mean(self.sums[:, r0:r1], self.wsum[r0:r1], channels)[0]
        m = 2 + len(self.sharpen) // 2       # the hole filling's 5×5 reach, and the sharpening's
        a, b = max(0, r0 - m), min(self.shape[1], r1 + m)
        return self._mean(self.sums[:, a:b], self.wsum[:, a:b], channels)[0][:, r0 - a:r1 - a]

    def mean_window(self, r0: int, r1: int, c0: int, c1: int, *, weights: bool = False):
        """Rows r0:r1, columns c0:c1 of the weighted mean, (C, r1 - r0, c1 - c0) float32, NaN where no frame
        covers: a star's stamp, from the sums' window alone (with channel_weights widened by the hole filling's
        and the sharpening's reach, as mean_rows' rows are) — during the bootstrap from its rows' combination
        (whole rows).  ``weights``: (mean, (r1 - r0, c1 - c0) weight map) — where every frame was saturated the
        weight is saturated_weight × the others' (the mean there is the clip level, not the star)."""
        if self.sums is None:
            mean, w2 = self._bootstrap_rows(r0, r1)
            mean, w2 = mean[:, :, c0:c1], w2[:, c0:c1]
        elif not self.channel_weights:
            mean, w2 = self._mean(self.sums[:, r0:r1, c0:c1], self.wsum[r0:r1, c0:c1])
        else:
            m = 2 + len(self.sharpen) // 2
            a, b = max(0, r0 - m), min(self.shape[1], r1 + m)
            e, f = max(0, c0 - m), min(self.shape[2], c1 + m)
            mean, w2 = self._mean(self.sums[:, a:b, e:f], self.wsum[:, a:b, e:f])
            mean, w2 = mean[:, r0 - a:r1 - a, c0 - e:c1 - e], w2[r0 - a:r1 - a, c0 - e:c1 - e]
        return (mean, w2) if weights else mean

    def _bootstrap_rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """During the bootstrap: rows r0:r1 of the combination of the buffered frames — (C, n, W) mean, NaN where
        no frame covers, and (n, W) weights — computed on those rows only and a margin of 2×2 cells: the rows the
        mean reads beyond a row (a drizzle's hole filling 2, its sharpening 2 more), in cells whose rejections
        are right — one more cell, which the neighbours-of-strong-outliers rule reaches.  Every step of the
        combination is per cell, so the rows are what result() gives, without its full-frame temporaries
        (~400 MB at 26 MP)."""
        h = self.shape[1]
        reads = (2 if self.channel_weights else 0) + len(self.sharpen) // 2
        m = 1 + (reads + 1) // 2
        a, b = max(0, (r0 // 2 - m) * 2), min(h, ((r1 + 1) // 2 + m) * 2)
        part = RunningStack((self.shape[0], b - a, self.shape[2]), self.sky, self.p, self.lum_weights,
                            self.cell_samples, pool=self._pool, channel_weights=self.channel_weights,
                            sharpen=self.sharpen)
        for f16, wt, noise, sat, cells in self.buffer:
            if sat is not None:
                inside = (sat[0] >= a) & (sat[0] < b)
                sat = sat[:, inside] if inside.any() else None      # (a copy)
                if sat is not None:
                    sat[0] -= a
            part.buffer.append((f16[:, a:b], wt, noise, sat, cells[a // 2:(b + 1) // 2]))
        part.frames = self.frames           # (the drizzle's weak weight is per frame: _weak_weight)
        mean, wsum = part.result()
        out = mean[:, r0 - a:r1 - a].copy()
        np.copyto(out, np.float32(np.nan), where=~(wsum[r0 - a:r1 - a] > 0)[None])
        return out, wsum[r0 - a:r1 - a].copy()

    def weights(self) -> np.ndarray:
        """(H, W) sum of weights (the live array after the bootstrap; do not modify)."""
        if self.wsum is None:
            return self.result()[1]
        return self._weight_map(self.wsum) if self.channel_weights else self.wsum

    def reduced(self, max_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Like result(), at most ``max_size`` px on the long side: the sums and weights are area-averaged
        first and divided after, so the full-resolution mean (~290 MB at 24 MP) is never built.  For the live
        preview, which is redrawn after every frame."""
        if self.sums is None:
            # Bootstrap: combine reduced copies of the buffered frames (the full-resolution combination takes
            # ~1.5 s at 24 MP; the preview is redrawn after each frame).
            small = None
            step = max(1, int(max(self.shape[1:]) / max_size))   # float16 -> float32 is slow: subsample first
            # … reduced to the size the running sums are reduced to after the bootstrap: the preview keeps its
            # size (a 6000 × 4000 frame's was 1600 × 1067 for the first frames, then 1500 × 1000)
            size = reduced_size(*self.shape[1:], max_size)
            c_n = self.shape[0]
            for f16, wt, noise, _, _ in self.buffer:
                sub = np.stack([f16[c, ::step, ::step].astype(np.float32) for c in range(f16.shape[0])])
                sub[:c_n] *= 1 / F16_SCALE       # the values (not a drizzle's coverages) as they were
                if self.channel_weights:    # values weighted by their coverage, then divided
                    sub[:c_n] *= sub[c_n:]
                    sub = reduce(sub, max_size, shape=size)
                    # … and where this frame has no sample of a channel — most of each colour plane of a
                    # drizzle's frame when the preview is hardly reduced (a 700 px frame at ×2, a 1304 px one at
                    # ×1) — that channel from its 5×5 neighbourhood, as the stack's mean has it: those pixels
                    # were NaN, drawn black, and the preview of the first frames came out black or red
                    f = self._mean(sub[:c_n], sub[c_n:], sharpen=False)[0]
                else:
                    f = reduce(sub, max_size, shape=size)
                if small is None:
                    small = RunningStack(f.shape, self.sky, self.p, self.lum_weights)   # debayered pixels
                small.buffer.append((f, wt, noise, None, small.cells_of(f) - small.sky_lum))
            if small is None:      # nothing added yet
                mean, wsum = self.result()
                return reduce(mean, max_size), reduce(wsum[None], max_size)[0]
            return small.result()
        # every plane on its own worker thread (OpenCV releases the GIL): the preview after each frame waits on it
        w3 = self.wsum if self.channel_weights else self.wsum[None]
        small = self.parallel_map(lambda a: reduce(a[None], max_size)[0], list(self.sums) + list(w3))
        sums, wsum = np.stack(small[:len(self.sums)]), np.stack(small[len(self.sums):])
        if not self.channel_weights:
            wsum = wsum[0]
        mean, w2 = self._mean(sums, wsum)
        return zero_nan(mean), w2

    # ------------------------------------------------------------------ checkpoint

    _ARRAYS = ("sums", "wsum", "lsum", "lw", "sq", "count")

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore the stack exactly (for np.savez)."""
        s: dict[str, np.ndarray] = {
            "shape": np.array(self.shape), "sky": self.sky, "lum_weights": self.lum_weights,
            "cell_samples": self.cell_samples,
            "counters": np.array([self.frames, self.rejected_total]),
            "channel_weights": np.array(self.channel_weights),
            "bootstrap_rejected": np.array(self.bootstrap_rejected, np.int64),
            "f16_scale": np.array(F16_SCALE),        # the buffered frames' (older checkpoints: 1)
        }
        if self.sums is not None:
            s.update({k: getattr(self, k) for k in self._ARRAYS})
        for i, (img, wt, noise, sat, cells) in enumerate(self.buffer):
            s[f"buf{i}_img"], s[f"buf{i}_w"], s[f"buf{i}_noise"], s[f"buf{i}_cells"] = img, np.array(wt), noise, cells
            if sat is not None:
                s[f"buf{i}_sat"] = sat
        return s

    @classmethod
    def from_state(cls, s, p: StackParams, *, pool=None, spill_dir: Path | None = None) -> "RunningStack":
        """The stack state() gave; with ``spill_dir`` its arrays are read straight into mapped files there."""
        cw = bool(s["channel_weights"]) if "channel_weights" in s else False
        st = cls(tuple(int(v) for v in s["shape"]), s["sky"], p, s["lum_weights"], s["cell_samples"], pool=pool,
                 channel_weights=cw)
        st.spill_dir = None if spill_dir is None else Path(spill_dir)
        st.frames, st.rejected_total = (int(v) for v in s["counters"])
        st.bootstrap_rejected = [int(v) for v in s["bootstrap_rejected"]]
        c, h, w = st.shape
        full = (c, h, w) if cw else (h, w)
        expected = {"sums": ((c, h, w), np.float32), "wsum": (full, np.float32), "count": (st.cells, np.uint16),
                    **{k: (st.cells, np.float32) for k in ("lsum", "lw", "sq")},
                    "img": ((2 * c if cw else c, h, w), np.float16), "cells": (st.cells, np.float32)}  # (buf<i>_…)

        def load(key):
            # bytes from disk whose CRC holds can still be of another shape (a bug, an edited file): refused
            # here — accepted, a stack one column short resumed and broke at its first frame
            a = s[key]
            shape, dtype = expected[key.split("_", 1)[1] if key.startswith("buf") else key]
            if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                raise ValueError(f"stack array {key} is {a.dtype}{list(a.shape)}, not {np.dtype(dtype)}{list(shape)}")
            return st._new(a.shape, a.dtype, like=a)

        if "sums" in s:
            for k in cls._ARRAYS:
                setattr(st, k, load(k))
        i = 0
        rescale = F16_SCALE / np.float32(s["f16_scale"] if "f16_scale" in s else 1)
        while f"buf{i}_img" in s:
            sat = _saved_points(np.array(s[f"buf{i}_sat"])) if f"buf{i}_sat" in s else None
            img = load(f"buf{i}_img")
            if rescale != 1:           # a checkpoint of an older livestack: its values as they were
                values = img[: st.shape[0]] if cw else img
                np.multiply(values, rescale, out=values, casting="unsafe")
            st.buffer.append((img, float(s[f"buf{i}_w"]), np.array(s[f"buf{i}_noise"]), sat, load(f"buf{i}_cells")))
            i += 1
        return st
