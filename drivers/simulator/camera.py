"""Rendering one frame of the simulated night through a simulated camera.

Conventions: images are (H, W) numpy arrays, row 0 first; a pixel position is (x = column, y = row),
0-based, with pixel centres at integers. A colour sensor is Bayer RGGB at pixel (0, 0): R at even row and even
column, B at odd row and odd column, G elsewhere.

Signal chain of a frame, in electrons:
    (stars + nebula + sky + satellite) × flat + dark_rate·t + hot_rate·t (+ cosmic hits)
    -> Poisson -> + read noise -> / gain + bias -> round, clip to [0, white] -> uint16
With a filter wheel (cfg.filters) the stars, nebula and sky are what the frame's filter passes (filters.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

import cv2
import numpy as np
from scipy.special import erf

from .filters import LINES, Passband
from .sky import N_KNOTS, SkyField, make_lines, make_sky

DEFECTS = ("cloudy", "wind", "trail", "satellite", "cosmic")  # "trail" renders like "wind" (trailed stars)
KINDS = {"light": 0, "bias": 1, "dark": 2, "flat": 3, "darkflat": 4}
IMAGETYP = {"light": "Light Frame", "bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
            "darkflat": "Dark Flat"}
PIXEL_SIZE_UM = 3.76


@dataclass(frozen=True)
class SimConfig:
    width: int = 800
    height: int = 600
    n_frames: int = 10
    mono: bool = False            # False: Bayer RGGB at pixel (0, 0)
    fmt: str = "fits"             # "fits" | "dng"
    seed: int = 1
    exptime: float = 60.0         # s
    start: str = "2026-11-25T21:00:00"   # UTC DATE-OBS of frame 0; frames every exptime + gap_s
    gap_s: float = 2.0
    n_stars: int = 400            # in the sky field (the frame plus 20 % on each side)
    fwhm_px: float = 3.0          # seeing, median; per-frame jitter ±10 %
    drift_px: tuple[float, float] = (0.7, -0.4)  # per-frame shift (x, y) of frame_to_sky, px
    rotation_deg: float = 0.0     # field rotation per frame, degrees (alt-az); total grows linearly
    flip_at: int | None = None    # meridian flip: frames >= flip_at are rotated 180° about the centre
    dither_px: float = 0.0        # random extra shift per frame, uniform in ±dither_px on each axis
    defects: dict[int, str] = field(default_factory=dict)  # frame index -> one of DEFECTS
    sky_level: float = 400.0      # e-/px of sky per frame at the centre, before flat; ±15 % linear gradient
    gain: float = 1.0             # e-/ADU
    read_noise: float = 3.0       # e-
    bias: int = 512               # ADU black level (pedestal)
    white: int = 16383            # 14-bit sensor: saturation ADU
    dark_rate: float = 0.05       # e-/px/s thermal current
    n_hot: int = 60               # hot pixels (dark rate 50–500 e-/s); also 20 cold pixels (20 % response)
    vignetting: float = 0.35      # fractional fall-off of the flat at the corners
    n_dust: int = 3               # dust donuts in the flat
    prnu: float = 0.005           # pixel response non-uniformity of the flat (σ, fraction): fixed-pattern noise
    camera: str = "SIMCAM 1"      # INSTRUME / Make + Model
    iso: int = 800
    gain_setting: int = 120
    temperature: float = -10.0
    filter: str | None = None     # None: "L" for mono, no FILTER for colour; a label only (the sky is unfiltered)
    nebula: bool = True
    # filter wheel: light i is taken through filters[i % len(filters)], named as given here (FILTER, file name);
    # () is no wheel: the unfiltered sky, FILTER from `filter`. Names: filters.KNOWN, any case. A colour camera
    # works behind every filter (its Bayer channels × the filter's bands); "HaOIII" is the dual band for it
    filters: tuple[str, ...] = ()
    # where the telescope points: another sky_seed is another field of stars (the camera — seed — stays);
    # pointing (RA, Dec degrees) and object go into the FITS headers of lights (RA, DEC, OBJECT) when set
    sky_seed: int | None = None
    pointing: tuple[float, float] | None = None
    object: str | None = None
    # with a pointing: also a TAN WCS in the lights' headers (as capture programs write one), true to the frame's
    # drift, rotation and dither; the sky's scale in arcsec per pixel (north up, east left in frame 0)
    wcs: bool = False
    pixel_scale_arcsec: float = 2.0
    # exposure (s) per filter name (any accepted spelling); otherwise 3 × exptime narrowband, exptime broadband
    filter_exptime: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.width < 16 or self.height < 16:
            raise ValueError(f"SimConfig: {self.width}×{self.height}: width and height must be ≥ 16")
        if self.fmt not in ("fits", "dng"):
            raise ValueError(f"SimConfig.fmt = {self.fmt!r}: must be 'fits' or 'dng'")
        if self.mono and self.fmt == "dng":
            raise ValueError("SimConfig: mono cameras write FITS; a DNG needs a colour (Bayer) sensor")
        bad = {i: d for i, d in self.defects.items() if d not in DEFECTS}
        if bad:
            raise ValueError(f"SimConfig.defects {bad}: unknown defect (known: {', '.join(DEFECTS)})")
        if not (0 < self.bias < self.white <= 65535):
            raise ValueError(f"SimConfig: bias {self.bias}, white {self.white}: need 0 < bias < white ≤ 65535")
        if self.exptime <= 0 or self.gain <= 0:
            raise ValueError(f"SimConfig: exptime {self.exptime}, gain {self.gain}: must be > 0")
        if not self.fwhm_px > 0:
            raise ValueError(f"SimConfig: fwhm_px {self.fwhm_px}: the stars' FWHM must be > 0 px")
        if self.pointing is not None and not (0 <= self.pointing[0] < 360 and -90 <= self.pointing[1] <= 90):
            raise ValueError(f"SimConfig: pointing {tuple(self.pointing)}: RA 0…360°, Dec −90…90°")
        if isinstance(self.filters, str):
            raise ValueError(f"SimConfig.filters = {self.filters!r}: a sequence of names, e.g. ('L', 'Ha')")
        object.__setattr__(self, "filters", tuple(self.filters))
        if self.filters and self.filter is not None:
            raise ValueError(f"SimConfig: filter {self.filter!r} and filters {self.filters}: set one, not both")
        for name in (*self.filters, *self.filter_exptime):
            try:
                Passband.of(name)
            except ValueError as err:
                raise ValueError(f"SimConfig: {err}") from None
        bad_t = {k: v for k, v in self.filter_exptime.items() if not v > 0}
        if bad_t:
            raise ValueError(f"SimConfig.filter_exptime {bad_t}: exposures must be > 0 s")
        canon = [Passband.of(k).name for k in self.filter_exptime]
        if len(set(canon)) < len(canon):
            raise ValueError(f"SimConfig.filter_exptime {self.filter_exptime}: one filter named twice")

    @property
    def filter_name(self) -> str | None:
        """FILTER without a wheel: `filter`, else "L" for mono, None for colour."""
        return self.filter if self.filter is not None else ("L" if self.mono else None)

    def filter_at(self, index: int) -> str | None:
        """The filter of light `index` as named in cfg.filters (without a wheel: filter_name)."""
        return self.filters[index % len(self.filters)] if self.filters else self.filter_name

    def passband(self, index: int) -> Passband:
        """What light `index`'s filter passes; without a wheel the unfiltered sky (even if `filter` is set)."""
        return Passband.of(self.filters[index % len(self.filters)] if self.filters else None)

    def filter_exptime_of(self, name: str | None) -> float:
        """Exposure (s) of lights through filter `name` (any accepted spelling; None: no filter)."""
        band = Passband.of(name)
        for key, t in self.filter_exptime.items():
            if Passband.of(key).name == band.name:
                return float(t)
        return band.exptime(self.exptime)

    def light_exptime(self, index: int) -> float:
        """Exposure (s) of light `index`: cfg.exptime without a wheel, else its filter's."""
        return self.filter_exptime_of(self.filter_at(index)) if self.filters else self.exptime

    def light_offset(self, index: int) -> float:
        """Seconds from cfg.start to the start of light `index` (exposures + gap_s each before it)."""
        if not self.filters:
            return index * (self.exptime + self.gap_s)
        steps = [self.light_exptime(k) + self.gap_s for k in range(len(self.filters))]
        cycles, rest = divmod(index, len(steps))
        return cycles * sum(steps) + sum(steps[:rest])


# ---------------------------------------------------------------- geometry

def frame_to_sky(cfg: SimConfig, index: int, dither: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(2, 3) float64 affine matrix mapping frame pixel (x, y, 1) of light `index` to sky coordinates:
    rotation by index·rotation_deg (+180° from flip_at on) about the frame centre, then a shift of
    index·drift_px + dither. Frame 0 without dither is the identity."""
    theta = math.radians(index * cfg.rotation_deg)
    if cfg.flip_at is not None and index >= cfg.flip_at:
        theta += math.pi
    # snap the 1e-16 of cos(pi/2), sin(pi) so that a plain flip is an exact 180° rotation
    c, s = (0.0 if abs(v) < 1e-15 else v for v in (math.cos(theta), math.sin(theta)))
    rot = np.array([[c, -s], [s, c]])
    centre = np.array([(cfg.width - 1) / 2, (cfg.height - 1) / 2])
    shift = index * np.asarray(cfg.drift_px, float) + np.asarray(dither, float)
    return np.column_stack([rot, centre - rot @ centre + shift])


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, as (2, 3)."""
    inv = np.linalg.inv(m[:, :2])
    return np.column_stack([inv, -inv @ m[:, 2]])


def sky_field(cfg: SimConfig) -> SkyField:
    """The stars and nebula of cfg's sky (same for every frame), in sky coordinates."""
    return _sky(cfg.width, cfg.height, cfg.n_stars, cfg.sky_level, cfg.nebula,
                cfg.seed if cfg.sky_seed is None else cfg.sky_seed)


@lru_cache(maxsize=4)
def _sky(width, height, n_stars, sky_level, nebula, seed) -> SkyField:
    sky = make_sky(width, height, n_stars, sky_level, nebula=nebula, rng=np.random.default_rng(seed))
    # the emission lines have their own stream, so that they change neither the stars nor sky.blobs
    lines = make_lines(sky, width, height, sky_level, rng=np.random.default_rng([seed, 0x11E5]))
    return SkyField(sky.xy, sky.rate, sky.rgb, sky.blobs, lines)


# ---------------------------------------------------------------- the camera's fixed pattern

@dataclass(frozen=True, slots=True)
class _Pattern:
    flat: np.ndarray      # (H, W) float32, mean 1, read-only
    hot_xy: np.ndarray    # (K, 2) int64 (x, y)
    hot_rate: np.ndarray  # (K,) float32 e-/s
    cold_xy: np.ndarray   # (20, 2) int64


def _pattern(cfg: SimConfig) -> _Pattern:
    return _pattern_cached(cfg.seed, cfg.width, cfg.height, cfg.mono, cfg.n_hot, cfg.vignetting, cfg.n_dust,
                           cfg.prnu)


@lru_cache(maxsize=2)  # a 24 MP flat is 92 MiB: keep two cameras at most
def _pattern_cached(seed, width, height, mono, n_hot, vignetting, n_dust, prnu) -> _Pattern:
    # its own stream, so that the sky and the frames do not shift the camera's pattern
    rng = np.random.default_rng([seed, 0x5EED, int(mono)])
    n_cold = 20
    picks = rng.choice(width * height, size=n_hot + n_cold, replace=False)
    xy = np.column_stack([picks % width, picks // width]).astype(np.int64)
    hot_xy, cold_xy = xy[:n_hot], xy[n_hot:]
    hot_rate = np.exp(rng.uniform(np.log(50), np.log(500), n_hot)).astype(np.float32)

    # vignetting: 1 at the centre, 1 - vignetting at the corners, quadratic in radius
    cx, cy = (width - 1) / 2, (height - 1) / 2
    dx2 = ((np.arange(width, dtype=np.float32) - cx) ** 2)[None, :]
    dy2 = ((np.arange(height, dtype=np.float32) - cy) ** 2)[:, None]
    flat = 1 - np.float32(vignetting / (cx * cx + cy * cy)) * (dx2 + dy2)
    # dust donuts: out-of-focus shadows of the central obstruction, darker rim than centre
    scale = min(width, height) / 600
    for _ in range(n_dust):
        radius = rng.uniform(10, 30) * scale
        depth = rng.uniform(0.05, 0.15)
        x0, y0 = rng.uniform(0.1 * width, 0.9 * width), rng.uniform(0.1 * height, 0.9 * height)
        h = int(radius * 1.6) + 2
        xa, xb = max(0, int(x0) - h), min(width, int(x0) + h + 1)
        ya, yb = max(0, int(y0) - h), min(height, int(y0) + h + 1)
        r = np.hypot(np.arange(xa, xb)[None, :] - x0, np.arange(ya, yb)[:, None] - y0) / radius
        edge = 0.12
        inside = 1 / (1 + np.exp((r - 1) / edge))           # soft disc
        shadow = depth * inside * (0.55 + 0.45 * np.clip(r, 0, 1) ** 2)
        flat[ya:yb, xa:xb] *= (1 - shadow).astype(np.float32)
    # pixel response non-uniformity (0.5 % by default), and dead-ish pixels; the draw happens whatever prnu is,
    # so prnu changes nothing else
    flat *= 1 + np.float32(prnu) * rng.standard_normal((height, width), dtype=np.float32)
    flat[cold_xy[:, 1], cold_xy[:, 0]] *= np.float32(0.2)
    flat /= np.float32(flat.mean(dtype=np.float64))
    flat.setflags(write=False)
    return _Pattern(flat, hot_xy, hot_rate, cold_xy)


def true_flat(cfg: SimConfig) -> np.ndarray:
    """(H, W) float32 flat field, mean 1: vignetting × dust × pixel response (incl. the 20 cold pixels).
    A fresh, writable copy (92 MiB at 24 MP)."""
    return _pattern(cfg).flat.copy()


def hot_pixels(cfg: SimConfig) -> np.ndarray:
    """(K, 2) int64 (x, y) of the hot pixels, K = cfg.n_hot; the same for every frame of a camera/seed."""
    return _pattern(cfg).hot_xy.copy()


# ---------------------------------------------------------------- rendering

def _pixel_gauss(centre: np.ndarray, lo: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """(N, n) pixel-integrated 1-D Gaussian: the fraction of a unit source at `centre` falling in pixels
    lo .. lo+n-1 (pixel j spans j ± 0.5). Integrating, not sampling, keeps centroids unbiased."""
    edges = lo[:, None] + np.arange(n + 1) - 0.5 - centre[:, None]
    cdf = erf(edges / (math.sqrt(2) * sigma))
    return (0.5 * np.diff(cdf, axis=1)).astype(np.float32)


def stamp_stars(img: np.ndarray, xy: np.ndarray, flux: np.ndarray, rgb: np.ndarray, sigma: float,
                *, mono: bool) -> None:
    """Add Gaussian stars to `img` (H, W) float32 in place, each in a ±5σ box.

    xy (N, 2) frame positions; flux (N,) e- in total; rgb (N, 3) colour weights of mean 1: a Bayer pixel of
    colour k receives flux·rgb[k]·psf, a mono pixel flux·psf."""
    height, width = img.shape
    h = int(math.ceil(5 * sigma))
    n = 2 * h + 1
    keep = ((xy[:, 0] > -h) & (xy[:, 0] < width + h) & (xy[:, 1] > -h) & (xy[:, 1] < height + h)
            & (flux > 0))
    xy, flux, rgb = xy[keep], flux[keep], rgb[keep]
    if not len(xy):
        return
    x0 = np.rint(xy[:, 0]).astype(np.int64) - h
    y0 = np.rint(xy[:, 1]).astype(np.int64) - h
    px = _pixel_gauss(xy[:, 0], x0, n, sigma)          # (N, n)
    py = _pixel_gauss(xy[:, 1], y0, n, sigma)
    vals = flux.astype(np.float32)[:, None, None] * py[:, :, None] * px[:, None, :]   # (N, n, n)
    cols = x0[:, None] + np.arange(n)                    # (N, n)
    rows = y0[:, None] + np.arange(n)
    if not mono:
        # channel index of an RGGB pixel: 0 R (even, even), 1 G, 2 B (odd, odd)
        ch = (rows & 1)[:, :, None] + (cols & 1)[:, None, :]
        vals *= np.take_along_axis(rgb, ch.reshape(len(xy), -1), axis=1).reshape(vals.shape)
    inside = (((cols >= 0) & (cols < width))[:, None, :] & ((rows >= 0) & (rows < height))[:, :, None])
    flat_idx = rows[:, :, None] * width + cols[:, None, :]
    np.add.at(img.reshape(-1), flat_idx[inside], vals[inside])


def _frame_time(cfg: SimConfig, index: int, kind: str, t: float) -> datetime:
    start = datetime.fromisoformat(cfg.start)
    if kind == "light":
        return start + timedelta(seconds=cfg.light_offset(index))
    # calibration frames are taken after the night, in the order bias, dark, flat, darkflat
    after = start + timedelta(seconds=cfg.light_offset(cfg.n_frames) + 600 * KINDS[kind])
    return after + timedelta(seconds=index * (t + cfg.gap_s))


def render_frame(cfg: SimConfig, index: int, *, kind: str = "light", exptime: float | None = None,
                 noise: bool = True) -> tuple[np.ndarray, dict]:
    """Render frame `index` of `kind` ('light', 'bias', 'dark', 'flat', 'darkflat'); no file is written.

    Returns (raw, meta): raw is (H, W) uint16 sensor values in ADU including the bias, clipped at
    cfg.white; meta is the frame's header/truth dict (index, kind, imagetyp, exptime, time = ISO UTC start,
    filter = the FILTER name or None; for lights also frame_to_sky (2×3 list), fwhm px, transparency,
    sky e-/px at the centre before flat (colour: the mean of the R, G, B channels), defect, dither,
    satellite [x0, y0, x1, y1] or None, cosmics [[x, y], …] or None).
    A light is taken through cfg.filter_at(index); calibration frames carry cfg.filter_name without a wheel and
    no filter with one (render_calibration names the flats' filter).
    Exposure default: cfg.light_exptime(index) for lights (cfg.exptime without a wheel), cfg.exptime for darks,
    0 for bias, 1 s for flat/darkflat.
    `noise=False` gives the expected value (no Poisson, read noise or cosmic hits) — for tests.
    Peak memory at 24 MP ≈ 3 float32 planes (electrons, nebula upsampling, the cached flat) + the output.
    """
    if kind not in KINDS:
        raise ValueError(f"render_frame: kind {kind!r} unknown (known: {', '.join(KINDS)})")
    if exptime is None:
        exptime = (cfg.light_exptime(index) if kind == "light"
                   else {"dark": cfg.exptime, "bias": 0.0}.get(kind, 1.0))
    t = float(exptime)
    width, height = cfg.width, cfg.height
    rng = np.random.default_rng([cfg.seed, KINDS[kind], index])
    pattern = _pattern(cfg)
    meta: dict = {"index": index, "kind": kind, "imagetyp": IMAGETYP[kind], "exptime": t,
                  "time": _frame_time(cfg, index, kind, t).isoformat(),
                  "filter": cfg.filter_at(index) if kind == "light" or not cfg.filters else None}
    electrons = np.zeros((height, width), np.float32)
    cosmics: list[list[int]] = []

    if kind == "light":
        defect = cfg.defects.get(index)
        # every per-frame draw happens whatever the defect, so a defect changes only what it is about
        fwhm = cfg.fwhm_px * (1 + rng.uniform(-0.1, 0.1))
        transparency = rng.uniform(0.9, 1.0)
        sky_scale = rng.uniform(0.97, 1.03)
        dither = rng.uniform(-cfg.dither_px, cfg.dither_px, 2) if cfg.dither_px > 0 else np.zeros(2)
        grad_angle = rng.uniform(0, 2 * np.pi)
        wind_angle, wind_len = rng.uniform(0, np.pi), rng.uniform(8, 10)
        sat_vertical, sat_ends, sat_amp = rng.uniform() < 0.5, rng.uniform(0, 1, 2), rng.uniform(300, 800)
        cosmic_seed = int(rng.integers(2**32))
        if defect == "cloudy":
            transparency *= 0.3
            sky_scale *= 2.5
        light_scale = t / cfg.exptime
        band = cfg.passband(index)

        m = frame_to_sky(cfg, index, tuple(dither))
        sky = make_sky_plane(cfg, sky_scale * light_scale, grad_angle)
        _filter_sky(sky, band, mono=cfg.mono)
        electrons += sky
        del sky
        sky_field_ = sky_field(cfg)
        if len(sky_field_.blobs):
            _add_nebula(electrons, cfg, sky_field_, m, light_scale * transparency, band)
        inv = invert_affine(m)
        xy = sky_field_.xy @ inv[:, :2].T + inv[:, 2]
        flux, rgb = band.stars(sky_field_.rate * t * transparency, sky_field_.rgb, mono=cfg.mono)
        if defect in ("wind", "trail"):
            # the mount shakes during the exposure: the star is smeared along a line, centroid unchanged
            steps = np.linspace(-wind_len / 2, wind_len / 2, 20)
            off = np.column_stack([steps * math.cos(wind_angle), steps * math.sin(wind_angle)])
            xy = (xy[:, None, :] + off[None]).reshape(-1, 2)
            flux = np.repeat(flux / 20, 20)
            rgb = np.repeat(rgb, 20, axis=0)
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        stamp_stars(electrons, xy, flux, rgb, sigma, mono=cfg.mono)

        satellite = None
        if defect == "satellite":
            if sat_vertical:
                satellite = [float(sat_ends[0] * (width - 1)), 0.0, float(sat_ends[1] * (width - 1)),
                             float(height - 1)]
            else:
                satellite = [0.0, float(sat_ends[0] * (height - 1)), float(width - 1),
                             float(sat_ends[1] * (height - 1))]
            _add_line(electrons, satellite, sat_amp)
        electrons *= pattern.flat
        if defect == "cosmic":
            crng = np.random.default_rng(cosmic_seed)
            for _ in range(30):
                x, y = int(crng.integers(0, width)), int(crng.integers(0, height))
                dx, dy = [(1, 0), (0, 1), (1, 1), (1, -1)][int(crng.integers(4))]
                for k in range(int(crng.integers(1, 4))):
                    xx, yy = x + k * dx, y + k * dy
                    if 0 <= xx < width and 0 <= yy < height:
                        electrons[yy, xx] += np.float32(crng.uniform(2000, 8000))
                        cosmics.append([xx, yy])
        meta.update({
            "frame_to_sky": m.tolist(), "fwhm": float(fwhm), "transparency": float(transparency),
            "sky": float(cfg.sky_level * sky_scale * light_scale * band.sky_mono()), "defect": defect,
            "dither": [float(d) for d in dither], "satellite": satellite,
            "cosmics": cosmics if defect == "cosmic" else None,
        })
    elif kind == "flat":
        # a uniform panel at ~40 % of full well, shaped by the optics' flat
        level = 0.4 * (cfg.white - cfg.bias) * cfg.gain
        np.multiply(pattern.flat, np.float32(level), out=electrons)

    if kind != "bias":
        electrons += np.float32(cfg.dark_rate * t)
        hx, hy = pattern.hot_xy[:, 0], pattern.hot_xy[:, 1]
        electrons[hy, hx] += pattern.hot_rate * np.float32(t)

    raw = _digitise(electrons, cfg, np.random.default_rng([cfg.seed, KINDS[kind], index, 1]) if noise else None)
    return raw, meta


def true_signal(cfg: SimConfig, filter_name: str | None, *, exptime: float | None = None) -> np.ndarray:
    """Noise-free stars + nebula (e-, no sky, flat, dark or hot pixels) that frame 0's pixel grid (the
    identity frame_to_sky, no dither) sees through `filter_name` (any accepted spelling; None: no wheel, the
    unfiltered sky of filters=()), at the nominal seeing cfg.fwhm_px and transparency 1.

    Returns (H, W) float32 for mono; for a colour camera (3, H, W) float32, the R, G, B channel responses at
    every pixel (not mosaicked; 3 planes, 288 MB at 24 MP). Exposure default: the filter's light exposure
    (cfg.filter_exptime_of). Raises ValueError for an unknown filter.
    """
    band = Passband.of(filter_name)
    t = float(exptime) if exptime is not None else cfg.filter_exptime_of(filter_name)
    shape = (cfg.height, cfg.width)
    sky = sky_field(cfg)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = np.zeros((1 if cfg.mono else 3, *shape), np.float32)
    if len(sky.blobs):
        coarse = _nebula_coarse(shape, sky, identity, t / cfg.exptime, band)
        for c, plane in enumerate(coarse.mean(axis=0, keepdims=True) if cfg.mono else coarse):
            out[c] += cv2.resize(plane, (cfg.width, cfg.height), interpolation=cv2.INTER_LINEAR)
    flux, rgb = band.stars(sky.rate * t, sky.rgb, mono=cfg.mono)
    sigma = cfg.fwhm_px / (2 * math.sqrt(2 * math.log(2)))
    if cfg.mono:
        stamp_stars(out[0], sky.xy, flux, rgb, sigma, mono=True)
        return out[0]
    for c in range(3):
        stamp_stars(out[c], sky.xy, flux * rgb[:, c], rgb, sigma, mono=True)
    return out


def nebula_truth(cfg: SimConfig, line: str) -> np.ndarray:
    """(H, W) float32 surface brightness of one emission line ('Ha', 'OIII' or 'SII', any accepted
    spelling), e-/px per cfg.exptime, on frame 0's pixel grid, before flat and transparency; zeros without a
    nebula. Evaluated as the frames are (coarse grid, bilinear upsampling). Raises ValueError for another name."""
    band = Passband.of(line)
    if band.name not in LINES:
        raise ValueError(f"nebula_truth: {line!r} is not an emission line (known: {', '.join(LINES)})")
    sky = sky_field(cfg)
    if not len(sky.blobs):
        return np.zeros((cfg.height, cfg.width), np.float32)
    # the line's own passband passes only that line, and its channel mean is the line itself
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    coarse = _nebula_coarse((cfg.height, cfg.width), sky, identity, 1.0, band).mean(axis=0)
    return cv2.resize(coarse, (cfg.width, cfg.height), interpolation=cv2.INTER_LINEAR)


def nebula_knots(cfg: SimConfig) -> np.ndarray:
    """(K, 4) float64 Hα knots of cfg's nebula: x, y on frame 0's grid, FWHM px (major, minor) — the compact
    blobs that a star finder picks up and must not keep as stars. (0, 4) without a nebula."""
    lines = sky_field(cfg).lines
    if not lines:
        return np.zeros((0, 4))
    knots = lines[0][-N_KNOTS:]
    return np.column_stack([knots[:, :2], knots[:, 2:4] * (2 * math.sqrt(2 * math.log(2)))])


def make_sky_plane(cfg: SimConfig, scale: float, angle: float) -> np.ndarray:
    """(H, W) float32 sky background, e-/px: cfg.sky_level × scale at the centre, a linear gradient of
    ±15 % across the frame (light pollution: fixed to the frame, not the sky) in direction `angle`."""
    ax, ay = math.cos(angle), math.sin(angle)
    norm = 0.15 / (abs(ax) + abs(ay))
    u = np.linspace(-1, 1, cfg.width, dtype=np.float32)
    v = np.linspace(-1, 1, cfg.height, dtype=np.float32)
    level = np.float32(cfg.sky_level * scale)
    return level * (1 + np.float32(norm * ax) * u[None, :] + np.float32(norm * ay) * v[:, None])


def _filter_sky(sky: np.ndarray, band: Passband, *, mono: bool) -> None:
    """Scale an unfiltered (H, W) sky plane in place to what `band` passes: by its mono sky, or per Bayer site."""
    if band.name is None:
        return
    if mono:
        sky *= np.float32(band.sky_mono())
        return
    for k, (r0, c0) in ((0, (0, 0)), (1, (0, 1)), (1, (1, 0)), (2, (1, 1))):
        sky[r0::2, c0::2] *= band.sky[k]


def _nebula_coarse(shape: tuple[int, int], sky: SkyField, m: np.ndarray, scale: float,
                   band: Passband) -> np.ndarray:
    """(3, ch, cw) float32 nebula through `band` on a grid band.nebula_step × coarser than the frame (of frame
    pixels mapped by `m` to the sky), × scale; cv2.resize to `shape` puts it back without a shift, because the
    coarse points sit where its half-pixel convention puts them."""
    height, width = shape
    step = band.nebula_step
    cw, ch = max(2, width // step), max(2, height // step)
    xs = (np.arange(cw) + 0.5) * (width / cw) - 0.5
    ys = (np.arange(ch) + 0.5) * (height / ch) - 0.5
    fx, fy = np.meshgrid(xs, ys)
    sx = m[0, 0] * fx + m[0, 1] * fy + m[0, 2]
    sy = m[1, 0] * fx + m[1, 1] * fy + m[1, 2]
    return band.nebula(sky, sx, sy) * np.float32(scale)


def _add_nebula(img: np.ndarray, cfg: SimConfig, sky: SkyField, m: np.ndarray, scale: float,
                band: Passband) -> None:
    """Add the nebula through `band` to `img` in place. It is smooth, so evaluated on a coarse grid
    (_nebula_coarse) and upsampled bilinearly; a Bayer pixel takes its own channel."""
    height, width = img.shape
    coarse = _nebula_coarse((height, width), sky, m, scale, band)
    if cfg.mono:
        img += cv2.resize(coarse.mean(axis=0), (width, height), interpolation=cv2.INTER_LINEAR)
        return
    for k, (r0, c0) in ((0, (0, 0)), (1, (0, 1)), (1, (1, 0)), (2, (1, 1))):
        # sample the upsampled channel at its own CFA sites only
        full = cv2.resize(coarse[k], (width, height), interpolation=cv2.INTER_LINEAR)
        img[r0::2, c0::2] += full[r0::2, c0::2]


def _add_line(img: np.ndarray, ends: list[float], amp: float) -> None:
    """Add a straight line (Gaussian cross-section, FWHM 3 px, peak `amp` e-) through ends [x0, y0, x1, y1]."""
    height, width = img.shape
    x0, y0, x1, y1 = ends
    sigma = 3 / 2.3548
    horizontal = abs(x1 - x0) >= abs(y1 - y0)
    if not horizontal:  # work on the transpose: a line that is mostly horizontal there
        img, x0, y0, x1, y1 = img.T, y0, x0, y1, x1
        height, width = width, height
    slope = (y1 - y0) / (x1 - x0)
    cos_phi = 1 / math.sqrt(1 + slope * slope)
    cols = np.arange(width)
    yc = y0 + (cols - x0) * slope
    rows = np.floor(yc).astype(np.int64)[:, None] + np.arange(-4, 6)
    val = amp * np.exp(-0.5 * (((rows - yc[:, None]) * cos_phi) / sigma) ** 2)
    ok = (rows >= 0) & (rows < height)
    cc = np.broadcast_to(cols[:, None], rows.shape)
    img[rows[ok], cc[ok]] += val[ok].astype(np.float32)


def _digitise(electrons: np.ndarray, cfg: SimConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Electrons -> uint16 ADU: Poisson, read noise, / gain, + bias, round, clip to [0, white].
    Done in bands of rows: Poisson on a band that fits in cache is twice as fast, and no full-frame
    float64 plane is ever allocated."""
    height, width = electrons.shape
    out = np.empty((height, width), np.uint16)
    band = max(1, 262144 // width)
    inv_gain = np.float32(1 / cfg.gain)
    for r0 in range(0, height, band):
        e = electrons[r0:r0 + band]
        if rng is not None:
            e = rng.poisson(np.maximum(e, 0)).astype(np.float32)
            e += np.float32(cfg.read_noise) * rng.standard_normal(e.shape, dtype=np.float32)
        adu = np.rint(e * inv_gain + np.float32(cfg.bias))
        np.clip(adu, 0, cfg.white, out=adu)
        out[r0:r0 + band] = adu
    return out


def parse_defects(text: str) -> dict[int, str]:
    """'cloudy:3,trail:5' -> {3: 'cloudy', 5: 'trail'}."""
    out: dict[int, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, index = item.partition(":")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"--defects {item!r}: expected NAME:FRAME, e.g. cloudy:3")
        out[int(index)] = name.strip()
    return out


def parse_filter_exptime(text: str) -> dict[str, float]:
    """'Ha:300,OIII:300' -> {'Ha': 300.0, 'OIII': 300.0} (names are checked by SimConfig)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, seconds = item.rpartition(":")
        try:
            value = float(seconds)
        except ValueError:
            value = None
        if not sep or not name.strip() or value is None:
            raise ValueError(f"--filter-exptime {item!r}: expected NAME:SECONDS, e.g. Ha:300")
        out[name.strip()] = value
    return out
