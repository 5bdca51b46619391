"""The data that flows between the stages, and the conventions they share.

Coordinates, said once for the whole project: ``x`` is the column and ``y`` the row, both 0-based, with pixel
centres at integers.  A transform is a (2, 3) float64 matrix ``[[a, b, c], [d, e, f]]`` mapping a frame's pixel
coordinates to stack (reference-grid) pixel coordinates: ``x' = a x + b y + c``, ``y' = d x + e y + f``.

Pixels are float32 from ``read.py`` to ``stack.py``.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# CFA patterns we know, as the colour of pixels (0,0), (0,1), (1,0), (1,1).
CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


class FrameError(Exception):
    """A frame that cannot be used: the message is one line naming the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(slots=True)
class FrameMeta:
    """What the file says about the exposure. Every field may be unknown (None)."""

    exptime: float | None = None           # s
    time: dt.datetime | None = None        # exposure start, UTC when the file says so
    iso: int | None = None
    gain: float | None = None
    temperature: float | None = None      # sensor, °C
    camera: str | None = None             # make + model, or INSTRUME
    filter: str | None = None
    imagetyp: str | None = None            # 'light' | 'dark' | 'flat' | 'bias' | 'darkflat' | None
    pointing: tuple[float, float] | None = None   # (RA, Dec) in degrees the mount reported (FITS RA/DEC, OBJCTRA/…)
    object: str | None = None              # OBJECT: the target's name as the capture program knew it
    wcs: object | None = None              # the file's own celestial WCS (astropy), in sensor pixels, if usable
    kind: str = ""                         # 'raw' | 'fits'
    extra: dict = field(default_factory=dict)  # anything else worth keeping (e.g. FITS XBINNING)


@dataclass(slots=True)
class Frame:
    """One exposure as read from disk: raw sensor values, not yet calibrated.

    data:    (H, W) float32 ADU, the CFA mosaic (colour sensors) or the mono image; black level not removed.
    pattern: CFA pattern of pixel (0, 0) of ``data`` ('RGGB', …), None for mono.
    black:   (2, 2) float32 black level of each CFA position (mono: all equal); zeros when unknown.
    white:   saturation level in ADU (pixels >= white are flagged in ``saturated``).
    saturated: (H, W) bool, or None when no pixel reaches ``white``.
    verify:  None, or (a speculative read: read_frame's ``speculate``) a call that says whether these values are
             the file's as LibRaw reads it — False: read the file again before they count for anything.
    """

    path: Path
    data: np.ndarray
    pattern: str | None
    black: np.ndarray
    white: float
    saturated: np.ndarray | None
    meta: FrameMeta
    verify: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape  # type: ignore[return-value]

    @property
    def is_color(self) -> bool:
        return self.pattern is not None


@dataclass(frozen=True, slots=True)
class Stars:
    """Stars found in one image, brightest first.

    xy:   (N, 2) float64 centroids (x = column, y = row) in the image's pixel coordinates.
    flux: (N,) float64 background-subtracted flux in ADU.
    fwhm: (N,) float64 per-star FWHM in px.
    a, b: (N,) float64 semi-axes (px) of the star's second-moment ellipse.
    """

    xy: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    @staticmethod
    def empty() -> "Stars":
        z = np.zeros(0)
        return Stars(np.zeros((0, 2)), z, z, z, z)


@dataclass(frozen=True, slots=True)
class Quality:
    """Per-frame quality, measured on the background-subtracted luminance."""

    stars: int
    fwhm: float            # px at stack resolution, median over stars; nan without stars
    eccentricity: float    # median sqrt(1 - b²/a²); 0 = round
    background: float      # median sky level of the luminance, ADU (after calibration)
    noise: float           # background RMS of the luminance, ADU


@dataclass(slots=True)
class FrameRecord:
    """One line of frames.jsonl.  The field names are a public contract: add fields, never rename them."""

    file: str
    status: str                             # reference | stacked | rejected | failed
    reason: str | None = None
    time: str | None = None                 # capture time, ISO 8601
    exptime: float | None = None
    matrix: list[list[float]] | None = None  # 2x3 frame -> stack pixel coordinates
    stars: int | None = None
    fwhm: float | None = None
    eccentricity: float | None = None
    background: float | None = None
    noise: float | None = None
    weight: float | None = None
    seconds: float | None = None
    # additions (allowed by the contract)
    index: int | None = None                # position in processing order, 0-based
    scale: float | None = None              # transparency factor applied (ref flux / frame flux)
    rejected_pixels: int | None = None      # pixels rejected as outliers in this frame
    saturated_pixels: int | None = None
    calibration: dict | None = None         # which masters were used
    camera: str | None = None
    filter: str | None = None
    iso: int | None = None
    gain: float | None = None
    shift_x: float | None = None            # drift of the frame centre vs reference, px (the frame's own)
    shift_y: float | None = None
    rotation: float | None = None           # degrees
    registration: str | None = None         # how the matrix was found: "predicted" (the frame's own WCS against
                                            #     the grid's, or the previous frame's matrix) | "pattern"
    registration_model: str | None = None   # "similarity" | "affine": the model the star pairs supported
    pattern: str | None = None              # CFA pattern used, at the frame's pixel (0, 0) as read (after a
                                            #     ROWORDER flip or a TRIMSEC cut); null for mono

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, d: dict) -> "FrameRecord":
        known = set(cls.__slots__)  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in d.items() if k in known})
