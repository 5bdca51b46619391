"""Engine.process(path) -> FrameRecord: the stages, in order, for one frame.

    read -> calibrate -> stars & quality -> register -> judge -> normalise -> demosaic + warp + stack

The Engine routes: the session's Grid (chosen at the reference frame: mono, Bayer full resolution or
superpixel) says how a frame's pixels reach the stacks (a Bayer mosaic is demosaiced and warped a block of
grid rows at a time as its stack adds them: render.py), the reference stars (shared by every filter) say
where a frame lies on the grid, and the frame's filter picks the FilterStack that judges, normalises, weights
and stacks it.  Frame-sized working buffers are allocated once and reused: a fresh 24 MP plane costs ~0.15 s of
page faults before any work is done.  Outputs (stack files, preview, composite) are written by ``outputs.py``;
the checkpoint format is the session's (``session.py``): the engine gives and takes its state as plain values.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import geometry
from .calibrate import Masters, calibrate, nonzero_xy
from .drizzle import Drizzler, too_big
from .drizzle import compensation as drizzle_compensation
from .filterstack import Counters, FilterStack, distinct, filter_key
from .frame import Frame, FrameError, FrameRecord, Quality, Stars
from .grid import Grid
from .memory import release_free_memory
from .normalize import Normalisation, normalize_inplace, normalize_mosaic, sky_level, sky_model
from .read import read_frame
from .render import drop_work_memory, signal_cells
from .register import RegistrationError, register
from .reject import RejectParams
from .settings import Config
from .stack import RunningStack

log = logging.getLogger("livestack")
QUANTISATION_NOISE = 12 ** -0.5   # ADU: the noise of rounding to whole ADU
STATE_VERSION = 3     # state()'s layout: 3 = one stack per filter on a shared grid


class MasterSource(Protocol):
    def select(self, frame: Frame) -> Masters | None: ...


@dataclass(slots=True)
class Reference:
    """The frame every later one is registered to, whatever its filter: the grid is its pixel grid."""

    file: str
    stars: Stars                      # on the grid
    filter: str                       # its filter's key
    pointing: tuple[float, float] | None = None   # (RA, Dec) degrees from its header, when it has one
    object: str | None = None         # its OBJECT header
    cards: dict | None = None         # its TELESCOP, FOCALLEN (mm), XPIXSZ, YPIXSZ (µm, binning included),
                                      # ROWORDER: what the stacks' headers keep of it


def _header_cards(extra: dict) -> dict | None:
    """What the stacks' headers keep of a reference frame's (FITS) header: TELESCOP and ROWORDER as text,
    FOCALLEN, XPIXSZ and YPIXSZ when positive numbers; None when it has none of them."""
    out: dict = {}
    for k in ("TELESCOP", "ROWORDER"):
        text = str(extra.get(k, "") or "").strip()
        if text:
            out[k] = text
    for k in ("FOCALLEN", "XPIXSZ", "YPIXSZ"):
        try:
            v = float(extra[k])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            out[k] = v
    return out or None


class Engine:
    """A session's stacks, one per filter, on one grid.  Not thread-safe: one worker calls process()."""

    def __init__(self, cfg: Config, *, masters: MasterSource | None = None, spill_dir: Path | str | None = None):
        """``cfg``: the settings (plain values); ``spill_dir``: where stacks of filters not being captured are
        kept in memory-mapped files when the stacks outgrow ``cfg.stack.memory_mb`` (default: the system's
        temporary folder)."""
        self.cfg = cfg
        if cfg.drizzle.scale and cfg.engine.debayer == "superpixel":     # (the Pi's mode and a drizzle: said once)
            log.warning("livestack: debayer superpixel has no effect with a drizzle: each sample goes to its own "
                        "colour plane, nothing is demosaiced")
        if not cfg.drizzle.scale and cfg.drizzle.pixfrac != type(cfg.drizzle)().pixfrac:   # (said once, too)
            log.warning("livestack: drizzle pixfrac %g has no effect without a drizzle (--drizzle 1 or 2, "
                        "[drizzle] scale): the frames are warped", cfg.drizzle.pixfrac)
        self.masters = masters
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.rng = np.random.default_rng(cfg.engine.seed)
        self.grid: Grid | None = None
        self.ref: Reference | None = None
        self.filters: dict[str, FilterStack] = {}     # by filter_key, in order of first appearance
        self.last_matrix: np.ndarray | None = None
        self.last_stars: Stars | None = None          # the latest frame's stars on its own grid …
        self.last_grid: Grid | None = None            # … that grid (the session's, or another camera's own) …
        self.last_pointing: tuple[float, float] | None = None   # … and its header's pointing (matching targets)
        self.last_judged: str | None = None   # an unregistered frame's judge verdict: None good, else why not
        self.last_stacked: tuple[Stars, np.ndarray] | None = None   # the latest stacked frame's stars, matrix
        self.index = 0
        self.failed = 0                               # frames that could not be used, whatever their filter
        self._unread_rejections: dict[str, int] = {}  # filter key -> count_unread_rejection's before its stack
        # Verdicts on earlier frames that changed during the latest process(): {"file", "index", "status",
        # "reason", "weight"} — a filter's first frame rejected once its bootstrap was full.  The caller
        # applies them to its records (frames.jsonl) and clears the list.
        self.amended: list[dict] = []
        self.calibration_used: dict = {}
        self._ws: dict[str, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(cfg.stack.threads, thread_name_prefix="stack") \
            if cfg.stack.threads > 1 else None
        self._recent: list[str] = []                  # filter keys, most recently used last
        self._reduced: dict = {}                      # reduced() cache
        self.written: dict = {}                       # outputs.py: file -> what it was written from
        self.final_stream = None                      # outputs.FinalStream: process(final_into=…)'s stack.fits
        self.timings: dict[str, float] = {}
        self._t = 0.0
        self._reader: ThreadPoolExecutor | None = None   # the read-ahead thread (process(next_path=…))
        self._ahead: tuple[Path, int, object] | None = None
        self._slot = 0                                # which mosaic buffer the frame in hand uses

    def close(self) -> None:
        """Stop the worker threads the stacks share (they also stop when the engine is garbage-collected: a
        restack or a new stack replaces the engine, and each must not leave its threads behind)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader, self._ahead = None, None

    def __del__(self):
        for name in ("_pool", "_reader"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=False)

    # ------------------------------------------------------------------ counts

    @property
    def counts(self) -> Counters:
        """The session's counters: every filter's, plus the frames that failed before reaching one."""
        total = Counters(failed=self.failed, rejected=sum(self._unread_rejections.values()))
        for fs in self.filters.values():
            total = total + fs.counts
        return total

    @property
    def n_stacked(self) -> int:
        return self.counts.stacked

    @property
    def n_rejected(self) -> int:
        return self.counts.rejected

    @property
    def n_failed(self) -> int:
        return self.failed

    @property
    def exptime_total(self) -> float:
        return self.counts.exptime

    def ref_stars_on_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference frame's stars on the grid (what a plate solve of the grid matches): (xy, flux)."""
        return geometry.apply(self.grid.stars_to_grid, self.ref.stars.xy), self.ref.stars.flux

    def set_wcs(self, wcs) -> None:
        """A plate solution of the grid (astropy WCS in grid pixels, or None): every stack file written from now
        on carries it."""
        if self.grid is None:
            raise ValueError("no grid yet: a WCS needs a reference frame")
        self.grid = dataclasses.replace(self.grid, wcs=wcs)
        self.written.clear()          # the filter files are rewritten with it

    def count_rejected(self, rec: FrameRecord) -> FrameRecord:
        """A frame process(hold=True) left ``unregistered`` is, after all, a rejection of its filter's."""
        if rec.status == "unregistered":
            self._reject(rec, self._filter(rec.filter), rec.reason)
        return rec

    def count_unread_rejection(self, filter_name: str | None) -> int:
        """A frame rejected before whose file can no longer be read (a restack after the user deleted it): its
        verdict stands and it counts as its filter's rejection, as when it was read.  Returns the index it
        takes in the processing order.  Before the first frame there is no grid to set its filter's judge by
        (Grid.judge_params): the count waits for the filter's stack to be made (_filter), and counts meanwhile."""
        key = filter_key(filter_name)
        if key in self.filters or self.grid is not None:
            self._filter(filter_name).reject()
        else:
            self._unread_rejections[key] = self._unread_rejections.get(key, 0) + 1
        self.index += 1
        return self.index - 1

    def count_failed(self) -> None:
        """A frame the caller could not hand in (e.g. a file that never completed) counts as failed."""
        self.failed += 1

    @property
    def stacks(self) -> list[FilterStack]:
        """The filters with a stack, in order of first appearance."""
        return [fs for fs in self.filters.values() if fs.stack is not None]

    @property
    def main(self) -> FilterStack | None:
        """The reference frame's filter stack."""
        return self.filters.get(self.ref.filter) if self.ref is not None else None

    @property
    def has_stack(self) -> bool:
        """True once a frame has been stacked."""
        return self.ref is not None

    @property
    def filter(self) -> str | None:
        """The reference frame's FILTER value."""
        return self.main.name if self.main is not None else None

    # ------------------------------------------------------------------ one frame

    def process(self, path: Path | str, *, hold: bool = False, next_path: Path | str | None = None,
                final_into: Path | str | None = None, next_last: bool = False) -> FrameRecord:
        """Run one file through the pipeline and update its filter's stack.  Never raises for a bad file: a
        FrameError becomes ``status: failed`` with its reason (and one log line).

        ``hold``: a frame that does not register onto the reference comes back as ``status: unregistered``,
        counted nowhere — the telescope may have moved to another target (the daemon's call); ``last_judged``
        is None when its filter's judge finds nothing wrong with it, else the judge's reason (clouds on the new
        field, or on this one).  ``count_rejected(rec)`` counts it as an ordinary rejection later.
        ``last_stars``, ``last_grid`` and ``last_pointing`` hold every frame's stars, the grid they lie on and its
        header's pointing, for matching it against other references.

        ``next_path``: the file the caller will hand in next, when it knows (a folder to stack, a backlog): its
        first stages — reading, calibration, sky and stars, a third to a half of a frame's time — run in a
        second thread while this frame is registered, warped and stacked (one more mosaic in memory: 96 MB at
        24 MP).  Results are the same as without.  ``next_last``: ``next_path`` is the last file of a batch — its
        star search runs in the read-ahead thread too (not, as for the others, in the caller's at its turn): sep
        holds the GIL while it works, which stalls this frame's stacking for a moment, but the last frame starts
        stacking (and streaming its stack file, final_into) that much sooner, and a batch's end waits for the disk.
        Paired runs of `livestack stack` of 8 × 24 MP, from the seventh frame's start to the end: 1.985 → 1.895 s
        (medians, 10 pairs, 7 faster), then 1.72 → 1.755 s with pair differences' median −0.03 s (12 pairs, 8
        not slower) — a small gain, at the edge of this VM's noise; the frame before holds the last one's binned
        image and the search's planes meanwhile (process RSS in that frame 924–930 MB against 898–923 MB in the
        frames before it, two runs).

        ``final_into``: this is the last file before snapshot(final_into) — a batch's: stack.fits is written
        as the frame's rows are stacked (outputs.FinalStream), and snapshot() finishes it."""
        path = Path(path)
        if self.final_stream is not None:       # one that was not written out: its frame is no longer the last
            self.final_stream.abandon()
            self.final_stream = None
        t0 = time.perf_counter()
        rec = FrameRecord(file=path.name, status="failed", index=self.index)
        self.index += 1
        self.last_stars = self.last_grid = self.last_pointing = self.last_judged = None
        front = None
        try:
            ahead = next_path is not None and self.cfg.engine.read_ahead and not self._bootstrap_near()
            front = self._take_front(path, Path(next_path) if ahead else None, stars_ahead=next_last)
            if self._ahead is None:
                self._ws.pop(f"cfa{1 - self._slot}", None)   # no frame read ahead: its mosaic buffer goes
            self._front_stars(front)      # a read-ahead's star search, beside the next file's reading
            self._process(front, rec, hold, final_into)
        except FrameError as err:
            rec.status, rec.reason = "failed", err.reason
            self.failed += 1
            log.warning("failed %s", err)
        del front         # and its mosaic (96 MB at 24 MP), before a bootstrap's combination
        self._finish_bootstraps()
        self._trim()
        rec.seconds = round(time.perf_counter() - t0, 4)
        return rec

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._t
        self._t = now

    # ------------------------------------------------------------------ the first stages, maybe ahead

    def _start_front(self, path: Path, stars: bool = False) -> None:
        """Run the first stages of ``path`` in the read-ahead thread (one at a time, into the mosaic buffer the
        frame in hand does not use) — with its star search when ``stars`` (process's next_last)."""
        if self._ahead is not None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        slot = 1 - self._slot
        self._ahead = (path, slot, self._reader.submit(self._front, path, slot, stars=stars))

    def _bootstrap_near(self) -> bool:
        """True when this frame may fill a stack's bootstrap buffer whose combination is the session's memory
        peak (_combination_peaks): a mosaic read ahead meanwhile would add to it (~120 MB at 24 MP)."""
        return any(fs.stack.sums is None and len(fs.stack.buffer) >= max(1, fs.stack.p.bootstrap) - 1
                   and self._combination_peaks(fs) for fs in self.stacks)

    def _combination_peaks(self, fs: FilterStack) -> bool:
        """Whether ``fs``'s bootstrap combination needs more memory than the steady state, which holds a
        mosaic read ahead beside the accumulators: then nothing is read ahead beside the frame that fills the
        buffer, and the threads' and the heap's free memory is given back before the combination.  Not for a
        stack of three colour or mono frames, whose peak is the steady state's: there both cost 0.1 s at
        24 MP (the frame after the combination was read while nothing ran beside it, and its temporaries
        were new pages again; `livestack stack` of 8 frames 3.04–3.28 → 2.98–3.09 s, peak RSS 914–921 →
        941–950 MB).  Drizzled, or a longer bootstrap: yes."""
        mosaic = self.grid.sensor_shape[0] * self.grid.sensor_shape[1] * 4 if self.grid is not None else 0
        return fs.stack.combination_excess() > mosaic

    def _take_front(self, path: Path, next_path: Path | None = None, stars_ahead: bool = False) -> "_Front":
        """The first stages of ``path``: read ahead when they were started for it, else now; and ``next_path``'s
        (when given) started in the read-ahead thread — before this file's own when nothing was read ahead for
        it: the first file of a folder (or the first after a bootstrap) no longer leaves a core idle while
        LibRaw decodes it."""
        ahead, self._ahead = self._ahead, None
        front = None
        if ahead is not None:
            a_path, slot, fut = ahead
            front = fut.result()              # (a read ahead of another file is waited for and dropped)
            if a_path == path:
                self._slot = slot
            else:
                front = None
        if next_path is not None:
            self._start_front(next_path, stars_ahead)      # into the other slot's buffer
        return front if front is not None else self._front(path, self._slot, threads=True)

    def _front(self, path: Path, slot: int, *, threads: bool = False, stars: bool = True,
               speculate: bool = True) -> "_Front":
        """read -> calibrate -> sky -> stars: pure work on the file (no engine state is changed), so it may run
        in the read-ahead thread while the previous frame is stacked.  A FrameError is kept for process().

        ``threads``: the engine's worker threads are free for this frame (not for a read-ahead, whose frame is
        stacked on them meanwhile): the hot-pixel search's row blocks and the sky model run there, beside the
        star finder — the same results, sooner for a frame that nothing was read ahead for (a live one).

        ``stars`` False (a read-ahead): the star search is left to _front_stars, which process() runs in the
        caller's thread once the next file's reading has started.  sep holds the GIL while it works (~60 ms at 24 MP:
        sep-developers/sep#172), and in the read-ahead thread that stopped the worker threads stacking the
        previous frame (benchmarks/bench_gil.py: 0.06–0.13 s a frame); beside the next file's decoding
        (LibRaw and astropy release the GIL) it stops nothing — but for a batch's last file (process's next_last),
        whose early start pays more than the stall costs.

        ``speculate``: the file read as read_frame's ``speculate`` says — its values verified before this
        returns, and the file read again (speculate False) when they do not stand."""
        cfg = self.cfg
        pool = self._pool if threads else None
        f = _Front(path)
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            f.timings[stage] = now - t
            t = now

        try:
            key = f"cfa{slot}"
            frame = read_frame(path, out=self._ws.get(key), max_megapixels=cfg.engine.max_megapixels,
                               speculate=speculate)
            self._ws[key] = frame.data          # decoded into by a later frame of this size
            lap("read")
            f.frame = frame
            m = frame.meta
            if m.imagetyp not in (None, "light"):
                raise FrameError(path, f"IMAGETYP says '{m.imagetyp}', not a light frame")
            grid = self.grid or Grid.for_frame(frame.shape, frame.pattern, cfg.engine.debayer, cfg.drizzle)
            if grid.mismatch(frame):
                # another camera (another night's, another target's?): its stars on a grid of its own, so that
                # the caller can match them against other targets; process() says why it cannot be stacked here
                grid = Grid.for_frame(frame.shape, frame.pattern, cfg.engine.debayer, cfg.drizzle)
            f.grid = grid
            # the grid's scale, not the config's: a checkpoint kept under another [drizzle] scale keeps its grid
            reason = too_big(frame.shape, grid.channels, dataclasses.replace(cfg.drizzle, scale=grid.scale)) \
                if grid.drizzled else None
            if reason:
                raise FrameError(path, reason)
            f.masters = self.masters.select(frame) if self.masters is not None else None
            f.cfa, f.calibration = calibrate(frame, f.masters, cfg.cosmetic, inplace=True,
                                             parallel_map=self.parallel_map if threads else None)
            if frame.saturated is not None:     # as points; the mask (24 MB at 24 MP) only when they are many
                f.sat_cfa = nonzero_xy(frame.saturated.view(np.uint8))
                if not grid.needs_mask(f.sat_cfa):
                    frame.saturated = None
            lap("calibrate")
            white = frame.white - float(frame.black.mean())
            found = error = None
            if pool is not None and stars:      # the sky model beside the star finder
                sky = pool.submit(sky_model, f.cfa, frame.pattern)
                try:
                    found = grid.find_stars(f.cfa, white, cfg.stars)
                except Exception as err:    # raised after the sky's verdict below, as in the serial order
                    error = err
                finally:
                    wait([sky])             # it reads the mosaic, which the next frame is decoded into
                f.plane_cfa, noise = sky.result()
            else:
                f.plane_cfa, noise = sky_model(f.cfa, frame.pattern)
            if np.isfinite(frame.white):
                # integer data: never less than its quantisation noise (an 8-bit processed image's flat sky has
                # a MAD of 0, which would make every weight 0 or infinite)
                noise = np.maximum(noise, QUANTISATION_NOISE)
            if not np.all(np.isfinite(noise)) or float(noise.min()) <= 0:
                raise FrameError(path, "no measurable noise in the sky (a processed image, not a camera frame?)")
            f.noise = noise
            if error is not None:
                raise error
            f.white = white
            if stars:
                self._stars(f, found)
                lap("stars")
        except FrameError as err:
            f.error = err
        except Exception as err:      # noqa: BLE001 — see _unexpected
            f.error = _unexpected(path, err)
        if f.frame is not None and f.frame.verify is not None and not f.frame.verify():
            # the first file of its DNG layout, read from its tags while LibRaw's reading was checked beside:
            # LibRaw reads it otherwise (or the check could not end) — everything again from LibRaw's reading
            return self._front(path, slot, threads=threads, stars=stars, speculate=False)
        return f

    def _front_stars(self, f: "_Front") -> None:
        """The star search a read-ahead left (_front with stars False), now; nothing when it was done or the
        frame failed."""
        if f.error is not None or f.stars is not None:
            return
        t = time.perf_counter()
        try:
            self._stars(f)
        except FrameError as err:
            f.error = err
        except Exception as err:      # noqa: BLE001 — see _unexpected
            f.error = _unexpected(f.path, err)
        f.timings["stars"] = time.perf_counter() - t

    def _stars(self, f: "_Front", found=None) -> None:
        """Stars, quality and the binned luminance of a calibrated front (``found``: grid.find_stars' result
        when it has run), and where the frame has signal."""
        grid = f.grid
        f.stars, f.q, f.lum = found if found is not None else grid.find_stars(f.cfa, f.white, self.cfg.stars)
        if self.cfg.engine.smooth_background and not grid.drizzled:
            f.signal = signal_cells(f.lum)      # where the sharpening (mhc, compensated warp) is applied

    def _process(self, front: "_Front", rec: FrameRecord, hold: bool = False,
                 final_into: Path | str | None = None) -> None:
        cfg = self.cfg
        self.timings: dict[str, float] = dict(front.timings)   # seconds per stage of the last frame
        self._t = time.perf_counter()
        path, frame = front.path, front.frame
        if frame is not None:
            m = frame.meta
            rec.time, rec.exptime = (m.time.isoformat() if m.time else None), m.exptime
            rec.camera, rec.filter, rec.iso, rec.gain = m.camera, m.filter, m.iso, m.gain
            rec.pattern = frame.pattern
        if front.error is not None:
            raise front.error
        grid = self.grid or front.grid
        reason = grid.mismatch(frame)       # the reference may have been set since the read-ahead
        if reason:
            if not hold:
                raise FrameError(path, reason)
            # Another camera: it cannot go on this grid — a frame of another target (the caller decides); its
            # filter's judge knows only this camera's frames, so its stars are not judged.
            q = front.q
            rec.stars, rec.fwhm, rec.eccentricity = q.stars, _r(q.fwhm, 3), _r(q.eccentricity, 3)
            rec.status, rec.reason = "unregistered", reason
            self.last_stars, self.last_grid, self.last_pointing = front.stars, front.grid, m.pointing
            return None
        fs = self._filter(m.filter, grid)
        rec.calibration = front.calibration
        if front.masters is not None:
            self.calibration_used.update(front.masters.names)
        cfa, noise, stars, q, lum = front.cfa, front.noise, front.stars, front.q, front.lum
        plane = grid.plane(front.plane_cfa)
        sky = sky_level(front.plane_cfa, frame.shape)
        front.cfa = front.lum = None
        img = grid.planes(cfa)
        stars = grid.refine(stars, q.fwhm, cfa)
        self.last_stars, self.last_grid, self.last_pointing = stars, grid, m.pointing
        self._lap("centroids")
        rec.stars, rec.fwhm, rec.eccentricity = q.stars, _r(q.fwhm, 3), _r(q.eccentricity, 3)
        rec.background, rec.noise = _r(float(sky.mean()), 3), _r(float(noise.mean()), 4)
        sat_cfa = front.sat_cfa
        rec.saturated_pixels = 0 if sat_cfa is None else len(sat_cfa)
        q = Quality(q.stars, q.fwhm, q.eccentricity, float(sky.mean()), float(noise.mean()))

        # Where the frame lies on the grid: the reference's stars, whatever the filter.
        if self.ref is None:
            reason = fs.judge.check_reference(q)
            if reason:
                return self._reject(rec, fs, reason)
            self.grid = grid
            self.ref = Reference(path.name, stars, fs.key, m.pointing, m.object, _header_cards(m.extra))
            reg_matrix = geometry.identity()
            rec.status = "reference"
        else:
            try:
                guesses = [g for g in (_wcs_guess(m.wcs, grid), self.last_matrix) if g is not None]
                reg = register(stars.xy, self.ref.stars.xy, cfg.register, rng=self.rng,
                               predicted=guesses, src_flux=stars.flux, ref_flux=self.ref.stars.flux)
                self._lap("register")
            except RegistrationError as err:
                if hold:
                    # A frame of another field (a slew?), or a bad one: the caller decides, nothing is counted yet.
                    rec.status, rec.reason = "unregistered", f"registration failed: {err}"
                    self.last_judged = fs.verdict(q, m)
                    return None
                return self._reject(rec, fs, f"registration failed: {err}")
            reg_matrix = reg.matrix
            rec.status, rec.registration, rec.registration_model = "stacked", reg.method, reg.model
        matrix = geometry.compose(grid.stars_to_grid, reg_matrix)     # frame pixels -> grid
        # How it compares with its own filter's frames.
        if fs.ref is None:
            scale = 1.0    # the first frame through this filter is its photometric reference
            fs.start(path.name, stars, matrix, plane, sky, float(noise.mean()), q.fwhm, grid.stack_shape,
                     grid.lum_weights, grid.cell_samples, channel_weights=grid.drizzled,
                     sharpen=self.stack_sharpen())
            if self.spill_dir is not None or self._over_budget():
                self._trim(keep=fs.key)
        else:
            scale = fs.transparency(stars, matrix, tol=cfg.register.match_tol_px * float(grid.stars_to_grid[0, 0]))
            hours = fs.new_night(m)
            if hours is not None:
                log.info("filter %s: %s was taken %.0f h after the last frame stacked — a new night: its seeing, "
                         "star counts and sky are judged against this night's frames from now on",
                         fs.label, path.name, hours)
            reason = fs.check(q, m, scale)
            self._verdicts(fs)
            if reason:
                return self._reject(rec, fs, reason)
        rec.scale = _r(scale, 4) if rec.status != "reference" else None
        rec.matrix = _matrix_list(matrix)
        # shift and rotation in the frame's own pixels (a drizzle grid's are finer)
        dx, dy, rot, _ = geometry.decompose(reg_matrix, center=geometry.apply(geometry.invert(grid.stars_to_grid),
                                                                              np.array([grid.centre]))[0])
        rec.shift_x, rec.shift_y, rec.rotation = _r(dx, 3), _r(dy, 3), _r(rot, 4)

        # Pixels: normalise to the filter's reference, warp (or drizzle) onto the grid, add.
        noise_n = noise * scale
        weight = self._weight(fs, noise_n, q)
        rec.weight = _r(weight, 4)
        norm = None
        if grid.mode == "superpixel":   # each window of its image as it is made (render.FrameOnGrid)
            norm = Normalisation(plane, scale, fs.ref.plane, matrix, (cfa.shape[0] // 2, cfa.shape[1] // 2))
        elif img is None:      # a mosaic (demosaiced later, or drizzled): each sample by its own colour's planes
            normalize_mosaic(cfa, grid.pattern, plane, scale, fs.ref.plane, matrix,
                             parallel_map=fs.stack.parallel_map)
        else:
            normalize_inplace(img, plane, scale, fs.ref.plane, matrix, parallel_map=fs.stack.parallel_map)
        self._lap("normalize")

        # The stack takes the binned luminance first (it decides which 2×2 cells are outliers), then the pixels:
        # a block of rows at a time, each demosaiced (a Bayer mosaic) and warped as it is added — or, drizzled,
        # one channel at a time.
        interp = cfg.engine.interpolation
        # the outlier test's cells: a compensated warp's sharpening would only add noise to 2×2 means
        cells = grid.lum_cells(lum, plane, scale, fs.ref.plane, matrix,
                               interpolation="bilinear" if interp == "compensated" else interp,
                               out=self._buffer("cells", grid.cells), parallel_map=fs.stack.parallel_map)
        on_grid = np.array_equal(matrix, geometry.identity())
        sat = grid.saturated(frame, sat_cfa, matrix, interpolation=interp, warped=not on_grid)
        if grid.drizzled:
            dz = Drizzler(grid.pattern, grid.channels, grid.pixfrac, grid.scale)
            value = self._buffer("dz_value", (1,) + grid.shape)
            coverage = self._buffer("dz_coverage", (1,) + grid.shape)

            def channel(c: int):
                dz.planes(cfa, matrix, grid.shape, value, coverage, channels=[c], parallel_map=fs.stack.parallel_map)
                return value[0], coverage[0]
        else:       # demosaiced (a Bayer mosaic) and warped a block of rows at a time, as the stack adds them
            channel = grid.source(cfa, img, matrix, interpolation=interp, signal=front.signal, normalise=norm)
        stream = self._final_stream(fs, final_into)
        # The frame that fills the bootstrap buffer is combined with it as it is stacked, unless the first frames'
        # verdict (judge_first, after it is accepted) leaves a buffered frame out — then it waits in the buffer —
        # or the combination is the session's memory peak (_finish_bootstraps frees the frame's buffers first)
        booting = fs.stack.sums is None
        combine = fs.stack.fills_bootstrap and not self._combination_peaks(fs) and fs.combines_with(
            fs.boot_entry(q, m, file=path.name, index=rec.index, scale=scale))
        if combine:
            self._trim(keep=fs.key, budget=0)     # as _finish_bootstraps: the other filters' pages given back first
        try:
            rec.rejected_pixels = fs.stack.add_channels(cells, channel, weight, noise_n, saturated=sat,
                                                        rows_done=stream.rows if stream is not None else None,
                                                        combine=combine)
        except BaseException:
            if stream is not None:
                stream.abandon()
            raise
        self._lap("drizzle+stack" if grid.drizzled else "debayer+warp+stack" if grid.pattern else "warp+stack")
        fs.accept(q, m, front.masters.names if front.masters is not None else None, file=path.name, index=rec.index,
                  scale=scale, booting=booting)
        if combine:
            fs.judge_first()        # (leaves nothing out: combines_with) — the filter's first frames judged
        if stream is not None:
            stream.version, self.final_stream = fs.version, stream
        self.last_matrix = reg_matrix
        self.last_stacked = (stars, reg_matrix)

    def _final_stream(self, fs: FilterStack, final_into: Path | str | None):
        """process(final_into=…): the frame's stack file written as it is stacked, when it can be (FinalStream
        .start); None otherwise, or where the file cannot be made (snapshot() writes it then, and says why)."""
        if final_into is None:
            return None
        from .outputs import FinalStream

        try:
            return FinalStream.start(self, fs, Path(final_into))
        except OSError:
            return None

    def _weight(self, fs: FilterStack, noise_n: np.ndarray, q: Quality) -> float:
        """The frame's weight in its filter's stack: (reference noise / its normalised noise)², times the
        sharpness term when it is on."""
        weight = (fs.ref.noise / max(float(noise_n.mean()), 1e-12)) ** 2
        sw = self.cfg.engine.sharpness_weight
        if sw and np.isfinite(q.fwhm) and q.fwhm > 0:
            weight *= (fs.ref.fwhm / q.fwhm) ** sw
        return weight

    def _finish_bootstraps(self) -> None:
        """Once per filter, after the frame that filled its bootstrap buffer (and after _process has returned,
        so that its locals no longer hold the work planes): the buffered first frames become the accumulators.
        The pages of the other filters' spilled stacks are given back first, and when the combination is the
        session's memory peak (_combination_peaks) the work buffers too, so that they, the buffer and the new
        accumulators never coexist."""
        for fs in self.stacks:
            if fs.stack.bootstrap_full and not fs.first_judged:
                for file, index, why in fs.judge_first():
                    self._left_out(fs, file, index, why)
            if fs.stack.bootstrap_full:
                self._t = time.perf_counter()
                self._ws.clear()                  # the mosaic buffer of the frame in hand (96 MB at 24 MP)
                if self._combination_peaks(fs):
                    drop_work_memory()            # the threads' block memory (~10 MB a thread at 24 MP)
                    release_free_memory()         # and the temporaries the heap kept for the frames (~90 MB)
                self._trim(keep=fs.key, budget=0)
                fs.stack.finish_bootstrap()
                self._lap("bootstrap")

    def _left_out(self, fs: FilterStack, file: str, index: int | None, why: str) -> None:
        """A frame stacked earlier and left out of its filter's stack by a later verdict: its line is to be
        rewritten to `rejected` (``amended``, taken by the CLI and the daemon)."""
        kept = " (still the grid's reference)" if self.ref is not None and \
            file == self.ref.file and fs.key == self.ref.filter else ""
        reason = f"{why}: left out of the stack{kept}"
        self.amended.append({"file": file, "index": index, "status": "rejected", "reason": reason, "weight": None})
        log.info("rejected %s: %s", file, reason)

    def _verdicts(self, fs: FilterStack) -> None:
        """What a verdict on a transparency baseline did (FilterStack._suspect): frames left out, or a log line."""
        for file, index, why in fs.events:
            if file is None:
                log.info("filter %s: %s", fs.label, why)
            else:
                self._left_out(fs, file, index, why)
        fs.events.clear()

    def _reject(self, rec: FrameRecord, fs: FilterStack, reason: str) -> None:
        rec.status, rec.reason = "rejected", reason
        fs.reject()
        log.info("rejected %s: %s", rec.file, reason)

    def _filter(self, name: str | None, grid: Grid | None = None) -> FilterStack:
        key = filter_key(name)
        fs = self.filters.get(key)
        if fs is None:
            fs = self._add(FilterStack(name, self.cfg.stack, self._reject_params(grid or self.grid),
                                       pool=self._pool))
            for _ in range(self._unread_rejections.pop(key, 0)):
                fs.reject()
        if key in self._recent:
            self._recent.remove(key)
        self._recent.append(key)
        return fs

    def _reject_params(self, grid: Grid | None) -> RejectParams:
        """The configured judge, its absolute sizes in ``grid``'s units (the configuration's without a grid)."""
        return self.cfg.reject if grid is None else grid.judge_params(self.cfg.reject)

    def _add(self, fs: FilterStack) -> FilterStack:
        """Keep ``fs`` among the filters, its label and file name made distinct from theirs (in order of first
        appearance, so a checkpoint's filters get the same names again)."""
        others = list(self.filters.values())
        if fs.key in self.filters:      # a checkpoint of two spellings filter_key now makes one: kept apart
            fs.key = distinct((fs.name or "").strip().casefold(), self.filters)
        fs.label = distinct(fs.label, [o.label for o in others])
        fs.file_name = distinct(fs.file_name[:-len(".fits")], [o.file_name for o in others],
                                suffix=".fits")
        self.filters[fs.key] = fs
        return fs

    def parallel_map(self, fn, items) -> list:
        """[fn(i) for i in items] on the engine's worker threads (the stacks' own), for work outside a frame's
        stages: the preview's channels."""
        if self._pool is None or len(items) < 2:
            return [fn(i) for i in items]
        return list(self._pool.map(fn, items))

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        b = self._ws.get(name)
        if b is None or b.shape != tuple(shape):
            b = self._ws[name] = np.empty(shape, np.float32)
        return b

    # ------------------------------------------------------------------ memory: several stacks

    def _over_budget(self) -> bool:
        return sum(fs.stack.nbytes for fs in self.stacks) > self.cfg.stack.memory_mb * 2 ** 20

    def _trim(self, keep: str | None = None, budget: int | None = None) -> None:
        """Keep the stacks used most recently in memory up to ``cfg.stack.memory_mb``; the others live in
        memory-mapped files (spilled once, then their pages released after every use).  The stack of the
        frame in hand (``keep``, else the latest) always stays."""
        stacks = self.stacks
        if len(stacks) < 2 or not (self._over_budget() or any(fs.stack.spill_dir for fs in stacks)):
            return
        budget = self.cfg.stack.memory_mb * 2 ** 20 if budget is None else budget
        order = [k for k in reversed(self._recent) if k in self.filters and self.filters[k].stack is not None]
        if keep is not None and keep in order:
            order.remove(keep)
            order.insert(0, keep)
        used = 0
        for i, key in enumerate(order):
            st = self.filters[key].stack
            used += st.nbytes
            if i == 0 or used <= budget:
                continue
            st.spill(self.spill_dir or Path(tempfile.gettempdir()))
            st.release()

    def release(self) -> None:
        """After reading every stack (outputs, preview): give the pages of spilled stacks back."""
        self._trim()

    # ------------------------------------------------------------------ reading the stacks

    def result(self, key: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(C, H, W) stack of a filter (default: the reference's) and its (H, W) weight map, or None before
        the first stacked frame."""
        fs = self.main if key is None else self.filters.get(filter_key(key))
        if fs is None or fs.stack is None:
            return None
        return fs.stack.result()

    def reduced(self, max_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{filter key: ((C, h, w) mean with NaN where uncovered, (h, w) weights)} at most ``max_size`` px on
        the long side.  Cached per filter until it stacks another frame: a preview after each frame redraws
        only the filter that changed."""
        from .outputs import reduced_copy

        cache = self._reduced
        out = {}
        for fs in self.stacks:
            hit = cache.get(fs.key)
            if hit is None or hit[0] != (fs.version, max_size):
                hit = cache[fs.key] = ((fs.version, max_size), *reduced_copy(fs, max_size))
                self.release()        # one spilled stack paged in at a time
            out[fs.key] = hit[1:]
        return out

    def preview(self, img=None, wsum=None, stretch=None, compose=None, *, dtype=np.uint8) -> np.ndarray:
        """The stretched stack — the colour composite when there are several filters — as (h, w, 3) RGB: uint8
        for the page, uint16 for a 16-bit export.  Without ``img`` it is drawn from reduced copies of the
        running sums (stretch.max_size): a few tens of ms at 24 MP, where the full-resolution mean would cost
        ~0.7 s and ~400 MB."""
        from .outputs import preview

        return preview(self, img, wsum, stretch or self.cfg.stretch, compose or self.cfg.compose, dtype=dtype)

    def snapshot(self, out_dir: Path | str, *, compose=None) -> bool:
        """Write every output into ``out_dir`` (atomically): see outputs.write_outputs."""
        from .outputs import write_outputs

        return write_outputs(self, Path(out_dir), compose or self.cfg.compose)

    def write_stack(self, path: Path | str, *, compose=None) -> bool:
        """Write stack.fits (and stack_<F>.fits beside it); False when nothing is stacked yet."""
        from .outputs import write_stacks

        return write_stacks(self, Path(path).parent, compose or self.cfg.compose, name=Path(path).name)

    # ------------------------------------------------------------------ state (the session owns its format)

    def state(self) -> tuple[dict, dict[str, np.ndarray], list[tuple[str, RunningStack]]]:
        """Everything needed to resume exactly: (JSON-ready meta, small arrays, [(prefix, stack)])."""
        meta = {
            "version": STATE_VERSION, "index": self.index, "failed": self.failed,
            "calibration_used": self.calibration_used, "rng": self.rng.bit_generator.state,
            "last_matrix": None if self.last_matrix is None else self.last_matrix.tolist(),
            "grid": None if self.grid is None else self.grid.state(), "recent": self._recent, "filters": [],
            "wcs": None if self.grid is None else self.grid.wcs_state(),
            "filter_keys": "spelling",      # the filters' keys are filter_key's (a known filter's one spelling)
            "unread_rejections": self._unread_rejections,
        }
        arrays: dict[str, np.ndarray] = {}
        stacks: list[tuple[str, RunningStack]] = []
        if self.ref is not None:
            meta["ref"] = {"file": self.ref.file, "filter": self.ref.filter, "object": self.ref.object,
                           "pointing": None if self.ref.pointing is None else list(self.ref.pointing),
                           "cards": self.ref.cards}
            for k in ("xy", "flux", "fwhm", "a", "b"):
                arrays[f"ref_{k}"] = getattr(self.ref.stars, k)
        for i, fs in enumerate(self.filters.values()):
            fmeta, farrays = fs.state()
            meta["filters"].append(fmeta)
            arrays.update({f"f{i}_{k}": v for k, v in farrays.items()})
            if fs.stack is not None:
                stacks.append((f"f{i}_stack_", fs.stack))
        return meta, arrays, stacks

    @classmethod
    def from_state(cls, meta: dict, arrays, cfg: Config, *, masters: MasterSource | None = None,
                   spill_dir: Path | str | None = None) -> "Engine":
        """The engine state() described; ``arrays`` maps names to arrays (an open .npz).  Raises ValueError
        for a state of another format."""
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint format {meta.get('version')}, this livestack reads {STATE_VERSION}")
        eng = cls(cfg, masters=masters, spill_dir=spill_dir)
        eng.index, eng.failed, eng.calibration_used = meta["index"], meta["failed"], meta["calibration_used"]
        eng._unread_rejections = dict(meta.get("unread_rejections") or {})
        eng.rng.bit_generator.state = meta["rng"]
        eng.last_matrix = None if meta["last_matrix"] is None else np.array(meta["last_matrix"])
        eng.grid = None if meta["grid"] is None else Grid.from_state(meta["grid"], meta.get("wcs"))
        if "ref" in meta:
            stars = Stars(*(np.array(arrays[f"ref_{k}"]) for k in ("xy", "flux", "fwhm", "a", "b")))
            r = meta["ref"]
            eng.ref = Reference(r["file"], stars, r["filter"], tuple(r["pointing"]) if r.get("pointing") else None,
                                r.get("object"), r.get("cards"))
        names = set(arrays.keys()) if not hasattr(arrays, "files") else set(arrays.files)
        for i, fmeta in enumerate(meta["filters"]):
            prefix = f"f{i}_stack_"
            stack = None
            if any(n.startswith(prefix) for n in names):
                st = {n[len(prefix):]: arrays[n] for n in names if n.startswith(prefix)}
                stack = RunningStack.from_state(st, cfg.stack, pool=eng._pool)
            fa = {k: arrays[f"f{i}_{k}"] for k in ("ref_xy", "ref_flux") if f"f{i}_{k}" in names}
            eng._add(FilterStack.from_state(fmeta, fa, stack, cfg.stack, eng._reject_params(eng.grid),
                                            pool=eng._pool))
            eng._recent = [k for k in meta["recent"] if k in eng.filters]
            eng._trim()        # stacks beyond the memory budget go to disk as they are read
            if stack is not None:
                stack.sharpen = eng.stack_sharpen()    # an output setting: today's configuration's
        if meta.get("filter_keys") != "spelling":
            # written when a filter's key was its name without case ('h-alpha'): each such key is the filter of
            # that name, whatever key it has now ('ha'; two spellings of one filter kept apart: see _add)
            old = {(fs.name or "").strip().casefold(): fs.key for fs in eng.filters.values()}
            eng._recent = [old[k] for k in meta["recent"] if k in old]
            if eng.ref is not None:
                eng.ref.filter = old.get(eng.ref.filter, eng.ref.filter)
        return eng

    def stack_sharpen(self) -> tuple[float, ...]:
        """RunningStack's ``sharpen`` on this engine's grid: a drizzle's compensation (its taps), when [drizzle]
        compensate; () otherwise."""
        g = self.grid
        return drizzle_compensation(g.pixfrac, g.scale) if g is not None and g.drizzled and \
            self.cfg.drizzle.compensate else ()


@dataclass(slots=True, eq=False)
class _Front:
    """What the first stages made of one file (Engine._front), for the rest of the pipeline."""

    path: Path
    frame: Frame | None = None
    grid: Grid | None = None
    masters: Masters | None = None
    cfa: np.ndarray | None = None
    calibration: dict | None = None
    plane_cfa: np.ndarray | None = None
    noise: np.ndarray | None = None
    stars: Stars | None = None
    q: Quality | None = None
    lum: np.ndarray | None = None
    sat_cfa: np.ndarray | None = None    # (N, 2) (x, y) of the saturated samples, or None
    signal: np.ndarray | None = None     # render.signal_cells of the frame ([engine] smooth_background)
    white: float | None = None           # the white level less the black: set once the star search may run
    error: FrameError | None = None
    timings: dict = field(default_factory=dict)


def _wcs_guess(frame_wcs, grid: Grid) -> np.ndarray | None:
    """Where the frame lies on the grid according to the sky: its own WCS (capture programs write one) against
    the grid's plate solution — a first guess for registration that needs no star pattern (frames with few
    stars, a jump after a re-centring or a meridian flip).  The stars still decide: register() keeps it only
    when it pairs enough of them.  None without both WCSs."""
    if frame_wcs is None or grid.wcs is None:
        return None
    from .solve import pixel_transform

    try:
        m = pixel_transform(frame_wcs, grid.wcs, grid.shape, geometry.invert(grid.sensor_to_grid))
    except (ValueError, ArithmeticError):
        return None
    if grid.drizzled:     # registration matches stars in sensor pixels, not on the finer grid
        s = grid.stars_to_grid
        m = geometry.compose(geometry.invert(s), geometry.compose(m, s))
    return m


def _unexpected(path: Path, err: Exception) -> FrameError:
    """A frame's first stages (read, calibrate, sky, stars) change nothing of the engine's: whatever a file makes
    a library raise there (a decoder's odd error, a master that does not fit it) fails that frame, where it
    stopped `livestack stack` — and lost what was stacked — or the daemon's worker."""
    log.debug("%s: %s", path.name, err, exc_info=True)
    return FrameError(path, f"could not be read ({type(err).__name__}: {err})")


def _r(x, nd):
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if np.isfinite(x) else None


def _matrix_list(m: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in np.asarray(m)[:2]]
