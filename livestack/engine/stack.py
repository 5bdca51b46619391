"""RunningStack: a weighted mean with per-pixel outlier rejection whose memory does not grow with frames.

Per pixel it keeps the weighted running mean, the weighted sum of squared deviations (West's weighted
Welford update) and the sum of weights — 2·C + 2 planes.  A new frame's pixel is rejected (all channels at
once: a satellite or a cosmic ray hits them together after debayering) when it departs from the running mean
by more than κ·σ, where σ is the larger of

  * the pixel's own scatter over the frames so far (captures seeing changes on star cores), and
  * the frame's background noise (plus, while a pixel has few frames, a relative term for star cores).

A streaming clip cannot judge the first frames against anything, and an outlier in the reference would then
stay forever (and make every later frame look wrong there).  So the first ``bootstrap`` frames are buffered as
float16 (half the memory; 2^-11 relative precision is far below the shot noise) and clipped against their
per-pixel median; from then on the stack streams.
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
    rel_floor: float = 0.10     # while a pixel has few frames: σ of the relative variation of signal above sky (seeing)
    min_empirical: int = 5      # from this many frames on, a pixel's own scatter replaces the relative term
    saturated_weight: float = 1e-6  # a saturated pixel only counts where no frame has a better value
    chunk_rows: int = 256       # rows per block: bounds the temporaries (a few MB) whatever the frame size
    grow: bool = True           # also reject the 8 neighbours of a strong (> 2κσ) outlier

    def __post_init__(self):
        if not 1.5 <= self.kappa <= 20:
            raise ValueError(f"stack.kappa = {self.kappa}: must be in [1.5, 20]")
        if not 0 <= self.bootstrap <= 9:
            raise ValueError(f"stack.bootstrap = {self.bootstrap}: must be in [0, 9]")
        if self.rel_floor < 0 or self.min_empirical < 2 or self.chunk_rows < 8:
            raise ValueError("stack: rel_floor ≥ 0, min_empirical ≥ 2 and chunk_rows ≥ 8 are required")


class RunningStack:
    """Accumulates (C, H, W) float32 frames already on the stack grid, normalised, NaN outside their footprint.

    Memory: 2·C + 2 float32 planes of (H, W) (≈ 740 MB for a 24 MP RGB stack), plus during the bootstrap
    ``bootstrap`` float16 frames.  Allocated lazily when the first frame arrives.
    """

    def __init__(self, shape: tuple[int, int, int], sky: np.ndarray, p: StackParams):
        self.shape = tuple(int(s) for s in shape)
        self.sky = np.asarray(sky, np.float32).reshape(-1)
        self.p = p
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.wsum: np.ndarray | None = None
        self.count: np.ndarray | None = None     # frames contributing to each pixel (float32: exact to 2^24)
        self.buffer: list[tuple[np.ndarray, float, np.ndarray, np.ndarray | None]] = []
        self.frames = 0
        self.rejected_total = 0
        self.bootstrap_rejected: list[int] = []

    # ------------------------------------------------------------------ adding

    def add(self, img: np.ndarray, weight: float, noise: np.ndarray, *,
            saturated: np.ndarray | None = None) -> int | None:
        """Add one frame.  ``noise``: (C,) per-pixel background σ of this frame in stack units.

        Returns the number of pixels rejected as outliers, or None while the frame waits in the bootstrap
        buffer (its rejections are then counted in ``bootstrap_rejected`` when the buffer is combined).
        """
        if img.shape != self.shape:
            raise ValueError(f"frame shape {img.shape} does not match the stack {self.shape}")
        if not weight > 0:
            raise ValueError(f"weight must be > 0 (got {weight})")
        noise = np.asarray(noise, np.float32).reshape(-1)
        self.frames += 1
        if self.mean is None and self.p.bootstrap > 1:
            self.buffer.append((img.astype(np.float16), float(weight), noise,
                                None if saturated is None else saturated.copy()))
            if len(self.buffer) >= self.p.bootstrap:
                self._flush_buffer()
            return None
        if self.mean is None:
            self._allocate()
        n = self._stream(img, weight, noise, saturated)
        self.rejected_total += n
        return n

    def _allocate(self) -> None:
        c, h, w = self.shape
        self.mean = np.zeros((c, h, w), np.float32)
        self.m2 = np.zeros((c, h, w), np.float32)
        self.wsum = np.zeros((h, w), np.float32)
        self.count = np.zeros((h, w), np.float32)

    def _flush_buffer(self) -> None:
        self._allocate()
        self.bootstrap_rejected = self._combine_buffer(self.mean, self.m2, self.wsum, self.count)
        self.rejected_total += sum(self.bootstrap_rejected)
        self.buffer = []

    def _combine_buffer(self, mean, m2, wsum, count) -> list[int]:
        """Clip the buffered frames against their per-pixel median (the lower value of two: outliers —
        satellites, cosmic rays, hot pixels — are positive) and accumulate the survivors.  A pixel never
        loses every frame: where all are rejected, the one closest to the centre stays."""
        k = len(self.buffer)
        rejected = [0] * k
        # Variance of (x - centre) in units of one frame's variance: the centre's own noise counts too
        # (median of K: ≈ π/2 · σ²/K; with two frames the centre is one of them).
        centre_var = 1.0 if k == 2 else (np.pi / 2) / max(k, 1)
        for r0, r1 in self._chunks():
            block = np.stack([b[0][:, r0:r1].astype(np.float32) for b in self.buffer])  # (K, C, h, w)
            if k >= 3:
                centre = np.nanmedian(block, axis=0) if np.isnan(block).any() else np.median(block, axis=0)
            else:
                centre = np.fmin(block[0], block[-1])
            bads = [self._outliers(block[i], centre, noise, 1 + centre_var) for i, (_, _, noise, _) in
                    enumerate(self.buffer)]
            if k > 1:
                everyone = np.logical_and.reduce(bads)
                if everyone.any():
                    dev = np.abs(block - centre[None]).sum(axis=1)            # (K, h, w)
                    dev = np.where(np.isnan(dev), np.inf, dev)
                    keep = np.argmin(dev, axis=0)
                    for i in range(k):
                        bads[i] &= ~(everyone & (keep == i))
            for i, (_, wt, noise, sat) in enumerate(self.buffer):
                rejected[i] += int(bads[i].sum())
                self._update(mean[:, r0:r1], m2[:, r0:r1], wsum[r0:r1], count[r0:r1], block[i], wt,
                             None if sat is None else sat[r0:r1], bads[i])
        return rejected

    def _stream(self, img, weight, noise, saturated) -> int:
        rejected = 0
        p = self.p
        for r0, r1 in self._chunks():
            x = img[:, r0:r1]
            mean, m2 = self.mean[:, r0:r1], self.m2[:, r0:r1]
            wsum, count = self.wsum[r0:r1], self.count[r0:r1]
            # σ² per pixel: the larger of the frame's noise (plus, while few frames cover the pixel, a relative
            # term for star cores) and the pixel's own scatter; × (1 + 1/n) for the running mean's own noise.
            with np.errstate(invalid="ignore", divide="ignore"):
                emp = m2 / wsum * (count / np.maximum(count - 1, 1))
            few = count < p.min_empirical
            bad = self._outliers(x, mean, noise, 1 + 1 / np.maximum(count, 1), emp=emp, few=few)
            bad &= count > 0  # first frame on a pixel: nothing to compare against
            rejected += int(bad.sum())
            self._update(mean, m2, wsum, count, x, weight, None if saturated is None else saturated[r0:r1], bad)
        return rejected

    def _outliers(self, x, centre, noise, var_factor, *, emp=None, few=None) -> np.ndarray:
        """(h, w) bool: pixels where any channel departs from ``centre`` by more than κσ (NaN never does).

        σ² = noise² (+ (rel_floor · signal)² where ``few`` or when no empirical variance is given), at least
        ``emp`` (the pixel's scatter so far), times ``var_factor``.  Pixels next to a strong outlier (> 2κσ)
        are rejected too: the wings of a trail or a cosmic-ray hit, spread by debayering and the warp, sit
        below κσ one by one.
        """
        p = self.p
        bad = np.zeros(x.shape[1:], bool)
        strong = np.zeros(x.shape[1:], bool)
        for c in range(x.shape[0]):
            signal = np.maximum(centre[c] - self.sky[c], 0) * np.float32(p.rel_floor)
            var = noise[c] ** 2 + signal * signal
            if emp is not None:
                var = np.where(few, np.maximum(var, emp[c]), np.maximum(noise[c] ** 2, emp[c]))
            var = var * var_factor
            with np.errstate(invalid="ignore"):
                dev = np.abs(x[c] - centre[c]) / np.sqrt(var)
                bad |= dev > np.float32(p.kappa)
                strong |= dev > np.float32(2 * p.kappa)
        if p.grow and strong.any():
            bad |= cv2.dilate(strong.view(np.uint8), _GROW).astype(bool)
        return bad

    def _update(self, mean, m2, wsum, count, x, weight, saturated, bad) -> None:
        """Weighted Welford step (West 1979) on one block, in place."""
        valid = np.isfinite(x[0])
        if bad is not None:
            valid &= ~bad
        w = valid.astype(np.float32) * np.float32(weight)
        if saturated is not None:
            w[saturated] *= np.float32(self.p.saturated_weight)
        wnew = wsum + w
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(wnew > 0, w / wnew, 0).astype(np.float32)
        for c in range(x.shape[0]):
            delta = np.where(valid, x[c] - mean[c], 0).astype(np.float32)
            mean[c] += delta * frac
            m2[c] += w * delta * np.where(valid, x[c] - mean[c], 0)
        wsum[...] = wnew
        count += valid

    def _chunks(self):
        h = self.shape[1]
        for r0 in range(0, h, self.p.chunk_rows):
            yield r0, min(h, r0 + self.p.chunk_rows)

    # ------------------------------------------------------------------ reading

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 weighted mean (0 where no frame covers) and (H, W) float32 sum of weights.

        During the bootstrap this combines the buffered frames into temporaries (the buffer is kept)."""
        if self.mean is None:
            c, h, w = self.shape
            mean, m2 = np.zeros((c, h, w), np.float32), np.zeros((c, h, w), np.float32)
            wsum, count = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
            if self.buffer:
                self._combine_buffer(mean, m2, wsum, count)
            return mean, wsum
        return self.mean, self.wsum

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore the stack exactly (for np.savez)."""
        s: dict[str, np.ndarray] = {
            "shape": np.array(self.shape), "sky": self.sky,
            "counters": np.array([self.frames, self.rejected_total]),
            "bootstrap_rejected": np.array(self.bootstrap_rejected, np.int64),
        }
        if self.mean is not None:
            s.update(mean=self.mean, m2=self.m2, wsum=self.wsum, count=self.count)
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
        if "mean" in s:
            st.mean, st.m2 = np.array(s["mean"]), np.array(s["m2"])
            st.wsum, st.count = np.array(s["wsum"]), np.array(s["count"])
        i = 0
        while f"buf{i}_img" in s:
            sat = np.array(s[f"buf{i}_sat"]) if f"buf{i}_sat" in s else None
            st.buffer.append((np.array(s[f"buf{i}_img"]), float(s[f"buf{i}_w"]), np.array(s[f"buf{i}_noise"]), sat))
            i += 1
        return st
