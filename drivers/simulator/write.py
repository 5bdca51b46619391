"""Writing simulated frames as FITS or DNG, and whole nights with their truth.json.

Every file is written atomically: to a hidden temporary name in the same folder (".NAME.PID.tmp", which a
folder watcher ignores), fsync'ed, then os.replace'd, so a reader never sees half a frame.
"""
from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import tifffile
from astropy.io import fits

from ..atomic import atomic_write
from .camera import PIXEL_SIZE_UM, SimConfig, hot_pixels, render_frame

# XYZ(D65) -> linear sRGB: declares the simulated camera's primaries to be sRGB's
_COLOR_MATRIX = [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]
CALIB_DIRS = {"bias": "bias", "dark": "darks", "flat": "flats", "darkflat": "darkflats"}


def frame_name(kind: str, index: int, exptime: float, fmt: str, *, filter: str | None = None) -> str:
    """'light_0003_60s.fits', with a filter 'light_0003_180s_Ha.fits' (as the capture drivers name them):
    sorts in capture order, says type, exposure and filter. Characters unsafe in a file name are dropped
    from the filter ('H alpha' -> 'Halpha')."""
    name = f"{kind}_{index:04d}_{exptime:g}s"
    if filter:
        name += "_" + re.sub(r"[^A-Za-z0-9.+-]", "", filter)
    return f"{name}.{fmt}"


def write_fits(path: Path, raw: np.ndarray, meta: dict, cfg: SimConfig) -> None:
    """Write (H, W) uint16 `raw` as a FITS primary HDU (int16 + BZERO 32768), row 0 first, with the
    capture headers of `meta` (from render_frame; FILTER from meta["filter"]) and the camera of `cfg`."""
    hdu = fits.PrimaryHDU(np.ascontiguousarray(raw, dtype=np.uint16))
    h = hdu.header
    h["IMAGETYP"] = meta["imagetyp"]
    h["EXPTIME"] = (float(meta["exptime"]), "[s] exposure time")
    h["DATE-OBS"] = (meta["time"], "UTC start of exposure")
    h["GAIN"] = (cfg.gain_setting, "camera gain setting")
    h["ISOSPEED"] = cfg.iso
    h["CCD-TEMP"] = (cfg.temperature, "[C] sensor temperature")
    h["INSTRUME"] = cfg.camera
    filter_name = meta.get("filter", cfg.filter_name)
    if filter_name:
        h["FILTER"] = filter_name
    if not cfg.mono:
        h["BAYERPAT"] = "RGGB"
        h["XBAYROFF"] = 0
        h["YBAYROFF"] = 0
    h["ROWORDER"] = "TOP-DOWN"
    if str(meta.get("imagetyp", "")).lower().startswith("light"):
        if cfg.pointing is not None:
            h["RA"] = (float(cfg.pointing[0]), "[deg] telescope pointing")
            h["DEC"] = (float(cfg.pointing[1]), "[deg] telescope pointing")
        if cfg.object:
            h["OBJECT"] = cfg.object
        if cfg.wcs and cfg.pointing is not None and meta.get("frame_to_sky") is not None:
            _write_wcs(h, np.asarray(meta["frame_to_sky"], float), cfg)
    h["BLKLEVEL"] = (cfg.bias, "[ADU] black level (pedestal) of the raw values")
    h["SATURATE"] = (cfg.white, "[ADU] saturation level of the raw values")
    h["XPIXSZ"] = (PIXEL_SIZE_UM, "[um]")
    h["YPIXSZ"] = (PIXEL_SIZE_UM, "[um]")
    h["PIXSIZE1"] = (PIXEL_SIZE_UM, "[um]")
    h["PIXSIZE2"] = (PIXEL_SIZE_UM, "[um]")
    h["XBINNING"] = 1
    h["YBINNING"] = 1
    h["CREATOR"] = "drivers.simulator"
    atomic_write(path, lambda fh: hdu.writeto(fh))


def _write_wcs(h, frame_to_sky: np.ndarray, cfg: SimConfig) -> None:
    """A TAN WCS of the frame: the sky plane (frame 0's pixels) is a gnomonic projection centred on the
    pointing at the frame-0 centre; the frame's pixels reach it through ``frame_to_sky`` (FITS: 1-based)."""
    s = cfg.pixel_scale_arcsec / 3600.0
    cd_sky = np.array([[-s, 0.0], [0.0, s]])
    crpix_sky = np.array([(cfg.width - 1) / 2 + 1, (cfg.height - 1) / 2 + 1])
    a, t = frame_to_sky[:, :2], frame_to_sky[:, 2]
    cd = cd_sky @ a
    crpix = 1 - np.linalg.solve(a, t + 1 - crpix_sky)
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = float(cfg.pointing[0]), float(cfg.pointing[1])
    h["CRPIX1"], h["CRPIX2"] = float(crpix[0]), float(crpix[1])
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = (float(v) for v in cd.ravel())


def _rational(value: float, den_limit: int = 1_000_000) -> tuple[int, int]:
    f = Fraction(value).limit_denominator(den_limit)
    return f.numerator, f.denominator


def write_dng(path: Path, raw: np.ndarray, meta: dict, cfg: SimConfig) -> None:
    """Write (H, W) uint16 `raw` as a 16-bit uncompressed CFA DNG (RGGB) with tifffile.
    Raises ValueError for a mono camera (mono cameras write FITS)."""
    if cfg.mono:
        raise ValueError(f"{Path(path).name}: a mono frame cannot be a DNG (mono cameras write FITS)")
    when = datetime.fromisoformat(meta["time"]).strftime("%Y:%m:%d %H:%M:%S")
    exp_num, exp_den = _rational(float(meta["exptime"]))
    make, _, model = cfg.camera.partition(" ")
    model = model or cfg.camera
    cm = [v for row in _COLOR_MATRIX for x in row for v in (round(x * 10000), 10000)]
    tags = [
        (50706, 1, 4, (1, 4, 0, 0), True),                 # DNGVersion
        (50707, 1, 4, (1, 1, 0, 0), True),                 # DNGBackwardVersion
        (271, 2, 0, make, True),                           # Make
        (272, 2, 0, model, True),                          # Model
        (50708, 2, 0, cfg.camera, True),                   # UniqueCameraModel
        (33421, 3, 2, (2, 2), True),                       # CFARepeatPatternDim
        (33422, 1, 4, (0, 1, 1, 2), True),                 # CFAPattern: R G / G B
        (50710, 1, 3, (0, 1, 2), True),                    # CFAPlaneColor
        (50711, 3, 1, 1, True),                            # CFALayout: rectangular
        (50713, 3, 2, (1, 1), True),                       # BlackLevelRepeatDim
        (50714, 4, 1, cfg.bias, True),                     # BlackLevel
        (50717, 4, 1, cfg.white, True),                    # WhiteLevel
        (50721, 10, 9, cm, True),                          # ColorMatrix1
        (50778, 3, 1, 21, True),                           # CalibrationIlluminant1: D65
        (50728, 5, 3, (1, 1, 1, 1, 1, 1), True),           # AsShotNeutral
        (33434, 5, 1, (exp_num, exp_den), True),           # ExposureTime
        (34855, 3, 1, min(cfg.iso, 65535), True),          # ISOSpeedRatings
        (36867, 2, 0, when, True),                         # DateTimeOriginal
    ]

    def write(fh):
        tifffile.imwrite(fh, np.ascontiguousarray(raw, dtype=np.uint16), photometric=32803,
                         subfiletype=0, metadata=None, software="drivers.simulator",
                         datetime=when, extratags=tags)
    atomic_write(path, write)


def write_frame(path: Path, raw: np.ndarray, meta: dict, cfg: SimConfig) -> None:
    """Write in cfg.fmt ('fits' or 'dng')."""
    (write_dng if cfg.fmt == "dng" else write_fits)(path, raw, meta, cfg)


def config_dict(cfg: SimConfig) -> dict:
    """cfg as JSON-ready values (defects keys become strings, tuples lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def render_night(out_dir: Path, cfg: SimConfig) -> dict:
    """Render cfg.n_frames lights into out_dir (created if needed) and write out_dir/truth.json.

    Returns the truth dict, exactly as json.load would read truth.json back (frame indices as string keys):
    {"config": {...}, "frames": [{"file", "index", "frame_to_sky" (2×3), "fwhm" px, "transparency",
    "sky" e-/px at the centre before flat, "defect", "time", "exptime", "dither", "filter"}, ...],
    "hot_pixels": [[x, y], ...], "satellite": {"i": [x0, y0, x1, y1]}, "cosmics": {"i": [[x, y], ...]}}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, satellite, cosmics = [], {}, {}
    for i in range(cfg.n_frames):
        raw, meta = render_frame(cfg, i)
        name = frame_name("light", i, meta["exptime"], cfg.fmt, filter=meta["filter"] if cfg.filters else None)
        write_frame(out_dir / name, raw, meta, cfg)
        del raw
        frames.append({"file": name, "index": i, "frame_to_sky": meta["frame_to_sky"], "fwhm": meta["fwhm"],
                       "transparency": meta["transparency"], "sky": meta["sky"], "defect": meta["defect"],
                       "time": meta["time"], "exptime": meta["exptime"], "dither": meta["dither"],
                       "filter": meta["filter"]})
        if meta["satellite"] is not None:
            satellite[str(i)] = meta["satellite"]
        if meta["cosmics"] is not None:
            cosmics[str(i)] = meta["cosmics"]
    truth = {"config": config_dict(cfg), "frames": frames, "hot_pixels": hot_pixels(cfg).tolist(),
             "satellite": satellite, "cosmics": cosmics}
    write_truth(out_dir, truth)
    return json.loads(json.dumps(truth))


def write_truth(out_dir: Path, truth: dict) -> None:
    """Write truth as out_dir/truth.json, atomically."""
    text = json.dumps(truth, indent=1).encode()
    atomic_write(Path(out_dir) / "truth.json", lambda fh: fh.write(text))


def render_calibration(out_dir: Path, cfg: SimConfig, *, n_bias: int = 10, n_dark: int = 10, n_flat: int = 10,
                       n_darkflat: int = 10, dark_exptime: float | None = None,
                       flat_exptime: float = 1.0) -> dict:
    """Write calibration frames of cfg's camera into out_dir/bias, darks, flats, darkflats.

    Bias: t = 0; darks: t = dark_exptime or cfg.exptime; flats: a uniform panel at ~40 % of full well
    through the flat, t = flat_exptime; darkflats: darks of flat_exptime. Same format and noise model as the
    lights. With a filter wheel, n_flat flats per filter of cfg.filters (in wheel order, FILTER and file name
    'flat_0010_1s_R.fits', indices running on); the optics' flat is the same through every filter.
    Returns {"bias": [Path, ...], "darks": [...], "flats": [...], "darkflats": [...]}, capture order.
    """
    out_dir = Path(out_dir)
    flat_filters = list(dict.fromkeys(cfg.filters)) or [None]
    plan = [("bias", n_bias, 0.0, [None]),
            ("dark", n_dark, cfg.exptime if dark_exptime is None else dark_exptime, [None]),
            ("flat", n_flat, flat_exptime, flat_filters), ("darkflat", n_darkflat, flat_exptime, [None])]
    files: dict[str, list[Path]] = {}
    for kind, n, t, filters in plan:
        folder = out_dir / CALIB_DIRS[kind]
        folder.mkdir(parents=True, exist_ok=True)
        files[CALIB_DIRS[kind]] = []
        for j, filter_name in enumerate(filters):
            for i in range(j * n, (j + 1) * n):
                raw, meta = render_frame(cfg, i, kind=kind, exptime=t)
                if filter_name is not None:
                    meta["filter"] = filter_name
                path = folder / frame_name(kind, i, t, cfg.fmt, filter=filter_name)
                write_frame(path, raw, meta, cfg)
                files[CALIB_DIRS[kind]].append(path)
    return files
