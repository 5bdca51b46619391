"""Linear stack -> display image (uint8), from a reduced copy.

Steps, each chosen from the image statistics: (1) background neutralisation — subtract each channel's sky;
(2) colour balance — scale channels so that the average of the bright (star) pixels is white; (3) a linked
midtones transfer function (PixInsight's MTF / Siril's autostretch): black point a few σ below the sky, midtones
so that the sky lands at ``target_background``, white point at the brightest unsaturated star light so that
stars keep their colour instead of blowing out.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class StretchParams:
    max_size: int = 1600            # long side of the preview, px (the stretch never touches full resolution)
    target_background: float = 0.20  # where the sky lands, 0..1
    shadows_sigma: float = 2.8      # black point: this many σ below the sky
    white_percentile: float = 99.98  # white point, percent of pixels below it
    balance: bool = True            # colour-balance on the stars
    balance_sigma: float = 10.0     # … on light at least this many σ of the sky's noise above the sky
    # Manual overrides (None = auto): in units of the auto-normalised image, 0..1
    black: float | None = None
    midtones: float | None = None
    white: float | None = None
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.max_size < 64:
            raise ValueError(f"stretch.max_size = {self.max_size}: must be at least 64")
        if not 0 < self.target_background < 0.5:
            raise ValueError(f"stretch.target_background = {self.target_background}: must be in (0, 0.5)")
        if not self.balance_sigma >= 0:
            raise ValueError(f"stretch.balance_sigma = {self.balance_sigma}: must be ≥ 0")


def reduced_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """The (h, w) that ``reduce`` gives an (H, W) = (h, w) image."""
    f = max(h, w) / max_size
    if f <= 1:
        return h, w
    if max(h, w) / np.ceil(f) >= 0.75 * max_size:
        f = float(np.ceil(f))
    return max(1, round(h / f)), max(1, round(w / f))


def reduce(img: np.ndarray, max_size: int, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(C, H, W) -> (C, h, w) float32 with max(h, w) <= max_size, area-averaged (noise falls, stars stay).

    By a whole factor when that keeps at least 3/4 of ``max_size``: OpenCV averages whole blocks 4× faster
    (a 24 MP plane to 1500 px: 13 ms, to 1600 px: 45–58 ms; the live preview reduces four after every frame).
    ``shape``: the (h, w) to reduce to instead (that of reduced_size of the full image, for a subsampled copy
    of it)."""
    c, h, w = img.shape
    rh, rw = shape if shape is not None else reduced_size(h, w, max_size)
    if (rh, rw) == (h, w):
        return img.astype(np.float32, copy=True)
    return np.stack([cv2.resize(img[i], (rw, rh), interpolation=cv2.INTER_AREA) for i in range(c)])


def zero_nan(img: np.ndarray) -> np.ndarray:
    """NaN -> 0 in place in each (H, W) float32 plane of a C-contiguous (C, H, W) ``img``, one pass a plane
    (``np.nan_to_num``: several; 12 ms for a 1500 px preview's three planes); returns ``img``."""
    for plane in img:
        cv2.patchNaNs(plane, 0.0)
    return img


def mtf(m: float, x: np.ndarray) -> np.ndarray:
    """Midtones transfer function: maps 0 -> 0, m -> 0.5, 1 -> 1."""
    return ((m - 1) * x) / ((2 * m - 1) * x - m)


STAT_PIXELS = 1_000_000    # auto_stretch measures the sky on a quarter of the pixels above this many


def auto_stretch(img: np.ndarray, p: StretchParams, *, coverage: np.ndarray | None = None,
                 dtype=np.uint8, parallel_map=None) -> np.ndarray:
    """(C, H, W) linear float -> (h, w, 3) RGB for display, uint8 (or uint16 for a 16-bit export; then give a
    ``p.max_size`` as large as the image for full resolution).  ``img`` is not modified.

    ``coverage`` (H, W), when given, marks pixels with data (weight > 0); the rest is shown black and is left
    out of the statistics.  ``parallel_map`` (``fn, items -> list``): the channels' medians and their tails on
    worker threads (the same bytes; the live preview is drawn after every frame, on its way to the page).
    """
    pmap = parallel_map or (lambda fn, items: [fn(i) for i in items])
    small = zero_nan(reduce(img, p.max_size))      # a new float32 array
    cov = None
    if coverage is not None:
        cov = reduce(coverage[None].astype(np.float32), p.max_size)[0] > 0.5
    c = small.shape[0]
    sel = cov if cov is not None and cov.any() else np.ones(small.shape[1:], bool)
    # The statistics from every other pixel of every other row when there are plenty (above STAT_PIXELS):
    # medians and percentiles were 0.13 of the 0.3 s a 1500 px preview took after every frame.
    k = 2 if sel.size > STAT_PIXELS else 1
    part, sel_k = small[:, ::k, ::k], sel[::k, ::k]
    sky = np.array(pmap(lambda i: np.median(part[i][sel_k]), list(range(c))), np.float32)
    for i in range(c):
        small[i] -= sky[i]  # (1) background neutralisation
    lum = part.mean(axis=0)
    vals = lum[sel_k]
    if c == 3 and p.balance:  # (2) stars white on average: gains from the brightest unsaturated light
        # The brightest 0.5 %, and only light well above the sky's noise: in a sparse field (a Seestar's ~20
        # stars) the 99.5th percentile is 2.9-3.5 σ above the sky, so most of those pixels were noise, of no
        # colour, and more of them on a finer grid — the same stack's galaxy came out white in one preview and
        # green with --drizzle 2 (gains G 0.81 / 0.90, B 1.42 / 1.26; from the stars alone: 0.80 / 0.81, 1.43 /
        # 1.40).
        floor = p.balance_sigma * 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
        hi = vals > np.percentile(vals, 99.5)
        if (vals > floor).sum() > 10:
            hi &= vals > floor
        bright = np.stack([part[i][sel_k][hi] for i in range(3)])
        top = np.percentile(vals, 99.99)
        keep = (bright.mean(axis=0) < top)
        sums = bright[:, keep].sum(axis=1) if keep.sum() > 10 else bright.sum(axis=1)
        if np.all(sums > 0):
            gains = sums.mean() / sums
            small *= gains[:, None, None].astype(np.float32)
            lum = part.mean(axis=0)
            vals = lum[sel_k]
    # The black point from the channels' own noise (the noisiest one's), not the luminance's: averaging three
    # channels of independent noise divides it by up to √3, and a black point 2.8 σ_lum below the sky is then
    # only ~1.6 σ below it in each channel — a Seestar stack's preview had 9.6 % of its blue and 3.3 % of its
    # red pixels at 0 (2.8 σ of a Gaussian sky clips 0.26 %; the channels' mean σ still left 1.5 % of the
    # blue).  The channels' medians are 0 here (their sky subtracted, then scaled).
    sigmas = pmap(lambda i: 1.4826 * float(np.median(np.abs(part[i][sel_k]))), list(range(c)))
    sigma = max(sigmas) or float(vals.std()) or 1.0
    black = -p.shadows_sigma * sigma
    white = float(np.percentile(vals, p.white_percentile))
    white = max(white, black + 10 * sigma)
    if p.black is not None:
        black = black + p.black * (white - black)
    if p.white is not None:
        white = black + p.white * (white - black)
    bg = float(np.clip((0 - black) / max(white - black, 1e-12), 1e-6, 0.999))
    # midtones m such that mtf(m, bg) = target: solving gives m = bg (t - 1) / (2 bg t - bg - t)
    t = p.target_background
    m = p.midtones if p.midtones is not None else bg * (t - 1) / (2 * bg * t - bg - t)
    m = float(np.clip(m, 1e-4, 0.9999))
    # (small - black) / (white - black), clipped to [0, 1], through mtf(m, ·), masked, to the output's levels:
    # in place on ``small`` and a channel at a time (a 1500 px preview's tail took 5 passes over new arrays)
    span = np.float32(max(white - black, 1e-12))
    scale = np.float32(65535 if dtype == np.uint16 else 255)
    out = np.empty(small.shape[1:] + (3,), dtype)

    def tail(i: int) -> None:
        x = small[i]
        den = np.empty_like(x)
        x -= np.float32(black)
        x /= span
        np.clip(x, 0, 1, out=x)
        np.multiply(x, np.float32(2 * m - 1), out=den)      # mtf: ((m - 1) x) / ((2m - 1) x - m)
        den -= np.float32(m)
        x *= np.float32(m - 1)
        x /= den
        if cov is not None:
            x *= cov
        np.clip(x, 0, 1, out=x)
        x *= scale
        x += np.float32(0.5)
        if c == 3:
            out[:, :, i] = x            # to the output's type, interleaved
        else:
            out[...] = x[:, :, None]

    pmap(tail, list(range(c)))
    return out
