"""Plate solving with Debian's astrometry.net (``solve-field`` on a star list), and the WCS helpers around it.

Pixel conventions.  Everywhere in livestack a position is (x = column, y = row), 0-based, pixel centres at
integers (frame.py).  astrometry.net reads an xylist in FITS convention, 1-based (the first pixel's centre is
(1, 1)): ``solve_stars`` writes x + 1, y + 1, and the ``.wcs`` it reads back is then an ordinary FITS WCS of the
caller's grid — astropy applies the 1-based CRPIX itself when asked with origin 0
(``wcs.all_pix2world(x, y, 0)``, ``wcs.pixel_to_world_values(x, y)``).  Measured on the PANOPTES frame of
../shared/data: writing 0-based positions instead shifts the solution by one pixel in x and y.

Sky conventions.  RA and Dec in degrees (ICRS/J2000 as the index files are); scales in arcsec per pixel of the
grid the WCS is expressed in; ``rotation_deg`` is the position angle of the image's +y axis (increasing row
index), measured from North through East, in [0, 360).  +y is "up" in FITS viewers (ds9, Siril), which draw
row 0 at the bottom, and "down" in the JPEG preview, which draws row 0 at the top.  Parity "normal" is the sky
as seen (East 90° anticlockwise from North with y up, det(CD) < 0); "flipped" is its mirror image.

Nothing here reads a config file or starts a thread: settings come in as a ``SolveParams`` value, and
``solve_stars`` blocks for at most ``params.timeout_s`` (+1 s) of wall-clock time.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, Sip

from .quiet import quiet_warnings
from .read import _num, header_pointing

MIN_MATCHES = 8   # fewer field/index star pairs than this do not pin down a TAN-SIP fit worth trusting

# Debian's Tycho-2 index packages and the quad diameters they hold (arcmin): for the "no index" advice.
TYCHO2_PACKAGES = (
    ("astrometry-data-tycho2-07-littleendian", 22.0, 30.0),
    ("astrometry-data-tycho2-08-littleendian", 30.0, 44.0),
    ("astrometry-data-tycho2-09-littleendian", 44.0, 60.0),
    ("astrometry-data-tycho2-10-19-littleendian", 60.0, 2000.0),
)


class SolveError(Exception):
    """A plate solve that gave no trustworthy WCS.  ``reason`` is one sentence a user can act on; ``final`` when
    another frame's stars would meet the same (no solver, no index for the field): not worth another try."""

    def __init__(self, reason: str, *, final: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.final = final


@dataclass(frozen=True, slots=True)
class SolveParams:
    enabled: bool = True
    timeout_s: float = 60            # wall clock for one solve-field run (also its --cpulimit)
    index_dir: str | None = None     # directory of index-*.fits; None: solve-field's default config
    scale_arcsec: float | None = None  # user hint, arcsec per pixel of the grid (overrides the header's)
    scale_tolerance: float = 0.2     # relative: the solver searches scale × (1 ± this)
    max_stars: int = 150             # brightest stars given to the solver
    radius_deg: float = 5.0          # search radius around a pointing hint
    max_rms_px: float = 1.0          # solution check: RMS of field vs index stars, px the stars were measured on

    def __post_init__(self):
        if not 0 < self.timeout_s <= 3600:
            raise ValueError(f"solve.timeout_s = {self.timeout_s}: must be in (0, 3600]")
        if self.scale_arcsec is not None and not 0.01 <= self.scale_arcsec <= 3600:
            raise ValueError(f"solve.scale_arcsec = {self.scale_arcsec}: must be in [0.01, 3600] arcsec/px")
        if not 0 < self.scale_tolerance < 1:
            raise ValueError(f"solve.scale_tolerance = {self.scale_tolerance}: must be in (0, 1)")
        if self.max_stars < MIN_MATCHES:
            raise ValueError(f"solve.max_stars = {self.max_stars}: must be at least {MIN_MATCHES}")
        if not 0 < self.radius_deg <= 180:
            raise ValueError(f"solve.radius_deg = {self.radius_deg}: must be in (0, 180]")
        if not 0 < self.max_rms_px <= 10:
            raise ValueError(f"solve.max_rms_px = {self.max_rms_px}: must be in (0, 10]")


@dataclass(frozen=True)
class Hints:
    """What the solver may assume; each hint None when unknown.  RA/Dec in degrees, scales in arcsec per grid
    pixel."""

    ra: float | None = None
    dec: float | None = None
    scale_low: float | None = None
    scale_high: float | None = None
    fits_header: bool = True     # False for a RAW frame: no header that could carry FOCALLEN and XPIXSZ

    @property
    def scale_advice(self) -> str:
        """Where a missing scale hint can come from, for a message."""
        if self.fits_header:
            return "give a scale hint ([solve] scale_arcsec, or FOCALLEN/XPIXSZ in the header)"
        # a RAW file's EXIF has neither: the config is the only way, and its unit is easy to get wrong
        return ("give a scale hint ([solve] scale_arcsec = 206.265 × pixel size µm / focal length mm, twice that "
                "with --debayer superpixel, half at --drizzle 2)")

    @property
    def has_pointing(self) -> bool:
        return self.ra is not None and self.dec is not None

    @property
    def has_scale(self) -> bool:
        return self.scale_low is not None and self.scale_high is not None


@dataclass(frozen=True)
class Solution:
    """A checked plate solution of a grid.

    wcs:          astropy WCS (TAN or TAN-SIP) of the grid the stars were measured on.
    seconds:      wall-clock time of the solve-field run.
    matched:      field/index star pairs behind the fit (solve-field's .corr).
    rms_px:       RMS distance between those pairs, grid px, through ``wcs``.
    scale_arcsec: arcsec per grid pixel at the reference point.
    note:         "" or one sentence, e.g. that the header's pointing was wrong and the field solved without it.
    """

    wcs: WCS
    seconds: float
    matched: int
    rms_px: float
    scale_arcsec: float
    note: str = ""       # what the user should know of a solution that came despite a hint (a wrong pointing)

    def describe(self, shape: tuple[int, int]) -> dict:
        """``describe(self.wcs, shape)``."""
        return describe(self.wcs, shape)


# ---------------------------------------------------------------------------------------------- hints


def hints_from_header(header: Mapping, *, binning_to_grid: float = 1.0, params: SolveParams = SolveParams()) -> Hints:
    """Pointing and scale hints from a frame's FITS header (any mapping of card names to values).

    Pointing: RA/DEC in degrees (INDI/KStars, Seestar; a sexagesimal string there is read as hours/degrees), else
    OBJCTRA (hours) / OBJCTDEC (degrees) as sexagesimal strings ('12 32 24.25', '+74 09 31.60'), else RA-MNT /
    DEC-MNT in degrees (PANOPTES; 1.7° from the field centre there, well inside the default 5° radius, and it
    cuts a 17 s blind solve to 1 s).
    Scale: ``params.scale_arcsec`` when set, else 206.265 × pixel µm / FOCALLEN mm × ``binning_to_grid``, with
    the pixel size from XPIXSZ, which capture programs write *with* binning (KStars ngc4535: XPIXSZ 7.6 =
    PIXSIZE1 3.8 × XBINNING 2, and 206.265 × 7.6 / 588 = 2.666″ = its CDELT; Kocab: 15.04 = 3.76 × 4), else
    PIXSIZE1 × XBINNING (INDI writes PIXSIZE1 unbinned).  ``binning_to_grid`` is grid px per sensor px⁻¹: 2 for a
    superpixel grid.  The scale range is scale × (1 ± params.scale_tolerance).
    A missing or unusable value gives None for that hint, never an exception."""
    get = header.get
    ra, dec = header_pointing(header) or (None, None)

    scale = params.scale_arcsec
    if scale is None:
        focal = _num(get("FOCALLEN"))
        pix = _num(get("XPIXSZ"))
        if pix is None:
            unbinned, binning = _num(get("PIXSIZE1")), _num(get("XBINNING"))
            pix = None if unbinned is None else unbinned * (binning if binning is not None and binning >= 1 else 1.0)
        grid = _num(binning_to_grid)
        if focal is not None and focal > 0 and pix is not None and pix > 0 and grid is not None and grid > 0:
            scale = 206.265 * pix / focal * grid
            if not 0.01 <= scale <= 3600:
                scale = None
    if scale is None:
        return Hints(ra, dec)
    tol = params.scale_tolerance
    return Hints(ra, dec, scale * (1 - tol), scale * (1 + tol))


# ---------------------------------------------------------------------------------------------- describing


def separation_deg(ra1, dec1, ra2, dec2) -> float:
    """Great-circle distance in degrees (haversine: exact for small angles)."""
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return float(np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))))


def _position_angle(ra1, dec1, ra2, dec2) -> float:
    """Position angle of point 2 seen from point 1, degrees East of North, in [0, 360)."""
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    y = np.sin(r2 - r1) * np.cos(d2)
    x = np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(r2 - r1)
    return float(np.degrees(np.arctan2(y, x)) % 360.0)


def scale_arcsec(wcs: WCS) -> float:
    """Pixel scale at the reference point, arcsec/px (geometric mean of the two axes)."""
    return float(math.sqrt(abs(np.linalg.det(wcs.celestial.pixel_scale_matrix))) * 3600.0)


def format_ra(ra: float) -> str:
    """Degrees -> 'HH:MM:SS.ss'."""
    s = round((ra % 360.0) / 15.0 * 3600.0, 2) % 86400.0
    h, rem = divmod(s, 3600.0)
    m, sec = divmod(rem, 60.0)
    return f"{int(h):02d}:{int(m):02d}:{sec:05.2f}"


def format_dec(dec: float) -> str:
    """Degrees -> '+DD:MM:SS.s'."""
    s = round(abs(dec) * 3600.0, 1)
    d, rem = divmod(s, 3600.0)
    m, sec = divmod(rem, 60.0)
    return f"{'-' if dec < 0 else '+'}{int(d):02d}:{int(m):02d}:{sec:04.1f}"


def describe(wcs: WCS, shape: tuple[int, int]) -> dict:
    """Where a (H, W) grid with this WCS points, for people: centre RA/Dec (deg and sexagesimal), field width and
    height (deg, across the middle of the image, edge to edge), scale (arcsec/px), rotation_deg (position angle
    of the image's +y axis, East of North, [0, 360); see the module docstring) and parity."""
    h, w = (int(v) for v in shape)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    xs = np.array([cx, -0.5, w - 0.5, cx, cx, cx])
    ys = np.array([cy, cy, cy, -0.5, h - 0.5, cy + 1.0])
    ra, dec = (np.asarray(v, np.float64) for v in wcs.celestial.pixel_to_world_values(xs, ys))
    det = float(np.linalg.det(wcs.celestial.pixel_scale_matrix))
    return {
        "ra": float(ra[0]), "dec": float(dec[0]),
        "ra_hms": format_ra(float(ra[0])), "dec_dms": format_dec(float(dec[0])),
        "width_deg": separation_deg(ra[1], dec[1], ra[2], dec[2]),
        "height_deg": separation_deg(ra[3], dec[3], ra[4], dec[4]),
        "scale_arcsec": scale_arcsec(wcs),
        "rotation_deg": _position_angle(ra[0], dec[0], ra[5], dec[5]),
        "parity": "normal" if det < 0 else "flipped",
    }


# ---------------------------------------------------------------------------------------------- solving


def _default_config(exe: str) -> Path | None:
    """The astrometry.cfg solve-field reads when given none (Debian: /etc/astrometry.cfg)."""
    prefix = Path(exe).resolve().parent.parent
    for p in (Path("/etc/astrometry.cfg"), prefix / "etc" / "astrometry.cfg"):
        if p.is_file():
            return p
    return None


def _config_index_dirs(cfg: Path) -> list[Path]:
    dirs = []
    try:
        for line in cfg.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) == 2 and words[0] == "add_path":
                dirs.append(Path(words[1]))
    except OSError:
        return []
    return dirs


def index_scales(dirs: list[Path]) -> list[tuple[str, float, float]]:
    """(file name, smallest, largest quad diameter in arcmin) of each astrometry.net index file in ``dirs``,
    from the SCALE_L / SCALE_U cards (radians) of its primary header (~1 ms a file)."""
    out = []
    for d in dirs:
        try:
            files = sorted(d.glob("*.fits"))
        except OSError:
            continue
        for f in files:
            try:
                hdr = fits.getheader(f, 0)
            except (OSError, ValueError):
                continue
            lo, hi = _num(hdr.get("SCALE_L")), _num(hdr.get("SCALE_U"))
            if lo is not None and hi is not None:
                out.append((f.name, math.degrees(lo) * 60.0, math.degrees(hi) * 60.0))
    return out


def _coverage_error(indexes, shape, hints: Hints, where: str, *, own: bool = False) -> str | None:
    """Why no index in ``indexes`` can solve this field, or None.  astrometry.net tries quads from 0.1 × the
    shorter side (at the lowest scale) to the diagonal (at the highest).  ``own``: ``where`` is the user's
    [solve] index_dir."""
    if not indexes and own:
        # (not "or set [solve] index_dir": it is set, to this folder)
        return (f"no astrometry.net index files in {where} ([solve] index_dir): put index-*.fits files there, or "
                "leave index_dir out to use those of solve-field's own configuration")
    if not indexes:
        return (f"no astrometry.net index files in {where}: install astrometry-data-tycho2-10-19-littleendian "
                "(fields over 1°) and -07/-08/-09 (fields of 0.4°-1°), or set [solve] index_dir")
    if not hints.has_scale:
        return None
    h, w = shape
    qlo = 0.1 * min(h, w) * hints.scale_low / 60.0
    qhi = math.hypot(h, w) * hints.scale_high / 60.0
    if any(hi >= qlo and lo <= qhi for _, lo, hi in indexes):
        return None
    mid = math.sqrt(hints.scale_low * hints.scale_high) / 60.0
    field = f"{w * mid:.0f}′×{h * mid:.0f}′"
    pkgs = [name for name, lo, hi in TYCHO2_PACKAGES if hi >= qlo and lo <= qhi]
    if pkgs:
        return f"no index covers a {field} field in {where}: install {' or '.join(pkgs)} or set [solve] index_dir"
    return (f"no index covers a {field} field in {where}: Debian's Tycho-2 indexes start at 22′ quads; set "
            "[solve] index_dir to a directory of 4200-series (2MASS) index files")


def _write_xylist(path: Path, xy: np.ndarray, flux: np.ndarray) -> None:
    # FITS pixel convention: 1-based (module docstring)
    Table({"X": xy[:, 0] + 1.0, "Y": xy[:, 1] + 1.0, "FLUX": flux}).write(path, format="fits", overwrite=True)


def _read_wcs(path: Path, shape: tuple[int, int]) -> WCS:
    with quiet_warnings():     # FITSFixedWarning: the .wcs header has NAXIS = 0
        wcs = WCS(fits.getheader(path, 0))
    wcs.pixel_shape = (shape[1], shape[0])
    return wcs


def _check_solution(wcs: WCS, corr_path: Path, hints: Hints, params: SolveParams,
                    star_px: float = 1.0) -> tuple[int, float, float]:
    """(matched, rms grid px, scale) of a solve-field solution, or SolveError('solution rejected: …').
    ``star_px``: grid pixels per pixel the stars were measured on (see solve_stars)."""
    scale = scale_arcsec(wcs)
    if not math.isfinite(scale) or not np.all(np.isfinite(wcs.wcs.crval)):
        raise SolveError("solution rejected: the solver wrote a WCS with non-finite values")
    try:
        corr = fits.getdata(corr_path, 1)      # not Table.read: its 'pixels' units warn
        ra, dec = np.asarray(corr["index_ra"], np.float64), np.asarray(corr["index_dec"], np.float64)
        fxy = np.column_stack([corr["field_x"], corr["field_y"]]).astype(np.float64) - 1.0   # back to 0-based
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise SolveError(f"solution rejected: no readable star matches from the solver ({err})") from err
    n = len(ra)
    if n < MIN_MATCHES:
        raise SolveError(f"solution rejected: only {n} stars matched the catalogue (need {MIN_MATCHES})")
    with quiet_warnings():     # all_world2pix warns if its iteration does not converge
        pix = np.column_stack(wcs.all_world2pix(ra, dec, 0))
    d = np.hypot(*(pix - fxy).T)
    rms = float(np.sqrt(np.mean(d ** 2))) if np.all(np.isfinite(d)) else math.inf
    # judged in the pixels the stars were measured on: a 2× drizzle grid doubles every residual of the same
    # stars, and refused the solution of a frame (KStars ASI1600, 0.64 px) that its sensor grid accepts
    if not rms / star_px <= params.max_rms_px:
        raise SolveError(f"solution rejected: star positions disagree with the catalogue by {rms / star_px:.2f} px "
                         f"RMS (> {params.max_rms_px:g} px)")
    if hints.has_scale and not hints.scale_low * 0.999 <= scale <= hints.scale_high * 1.001:
        raise SolveError(f"solution rejected: scale {scale:.3f}″/px is outside the hint "
                         f"{hints.scale_low:.3f}-{hints.scale_high:.3f}″/px")
    return n, rms, scale


def solve_stars(xy: np.ndarray, flux: np.ndarray, shape: tuple[int, int], hints: Hints, params: SolveParams, *,
                workdir: Path | None = None, cancel=None, star_px: float = 1.0) -> Solution:
    """Plate-solve a star list with astrometry.net's ``solve-field`` and return a checked solution.

    xy:    (N, 2) star positions (x = column, y = row, 0-based, pixel centres at integers) on a grid of
           ``shape`` (H, W); flux: (N,) for ordering (the ``params.max_stars`` brightest are used).
    hints: pointing (searched within ``params.radius_deg``) and scale range, each optional (blind otherwise).
    workdir: where solve-field's files go (kept); None: a temporary directory, removed afterwards.
    cancel: a threading.Event: once set, the solver is killed at once (SolveError "cancelled").
    star_px: grid pixels per pixel the stars were measured on (2 on a 2× drizzle grid, whose stars are the
           sensor's): ``params.max_rms_px`` is in those.

    The solution is checked before it is returned: at least 8 field/index star pairs from solve-field's .corr,
    their RMS distance through the returned WCS ≤ ``params.max_rms_px``, and the scale inside the hint's range.
    Raises SolveError with one actionable sentence: disabled, too few stars, solve-field missing, no index for
    this field size, no solution, no solution within the time limit, or solution rejected.  Inputs unchanged."""
    if not params.enabled:
        raise SolveError("plate solving is disabled ([solve] enabled = false)", final=True)
    xy = np.asarray(xy, np.float64)
    flux = np.asarray(flux, np.float64)
    h, w = (int(v) for v in shape)
    if xy.ndim != 2 or xy.shape[1] != 2 or flux.shape != (len(xy),):
        raise ValueError(f"xy must be (N, 2) and flux (N,), got {xy.shape} and {flux.shape}")
    ok = np.all(np.isfinite(xy), axis=1) & np.isfinite(flux)
    ok &= (xy[:, 0] > -0.5) & (xy[:, 0] < w - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < h - 0.5)
    xy, flux = xy[ok], flux[ok]
    if len(xy) < MIN_MATCHES:
        raise SolveError(f"only {len(xy)} stars found: plate solving needs at least {MIN_MATCHES} "
                         "(longer exposure, or clearer sky)")
    order = np.argsort(-flux, kind="stable")[:params.max_stars]
    xy, flux = xy[order], flux[order]

    exe = shutil.which("solve-field")
    if exe is None:
        raise SolveError("solve-field not found: install Debian's astrometry.net and "
                         "astrometry-data-tycho2-10-19-littleendian (apt install astrometry.net "
                         "astrometry-data-tycho2-10-19-littleendian)", final=True)
    if params.index_dir is not None:
        if not Path(params.index_dir).is_dir():
            raise SolveError(f"[solve] index_dir {params.index_dir}: no such folder (without index_dir, the index "
                             "files of solve-field's own configuration are used)", final=True)
        dirs, where = [Path(params.index_dir)], str(params.index_dir)
    else:
        cfg = _default_config(exe)
        dirs = _config_index_dirs(cfg) if cfg is not None else []
        where = f"{', '.join(map(str, dirs)) or 'no add_path'} (from {cfg})"
    uncovered = None
    if dirs or params.index_dir is not None:      # no config found: let solve-field decide
        indexes = index_scales(dirs)
        uncovered = _coverage_error(indexes, (h, w), hints, where, own=params.index_dir is not None)
        if uncovered and not (indexes and hints.has_scale):
            raise SolveError(uncovered, final=True)
        # else only the scale hint's field size has no index: the hint may be wrong (below), tried without it

    remove_dead_solve_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{SOLVE_DIR_PREFIX}{os.getpid()}-") as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        xyls = out / "stars.xyls"
        _write_xylist(xyls, xy, flux)
        for stale in ("stars.wcs", "stars.corr"):
            (out / stale).unlink(missing_ok=True)
        cmd = [exe, str(xyls), "--width", str(w), "--height", str(h),
               "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
               "--no-plots", "--overwrite", "--dir", str(out), "--crpix-center",
               "--new-fits", "none", "--index-xyls", "none", "--rdls", "none", "--match", "none"]
        # --no-verify is not given: it concerns WCS headers of FITS *images*; an xylist has none.
        # The SIP order stays solve-field's default (2): order 1 and 3 fitted the PANOPTES frame equally well.
        if params.index_dir is not None:
            backend = out / "backend.cfg"
            backend.write_text(f"add_path {Path(params.index_dir).resolve()}\nautoindex\n")
            cmd += ["--config", str(backend)]
        scale = []
        if hints.has_scale:
            scale = ["--scale-units", "arcsecperpix",
                     "--scale-low", f"{hints.scale_low:.6g}", "--scale-high", f"{hints.scale_high:.6g}"]
        near = []
        if hints.has_pointing:
            near = ["--ra", f"{hints.ra:.6f}", "--dec", f"{hints.dec:.6f}", "--radius", f"{params.radius_deg:g}"]

        # A pointing hint that is wrong (a mount not synced, another target's RA/DEC left in the capture
        # program) confines solve-field to the wrong 5° of sky: the field that solves in 0.9 s without it
        # failed in 0.5 s with it (Seestar M94, RA hint 30° off).  Such a miss is solved once more without the
        # pointing — with the scale hint, in what is left of the time limit.  So is a wrong scale hint (a focal
        # reducer or a Barlow the capture program's FOCALLEN does not know, a binning counted twice): the Seestar
        # frame with FOCALLEN 400 mm instead of 250 failed in 1.2 s, and solves in 0.7 s near its pointing
        # without the scale.  Only near a pointing, and for at most a quarter of the time limit: every real frame
        # here solves so in under 1 s (Seestar, KStars ASI1600, PANOPTES, Kocab), while a field that does not
        # (random stars; a narrow field no index covers) searches on for the whole limit, as does one of the whole
        # sky at every scale.  A scale hint whose field size no index covers is only tried without it.
        tries = [(scale, near), (scale, [])] if near else [(scale, [])]
        if scale and near:
            tries = [t for t in tries if not uncovered] + [([], near)]
        elif uncovered:
            raise SolveError(uncovered, final=True)
        t0 = time.perf_counter()
        for attempt, (scaled, pointed) in enumerate(tries):
            left = params.timeout_s - (time.perf_counter() - t0)
            capped = bool(scale) and not scaled
            if capped:
                left = min(left, params.timeout_s / 4)
            (out / "stars.wcs").unlink(missing_ok=True)
            log = _run(cmd + scaled + pointed + ["--cpulimit", str(max(1, math.ceil(left)))], timeout=left + 1.0,
                       cancel=cancel)
            if cancel is not None and cancel.is_set():
                raise SolveError("plate solve cancelled")
            if log is None or (out / "stars.wcs").is_file() or time.perf_counter() - t0 >= params.timeout_s:
                break
        seconds = time.perf_counter() - t0
        wcs_path = out / "stars.wcs"
        tried = tries[:attempt + 1]
        where = "" if not near else (f" near the header's pointing (RA {hints.ra:.2f}°, Dec {hints.dec:+.2f}°)"
                                     + (" nor elsewhere" if any(not pt for _, pt in tried) else ""))
        # the scale hint is worth checking while every try had it
        suspect = hints.has_scale and all(sc for sc, _ in tried)
        if uncovered and not wcs_path.is_file():
            raise SolveError(uncovered)
        # (the last try without the scale hint had but its share of the time: its end is no time-out)
        if not capped and (log is None or (not wcs_path.is_file() and seconds >= 0.9 * params.timeout_s)):
            raise SolveError(f"no solution{where} within {params.timeout_s:g} s: "
                             + ("check the scale hint or give a longer timeout ([solve] timeout_s)" if suspect
                                else "give a longer timeout ([solve] timeout_s)" if hints.has_scale
                                else f"{hints.scale_advice} or a longer timeout"))
        if not wcs_path.is_file():
            tail = _last_error_line(log) if log is not None else None
            raise SolveError(f"no solution: the {len(xy)} stars match no catalogue pattern{where}"
                             + (", nor without the scale hint" if hints.has_scale and not suspect else "")
                             + (f" ({tail})" if tail else "")
                             + ("; check the scale hint, or try a frame with more stars" if suspect
                                else "; try a frame with more stars" if hints.has_scale
                                else f"; {hints.scale_advice}, or try a frame with more stars"))
        scaled, pointed = tries[attempt]
        wcs = _read_wcs(wcs_path, (h, w))
        matched, rms, scale_found = _check_solution(wcs, out / "stars.corr",
                                                    hints if scaled else Hints(hints.ra, hints.dec), params, star_px)
    notes = []
    if near and not pointed:
        ra, dec = (float(v) for v in wcs.celestial.pixel_to_world_values((w - 1) / 2.0, (h - 1) / 2.0))
        notes.append(f"the header's pointing (RA {hints.ra:.2f}°, Dec {hints.dec:+.2f}°) is "
                     f"{separation_deg(ra, dec, hints.ra, hints.dec):.1f}° from the solved field: solved without it")
    if hints.has_scale and not scaled:
        hinted = (hints.scale_low + hints.scale_high) / 2
        source = ("[solve] scale_arcsec" if params.scale_arcsec is not None
                  else "FOCALLEN and the pixel size in the header")
        notes.append(f"the scale hint {hinted:.2f}″/px (from {source}) is not the solved {scale_found:.2f}″/px "
                     f"({scale_found / hinted:.2f}×): solved without it")
    note = "; ".join(notes)
    return Solution(wcs, seconds, matched, rms, scale_found, note)


# A solve's scratch folder in the temporary folder: "livestack-solve-<pid>-<random>", so that one left by a process
# killed mid-solve (kill -9, a power cut before /tmp is cleared) is known by its owner being gone.
SOLVE_DIR_PREFIX = "livestack-solve-"
_SOLVE_DIR = re.compile(re.escape(SOLVE_DIR_PREFIX) + r"(?P<pid>\d+)-.+")


def remove_dead_solve_dirs(root: Path | str | None = None) -> list[Path]:
    """Remove the scratch folders of solves whose process no longer runs (this user's only), from ``root`` (the
    temporary folder by default).  -> the folders removed.  A few kB each, but one per kill: a daemon restarted
    by systemd after every crash would leave them for as long as /tmp lives (on a Pi: until the next boot)."""
    root = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        m = _SOLVE_DIR.fullmatch(e.name)
        if m is None or _alive(int(m["pid"])):
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts: kill(0) is refused to it, not missing)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _run(cmd: list[str], *, timeout: float, cancel=None) -> str | None:
    """Run ``cmd`` in its own process group; its stdout + stderr, or None when it ran past ``timeout`` seconds or
    ``cancel`` (a threading.Event) was set (then the whole group — solve-field and the astrometry-engine it
    starts — is killed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", start_new_session=True)
    end = time.monotonic() + timeout
    chunks: list[str] = []
    while True:
        try:
            out, _ = proc.communicate(timeout=0.2)
            return "".join(chunks) + (out or "")
        except subprocess.TimeoutExpired:
            if time.monotonic() < end and not (cancel is not None and cancel.is_set()):
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return None


def _last_error_line(log: str) -> str | None:
    for line in reversed(log.splitlines()):
        if "error" in line.lower():
            return line.strip()[:200]
    return None


# ---------------------------------------------------------------------------------------------- WCS helpers


def header_wcs(header: Mapping, shape: tuple[int, int]) -> WCS | None:
    """A frame's own celestial WCS, when its header has a usable one, else None.

    Accepted: TAN with CD, or CDELT (+ CROTA2 or PC), with SIP when A_ORDER is present — also when CTYPE lacks
    the '-SIP' suffix (astrometry.net solutions copied by other programs; the suffix is added here rather than
    left to astropy's warning).  Checked: finite, scale in [0.1, 1000]″/px, the image centre maps to a finite
    position, and NAXIS1/NAXIS2 (when present) equal ``shape`` (H, W).  No warning escapes.
    The WCS is for the pixels as read.py delivers them: rows of a ROWORDER = 'BOTTOM-UP' file are flipped there,
    so its WCS is flipped here.  (Kocab.fits, written by PixInsight with ROWORDER = 'TOP-DOWN', carries a WCS that
    is mirrored in y against its stored rows — a plate solve of its stars says so; it is returned as written.)"""
    try:
        hdr = header.copy() if isinstance(header, fits.Header) else fits.Header(dict(header))
    except (ValueError, TypeError, KeyError):
        return None
    h, w = (int(v) for v in shape)
    n1, n2 = _num(hdr.get("NAXIS1")), _num(hdr.get("NAXIS2"))
    if n1 is not None and n2 is not None and (n1, n2) != (w, h) and int(_num(hdr.get("NAXIS")) or 2) == 2:
        return None
    cards = [k for k in hdr if re.fullmatch(r"(CRVAL|CRPIX|CDELT|CROTA)[12]|(CD|PC)[12]_[12]", k)]
    if any(_num(hdr[k]) is None for k in cards):
        return None     # astropy would skip the bad card and use a default in its place
    c1, c2 = str(hdr.get("CTYPE1", "")).strip().upper(), str(hdr.get("CTYPE2", "")).strip().upper()
    if not (c1.startswith("RA---TAN") and c2.startswith("DEC--TAN")):
        return None
    if "CRVAL1" not in hdr or "CRVAL2" not in hdr:
        return None     # astropy would place the field at RA 0, Dec 0
    # TAN's native reference point is its pole (PV1_1 = 0, PV1_2 = 90).  Kocab.fits (PixInsight via KStars)
    # says PV1_2 = 0, which wcslib obeys: the field would land 90° away from CRVAL.  TAN takes no other PV1_m.
    for key in [k for k in hdr if re.fullmatch(r"PV1_[0-4]", k)]:
        del hdr[key]
    if "A_ORDER" in hdr and "B_ORDER" in hdr:
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    else:
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    try:
        with quiet_warnings():   # FITSFixedWarning (RADECSYS, DATE-OBS, NAXIS …) and the like
            wcs = WCS(hdr, naxis=2)
            if not wcs.has_celestial:
                return None
            scale = scale_arcsec(wcs)
            centre = wcs.all_pix2world([[(w - 1) / 2.0, (h - 1) / 2.0]], 0)
    except Exception:   # noqa: BLE001 — astropy raises a zoo of types (ValueError, InvalidTransformError, SingularMatrix…)
        return None
    if not (np.all(np.isfinite(wcs.wcs.crval)) and np.all(np.isfinite(wcs.wcs.crpix))
            and math.isfinite(scale) and 0.1 <= scale <= 1000 and np.all(np.isfinite(centre))):
        return None
    wcs.pixel_shape = (w, h)
    if str(hdr.get("ROWORDER", "TOP-DOWN")).strip().upper() == "BOTTOM-UP":
        # read.py flips such files so that row 0 is the top: the WCS, which counts the rows as stored, follows
        wcs = _diagonal_affine(wcs, 1.0, -1.0, 0.0, h - 1.0)
    return wcs


def wcs_to_grid(wcs: WCS, sensor_to_grid: np.ndarray) -> WCS:
    """The same sky mapping expressed on another pixel grid.

    ``sensor_to_grid`` is the (2, 3) affine matrix from 0-based sensor pixels to 0-based grid pixels; only a
    positive scale per axis plus a shift is supported (identity, superpixel [[0.5, 0, -0.25], [0, 0.5, -0.25]],
    drizzle [[2, 0, 0.5], [0, 2, 0.5]]): ValueError otherwise, and for distortions other than SIP.
    SIP coefficients A_pq (and AP_pq) scale as sx^(1-p) sy^(-q), B_pq (BP_pq) as sx^(-p) sy^(1-q) — for equal
    scales s, coef × s^(1-p-q).  Returns a new WCS; ``wcs`` is unchanged."""
    m = np.asarray(sensor_to_grid, np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise ValueError(f"sensor_to_grid must be a finite (2, 3) matrix, got shape {m.shape}")
    if m[0, 1] != 0 or m[1, 0] != 0 or not (m[0, 0] > 0 and m[1, 1] > 0):
        raise ValueError(f"sensor_to_grid {m.tolist()}: only a positive scale plus shift is supported")
    return _diagonal_affine(wcs, m[0, 0], m[1, 1], m[0, 2], m[1, 2])


def _diagonal_affine(wcs: WCS, sx: float, sy: float, tx: float, ty: float) -> WCS:
    """``wcs`` on the grid g = (sx x + tx, sy y + ty) of its 0-based pixels; sx, sy nonzero (negative: a flip)."""
    if wcs.cpdis1 is not None or wcs.cpdis2 is not None or wcs.det2im1 is not None or wcs.det2im2 is not None:
        raise ValueError("only SIP distortion is supported, this WCS has lookup-table distortions")
    old = wcs.wcs
    s = np.array([sx, sy])
    # FITS 1-based: G = s (P - 1) + t + 1, so CRPIX moves to s CRPIX + t + 1 - s
    crpix = s * old.crpix + (np.array([tx, ty]) + 1.0 - s)
    new = WCS(naxis=2)
    new.wcs.ctype = [c if c.endswith("-SIP") or wcs.sip is None else c + "-SIP" for c in old.ctype]
    new.wcs.crval = old.crval
    new.wcs.cunit = old.cunit
    new.wcs.cd = wcs.pixel_scale_matrix / s[np.newaxis, :]
    new.wcs.crpix = crpix
    for attr in ("lonpole", "latpole", "equinox"):
        v = getattr(old, attr)
        if v is not None and np.isfinite(v):
            setattr(new.wcs, attr, v)
    if old.radesys:
        new.wcs.radesys = old.radesys
    if wcs.sip is not None:
        new.sip = Sip(*(_scale_sip(c, sx, sy, axis) for c, axis in
                        ((wcs.sip.a, 0), (wcs.sip.b, 1), (wcs.sip.ap, 0), (wcs.sip.bp, 1))), crpix)
    new.wcs.set()
    if wcs.pixel_shape is not None:
        nx, ny = wcs.pixel_shape
        new.pixel_shape = (max(1, round(nx * abs(sx))), max(1, round(ny * abs(sy))))
    return new


def _scale_sip(c: np.ndarray | None, sx: float, sy: float, axis: int) -> np.ndarray | None:
    """SIP coefficient matrix c[p, q] (of u^p v^q) for pixel offsets scaled by (sx, sy): the polynomial gives an
    offset along ``axis`` (0: u, 1: v), which scales with that axis."""
    if c is None:
        return None
    p, q = np.indices(c.shape)
    return c * (float(sx) ** -p.astype(float)) * (float(sy) ** -q.astype(float)) * (sx if axis == 0 else sy)


_TIME_KEYS = re.compile(r"^(DATE|MJD|TSTART|TSTOP|TIMESYS|TIMEUNIT|OBSGEO|OBS-)")


def pixel_transform(wcs_from: WCS, wcs_to: WCS, shape: tuple[int, int], to_from_pixels: np.ndarray) -> np.ndarray:
    """The (2, 3) affine map from pixels of a grid of ``shape`` (H, W) to the pixels of ``wcs_to``, through the
    sky: a grid pixel goes to ``wcs_from``'s pixels by ``to_from_pixels`` ((2, 3), e.g. grid -> sensor), to the
    sky by ``wcs_from``, back to pixels by ``wcs_to``.  Fitted on a 5×5 lattice (an affine is exact for two TAN
    projections of nearby centres to well under a pixel over a frame).  Raises ValueError when the sky
    positions do not map back (a WCS of another part of the sky)."""
    from . import geometry

    h, w = shape
    ys, xs = np.meshgrid(np.linspace(0, h - 1, 5), np.linspace(0, w - 1, 5), indexing="ij")
    grid_xy = np.column_stack([xs.ravel(), ys.ravel()])
    src = geometry.apply(to_from_pixels, grid_xy)
    with quiet_warnings():
        ra, dec = wcs_from.all_pix2world(src[:, 0], src[:, 1], 0)
        x, y = wcs_to.all_world2pix(ra, dec, 0)
    dst = np.column_stack([x, y])
    if not np.all(np.isfinite(dst)):
        raise ValueError("the two WCSs do not map onto each other")
    return geometry.fit_affine(grid_xy, dst)


def wcs_header(wcs: WCS) -> fits.Header:
    """The WCS cards for an output FITS header: TAN or TAN-SIP (with '-SIP' CTYPEs and A/B/AP/BP cards).
    Time and observatory cards astropy adds (DATE-OBS, MJDREF, …) are left out: they belong to the frame."""
    with quiet_warnings():
        hdr = wcs.to_header(relax=True)
    for key in [k for k in hdr if _TIME_KEYS.match(k)]:
        del hdr[key]
    return hdr


def wcs_to_text(wcs: WCS) -> str:
    """A WCS as newline-separated FITS cards, for a JSON checkpoint (wcs_from_header_text reads it back)."""
    return wcs_header(wcs).tostring(sep="\n", endcard=False, padding=False)


def wcs_from_header_text(text: str) -> WCS:
    """The inverse of wcs_to_text().  Raises ValueError for text that holds no celestial WCS."""
    try:
        hdr = fits.Header.fromstring(text, sep="\n")
        with quiet_warnings():
            wcs = WCS(hdr)
    except Exception as err:
        raise ValueError(f"unreadable WCS text ({err})") from err
    if not wcs.has_celestial:
        raise ValueError("the text holds no celestial WCS")
    return wcs


# ---------------------------------------------------------------------------------------------- catalogue


def catalogue_name(name: str, identifiers=None) -> str:
    """OpenNGC 'NGC4736' with Messier id 'M094' -> 'M 94'; 'NGC0224' -> 'NGC 224'; 'IC0342' -> 'IC 342'."""
    messier = identifiers[0] if identifiers else None
    for n in (messier, name):
        if n:
            m = re.match(r"^([A-Za-z]+)0*(\d+)(.*)$", str(n).strip())
            if m:
                return f"{m.group(1)} {m.group(2)}{m.group(3)}".strip()
    return str(name)


def nearest_object(ra: float, dec: float, *, radius_deg: float) -> str | None:
    """Name of the OpenNGC object nearest to (ra, dec) degrees within ``radius_deg`` (at most 10°): its Messier
    name ('M 94') when it has one, else its NGC/IC name ('NGC 4736').  None when there is none, or when pyongc
    is missing or fails (a name is a nicety, never a reason to fail).  ~10 ms (pyongc queries SQLite)."""
    if not (math.isfinite(ra) and math.isfinite(dec) and -90 <= dec <= 90 and radius_deg > 0):
        return None
    try:
        from pyongc import ongc
        found = ongc.nearby(f"{format_ra(ra)} {format_dec(dec)}", separation=min(radius_deg, 10.0) * 60.0)
        for obj, _sep in found:
            if obj.type in ("Duplicated record", "Nonexistent object"):
                continue
            return catalogue_name(obj.name, obj.identifiers)
    except Exception:   # noqa: BLE001 — pyongc raises ValueError/sqlite3 errors/…: a missing name is not worth a failure
        return None
    return None
