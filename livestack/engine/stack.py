"""RunningStack: a weighted mean with per-pixel outlier rejection whose memory does not grow with frames.

Per pixel it keeps the weighted sums S_c = Σ w·x_c of each channel, W = Σ w, the weighted sum of squares of the
luminance Q = Σ w·(L − L_sky)² (measured from the reference's sky so that float32 keeps the precision where the
noise is small) and the number of frames n — C + 2 float32 planes and one uint16 plane, 5.5 planes for RGB
(≈ 530 MB at 24 MP).  Each update is a handful of fused OpenCV/numpy passes (S += w·x is one cv2.scaleAdd).

A new frame's pixel is rejected (all channels at once: a satellite or a cosmic ray hits them together after
debayering) when its luminance departs from the running mean by more than κσ, where σ² is the larger of

  * the pixel's own weighted variance over the frames so far (it captures seeing changes on star cores), and
  * the frame's background noise² (plus, while a pixel has few frames, (rel_floor · signal)² for star cores),

times (1 + 1/n) for the mean's own noise.  Neighbours of a strong outlier (> 2κσ) go too: the faint wings of a
trail or a cosmic-ray hit, spread by debayering and the warp, sit below κσ one by one.

A streaming clip cannot judge the first frames against anything, and an outlier in the reference would then
stay forever (and make every later frame look wrong there).  So the first ``bootstrap`` frames are buffered as
float16 (2^-11 relative precision, far below the shot noise) and clipped against their per-pixel median; from
then on the stack streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_GROW = np.ones((3, 3), np.uint8)


@dataclass(frozen=True, slots=True)
class StackParams:
    kappa: float = 3.0          # rejection threshold in σ
    bootstrap: int = 3          # frames buffered to start from a per-pixel median (0 or 1: stream at once)
    rel_floor: float = 0.10     # while a pixel has few frames: σ of the relative variation of signal (seeing)
    min_empirical: int = 5      # from this many frames on, a pixel's own scatter replaces the relative term
    saturated_weight: float = 1e-6  # a saturated pixel only counts where no frame has a better value
    chunk_rows: int = 256       # rows per block: bounds the temporaries (a few MB) whatever the frame size
    grow: bool = True           # also reject the 8 neighbours of a strong (> 2κσ) outlier
    threads: int = 2            # row blocks processed in parallel (1 = in the calling thread)

    def __post_init__(self):
        if not 1.5 <= self.kappa <= 20:
            raise ValueError(f"stack.kappa = {self.kappa}: must be in [1.5, 20]")
        if not 0 <= self.bootstrap <= 9:
            raise ValueError(f"stack.bootstrap = {self.bootstrap}: must be in [0, 9]")
        if self.rel_floor < 0 or self.min_empirical < 2 or self.chunk_rows < 8 or not 1 <= self.threads <= 16:
            raise ValueError("stack: rel_floor ≥ 0, min_empirical ≥ 2, chunk_rows ≥ 8 and threads in [1, 16] "
                             "are required")


def _luminance(x: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w) float32 mean of the channels (a new array)."""
    if x.shape[0] == 1:
        return x[0].astype(np.float32, copy=True)
    lum = x[0].astype(np.float32, copy=True)
    for c in range(1, x.shape[0]):
        lum += x[c]
    lum *= np.float32(1.0 / x.shape[0])
    return lum


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
    srt = np.sort(block, axis=0)                   # NaN sorts last
    n = np.isfinite(block).sum(axis=0)
    lower = np.where(n == 2, 0, (n - 1) // 2)
    return np.take_along_axis(srt, np.maximum(lower, 0)[None], axis=0)[0]


class RunningStack:
    """Accumulates (C, H, W) float32 frames already on the stack grid, normalised, NaN outside their footprint.

    Memory: C + 2 float32 planes and one uint16 plane of (H, W), allocated when the bootstrap ends; during the
    bootstrap ``bootstrap`` float16 frames.
    """

    def __init__(self, shape: tuple[int, int, int], sky: np.ndarray, p: StackParams):
        self.shape = tuple(int(s) for s in shape)
        self.sky = np.asarray(sky, np.float32).reshape(-1)
        self.sky_lum = np.float32(self.sky.mean())
        self.p = p
        self.sums: np.ndarray | None = None      # (C, H, W) Σ w·x_c
        self.wsum: np.ndarray | None = None      # (H, W) Σ w
        self.sq: np.ndarray | None = None        # (H, W) Σ w·(L − L_sky)²
        self.count: np.ndarray | None = None     # (H, W) uint16 frames contributing
        self.buffer: list[tuple[np.ndarray, float, np.ndarray, np.ndarray | None]] = []
        self.frames = 0
        self.rejected_total = 0
        self.bootstrap_rejected: list[int] = []

    # ------------------------------------------------------------------ adding

    def add(self, img: np.ndarray, weight: float, noise: np.ndarray, *,
            saturated: np.ndarray | None = None) -> int | None:
        """Add one (C, H, W) frame; ``img`` may be modified (NaN and rejected pixels are zeroed in place).

        ``noise``: (C,) per-pixel background σ of this frame in stack units.  Returns the number of pixels
        rejected as outliers, or None while the frame waits in the bootstrap buffer (its rejections are counted
        in ``bootstrap_rejected`` when the buffer is combined).
        """
        if img.shape != self.shape:
            raise ValueError(f"frame shape {img.shape} does not match the stack {self.shape}")
        return self.add_channels(_luminance(img), lambda c: img[c], weight, noise, saturated=saturated)

    def add_channels(self, lum: np.ndarray, channel, weight: float, noise: np.ndarray, *,
                     saturated: np.ndarray | None = None) -> int | None:
        """Add one frame given as its (H, W) luminance (mean of the channels, NaN outside the footprint) and
        ``channel(c)``, which returns channel c as an (H, W) float32 array that stays valid until the next call
        (it may reuse one buffer: the pipeline warps each channel into the same plane, two full frames fewer
        in memory at 24 MP).  ``lum`` and the returned channels may be modified.  Returns as add()."""
        if lum.shape != self.shape[1:]:
            raise ValueError(f"frame shape {lum.shape} does not match the stack {self.shape[1:]}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (got {weight})")
        noise = np.asarray(noise, np.float32).reshape(-1)
        self.frames += 1
        if self.sums is None and self.p.bootstrap > 1:
            frame16 = np.stack([channel(c).astype(np.float16) for c in range(self.shape[0])])
            self.buffer.append((frame16, float(weight), noise, None if saturated is None else saturated.copy()))
            if len(self.buffer) >= self.p.bootstrap:
                self._allocate()
                self.bootstrap_rejected = self._combine_buffer(self.sums, self.wsum, self.sq, self.count)
                self.rejected_total += sum(self.bootstrap_rejected)
                self.buffer = []
            return None
        if self.sums is None:
            self._allocate()
        chunks = list(self._chunks())
        valid = np.empty(lum.shape, bool)

        def judge(rows: tuple[int, int]) -> int:
            r0, r1 = rows
            bad = self._stream_outliers(lum[r0:r1], noise, r0, r1)
            np.logical_and(np.isfinite(lum[r0:r1]), ~bad, out=valid[r0:r1])
            sat = None if saturated is None else saturated[r0:r1]
            self._accumulate_lum(lum[r0:r1], valid[r0:r1], weight, sat, self.wsum[r0:r1], self.sq[r0:r1],
                                 self.count[r0:r1])
            return int(bad.sum())

        # Row blocks are independent and numpy releases the GIL in elementwise loops: use the cores.
        rejected = sum(self._map(judge, chunks))
        for c in range(self.shape[0]):
            x = channel(c)
            self._map(lambda rows: self._accumulate_channel(
                x[rows[0]:rows[1]], valid[rows[0]:rows[1]], weight,
                None if saturated is None else saturated[rows[0]:rows[1]], self.sums[c, rows[0]:rows[1]]), chunks)
        self.rejected_total += rejected
        return rejected

    def _map(self, fn, items):
        if self.p.threads <= 1 or len(items) < 2:
            return [fn(i) for i in items]
        if getattr(self, "_pool", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.p.threads, thread_name_prefix="stack")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        """Stop the worker threads (they also stop when the stack is garbage-collected)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _allocate(self) -> None:
        c, h, w = self.shape
        self.sums = np.zeros((c, h, w), np.float32)
        self.wsum = np.zeros((h, w), np.float32)
        self.sq = np.zeros((h, w), np.float32)
        self.count = np.zeros((h, w), np.uint16)

    def _lum_noise(self, noise: np.ndarray) -> np.float32:
        # channels' noise taken as independent (an upper bound for interpolated pixels: fewer false rejections)
        return np.float32(np.sqrt(np.sum(noise.astype(np.float64) ** 2)) / len(noise))

    def _stream_outliers(self, lum, noise, r0, r1) -> np.ndarray:
        p = self.p
        wsum, count = self.wsum[r0:r1], self.count[r0:r1]
        sums = self.sums[:, r0:r1]
        total = sums[0].copy()
        for c in range(1, sums.shape[0]):
            cv2.add(total, sums[c], dst=total)
        with np.errstate(invalid="ignore", divide="ignore"):
            inv_w = np.float32(1.0) / wsum
            mean = total * (inv_w * np.float32(1.0 / sums.shape[0]))     # luminance of the running mean
            dm = mean - self.sky_lum
            var = self.sq[r0:r1] * inv_w - dm * dm                       # weighted population variance
        bessel, mean_noise = self._factor_tables()
        var *= bessel[count]                                             # n/(n-1): an unbiased estimate
        floor = self._lum_noise(noise) ** 2
        few = count < p.min_empirical
        if few.any():   # only while the first frames arrive, and at the borders of the footprint
            np.maximum(dm, 0, out=dm)
            dm *= np.float32(p.rel_floor)
            dm *= dm
            dm += floor
            np.maximum(var, np.where(few, dm, floor), out=var)
        else:
            np.maximum(var, floor, out=var)
        var *= mean_noise[count]                                         # 1 + 1/n: the mean's own noise
        bad = self._threshold(lum, mean, var)
        bad &= count > 0  # first frame on a pixel: nothing to compare against
        return bad

    def _factor_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Lookup tables indexed by the uint16 frame count: n/(n-1) and 1 + 1/n (cheaper than computing)."""
        t = getattr(self, "_ftab", None)
        if t is None:
            n = np.arange(65536, dtype=np.float64)
            t = self._ftab = ((n / np.maximum(n - 1, 1)).astype(np.float32),
                              (1 + 1 / np.maximum(n, 1)).astype(np.float32))
        return t

    def _threshold(self, lum, centre, var) -> np.ndarray:
        k2 = np.float32(self.p.kappa ** 2)
        with np.errstate(invalid="ignore"):
            d2 = (lum - centre) ** 2
            bad = d2 > k2 * var
            if self.p.grow:
                strong = d2 > 4 * k2 * var
                if strong.any():
                    bad |= cv2.dilate(strong.view(np.uint8), _GROW).astype(bool)
        return bad

    def _combine_buffer(self, sums, wsum, sq, count) -> list[int]:
        """Clip the buffered frames against their per-pixel median luminance and accumulate the survivors.
        A pixel never loses every frame: where all are rejected, the one closest to the median stays."""
        k = len(self.buffer)
        rejected = [0] * k
        # Variance of (x − centre) in units of one frame's: the centre's own noise counts too
        # (median of K: ≈ π/2 · σ²/K; with two frames the centre is one of them).
        centre_var = np.float32(1.0 if k == 2 else (np.pi / 2) / max(k, 1))
        rel = np.float32(self.p.rel_floor)

        def block(rows: tuple[int, int]) -> list[int]:
            r0, r1 = rows
            out = [0] * k
            xs = [b[0][:, r0:r1].astype(np.float32) for b in self.buffer]
            lums = np.stack([_luminance(x) for x in xs])                     # (K, h, w)
            centre = _median_rows(lums)
            signal = np.maximum(centre - self.sky_lum, 0) * rel
            bads = []
            for i, (_, _, noise, _) in enumerate(self.buffer):
                var = (self._lum_noise(noise) ** 2 + signal * signal) * (1 + centre_var)
                bads.append(self._threshold(lums[i], centre, var))
            if k > 1:
                everyone = np.logical_and.reduce(bads)
                if everyone.any():
                    dev = np.abs(lums - centre[None])
                    keep = np.argmin(np.where(np.isnan(dev), np.inf, dev), axis=0)
                    for i in range(k):
                        bads[i] &= ~(everyone & (keep == i))
            for i, (_, wt, _, sat) in enumerate(self.buffer):
                out[i] = int(bads[i].sum())
                valid = np.isfinite(lums[i]) & ~bads[i]
                sat_b = None if sat is None else sat[r0:r1]
                self._accumulate_lum(lums[i], valid, wt, sat_b, wsum[r0:r1], sq[r0:r1], count[r0:r1])
                for c in range(xs[i].shape[0]):
                    self._accumulate_channel(xs[i][c], valid, wt, sat_b, sums[c, r0:r1])
            return out

        for counts in self._map(block, list(self._chunks())):
            rejected = [a + b for a, b in zip(rejected, counts)]
        return rejected

    def _weights(self, valid, weight, saturated):
        """Per-pixel weights of one block, or None where a plain scalar weight (with the valid mask) does."""
        if saturated is None or not saturated.any():
            return None
        wmap = valid.astype(np.float32) * np.float32(weight)
        wmap[saturated] *= np.float32(self.p.saturated_weight)
        return wmap

    def _accumulate_lum(self, lum, valid, weight, saturated, wsum, sq, count) -> None:
        """One block: W += w, Q += w·(L − L_sky)², n += 1 where valid (``lum`` is modified)."""
        lum -= self.sky_lum
        np.copyto(lum, 0, where=~valid)
        wmap = self._weights(valid, weight, saturated)
        if wmap is None:
            cv2.add(wsum, float(weight), dst=wsum, mask=valid.view(np.uint8))
            cv2.scaleAdd(cv2.multiply(lum, lum), float(weight), sq, dst=sq)
        else:
            wsum += wmap
            sq += wmap * lum * lum
        count += valid

    def _accumulate_channel(self, x, valid, weight, saturated, sums) -> None:
        """One block of one channel: S += w·x where valid (``x`` is modified: zero elsewhere)."""
        np.copyto(x, 0, where=~valid)
        wmap = self._weights(valid, weight, saturated)
        if wmap is None:
            cv2.scaleAdd(x, float(weight), sums, dst=sums)
        else:
            sums += wmap * x

    def _chunks(self):
        h = self.shape[1]
        for r0 in range(0, h, self.p.chunk_rows):
            yield r0, min(h, r0 + self.p.chunk_rows)

    # ------------------------------------------------------------------ reading

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 weighted mean (0 where no frame covers) and (H, W) float32 sum of weights, both
        new arrays.  During the bootstrap the buffered frames are combined into temporaries (buffer kept)."""
        c, h, w = self.shape
        if self.sums is None:
            sums, wsum = np.zeros((c, h, w), np.float32), np.zeros((h, w), np.float32)
            if self.buffer:
                self._combine_buffer(sums, wsum, np.zeros((h, w), np.float32), np.zeros((h, w), np.uint16))
        else:
            sums, wsum = self.sums, self.wsum
        mean = np.empty((c, h, w), np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for i in range(c):
                np.divide(sums[i], wsum, out=mean[i])
        np.copyto(mean, 0, where=~(wsum > 0)[None])
        return mean, wsum.copy()

    def mean_blocks(self):
        """The weighted mean, channel by channel in blocks of rows (FITS order), each a new float32 array:
        for writing the stack without building it whole."""
        if self.sums is None:
            mean, _ = self.result()
            yield from (mean[c] for c in range(mean.shape[0]))
            return
        for c in range(self.shape[0]):
            for r0, r1 in self._chunks():
                w = self.wsum[r0:r1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    m = self.sums[c, r0:r1] / w
                np.copyto(m, 0, where=~(w > 0))
                yield m

    def reduced(self, max_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Like result(), at most ``max_size`` px on the long side: the sums and weights are area-averaged
        first and divided after, so the full-resolution mean (~290 MB at 24 MP) is never built.  For the live
        preview, which is redrawn after every frame."""
        if self.sums is None:
            from .stretch import reduce

            mean, wsum = self.result()
            return reduce(mean, max_size), reduce(wsum[None], max_size)[0]
        from .stretch import reduce

        sums = reduce(self.sums, max_size)
        wsum = reduce(self.wsum[None], max_size)[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / wsum[None]
        np.copyto(mean, 0, where=~(wsum > 0)[None])
        return mean.astype(np.float32, copy=False), wsum

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore the stack exactly (for np.savez)."""
        s: dict[str, np.ndarray] = {
            "shape": np.array(self.shape), "sky": self.sky,
            "counters": np.array([self.frames, self.rejected_total]),
            "bootstrap_rejected": np.array(self.bootstrap_rejected, np.int64),
        }
        if self.sums is not None:
            s.update(sums=self.sums, wsum=self.wsum, sq=self.sq, count=self.count)
        for i, (img, wt, noise, sat) in enumerate(self.buffer):
            s[f"buf{i}_img"], s[f"buf{i}_w"], s[f"buf{i}_noise"] = img, np.array(wt), noise
            if sat is not None:
                s[f"buf{i}_sat"] = sat
        return s

    @classmethod
    def from_state(cls, s, p: StackParams) -> "RunningStack":
        st = cls(tuple(int(v) for v in s["shape"]), s["sky"], p)
        st.frames, st.rejected_total = (int(v) for v in s["counters"])
        st.bootstrap_rejected = [int(v) for v in s["bootstrap_rejected"]]
        if "sums" in s:
            st.sums, st.wsum = np.array(s["sums"]), np.array(s["wsum"])
            st.sq, st.count = np.array(s["sq"]), np.array(s["count"])
        i = 0
        while f"buf{i}_img" in s:
            sat = np.array(s[f"buf{i}_sat"]) if f"buf{i}_sat" in s else None
            st.buffer.append((np.array(s[f"buf{i}_img"]), float(s[f"buf{i}_w"]), np.array(s[f"buf{i}_noise"]), sat))
            i += 1
        return st
