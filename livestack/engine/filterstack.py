"""One stack per filter: what is per filter (sums, judge, photometric reference, counters) in one object.

A session shares one Grid and one set of reference stars (registration); each filter a frame can come through —
L, R, G, B, Ha, OIII, SII, or none at all — gets a FilterStack the first time it is seen.  Its first accepted
frame is its photometric reference: the sky plane, noise and star fluxes later frames of the same filter are
normalised and weighted against (a narrowband sky is 10–20× darker than L's, its stars a tenth as many: nothing
is ever compared across filters).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass

import numpy as np

from . import geometry
from .filtername import filter_key  # noqa: F401  (the engine keys its stacks by it)
from .frame import FrameMeta, Quality, Stars
from .normalize import transparency_scale
from .register import mutual_pairs
from .reject import FrameJudge, RejectParams
from .stack import RunningStack, StackParams


# A new night's frames rejected by the previous night's star shape alone before one of its own is accepted: at
# most this many (a mount settles in one or two frames; a night whose every frame is more elongated than the last
# night's is its own, and its frames are then judged against each other).
PRIOR_FRAMES = 2


def file_safe(name: str | None) -> str:
    """A FILTER value as it appears in a file name: every character outside [A-Za-z0-9._-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", (name or "").strip()) or "nofilter"


def distinct(base: str, taken, *, suffix: str = "") -> str:
    """``base + suffix``, or ``base-2 + suffix``, ``base-3 + suffix`` …: the first not in ``taken``, compared
    without case (two FILTER values can make one file name — 'Hα' and 'Hβ' are both 'H_' — and an exFAT disk
    folds case)."""
    folded = {t.casefold() for t in taken}
    name, n = base + suffix, 1
    while name.casefold() in folded:
        n += 1
        name = f"{base}-{n}{suffix}"
    return name


def settings_key(m: FrameMeta) -> str:
    """What a frame's star count, sky level and star fluxes depend on besides the sky: exposure, ISO, gain.  The
    exposure to three digits: a camera that writes the measured one (59.9987 s, 60.0013 s) keeps one group."""
    return f"{float(m.exptime or 0.0):.3g}s|iso {m.iso}|gain {m.gain}"


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def integration(seconds: float) -> float:
    """A sum of exposures as the outputs say it (EXPTIME, the status's integration_s): 9 significant digits —
    a sum's float noise goes, a 1/640 s frame's 0.0015625 stays (3 decimals made it 0.002)."""
    return float(f"{seconds:.9g}")


@dataclass(frozen=True, slots=True)
class Counters:
    """What a stack's FITS header and the page count: a small value, replaced (never mutated) per frame."""

    stacked: int = 0
    rejected: int = 0
    failed: int = 0
    exptime: float = 0.0                # s, total over stacked frames
    first_time: str | None = None       # start of the first stacked frame, ISO
    last_end: str | None = None         # end of the last stacked frame, ISO
    camera: str | None = None
    filter: str | None = None           # FITS FILTER value as first seen
    masters: tuple[str, ...] = ()       # "kind=name" of the calibration masters of the stacked frames, sorted

    def stacked_frame(self, m: FrameMeta, masters: dict | None = None) -> "Counters":
        """One more stacked frame, with its metadata and the masters that calibrated it ({kind: name})."""
        first, last = self.first_time, self.last_end
        if m.time is not None:
            first = first or _iso(m.time)
            try:
                last = _iso(m.time + dt.timedelta(seconds=m.exptime or 0.0))
            except OverflowError:       # a header's DATE-OBS at the end of year 9999
                pass
        return dataclasses.replace(self, stacked=self.stacked + 1, exptime=self.exptime + (m.exptime or 0.0),
                                   first_time=first, last_end=last, camera=self.camera or m.camera,
                                   filter=self.filter or m.filter,
                                   masters=_union(self.masters, (f"{k}={v}" for k, v in (masters or {}).items())))

    def rejected_frame(self) -> "Counters":
        return dataclasses.replace(self, rejected=self.rejected + 1)

    def failed_frame(self) -> "Counters":
        return dataclasses.replace(self, failed=self.failed + 1)

    def __add__(self, other: "Counters") -> "Counters":
        firsts = [t for t in (self.first_time, other.first_time) if t]
        lasts = [t for t in (self.last_end, other.last_end) if t]
        return Counters(self.stacked + other.stacked, self.rejected + other.rejected, self.failed + other.failed,
                        self.exptime + other.exptime, min(firsts) if firsts else None,
                        max(lasts) if lasts else None, self.camera or other.camera, self.filter or other.filter,
                        _union(self.masters, other.masters))


def _union(a, b) -> tuple[str, ...]:
    return tuple(sorted(set(a) | set(b)))


@dataclass(slots=True)
class FilterRef:
    """A filter's photometric reference (its first accepted frame), on the shared grid."""

    file: str
    xy: np.ndarray          # (N, 2) its stars on the grid
    flux: np.ndarray        # (N,) their fluxes, ADU
    plane: np.ndarray       # (C, 3) its sky plane in grid coordinates
    sky: np.ndarray         # (C,) its sky at its centre, ADU
    noise: float            # mean per-pixel σ over channels, ADU
    fwhm: float


def plane_to_grid(plane: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Plane coefficients (C, 3) in a frame's coordinates -> in grid coordinates, ``matrix``: frame -> grid.
    P_grid(X) = P(M⁻¹ X); a plane stays a plane under an affine map."""
    inv = geometry.invert(matrix)
    p = np.asarray(plane, np.float64).reshape(-1, 3)
    a0, ax, ay = p[:, 0], p[:, 1], p[:, 2]
    return np.column_stack([a0 + ax * inv[0, 2] + ay * inv[1, 2],
                            ax * inv[0, 0] + ay * inv[1, 0],
                            ax * inv[0, 1] + ay * inv[1, 1]])


class FilterStack:
    """The running stack of one filter: its RunningStack, judge, photometric reference and counters."""

    def __init__(self, name: str | None, stack_params: StackParams, reject_params: RejectParams, *, pool=None):
        self.name = name                     # the FITS value as first seen (None: no FILTER card)
        self.key = filter_key(name)
        self.stack_params = stack_params
        self.judge = FrameJudge(reject_params)
        self.ref: FilterRef | None = None
        self.stack: RunningStack | None = None
        self.counts = Counters(filter=name)
        self.last_time: str | None = None    # capture time of its latest stacked frame
        # A new night with no frame of its own accepted yet (new_night): the previous night's medians, which its
        # first frames' shape is judged against, and how many frames they alone rejected (PRIOR_FRAMES at most).
        self.prior: dict | None = None
        self.prior_rejected = 0
        self.version = 0                     # bumped by every stacked frame (caches of reduced images)
        # Star counts, sky levels and transparency are compared among frames of one exposure, ISO and gain
        # (settings_key): their judges, and each group's transparency against the filter's first frame (its
        # first frame's, or — that one left out — the median of the frames kept).  FWHM and eccentricity are
        # compared among all the filter's frames (``judge``).
        self.levels: dict[str, FrameJudge] = {}
        self.bases: dict[str, float] = {}
        # The noise (ADU) of the frame each baseline is from: a change of the pixel scale (ADU per electron: ISO,
        # gain, a broken BSCALE) moves star fluxes and noise alike, a cloud only the fluxes (_suspect).  And the
        # latest accepted frame's (settings key, noise, exposure): what a new ISO or gain is scaled from.
        self.noises: dict[str, float] = {}
        self.last: tuple | None = None
        # Frames in a row rejected for their transparency alone: (settings key, star flux against the first
        # frame's, noise, transparency, SNR transparency — None: the baseline's noise unknown —, baseline
        # estimated across settings) — their baseline is on trial once there are enough (_suspect).
        self.streak: list[tuple[str, float, float, float, float | None, bool]] = []
        # (file or None, index, reason) of what a verdict on a baseline did: a frame left out (the caller rewrites
        # its line) or, without a file, a baseline replaced (logged) — taken by the caller after each check().
        self.events: list[tuple[str | None, int | None, str]] = []
        self.first_settings: tuple | None = None   # (settings key, exposure, ISO, gain) of the first frame
        # Resumed from a checkpoint of before that (no levels): its frames were all judged together, against the
        # first frame's transparency — the settings of the next frame take them over (_adopt), not nothing.
        self.legacy = False
        # The frames in the stack's bootstrap buffer, in order: (file, index, start ISO, exptime, scale,
        # settings, [fwhm, stars, background, eccentricity, noise]) — the first is judged against the others once
        # the buffer is full (judge_first).  Their qualities are kept here, not read back from the judge: with
        # `[reject] window` below `[stack] bootstrap` its history no longer holds them all (and the verdict never
        # came).  A checkpoint of before that has 6-tuples: the judge's history is theirs.
        self.boot: list[tuple] = []
        self.first_judged = False
        self._pool = pool
        # The filter's name for the composite and the page ('none' without a FILTER card), and its file,
        # 'stack_<F>.fits': the engine makes both distinct from its other filters' (``distinct``).
        self.label = (name or "").strip() or "none"
        self.file_name = f"stack_{file_safe(name)}.fits"

    def start(self, file: str, stars: Stars, matrix: np.ndarray, plane: np.ndarray, sky: np.ndarray,
              noise: float, fwhm: float, shape: tuple[int, int, int], lum_weights, cell_samples, *,
              channel_weights: bool = False, sharpen: tuple[float, ...] = ()) -> None:
        """Make the frame in hand this filter's reference and allocate its (empty) stack on the grid
        (``channel_weights``, ``sharpen``: RunningStack's, for a drizzle)."""
        self.ref = FilterRef(file, geometry.apply(matrix, stars.xy) if len(stars) else np.zeros((0, 2)),
                             np.asarray(stars.flux, np.float64), plane_to_grid(plane, matrix),
                             np.asarray(sky, np.float64), float(noise), float(fwhm))
        self.stack = RunningStack(shape, sky, self.stack_params, lum_weights, cell_samples, pool=self._pool,
                                  channel_weights=channel_weights, sharpen=sharpen)

    def transparency(self, stars: Stars, matrix: np.ndarray, *, tol: float) -> float:
        """Reference flux / frame flux over the frame's stars that land within ``tol`` grid px of one of the
        reference's (mutually nearest): > 1 for a frame dimmed by cloud; 1.0 with fewer than 3 pairs."""
        if not len(stars) or not len(self.ref.xy):
            return 1.0
        from .neighbours import Grid

        si, ri = mutual_pairs(geometry.apply(matrix, stars.xy), self.ref.xy, Grid(self.ref.xy, tol), tol)
        return transparency_scale(self.ref.flux[ri], stars.flux[si])

    def _adopt(self, key: str) -> None:
        if self.legacy:
            self.legacy = False
            if key not in self.levels and self.judge.history:
                self.levels[key] = FrameJudge(self.judge.p)
                self.levels[key].history.extend(self.judge.history)
                self.bases[key] = 1.0

    def accept(self, q: Quality, m: FrameMeta, masters: dict | None = None, *, file: str, index: int | None = None,
               scale: float = 1.0, booting: bool | None = None) -> None:
        """``booting``: whether the frame was added to the stack in its bootstrap (default: the stack is still in
        it — not so for the frame that RunningStack.add_channels' ``combine`` combined with the buffer)."""
        key = settings_key(m)
        self._adopt(key)
        if booting is None:
            booting = self.stack is not None and self.stack.sums is None
        if booting and not self.first_judged:
            self.boot.append(self.boot_entry(q, m, file=file, index=index, scale=scale))
        if self.first_settings is None and not self.judge.history and not self.legacy:
            self.first_settings = (key, float(m.exptime or 0.0), m.iso, m.gain)
        self.judge.accept(q)
        self.levels.setdefault(key, FrameJudge(self.judge.p)).accept(q)
        if key not in self.bases:
            expected = self._expected_base(m)
            self.bases[key] = expected if expected is not None else (1.0 / scale if scale > 0 else 1.0)
            self.noises[key] = float(q.noise)
        self.last = (key, float(q.noise), float(m.exptime or 0.0))
        self.streak = [s for s in self.streak if s[0] != key]
        self.prior, self.prior_rejected = None, 0      # the night has a frame of its own to judge by
        self.counts = self.counts.stacked_frame(m, masters)
        self.last_time = _iso(m.time) or self.last_time
        self.version += 1

    def reject(self) -> None:
        self.counts = self.counts.rejected_frame()

    def new_night(self, m: FrameMeta) -> float | None:
        """When the frame in hand was taken `[reject] new_night_after_h` or more after this filter's last stacked
        frame, a new night has begun: its seeing, star counts, sky and trailing are another night's, so the running
        statistics start again from its own frames (the transparency stays against the filter's first frame — a
        hazier night is what that test is for).  Two nights of one target stacked together, or a daemon's target
        taken up again the next evening, had every frame judged against the first night's medians: a night of
        4.2 px stars after one of 2.6 px lost 7 of its 10 frames as "fwhm > 1.5 × running median", kept or not by
        their jitter alone; the same trailing passed under the other night's rounder median.  Returns the gap in
        hours when it cleared them (the caller says so), else None.

        The night's first frames, with nothing of their night to be judged by, are judged on their transparency
        and on the shape of their stars against the previous night's median (``prior``: trailing is the mount's
        and the wind's, not the night's) until one is accepted, and that median is let go after PRIOR_FRAMES
        frames it alone rejected (a night of rounder optics' or steadier air's than the next: never the whole
        night lost).  Judged on nothing, a trailed first frame (a mount settling after the evening's slew) was
        stacked, and the next frames judged against it."""
        hours = self.night_gap(m)
        if hours is None:
            return None
        self.prior, self.prior_rejected = self._medians(), 0
        self.judge.history.clear()
        for judge in self.levels.values():
            judge.history.clear()
        self.streak = []        # frames rejected at dawn and the next evening's are not "in a row" (_suspect)
        return hours

    def night_gap(self, m: FrameMeta) -> float | None:
        """The hours between the frame in hand and this filter's last stacked frame when they make it another
        night (`[reject] new_night_after_h` or more, either way round) and the filter has statistics to start
        afresh; else None.  Changes nothing."""
        gap = self.judge.p.new_night_after_h
        if not gap or m.time is None or not self.last_time or not self.judge.history:
            return None
        try:
            last = dt.datetime.fromisoformat(self.last_time)
            now = m.time
            if (last.tzinfo is None) != (now.tzinfo is None):     # one file said UTC, the other nothing
                last, now = last.replace(tzinfo=None), now.replace(tzinfo=None)
            hours = abs(now - last).total_seconds() / 3600.0     # (a folder of an earlier night after it, too)
        except (TypeError, ValueError, OverflowError):
            return None
        return None if hours < gap else hours

    def _medians(self) -> dict[str, float]:
        """The judge's running medians that are numbers (a checkpoint's JSON keeps them)."""
        return {k: float(v) for k, v in self.judge.medians().items() if np.isfinite(v)}

    def verdict(self, q: Quality, m: FrameMeta) -> str | None:
        """The judge's verdict on a frame that did not register (the daemon holds it: a new target?), changing
        nothing: as check() without a transparency; a frame of another night than the filter's statistics (or
        of a new night with none of its own yet) on its shape alone, against the last night's.  Against the
        last night's medians, a new target's night with the moon up or a softer seeing had every frame 'not
        good' (sky or FWHM): none of them ever made the new target, all rejected as not registering."""
        if self.night_gap(m) is not None:
            return self.judge.trailed_against(q, self._medians())
        if not self.judge.history:
            return self.judge.trailed_against(q, self.prior)
        return self.check(q, m)

    def check(self, q: Quality, m: FrameMeta, scale: float | None = None) -> str | None:
        """Why a frame of this filter (its transparency factor ``scale`` against the first frame, when known) is
        rejected, or None.  The first frame of a new exposure, ISO or gain has nothing to compare its star
        count and sky with; its transparency is judged against the first frame's scaled by the exposures when
        only the exposure changed (_expected_base), by its noise against the latest frame's after a change of
        ISO or gain (_expected_across).  A frame rejected for its transparency alone may put its baseline on
        trial (_suspect): what that did is left in ``events``."""
        key = settings_key(m)
        self._adopt(key)
        base, noise0, estimated = self._baseline(key, m, q)
        raw = None if scale is None else (1.0 / scale if scale > 0 else 0.0)
        t = None if raw is None or base is None else raw / base
        levels = self.levels.get(key, FrameJudge(self.judge.p))
        reason = self.judge.check(q, transparency=t, levels=levels)
        if reason is None and not self.judge.history:
            reason = self.judge.trailed_against(q, self.prior)
            if reason is not None:
                self.prior_rejected += 1    # by the previous night's shape alone: only so many (new_night)
                if self.prior_rejected >= PRIOR_FRAMES:
                    self.prior = None
                return reason
        if reason is None or t is None or t >= self.judge.p.min_transparency or \
                self.judge.check(q, levels=levels) is not None:
            return reason
        ok = noise0 is not None and np.isfinite(q.noise) and q.noise > 0
        if self.streak and self.streak[-1][0] != key:
            self.streak = []
        self.streak.append((key, raw, float(q.noise), t, t * noise0 / q.noise if ok else None, estimated))
        if self._suspect(key):
            levels = self.levels.get(key, FrameJudge(self.judge.p))
            reason = self.judge.check(q, transparency=raw / self.bases[key], levels=levels)
        return reason

    def _baseline(self, key: str, m: FrameMeta, q: Quality) -> tuple[float | None, float | None, bool]:
        """(the star flux against the filter's first frame a clear frame of ``m``'s settings shows, the noise of
        the frame it is from or None, True when it is estimated from this frame's own noise); None: not judged."""
        if key in self.bases:
            return self.bases[key], self.noises.get(key), False
        base = self._expected_base(m)
        if base is not None:
            key0, exptime0 = self.first_settings[:2]
            n0 = self.noises.get(key0)
            return base, None if n0 is None else n0 * float(np.sqrt(float(m.exptime) / exptime0)), False
        return self._expected_across(m, q), None, True

    def _expected_across(self, m: FrameMeta, q: Quality) -> float | None:
        """The baseline of a new ISO or gain, from the filter's latest accepted frame (minutes before: the same
        sky).  Star fluxes scale with the camera's ADU per electron, and so does the sky's noise: measured on
        both frames, its ratio is that scale whatever the camera's units (ISO, ZWO's 0.1 dB, another vendor's).
        With the exposure changed too, star fluxes take the exposures' ratio r whole, and the noise between none
        of it (read noise, or a sky that is not the exposure's: the simulator's) and √r (the sky's photons): the
        lower expectation of the two, min(r, √r), is taken — a clear frame is never judged against more than it
        can show.  Read noise makes it approximate: a streak of frames rejected against it replaces it
        (_suspect).  None without a latest frame or a noise."""
        if self.last is None:
            return None
        key_l, noise_l, exptime_l = self.last
        exptime = float(m.exptime or 0.0)
        if key_l not in self.bases or not noise_l > 0 or not (np.isfinite(q.noise) and q.noise > 0):
            return None
        r = exptime / exptime_l if exptime > 0 and exptime_l > 0 else 1.0
        return self.bases[key_l] * q.noise / noise_l * min(r, float(np.sqrt(r)))

    def _suspect(self, key: str) -> bool:
        """A baseline on trial: ``suspect_after`` frames in a row rejected for their transparency alone against
        it, agreeing with each other (each within ``min_transparency`` of the others: one sky, not passing
        clouds).  A baseline from a frame is left when their noise is as much lower as their star fluxes (their
        SNR transparency against it ≥ √min_transparency): the pixel scale changed, not the sky — a cloud dims
        the stars and at most the square root of the sky's noise with them (a good first frame with clouds
        after it stays).  That frame, still in the bootstrap buffer, is left out of the stack.  A baseline
        estimated across settings (_expected_across) is left on their agreement alone.  The baseline becomes
        theirs (the median); True when it changed."""
        p = self.judge.p
        n = p.suspect_after
        if not n or len(self.streak) < n:
            return False
        _, raws, noises, ts, snrs, estimated = zip(*self.streak[-n:])
        if not min(raws) > 0 or max(raws) > min(raws) / p.min_transparency:
            return False
        med = float(np.median(raws))
        noise = float(np.median(noises))
        if not all(estimated):
            if any(e or s is None for s, e in zip(snrs, estimated)) or \
                    min(snrs) < float(np.sqrt(p.min_transparency)):     # (a noise unknown: never)
                return False
            i = next((i for i, b in enumerate(self.boot) if b[5] == key), 0 if self.boot else None)
            why = (f"star fluxes {1 / float(np.median(ts)):.3g} × those of the {n} frames after it rejected "
                   f"against it, and noise {float(np.median([s / t for s, t in zip(snrs, ts)])):.3g} × theirs "
                   "(another pixel scale, not a clearer sky)")
            if i is not None and self.stack is not None and self.stack.sums is None and not self.first_judged \
                    and self._boot_history() is not None:
                self.events.append((self.boot[i][0], self.boot[i][1], why))
                if i == 0:
                    self.first_judged = True
                self._drop([i])
            else:
                self.events.append((None, None, f"{key}: transparency baseline replaced by the {n} frames "
                                                f"rejected against it: {why}"))
        else:
            self.events.append((None, None, f"{key}: transparency expected from the noise replaced by the {n} "
                                            f"frames rejected against it (median {med:.3g})"))
        self.bases[key], self.noises[key] = med, noise
        self.streak = []
        return True

    def _expected_base(self, m: FrameMeta) -> float | None:
        """The transparency a clear frame of ``m``'s settings shows against the filter's first frame when only
        the exposure differs (star flux is proportional to it: a 15 s frame's is a quarter of a 60 s frame's),
        relative to the baseline of the first frame's settings; None for another ISO or gain (their scale is
        the camera's own) or an exposure unknown."""
        if self.first_settings is None:
            return None
        key0, exptime0, iso0, gain0 = self.first_settings
        exptime = float(m.exptime or 0.0)
        if (m.iso, m.gain) != (iso0, gain0) or not exptime > 0 or not exptime0 > 0 or key0 not in self.bases:
            return None
        return self.bases[key0] * exptime / exptime0

    @staticmethod
    def boot_entry(q: Quality, m: FrameMeta, *, file: str, index: int | None, scale: float) -> tuple:
        """What ``boot`` keeps of a bootstrap frame (accept)."""
        return (file, index, _iso(m.time), float(m.exptime or 0.0), float(scale), settings_key(m),
                [q.fwhm, float(q.stars), q.background, q.eccentricity, q.noise])

    def judge_first(self) -> list[tuple[str, int | None, str]]:
        """Once, when the stack's bootstrap buffer is full: the filter's first frame — stacked unjudged, there
        was nothing to judge it by — judged against the frames buffered after it, as they were judged against
        it.  A trailed, soft or cloudy first frame (the mount settling after a slew, focus or cloud at dusk) is
        then left out of the stack.  So is any frame after it that passed only because it was compared with that
        one (the mount settling for two frames): each judged again against the others kept.  Returns the frames
        left out as (file, index, reason).  The first frame's sky and star fluxes stay the filter's photometric
        reference (every later frame is normalised to them); transparency is then judged against the frames
        that stay."""
        out = self.first_verdict()
        if out is None:
            return []
        self.first_judged = True
        dropped = [(self.boot[i][0], self.boot[i][1], w) for i, w in out]
        if out:
            self._drop([i for i, _ in out])
        return dropped

    def combines_with(self, entry: tuple) -> bool:
        """Whether the frame in hand (its boot_entry), which fills the stack's bootstrap buffer, may be combined
        with the frames buffered as it is added (RunningStack.add_channels' combine): judge_first, once it is
        accepted, will leave none of them out — it has judged already, has fewer than two frames to judge, or
        judges them all good.  Not when it cannot tell (the qualities of an old checkpoint's frames)."""
        boot = self.boot + [entry]
        if self.first_judged or len(boot) < 2:
            return True
        return self._boot_history(boot) is not None and self.first_verdict(entry) == []

    def first_verdict(self, entry: tuple | None = None) -> list[tuple[int, str]] | None:
        """judge_first's verdict, without acting on it: [(bootstrap index, why)] of the frames it leaves out, or
        None when it gives none (given already, fewer than two frames, their qualities not known).  ``entry``
        (boot_entry): a frame in hand, judged as if accepted — the frame that fills the buffer, before the
        pipeline adds it (RunningStack.add_channels' combine)."""
        boot = self.boot if entry is None else self.boot + [entry]
        hist = self._boot_history(boot)
        if self.first_judged or len(boot) < 2 or hist is None:
            return None
        why = self._loo(hist, 0, range(1, len(hist)), boot)
        if why is None:
            return []
        n = len(hist) - 1
        out = [(0, f"{why}, against the {n} frame{'s' if n != 1 else ''} after it")]
        rest = range(1, len(hist))
        if len(rest) >= 2:
            out += [(i, f"{w}, against the {len(rest) - 1} other frame{'s' if len(rest) != 2 else ''} kept "
                        "with it after the first was left out")
                    for i in rest if (w := self._loo(hist, i, [j for j in rest if j != i], boot)) is not None]
            if len(out) == len(hist):       # (one-sided tests: not all of them; kept safe all the same)
                out = out[:1]
        return out

    def _boot_history(self, boot: list | None = None) -> list | None:
        """The judge's (fwhm, stars, background, eccentricity) of each bootstrap frame (of ``boot``, by default the
        filter's), in order; None when they are not known (a checkpoint of before they were kept, whose judge no
        longer holds them all)."""
        boot = self.boot if boot is None else boot
        if all(len(b) == 7 for b in boot):
            return [tuple(b[6][:4]) for b in boot]
        hist = list(self.judge.history)
        return hist if len(hist) == len(boot) else None

    def _loo(self, hist: list, i: int, others: list[int] | range, boot: list | None = None) -> str | None:
        """Why bootstrap frame ``i`` (of ``boot``, by default the filter's) would be rejected against bootstrap
        frames ``others`` (FWHM and shape against all of them; stars, sky and transparency against those of its
        own settings), or None.  Against all of them, whatever `[reject] window` (the reason counts them)."""
        boot = self.boot if boot is None else boot
        p = dataclasses.replace(self.judge.p, window=max(self.judge.p.window, len(hist)))
        judge, levels = FrameJudge(p), FrameJudge(p)
        judge.history.extend(hist[j] for j in others)
        key = boot[i][5]
        same = [j for j in others if boot[j][5] == key]
        levels.history.extend(hist[j] for j in same)
        s_i = boot[i][4]
        # frame i's star flux against frame j's: (ref / scale_i) / (ref / scale_j)
        t = float(np.median([boot[j][4] / s_i for j in same])) if same and s_i > 0 else None
        fwhm, stars, background, ecc = hist[i]
        return judge.check(Quality(int(stars), fwhm, ecc, background, float("nan")), transparency=t, levels=levels)

    def _drop(self, idx: list[int]) -> None:
        """Take bootstrap frames ``idx`` out of the stack's buffer, the judges, the counts; each settings group's
        transparency baseline from the frames kept (the first frame's own is 1)."""
        keep = [i for i in range(len(self.boot)) if i not in idx]
        hist = self._boot_history()
        self.judge.history.clear()
        self.judge.history.extend(hist[i] for i in keep)
        for i in sorted(idx, reverse=True):
            self.stack.drop(i)
        groups = {self.boot[i][5] for i in range(len(hist))}
        self.levels = {k: j for k, j in self.levels.items() if k not in groups}
        for i in keep:        # (the histories are of accepted frames, in order: the buffer's, here)
            self.levels.setdefault(self.boot[i][5], FrameJudge(self.judge.p)).history.append(hist[i])
        # a group's baseline is its first frame's (accept: the buffer holds every frame so far): only a group
        # whose first frame is left out takes the median of its frames kept — another group's stays (a hazy
        # frame of it moved that one's, and let hazier ones in)
        for key in groups:
            if next(i for i in range(len(hist)) if self.boot[i][5] == key) not in idx:
                continue
            scales = [self.boot[i][4] for i in keep if self.boot[i][5] == key]
            noises = [self.boot[i][6][4] for i in keep if self.boot[i][5] == key and len(self.boot[i]) == 7]
            if scales:
                self.bases[key] = float(np.median([1.0 / s if s > 0 else 0.0 for s in scales]))
            else:
                self.bases.pop(key, None)
            if noises:
                self.noises[key] = float(np.median(noises))
            else:
                self.noises.pop(key, None)
        gone = [self.boot[i] for i in idx]
        self.boot = [self.boot[i] for i in keep]
        # the times of the frames kept, as Counters.stacked_frame and accept() took them: the buffer is every
        # frame stacked so far, so a frame left out last (the one in hand) leaves no time behind
        first = last = None
        for _, _, start, exptime, *_ in self.boot:
            if start:
                first = first or start
                try:
                    last = _iso(dt.datetime.fromisoformat(start) + dt.timedelta(seconds=exptime))
                except (OverflowError, ValueError):
                    pass
        self.last_time = next((b[2] for b in reversed(self.boot) if b[2]), None)
        self.counts = dataclasses.replace(self.counts, stacked=self.counts.stacked - len(gone),
                                          rejected=self.counts.rejected + len(gone),
                                          exptime=self.counts.exptime - sum(g[3] for g in gone),
                                          first_time=first, last_end=last)
        self.version += 1

    def summary(self) -> dict:
        """JSON-ready figures for the page and /api/status."""
        med = self.judge.medians()
        fwhm = med.get("fwhm")
        return {"filter": self.name, "key": self.key, "file": self.file_name, "frames": self.counts.stacked,
                "rejected": self.counts.rejected, "integration_s": integration(self.counts.exptime),
                "fwhm": None if fwhm is None or not np.isfinite(fwhm) else round(float(fwhm), 3),
                "last_frame_time": self.last_time, "reference": self.ref.file if self.ref else None}

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"name": self.name, "counts": dataclasses.asdict(self.counts), "judge": self.judge.state(),
                "last_time": self.last_time, "boot": [list(b) for b in self.boot],
                "first_judged": self.first_judged, "bases": self.bases,
                "levels": {k: j.state() for k, j in self.levels.items()}, "legacy": self.legacy,
                "first_settings": None if self.first_settings is None else list(self.first_settings),
                "noises": self.noises, "last": None if self.last is None else list(self.last),
                "streak": [list(t) for t in self.streak], "prior": self.prior,
                "prior_rejected": self.prior_rejected}
        arrays: dict[str, np.ndarray] = {}
        if self.ref is not None:
            r = self.ref
            meta["ref"] = {"file": r.file, "plane": r.plane.tolist(), "sky": r.sky.tolist(), "noise": r.noise,
                           "fwhm": r.fwhm}
            arrays["ref_xy"], arrays["ref_flux"] = r.xy, r.flux
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays, stack, stack_params: StackParams, reject_params: RejectParams, *,
                   pool=None) -> "FilterStack":
        fs = cls(meta["name"], stack_params, reject_params, pool=pool)
        fs.counts = Counters(**meta["counts"])
        fs.judge.load_state(meta["judge"])
        fs.last_time = meta.get("last_time")
        fs.boot = [tuple(b) for b in meta.get("boot", [])]
        fs.first_judged = meta.get("first_judged", True) or any(len(b) not in (6, 7) for b in fs.boot)  # (one from
        # before: the first frame is not judged again)
        fs.bases = {k: float(v) for k, v in meta.get("bases", {}).items()}
        fs.legacy = bool(meta.get("legacy", "levels" not in meta))
        fs.first_settings = tuple(meta["first_settings"]) if meta.get("first_settings") else None
        fs.noises = {k: float(v) for k, v in meta.get("noises", {}).items()}
        fs.last = tuple(meta["last"]) if meta.get("last") else None
        fs.streak = [tuple(t) for t in meta.get("streak", [])]
        fs.prior = meta.get("prior")
        fs.prior_rejected = int(meta.get("prior_rejected", 0))
        for k, h in meta.get("levels", {}).items():
            fs.levels[k] = FrameJudge(reject_params)
            fs.levels[k].load_state(h)
        if "ref" in meta:
            r = meta["ref"]
            fs.ref = FilterRef(r["file"], np.array(arrays["ref_xy"]).reshape(-1, 2), np.array(arrays["ref_flux"]),
                               np.array(r["plane"]), np.array(r["sky"]), r["noise"], r["fwhm"])
        fs.stack = stack
        return fs
