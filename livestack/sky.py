"""Sky coordinates of a target: its reference plate-solved once, in the background, never in the way.

The engine's reference stars are already measured on the stack's grid, so they are what astrometry.net is handed
(an xylist, engine/solve.py), and the WCS it returns is the grid's: it goes into every stack file as it is.  A
solve runs in a thread around a solve-field subprocess with a time limit while frames keep stacking; the worker
polls for the answer between frames.  When a solve fails it is tried again on a later frame's stars (mapped onto
the grid), a few times.  A WCS in the reference frame's own header (many capture programs write one) stands in
until a solve lands, or instead of one when no solver is installed.  Nothing here raises for want of a solver or
an index: the answer is a one-sentence note.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .engine import geometry
from .engine.read import image_header
from .engine.solve import (Hints, Solution, SolveError, SolveParams, describe, header_wcs, hints_from_header,
                           nearest_object, solve_stars, wcs_to_grid)

log = logging.getLogger("livestack")

RETRY_AFTER = 5        # stacked frames between two attempts
MAX_ATTEMPTS = 3
# How long the closing target's solve may have run when a switch of targets gives it up.  Live, it has had an
# exposure's time and more; a backlog (a night captured while the daemon was stopped) reaches a target's last
# frame a second or less after its reference, and its solve (0.6–1 s here, with hints) was cancelled: the target
# archived without a WCS for good.  A blind solve that needs longer is given up, as before.
SWITCH_WAIT_S = 5.0


def grid_binning(grid) -> float:
    """Sensor pixels per grid pixel (1, or 2 on a superpixel grid)."""
    return 1.0 / float(grid.sensor_to_grid[0, 0])


def star_px(grid) -> float:
    """Grid pixels per pixel the frames' stars are measured on: the drizzle scale on a drizzle grid (stars
    measured on the sensor), 1 on the others."""
    return float(grid.stars_to_grid[0, 0])


def reference_hints(path: Path | None, grid, params: SolveParams) -> tuple[Hints, object | None, str | None]:
    """(hints, the header's own WCS on the grid or None, OBJECT) from the reference frame's FITS header (a RAW
    file or none: only the hints of ``params``)."""
    header = image_header(path) if path is not None else None
    hints = hints_from_header(header if header is not None else {}, binning_to_grid=grid_binning(grid),
                              params=params)
    if header is None:
        return replace(hints, fits_header=False), None, None
    own = None
    try:
        w = header_wcs(header, grid.sensor_shape)
        if w is not None:
            own = wcs_to_grid(w, grid.sensor_to_grid)
    except (ValueError, TypeError):
        own = None
    obj = str(header.get("OBJECT", "") or "").strip() or None
    return hints, own, obj


def sky_status(wcs, shape, *, source: str, seconds: float | None = None, obj: str | None = None,
               note: str = "") -> dict:
    """What the page and /api/status show of a WCS: centre, field, scale, rotation, object."""
    d = describe(wcs, shape)
    if obj is None:
        obj = nearest_object(d["ra"], d["dec"], radius_deg=max(d["width_deg"], d["height_deg"]) / 2)
    return {"state": "solved" if source == "solve" else "header", "source": source, "note": note,
            "object": obj, "seconds": None if seconds is None else round(seconds, 2), **d}


@dataclass
class SkySolver:
    """One target's plate solve: started on the reference, retried on later frames, polled by the worker.

    A switch of targets cancels the solve in hand (cancel()): its answer is dropped."""

    params: SolveParams
    star_px: float = 1.0       # star_px(grid): the solution check is in the pixels the stars were measured on
    attempts: int = 0
    frames_since: int = 0
    last_error: str | None = None
    _thread: threading.Thread | None = None
    _started: float = 0.0           # time.monotonic() of the last start()
    _answer: Solution | SolveError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finish_young(self, age_s: float) -> None:
        """Wait for a running solve until it has run ``age_s`` seconds in all (at once when it is older)."""
        if self.running:
            self.join(max(0.0, age_s - (time.monotonic() - self._started)))

    def available(self) -> str | None:
        """Why no solve can run (disabled, solve-field missing), or None."""
        if not self.params.enabled:
            return "plate solving is off ([solve] enabled = false)"
        if shutil.which("solve-field") is None:
            return ("no plate solver: install Debian's astrometry.net and astrometry-data-tycho2-10-19-littleendian "
                    "(and -07/-08/-09 for fields under 1°)")
        return None

    def start(self, xy: np.ndarray, flux: np.ndarray, shape, hints: Hints, workdir: Path | None = None) -> bool:
        """Solve in the background; False when one is running, none may run, or MAX_ATTEMPTS are used."""
        if self.running or self.available() or self.attempts >= MAX_ATTEMPTS:
            return False
        self.attempts += 1
        self.frames_since = 0
        self._started = time.monotonic()
        xy, flux = np.array(xy, np.float64), np.array(flux, np.float64)

        def run():
            try:
                ans: Solution | SolveError = solve_stars(xy, flux, tuple(shape), hints, self.params, workdir=workdir,
                                                         cancel=self._cancel, star_px=self.star_px)
            except SolveError as err:
                ans = err
            except Exception as err:      # noqa: BLE001 — a solver bug must not stop the night
                ans = SolveError(f"the solver failed ({type(err).__name__}: {err})")
            with self._lock:
                self._answer = ans

        self._thread = threading.Thread(target=run, name="livestack-solve", daemon=True)
        self._thread.start()
        return True

    def poll(self) -> Solution | SolveError | None:
        """The answer of the last solve, once (None while running or when there is none)."""
        with self._lock:
            ans, self._answer = self._answer, None
        if isinstance(ans, SolveError):
            self.last_error = ans.reason
            if ans.final:           # no index for the field, no solver: another frame's stars change nothing
                self.attempts = MAX_ATTEMPTS
        return ans

    def cancel(self) -> None:
        """Kill a running solve (a stop, a switch of targets): its answer is dropped."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            self._answer = None

    def join(self, timeout: float | None = None) -> None:
        """Wait for a running solve to end, at most ``timeout`` s; its answer stays for poll()."""
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> Solution | SolveError | None:
        self.join(timeout)
        return self.poll()

    def retry_due(self) -> bool:
        return (not self.running and self.last_error is not None and self.attempts < MAX_ATTEMPTS
                and self.frames_since >= RETRY_AFTER)


def stars_on_grid(engine) -> tuple[np.ndarray, np.ndarray] | None:
    """The latest stacked frame's stars mapped onto the grid (for a retry), or None.  (Not last_stars: those are
    the latest frame's, which may have been rejected or held — with last_matrix they landed elsewhere, and a
    retry solved them, correctly, as the wrong place.)"""
    if engine.last_stacked is None:
        return None
    st, m = engine.last_stacked
    if len(st.xy) == 0:
        return None
    m = geometry.compose(engine.grid.stars_to_grid, m)
    return geometry.apply(m, np.asarray(st.xy, np.float64)), np.asarray(st.flux, np.float64)


class BatchSolve:
    """`livestack stack`'s plate solve: started on the reference frame, in the background while the other frames
    are stacked; the reference's own header WCS stands in meanwhile (it predicts where frames lie) and when no
    solve lands.  finish() puts the WCS on the engine's grid and returns the sky status (or None)."""

    def __init__(self, engine, ref_path: Path, params: SolveParams, *, off: str | None = None):
        """``off``: why no solve runs when the command said so (`--no-solve`), rather than the config's
        [solve] enabled = false that the log would otherwise name."""
        self.hints, self.own, self.obj = reference_hints(ref_path, engine.grid, params)
        self.solver = SkySolver(params, star_px(engine.grid))
        self.why = off or self.solver.available()
        if self.own is not None:
            engine.set_wcs(self.own)
        if self.why is None:
            self.solver.start(*engine.ref_stars_on_grid(), engine.grid.shape, self.hints)

    def finish(self, engine, *, stop: threading.Event | None = None, say=None) -> dict | None:
        """``stop`` (set by a Ctrl-C): a solve still running is cancelled, the stack is written without it;
        ``say(line)``: told that the solve is being waited for, when it still runs."""
        ans = None
        if self.why is None:
            if self.solver.running and say is not None:
                say(f"plate solving the reference frame (at most {self.solver.params.timeout_s:g} s; Ctrl-C skips it)")
            while self.solver.running and not (stop is not None and stop.is_set()):
                self.solver.join(0.1)
            if self.solver.running:
                self.solver.cancel()
                self.why = "skipped (Ctrl-C)"
            else:
                ans = self.solver.wait()
        if isinstance(ans, Solution):
            engine.set_wcs(ans.wcs)
            st = sky_status(ans.wcs, engine.grid.shape, source="solve", seconds=ans.seconds, obj=self.obj,
                            note=ans.note)
            if ans.note:
                log.warning("livestack stack: %s", ans.note)
            log.info("plate solved in %.1f s: %s, RA %s Dec %s, %.2f″/px, rotation %.1f° E of N", ans.seconds,
                     st["object"] or "no catalogue object", st["ra_hms"], st["dec_dms"], st["scale_arcsec"],
                     st["rotation_deg"])
            return st
        why = self.why or (ans.reason if ans is not None else "no answer")
        level = logging.WARNING if self.solver.params.enabled else logging.INFO     # off: chosen, no news
        if self.own is not None:
            log.log(level, "livestack stack: not plate solved: %s; the reference frame's own WCS is used", why)
            return sky_status(self.own, engine.grid.shape, source="header", obj=self.obj, note=why)
        log.log(level, "livestack stack: not plate solved: %s", why)
        return None
