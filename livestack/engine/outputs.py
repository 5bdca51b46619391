"""The session's outputs, from the engine's stacks: stack_<F>.fits per filter, stack.fits, preview.jpg.

    one filter     stack.fits = that filter's stack (as always); stack_<F>.fits is the same file (a hard link,
                   a copy where the filesystem has none) when the frames carry a FILTER
    two or more    stack_<F>.fits each, and stack.fits = the LINEAR colour composite (3, H, W) with a PALETTE card
    preview.jpg    the stretched stack or composite, from reduced copies

Every file is written atomically (temporary name, fsync, rename) and streamed in blocks of rows: no
full-resolution copy of a stack or of the composite is built.  The FITS header is built here from the
counters; the engine only counts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import __version__
from . import compose as comp
from . import geometry
from .drizzle import compensated_variance
from .filtername import is_dual_band
from .filterstack import Counters, FilterStack, integration
from .stretch import StretchParams, auto_stretch, reduce
from .write import disk_full, fsync_dir, temp_name, write_fits_blocks, write_fits_rows, write_jpeg

log = logging.getLogger(__name__)

ROWS = 256    # rows per block when streaming a composite
PLAN_SIZE = 800   # px, long side of the copies the composite's mapping is measured on: its statistics need no
                  # more, and measuring 7 filters at 1600 px took 1.45 s, at 800 px 0.39 s (after every frame)


def header(engine, c: Counters, *, filter_name: str | None, rejected_pixels: int) -> dict:
    """FITS header cards of a stack: provenance a stacking tool would write."""
    cfg, grid = engine.cfg, engine.grid
    drizzled = grid is not None and grid.drizzled
    sharp = engine.stack_sharpen()
    hdr = {
        "NCOMBINE": (c.stacked, "frames combined"),
        "EXPTIME": (integration(c.exptime), "[s] total exposure of combined frames"),
        "DATE-OBS": (c.first_time, "start of the first combined frame"),
        "DATE-END": (c.last_end, "end of the last combined frame"),
        "INSTRUME": (c.camera, "camera"),
        "OBJECT": (engine.ref.object if engine.ref is not None else None, "the reference frame's OBJECT"),
        **_optics_cards(engine),
        # rows top-down, whatever the source's order (read.py flips BOTTOM-UP): said when the source said one
        "ROWORDER": ("TOP-DOWN" if engine.ref is not None and "ROWORDER" in (engine.ref.cards or {}) else None,
                     "row 0 is the top of the sensor"),
        "BAYERPAT": (grid.pattern if grid else None, "CFA pattern of the source (stack is RGB)"),
        "FILTER": (filter_name, "filter"),
        "SOFTWARE": (f"livestack {__version__}", "stacking software"),
        "CREATOR": (f"livestack {__version__}", ""),
        "NREJECT": (c.rejected, "frames rejected"),
        "NFAILED": (engine.n_failed, "frames that could not be read"),
        "REJPIX": (rejected_pixels, "outlier pixels rejected"),
        "REFFRAME": (engine.ref.file if engine.ref else None, "reference frame (stack grid)"),
        "DEBAYER": (grid.debayer if grid else None, "demosaicing"),
        "INTERP": ("drizzle" if drizzled else cfg.engine.interpolation, "warp interpolation"),
        "SMOOTHBG": (cfg.engine.smooth_background, "sharpened only where frames have signal"),
        "KAPPA": (cfg.stack.kappa, "outlier rejection threshold, sigma"),
        "DRIZZLE": (grid.scale if drizzled else None, "drizzle: grid px per sensor px"),
        "PIXFRAC": (grid.pixfrac if drizzled else None, "drizzle: drop size, sensor px"),
        "DRZSHARP": (None if not drizzled else round(compensated_variance(grid.pixfrac, grid.scale) / 2, 5) if sharp
                     else 0.0, "drizzle blur compensated: its variance/2, grid px2"),
        "DRZTAPS": (",".join(f"{t:.5f}" for t in sharp[:3]) if sharp else None,
                    "drizzle compensation taps c,b,centre"),
        "BUNIT": ("ADU", "normalised to its filter's reference frame"),
    }
    if grid is not None and grid.wcs is not None:
        from .solve import wcs_header

        for card in wcs_header(grid.wcs).cards:
            if card.keyword not in hdr and card.keyword not in ("DATE-OBS", "MJD-OBS", "DATE-END", "COMMENT"):
                hdr[card.keyword] = (card.value, card.comment)
    if c.masters:       # this stack's own (a filter's flat), whole: a long value goes on CONTINUE cards
        hdr["CALIBRAT"] = (", ".join(c.masters), "masters used")
    return {k: v for k, v in hdr.items() if v[0] is not None}


def _optics_cards(engine) -> dict:
    """TELESCOP, FOCALLEN and the size of a stack pixel (XPIXSZ, YPIXSZ: the reference frame's over the grid's
    pixels per sensor pixel — twice it on a superpixel grid, half at drizzle ×2) and, without a WCS, the
    reference's pointing (RA, DEC): what Siril's and PixInsight's plate solvers read to solve a stack
    themselves (no solver here, or --no-solve)."""
    ref, grid = engine.ref, engine.grid
    optics = (ref.cards or {}) if ref is not None else {}
    cards: dict = {}
    if "TELESCOP" in optics:
        cards["TELESCOP"] = (optics["TELESCOP"], "the reference frame's telescope")
    if "FOCALLEN" in optics:
        cards["FOCALLEN"] = (optics["FOCALLEN"], "[mm] focal length")
    if grid is not None:
        per = float(grid.sensor_to_grid[0][0]), float(grid.sensor_to_grid[1][1])   # grid px per sensor px
        for k, s in (("XPIXSZ", per[0]), ("YPIXSZ", per[1])):
            v = optics.get(k, optics.get("XPIXSZ"))
            if v is not None and s > 0:
                cards[k] = (round(v / s, 6), "[um] size of a stack pixel, binning included")
    if ref is not None and ref.pointing is not None and (grid is None or grid.wcs is None):
        # (with a WCS its centre says it better: a mount's pointing can be far off — PANOPTES' crops 2°)
        cards["RA"] = (round(ref.pointing[0], 6), "[deg] the reference frame's pointing (mount)")
        cards["DEC"] = (round(ref.pointing[1], 6), "[deg] the reference frame's pointing (mount)")
    return cards


def filter_header(engine, fs: FilterStack) -> dict:
    hdr = header(engine, fs.counts, filter_name=fs.name, rejected_pixels=fs.stack.rejected_total)
    if fs.ref is not None:
        hdr["FILTREF"] = (fs.ref.file, "this filter's photometric reference frame")
    return hdr


def _write_filter(engine, fs: FilterStack, path: Path) -> None:
    c = engine.grid.channels
    h, w = engine.grid.shape
    shape = (h, w) if c == 1 else (c, h, w)
    if fs.stack.sums is None:       # in its bootstrap: each block of rows combined once for every channel
        write_fits_rows(path, shape, fs.stack.bootstrap_blocks(), filter_header(engine, fs), weighted=True)
    else:
        write_fits_blocks(path, shape, fs.stack.mean_blocks(), filter_header(engine, fs),
                          weight=fs.stack.weight_blocks())
    engine.release()


def _link_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` in one rename: a hard link, or a copy where links fail."""
    tmp = temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        full = disk_full(err, dst, src.stat().st_size)     # the copy, where links fail (exFAT, FAT)
        if full is None:
            raise
        raise full from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def plan(engine, params: comp.ComposeParams, max_size: int = 1600):
    """The composite's plan (palette and each source's mapping, measured on reduced copies), or None with fewer
    than two filters — or one colour stack whose palette needs no composite."""
    stacks = engine.stacks
    if not stacks:
        return None
    if len(stacks) == 1:
        params = _single_palette(engine, params)
        if params is None:
            return None
    key = (tuple((fs.key, fs.version) for fs in stacks), repr(params), max_size)
    cached = getattr(engine, "_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    reduced = engine.reduced(max_size)
    fluxes = star_fluxes(engine) if params.star_white else None
    p = comp.plan_composite({fs.label: reduce(reduced[fs.key][0], PLAN_SIZE) for fs in stacks}, params,
                            full_shape=engine.grid.shape, star_fluxes=fluxes)
    engine._plan = (key, p)
    return p


def _single_palette(engine, params: comp.ComposeParams) -> comp.ComposeParams | None:
    """One stack: the palette its composite is made with, or None when stack.fits is that stack itself.  A colour
    camera behind a dual-band filter: its one stack becomes a composite (HOO: red = Ha from the R pixels, green
    = blue = OIII from the G and B pixels) when the palette says HOO, or is auto and the FILTER names a
    dual-band filter."""
    if engine.grid.channels == 3 and params.palette == "auto" and is_dual_band(engine.stacks[0].name):
        params = dataclasses.replace(params, palette="HOO")
    return params if comp.single_stack_palette(engine.grid.channels, params) else None


class FinalStream:
    """A batch's last frame writing stack.fits as it is stacked: each block of rows, once it has taken the
    frame's pixels, is final — its mean and weights go into the file from the worker that added them, and the
    disk writes them while the other blocks are made, where the file used to be written after the frame
    (384 MB at 24 MP: 0.2 s to 1.4 s of waiting for the disk, measured on this VM's days; an SD card's
    ~20 MB/s would take 20 s).  ``start`` says when it applies: one stack that is stack.fits itself (no
    composite), plain (no drizzle), past its bootstrap, in memory.  write_stacks commits it when the stack is
    still what it wrote (``version``: the filter's, once the frame is accepted) and its header has the length
    kept; else it is dropped and stack.fits written as always.  The bytes are the same either way (tested).
    write.FitsRows writes them from threads of its own, past the page cache (O_DIRECT) where it can.  Through
    the page cache, from the stack threads themselves, as until the twenty-eighth session, 2026-12-01's VM spent
    the last frame's CPU filling 384 MB of new cache pages (42 %) and spinning on the file's lock (18 %): the
    frame took 0.70–1.26 s against 0.25–0.31 s for the others, and now 0.30–0.34 s (`livestack stack` of 8 ×
    24 MP, 8 alternating pairs).  On 2026-11-30's VM, whose disk took 1.4 s for 384 MB, a first direct variant
    (one writer, no buffers of its own) had been slower than the page cache: last frame and snapshot 1.96–2.56 s
    against 1.55–1.84 s."""

    def __init__(self, engine, fs: FilterStack, path: Path):
        from .write import StreamedFits

        self.fs, self.stack, self.path = fs, fs.stack, path
        c = engine.grid.channels
        shape = engine.grid.shape if c == 1 else (c,) + engine.grid.shape
        self.file = StreamedFits(path, shape, filter_header(engine, fs))
        self.error: BaseException | None = None
        self.version: int | None = None

    @classmethod
    def start(cls, engine, fs: FilterStack, out_dir: Path) -> "FinalStream | None":
        st = fs.stack
        if (len(engine.stacks) != 1 or engine.stacks[0] is not fs or engine.grid.drizzled or st.sums is None
                or st.channel_weights or st.spill_dir is not None
                or _single_palette(engine, engine.cfg.compose) is not None):
            return None
        return cls(engine, fs, Path(out_dir) / "stack.fits")

    def rows(self, r0: int, r1: int) -> None:
        """Rows r0:r1 are final (called from the stack's worker threads).  An error is kept, not raised: the frame
        is stacked whatever its file does, and write_stacks then writes the file as always (a disk's error comes
        again there, and is said)."""
        if self.error is not None:
            return
        try:
            m = self.stack.plain_mean_rows(r0, r1)
            self.file.put(r0, m, self.stack.wsum[r0:r1])
        except Exception as err:
            self.error = err

    def commit(self, engine, path: Path) -> bool:
        """``path`` (stack.fits) finished from the stream when it holds the stack as it is now; else False (the
        stream dropped)."""
        if (self.error is None and path == self.path and self.version == self.fs.version
                and engine.stacks == [self.fs] and self.fs.stack is self.stack):
            try:
                hdr = filter_header(engine, self.fs)
            except BaseException:
                self.abandon()
                raise
            return self.file.commit(hdr)       # (its temporary removed on any error)
        if self.error is not None:      # (a disk's error comes again, and is said, when the file is written after)
            log.debug("%s: written after the last frame: %s", path.name, self.error)
        self.abandon()
        return False

    def abandon(self) -> None:
        self.file.abandon()


STAR_STARS = 60      # the reference's brightest stars measured in every stack for the composite's star_white
STAR_CLIPPED = 0.01  # … but not one with a pixel whose weight is below this share of its sky's: saturated in every frame


def star_fluxes(engine) -> dict | None:
    """Aperture sums of the reference frame's brightest STAR_STARS stars in every filter's stack at full
    resolution, for the composite's star_white (compose._given_star_ratios): stack label -> ((C, N) fluxes,
    (C, N) errors), NaN where a star's stamp is not wholly covered; None before a reference.  Each star's
    stamp is read from the stack's sums alone (stack.mean_window): ~60 stamps of ~20 × 20 px a stack.  The
    aperture is 2 FWHM (at least 3 px), the sky the median of an annulus 2–6 px beyond it."""
    ref, grid = engine.ref, engine.grid
    if ref is None or grid is None or not len(ref.stars):
        return None
    n = min(STAR_STARS, len(ref.stars))
    xy = geometry.apply(grid.stars_to_grid, ref.stars.xy[:n])
    fwhm = float(np.nanmedian(ref.stars.fwhm[:n])) * float(grid.stars_to_grid[0, 0])
    r = max(3.0, 2.0 * fwhm) if np.isfinite(fwhm) else 3.0
    r_in, r_out = r + 2.0, r + 6.0
    k = int(np.ceil(r_out)) + 1
    h, w = grid.shape
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float64)
    out = {}
    for fs in engine.stacks:
        c_n = fs.stack.shape[0]
        flux, err = np.full((c_n, n), np.nan), np.full((c_n, n), np.nan)
        for i, (x, y) in enumerate(xy):
            xi, yi = int(round(x)), int(round(y))
            if not (k <= xi < w - k and k <= yi < h - k):
                continue
            stamp, wt = fs.stack.mean_window(yi - k, yi + k + 1, xi - k, xi + k + 1, weights=True)
            d = np.hypot(xx - (x - xi), yy - (y - yi))
            ap, ann = d <= r, (d >= r_in) & (d <= r_out)
            # A star saturated in every frame of this stack is the clip level there, not its flux: its pixels
            # count with saturated_weight.  The brightest stars are the first to saturate, and the longest
            # exposures or the widest filter the most: their ratios came out compressed towards 1 (simulated
            # RGB of 30/60/120 s, 6 of the 30 brightest saturated in B: the stars' B/G 1.16, not 1.0).
            if np.any(wt[ap] < STAR_CLIPPED * np.median(wt[ann])):
                continue
            for c in range(c_n):
                a = stamp[c]
                if not (np.isfinite(a[ap]).all() and np.isfinite(a[ann]).all()):
                    continue
                sky = np.median(a[ann])
                sd = 1.4826 * np.median(np.abs(a[ann] - sky))
                flux[c, i] = float(np.sum(a[ap] - sky))
                err[c, i] = float(sd * np.sqrt(ap.sum() * (1.0 + np.pi / 2 * ap.sum() / ann.sum())))
        out[fs.label] = (flux, err)
    return out


def is_stack_file(path: Path) -> bool:
    """stack.fits or stack_<F>.fits: what write_stacks writes (not a light to stack again)."""
    return path.name == "stack.fits" or (path.name.startswith("stack_") and path.name.endswith(".fits"))


def stale_stacks(out_dir: Path, engine, name: str = "stack.fits") -> list[Path]:
    """The stack files in ``out_dir`` that write_stacks would not write for ``engine`` now: stack_<F>.fits of
    filters it has no stack of (every frame excluded; a name clash gone, so stack_H_a-2.fits is stack_H_a.fits
    again; an earlier batch run's filters), and ``name`` when it has no stack at all."""
    keep = {filter_file(engine, fs, name) for fs in engine.stacks} | ({name} if engine.stacks else set())
    return [p for p in sorted(Path(out_dir).glob("stack*.fits")) if is_stack_file(p) and p.name not in keep]


def filter_file(engine, fs: FilterStack, name: str = "stack.fits") -> str | None:
    """The file write_stacks writes ``fs``'s stack to: stack_<F>.fits — or, for the one stack of frames without
    a FILTER, only ``name`` —; None while it has no stack."""
    if fs.stack is None:
        return None
    return fs.file_name if fs.name is not None or len(engine.stacks) > 1 else name


def write_stacks(engine, out_dir: Path, params: comp.ComposeParams, *, name: str = "stack.fits") -> bool:
    """stack_<F>.fits for each filter and ``name`` (stack.fits): see the module's table.  False when nothing is
    stacked yet."""
    stacks = engine.stacks
    if not stacks:
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    main = out_dir / name
    stream, engine.final_stream = engine.final_stream, None      # the last frame's (FinalStream), if any
    try:
        p = plan(engine, params)
    except BaseException:
        if stream is not None:
            stream.abandon()
        raise
    if p is None:
        fs = stacks[0]
        if stream is None or not stream.commit(engine, main):
            _write_filter(engine, fs, main)
        if fs.name is not None:
            _link_atomic(main, out_dir / fs.file_name)
        return True
    if stream is not None:
        stream.abandon()
    for fs in stacks:
        path = out_dir / fs.file_name
        # A filter that stacked nothing since its file was written keeps it (in a live night with a filter
        # wheel most filters wait while one is captured: 200 MB each at 26 MP) — unless its header changed: a
        # frame of it rejected counts in its NREJECT without a new version (keyed on the version alone, the
        # file kept NREJECT 0 after its filter's frame was rejected while the status said 1).
        written = (fs.version, fs.counts, engine.n_failed)
        if engine.written.get(path) != written or not path.exists():
            _write_filter(engine, fs, path)
            engine.written[path] = written
    _write_composite(engine, p, main)
    return True


def _composite_blocks(engine, p):
    """The composite as (r0, (3, n, W)) blocks of rows, each computed once from the filters' rows."""
    h = engine.grid.shape[0]
    for r0 in range(0, h, ROWS):
        r1 = min(h, r0 + ROWS)
        rows = {fs.label: fs.stack.mean_rows(r0, r1) for fs in engine.stacks}
        yield r0, comp.composite_rows(p, rows, r0, r1)
        engine.release()     # spilled stacks: only this block's rows were paged in


def _write_composite(engine, p, path: Path) -> None:
    hdr = header(engine, engine.counts, filter_name=",".join(fs.name or "none" for fs in engine.stacks)[:68],
                 rejected_pixels=sum(fs.stack.rejected_total for fs in engine.stacks))
    hdr["PALETTE"] = (p.header, "")
    hdr["BUNIT"] = ("", "linear composite: each filter's stack, background removed, scaled")
    write_fits_rows(path, (3,) + engine.grid.shape, _composite_blocks(engine, p), hdr)


def write_outputs(engine, out_dir: Path, params: comp.ComposeParams, stretch: StretchParams | None = None) -> bool:
    """Every stack file (write_stacks) and preview.jpg.  False when nothing is stacked yet.

    With one stack the preview is drawn in a second thread while the stack file is written: both only read
    the stack (at 24 MP the preview's reduced copies and stretch take ~0.4 s of CPU, the file ~1 s, much of it
    waiting for the disk).  With several, writing a filter's file may page spilled stacks in and out
    (Engine.release), so the preview waits."""
    if not engine.stacks:
        return False
    stretch = stretch or engine.cfg.stretch
    if len(engine.stacks) > 1:
        write_stacks(engine, out_dir, params)
        rgb = preview(engine, None, None, stretch, params)
    else:
        plan(engine, params)          # cached here, not computed by both threads at once
        with ThreadPoolExecutor(1, thread_name_prefix="preview") as ex:
            drawn = ex.submit(preview, engine, None, None, stretch, params)
            write_stacks(engine, out_dir, params)
            rgb = drawn.result()
    write_jpeg(out_dir / "preview.jpg", rgb, stretch.jpeg_quality)
    return True


def preview(engine, img, wsum, stretch: StretchParams, params: comp.ComposeParams, *, dtype=np.uint8) -> np.ndarray:
    """(h, w, 3) RGB of the stretched stack or composite (see Engine.preview)."""
    if img is not None:       # (full_image's: the composite when there are several filters — balanced as below)
        if plan(engine, params) is not None:
            stretch = _no_balance(stretch)
        return auto_stretch(img, stretch, coverage=wsum > 0, dtype=dtype, parallel_map=engine.parallel_map)
    p = plan(engine, params, stretch.max_size)
    reduced = engine.reduced(stretch.max_size)
    if p is None:
        mean, ws = reduced[engine.stacks[0].key]
        return auto_stretch(mean, stretch, coverage=ws > 0, dtype=dtype, parallel_map=engine.parallel_map)
    small = {fs.label: reduced[fs.key][0] for fs in engine.stacks}
    rgb = comp.composite(p, small)
    cov = np.isfinite(rgb).all(axis=0)
    # The composite's channels are already balanced by the palette's mapping and the user's weights:
    # the stretch neutralises the background but does not re-balance the colours on the stars.
    return auto_stretch(np.nan_to_num(rgb), _no_balance(stretch), coverage=cov, dtype=dtype,
                        parallel_map=engine.parallel_map)


def full_image(engine, params: comp.ComposeParams) -> tuple[np.ndarray, np.ndarray] | None:
    """The full-resolution image an export shows — the reference filter's stack, or the composite — and its
    coverage as a weight-like map, or None before the first stacked frame."""
    p = plan(engine, params)
    if p is None:
        return engine.result()
    out = np.empty((3,) + engine.grid.shape, np.float32)
    for r0, block in _composite_blocks(engine, p):
        out[:, r0:r0 + block.shape[1]] = block
    cov = np.isfinite(out).all(axis=0).astype(np.float32)
    np.nan_to_num(out, copy=False)
    return out, cov


def _no_balance(p: StretchParams) -> StretchParams:
    return dataclasses.replace(p, balance=False)


def reduced_copy(fs: FilterStack, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A filter's stack at most ``max_size`` px on the long side: (C, h, w) mean (NaN uncovered) and weights."""
    mean, wsum = fs.stack.reduced(max_size)
    mean = mean.copy()
    np.copyto(mean, np.float32(np.nan), where=~(wsum > 0)[None])
    return mean, wsum

