"""Engine.process(path) -> FrameRecord: the stages, in order, for one frame; snapshot() writes the outputs.

    read -> calibrate -> stars & quality -> debayer -> register -> judge -> normalise -> warp -> stack

The Engine holds the session's state: the reference (grid, stars, sky), the previous transform (to predict the
next), the running quality statistics and the RunningStack — one object per filter/target, so that a session can
later hold several.  Frame-sized working buffers are allocated once and reused: a fresh 24 MP plane costs
~0.15 s of page faults before any work is done.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .. import __version__
from . import geometry
from .calibrate import Masters, calibrate
from .debayer import bin2x2_mean, debayer, debayer_mask
from .frame import Frame, FrameError, FrameRecord, Quality, Stars
from .read import read_frame
from .normalize import (normalize_inplace, plane_halved, plane_on_grid, sky_level, sky_model,
                        transparency_scale)
from .register import RegistrationError, register
from .reject import FrameJudge
from .stack import RunningStack, bin2
from .stars import detect_stars, refine_centroids
from .stretch import auto_stretch
from .warp import REACH, warp, warp_mask, warp_points
from .write import atomic_write_with, write_fits_blocks, write_jpeg

log = logging.getLogger("livestack")
SPARSE_SATURATED = 20_000   # more saturated samples than this: masks over the whole frame are cheaper
STATE_VERSION = 2     # save_state()'s layout: 2 = the stack buffers the binned luminance of bootstrap frames


class MasterSource(Protocol):
    def select(self, frame: Frame) -> Masters | None: ...


@dataclass(slots=True)
class Reference:
    """What every later frame is measured against."""

    file: str
    sensor_shape: tuple[int, int]     # (H, W) of the raw mosaic
    pattern: str | None
    grid: tuple[int, int, int]        # (C, H, W) of the stack
    stars: Stars                      # on the stack grid
    sky: np.ndarray                   # (C,) ADU at the centre
    plane: np.ndarray                 # (C, 3) sky plane a0 + ax·x + ay·y on the stack grid
    noise: float                      # mean per-pixel σ over channels, ADU
    fwhm: float


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


class Engine:
    """One running stack.  Not thread-safe: one worker calls process(); readers use snapshot data."""

    def __init__(self, cfg, *, masters: MasterSource | None = None):
        from ..config import Config

        self.cfg: Config = cfg
        self.masters = masters
        self.rng = np.random.default_rng(cfg.engine.seed)
        self.judge = FrameJudge(cfg.reject)
        self.ref: Reference | None = None
        self.stack: RunningStack | None = None
        self.last_matrix: np.ndarray | None = None
        self.index = 0
        self.n_stacked = 0
        self.n_rejected = 0
        self.n_failed = 0
        self.exptime_total = 0.0
        self.first_time: str | None = None
        self.last_end: str | None = None
        self.camera: str | None = None
        self.filter: str | None = None
        self.calibration_used: dict = {}
        self._ws: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}
        self._t = 0.0

    # ------------------------------------------------------------------ one frame

    def process(self, path: Path | str) -> FrameRecord:
        """Run one file through the pipeline and update the stack.  Never raises for a bad file: a FrameError
        becomes ``status: failed`` with its reason (and one log line)."""
        path = Path(path)
        t0 = time.perf_counter()
        rec = FrameRecord(file=path.name, status="failed", index=self.index)
        self.index += 1
        try:
            self._process(path, rec)
        except FrameError as err:
            rec.status, rec.reason = "failed", err.reason
            self.n_failed += 1
            log.warning("failed %s", err)
        rec.seconds = round(time.perf_counter() - t0, 4)
        return rec

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._t
        self._t = now

    def _process(self, path: Path, rec: FrameRecord) -> None:
        cfg = self.cfg
        self.timings: dict[str, float] = {}   # seconds per stage of the last frame (benchmarks read it)
        self._t = time.perf_counter()
        if self.stack is not None and self.stack.bootstrap_full:
            # Once per session: the buffered first frames become the accumulators.  The work buffers are
            # given back first so that they, the buffer and the new accumulators never coexist.
            self._ws.clear()
            self.stack.finish_bootstrap()
            self._lap("bootstrap")
        frame = read_frame(path, out=self._ws.get("cfa"))
        if frame.meta.kind == "raw":
            self._ws["cfa"] = frame.data      # decoded into by the next frame of this size
        self._lap("read")
        m = frame.meta
        sensor_shape = frame.shape
        rec.time, rec.exptime = _iso(m.time), m.exptime
        rec.camera, rec.filter, rec.iso, rec.gain = m.camera, m.filter, m.iso, m.gain
        if m.imagetyp not in (None, "light"):
            raise FrameError(path, f"IMAGETYP says '{m.imagetyp}', not a light frame")
        if self.ref is not None:
            if sensor_shape != self.ref.sensor_shape:
                raise FrameError(path, f"size {sensor_shape[1]}×{sensor_shape[0]} differs from the session's "
                                       f"{self.ref.sensor_shape[1]}×{self.ref.sensor_shape[0]}")
            if frame.pattern != self.ref.pattern:
                raise FrameError(path, f"CFA pattern {frame.pattern} differs from the session's {self.ref.pattern}")
            if m.filter and self.filter and m.filter.strip().casefold() != self.filter.strip().casefold():
                # A filter wheel moved: averaging L with Ha (or R with B) would spoil the stack, and the sky and
                # transparency normalisation would hide it.  One stack per filter is the next step.
                return self._reject(rec, f"filter {m.filter} differs from the stack's {self.filter} "
                                         f"(one stack per filter: start a new session for it)")

        masters = self.masters.select(frame) if self.masters is not None else None
        cfa, info = calibrate(frame, masters, cfg.cosmetic, inplace=True)
        self._lap("calibrate")
        rec.calibration = info
        if masters is not None:
            self.calibration_used.update({k: v for k, v in masters.names.items()})

        plane_cfa, noise = sky_model(cfa, frame.pattern)
        plane = plane_on_grid(plane_cfa, cfg.engine.debayer if frame.pattern else None)
        sky = sky_level(plane_cfa, sensor_shape)
        stars, q, binned = self._stars(cfa, frame)
        lum = self._lum_source(cfa if binned is None else binned, frame.pattern)
        self._lap("stars")
        if frame.pattern is not None and cfg.engine.debayer == "superpixel" and len(stars):
            # The superpixel grid has no finer image than the binned one the stars were found on, but the
            # mosaic is still here: windowed centroids on it (its 2×2 colour pattern averages out inside the
            # window) take registration from ~0.08 to ~0.03 CFA px RMS.
            xy = refine_centroids(cfa[None], stars.xy * 2.0 + 0.5, q.fwhm * 2.0)
            stars = Stars((xy - 0.5) / 2.0, stars.flux, stars.fwhm, stars.a, stars.b)
            self._lap("centroids")
        rgb = self._debayer(cfa, frame.pattern)
        self._lap("debayer")
        if frame.pattern is not None:
            frame.data = cfa = None   # the mosaic is done with: 96 MB back before the warp (24 MP)
        if frame.pattern is not None and cfg.engine.debayer == "bilinear" and len(stars):
            # Binned detection is fast but its centroids of undersampled stars carry ~0.1 px pixel-phase
            # errors; windowed centroids on the full-resolution image bring them to ~0.03 px.
            stars = Stars(refine_centroids(rgb, stars.xy, q.fwhm), stars.flux, stars.fwhm, stars.a, stars.b)
            self._lap("centroids")
        rec.stars, rec.fwhm, rec.eccentricity = q.stars, _r(q.fwhm, 3), _r(q.eccentricity, 3)
        rec.background, rec.noise = _r(float(sky.mean()), 3), _r(float(noise.mean()), 4)
        sat_cfa = None if frame.saturated is None else cv2.findNonZero(frame.saturated.view(np.uint8))
        rec.saturated_pixels = 0 if sat_cfa is None else len(sat_cfa)
        q = Quality(q.stars, q.fwhm, q.eccentricity, float(sky.mean()), float(noise.mean()))

        if self.ref is None:
            reason = self.judge.check_reference(q)
            if reason:
                return self._reject(rec, reason)
            self._make_reference(frame, sensor_shape, stars, plane, sky, noise, q)
            matrix, scale = geometry.identity(), 1.0
            rec.status = "reference"
        else:
            try:
                reg = register(stars.xy, self.ref.stars.xy, cfg.register, rng=self.rng,
                               predicted=self.last_matrix, src_flux=stars.flux, ref_flux=self.ref.stars.flux)
                self._lap("register")
            except RegistrationError as err:
                return self._reject(rec, f"registration failed: {err}")
            matrix = reg.matrix
            scale = transparency_scale(self.ref.stars.flux[reg.ref_idx], stars.flux[reg.src_idx])
            rec.scale = _r(scale, 4)
            reason = self.judge.check(q, transparency=1.0 / scale if scale > 0 else 0.0)
            if reason:
                return self._reject(rec, reason)
            rec.status = "stacked"
        rec.matrix = _matrix_list(matrix)
        dx, dy, rot, _ = geometry.decompose(matrix, center=self._grid_centre())
        rec.shift_x, rec.shift_y, rec.rotation = _r(dx, 3), _r(dy, 3), _r(rot, 4)

        # Pixels: normalise to the reference, warp onto the grid, add.
        normalize_inplace(rgb, plane, scale, self.ref.plane, matrix, parallel_map=self.stack.parallel_map)
        self._lap("normalize")
        noise_n = noise * scale
        weight = (self.ref.noise / max(float(noise_n.mean()), 1e-12)) ** 2
        if cfg.engine.sharpness_weight and np.isfinite(q.fwhm) and q.fwhm > 0:
            weight *= (self.ref.fwhm / q.fwhm) ** cfg.engine.sharpness_weight
        rec.weight = _r(weight, 4)

        # The stack takes the binned luminance (it decides which 2×2 cells are outliers), normalised and warped
        # at half resolution, and then one channel at a time, so the warp needs one channel plane instead of a
        # whole warped frame.
        grid_hw = self.ref.grid[1:]
        lw = self.stack.lum_weights
        if frame.pattern is None or cfg.engine.debayer == "bilinear":     # lum is on the frame's cell grid
            half = geometry.halved(matrix)
            normalize_inplace(lum[None], plane_halved(lw @ plane), scale, plane_halved(lw @ self.ref.plane), half,
                              parallel_map=self.stack.parallel_map)
            cells = warp(lum[None], half, self.stack.cells, interpolation=cfg.engine.interpolation,
                         out=self._buffer("cells", (1,) + self.stack.cells))[0]
        else:                                                       # superpixel: grid-sized, binned after
            normalize_inplace(lum[None], (lw @ plane)[None], scale, (lw @ self.ref.plane)[None], matrix,
                              parallel_map=self.stack.parallel_map)
            cells = bin2(warp(lum[None], matrix, grid_hw, interpolation=cfg.engine.interpolation)[0])
        sat = self._saturated_on_grid(frame, sat_cfa, None if rec.status == "reference" else matrix)
        if rec.status == "reference":
            channel = rgb.__getitem__
        else:
            one = self._buffer("scratch", rgb.shape[1:])

            def channel(c: int) -> np.ndarray:
                return warp(rgb[c][None], matrix, grid_hw, interpolation=cfg.engine.interpolation,
                            out=one[None])[0]
        rec.rejected_pixels = self.stack.add_channels(cells, channel, weight, noise_n, saturated=sat)
        self._lap("warp+stack")

        self.judge.accept(q)
        self.last_matrix = matrix
        self.n_stacked += 1
        self.exptime_total += m.exptime or 0.0
        if m.time is not None:
            if self.first_time is None:
                self.first_time = _iso(m.time)
            self.last_end = _iso(m.time + dt.timedelta(seconds=m.exptime or 0.0))
        self.camera = self.camera or m.camera
        self.filter = self.filter or m.filter

    def _reject(self, rec: FrameRecord, reason: str) -> None:
        rec.status, rec.reason = "rejected", reason
        self.n_rejected += 1
        log.info("rejected %s: %s", rec.file, reason)

    # ------------------------------------------------------------------ stages with the session's geometry

    def _stars(self, cfa: np.ndarray, frame: Frame) -> tuple[Stars, Quality, np.ndarray | None]:
        """Stars on the stack grid, and for colour frames the 2×2-binned mosaic they were found on (a true
        luminance, (R + 2G + B)/4, at a quarter of the pixels: 4× faster than the debayered image, same
        centroids)."""
        white = frame.white - float(frame.black.mean())
        if frame.pattern is None:
            return *detect_stars(cfa, self.cfg.stars, saturation=white), None
        lum = bin2x2_mean(cfa)
        stars, q = detect_stars(lum, self.cfg.stars, saturation=white, extra_var=1 / 12 - 1 / 48)
        if self.cfg.engine.debayer == "superpixel":
            return stars, q, lum
        # Cell (i, j) of the binned image covers full-resolution pixels 2i..2i+1: its centre is at 2i + 0.5.
        xy = stars.xy * 2.0 + 0.5
        s = Stars(xy, stars.flux, stars.fwhm * 2.0, stars.a * 2.0, stars.b * 2.0)
        return s, Quality(q.stars, q.fwhm * 2.0, q.eccentricity, q.background, q.noise), lum

    def _lum_source(self, lum: np.ndarray, pattern: str | None) -> np.ndarray:
        """The luminance the stack's outlier test is computed from, before normalising and warping: for the
        bilinear debayer the binned mosaic itself (a stack cell is a Bayer cell) and for mono the image binned
        — both already on the frame's cell grid, warped at half resolution — but for superpixel the binned
        mosaic on the grid (a cell there spans 4×4 sensor pixels: interpolating at that scale would make an
        undersampled star's cell value depend on its sub-cell position, and the test would reject star cores
        of a frame that moved; it is warped at grid resolution and binned after).  A new float32 array."""
        if pattern is None:
            return bin2(lum)
        return lum

    def _debayer(self, cfa: np.ndarray, pattern: str | None) -> np.ndarray:
        if pattern is None:
            return cfa[None]
        method = self.cfg.engine.debayer
        h, w = cfa.shape
        shape = (3, h // 2, w // 2) if method == "superpixel" else (3, h, w)
        scratch = self._buffer("scratch", (h, w)) if method == "bilinear" else None
        return debayer(cfa, pattern, method, out=self._buffer("rgb", shape), scratch=scratch)

    def _saturated_on_grid(self, frame: Frame, points: np.ndarray | None, matrix: np.ndarray | None):
        """The stack-grid pixels that saturated samples feed (through the debayer and, unless ``matrix`` is None
        for the reference, the warp) as (rows, cols) — or, when there are very many (the Moon), as the dense
        mask the same rules give.  ``points``: cv2.findNonZero's (x, y) of the CFA samples."""
        if points is None:
            return None
        method = self.cfg.engine.debayer if frame.pattern is not None else None
        grid_hw = self.ref.grid[1:]
        if len(points) > SPARSE_SATURATED:
            sat = debayer_mask(frame.saturated, frame.pattern, method)
            return sat if matrix is None else warp_mask(sat, matrix, grid_hw)
        xs, ys = points.reshape(-1, 2).T
        if method == "superpixel":
            xs, ys = xs // 2, ys // 2
            inside = (xs < grid_hw[1]) & (ys < grid_hw[0])
            xs, ys = xs[inside], ys[inside]
        reach = (0.5 if matrix is None else REACH[self.cfg.engine.interpolation]) + (method == "bilinear")
        return warp_points(ys, xs, geometry.identity() if matrix is None else matrix, grid_hw, reach=reach)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        b = self._ws.get(name)
        if b is None or b.shape != tuple(shape):
            b = self._ws[name] = np.empty(shape, np.float32)
        return b

    def _make_reference(self, frame: Frame, sensor_shape: tuple[int, int], stars: Stars, plane, sky, noise,
                        q: Quality) -> None:
        h, w = sensor_shape
        if frame.pattern is None:
            grid = (1, h, w)
        elif self.cfg.engine.debayer == "superpixel":
            grid = (3, h // 2, w // 2)
        else:
            grid = (3, h, w)
        self.ref = Reference(frame.path.name, sensor_shape, frame.pattern, grid, stars,
                             np.asarray(sky, np.float64), np.asarray(plane, np.float64), float(np.mean(noise)),
                             q.fwhm)
        # The stack's luminance is the one of its cells (_lum_source): (R + 2G + B)/4 of the raw samples of a Bayer
        # cell (bilinear: 1 R, 2 G, 1 B; superpixel: 4 Bayer cells) or the mean of 4 mono pixels.
        if frame.pattern is None:
            weights, samples = [1.0], [4.0]
        else:
            k = 4.0 if self.cfg.engine.debayer == "superpixel" else 1.0
            weights, samples = [0.25, 0.5, 0.25], [k, 2 * k, k]
        self.stack = RunningStack(grid, sky, self.cfg.stack, weights, samples)

    def _grid_centre(self) -> tuple[float, float]:
        _, h, w = self.ref.grid
        return ((w - 1) / 2.0, (h - 1) / 2.0)

    # ------------------------------------------------------------------ outputs

    def header(self) -> dict:
        """FITS header cards of the stack: provenance a stacking tool would write."""
        hdr = {
            "NCOMBINE": (self.n_stacked, "frames combined"),
            "EXPTIME": (round(self.exptime_total, 3), "[s] total exposure of combined frames"),
            "DATE-OBS": (self.first_time, "start of the first combined frame"),
            "DATE-END": (self.last_end, "end of the last combined frame"),
            "INSTRUME": (self.camera, "camera"),
            "BAYERPAT": (self.ref.pattern if self.ref else None, "CFA pattern of the source (stack is RGB)"),
            "FILTER": (self.filter, "filter"),
            "SOFTWARE": (f"livestack {__version__}", "stacking software"),
            "CREATOR": (f"livestack {__version__}", ""),
            "NREJECT": (self.n_rejected, "frames rejected"),
            "NFAILED": (self.n_failed, "frames that could not be read"),
            "REJPIX": (self.stack.rejected_total if self.stack else 0, "outlier pixels rejected"),
            "REFFRAME": (self.ref.file if self.ref else None, "reference frame (stack grid)"),
            "DEBAYER": (self.cfg.engine.debayer if self.ref and self.ref.pattern else None, "demosaicing"),
            "INTERP": (self.cfg.engine.interpolation, "warp interpolation"),
            "KAPPA": (self.cfg.stack.kappa, "outlier rejection threshold, sigma"),
            "BUNIT": ("ADU", "calibrated, normalised to the reference frame"),
        }
        if self.calibration_used:
            hdr["CALIBRAT"] = (", ".join(f"{k}={v}" for k, v in sorted(self.calibration_used.items()))[:68],
                               "masters used")
        return {k: v for k, v in hdr.items() if v[0] is not None}

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(C, H, W) stack and (H, W) weight map, or None before the first stacked frame."""
        if self.stack is None:
            return None
        return self.stack.result()

    def snapshot(self, out_dir: Path | str) -> bool:
        """Write stack.fits and preview.jpg into ``out_dir`` (atomically).  False when nothing is stacked yet."""
        if self.stack is None:
            return False
        out_dir = Path(out_dir)
        self.write_stack(out_dir / "stack.fits")
        write_jpeg(out_dir / "preview.jpg", self.preview(), self.cfg.stretch.jpeg_quality)
        return True

    def write_stack(self, path: Path | str) -> bool:
        """Write stack.fits (atomically, streaming: no full-resolution copy of the stack is built).
        False when nothing is stacked yet."""
        if self.stack is None:
            return False
        c, h, w = self.ref.grid
        shape = (h, w) if c == 1 else (c, h, w)
        write_fits_blocks(Path(path), shape, self.stack.mean_blocks(), self.header(), weight=self.stack.weights())
        return True

    @property
    def has_stack(self) -> bool:
        """True once a frame has been stacked (result() and preview() have something to show)."""
        return self.stack is not None

    def preview(self, img=None, wsum=None, stretch=None, *, dtype=np.uint8) -> np.ndarray:
        """The stretched stack as (h, w, 3) RGB: uint8 for the page, uint16 for a 16-bit export.

        Without ``img`` it is drawn from a reduced copy of the running sums (stretch.max_size): a few tens of ms
        at 24 MP, where building the full-resolution mean first would cost ~0.7 s and ~400 MB."""
        p = stretch or self.cfg.stretch
        if img is None:
            img, wsum = self.stack.reduced(p.max_size)
        return auto_stretch(img, p, coverage=wsum > 0, dtype=dtype)

    # ------------------------------------------------------------------ checkpoint

    def save_state(self, path: Path | str) -> None:
        """Everything needed to resume exactly, in one .npz written atomically (tmp + fsync + rename)."""
        meta = {
            "version": STATE_VERSION, "index": self.index, "n_stacked": self.n_stacked, "n_rejected": self.n_rejected,
            "n_failed": self.n_failed, "exptime_total": self.exptime_total, "first_time": self.first_time,
            "last_end": self.last_end, "camera": self.camera, "filter": self.filter,
            "calibration_used": self.calibration_used, "judge": self.judge.state(),
            "rng": self.rng.bit_generator.state,
            "last_matrix": None if self.last_matrix is None else self.last_matrix.tolist(),
        }
        arrays: dict[str, np.ndarray] = {}
        if self.ref is not None:
            r = self.ref
            meta["ref"] = {"file": r.file, "sensor_shape": list(r.sensor_shape), "pattern": r.pattern,
                           "grid": list(r.grid), "noise": r.noise, "fwhm": r.fwhm, "sky": r.sky.tolist(),
                           "plane": r.plane.tolist()}
            for k in ("xy", "flux", "fwhm", "a", "b"):
                arrays[f"ref_{k}"] = getattr(r.stars, k)
            arrays.update({f"stack_{k}": v for k, v in self.stack.state().items()})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

        def writer(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write_with(Path(path), writer)

    @classmethod
    def load_state(cls, path: Path | str, cfg, *, masters: MasterSource | None = None) -> "Engine":
        eng = cls(cfg, masters=masters)
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("version") != STATE_VERSION:
                raise ValueError(f"checkpoint format {meta.get('version')}, this livestack reads {STATE_VERSION}")
            for k in ("index", "n_stacked", "n_rejected", "n_failed", "exptime_total", "first_time",
                      "last_end", "camera", "filter", "calibration_used"):
                setattr(eng, k, meta[k])
            eng.judge.load_state(meta["judge"])
            eng.rng.bit_generator.state = meta["rng"]
            eng.last_matrix = None if meta["last_matrix"] is None else np.array(meta["last_matrix"])
            if "ref" in meta:
                r = meta["ref"]
                stars = Stars(*(np.array(z[f"ref_{k}"]) for k in ("xy", "flux", "fwhm", "a", "b")))
                eng.ref = Reference(r["file"], tuple(r["sensor_shape"]), r["pattern"], tuple(r["grid"]), stars,
                                    np.array(r["sky"]), np.array(r["plane"]), r["noise"], r["fwhm"])
                st = {k[len("stack_"):]: z[k] for k in z.files if k.startswith("stack_")}
                eng.stack = RunningStack.from_state(st, cfg.stack)
        return eng


def _r(x, nd):
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if np.isfinite(x) else None


def _matrix_list(m: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in np.asarray(m)[:2]]
