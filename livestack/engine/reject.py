"""Frame quality + running statistics of accepted frames -> None (keep) or a reason with numbers (reject)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .frame import Quality


@dataclass(frozen=True, slots=True)
class RejectParams:
    enabled: bool = True
    fwhm_factor: float = 1.5          # reject FWHM > factor × running median (bad seeing, focus, dew)
    min_star_fraction: float = 0.5    # reject star count < fraction × running median (clouds)
    background_factor: float = 1.5    # reject sky > factor × running median (clouds lit by the town, dawn)
    min_transparency: float = 0.6     # reject star fluxes < this × the reference's (cloud, haze)
    eccentricity_delta: float = 0.2   # reject eccentricity > running median + delta …
    eccentricity_min: float = 0.45    # … and above this absolute value (round-star sessions have noisy medians)
    eccentricity_fwhm: float = 2.0    # … for stars at least this wide (px, the frame's FWHM): narrower ones are
                                      #     measured on 1–2 pixels (of the 2×2-binned mosaic for colour), where
                                      #     pixel phase alone gives eccentricities of 0.1–0.8 (simulated FWHM
                                      #     1.2 px: 8 of 16 clean frames were rejected as trailed)
    min_ref_stars: int = 15           # the reference frame needs at least this many stars
    window: int = 30                  # running statistics over the last N accepted frames
    suspect_after: int = 3            # this many frames in a row rejected for their transparency alone, agreeing
                                      #     with each other, put their baseline on trial (FilterStack._suspect);
                                      #     0: never
    new_night_after_h: float = 6.0    # a frame taken this many hours after its filter's last stacked frame
                                      #     begins a new night: FWHM, star counts, sky and eccentricity are judged
                                      #     against that night's frames from then on (0: never)

    def __post_init__(self):
        if self.fwhm_factor <= 1 or self.background_factor <= 1:
            raise ValueError("reject.fwhm_factor and reject.background_factor must be > 1")
        if not 0 < self.min_star_fraction < 1 or not 0 < self.min_transparency < 1:
            raise ValueError("reject.min_star_fraction and reject.min_transparency must be in (0, 1)")
        if self.window < 1 or self.min_ref_stars < 3:
            raise ValueError("reject.window must be ≥ 1 and reject.min_ref_stars ≥ 3")
        if self.suspect_after < 0 or self.suspect_after == 1:
            raise ValueError(f"reject.suspect_after = {self.suspect_after}: must be 0 (never) or ≥ 2")
        if not self.new_night_after_h >= 0:
            raise ValueError(f"reject.new_night_after_h = {self.new_night_after_h}: must be ≥ 0 (0: never)")


class FrameJudge:
    """Keeps the running medians of accepted frames (bounded memory: the last ``window`` frames)."""

    def __init__(self, p: RejectParams):
        self.p = p
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=p.window)

    def medians(self) -> dict[str, float]:
        if not self.history:
            return {}
        a = np.array(self.history, dtype=np.float64)
        return dict(zip(("fwhm", "stars", "background", "eccentricity"), np.nanmedian(a, axis=0).tolist()))

    def check_reference(self, q: Quality) -> str | None:
        if q.stars < self.p.min_ref_stars:
            # the setting named: a sparse narrowband field (a colour camera's dual-band 180 s frames of 8-12
            # stars) had every frame of the night rejected, with nothing saying what could be changed
            return f"only {q.stars} stars (a reference frame needs {self.p.min_ref_stars}: [reject] min_ref_stars)"
        return None

    def check(self, q: Quality, transparency: float | None = None, *,
              levels: "FrameJudge | None" = None) -> str | None:
        """Reason to reject the frame, or None.  ``transparency`` = frame star flux / reference star flux.
        ``levels``: the judge whose frames the star count and the sky level are compared with — those of the
        frame's own exposure, ISO and gain (a 15 s frame has a quarter of a 60 s frame's sky and fewer stars:
        against 60 s frames every one was "clouds"); None: this judge's own; one without frames: not tested.
        Without frames of its own (a new night's first frame) the frame is judged on its transparency alone —
        the shape of its stars against the previous night's: trailed_against()."""
        p = self.p
        if not p.enabled:
            return None
        if not self.history:
            return self._clouded(transparency)
        m = self.medians()
        lv = (self if levels is None else levels).medians()
        if lv and q.stars < p.min_star_fraction * lv["stars"]:
            return f"stars {q.stars} < {p.min_star_fraction:g} × running median {lv['stars']:.0f} (clouds?)"
        clouded = self._clouded(transparency)
        if clouded:
            return clouded
        if lv and lv["background"] > 0 and q.background > p.background_factor * lv["background"]:
            return (f"background {q.background:.1f} ADU > {p.background_factor:g} × running median "
                    f"{lv['background']:.1f} ADU (clouds or light?)")
        if np.isfinite(q.fwhm) and q.fwhm > p.fwhm_factor * m["fwhm"]:
            return f"fwhm {q.fwhm:.2f} px > {p.fwhm_factor:g} × running median {m['fwhm']:.2f} px"
        if self._trailed(q, m["eccentricity"]):
            return (f"eccentricity {q.eccentricity:.2f} > running median {m['eccentricity']:.2f} "
                    f"+ {p.eccentricity_delta:g} (trailed stars: wind or tracking)")
        return None

    def trailed_against(self, q: Quality, prior: dict | None) -> str | None:
        """Why a frame with nothing of its night to be judged by is rejected for the shape of its stars against
        ``prior`` (the medians of the filter's previous night), or None: trailing is the wind's and the mount's;
        the seeing, the star count and the sky are the night's own and are not judged."""
        p = self.p
        ecc = (prior or {}).get("eccentricity")
        if not p.enabled or ecc is None or not np.isfinite(ecc) or not self._trailed(q, ecc):
            return None
        return (f"eccentricity {q.eccentricity:.2f} > the previous night's median {ecc:.2f} "
                f"+ {p.eccentricity_delta:g} (trailed stars: wind or tracking; a new night's first frames)")

    def _clouded(self, transparency: float | None) -> str | None:
        p = self.p
        if transparency is not None and transparency < p.min_transparency:
            return f"transparency {transparency:.2f} < {p.min_transparency:g} of the reference (clouds?)"
        return None

    def _trailed(self, q: Quality, median: float) -> bool:
        """Stars more elongated than ``median`` allows — judged only for stars wide enough to show it."""
        p = self.p
        return q.eccentricity > max(p.eccentricity_min, median + p.eccentricity_delta) and \
            not q.fwhm < p.eccentricity_fwhm

    def accept(self, q: Quality) -> None:
        self.history.append((q.fwhm, float(q.stars), q.background, q.eccentricity))

    def state(self) -> list:
        return [list(h) for h in self.history]

    def load_state(self, s: list) -> None:
        self.history.clear()
        self.history.extend(tuple(h) for h in s)
