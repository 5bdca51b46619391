"""path -> Frame: RAW through rawpy (LibRaw) + exifread, FITS through astropy.

Never ``postprocess()``: it is non-linear.  The CFA mosaic is taken as LibRaw decodes it
(``raw_image_visible``), with the black level of each CFA position and the white level — or, for a DNG that
stores its samples plainly, straight from the file, once LibRaw's reading of that layout has been found to be
the same (_plain_dng).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .frame import CFA_PATTERNS, Frame, FrameError, FrameMeta
from .quiet import quiet_warnings

RAW_SUFFIXES = frozenset(
    ".cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .dng .raf .orf .rw2 .pef .srw .x3f .3fr .erf .kdc .mef .mos "
    ".mrw .raw .rwl .iiq .fff".split()
)
FITS_SUFFIXES = frozenset(".fits .fit .fts .fits.fz .fit.fz .fz".split())

log = logging.getLogger("livestack")


def _decoder_errors() -> tuple[type[BaseException], ...]:
    """What astropy's decoders raise on damaged bytes besides OSError/ValueError: the tile decompressor's
    CfitsioException (a .fits.fz whose compressed tiles were overwritten: "hit end of compressed byte stream"),
    zipfile's BadZipFile (a file starting with PK\\3\\4 is opened as a zip archive), zlib.error and EOFError
    (a gzip or bzip2 stream cut short)."""
    import zipfile
    import zlib

    errors: list[type[BaseException]] = [zipfile.BadZipFile, zlib.error, EOFError]
    try:
        from astropy.io.fits.hdu.compressed._compression import CfitsioException
        errors.append(CfitsioException)
    except ImportError:     # (a private module: another astropy may lack it; then nothing to add)
        pass
    return tuple(errors)


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    for s in (".fits.fz", ".fit.fz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_supported(path: Path) -> bool:
    s = suffix_of(Path(path))
    return s in RAW_SUFFIXES or s in FITS_SUFFIXES


def read_frame(path: Path | str, *, out: np.ndarray | None = None, max_megapixels: float | None = None,
               speculate: bool = False) -> Frame:
    """Read one RAW or FITS file.

    Returns a Frame with float32 (H, W) data, written into ``out`` when it is a float32 array of the right
    shape (a live stacker reads frame after frame of one size: a warm buffer saves the page faults of a new
    96 MB plane at 24 MP), RAW or FITS.  Raises FrameError (one line: file + reason) for anything that
    is not a readable single image: missing, empty, truncated, corrupt, not an image, unsupported layout —
    and for an image larger than ``max_megapixels`` (None: default_max_megapixels()), refused from its header
    before any pixel is read or decompressed (a 20 GB sparse FITS, a 256 KB .fits.fz of 16000 × 16000).

    ``speculate``: the first plain DNG of a layout (_plain_dng) is read from its file at once while LibRaw's
    reading of it is checked in a thread beside (_check_beside), instead of LibRaw-read and checked first; the
    Frame's ``verify`` then says whether its pixels stand — the caller asks before they count for anything, and
    reads the file again when they do not (False: the layout is LibRaw's after all, or the check could not end).
    """
    path = Path(path)
    if not path.exists():
        raise FrameError(path, "file not found")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise FrameError(path, f"not a regular file (a {_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise FrameError(path, "empty file (0 bytes)")
    limit = _Limit(max_megapixels)
    s = suffix_of(path)
    if s in FITS_SUFFIXES:
        if (why := fits_impossible(path)) is not None:
            raise FrameError(path, why)
        return _checked_levels(_read_fits(path, out, limit))
    if s in RAW_SUFFIXES:
        return _checked_levels(_read_raw(path, out, limit, speculate))
    raise FrameError(path, f"unsupported file type '{s or path.name}' (expected a camera RAW or FITS file)")


def _checked_levels(frame: Frame) -> Frame:
    """``frame``, unless its black level cannot be one: not a number, or as large as the white level (either
    way).  A header's damaged level (one byte of a DNG's BlackLevel overwritten: 655360000; a FITS BLKLEVEL of
    1e9, a SATURATE of 0) is otherwise used as it says: calibrated values of −6.5e8 keep only float32's steps of
    64 ADU, the background then looks noiseless, and that frame's inverse-variance weight (thousands against 1)
    makes the stack its own; or every pixel is flagged saturated and the frame, "stacked", adds nothing."""
    black = frame.black
    if not np.isfinite(black).all():
        raise FrameError(frame.path, "black level is not a number (the file's levels are damaged)")
    top = float(np.abs(black).max())
    if np.isfinite(frame.white) and top >= frame.white:
        raise FrameError(frame.path, f"black level {top:g} is not below the white level {frame.white:g} "
                                     "(the file's levels are damaged)")
    return frame


def _file_kind(mode: int) -> str:
    return ("directory" if stat.S_ISDIR(mode) else "named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "socket" if stat.S_ISSOCK(mode)
            else "special file")


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` (through symbolic links) is a regular file: the only kind a header is read from.  Opening
    a named pipe waits for a writer, for ever; reading a device such as /dev/zero never ends."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- the size limit

def default_max_megapixels() -> int:
    """The largest frame, in megapixels, read by default: this machine's memory (the smaller of the RAM and the
    cgroup's memory.max, e.g. systemd's MemoryMax=) / 16 bytes a pixel / 4, and at least 50 MP.  A frame costs
    ~16 bytes a pixel on its way through the pipeline (float32 CFA, RGB planes, warped planes) and the stacks
    are as large again: the frame may take at most a quarter of the memory.  A 4 GB Pi: 62 MP; MemoryMax=2800M:
    50 MP; 16 GB: 250 MP — above every camera sensor (the largest are ~150 MP)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cg = _cgroup_memory_max()
    if cg is not None:
        mem = min(mem, cg)
    return max(50, int(mem / 16 / 4 / 1e6))


def _cgroup_memory_max() -> int | None:
    """memory.max of this process's cgroup (v2), None when there is none or it is unlimited."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
        if rel is None:
            return None
        with open(f"/sys/fs/cgroup{rel.rstrip('/')}/memory.max") as f:
            v = f.read().strip()
        return int(v) if v.isdigit() else None
    except (OSError, ValueError):
        return None


class _Limit:
    """The pixel limit of one read: checks a size from a header, refuses with one line naming the file."""

    def __init__(self, max_megapixels: float | None):
        self.configured = max_megapixels is not None
        self.mp = float(max_megapixels) if max_megapixels is not None else float(default_max_megapixels())

    def check(self, path: Path, width: int, height: int, planes: int = 1) -> None:
        n = width * height * planes
        if n <= self.mp * 1e6:
            return
        where = "[engine] max_megapixels" if self.configured else \
            "from this machine's memory; [engine] max_megapixels sets it"
        size = f"{width}×{height}" + (f"×{planes}" if planes > 1 else "")
        raise FrameError(path, f"{size} pixels ({n / 1e6:.0f} MP) is above the limit of {self.mp:g} MP "
                               f"({where}); refused before reading")


# ---------------------------------------------------------------- RAW

@contextlib.contextmanager
def _utf8_path(path: Path):
    """A name LibRaw can open for ``path``: rawpy passes it on as UTF-8, which a name with a byte that is not
    UTF-8 (a FAT card's Latin-1 é, which Python holds as a lone surrogate) has not — that file is opened here and
    LibRaw given /proc/self/fd/N, the same file by an ASCII name."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name


def _read_raw(path: Path, out: np.ndarray | None, limit: _Limit, speculate: bool = False) -> Frame:
    import rawpy

    try:
        with _utf8_path(path) as name, rawpy.imread(name) as raw:   # the header only: unpack() comes with raw_image*
            limit.check(path, raw.sizes.raw_width, raw.sizes.raw_height)
            plain = _plain_dng(path, raw) if path.suffix.lower() == ".dng" else None
            verdict, busy = (None, None) if plain is None else _plain_verdict(plain.key, wait=not speculate)
            verify = None
            if busy is not None:            # another reader checks the layout: its verdict will say
                verify = _verdict_when(busy, plain.key)
            elif verdict is None and plain is not None and speculate:   # this reader checks it, beside
                verify = _check_beside(path, raw.sizes, plain)
            if verdict or verify is not None:
                # LibRaw's own reading of this layout was checked to be the file's, or is being checked (the
                # Frame's verify says): no unpack (see _plain_dng)
                data = _plain_pixels(path, raw.sizes, plain, out)
                pattern, black, white = plain.pattern, plain.black, plain.white
            elif verdict is None and plain is not None:     # this reader checks the layout on this file
                try:
                    data, pattern, black, white = _libraw_pixels(path, raw, out)
                    _check_plain(path, raw.sizes, plain, data, pattern, black, white)
                finally:
                    _plain_check_done(plain.key)
            else:
                data, pattern, black, white = _libraw_pixels(path, raw, out)
    except FrameError:
        raise
    except rawpy.LibRawError as err:  # LibRawFileUnsupportedError, LibRawIOError, LibRawDataError, …
        why = _libraw_text(err)
        if isinstance(err, rawpy.LibRawIOError):   # LibRaw: LIBRAW_EXCEPTION_IO_EOF / IO_BADFILE, not a disk fault
            why += ": the file ends before its image data (cut short, or a damaged header)"
        raise FrameError(path, f"unreadable RAW ({type(err).__name__}: {why})") from err
    except (OSError, ValueError) as err:
        raise FrameError(path, f"unreadable RAW ({err})") from err
    if data.ndim != 2 or min(data.shape) < 16:
        raise FrameError(path, f"RAW image has an unusable shape {data.shape}")
    repeated = _repeated_rows(data)
    if repeated:
        raise FrameError(path, f"RAW cut short: its last {repeated} rows repeat one pair of rows (LibRaw fills "
                               f"the rows a truncated file lacks)")
    meta = _exif_meta(path)
    meta.kind = "raw"
    return Frame(path, data, pattern, black, white, _saturated(data, white), meta, verify=verify)


def _libraw_pixels(path: Path, raw, out: np.ndarray | None) -> tuple[np.ndarray, str, np.ndarray, float]:
    """LibRaw's unpack of an open RAW file: its visible CFA image as float32 (into ``out`` when it fits), pattern,
    (2, 2) black and white level."""
    pattern, black, white = _libraw_levels(path, raw)
    visible = raw.raw_image_visible              # a view: it dies with `raw`, so copy once
    if out is not None and out.shape == visible.shape and out.dtype == np.float32:
        data = out
        np.copyto(data, visible, casting="unsafe")
    else:
        data = visible.astype(np.float32)
    return data, pattern, black, white


def _libraw_levels(path: Path, raw) -> tuple[str, np.ndarray, float]:
    """LibRaw's pattern, (2, 2) black and white level of an open RAW file (which it unpacks for them)."""
    import rawpy

    if raw.raw_type != rawpy.RawType.Flat:
        raise FrameError(path, "not a single-mosaic RAW (LibRaw reports a stacked/linear layout)")
    colors = _colors_2x2(raw)
    pattern = _pattern_from_colors(colors, raw.color_desc.decode("ascii", "replace"))
    return pattern, _black_2x2(raw, colors), float(raw.white_level)


def _check_beside(path: Path, sizes, plain: "_PlainDng"):
    """_check_plain of ``path`` in a thread of its own, for a reader that holds the layout's check
    (_plain_verdict gave it None) and reads the file from its tags meanwhile: -> ``verify()``, which waits for
    the check and says whether the layout reads as LibRaw reads it.  The first file of a run was LibRaw-read
    and checked before anything else could start on it: 0.2–0.25 s of its critical path at 24 MP (LibRaw's
    unpack, the comparison); beside, they overlap its calibration and star search.  The comparison is of
    LibRaw's own 16-bit samples (no float32 copy of them)."""
    def check() -> None:
        import rawpy

        try:
            with _utf8_path(path) as name, rawpy.imread(name) as raw:
                pattern, black, white = _libraw_levels(path, raw)
                _check_plain(path, sizes, plain, raw.raw_image_visible, pattern, black, white)
        except Exception as err:      # noqa: BLE001 — no verdict: the caller reads the file again, as ever
            log.debug("%s: LibRaw's reading could not be checked: %s", path.name, err)
        finally:
            _plain_check_done(plain.key)

    with _PLAIN_LOCK:
        done = _PLAIN_CHECKING[plain.key]       # (this reader's: _plain_verdict gave it the check)
    threading.Thread(target=check, name="dng-check", daemon=True).start()
    return _verdict_when(done, plain.key)


@dataclass(frozen=True)
class _PlainDng:
    """Where a DNG's CFA image lies in its file when it is stored plainly, and what its tags say of it."""
    offset: int                 # of the first sample (the strips follow each other from there)
    dtype: np.dtype             # 16-bit, the file's byte order
    pattern: str                # at the visible area's first pixel
    black: np.ndarray           # (2, 2) at the visible area's first 2×2 pixels
    white: float
    key: tuple                  # everything of the file's layout but its black and white levels' values


# _PlainDng.key -> whether LibRaw read a file of that layout as _plain_dng does (pixels, pattern and levels)
_PLAIN_CHECKED: dict[tuple, bool] = {}
_PLAIN_KEEP = 64                # layouts remembered (a night has one a camera)
_PLAIN_LOCK = threading.Lock()
_PLAIN_CHECKING: dict[tuple, threading.Event] = {}     # layouts a reader is checking now -> set when it is done
_PLAIN_WAIT = 10.0              # s a reader waits for another's check before reading with LibRaw unchecked


def _plain_verdict(key: tuple, *, wait: bool = True) -> tuple[bool | None, threading.Event | None]:
    """Whether LibRaw reads files of layout ``key`` as _plain_dng does: (True or False, None) once a file of it
    was checked; (None, None) when none was — the caller then checks its file (_check_plain, _check_beside) and
    calls _plain_check_done.  While another reader checks the layout this waits for its verdict (the read-ahead
    thread's second file of a run, whose read began beside the first's: a second LibRaw unpack and check of the
    same layout cost the run's start ~0.2 s of CPU) — or, not ``wait``, returns (None, the event set when that
    check ends).  A check that ends without a verdict (the file changed under it) hands the check on to a
    reader waiting; one that takes longer than _PLAIN_WAIT: (False, None)."""
    while True:
        with _PLAIN_LOCK:
            verdict = _PLAIN_CHECKED.get(key)
            if verdict is not None:
                return verdict, None
            busy = _PLAIN_CHECKING.get(key)
            if busy is None:
                _PLAIN_CHECKING[key] = threading.Event()
                return None, None
        if not wait:
            return None, busy
        if not busy.wait(_PLAIN_WAIT):
            return False, None


def _verdict_when(done: threading.Event, key: tuple):
    """verify() for a Frame read from its tags before its layout's check ends (set ``done``): waits for it and
    says whether the layout reads as LibRaw reads it (False too when the check ended without a verdict)."""
    def verify() -> bool:
        done.wait()
        with _PLAIN_LOCK:
            return bool(_PLAIN_CHECKED.get(key))

    return verify


def _plain_check_done(key: tuple) -> None:
    """The reader that _plain_verdict gave layout ``key``'s check is done with it (with or without a verdict)."""
    with _PLAIN_LOCK:
        busy = _PLAIN_CHECKING.pop(key, None)
    if busy is not None:
        busy.set()


def _plain_dng(path: Path, raw) -> _PlainDng | None:
    """A DNG whose CFA image is stored plainly — uncompressed 16-bit samples, one a pixel, in strips that follow
    each other, no linearization table, levels without per-row or per-column deltas or masked areas (phones'
    RAW files, DNG Converter's uncompressed option, the simulator's) — as _PlainDng; None for any other file.

    LibRaw unpacks such a file a pixel at a time (0.16–0.17 s at 24 MP here, on the read-ahead thread, where
    it was a tenth of a frame's CPU time) into the file's own samples; read and converted a block of rows at a
    time (_plain_rows) they take ~0.03 s.  The pattern and levels come from the tags (LibRaw gives its own only
    after an unpack), read as LibRaw reads them — which _check_plain confirms on the first file of each layout
    (LibRaw-read and checked first, or read from its tags and checked beside: _check_beside): no file of the
    layout skips the unpack for good until it has (_PLAIN_CHECKED).  ``raw``: LibRaw's header of the file (its
    sizes and margins place the visible area)."""
    import tifffile

    s = raw.sizes
    try:
        with _TIFF_LOG.reading(path), tifffile.TiffFile(path) as tif:
            pages = []
            for top in tif.pages:
                pages += [top, *(top.pages if top.subifds else ())]
            cfa = [pg for pg in pages if pg.photometric == 32803 and pg.subfiletype == 0]
            if len(cfa) != 1:
                return None
            pg = cfa[0]
            tags = {t.code: t.value for t in pg.tags}
            if not (pg.compression == 1 and pg.bitspersample == 16 and pg.samplesperpixel == 1
                    and pg.fillorder == 1 and pg.predictor == 1 and not pg.is_tiled
                    and (pg.imagelength, pg.imagewidth) == (s.raw_height, s.raw_width)
                    # LinearizationTable, BlackLevelDeltaH and V, MaskedAreas (levels measured from pixels)
                    and not {50712, 50715, 50716, 50830} & tags.keys()):
                return None
            offsets = [int(o) for o in pg.dataoffsets]
            counts = [int(c) for c in pg.databytecounts]
            size = 2 * s.raw_height * s.raw_width
            if sum(counts) != size or any(o + c != n for o, c, n in zip(offsets, counts, offsets[1:])) \
                    or offsets[0] + size > tif.filehandle.size:
                return None          # scattered strips, or a file cut short: LibRaw's own verdict on it
            area = _ints(tags.get(50829, (0, 0)))                   # ActiveArea: the pattern's origin
            rational = pg.tags[50714].dtype in (5, 10) if 50714 in tags else False
            levels = _plain_levels(tags, s.top_margin - area[0], s.left_margin - area[1], rational)
            if levels is None:
                return None
            pattern, black, white = levels
            ifd0 = {t.code: t.value for t in tif.pages[0].tags}
            layout = tuple((c, _ints(tags.get(c))) for c in _LAYOUT_TAGS) + \
                tuple((c, ifd0.get(c)) for c in (271, 272, 50706, 50708))    # Make, Model, DNG version, camera
            key = (tif.byteorder, tuple(s), raw.color_desc, offsets[0], layout)
            return _PlainDng(offsets[0], np.dtype(tif.byteorder + "u2"), pattern, black, white, key)
    except Exception:   # noqa: BLE001 — tifffile raises many types on an odd file; LibRaw then reads it
        return None


# the CFA IFD's tags a layout is told by: the image's size, sample format and strips' height, its pattern,
# where its black levels repeat, its active area and default crop (not the levels' values: a camera may
# measure its black level for each frame)
_LAYOUT_TAGS = (256, 257, 258, 259, 262, 277, 278, 284, 33421, 33422, 50710, 50711, 50713, 50719, 50720, 50829)


def _ints(value) -> tuple | None:
    """A tag's value as a flat tuple of numbers (tifffile gives BYTE arrays as bytes), None when absent."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, bytes) else tuple(np.ravel(value).tolist())


def _plain_levels(tags: dict, top: int, left: int, rational: bool = False) -> tuple[str, np.ndarray, float] | None:
    """(pattern, black (2, 2), white) of the visible area starting ``top`` rows and ``left`` columns from the
    active area's corner (where DNG's CFA and black-level patterns start, as LibRaw reads them), from a CFA
    IFD's tags (code -> value; ``rational``: BlackLevel's are (numerator, denominator) pairs); None where they
    are not a 2×2 Bayer pattern of R, G and B with whole black levels repeating every 1 or 2 pixels."""
    if _ints(tags.get(33421)) != (2, 2) or _ints(tags.get(50711, 1)) != (1,):   # CFARepeatPatternDim, CFALayout
        return None
    planes = _ints(tags.get(50710, (0, 1, 2)))                                   # CFAPlaneColor
    cfa = _ints(tags.get(33422, ()))                                             # CFAPattern
    dims = _ints(tags.get(50713, (1, 1)))                                        # BlackLevelRepeatDim
    if sorted(planes) != [0, 1, 2] or len(cfa) != 4 or not set(cfa) <= {0, 1, 2} or len(dims) != 2:
        return None
    rows, cols = dims
    level = np.asarray(_ints(tags.get(50714, 0)), np.float64)                    # BlackLevel
    if rational:
        level = level[0::2] / level[1::2]
    if rows not in (1, 2) or cols not in (1, 2) or level.size != rows * cols or np.any(level != np.round(level)):
        return None
    white = _ints(tags.get(50717, 65535))                                        # WhiteLevel
    if len(white) != 1:
        return None
    ii, jj = (top + np.arange(2)) % 2, (left + np.arange(2)) % 2
    pattern = "".join("RGB"[planes[cfa[2 * i + j]]] for i in ii for j in jj)
    if pattern not in CFA_PATTERNS:
        return None
    black = level.reshape(rows, cols)[np.ix_((top + np.arange(2)) % rows, (left + np.arange(2)) % cols)]
    return pattern, black.astype(np.float32), float(white[0])


def _plain_pixels(path: Path, sizes, plain: _PlainDng, out: np.ndarray | None) -> np.ndarray:
    """The visible mosaic of a plain DNG as float32 (into ``out`` when it has the shape)."""
    data = _float32_into(out, (sizes.height, sizes.width))
    for r0, rows in _plain_rows(path, sizes, plain):
        np.copyto(data[r0:r0 + len(rows)], rows, casting="unsafe")
    return data


def _plain_rows(path: Path, sizes, plain: _PlainDng, block: int = 256):
    """(r0, rows r0… of the visible mosaic of a plain DNG as uint16), a block of rows at a time, read into one
    buffer of the block's size (~3 MB at 24 MP), which the next block overwrites.  Read, not mapped: a file
    cut while mapped would kill the process (SIGBUS); cut while read, it raises OSError."""
    w = sizes.raw_width
    buf = np.empty((min(block, sizes.height), w), plain.dtype)
    with open(path, "rb", buffering=0) as f:
        for r0 in range(0, sizes.height, block):
            n = min(block, sizes.height - r0)
            part = buf[:n]
            f.seek(plain.offset + (sizes.top_margin + r0) * w * 2)
            if f.readinto(part) != part.nbytes:
                raise OSError(f"the file ends inside its image data (row {sizes.top_margin + r0 + n})")
            yield r0, part[:, sizes.left_margin:sizes.left_margin + sizes.width]


def _check_plain(path: Path, sizes, plain: _PlainDng, data: np.ndarray, pattern, black, white) -> None:
    """Whether LibRaw's reading of ``path`` (``data``, ``pattern``, ``black``, ``white``) is _plain_dng's, for
    the file's layout: remembered in _PLAIN_CHECKED (a layout LibRaw reads otherwise keeps LibRaw)."""
    try:
        same = pattern == plain.pattern and np.array_equal(black, plain.black) and white == plain.white \
            and data.shape == (sizes.height, sizes.width) \
            and all(np.array_equal(rows, data[r0:r0 + len(rows)]) for r0, rows in _plain_rows(path, sizes, plain))
    except OSError:     # the file changed since LibRaw read it: the next file of the layout is checked
        return
    if not same:
        log.debug("%s: LibRaw reads this DNG's layout otherwise than its tags say; LibRaw keeps reading it",
                  path.name)
    with _PLAIN_LOCK:
        while len(_PLAIN_CHECKED) >= _PLAIN_KEEP:
            _PLAIN_CHECKED.pop(next(iter(_PLAIN_CHECKED)))
        _PLAIN_CHECKED[plain.key] = same


def _repeated_rows(data: np.ndarray) -> int:
    """How many rows at the bottom are copies of the rows two above them (0 for a whole frame).  LibRaw decodes
    a truncated compressed RAW (a Sony ARW cut at any point) without an error, repeating the last rows it
    decoded; a sensor's noise never repeats a row of thousands of pixels — unless it holds one value
    (clipped, or zero), which proves nothing."""
    h = data.shape[0]
    n = 0
    while n < h - 2 and np.array_equal(data[h - 1 - n], data[h - 3 - n]):
        n += 1
    if n < 4 or float(data[h - 1].min()) == float(data[h - 1].max()):
        return 0
    return n


def _libraw_text(err: Exception) -> str:
    """LibRaw's message as text: rawpy passes it as bytes (str() would show b'…')."""
    msg = err.args[0] if len(err.args) == 1 else str(err)
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)


def _colors_2x2(raw) -> np.ndarray:
    """LibRaw's colour index of the visible image's first 2×2 pixels: ``raw_colors_visible[:2, :2]`` without the
    (H, W) map rawpy builds for it (the pattern tiled over the whole sensor: 20–40 ms and 24 MB at 24 MP)."""
    pattern, s = raw.raw_pattern, raw.sizes
    n = pattern.shape[0]
    return pattern[np.ix_((s.top_margin + np.arange(2)) % n, (s.left_margin + np.arange(2)) % n)]


def _pattern_from_colors(colors: np.ndarray, desc: str) -> str | None:
    """CFA pattern of pixel (0,0) from LibRaw's per-pixel colour indices (2 is blue, 0 red, 1 and 3 green)."""
    if colors.shape[0] < 2 or colors.shape[1] < 2:
        return None
    letters = "".join(desc[int(c)] if int(c) < len(desc) else "?" for c in colors[:2, :2].ravel())
    letters = letters.replace("?", "G")
    if letters in CFA_PATTERNS:
        return letters
    if len(set(desc)) == 1 or letters.count("G") == 4:
        return None  # monochrome sensor (e.g. a debayer-less conversion)
    # X-Trans and other non-2x2 mosaics: LibRaw exposes them, we do not debayer them yet.
    raise ValueError(f"unsupported colour filter array '{letters}' (only 2x2 Bayer patterns are supported)")


def _black_2x2(raw, colors: np.ndarray) -> np.ndarray:
    per = np.asarray(raw.black_level_per_channel, dtype=np.float32)
    black = np.zeros((2, 2), np.float32)
    for i in range(2):
        for j in range(2):
            c = int(colors[i, j])
            black[i, j] = per[c] if c < per.size else per[0]
    return black


class _LibraryLog(logging.Filter):
    """A library that logs its complaints at WARNING without the file's name — exifread ("File format not
    recognized."), tifffile (an odd tag): while this thread reads a file with it (``reading``), they are logged
    again at DEBUG, naming the file and ``what`` was not read; its own tracing below WARNING (exifread: a line
    per tag when the root logger is at DEBUG) is dropped.  The file's reading says what matters of it."""

    def __init__(self, logger: str, what: str):
        super().__init__()
        self.logger, self.what, self.local = logger, what, threading.local()

    @contextlib.contextmanager
    def reading(self, path: Path):
        lib = logging.getLogger(self.logger)
        if self not in lib.filters:
            lib.addFilter(self)
        self.local.path = path
        try:
            yield
        finally:
            self.local.path = None

    def filter(self, record: logging.LogRecord) -> bool:
        path = getattr(self.local, "path", None)
        if path is None:
            return True
        if record.levelno >= logging.WARNING:
            log.debug("%s: %s (%s)", path.name, self.what, record.getMessage())
        return False


_EXIF_LOG = _LibraryLog("exifread", "EXIF not read")
_TIFF_LOG = _LibraryLog("tifffile", "DNG tags not read")


def _exif_meta(path: Path) -> FrameMeta:
    import exifread

    meta = FrameMeta()
    try:
        with _EXIF_LOG.reading(path), open(path, "rb") as f, quiet_warnings():
            tags = exifread.process_file(f, details=False)
    except Exception:  # exifread raises assorted errors on odd makernotes; EXIF is optional
        return meta

    def tag(*names):
        for n in names:
            for prefix in ("EXIF ", "Image "):
                if prefix + n in tags:
                    return tags[prefix + n]
        return None

    t = tag("ExposureTime")
    if t is not None:
        meta.exptime = _exposure(_ratio(t))
    iso = tag("ISOSpeedRatings", "PhotographicSensitivity", "ISOSpeed")
    if iso is not None:
        try:
            meta.iso = int(str(iso).split(",")[0].strip("[] "))
        except ValueError:
            pass
    d = tag("DateTimeOriginal", "DateTime")
    if d is not None:
        try:
            meta.time = dt.datetime.strptime(str(d).strip(), "%Y:%m:%d %H:%M:%S")
        except ValueError:
            pass
    make, model = tag("Make"), tag("Model")
    cam = " ".join(str(x).strip() for x in (make, model) if x is not None and str(x).strip())
    meta.camera = cam or None
    meta.imagetyp = None
    return meta


# The longest exposure a single frame is taken to have: a value beyond it is a damaged or misread header (a
# fuzzed EXPTIME = 1e300 put a 300-digit integration in the summary and made the frame a settings group of its
# own, judged against an expectation scaled by 1e298), not an exposure.  A day: no sub-frame is longer.
MAX_EXPOSURE_S = 86400.0


def _exposure(t: float | None) -> float | None:
    """An exposure in seconds as read, or None (unknown) when it cannot be one: negative, not finite, longer than
    MAX_EXPOSURE_S."""
    if t is None or not math.isfinite(t) or t < 0 or t > MAX_EXPOSURE_S:
        return None
    return t


def _ratio(t) -> float | None:
    """An EXIF rational (exifread's Ratio, or its text '1/640') as a float; None when unusable."""
    try:
        v = t.values[0]
        return float(v.num) / float(v.den) if hasattr(v, "num") else float(v)
    except (IndexError, ZeroDivisionError, TypeError, ValueError):
        n, _, d = str(t).partition("/")
        try:
            return float(n) / float(d or 1)
        except (ValueError, ZeroDivisionError):
            return None


# ---------------------------------------------------------------- FITS

_IMAGETYP = {
    "light": "light", "light frame": "light", "object": "light", "science": "light",
    "dark": "dark", "dark frame": "dark",
    "bias": "bias", "bias frame": "bias", "zero": "bias", "offset": "bias",
    "flat": "flat", "flat field": "flat", "flat frame": "flat", "skyflat": "flat", "domeflat": "flat",
    "dark flat": "darkflat", "darkflat": "darkflat", "flat dark": "darkflat", "flatdark": "darkflat",
}


def _read_fits(path: Path, out: np.ndarray | None, limit: _Limit) -> Frame:
    from astropy.io import fits

    try:
        with quiet_warnings():  # astropy warns about non-standard cards from capture software
            # A camera's integers are read as stored and made float32 in one pass (_integer_pixels); anything
            # else (BSCALE, BLANK, floats, tile compression) as astropy scales it, in a second opening.
            with fits.open(path, memmap=False, do_not_scale_image_data=True) as hdul:
                hdu, header = _image_hdu(hdul, path, limit)
                section, notes = data_section(header, _fits_shape(hdu)[-2:])
                data = _integer_pixels(hdu, header, path, out, section)
            exact = data is not None            # integers as stored: finite, and within their type's range
            if not exact:
                with fits.open(path, memmap=False) as hdul:
                    hdu, header = _image_hdu(hdul, path, limit)
                    data = _scaled_pixels(hdu, header, path, out, section)
            int_input = header.get("BITPIX", -32) > 0
    except FrameError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError, fits.VerifyError, *_decoder_errors()) as err:
        raise FrameError(path, _fits_reason(path, err)) from err
    header = parsed_cards(header)
    for note in notes:
        log.warning("%s: %s; the frame is read whole", path.name, note)
    if section is not None:
        header = trimmed_header(header, section)
    if min(data.shape) < 16:
        raise FrameError(path, f"FITS image too small {data.shape}"
                               + (f" (its {section.key} {section.text})" if section is not None else ""))
    if not exact and not np.isfinite(data).all():       # (BLANK pixels are NaN once astropy scales them)
        np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0)

    pattern = _fits_pattern(header, path)
    if str(header.get("ROWORDER", "TOP-DOWN")).strip().upper() == "BOTTOM-UP":
        if pattern is not None and data.shape[0] % 2 == 1:      # (flipped above)
            pattern = _shift_pattern(pattern, 0, 1)

    meta = FrameMeta(kind="fits")
    for key in ("EXPTIME", "EXPOSURE", "EXP_TIME"):
        t = _exposure(_num(header.get(key)))
        if t is not None:
            meta.exptime = t
            break
    meta.gain = _num(header.get("GAIN"))
    iso = _num(header.get("ISOSPEED", header.get("ISO")))
    meta.iso = int(iso) if iso is not None else None
    meta.temperature = _num(header.get("CCD-TEMP", header.get("CCD_TEMP", header.get("SET-TEMP"))))
    meta.time = _fits_time(header)
    cam = header.get("INSTRUME") or header.get("CAMERA")
    meta.camera = str(cam).strip() or None if cam is not None else None
    filt = header.get("FILTER")
    if filt is not None and str(filt).strip().upper() not in CFA_PATTERNS:
        meta.filter = str(filt).strip() or None
    typ = header.get("IMAGETYP", header.get("FRAMETYP", header.get("OBSTYPE")))
    if typ is not None:
        meta.imagetyp = _IMAGETYP.get(str(typ).strip().lower())
    for k in ("XBINNING", "YBINNING", "XPIXSZ", "YPIXSZ", "FOCALLEN", "OBJECT", "TELESCOP", "ROWORDER", "OFFSET"):
        if k in header:
            meta.extra[k] = header[k]
    meta.pointing = header_pointing(header)
    if "CTYPE1" in header and "CTYPE2" in header:
        from .solve import header_wcs      # astropy.wcs: only for files that carry a WCS

        meta.wcs = header_wcs(header, data.shape)
    obj = str(header.get("OBJECT", "") or "").strip()
    meta.object = obj or None

    # Levels.  Integer FITS from a camera: white = SATURATE when given, else the integer range (DATAMAX is the
    # largest value present, not the saturation level) — 255 for a camera's RAW8 (BITPIX 8, unscaled), else 16
    # or 32 bits; float data: no saturation flag without SATURATE.
    white = _num(header.get("SATURATE"))
    if white is None:
        if int_input and header.get("BITPIX") == 8 and header.get("BZERO", 0) == 0 \
                and header.get("BSCALE", 1) == 1:
            white = 255.0
        elif int_input:
            bits = 16 if (exact and _largest(header) < 65536) or data.max(initial=0) < 65536 else 32
            white = float(2 ** bits - 1)
        else:
            white = float("inf")
            if _normalised_float(data, header):
                # Siril's and PixInsight's float images (a master dark or flat made there, a calibrated light)
                # are 0…1 for the camera's 16-bit range: in ADU, like everything else here (a master dark of
                # 0.002 subtracted from lights in ADU would take nothing off)
                data *= np.float32(65535)
                white = 65535.0
    black_val = _num(header.get("BLKLEVEL", header.get("BLACKLEV")))
    if black_val is None:
        ped = _num(header.get("PEDESTAL"))  # MaxIm: PEDESTAL = minus the offset it added to the data
        black_val = -ped if ped is not None and ped < 0 else 0.0
    black = np.full((2, 2), black_val, np.float32)
    clip = white
    if camera_16_bit(header) and "SATURATE" not in header:
        clip = white - FULL_SCALE_MARGIN
    return Frame(path, data, pattern, black, white, _saturated(data, clip), meta)


# Header cards that name the program that wrote a file (Siril: PROGRAM; PixInsight, others: SWCREATE, CREATOR)
_WRITER_CARDS = ("PROGRAM", "SWCREATE", "CREATOR", "SOFTWARE", "ORIGIN")


def _normalised_float(data: np.ndarray, header) -> bool:
    """Whether a float image (no SATURATE) holds 0…1 of a 16-bit range, as Siril and PixInsight write them,
    rather than ADU.  Its largest value alone decided, and a few pixels just above 1 (a hot pixel, a calibrated
    frame's overshoot, a flat peaking at 1.02) put a frame of a 0…1 set into other units than its siblings
    peaking at 0.98.  So: largest value in (0, 1] — as before —, or the bulk within 0…1: a median in 0…1 and
    at most 0.1 % of the pixels above 1 or below 0 (1 % when a writer card names Siril or PixInsight).  ADU data
    is not taken for it: a light's or a bias's median is hundreds of ADU, a flat normalised to mean 1 has half
    its pixels above 1, and a bias-subtracted dark in ADU has its noise below 0.  Cost: one pass for the
    maximum as before; one more count only for the rare image whose median (of a 16×16 grid) is in 0…1."""
    top = float(np.nanmax(data, initial=0.0))
    if top <= 0.0:
        return False
    if top <= 1.0:
        return True
    if not 0.0 <= float(np.median(data[::16, ::16])) <= 1.0:      # (94 k pixels of 24 M: ~1 ms)
        return False
    writer = " ".join(str(header.get(k, "")) for k in _WRITER_CARDS).lower()
    share = 0.01 if "siril" in writer or "pixinsight" in writer else 0.001
    outside = np.count_nonzero(data > 1.0) + np.count_nonzero(data < 0.0)
    return outside <= share * data.size


def _fits_reason(path: Path, err: Exception) -> str:
    """Why a FITS file could not be read, in words.  astropy's message says it for most files, not for the most
    common damage, a file cut short (a copy or a capture interrupted): "cannot reshape array of size 48560 into
    shape (480,640)", "decompression error" or "[Errno 22] Invalid argument"; nor for a header value that is no
    FITS type (BITPIX = 12: "12", a KeyError)."""
    cut = _cut_short(path)
    if cut is not None:
        return cut
    if str(err).startswith("No SIMPLE card found"):     # (astropy goes on: "try with ignore_missing_simple=True")
        return "not a FITS file (it does not start with a SIMPLE card)"
    if isinstance(err, KeyError):
        return f"unreadable FITS (a header card is missing or has a value FITS does not define: {err})"
    return f"unreadable FITS ({err})"


def _cut_short(path: Path) -> str | None:
    """'FITS file cut short: …' when the file ends before the data its headers declare, else None."""
    from astropy.io import fits

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            simple = f.read(6) == b"SIMPLE"
        if simple and size < 2880:
            return f"FITS file cut short: {size:,} bytes, less than its first 2880-byte header block"
        if simple:
            primary = _primary_layout(path)
            if primary is not None and size < primary[0] + primary[1]:
                start, data, shape = primary
                if data > 2 ** 40:      # no camera's frame: a damaged NAXISn, not a cut
                    dims = "×".join(f"{n:,}" for n in reversed(shape))
                    return f"damaged FITS header: it declares {dims} pixels ({data:,} bytes) in a file of {size:,}"
                return (f"FITS file cut short: {size:,} bytes where its header declares {start + data:,} "
                        "(an interrupted write or copy?)")
        with quiet_warnings(), fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            i = 0
            while True:
                try:
                    hdu = hdul[i]
                    info = hdul.fileinfo(i)
                except (IndexError, OSError, ValueError, TypeError, KeyError):
                    return None             # no further HDU (or one that is damaged, not missing)
                start = int(info["datLoc"])
                h = hdu.header
                if type(hdu) in (fits.PrimaryHDU, fits.ImageHDU) and h.get("BITPIX") in (8, 16, 32, 64, -32, -64):
                    # the pixels without the padding to 2880 bytes (a file without its padding is read)
                    need = start + abs(h["BITPIX"]) // 8 * int(np.prod(_fits_shape(hdu), dtype=np.int64))
                else:       # a table, or a tile-compressed image (the table holding its tiles): rows + heap
                    t = getattr(hdu, "_bintable", hdu).header
                    need = start + int(t.get("NAXIS1", 0)) * int(t.get("NAXIS2", 0)) + int(t.get("PCOUNT", 0))
                if size < need:
                    return (f"FITS file cut short: {size:,} bytes where its header declares {need:,} "
                            "(an interrupted write or copy?)")
                i += 1
    except Exception:       # noqa: BLE001 — only a better message is at stake: the caller has the error
        return None


def _primary_layout(path: Path) -> tuple[int, int, tuple[int, ...]] | None:
    """(where the primary HDU's data starts, its bytes, its (…, H, W) shape) from the header's cards read here,
    or None when they do not say (the file ends before END, a NAXIS beyond the standard's 999).  astropy cannot
    say it for a header that declares more data than a file can hold: it fails to seek past it ("[Errno 22]
    Invalid argument")."""
    with open(path, "rb") as f:
        head = fits_header_numbers(f, f.read(2880))
    if head is None:
        return None
    length, keys = head
    data = fits_data_bytes(keys)
    if data is None:
        return None
    naxis = keys.get(b"NAXIS", 0)
    return length, data, tuple(keys.get(b"NAXIS%d" % k, 0) for k in range(naxis, 0, -1))


def fits_header_numbers(f, block: bytes) -> tuple[int, dict[bytes, int]] | None:
    """The FITS header whose first 2880 bytes are ``block``, read on from the binary file ``f`` up to its END
    card, from its own cards (no astropy): (its length in bytes, its integer BITPIX, NAXIS, NAXISn, PCOUNT and
    GCOUNT), or None when the file ends first.  For what astropy cannot tell: whether a file still being
    written holds its whole image (the watcher), what a header declares that no file could hold (the reader)."""
    keys: dict[bytes, int] = {}
    length = 0
    while True:
        if len(block) < 2880:
            return None
        length += 2880
        for i in range(0, 2880, 80):
            card = block[i:i + 80]
            key = card[:8].rstrip()
            if key == b"END":
                return length, keys
            if card[8:10] == b"= " and (key in (b"BITPIX", b"PCOUNT", b"GCOUNT") or key.startswith(b"NAXIS")):
                try:
                    keys[key] = int(card[10:80].split(b"/")[0].strip())
                except ValueError:
                    pass
        block = f.read(2880)


def fits_data_bytes(keys: dict[bytes, int]) -> int | None:
    """The bytes of data (padding aside) that a header's numbers (fits_header_numbers) declare; None for a NAXIS
    beyond the standard's 999 (a garbled card: its product would take minutes) or a negative length (a garbled
    NAXISn, PCOUNT or GCOUNT: the watcher's walk over the HDUs stepped back by it, onto the same header, for ever)."""
    naxis = keys.get(b"NAXIS", 0)
    if not 0 <= naxis <= 999:
        return None
    n = 1 if naxis else 0
    for i in range(1, naxis + 1):
        n *= keys.get(b"NAXIS%d" % i, 0)
    data = abs(keys.get(b"BITPIX", 8)) // 8 * keys.get(b"GCOUNT", 1) * (keys.get(b"PCOUNT", 0) + n)
    return data if data >= 0 else None


def fits_impossible(path: Path) -> str | None:
    """Why astropy must not be given ``path``: a header (the primary or an extension's) whose numbers declare no
    possible data — a NAXIS beyond the standard's 999, or a negative length from a garbled NAXISn, PCOUNT or
    GCOUNT.  astropy then builds a shape of a billion axes (minutes), or finds the next HDU where that one starts,
    the same HDU again, for ever: the daemon's watcher (sorting files by their DATE-OBS) and its worker hung on
    one such file, and no other frame of the night was handled.  None otherwise, a cut or unreadable file
    included (astropy and the reader say what those are)."""
    try:
        with open(path, "rb") as f:
            pos = 0
            while True:
                f.seek(pos)
                block = f.read(2880)
                if not block.startswith(b"XTENSION" if pos else b"SIMPLE  ="):
                    return None
                head = fits_header_numbers(f, block)
                if head is None:
                    return None
                length, keys = head
                data = fits_data_bytes(keys)
                if data is None:
                    cards = ", ".join(f"{k.decode()} = {v}" for k, v in keys.items() if k.startswith(b"NAXIS"))
                    return f"damaged FITS header: {cards[:200]} declares no possible image"
                pos += length + -(-data // 2880) * 2880
    except OSError:
        return None


def _image_hdu(hdul, path: Path, limit: _Limit):
    """The first HDU with a 2-D (or more) image, checked against the size limit from its header alone, and its
    header (a copy) with the primary header's keys it lacks."""
    hdu = next((h for h in hdul if len(_fits_shape(h)) >= 2), None)
    if hdu is None:
        raise FrameError(path, "FITS file has no image data")
    shape = _fits_shape(hdu)     # from the header: hdu.data reads (or decompresses) every pixel
    limit.check(path, shape[-1], shape[-2], int(np.prod(shape[:-2], dtype=np.int64)))
    header = hdu.header.copy()
    if hdu is not hdul[0]:
        for k, v in hdul[0].header.items():  # primary keys fill in what the image HDU lacks
            if k not in header and k not in ("SIMPLE", "EXTEND", "NAXIS", "BITPIX", ""):
                header[k] = v
    return hdu, header


def _sensor_image(raw: np.ndarray, header, path: Path, section: Section | None = None) -> np.ndarray:
    """The 2-D sensor image of an HDU's pixels, row 0 at the top: cut to its data ``section`` (in the stored
    order, as FITS sections count) and, when row 0 of a BOTTOM-UP file is the bottom of the sensor, flipped here
    (views both) so that it is converted in the top-down order of RAW files."""
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise FrameError(path, f"FITS image has {raw.ndim} axes {raw.shape}; "
                               "expected a 2-D sensor image (mono or Bayer)")
    if section is not None:
        raw = raw[section.y0:section.y1, section.x0:section.x1]
    if str(header.get("ROWORDER", "TOP-DOWN")).strip().upper() == "BOTTOM-UP":
        raw = raw[::-1]
    return raw


def _float32_into(out: np.ndarray | None, shape) -> np.ndarray:
    """``out`` when it is a float32 array of ``shape``, else a new one."""
    if out is not None and out.shape == shape and out.dtype == np.float32:
        return out
    return np.empty(shape, np.float32)


def _integer_pixels(hdu, header, path: Path, out: np.ndarray | None,
                    section: Section | None = None) -> np.ndarray | None:
    """A camera's integer image (BITPIX 8, 16 or 32, BSCALE 1, an integer BZERO such as 32768 for unsigned
    16-bit, no BLANK), read as stored (big-endian integers) and made float32 with its BZERO in one pass into
    ``out`` — the values astropy's scaling gives (integers, rounded once to float32 beyond 2²⁴), without its
    scaled copy nor a pass to look for NaN or the maximum: read_frame of a 24 MP 16-bit frame on one core
    0.103 → 0.055 s.  None for anything else."""
    from astropy.io import fits

    if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU) or "BLANK" in header:
        return None
    bitpix, bscale, bzero = header.get("BITPIX"), header.get("BSCALE", 1), header.get("BZERO", 0)
    if bitpix not in (8, 16, 32) or not isinstance(bscale, (int, float)) or bscale != 1 \
            or not isinstance(bzero, (int, float)) or bzero != int(bzero):
        return None
    raw = _sensor_image(hdu.data, header, path, section)
    data = _float32_into(out, raw.shape)
    # exact in float32 for 8- and 16-bit data (an offset within 2²³); else one rounding of the exact sum
    offset = np.float32(bzero) if bitpix < 32 and abs(bzero) <= 2 ** 23 else np.float64(bzero)
    np.add(raw, offset, out=data, casting="unsafe")
    return data


def _largest(header) -> int:
    """The largest value an integer FITS image (BSCALE 1) can hold: its type's, plus BZERO."""
    bitpix = header["BITPIX"]
    return (255 if bitpix == 8 else 2 ** (bitpix - 1) - 1) + int(header.get("BZERO", 0))


def _scaled_pixels(hdu, header, path: Path, out: np.ndarray | None, section: Section | None = None) -> np.ndarray:
    """The image as astropy scales it (BSCALE, BZERO, BLANK as NaN, floats, tile-compressed), as float32 in
    ``out`` when it fits."""
    raw = _sensor_image(hdu.data, header, path, section)
    data = _float32_into(out, raw.shape)
    np.copyto(data, raw, casting="unsafe")
    return data


def _fits_shape(hdu) -> tuple[int, ...]:
    """(…, H, W) of an image HDU from its header alone (a tile-compressed one: the image's, not its table's);
    () for a table or an HDU without pixels."""
    if not hdu.is_image:
        return ()
    h = hdu.header
    try:
        shape = tuple(int(h.get(f"NAXIS{i}", 0)) for i in range(int(h.get("NAXIS", 0)), 0, -1))
    except (TypeError, ValueError):
        return ()
    return shape if shape and min(shape) > 0 else ()


# ---------------------------------------------------------------- data section (overscan / prescan)

@dataclass(frozen=True, slots=True)
class Section:
    """The part of a stored FITS image that holds sky: rows y0:y1, columns x0:x1 (0-based, end excluded, in the
    order the rows are stored), and the card it came from (``key`` = ``text``) for messages."""
    y0: int
    y1: int
    x0: int
    x1: int
    key: str
    text: str


_SECTION_RE = re.compile(r"\[\s*(\*|\d+\s*:\s*\d+)\s*,\s*(\*|\d+\s*:\s*\d+)\s*\]")


def data_section(header, shape) -> tuple[Section | None, list[str]]:
    """The data section of an image of ``shape`` (H, W) as stored, from TRIMSEC, else DATASEC (IRAF's
    '[x1:x2,y1:y2]', 1-based, ends included, '*' for a whole axis): a CCD's overscan and prescan columns or rows
    (bias level, no sky) would be a black band in every stack.  TRIMSEC is preferred: where both are given it is
    the one the observatory says to keep (DATASEC may still include the rows next to the overscan).

    Returns (section, notes): section None when there is none, or it is the whole image; notes says why a card
    was not used — malformed, reversed (a flip), or outside the image (a header of another binning or
    readout).  Such a card is ignored and the frame read whole, as before: its pixels are good, only one card is
    wrong, and refusing the frame would refuse every frame of that camera; its masters, with the same header,
    stay the same shape as its lights."""
    from astropy.io.fits import VerifyError

    h, w = (int(n) for n in shape)
    notes: list[str] = []
    for key in ("TRIMSEC", "DATASEC"):
        try:
            value = header.get(key)
        except (VerifyError, ValueError):       # a garbled card: its value is unknown, as a missing one's
            notes.append(f"{key} ignored: its card cannot be parsed")
            continue
        if value is None:
            continue
        text = str(value).strip()
        m = _SECTION_RE.fullmatch(text) if isinstance(value, str) else None
        if m is None:
            notes.append(f"{key} {text!r} ignored: not a section '[x1:x2,y1:y2]'")
            continue
        spans, why = [], None
        for part, n, axis in ((m.group(1), w, "columns"), (m.group(2), h, "rows")):
            if part == "*":
                spans.append((0, n))
                continue
            a, b = (int(v) for v in part.split(":"))
            if a > b:
                why = f"{axis} {a}:{b} are reversed (a flipped section is not supported)"
            elif a < 1 or b > n:
                why = f"{axis} {a}:{b} are outside the image's 1:{n}"
            spans.append((a - 1, b))
            if why:
                break
        if why:
            notes.append(f"{key} {text!r} ignored: {why}")
            continue
        (x0, x1), (y0, y1) = spans
        if (y0, y1, x0, x1) == (0, h, 0, w):
            return None, notes
        return Section(y0, y1, x0, x1, key, text), notes
    return None, notes


def trimmed_header(header, section: Section):
    """A copy of ``header`` that describes the pixels of ``section`` only: NAXIS1/2 its size, the WCS reference
    pixel (CRPIX1/2) and the Bayer offsets (XBAYROFF/YBAYROFF: a cut at an odd column or row shifts the CFA
    pattern of pixel (0,0)) moved by its corner; and without TRIMSEC, DATASEC and BIASSEC, which no longer
    describe these pixels (nothing is cut twice)."""
    out = header.copy()
    out["NAXIS1"], out["NAXIS2"] = section.x1 - section.x0, section.y1 - section.y0
    for key, d in (("CRPIX1", section.x0), ("CRPIX2", section.y0)):
        v = _num(out.get(key))
        if v is not None:
            out[key] = v - d
    for key, d in (("XBAYROFF", section.x0), ("YBAYROFF", section.y0)):
        out[key] = int(_num(out.get(key)) or 0) + d
    for key in ("TRIMSEC", "DATASEC", "BIASSEC"):
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def _fits_pattern(header, path: Path) -> str | None:
    pat = header.get("BAYERPAT", header.get("COLORTYP"))
    if pat is None:
        f = str(header.get("FILTER", "")).strip().upper()
        if f in CFA_PATTERNS:  # some DSLR converters (e.g. PANOPTES) put the CFA pattern in FILTER
            pat = f
    if pat is None:
        return None
    pat = str(pat).strip().upper()
    if pat in ("", "NONE", "MONO"):
        return None
    if pat not in CFA_PATTERNS:
        raise FrameError(path, f"unsupported BAYERPAT '{pat}' (supported: {', '.join(CFA_PATTERNS)})")
    dx = int(_num(header.get("XBAYROFF")) or 0)
    dy = int(_num(header.get("YBAYROFF")) or 0)
    return _shift_pattern(pat, dx, dy)


def _shift_pattern(pat: str, dx: int, dy: int) -> str:
    """The pattern seen from pixel (dx, dy) of a mosaic whose pixel (0,0) has pattern ``pat``."""
    grid = [[pat[0], pat[1]], [pat[2], pat[3]]]
    return "".join(grid[(i + dy) % 2][(j + dx) % 2] for i in range(2) for j in range(2))


def _num(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_sexagesimal(text) -> float | None:
    """'12 32 24.25', '+74:09:31.6', '-00 30 00', '8 06' -> signed value in the first field's unit (hours or
    degrees); None when the text is not sexagesimal."""
    if not isinstance(text, str):
        return None
    parts = [p for p in re.split(r"[\s:hdms°'\"]+", text.strip()) if p]
    if not 1 <= len(parts) <= 3:
        return None
    sign = -1.0 if parts[0].startswith("-") else 1.0
    parts[0] = parts[0].lstrip("+-")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        return None
    if not all(np.isfinite(v) and v >= 0 for v in vals) or any(v >= 60 for v in vals[1:]):
        return None
    return sign * sum(v / 60.0 ** i for i, v in enumerate(vals))


def _ra_deg(v, *, hours: bool) -> float | None:
    """RA in degrees from a number (in hours when ``hours``, else degrees) or a sexagesimal string (hours)."""
    if isinstance(v, str) and (re.search(r"[\s:]", v.strip()) or _num(v) is None):     # '12 32 24', '12h32m24s'
        ra = parse_sexagesimal(v)
        ra = None if ra is None else ra * 15.0
    else:
        ra = _num(v)
        ra = None if ra is None else ra * (15.0 if hours else 1.0)
    return ra if ra is not None and 0.0 <= ra < 360.0 else None


def _dec_deg(v) -> float | None:
    dec = _num(v) if not (isinstance(v, str) and re.search(r"[\s:]", v.strip())) else None
    if dec is None and isinstance(v, str):
        dec = parse_sexagesimal(v)
    return dec if dec is not None and -90.0 <= dec <= 90.0 else None


def header_pointing(header) -> tuple[float, float] | None:
    """(RA, Dec) in degrees where the mount pointed, from a FITS header (any mapping of card names to values):
    RA/DEC in degrees (INDI/KStars, NINA, Seestar; a sexagesimal string there is read as hours/degrees), else
    OBJCTRA (hours) / OBJCTDEC (degrees) as sexagesimal strings ('12 32 24.25', '+74 09 31.60'), else RA-MNT /
    DEC-MNT in degrees (PANOPTES).  None when absent or absurd."""
    get = header.get
    for ra_key, dec_key, hours in (("RA", "DEC", False), ("OBJCTRA", "OBJCTDEC", True), ("RA-MNT", "DEC-MNT", False)):
        ra, dec = _ra_deg(get(ra_key), hours=hours), _dec_deg(get(dec_key))
        if ra is not None and dec is not None:
            return (ra, dec)
    return None


def image_header(path: Path | str):
    """The header of a FITS file's first image HDU (a copy; no pixels read: a few ms), describing the pixels
    read_frame delivers (trimmed_header when it has a data section), or None for RAW files and for anything
    unreadable."""
    path = Path(path)
    if suffix_of(path) not in FITS_SUFFIXES or not is_regular_file(path) or fits_impossible(path) is not None:
        return None
    from astropy.io import fits
    try:
        with quiet_warnings():
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                for hdu in hdul:
                    if hdu.header.get("NAXIS", 0) >= 2 or "ZIMAGE" in hdu.header:
                        header = parsed_cards(hdu.header)
                        # cut as read_frame cuts it (a section in the primary header counts for its extension)
                        keys = {k: v for k in ("TRIMSEC", "DATASEC")
                                for v in [header.get(k, hdul[0].header.get(k))] if v is not None}
                        section, _ = data_section(keys, _fits_shape(hdu)[-2:])
                        return header if section is None else trimmed_header(header, section)
    except (OSError, ValueError, TypeError, IndexError, KeyError, fits.VerifyError, *_decoder_errors()):
        pass
    return None


def parsed_cards(header):
    """``header`` without the cards astropy cannot parse (``GAIN = 1 0``: asking for their value raises
    fits.VerifyError): a garbled card leaves its value unknown, as a missing one does, and the frame is read."""
    from astropy.io import fits

    out = fits.Header()
    with quiet_warnings():
        for card in header.cards:
            try:
                out.append((card.keyword, card.value, card.comment), end=True)
            except (fits.VerifyError, ValueError):
                continue
    return out


def read_pointing(path: Path | str) -> tuple[float, float] | None:
    """Where the mount pointed for this file, from its FITS header alone (header_pointing): what the daemon needs
    to notice a slew before stacking the frame.  None for RAW files, for anything unreadable and without one."""
    header = image_header(path)
    return None if header is None else header_pointing(header)


def _fits_time(header) -> dt.datetime | None:
    d = header.get("DATE-OBS") or header.get("DATE_OBS")
    if not d:
        return None
    s = str(d).strip()
    if "T" not in s and header.get("TIME-OBS", header.get("UT")):
        s = f"{s}T{str(header.get('TIME-OBS', header.get('UT'))).strip()}"
    if not _DATE_RE.match(s):
        return None
    s = s.rstrip("Z")
    try:
        t = dt.datetime.fromisoformat(s)
        # times are UTC without a zone (FITS); one given with its offset is brought to UTC, so that capture
        # order and DATE-END compare it with the others
        return t.astimezone(dt.timezone.utc).replace(tzinfo=None) if t.tzinfo is not None else t
    except ValueError:
        try:
            return dt.datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")
        except ValueError:
            return None


# A 16-bit FITS without SATURATE is flagged saturated this far below 65535: a 12- or 14-bit camera's full scale
# is 65520 / 65532 in its 16-bit container (10-bit modes 65472), and a camera's own dark subtraction takes tens
# of ADU more off it — the Seestar S50's clipped star cores read 65460–65524, the KStars ASI1600MM frame's 65504,
# none of them 65535, so none was flagged.  0.2 % of the range: a sensor is no longer linear there anyway.
FULL_SCALE_MARGIN = 131.0


def camera_16_bit(header) -> bool:
    """Whether a FITS header stores a camera's unsigned 16-bit pixels (BITPIX 16, BZERO 32768, BSCALE 1)."""
    return (header.get("BITPIX") == 16 and _num(header.get("BZERO", 0)) == 32768
            and _num(header.get("BSCALE", 1)) == 1)


def _saturated(data: np.ndarray, white: float) -> np.ndarray | None:
    if not np.isfinite(white):
        return None
    mask = data >= white
    return mask if mask.any() else None


def capture_time(path: Path) -> dt.datetime | None:
    """Capture time from the header alone (no pixel decode), None when unknown or unreadable."""
    path = Path(path)
    s = suffix_of(path)
    if not is_regular_file(path):       # (a named pipe would block the daemon's watcher here for ever)
        return None
    try:
        if s in FITS_SUFFIXES:
            from astropy.io import fits

            if fits_impossible(path) is not None:
                return None
            with quiet_warnings():
                with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                    for h in hdul:
                        t = _fits_time(h.header)
                        if t is not None:
                            return t
            return None
        if s in RAW_SUFFIXES:
            return _exif_meta(path).time
    except Exception:  # an unreadable file sorts by name; reading it later gives the real error
        return None
    return None


def capture_order(paths) -> list[Path]:
    """Sort files by capture time (header), then by name; files without a time keep name order among them."""
    paths = [Path(p) for p in paths]
    keyed = [(capture_time(p), p) for p in paths]
    far = dt.datetime.max
    return [p for t, p in sorted(keyed, key=lambda tp: (tp[0].replace(tzinfo=None) if tp[0] else far, tp[1].name))]
