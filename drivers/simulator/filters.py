"""The filter wheel: what a filter passes of the stars, the sky and the nebula's emission lines.

The spectrum is coarse on purpose: three continuum bands (R, G, B, each a third of L) and three emission lines
(Hα and [SII] in R, [OIII] on the G/B boundary). A filter is a transmission per band and per line, plus the
sky it lets through. One `Passband` holds that, and answers the three questions a frame asks (stars, sky,
nebula); `render_frame` does not branch on the filter.

A mono pixel sees the mean of the three channels; a Bayer pixel of colour c sees channel c — the convention of
the unfiltered simulator, where a star's colour weights `rgb` have mean 1. So behind filter F:
    star flux   mono: flux · Σ_c continuum[c]·rgb[c] / 3         Bayer c: flux · continuum[c]·rgb[c]
    sky         mono: sky_level · mean(sky)                        Bayer c: sky_level · sky[c]
    line l      mono: lines[l] · I_l                               Bayer c: lines[l] · 3·share[l, c] · I_l
with I_l the line's surface brightness (e-/px per cfg.exptime, sky.py) and share[l] its split over R, G, B.

A colour camera works behind every filter (not only the dual-band one): its Bayer pixels simply multiply with
the filter's bands, so behind Hα the G and B pixels see nothing but dark current and noise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .sky import SkyField, line_images, nebula_rgb

LINES = ("Ha", "OIII", "SII")
# share of each line's light in the R, G, B bands (rows: LINES); [OIII] at 500.7 nm sits between G and B
LINE_SHARE = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], np.float32)

# canonical name -> (continuum R, G, B), (sky R, G, B), (lines Ha, OIII, SII), narrowband.
# Narrowband: 3 nm passes ~3 % of a 100 nm band's continuum (Hα 0.03·r, [SII] 0.025·r, [OIII] 0.03·(g+b)/2 in
# mono), and the sky 16–18× less than L per second (mono 0.06, 0.06, 0.055) — skyglow is mostly continuum.
_BANDS = {
    "L": ((1, 1, 1), (1, 1, 1), (1, 1, 1), False),
    "R": ((1, 0, 0), (0.99, 0, 0), (1, 0, 1), False),
    "G": ((0, 1, 0), (0, 0.99, 0), (0, 0.5, 0), False),
    "B": ((0, 0, 1), (0, 0, 0.99), (0, 0.5, 0), False),
    "Ha": ((0.09, 0, 0), (0.18, 0, 0), (1, 0, 0), True),
    "OIII": ((0, 0.045, 0.045), (0, 0.09, 0.09), (0, 1, 0), True),
    "SII": ((0.075, 0, 0), (0.165, 0, 0), (0, 0, 1), True),
    "HaOIII": ((0.09, 0.045, 0.045), (0.18, 0.09, 0.09), (1, 1, 0), True),   # dual band, for colour cameras
}
_ALIASES = {
    "L": ("l", "lum", "luminance"), "R": ("r", "red"), "G": ("g", "green"), "B": ("b", "blue"),
    "Ha": ("ha", "halpha", "hα"), "OIII": ("oiii", "o3"), "SII": ("sii", "s2"),
    "HaOIII": ("haoiii", "lextreme", "lenhance", "dualband"),
}
_CANONICAL = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
KNOWN = ("L/Lum/Luminance, R/Red, G/Green, B/Blue, Ha/H-alpha/Halpha, OIII/O3, SII/S2, "
         "HaOIII/L-eXtreme/L-eNhance/DualBand")


def canonical_filter(name: str) -> str | None:
    """'H-alpha', 'ha 7nm', 'L-eXtreme' -> 'Ha', 'Ha', 'HaOIII': case, punctuation and a trailing bandwidth
    ('7nm') ignored. None for a name the simulator does not know."""
    key = "".join(ch for ch in str(name).casefold() if ch.isalnum())
    key = re.sub(r"\d+(\.\d+)?nm$", "", key)
    return _CANONICAL.get(key)


@dataclass(frozen=True, slots=True)
class Passband:
    name: str | None             # canonical filter name; None: no wheel (the unfiltered sky of filters=())
    continuum: np.ndarray        # (3,) float32 fraction of the R, G, B star continuum passed
    sky: np.ndarray              # (3,) float32 sky per band, × cfg.sky_level
    lines: np.ndarray            # (3,) float32 transmission of Hα, [OIII], [SII]
    narrowband: bool

    @staticmethod
    def of(name: str | None) -> Passband:
        """The passband of a filter name (any accepted spelling), or of no filter for None.
        Raises ValueError naming an unknown filter."""
        if name is None:
            one = np.ones(3, np.float32)
            return Passband(None, one, one, one, False)
        canon = canonical_filter(name)
        if canon is None:
            raise ValueError(f"filter {name!r} unknown (known: {KNOWN})")
        cont, sky, lines, narrow = _BANDS[canon]
        return Passband(canon, *(np.array(v, np.float32) for v in (cont, sky, lines)), narrow)

    def exptime(self, base: float) -> float:
        """Default exposure behind this filter: 3 × base for narrowband (and dual band), base otherwise."""
        return 3 * base if self.narrowband else base

    def stars(self, flux: np.ndarray, rgb: np.ndarray, *, mono: bool) -> tuple[np.ndarray, np.ndarray]:
        """(flux, rgb) of the stars as seen through the filter, for stamp_stars: flux (N,) e- summed over
        the bands as a mono pixel sees them, rgb (N, 3) the Bayer channel weights. Unfiltered: unchanged."""
        if self.name is None:
            return flux, rgb
        if mono:
            return flux * (rgb @ self.continuum / 3), rgb
        return flux, (rgb * self.continuum).astype(np.float32)

    def sky_mono(self) -> float:
        """Sky of a mono pixel, × cfg.sky_level (the mean of the channels)."""
        return float(self.sky.mean(dtype=np.float64))

    @property
    def nebula_step(self) -> int:
        """Coarse grid step (px) on which the nebula is evaluated: 8 for the smooth unfiltered blobs, 4 for the
        emission-line nebula, whose Hα knots are only 20 px across."""
        return 8 if self.name is None else 4

    def nebula(self, sky: SkyField, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
        """Nebula through the filter at sky points (sx, sy): (3, *sx.shape) float32 e-/px per cfg.exptime for
        the R, G, B channels (a mono pixel sees their mean). Unfiltered: the colour blobs of sky.blobs."""
        if self.name is None:
            return nebula_rgb(sky.blobs, sx, sy)
        out = np.zeros((3, *sx.shape), np.float32)
        if not sky.lines:
            return out
        weights = 3 * self.lines[:, None] * LINE_SHARE       # (line, channel)
        for w, img in zip(weights, line_images(sky.lines, sx, sy)):
            for c in range(3):
                if w[c]:
                    out[c] += np.float32(w[c]) * img
        return out
