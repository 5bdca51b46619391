"""Calibration master library: folder of bias/dark/flat/dark-flat frames -> master FITS + masters.json, and
the choice of masters for each light (``MasterLibrary.select(frame) -> Masters``).

Build, in the order the masters depend on each other (bias, darks, dark-flats, flats):

    discover  files -> kind, from the nearest folder name (bias/, darks/, flats/, darkflats/, …) or FITS IMAGETYP
    ingest    read_frame() each file once; group by camera, size, CFA pattern, ISO/gain, exposure (darks,
              dark-flats), temperature bin (darks), filter (flats); append the pixels to the group's spill file
    combine   block of rows of every frame of the group -> sigma-clipped mean or median -> master rows
    write     master FITS (float32, provenance headers, BADPIX table) + masters.json

Why a spill file: a RAW frame can only be decoded whole, so reading "block k of every frame" from the original
files would decode each RAW once per block.  Each frame is decoded exactly once and its pixels appended to a
flat scratch file in the output folder (uint16 when the data are integers in 0..65535, as every RAW and most
camera FITS are; float32 otherwise).  The combine then reads one band of rows of all frames at a time (one
seek + read per frame and band): working memory is ``memory_mb``, whatever the number of frames; disk use is
N × H × W × 2 bytes for the largest group (50 × 24 MP: 2.4 GB).  The scratch lives beside the masters, not in
/tmp, which is RAM (tmpfs) on a Raspberry Pi.

Flats: each flat minus the matching master dark-flat (else bias, else dark of the flat's exposure, else the
frame's black level), divided by its own mean per CFA colour (so colour balance is kept), combined, then
normalised per colour to mean 1; values below ``flat_min`` are clamped and marked bad.  The per-frame means are
those of the raw flat minus those of the subtracted master (subtraction is linear), so no extra pass is needed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from . import __version__
from .engine.calibrate import Masters, same_exposure
from .engine.filtername import filter_key
from .engine.frame import Frame, FrameError
from .engine.quiet import quiet_warnings
from .engine.read import (FITS_SUFFIXES, _IMAGETYP, _decoder_errors, _fits_reason, capture_order, fits_impossible,
                          is_supported, read_frame, suffix_of)

log = logging.getLogger("livestack")

KINDS = ("bias", "dark", "darkflat", "flat")          # build order: each may need the ones before it
KIND_LABEL = {"bias": "bias", "dark": "dark", "darkflat": "dark-flat", "flat": "flat"}
IMAGETYP_OUT = {"bias": "Master Bias", "dark": "Master Dark", "darkflat": "Master Dark Flat",
                "flat": "Master Flat"}
INDEX = "masters.json"

# Folder names, compared on their letters only ("Dark_Flats 2s" -> "darkflatss"), longest first so that
# "darkflats" is not taken for "dark".
_FOLDER_KINDS = (
    ("flatdark", "darkflat"), ("darkflat", "darkflat"), ("dflat", "darkflat"), ("biasflat", "darkflat"),
    ("flatfield", "flat"), ("bias", "bias"), ("offset", "bias"), ("zero", "bias"), ("dark", "dark"),
    ("flat", "flat"), ("light", "light"), ("object", "light"), ("science", "light"),
)


class MasterError(ValueError):
    """A master library that cannot be built or loaded: one sentence naming the folder or file."""


@dataclass(frozen=True, slots=True)
class CalibrationParams:
    """The ``[calibration]`` section of livestack.toml."""

    method: str = "clipped"          # combine: "clipped" (sigma-clipped mean) | "median"
    kappa: float = 3.0               # clipping threshold, × the standard deviation of the other frames
    on_mismatch: str = "fail"        # master of the wrong size/camera/… for a light: "fail" it | "skip" the master
    temperature_bin: float = 2.0     # °C: a dark joins the group whose first dark is within bin / 2 of it
    temperature_tolerance: float = 3.0  # °C: a dark further than this from the light's temperature is refused
    flat_min: float = 0.05           # normalised flat below this: clamped and marked bad (corners, dead pixels)
    hot_sigma: float = 6.0           # hot pixel: master dark this many robust σ above its local median
    cold_ratio: float = 0.5          # cold pixel: master flat below this × its local median
    frame_sigma: float = 5.0         # a bias/dark/dark-flat whose median or noise is this many σ of its group's
                                     # spread from the group's median is left out (a light, a light leak)
    memory_mb: int = 256             # working memory of the combine (the block of rows of all frames)
    chunk_rows: int = 0              # rows per block; 0: from memory_mb

    def __post_init__(self):
        if self.method not in ("clipped", "median"):
            raise ValueError(f"calibration.method = {self.method!r}: must be 'clipped' or 'median'")
        if not 0 < self.kappa <= 100:
            raise ValueError(f"calibration.kappa = {self.kappa}: must be in (0, 100]")
        if self.on_mismatch not in ("fail", "skip"):
            raise ValueError(f"calibration.on_mismatch = {self.on_mismatch!r}: must be 'fail' or 'skip'")
        if self.temperature_bin <= 0 or self.temperature_tolerance < 0:
            raise ValueError(f"calibration: temperature_bin {self.temperature_bin} must be > 0 and "
                             f"temperature_tolerance {self.temperature_tolerance} ≥ 0")
        if not 0 < self.flat_min < 1 or not 0 < self.cold_ratio < 1:
            raise ValueError(f"calibration: flat_min {self.flat_min} and cold_ratio {self.cold_ratio} "
                             "must be in (0, 1)")
        if self.hot_sigma <= 0 or self.frame_sigma <= 0:
            raise ValueError(f"calibration: hot_sigma {self.hot_sigma} and frame_sigma {self.frame_sigma} "
                             "must be > 0")
        if self.memory_mb < 1 or self.chunk_rows < 0:
            raise ValueError(f"calibration: memory_mb {self.memory_mb} must be ≥ 1 and chunk_rows "
                             f"{self.chunk_rows} ≥ 0")


@dataclass(frozen=True, slots=True)
class MasterEntry:
    """One master of the library: one line of masters.json's "masters" list."""

    name: str                        # short name, used in frames.jsonl and the stack header
    file: str                        # FITS file name, relative to the library folder
    kind: str                        # bias | dark | darkflat | flat
    camera: str | None
    width: int
    height: int
    pattern: str | None              # CFA pattern of pixel (0, 0), None for mono
    iso: int | None
    gain: float | None
    exptime: float | None            # s
    temperature: float | None        # °C, mean of the frames
    filter: str | None
    ncombine: int
    method: str
    kappa: float | None
    sources: tuple[str, ...]         # source files, relative to the calibration folder
    bad_pixels: int = 0              # hot (darks) or cold/dead (flats) pixels in the BADPIX table
    subtracted: str | None = None    # flats: what was subtracted before normalising
    clipped: float | None = None     # fraction of the values rejected by the clipped mean
    offset: float | None = None      # the camera's offset setting (FITS OFFSET), when the frames say it
    binning: str | None = None       # "2x2" (FITS XBINNING × YBINNING), when the frames say it

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MasterEntry":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["sources"] = tuple(d.get("sources", ()))
        return cls(**d)

    def describe(self) -> str:
        return f"master {KIND_LABEL[self.kind]} {self.name}"


# ---------------------------------------------------------------- discovery

def kind_from_folder(name: str) -> str | None:
    """'Darks_60s' -> 'dark', 'flat-darks' -> 'darkflat', 'Offsets' -> 'bias', 'lights' -> 'light'; None when
    the name says nothing."""
    letters = "".join(re.findall(r"[a-z]+", name.lower()))
    for prefix, kind in _FOLDER_KINDS:
        if letters.startswith(prefix):
            return kind
    return None


# Words that follow the kind in a calibration or lights folder's name besides numbers and short units
# ("Darks_300s_gain100", "Flats Halpha bin2", "flat-darks"): its exposure, settings, filter.
_KIND_WORDS = frozenset(
    "gain offset temp bin binning iso sec secs mins exp exposure master masters frame frames field fields "
    "lum luma luminance red green blue clear halpha hbeta oiii dual".split())
# The first word of such a folder's name: a kind, plural or with "frames"/"field" run on.
_KIND_FIRST = re.compile(r"(?:flatdark|darkflat|dflat|biasflat|flat|dark|bias|offset|zero|light|object|science)"
                         r"(?:s|es|frames?|fields?)?")


def folder_kind(name: str) -> tuple[str | None, bool]:
    """(kind_from_folder(name), whether the name says only that): ("dark", True) for "Darks_300s_gain100",
    "DARK", "Flat-Darks"; ("dark", False) for a name that goes on with another word — a target's, "Dark Shark
    Nebula", "Darkhorse" — or a user's ("darks_canon"), which says less than a FITS file's IMAGETYP."""
    kind = kind_from_folder(name)
    if kind is None:
        return None, False
    # words: runs of letters, camel case split ("DarkFrames", "HDRFlats"); the first must be a kind as a
    # whole ("darks", "flatframes"), not a word that only begins like one ("Flatiron", "Darkhorse")
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)]
    sure = (bool(words) and _KIND_FIRST.fullmatch(words[0]) is not None
            and all(len(w) <= 3 or w in _KIND_WORDS or kind_from_folder(w) is not None for w in words[1:]))
    return kind, sure


def _read_index(root: Path) -> tuple[list["MasterEntry"], list[dict]]:
    """masters.json of ``root``: its masters and its skipped files.  Raises MasterError naming the file."""
    index = root / INDEX
    if not index.is_file():
        raise MasterError(f"{root}: no {INDEX} (build one with `livestack masters CALIB -o {root}`)")
    try:
        doc = json.loads(index.read_text())
        entries = [MasterEntry.from_dict(d) for d in doc["masters"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MasterError(f"{index}: not a master index ({err})") from err
    return entries, list(doc.get("skipped", []))


def _fits_imagetyp(path: Path) -> str | None:
    """Kind from a FITS header (no pixel decode): 'light', 'dark', … or None."""
    from astropy.io import fits

    if fits_impossible(path) is not None:     # astropy would walk onto the same header for ever (read_frame says why)
        return None
    try:
        with quiet_warnings():
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for h in hdul:
                    typ = h.header.get("IMAGETYP", h.header.get("FRAMETYP", h.header.get("OBSTYPE")))
                    if typ is not None:
                        return _kind_of_imagetyp(str(typ))
    except (OSError, ValueError, TypeError, IndexError, KeyError, fits.VerifyError,     # a garbled card
            *_decoder_errors()):                                                        # a damaged file
        return None
    return None


def _kind_of_imagetyp(typ: str) -> str:
    """'Dark Frame' -> 'dark', 'Master Dark' / 'MASTERFLAT' / 'master_dark_flat' (a master made by livestack or
    another program) -> its kind, 'Light Frame' -> 'light'; 'unknown:<typ>' for anything else."""
    low = typ.strip().lower()
    kind = _IMAGETYP.get(low)
    if kind is None and low.startswith("master"):
        kind = _IMAGETYP.get(re.sub(r"[\s_-]+", " ", low[6:]).strip())
    return kind or "unknown:" + typ.strip()


def _made_master(path: Path) -> bool:
    """True when a FITS calibration file says it is a master already (IMAGETYP 'Master …', NCOMBINE or Siril's
    STACKCNT above 1): made by another program or by livestack, from frames that had their bias or dark-flat
    taken off — a flat of these must not have it taken off again (no pixel decode)."""
    from astropy.io import fits

    if suffix_of(path) not in FITS_SUFFIXES or fits_impossible(path) is not None:
        return False
    try:
        with quiet_warnings():
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for h in hdul:
                    typ = str(h.header.get("IMAGETYP", "")).strip().lower()
                    if typ.startswith("master"):
                        return True
                    for key in ("NCOMBINE", "STACKCNT"):
                        n = h.header.get(key)
                        if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1:
                            return True
    except (OSError, ValueError, TypeError, IndexError, KeyError, fits.VerifyError, *_decoder_errors()):
        return False
    return False


def discover(calib_dir: Path, *, exclude: Path | None = None) -> tuple[dict[str, list[Path]], list[dict]]:
    """Calibration files under ``calib_dir`` (recursive), by kind, in capture order; and the files skipped,
    each {"file", "reason"}.  The nearest folder whose name says a kind wins over the FITS IMAGETYP."""
    calib_dir = Path(calib_dir)
    found: dict[str, list[Path]] = {k: [] for k in KINDS}
    skipped: list[dict] = []
    own: set[Path] = set()      # the library's masters, when it is CALIB itself (-o CALIB): no frames of a rebuild
    if exclude is not None:
        try:
            own = {(Path(exclude) / e.file).resolve() for e in _read_index(Path(exclude))[0]}
        except MasterError:
            pass
    for root, dirs, files in os.walk(calib_dir):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (rootp / d).resolve() != exclude.resolve()))
        for fname in sorted(files):
            p = rootp / fname
            if fname.startswith(".") or (own and p.resolve() in own):
                continue
            rel = p.relative_to(calib_dir)
            if not is_supported(p):
                if fname.lower().endswith(".xisf"):     # NINA's and PixInsight's other format: not passed over unsaid
                    skipped.append({"file": str(rel), "reason": "an XISF file: livestack reads FITS and camera RAW "
                                                                "files (have the capture program save FITS)"})
                continue
            # The nearest folder whose name says only a kind decides ("Darks_300s"); a name that goes on with
            # other words ("Dark Shark Nebula", a target's folder under Light/ as ASIAIR writes it) gives way to
            # a folder further up, then to the FITS IMAGETYP, and decides only when neither says anything
            kind = guess = None
            for part in reversed(rel.parts[:-1]):
                k, sure = folder_kind(part)
                if k and sure:
                    kind = k
                    break
                guess = guess or (k and (k, part))
            if kind is None and suffix_of(p) in FITS_SUFFIXES:
                typ = _fits_imagetyp(p)
                if typ in KINDS or typ == "light" or guess is None:
                    kind = typ
            light_why = "a light frame (folder name or IMAGETYP)"
            if kind is None and guess:
                kind = guess[0]
            elif kind == "light" and guess and guess[0] != "light":
                light_why = (f"a light frame (its {'folder ' + repr(part) if sure else 'IMAGETYP'} says so; the "
                             f"folder '{guess[1]}' reads as a target's name, not as {KIND_LABEL[guess[0]]} frames)")
            if kind in KINDS:
                found[kind].append(p)
            elif kind == "light":
                skipped.append({"file": str(rel), "reason": light_why})
            elif kind and kind.startswith("unknown:"):
                skipped.append({"file": str(rel), "reason": f"IMAGETYP '{kind[8:]}' is not a calibration frame"})
            else:
                skipped.append({"file": str(rel), "reason": "kind unknown: put it in a bias/, darks/, flats/ or "
                                                            "darkflats/ folder"})
    return {k: capture_order(v) for k, v in found.items()}, skipped


# ---------------------------------------------------------------- grouping

def _norm_camera(c: str | None) -> str | None:
    return " ".join(c.split()).lower() if c else None


def _exp_key(t: float | None) -> float | None:
    return None if t is None else float(f"{t:.4g}")


def _offset(m) -> float | None:
    """The camera's offset setting (FITS OFFSET: NINA, ASIAIR, INDI write it), None when not said.  Frames of
    another offset have another pedestal: a bias or dark of another offset leaves the lights' level wrong, and
    the flat division then turns that into a vignetting pattern."""
    v = m.extra.get("OFFSET")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _binning(m) -> str | None:
    """'2x2' from FITS XBINNING / YBINNING, None when the file says neither."""
    x, y = m.extra.get("XBINNING"), m.extra.get("YBINNING")
    if not isinstance(x, (int, float)) and not isinstance(y, (int, float)):
        return None
    x = x if isinstance(x, (int, float)) else y
    y = y if isinstance(y, (int, float)) else x
    try:
        return f"{int(x)}x{int(y)}"
    except (ValueError, OverflowError):     # a garbled card (NaN, inf): says nothing
        return None


def group_key(frame: Frame, kind: str, p: CalibrationParams) -> tuple:
    """What must be equal for two frames to go into one master of ``kind`` (darks: besides a temperature within
    ``temperature_bin`` / 2 of their group's first dark — see _dark_group)."""
    m = frame.meta
    key: tuple = (kind, _norm_camera(m.camera), frame.shape, frame.pattern, m.iso,
                  None if m.gain is None else round(m.gain, 3), _binning(m), _offset(m))
    if kind in ("dark", "darkflat"):
        key += (_exp_key(m.exptime),)
    if kind == "flat":
        key += (filter_key(m.filter) or None,)
    return key


def _dark_group(key: tuple, t: float | None, groups: dict, p: CalibrationParams) -> tuple:
    """The key of the group of darks a dark of ``key`` (group_key's) and sensor temperature ``t`` joins: the one
    whose first dark is nearest, within ``temperature_bin`` / 2, else a new one, keyed by its first temperature.
    Bins fixed at round(t / bin) put their edges at odd degrees: the darks of a camera cooled to −15 °C, read as
    −15.1, −15.0 and −14.9, were split across two bins into two masters of half the frames each."""
    near = [k for k in groups if k[:-1] == key and (k[-1] is None) == (t is None)
            and (t is None or abs(t - k[-1]) <= p.temperature_bin / 2)]
    if not near:
        return key + (t,)
    return min(near, key=lambda k: 0.0 if t is None else abs(t - k[-1]))


# ---------------------------------------------------------------- spill file

class Spill:
    """Frames of one group appended to one scratch file, read back as bands of rows of every frame.

    Stored as uint16 while every frame is integer-valued in 0..65535 (half the disk and I/O of float32), else
    float32 (the file is converted once when the first non-integer frame arrives)."""

    _BAND = 256  # rows converted at a time while appending: no full-frame temporary

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path, self.shape, self.n = Path(path), tuple(shape), 0
        self.dtype = np.dtype(np.uint16)
        self._f = open(self.path, "wb")
        self._r = None  # reader, opened once the last frame is in

    def append(self, data: np.ndarray) -> None:
        if data.shape != self.shape:
            raise ValueError(f"spill {self.path.name}: frame {data.shape} != {self.shape}")
        if self.dtype == np.uint16 and not _fits_uint16(data):
            self._promote()
        for r0 in range(0, data.shape[0], self._BAND):
            data[r0:r0 + self._BAND].astype(self.dtype).tofile(self._f)
        self.n += 1

    def _promote(self) -> None:
        self._f.close()
        tmp = self.path.with_name(self.path.name + ".f32")
        frame = self.shape[0] * self.shape[1]
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for _ in range(self.n):
                np.fromfile(src, np.uint16, frame).astype(np.float32).tofile(dst)
        os.replace(tmp, self.path)
        self.dtype = np.dtype(np.float32)
        self._f = open(self.path, "ab")

    def rows(self, r0: int, r1: int, frames=None) -> np.ndarray:
        """(n, r1 - r0, W) float32: rows r0..r1 of every frame, or of the frames whose indices ``frames`` lists
        (a new array).

        Read with one seek + read per frame rather than through np.memmap: the result is the same, but the
        pages of a mapping count in the process's RSS until unmapped, and 50 frames would show as gigabytes
        on a 4 GB Pi (reclaimable, but alarming and it pushes out other caches)."""
        if self._r is None:
            self._f.close()
            self._r = open(self.path, "rb")
        h, w = self.shape
        frames = range(self.n) if frames is None else frames
        out = np.empty((len(frames), r1 - r0, w), np.float32)
        count = (r1 - r0) * w
        for k, i in enumerate(frames):
            self._r.seek(((i * h) + r0) * w * self.dtype.itemsize)
            out[k] = np.fromfile(self._r, self.dtype, count).reshape(r1 - r0, w)
        return out

    def remove(self) -> None:
        self._f.close()
        if self._r is not None:
            self._r.close()
        self.path.unlink(missing_ok=True)


def _fits_uint16(data: np.ndarray) -> bool:
    for r0 in range(0, data.shape[0], 256):
        b = data[r0:r0 + 256]
        if b.min() < 0 or b.max() > 65535 or not np.array_equal(b, np.floor(b)):
            return False
    return True


# ---------------------------------------------------------------- combining

def combine_block(block: np.ndarray, method: str, kappa: float) -> tuple[np.ndarray, int]:
    """(N, R, W) float32 -> ((R, W) float32 combined, number of values clipped).  ``block`` is not modified.

    median: np.median over the frames.  clipped: a value is rejected when it lies more than ``kappa`` ×
    the standard deviation (ddof 1) *of the other N - 1 values* from the median of all N; the result is the
    mean of the values kept (the median where none is).  Leaving the value out of its own σ matters for small
    N: one cosmic-ray hit among 5 frames inflates the σ of all 5 so much that it is never more than 2 σ out.
    N ≤ 2 is a plain mean.  Memory: about 2 × the block (the median's partition copy and the deviations).
    """
    n = block.shape[0]
    if method == "median":
        return np.median(block, axis=0).astype(np.float32, copy=False), 0
    if n <= 2:
        return block.mean(axis=0, dtype=np.float64).astype(np.float32), 0
    med = np.median(block, axis=0)
    d = block - med                                      # (N, R, W) float32 deviations: small numbers, exact
    s1 = d.sum(axis=0, dtype=np.float64)
    s2 = np.zeros(med.shape, np.float64)
    for i in range(n):
        s2 += np.square(d[i], dtype=np.float64)
    total = np.zeros(med.shape, np.float64)
    count = np.zeros(med.shape, np.int32)
    no = n - 1
    k2 = kappa * kappa
    for i in range(n):
        di = d[i].astype(np.float64)
        mo = (s1 - di) / no                              # mean of the others
        var_o = np.maximum((s2 - di * di) - no * mo * mo, 0.0) / (no - 1)
        keep = di * di <= k2 * var_o
        total += np.where(keep, di, 0.0)
        count += keep
    out = np.where(count > 0, med + total / np.maximum(count, 1), med).astype(np.float32)
    return out, int(n * count.size - count.sum())


def _block_rows(n: int, width: int, p: CalibrationParams) -> int:
    """Rows per block, even (so that CFA rows keep their parity): the block of all n frames, with the
    combine's temporaries (~4 × the float32 block), fits in p.memory_mb."""
    if p.chunk_rows:
        rows = p.chunk_rows
    else:
        rows = int(p.memory_mb * 2**20 // max(1, 4 * n * width * 4))
    return max(2, rows - rows % 2)


def combine_spill(spill: Spill, p: CalibrationParams, *,
                  prepare: Callable[[np.ndarray, int, int], None] | None = None,
                  frames: list[int] | None = None) -> tuple[np.ndarray, int]:
    """Combine all frames of ``spill`` (or those whose indices ``frames`` lists) block by block into one (H, W)
    float32 master (allocated here).  ``prepare(block, r0, r1)`` may modify each (N, r1 - r0, W) block in place
    first (flats).  Returns (master, values clipped)."""
    h, w = spill.shape
    out = np.empty((h, w), np.float32)
    rows = _block_rows(spill.n if frames is None else len(frames), w, p)
    clipped = 0
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        block = spill.rows(r0, r1, frames)
        if prepare is not None:
            prepare(block, r0, r1)
        out[r0:r1], c = combine_block(block, p.method, p.kappa)
        clipped += c
        del block
    return out, clipped


# ---------------------------------------------------------------- per-colour helpers and bad pixels

def _sites(colour: bool):
    """(row offset, col offset) of each CFA position; one site for mono."""
    return [(i, j) for i in range(2) for j in range(2)] if colour else [(0, 0)]


def _site_slice(i: int, j: int, colour: bool):
    return (slice(i, None, 2), slice(j, None, 2)) if colour else (slice(None), slice(None))


def site_means(img: np.ndarray, colour: bool, *, mask: np.ndarray | None = None) -> np.ndarray:
    """(2, 2) float64 mean of each CFA position (mono: the same mean in all four); ``mask`` True = ignore."""
    out = np.empty((2, 2), np.float64)
    for i, j in _sites(colour):
        sl = _site_slice(i, j, colour)
        v = img[sl]
        if mask is not None:
            v = v[~mask[sl]]
        out[i, j] = float(v.mean(dtype=np.float64)) if v.size else float("nan")
    if not colour:
        out[:] = out[0, 0]
    return out


def hot_pixels_from_dark(dark: np.ndarray, colour: bool, sigma: float) -> np.ndarray:
    """(H, W) bool: pixels of a master dark more than ``sigma`` robust σ above the 5×5 median of their own
    CFA colour (a local median, so that amplifier glow and gradients are not taken for hot pixels)."""
    hot = np.zeros(dark.shape, bool)
    for i, j in _sites(colour):
        sl = _site_slice(i, j, colour)
        plane = np.ascontiguousarray(dark[sl], dtype=np.float32)
        resid = plane - cv2.medianBlur(plane, 5)
        sample = resid[::3, ::3]
        mad = float(np.median(np.abs(sample - np.median(sample))))
        s = max(1.4826 * mad, 0.5)  # a median of integer frames can have MAD 0: σ is at least ½ ADU
        hot[sl] = resid > sigma * s
    return hot


def cold_pixels_from_flat(flat: np.ndarray, colour: bool, ratio: float) -> np.ndarray:
    """(H, W) bool: pixels of a master flat below ``ratio`` × the 5×5 median of their own CFA colour."""
    cold = np.zeros(flat.shape, bool)
    for i, j in _sites(colour):
        sl = _site_slice(i, j, colour)
        plane = np.ascontiguousarray(flat[sl], dtype=np.float32)
        cold[sl] = plane < ratio * cv2.medianBlur(plane, 5)
    return cold


# ---------------------------------------------------------------- build

@dataclass(slots=True)
class _Group:
    kind: str
    key: tuple
    shape: tuple[int, int]
    pattern: str | None
    spill: Spill
    camera: str | None = None
    iso: int | None = None
    gain: float | None = None
    filter: str | None = None
    offset: float | None = None
    binning: str | None = None
    exptimes: list = field(default_factory=list)
    temps: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    sums: list = field(default_factory=list)      # flats: (2, 2) per-frame raw means
    blacks: list = field(default_factory=list)    # (2, 2) black level of each frame
    made: list = field(default_factory=list)      # flats: True for a master flat made elsewhere (offset taken off)
    stats: list = field(default_factory=list)     # _FrameStats of each frame
    notes: list = field(default_factory=list)     # what the build log says of the master besides its line


def build_library(calib_dir: Path | str, out_dir: Path | str, p: CalibrationParams | None = None, *,
                  log: Callable[[str], None] | None = None) -> "MasterLibrary":
    """Build every master from ``calib_dir`` into ``out_dir`` (created): master FITS files and masters.json.

    Raises MasterError when ``calib_dir`` is not a folder or holds no usable calibration frame.  A file that
    cannot be read is skipped and listed in masters.json's "skipped" with its reason.
    Memory: one decoded frame + the combine block (``p.memory_mb``) + one (H, W) float32 master.
    """
    p = p or CalibrationParams()
    calib_dir, out_dir = Path(calib_dir).expanduser(), Path(out_dir).expanduser()
    say = log or (lambda s: None)
    if not calib_dir.is_dir():
        raise MasterError(f"{calib_dir}: not a folder of calibration frames")
    out_dir.mkdir(parents=True, exist_ok=True)
    files, skipped = discover(calib_dir, exclude=out_dir)
    if not any(files.values()):
        why = ""
        if skipped:         # e.g. the frames are all XISF, or all lights: say so, not only where frames are looked for
            n = len(skipped)
            why = f"; {n} file{'s' * (n != 1)} skipped, {skipped[0]['file']}: {skipped[0]['reason']}"
        raise MasterError(f"{calib_dir}: no calibration frames found (folders bias/, darks/, flats/, darkflats/ "
                          f"or FITS IMAGETYP){why}")
    lib = MasterLibrary(out_dir, [], p)
    lib.skipped = skipped
    try:        # the library this rebuilds: its masters stay listed until made again (an interrupted rebuild);
        before = _read_index(out_dir)[0]        # one whose file is gone is left out by save()
    except MasterError:
        before = []
    for kind in KINDS:
        if files[kind]:
            say(f"{KIND_LABEL[kind]}: {len(files[kind])} files")
        groups = _ingest(kind, files[kind], calib_dir, out_dir, p, skipped, say)
        try:
            for g in groups:
                n_skipped = len(skipped)
                try:
                    entry = _make_master(g, lib, p, skipped)
                except MasterError as err:
                    skipped += [{"file": f, "reason": str(err)} for f in g.sources]
                    say(f"  skipped {len(g.sources)} {KIND_LABEL[kind]} frames: {err}")
                    continue
                for s in skipped[n_skipped:]:       # frames of the group left out of its master
                    say(f"  skipped {s['file']}: {s['reason']}")
                lib.entries.append(entry)
                lib.save(also=before)   # after each master: an interrupted build keeps what it made, and the
                                        # masters of an earlier build it has not made again (their files stay)
                say(f"  {entry.file}: {entry.ncombine} frames, {entry.width}×{entry.height}"
                    + (f", offset {entry.offset:g}" if entry.offset is not None else "")
                    + (f", binned {entry.binning}" if entry.binning not in (None, "1x1") else "")
                    + (f", {entry.bad_pixels} bad pixels" if entry.bad_pixels else "")
                    + (f", minus {entry.subtracted}" if entry.subtracted else ""))
                for note in g.notes:
                    say(f"    {note}")
        finally:
            for g in groups:
                g.spill.remove()
    if not lib.entries:
        raise MasterError(f"{calib_dir}: no master could be built ({len(skipped)} file{'s' * (len(skipped) != 1)} skipped)")
    lib.save()
    return lib


def _ingest(kind, paths, calib_dir, out_dir, p, skipped, say) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    try:
        for path in paths:
            rel = str(path.relative_to(calib_dir))
            try:
                frame = read_frame(path)
            except FrameError as err:
                skipped.append({"file": rel, "reason": err.reason})
                say(f"  skipped {rel}: {err.reason}")
                continue
            why = _saturated_flat(frame) if kind == "flat" else None
            if why:
                skipped.append({"file": rel, "reason": why})
                say(f"  skipped {rel}: {why}")
                continue
            key = group_key(frame, kind, p)
            if kind == "dark":
                key = _dark_group(key, frame.meta.temperature, groups, p)
            g = groups.get(key)
            if g is None:
                spill = Spill(out_dir / f".scratch_{kind}_{len(groups)}_{os.getpid()}.bin", frame.shape)
                m = frame.meta
                g = groups[key] = _Group(kind, key, frame.shape, frame.pattern, spill, camera=m.camera,
                                         iso=m.iso, gain=m.gain, filter=m.filter,
                                         offset=_offset(m), binning=_binning(m))
            g.spill.append(frame.data)
            g.sources.append(rel)
            g.exptimes.append(frame.meta.exptime)
            g.temps.append(frame.meta.temperature)
            made = kind == "flat" and _made_master(path)
            g.made.append(made)
            g.blacks.append(np.zeros((2, 2)) if made else frame.black.astype(np.float64))
            g.stats.append(frame_stats(frame.data))
            if kind == "flat":
                g.sums.append(site_means(frame.data, frame.is_color))
            del frame
    except BaseException:
        for g in groups.values():
            g.spill.remove()
        raise
    return list(groups.values())


@dataclass(frozen=True, slots=True)
class _FrameStats:
    lo: float          # smallest and largest pixel value, ADU
    hi: float
    level: float       # median, ADU
    noise: float       # pixel-to-pixel σ, ADU (from same-colour neighbours: gradients and vignetting cancel)
    step: float = 0.0  # the data's quantum: 1 ADU for integers, 16 for 12-bit data in 16-bit files, ~0 for floats


def frame_stats(data: np.ndarray) -> _FrameStats:
    """Level and noise of one (H, W) float32 calibration frame, from every 16th row (0.05 s at 24 MP).  The noise is
    the σ of the differences of pixels two columns apart (same CFA colour) over √2, clipped at 5 robust σ — at
    least 5 steps of the data — so that hot pixels and cosmic rays do not count; a clipped σ, not a MAD, so that
    integer data with σ below its step still gets a σ above 0 (clipped at 5 ADU, data in steps of 16 had none)."""
    rows = data[::16]                          # a view: 1.5 M pixels of a 24 MP frame, plenty for two numbers
    d = (rows[:, 2:] - rows[:, :-2]).ravel()           # float32: exact for integer ADU
    s0 = 1.4826 * float(np.median(np.abs(d))) if d.size else 0.0     # (differences are centred on 0)
    nonzero = np.abs(d[d != 0])
    step = float(nonzero.min()) if nonzero.size else 0.0
    d = d[np.abs(d) <= 5 * max(s0, step, 1.0)]
    noise = float(np.std(d, dtype=np.float64)) / math.sqrt(2) if d.size else 0.0
    return _FrameStats(float(data.min()), float(data.max()), float(np.median(rows)), noise, step)


def _odd_frames(g: _Group, p: CalibrationParams) -> dict[int, str]:
    """Frames of ``g`` that are no calibration frame of the group's settings: {index: reason}.

    Any kind, in a group of two or more: a constant frame (every pixel one value: a blank frame written by the
    camera or a capture program) — alone it may be a synthetic master, so it is kept.  Bias, darks and
    dark-flats in a group of three or more non-constant frames: frames of one camera at one gain, exposure and
    temperature share their level and noise, so a frame whose median lies more than ``frame_sigma`` × the
    group's spread from the group's median (a light, a light leak, another offset) or whose noise does (a
    light's sky, another gain) is left out.  The spread is robust (1.4826 × MAD over the frames, so up to half
    the frames may be bad) with a floor from physics: the pixel noise for the level — a shift below
    ``frame_sigma`` pixel σ is what the clipped combine tolerates anyway — and 5 % of the noise for the noise
    (dark current varies that much within a 2 °C bin); and beyond both, the step of integer data: with a noise
    below it, an offset drifting by half a step moves a frame's median by a whole step and its measured noise
    from ~0.3 to ~0.5 step, which says nothing of the frame.  Flats vary in level by design (sky flats), are
    normalised one by one, and already lose a frame without light or saturated: only the constant test."""
    odd: dict[int, str] = {}
    if len(g.stats) < 2:
        return odd
    for i, st in enumerate(g.stats):
        if st.hi == st.lo:
            odd[i] = f"constant frame: every pixel is {st.lo:g} (a blank frame from the camera or its software)"
    rest = [i for i in range(len(g.stats)) if i not in odd]
    if g.kind == "flat" or len(rest) < 3:
        return odd
    label = "biases" if g.kind == "bias" else KIND_LABEL[g.kind] + "s"     # (not "the 7 biass'")
    levels = np.array([g.stats[i].level for i in rest])
    noises = np.array([g.stats[i].noise for i in rest])
    c_level, c_noise = float(np.median(levels)), float(np.median(noises))
    s_level = max(1.4826 * float(np.median(np.abs(levels - c_level))), c_noise)
    s_noise = max(1.4826 * float(np.median(np.abs(noises - c_noise))), 0.05 * c_noise)
    step = max(g.stats[i].step for i in rest)
    for i, level, noise in zip(rest, levels, noises):
        if s_level > 0 and abs(level - c_level) > p.frame_sigma * s_level + step:
            up = level > c_level
            odd[i] = (f"median {level:.6g} ADU, {abs(level - c_level) / s_level:.0f} σ "
                      f"{'above' if up else 'below'} the {len(rest)} {label}' {c_level:.6g} (σ {s_level:.2g} ADU): "
                      + ("a light, or light leaking in" if up else "another offset or gain, or a damaged frame")
                      # a dark's level is its sensor's temperature too (a DSLR warming through its darks)
                      + ((", or the sensor warmer?" if up else ", or the sensor cooler?") if g.kind == "dark" else "?"))
        elif s_noise > 0 and abs(noise - c_noise) > p.frame_sigma * s_noise + 0.5 * step:
            up = noise > c_noise
            odd[i] = (f"noise {noise:.3g} ADU, {abs(noise - c_noise) / s_noise:.0f} σ "
                      f"{'above' if up else 'below'} the {len(rest)} {label}' {c_noise:.3g} (σ {s_noise:.2g} ADU): "
                      + ("a light's sky, or another gain?" if up else "another gain, or a processed frame?"))
    return odd


def _saturated_flat(frame: Frame) -> str | None:
    """Why a flat cannot be used because it is saturated, or None.  A flat clipped at the white level (a panel
    too bright, an exposure too long) is flat where the optics are not: divided by it, the lights come out too
    bright there.  More than 0.1 % of the pixels at the white level is a clipped region, not hot pixels (a
    sensor's hot pixels are ~0.01 % and rarely saturate in a flat's short exposure)."""
    if frame.saturated is None:
        return None
    n = int(np.count_nonzero(frame.saturated))
    if n <= 1e-3 * frame.saturated.size:
        return None
    return (f"saturated flat: {100 * n / frame.saturated.size:.1f} % of the pixels at the white level "
            f"{frame.white:g} (a dimmer panel or a shorter exposure)")


def _mean_or_none(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _master_name(kind, camera, shape, exptime, temp, iso, gain, filt) -> str:
    parts = [kind]
    if kind in ("dark", "darkflat") and exptime is not None:
        parts.append(f"{exptime:g}s")
    if kind == "dark" and temp is not None:
        parts.append(f"{round(temp):d}C")
    if kind == "flat" and filt:
        parts.append(re.sub(r"[^A-Za-z0-9]+", "-", filt).strip("-"))
    if iso is not None:
        parts.append(f"iso{iso}")
    if gain is not None:
        parts.append(f"g{gain:g}")
    parts.append(re.sub(r"[^A-Za-z0-9]+", "-", camera or "").strip("-") or "camera")
    parts.append(f"{shape[1]}x{shape[0]}")
    return "_".join(parts)


def _make_master(g: _Group, lib: "MasterLibrary", p: CalibrationParams, skipped: list[dict]) -> MasterEntry:
    colour = g.pattern is not None
    subtracted = None
    odd = _odd_frames(g, p)
    if g.kind == "flat":
        data, bad, clipped, subtracted, keep = _combine_flat(g, lib, p, skipped, odd)
        folders = list(dict.fromkeys(str(Path(g.sources[i]).parent) for i in keep))
        if len(folders) > 1:    # Ekos keeps flats per target, NINA per night: one master of them all is said
            g.notes.append(f"made of flats from {len(folders)} folders ({', '.join(folders[:3])}"
                           f"{', …' if len(folders) > 3 else ''}): flats of other nights or targets (dust moved, "
                           "the camera turned) do not fit each other's lights — give `livestack masters` one "
                           "night's folder for a master of its own")
    else:
        keep = [i for i in range(g.spill.n) if i not in odd]
        if not keep:
            raise MasterError(f"{KIND_LABEL[g.kind]} group of {g.sources[0]}: no frame left ({odd[0]})")
        skipped.extend({"file": g.sources[i], "reason": why} for i, why in sorted(odd.items()))
        data, clipped = combine_spill(g.spill, p, frames=None if not odd else keep)
        bad = hot_pixels_from_dark(data, colour, p.hot_sigma) if g.kind == "dark" else None
    sources, n = [g.sources[i] for i in keep], len(keep)
    g.exptimes, g.temps = [g.exptimes[i] for i in keep], [g.temps[i] for i in keep]
    exptime = _mean_or_none(g.exptimes)
    temp = _mean_or_none(g.temps)
    name = _master_name(g.kind, g.camera, g.shape, exptime, temp, g.iso, g.gain, g.filter)
    taken = {e.name for e in lib.entries}
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    entry = MasterEntry(
        name=name, file=name + ".fits", kind=g.kind, camera=g.camera, width=g.shape[1], height=g.shape[0],
        pattern=g.pattern, iso=g.iso, gain=g.gain, exptime=exptime, temperature=temp, filter=g.filter,
        ncombine=n, method=p.method if n > 2 or p.method == "median" else "mean",
        kappa=p.kappa if p.method == "clipped" else None, sources=tuple(sources),
        bad_pixels=int(bad.sum()) if bad is not None else 0, subtracted=subtracted,
        clipped=round(clipped / max(1, data.size * n), 6) if p.method == "clipped" else None,
        offset=g.offset, binning=g.binning)
    write_master(lib.root / entry.file, data, entry, bad)
    lib._arrays[entry.name] = data
    if bad is not None:
        lib._bad[entry.name] = bad
    return entry


def _flat_offset(g: _Group, lib: "MasterLibrary", t: float | None) -> MasterEntry | None:
    """The master to subtract from a flat of ``g`` taken with ``t`` s: the dark-flat of that exposure, else the
    bias, else the dark of that exposure (the one of most frames); None: its black level."""
    for kind in ("darkflat", "bias", "dark"):
        cands = [e for e in lib.entries if e.kind == kind and e.width == g.shape[1] and e.height == g.shape[0]
                 and e.pattern == g.pattern and _same_camera(e.camera, g.camera)
                 and _same(e.iso, g.iso) and _same(e.gain, g.gain) and _same(e.binning, g.binning)
                 and _same(e.offset, g.offset) and (kind == "bias" or same_exposure(t, e.exptime))]
        if cands:
            return max(cands, key=lambda e: e.ncombine)
    return None


def _darkflats_unused(g: _Group, lib: "MasterLibrary") -> str | None:
    """What the library's dark-flats of this camera and size are ("darkflat_1s_… is of 1 s", "… has gain 300, the
    flats 120"), for flats of ``g`` none of them fits; None when it has none.  The flats then have a bias or a
    black level subtracted instead, which the build log must say — the dark-flats were taken for them."""
    what = []
    for e in lib.entries:
        if (e.kind != "darkflat" or (e.height, e.width) != g.shape or e.pattern != g.pattern
                or not _same_camera(e.camera, g.camera)):
            continue
        if not _same(e.iso, g.iso):
            what.append(f"{e.name} is ISO {e.iso}, the flats ISO {g.iso}")
        elif not _same(e.gain, g.gain):
            what.append(f"{e.name} has gain {e.gain:g}, the flats {g.gain:g}")
        elif not _same(e.offset, g.offset):
            what.append(f"{e.name} has offset {e.offset:g}, the flats {g.offset:g}")
        elif not _same(e.binning, g.binning):
            what.append(f"{e.name} is binned {e.binning}, the flats {g.binning}")
        else:
            what.append(f"{e.name} is of {_fmt_t(e.exptime)}")
    return "; ".join(what) or None


def _combine_flat(g: _Group, lib: "MasterLibrary", p: CalibrationParams, skipped: list[dict],
                  odd: dict[int, str]):
    """The group's master flat, its bad pixels, the values clipped, what was subtracted and the indices of the
    frames combined.  A frame without light (mean ≤ 0 in a colour after the subtraction: a dark or a capped
    frame among the flats), then one of ``odd`` (index: reason), is left out and listed in ``skipped``;
    MasterError when no frame is left."""
    colour = g.pattern is not None
    # What each flat has subtracted: the master of its own exposure (flats of several exposures — sky flats,
    # an automatic flat panel — are one group, each with its own dark-flat), else the bias, else its black level.
    # A master flat made elsewhere had its offset taken off there: nothing (its black level is zeroed at ingest).
    offsets = [None if made else _flat_offset(g, lib, t) for t, made in zip(g.exptimes, g.made)]
    instead: dict[str, list] = {}      # what was subtracted instead of a dark-flat: the exposures of those flats
    for t, e, b, made in zip(g.exptimes, offsets, g.blacks, g.made):
        if not made and (e is None or e.kind != "darkflat"):
            ts = instead.setdefault(e.name if e is not None else f"their black level {float(b.mean()):g}", [])
            if _exp_key(t) not in ts:
                ts.append(_exp_key(t))
    why = _darkflats_unused(g, lib) if instead else None
    for what, ts in instead.items() if why else ():          # one line for sky flats of many exposures
        g.notes.append(f"no master dark-flat fits the flats of {', '.join(_fmt_t(t) for t in sorted(ts, key=_by_t))} "
                       f"({why}): {what} was subtracted instead")
    subs: list[np.ndarray | None] = []
    means = []                                                   # (2, 2) per frame: the subtracted means
    offset_means = {}
    for e, b in zip(offsets, g.blacks):
        if e is not None:
            subs.append(lib.array(e.name))
            if e.name not in offset_means:
                offset_means[e.name] = site_means(subs[-1], colour)
            means.append(offset_means[e.name])
        else:
            subs.append(None)
            means.append(b if colour else np.full((2, 2), b.mean()))
    names = list(dict.fromkeys(e.name if e is not None else f"black level {float(b.mean()):g}"
                               for e, b in zip(offsets, g.blacks) if e is not None or b.any()))
    subtracted = ", ".join(names) or None
    # Mean of (flat - offset) per colour, frame by frame: subtraction is linear, so from the raw means.
    level = np.array(g.sums) - np.array(means)                   # (N, 2, 2)
    dark = level.min(axis=(1, 2)) <= 0
    if dark.all():
        raise MasterError(f"flat group of {g.sources[0]}: mean level ≤ 0 after subtracting "
                          f"{subtracted or 'nothing'} (underexposed flats, or a dark-flat of another exposure?)")
    keep = [int(i) for i in np.flatnonzero(~dark) if i not in odd]
    if not keep:
        raise MasterError(f"flat group of {g.sources[0]}: no frame left ({odd[min(odd)]})")
    for i in np.flatnonzero(dark):
        what = offsets[i].name if offsets[i] is not None else f"black level {float(g.blacks[i].mean()):g}"
        skipped.append({"file": g.sources[i], "reason": f"flat without light: mean level ≤ 0 after subtracting "
                                                         f"{what}"})
    for i in sorted(set(odd) - set(np.flatnonzero(dark).tolist())):
        skipped.append({"file": g.sources[i], "reason": odd[i]})
    inv = (1.0 / level[keep]).astype(np.float32)
    kept_subs = [subs[i] for i in keep]
    kept_black = [None if subs[i] is not None else np.asarray(means[i], np.float32) for i in keep]

    def prepare(block: np.ndarray, r0: int, r1: int) -> None:
        for k, (sub, black) in enumerate(zip(kept_subs, kept_black)):
            if sub is not None:
                block[k] -= sub[r0:r1]
            elif black is not None:
                for i, j in _sites(colour):
                    block[k][_site_slice(i, j, colour)] -= black[i, j]
        for i, j in _sites(colour):
            sl = (slice(None),) + _site_slice(i, j, colour)
            block[sl] *= inv[:, i, j][:, None, None]

    data, clipped = combine_spill(g.spill, p, prepare=prepare, frames=keep)
    bad = ~np.isfinite(data)
    data[bad] = 1.0
    bad |= (data < p.flat_min) | cold_pixels_from_flat(data, colour, p.cold_ratio)
    # mean 1 per colour over the usable pixels, then the guard: nothing below flat_min is ever divided by
    norm = site_means(data, colour, mask=bad)
    for i, j in _sites(colour):
        data[_site_slice(i, j, colour)] /= np.float32(norm[i, j])
    bad |= data < p.flat_min
    np.maximum(data, np.float32(p.flat_min), out=data)
    return data, bad, clipped, subtracted, keep


def _same(a, b) -> bool:
    return a is None or b is None or a == b


def _same_camera(a: str | None, b: str | None) -> bool:
    return a is None or b is None or _norm_camera(a) == _norm_camera(b)


def write_master(path: Path, data: np.ndarray, e: MasterEntry, bad: np.ndarray | None) -> None:
    """Master FITS: float32 primary image with provenance headers; bad pixels as a BADPIX table (X, Y)."""
    from astropy.io import fits

    from .engine.write import atomic_write_with, fits_text

    h = fits.Header()
    h["IMAGETYP"] = IMAGETYP_OUT[e.kind]
    h["NCOMBINE"] = (e.ncombine, "frames combined")
    h["CALMETH"] = (e.method, "combine: clipped mean | median | mean")
    if e.kappa is not None:
        h["CALKAPPA"] = (e.kappa, "clipping threshold, sigma of the other frames")
    cards = [("EXPTIME", e.exptime, "[s] exposure of the frames (mean)"),
             ("ISOSPEED", e.iso, "ISO"), ("GAIN", e.gain, "gain setting"),
             ("CCD-TEMP", None if e.temperature is None else round(e.temperature, 2), "[C] mean sensor temp"),
             ("OFFSET", e.offset, "camera offset setting"),
             ("FILTER", e.filter, "filter"), ("INSTRUME", e.camera, "camera"),
             ("BAYERPAT", e.pattern, "CFA pattern of pixel (0,0)")]
    for k, v, c in cards:
        if v is not None:
            h[k] = (fits_text(v) if isinstance(v, str) else v, c)   # a camera's name from EXIF
    if e.pattern:
        h["XBAYROFF"], h["YBAYROFF"] = 0, 0
    if e.binning:
        h["XBINNING"], h["YBINNING"] = (int(v) for v in e.binning.split("x"))
    h["ROWORDER"] = "TOP-DOWN"
    if e.subtracted:
        sub = fits_text(e.subtracted)       # (several names: a long string, on CONTINUE cards; no comment then)
        h["CALSUB"] = (sub, "subtracted from each flat") if len(sub) <= 40 else sub
    h["NSOURCE"] = (len(e.sources), "source files (HISTORY)")
    h["SOFTWARE"] = f"livestack {__version__}"
    h["DATE"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    for s in e.sources:
        h.add_history(fits_text(f"source: {s}"))      # file names: any characters, FITS: ASCII
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data, np.float32), header=h)]
    if bad is not None:
        y, x = np.nonzero(bad)
        t = fits.BinTableHDU.from_columns([fits.Column("X", "J", array=x.astype(np.int32)),
                                           fits.Column("Y", "J", array=y.astype(np.int32))], name="BADPIX")
        t.header["BADKIND"] = ("hot" if e.kind == "dark" else "cold"), "from the master dark | flat"
        hdus.append(t)
    def writer(tmp: Path) -> None:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    atomic_write_with(path, writer)


# ---------------------------------------------------------------- the library

class MasterLibrary:
    """The masters of one folder (masters.json + FITS), and the choice of masters for each light.

    Arrays are read lazily, once, as float32 and kept (a 24 MP master is 96 MB): only the masters that lights
    actually use are ever loaded.
    """

    def __init__(self, root: Path | str, entries: list[MasterEntry], params: CalibrationParams | None = None):
        self.root = Path(root)
        self.entries = list(entries)
        self.params = params or CalibrationParams()
        self.skipped: list[dict] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._bad: dict[str, np.ndarray] = {}
        self._bad_union: dict[tuple, np.ndarray] = {}
        self._selected: dict[tuple, Masters | str] = {}
        self._said: set = set()          # what the log has said of the choices (once each, not once a light)
        self._lock = threading.Lock()    # select() runs on the read-ahead threads: one choice, said once

    # -------------------------------------------------------------- build / save / load

    @classmethod
    def build(cls, calib_dir: Path | str, out_dir: Path | str, params: CalibrationParams | None = None, *,
              log: Callable[[str], None] | None = None) -> "MasterLibrary":
        """See build_library."""
        return build_library(calib_dir, out_dir, params, log=log)

    def save(self, *, also: list[MasterEntry] = ()) -> None:
        """Write masters.json (atomically).  ``also``: masters of an earlier build listed too, but for those this
        library has made again (the same file) and those whose file is gone."""
        from .engine.write import atomic_write_bytes

        made = {e.file for e in self.entries}
        kept = [e for e in also if e.file not in made and (self.root / e.file).is_file()]
        doc = {"version": 1, "software": f"livestack {__version__}",
               "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "params": dataclasses.asdict(self.params),
               "masters": [e.to_dict() for e in self.entries + kept], "skipped": self.skipped}
        atomic_write_bytes(self.root / INDEX, json.dumps(doc, indent=1).encode())
        os.chmod(self.root / INDEX, 0o644)

    @classmethod
    def load(cls, root: Path | str, params: CalibrationParams | None = None) -> "MasterLibrary":
        """Read masters.json of ``root`` (no pixels yet).  Raises MasterError naming the file."""
        root = Path(root).expanduser()
        entries, skipped = _read_index(root)
        missing = [e.file for e in entries if not (root / e.file).is_file()]
        if missing:
            raise MasterError(f"{root}: {INDEX} lists missing files: {', '.join(missing[:3])}")
        lib = cls(root, entries, params)
        lib.skipped = skipped
        return lib

    def summary(self) -> str:
        """'1 bias, 2 darks, 3 flats': how many masters of each kind."""
        plural = {"bias": "biases", "dark": "darks", "darkflat": "dark-flats", "flat": "flats"}
        counts = [(k, sum(e.kind == k for e in self.entries)) for k in KINDS]
        return ", ".join(f"{n} {KIND_LABEL[k] if n == 1 else plural[k]}" for k, n in counts if n) or "no masters"

    def array(self, name: str) -> np.ndarray:
        """(H, W) float32 data of master ``name``, read once."""
        a = self._arrays.get(name)
        if a is None:
            from astropy.io import fits

            e = self._entry(name)
            try:
                with quiet_warnings(), fits.open(self.root / e.file, memmap=False) as hdul:
                    a = np.ascontiguousarray(hdul[0].data, dtype=np.float32)
            except (OSError, ValueError, TypeError) as err:        # cut short, overwritten, not FITS
                # in words: astropy says a cut file's "cannot reshape array of size 57600 into shape (360,480)"
                raise MasterError(f"{e.file}: {_fits_reason(self.root / e.file, err)}") from err
            if a.shape != (e.height, e.width):
                raise MasterError(f"{e.file}: image is {a.shape[1]}×{a.shape[0]}, masters.json says "
                                  f"{e.width}×{e.height}")
            a.setflags(write=False)
            self._arrays[name] = a
        return a

    def bad_map(self, name: str) -> np.ndarray | None:
        """(H, W) bool bad-pixel map stored with master ``name`` (None when it has none)."""
        if name not in self._bad:
            from astropy.io import fits

            e = self._entry(name)
            bad = None
            with fits.open(self.root / e.file, memmap=False) as hdul:
                if "BADPIX" in hdul:
                    t = hdul["BADPIX"].data
                    bad = np.zeros((e.height, e.width), bool)
                    bad[np.asarray(t["Y"], np.intp), np.asarray(t["X"], np.intp)] = True
            self._bad[name] = bad
        return self._bad[name]

    def _entry(self, name: str) -> MasterEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    # -------------------------------------------------------------- selection

    def select(self, frame: Frame) -> Masters | None:
        """The best masters for ``frame`` (None when the library has nothing for it).

        Per kind: masters of another camera, size or CFA pattern, another ISO/gain (bias, dark), a temperature
        further than ``temperature_tolerance`` (dark) or another filter (flat) are refused; when the library
        has masters of a kind but none fits, ``on_mismatch = "fail"`` raises FrameError(frame.path, reason) and
        "skip" calibrates without that kind and records ``<kind>_skipped: reason``.  The dark of the same
        exposure is preferred; otherwise the nearest one (the longer of two equally near) is scaled with the
        bias — or the frame's black level when there is no bias — and ``dark_scaled`` is recorded.
        """
        m = frame.meta
        key = (_norm_camera(m.camera), frame.shape, frame.pattern, m.iso, m.gain, _exp_key(m.exptime),
               None if m.temperature is None else round(m.temperature, 1),
               filter_key(m.filter), frame.black.tobytes(), _offset(m), _binning(m))
        with self._lock:
            hit = self._selected.get(key)
            if hit is None:
                hit = self._selected[key] = self._select_new(frame)
        if isinstance(hit, str):
            raise FrameError(frame.path, hit)
        return hit

    def _select_new(self, frame: Frame) -> Masters | None | str:
        """select()'s choice for ``frame``, or why it has none (a str), said in the log."""
        try:
            hit = self._select(frame)
        except FrameError as err:
            return err.reason
        except (MasterError, OSError, ValueError) as err:    # a master damaged or changed since masters.json
            return f"calibration master unusable: {err}"
        self._say(frame, hit)
        return hit

    def _say(self, frame: Frame, chosen: Masters | None) -> None:
        """Log the masters chosen for the lights of ``frame``'s settings (INFO), and a master of a kind the library
        has that none fitted, left out under on_mismatch = "skip" (WARNING): frames.jsonl records it for each
        light, but the command's output and the daemon's log said nothing — the lights were stacked without
        their dark, or their flat, and looked calibrated.  Each line once, not once a light."""
        if chosen is None:
            return
        for kind in ("bias", "dark", "flat"):
            why = chosen.notes.get(f"{kind}_skipped")
            if why and ("skipped", why) not in self._said:
                self._said.add(("skipped", why))
                log.warning("%s (and the lights of its settings): calibrated without a master %s "
                            "(on_mismatch = \"skip\"): %s", frame.path.name, kind, why)
        t, td = frame.meta.exptime, chosen.dark_exptime
        used = ", ".join(f"{k}={v}" for k, v in chosen.names.items())
        if chosen.dark is not None and t is not None and td and not same_exposure(t, td):
            used += f" (dark scaled ×{t / td:.4g}" + (" on the black level)" if chosen.bias is None else ")")
        if used and used not in self._said:
            self._said.add(used)
            log.info("%s (and the lights of its settings): masters %s", frame.path.name, used)

    def _select(self, frame: Frame) -> Masters | None:
        p = self.params
        notes: dict = {}
        t = frame.meta.exptime
        dark, dark_why = self._choose("dark", frame)
        bias, bias_why = self._choose("bias", frame)
        flat, flat_why = self._choose("flat", frame)
        if dark is not None and same_exposure(t, dark.exptime):
            bias, bias_why = None, None  # not needed: a bias of another ISO must not fail this light
        for kind, reason in (("dark", dark_why), ("bias", bias_why), ("flat", flat_why)):
            if reason is not None:
                if p.on_mismatch == "fail":
                    raise FrameError(frame.path, reason)
                notes[f"{kind}_skipped"] = reason
        if dark is not None and not same_exposure(t, dark.exptime):
            if t is None or dark.exptime is None:
                reason = (f"{dark.describe()} is of {_fmt_t(dark.exptime)} but the frame's exposure is "
                          f"{_fmt_t(t)}: cannot scale the dark")
            elif bias is None and not frame.black.any():
                reason = (f"no master dark of {t:g} s, and no master bias (nor a black level in the file) to "
                          f"scale {dark.describe()} of {dark.exptime:g} s")
            else:
                reason = None
                if bias is None:
                    notes["dark_base"] = "black level"
            if reason is not None:
                if p.on_mismatch == "fail":
                    raise FrameError(frame.path, reason)
                notes["dark_skipped"] = reason
                dark = None
        if not (bias or dark or flat or notes):
            return None
        names = {k: e.name for k, e in (("bias", bias), ("dark", dark), ("flat", flat)) if e is not None}
        return Masters(
            bias=self.array(bias.name) if bias else None,
            dark=self.array(dark.name) if dark else None,
            dark_exptime=dark.exptime if dark else None,
            flat=self.array(flat.name) if flat else None,
            bad=self._bad_for(dark, flat),
            names=names, notes=notes)

    def _bad_for(self, dark: MasterEntry | None, flat: MasterEntry | None) -> np.ndarray | None:
        key = (dark.name if dark else None, flat.name if flat else None)
        if key not in self._bad_union:
            maps = [b for b in (self.bad_map(e.name) for e in (dark, flat) if e is not None) if b is not None]
            u = None
            if maps:
                u = maps[0].copy()
                for b in maps[1:]:
                    u |= b
                u.setflags(write=False)
            self._bad_union[key] = u
        return self._bad_union[key]

    def _choose(self, kind: str, frame: Frame) -> tuple[MasterEntry | None, str | None]:
        cands = [e for e in self.entries if e.kind == kind]
        if not cands:
            return None, None
        judged = [(self._problems(e, frame), e) for e in cands]
        ok = [e for probs, e in judged if not probs]
        m = frame.meta
        if not ok:
            if kind == "flat" and m.filter:
                # flats of other filters alone: name them all, not the first ("… is for filter 'L'" when R was there)
                others = {filter_key(e.filter): e.filter for probs, e in judged
                          if len(probs) == 1 and e.filter and filter_key(e.filter) != filter_key(m.filter)}
                if len(others) > 1:
                    return None, (f"no master flat for filter '{m.filter}' (the master flats are for "
                                  f"{_filter_names(others.values())})")

            def nearest(pe):         # the fewest problems; among darks, the nearest temperature is the one to name
                e = pe[1]
                dt = (abs(e.temperature - m.temperature) if None not in (e.temperature, m.temperature) else 0.0)
                return len(pe[0]), dt
            probs, e = min(judged, key=nearest)
            return None, probs[0]
        if kind == "dark":
            t = m.exptime

            def rank(e: MasterEntry):
                exact = same_exposure(t, e.exptime)
                dist = abs(math.log(t / e.exptime)) if t and e.exptime else math.inf
                dtemp = abs(m.temperature - e.temperature) if None not in (m.temperature, e.temperature) else 0
                return (not exact, round(dist, 6), -(e.exptime or 0), dtemp, -e.ncombine)
            best = min(ok, key=rank)
            if m.temperature is None:
                # a frame without CCD-TEMP, darks of its exposure at temperatures the tolerance keeps apart: the
                # dark of most frames was taken, whichever its temperature — a guess, as a flat's filter would be
                temps = sorted({round(e.temperature, 1) for e in ok
                                if rank(e)[:3] == rank(best)[:3] and e.temperature is not None})
                if temps and temps[-1] - temps[0] > self.params.temperature_tolerance:
                    said = ", ".join(f"{x:.1f} °C" for x in temps)
                    return None, (f"the frame has no sensor temperature (CCD-TEMP) and the master darks of "
                                  f"{_fmt_t(best.exptime)} were taken at {said}: which one fits is unknown")
            return best, None
        if kind == "flat":
            f = filter_key(m.filter)
            filters = {filter_key(e.filter): e.filter for e in ok}
            if not f and "" not in filters and len(filters) > 1:
                # a frame without FILTER, flats of several filters and none without: any one would be a guess
                return None, (f"the frame has no FILTER and the master flats are for filters "
                              f"{_filter_names(filters.values())}: which one is unknown")
            return min(ok, key=lambda e: (filter_key(e.filter) != f, -e.ncombine)), None
        return min(ok, key=lambda e: -e.ncombine), None

    def _problems(self, e: MasterEntry, frame: Frame) -> list[str]:
        """Why master ``e`` cannot calibrate ``frame`` (empty: it can), most serious first."""
        m, out = frame.meta, []
        d = e.describe()
        if not _same_camera(e.camera, m.camera):
            out.append(f"{d} is from camera '{e.camera}' but the frame is from '{m.camera}'")
        h, w = frame.shape
        if (e.height, e.width) != (h, w):
            out.append(f"{d} is {e.width}×{e.height} but the frame is {w}×{h}")
        if e.pattern != frame.pattern:
            out.append(f"{d} has CFA pattern {e.pattern or 'none (mono)'} but the frame has "
                       f"{frame.pattern or 'none (mono)'}")
        b = _binning(m)
        if not _same(e.binning, b):
            out.append(f"{d} is binned {e.binning} but the frame {b}")
        if e.kind in ("bias", "dark"):
            if not _same(e.iso, m.iso):
                out.append(f"{d} is ISO {e.iso} but the frame is ISO {m.iso}")
            if not _same(e.gain, m.gain):
                out.append(f"{d} has gain {e.gain:g} but the frame has gain {m.gain:g}")
            o = _offset(m)
            if not _same(e.offset, o):
                out.append(f"{d} has offset {e.offset:g} but the frame has offset {o:g}")
        if e.kind == "dark" and None not in (e.temperature, m.temperature):
            if abs(e.temperature - m.temperature) > self.params.temperature_tolerance:
                out.append(f"{d} was taken at {e.temperature:.1f} °C but the frame at {m.temperature:.1f} °C "
                           f"(tolerance {self.params.temperature_tolerance:g} °C)")
        if e.kind == "flat" and e.filter and m.filter and filter_key(e.filter) != filter_key(m.filter):
            out.append(f"{d} is for filter '{e.filter}' but the frame has filter '{m.filter}'")
        return out


def _filter_names(names) -> str:
    """"'B', 'g', 'R'": filter names as a mismatch reason lists them."""
    return ", ".join(f"'{n}'" for n in sorted(names, key=str.casefold))


def _by_t(t: float | None) -> float:
    return -1.0 if t is None else t


def _fmt_t(t: float | None) -> str:
    return "unknown exposure" if t is None else f"{t:g} s"


__all__ = ["CalibrationParams", "MasterEntry", "MasterError", "MasterLibrary", "Spill", "build_library",
           "cold_pixels_from_flat", "combine_block", "combine_spill", "discover", "group_key",
           "hot_pixels_from_dark", "kind_from_folder", "site_means", "write_master"]
