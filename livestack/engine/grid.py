"""Grid: the pixel grid every stack of a target shares, chosen once at the reference frame.

Which kind of sensor and demosaicing a session has — mono, Bayer at full resolution (bilinear or
Malvar-He-Cutler), Bayer in superpixels (half resolution) — decides how a frame's pixels reach the stack: the
shape of the stacks, where a sensor pixel lands on the grid, how stars are found and refined, how the 2×2
luminance cells of the outlier test are made, how far a saturated sample reaches.  That decision lives here, once; the pipeline asks the grid and
does not branch on the mode.

Conventions (frame.py): x = column, y = row, 0-based, pixel centres at integers.  A 2×2 cell (i, j) of an image
covers pixels 2i..2i+1 and is centred on pixel 2i + 0.5; ``sensor_to_grid`` says where a sensor pixel of the
reference frame lands on the grid (identity; superpixel: x/2 − 0.25; drizzle at scale 2: 2x + 0.5).  A WCS is
attached to the grid when a plate solve lands.

A drizzle grid (mode "drizzle", mono or Bayer) is ``scale``× finer than the sensor; its frames are never
demosaiced nor interpolated: drizzle.py drops each sample onto it.  Stars and registration stay in sensor pixels
(``stars_to_grid`` takes them onto the grid); on every other grid a frame's stars are already on its grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import geometry
from .debayer import REACH as DEBAYER_REACH
from .debayer import bin2x2_mean, debayer, debayer_mask
from .drizzle import LATTICES, DrizzleParams, grid_shape, lattice_channels
from .drizzle import reach as drop_reach
from .drizzle import sensor_to_grid as drizzle_to_grid
from .frame import Frame, Quality, Stars
from .normalize import normalize_inplace, plane_halved
from .reject import RejectParams
from .render import FrameOnGrid
from .stack import bin2
from .stars import STAMP_MAX_FWHM, StarParams, detect_stars, refine_centroids, stamp_radius
from .warp import REACH, warp, warp_mask, warp_points

# mode -> its demosaicing (the FITS DEBAYER card).  "bayer" is full resolution, bilinear: the name checkpoints
# and saved target references have always carried, so it stays; "bayer-mhc" is full resolution, Malvar-He-Cutler.
DEBAYER_OF_MODE = {"mono": None, "bayer": "bilinear", "bayer-mhc": "mhc", "superpixel": "superpixel",
                   "drizzle": "drizzle"}
MODES = tuple(DEBAYER_OF_MODE)
_MODE_OF_DEBAYER = {m: mode for mode, m in DEBAYER_OF_MODE.items() if m and mode != "drizzle"}
SPARSE_SATURATED = 20_000   # more saturated samples than this: masks over the whole frame are cheaper


def cell_centres(xy_cells: np.ndarray) -> np.ndarray:
    """Coordinates on a grid of 2×2 cells -> on the pixel grid they bin (cell i is centred on pixel 2i + 0.5)."""
    return np.asarray(xy_cells, np.float64) * 2.0 + 0.5


def cells_from_pixels(xy: np.ndarray) -> np.ndarray:
    """The inverse of cell_centres()."""
    return (np.asarray(xy, np.float64) - 0.5) / 2.0


def _sensor(pattern: str | None) -> str:
    """A sensor's kind as a reason says it: "CFA pattern RGGB", or "mono (no CFA pattern)" — not "CFA pattern
    None", which a mono frame among a colour camera's was refused with."""
    return f"CFA pattern {pattern}" if pattern else "mono (no CFA pattern)"


@dataclass(frozen=True, slots=True)
class Grid:
    """The shared grid of a target's stacks, and how a frame's sensor pixels reach it."""

    mode: str                          # "mono" | "bayer", "bayer-mhc" (full resolution) | "superpixel" (half)
                                       #   | "drizzle" (mono or Bayer, ``scale``× finer)
    sensor_shape: tuple[int, int]      # (H, W) of the raw frames
    pattern: str | None                # CFA pattern of the sensor, None for mono
    shape: tuple[int, int]             # (H, W) of every stack on this grid
    channels: int                      # 1 (mono) or 3 (R, G, B)
    sensor_to_grid: np.ndarray = field(repr=False)   # (2, 3): a reference-frame sensor pixel -> grid pixel
    wcs: object | None = None          # astropy.wcs.WCS of the grid once a plate solve lands
    scale: float = 1.0                 # drizzle: grid pixels per sensor pixel
    pixfrac: float = 1.0               # drizzle: a sample's drop, sensor px

    @classmethod
    def for_frame(cls, sensor_shape: tuple[int, int], pattern: str | None, debayer_method: str,
                  drizzle=None) -> "Grid":
        """The grid a session gets from its reference frame: mono, or Bayer with ``debayer_method`` (bilinear,
        mhc, superpixel; raises ValueError for another) — or, with ``drizzle`` (DrizzleParams, scale > 0), a
        drizzle grid of either."""
        h, w = (int(v) for v in sensor_shape)
        if drizzle is not None and drizzle.scale > 0:
            return cls("drizzle", (h, w), pattern, grid_shape((h, w), drizzle.scale), 1 if pattern is None else 3,
                       drizzle_to_grid(drizzle.scale), scale=float(drizzle.scale), pixfrac=float(drizzle.pixfrac))
        if pattern is None:
            return cls("mono", (h, w), None, (h, w), 1, geometry.identity())
        if debayer_method not in _MODE_OF_DEBAYER:
            raise ValueError(f"unknown debayer method '{debayer_method}' (known: {', '.join(_MODE_OF_DEBAYER)})")
        if debayer_method == "superpixel":
            return cls("superpixel", (h, w), pattern, (h // 2, w // 2), 3,
                       np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]]))
        return cls(_MODE_OF_DEBAYER[debayer_method], (h, w), pattern, (h, w), 3, geometry.identity())

    # ------------------------------------------------------------------ facts

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a stack on this grid."""
        return (self.channels,) + self.shape

    @property
    def cells(self) -> tuple[int, int]:
        """(h, w) of the grid's 2×2 cells (the outlier test's resolution)."""
        return ((self.shape[0] + 1) // 2, (self.shape[1] + 1) // 2)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.shape[1] - 1) / 2.0, (self.shape[0] - 1) / 2.0)

    @property
    def debayer(self) -> str | None:
        """The demosaicing of the stacks (None for mono): the FITS DEBAYER card."""
        return None if self.pattern is None else DEBAYER_OF_MODE[self.mode]

    @property
    def drizzled(self) -> bool:
        return self.mode == "drizzle"

    def same_pixels(self, other: "Grid") -> bool:
        """True when ``other`` lays its pixels where this one does, whatever its demosaicing: a WCS or a frame's
        matrix made on the one holds on the other (not from ×2 to ×1, nor to superpixels)."""
        return (self.sensor_shape, self.shape) == (other.sensor_shape, other.shape) and \
            np.array_equal(self.sensor_to_grid, other.sensor_to_grid)

    def judge_params(self, p: RejectParams) -> RejectParams:
        """The frame judge's settings for this grid's frames.  Its one absolute size, ``eccentricity_fwhm``, is in
        sensor pixels — the unit of the FWHM a full-resolution or drizzle grid's frames report; a superpixel
        frame's FWHM is in superpixels, so the limit is halved.  The eccentricity it gates is measured on the
        same 2×2-binned luminance in every mode: without this, the Seestar's trailed frames (FWHM 3.3 sensor px,
        1.65 superpixels) were rejected by the default debayer and all stacked by the superpixel one."""
        if self.mode != "superpixel":
            return p
        return dataclasses.replace(p, eccentricity_fwhm=p.eccentricity_fwhm / 2.0)

    @property
    def stars_to_grid(self) -> np.ndarray:
        """A frame's star coordinates (what registration matches) -> grid pixels: the sensor -> grid map on a
        drizzle grid, the identity on the others (their frames' stars are measured at grid resolution)."""
        return self.sensor_to_grid if self.drizzled else geometry.identity()

    @property
    def lum_weights(self) -> list[float]:
        """Weights of the channels in the outlier test's luminance: (R + 2G + B)/4, or the mono value."""
        return [1.0] if self.pattern is None else [0.25, 0.5, 0.25]

    @property
    def cell_samples(self) -> list[float]:
        """Independent raw samples of each channel in one 2×2 cell of the grid: 4 mono pixels; a Bayer cell
        holds 1 R, 2 G, 1 B; a superpixel cell spans 4 Bayer cells."""
        if self.pattern is None:
            return [4.0]         # (a drizzle grid's cells come from the same 2×2-binned mosaic as a Bayer one's)
        k = 4.0 if self.mode == "superpixel" else 1.0
        return [k, 2 * k, k]

    def mismatch(self, frame: Frame) -> str | None:
        """Why ``frame`` cannot go on this grid (another sensor size or CFA pattern), or None."""
        if frame.shape != self.sensor_shape:
            (h, w), (gh, gw) = frame.shape, self.sensor_shape
            reason = f"size {w}×{h} differs from the session's {gw}×{gh}"
            # k times smaller or larger on both axes: the same camera binned otherwise (R, G, B binned 2×2 beside
            # L at 1×1, as LRGB is often taken) — said, as the frames of one binning only go on one grid
            k = max(h, gh) // max(1, min(h, gh))
            if k > 1 and max(h, gh) == k * min(h, gh) and max(w, gw) == k * min(w, gw) and (h < gh) == (w < gw):
                reason += (f" ({k}× {'smaller' if h < gh else 'larger'}: another binning? the frames of one binning "
                           f"only are stacked together)")
            return reason
        if frame.pattern != self.pattern:
            return f"{_sensor(frame.pattern)} differs from the session's {_sensor(self.pattern)}"
        return None

    # ------------------------------------------------------------------ a frame's pixels, stage by stage

    def plane(self, plane_cfa: np.ndarray) -> np.ndarray:
        """Sky plane coefficients (C, 3) in sensor pixel coordinates -> in the frame's grid-resolution image."""
        return plane_halved(plane_cfa) if self.mode == "superpixel" else np.array(plane_cfa, np.float64)

    def find_stars(self, cfa: np.ndarray, white: float, p: StarParams) -> tuple[Stars, Quality, np.ndarray]:
        """Stars and quality in the frame's grid-resolution image coordinates, and the 2×2-binned image they
        were found on — for colour frames the binned mosaic ((R + 2G + B)/4 at a quarter of the pixels: 4×
        faster than the debayered image, same centroids), which is also the outlier test's luminance
        (``lum_cells``).  A new float32 array."""
        if self.pattern is None:
            stars, q = detect_stars(cfa, p, saturation=white)
            return stars, q, bin2(cfa)
        lum = bin2x2_mean(cfa)
        stars, q = detect_stars(lum, p, saturation=white, extra_var=1 / 12 - 1 / 48)
        if self.mode == "superpixel":
            return stars, q, lum
        s = Stars(cell_centres(stars.xy), stars.flux, stars.fwhm * 2.0, stars.a * 2.0, stars.b * 2.0)
        return s, Quality(q.stars, q.fwhm * 2.0, q.eccentricity, q.background, q.noise), lum

    def planes(self, cfa: np.ndarray) -> np.ndarray | None:
        """The frame's (C, H, W) float32 image where the stack is made from a whole one: mono's mosaic itself.
        None for a Bayer frame, which is demosaiced a block at a time as it is warped (``source``; superpixel
        too: its quarter planes, 72 MB at 24 MP, are never whole), and for a drizzle, which takes the mosaic."""
        if self.drizzled or self.pattern is not None:
            return None
        return cfa[None]

    def source(self, cfa: np.ndarray, img: np.ndarray | None, matrix: np.ndarray, *,
               interpolation: str, signal: np.ndarray | None = None, normalise=None) -> FrameOnGrid:
        """What the stack takes a (normalised) frame's pixels from, a block of grid rows at a time: ``img``
        from planes() warped by ``matrix`` (frame -> grid), or — when it is None — the mosaic demosaiced and
        warped block by block (superpixel: each window normalised by ``normalise``, a
        normalize.Normalisation, as it is made).  ``signal``: render.signal_cells of find_stars' binned image
        (the sharpening only where the frame has signal), or None (everywhere)."""
        if img is not None:
            return FrameOnGrid(img, matrix, self.shape, interpolation=interpolation, signal=signal, signal_step=4)
        if self.mode == "superpixel":   # its image is find_stars' binned image's size: cells of 2 px
            return FrameOnGrid(cfa, matrix, self.shape, interpolation=interpolation, pattern=self.pattern,
                               debayer="superpixel", signal=signal, signal_step=2, normalise=normalise)
        return FrameOnGrid(cfa, matrix, self.shape, interpolation=interpolation, pattern=self.pattern,
                           debayer=self.debayer, signal=signal, signal_step=4)

    def refine(self, stars: Stars, fwhm: float, cfa: np.ndarray) -> Stars:
        """Windowed centroids where the binned detection was coarse.  Bayer: on the demosaiced image around each
        star (binned centroids of undersampled stars carry ~0.1 px pixel-phase errors; windowed ones ~0.03 px).
        Superpixel: the grid has no finer image than the binned one, but the mosaic does (its 2×2 colour
        pattern averages out inside the window): ~0.08 -> ~0.03 sensor px RMS.  Mono: sep's own windowed
        centroids are already on the full image."""
        if not len(stars) or self.pattern is None:
            return stars
        if self.drizzled:       # no demosaiced image: the mosaic, as for superpixel (sensor px here)
            return Stars(refine_centroids(cfa[None], stars.xy, fwhm), stars.flux, stars.fwhm, stars.a, stars.b)
        if self.mode == "superpixel":
            xy = refine_centroids(cfa[None], cell_centres(stars.xy), fwhm * 2.0)
            return Stars(cells_from_pixels(xy), stars.flux, stars.fwhm, stars.a, stars.b)
        xy = refine_demosaiced(cfa, self.pattern, self.debayer, stars.xy, fwhm)
        return Stars(xy, stars.flux, stars.fwhm, stars.a, stars.b)

    def lum_cells(self, lum: np.ndarray, plane: np.ndarray, scale: float, ref_plane: np.ndarray,
                  matrix: np.ndarray, *, interpolation: str, out: np.ndarray | None = None,
                  parallel_map=None) -> np.ndarray:
        """The outlier test's luminance of a frame on the grid's cells: ``lum`` (from find_stars: 2×2 cells of
        the frame — for superpixel, one value per grid pixel) normalised like the pixels (``plane`` and
        ``ref_plane``: (C, 3) sky planes on the frame's and the stack's grid-resolution coordinates) and warped
        by ``matrix`` (frame -> grid).  ``lum`` is modified.

        Mono and Bayer: the cells are warped at half resolution.  Superpixel: a grid cell spans 4×4 sensor
        pixels, and interpolating at that scale would make an undersampled star's cell depend on its sub-cell
        position (the test would reject star cores of a frame that moved): warped at grid resolution, binned
        after."""
        lw = np.asarray(self.lum_weights)
        if self.mode == "superpixel":
            normalize_inplace(lum[None], (lw @ plane)[None], scale, (lw @ ref_plane)[None], matrix,
                              parallel_map=parallel_map)
            return bin2(warp(lum[None], matrix, self.shape, interpolation=interpolation)[0])
        half = geometry.halved(matrix)
        normalize_inplace(lum[None], plane_halved(lw @ plane), scale, plane_halved(lw @ ref_plane), half,
                          parallel_map=parallel_map)
        return warp(lum[None], half, self.cells, interpolation=interpolation,
                    out=None if out is None else out[None])[0]

    @staticmethod
    def needs_mask(points: np.ndarray | None) -> bool:
        """Whether saturated() takes the frame's mask, not only its ``points`` (very many: the Moon)."""
        return points is not None and len(points) > SPARSE_SATURATED

    def saturated(self, frame: Frame, points: np.ndarray | None, matrix: np.ndarray, *, interpolation: str,
                  warped: bool = True):
        """The grid pixels that saturated samples feed (through the debayer and, when ``warped``, the warp by
        ``matrix``) as (rows, cols) — or, when there are very many (the Moon), the dense mask the same rules
        give; a drizzle's per channel (_saturated_drops).  ``points``: cv2.findNonZero's (x, y) of the CFA
        samples, or None."""
        if points is None:
            return None
        if self.drizzled:
            return self._saturated_drops(frame, points, matrix)
        if self.needs_mask(points):
            sat = debayer_mask(frame.saturated, frame.pattern, self.debayer or "bilinear")
            if not warped:
                return sat
            return warp_mask(sat, matrix, self.shape, reach=REACH[interpolation])   # the points' rule below
        xs, ys = points.reshape(-1, 2).T
        if self.mode == "superpixel":
            xs, ys = xs // 2, ys // 2
            inside = (xs < self.shape[1]) & (ys < self.shape[0])
            xs, ys = xs[inside], ys[inside]
        # a full-resolution demosaic spreads a sample over ±1 (bilinear) or ±2 (mhc) pixels before the warp
        reach = (REACH[interpolation] if warped else 0.5) + DEBAYER_REACH.get(self.debayer, 0)
        return warp_points(ys, xs, matrix if warped else geometry.identity(), self.shape, reach=reach)

    def _saturated_drops(self, frame: Frame, points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Drizzle: the grid pixels each saturated sample's drop overlaps, in the sample's own channel only, as a
        (3, N) int32 array of rows, cols and channels.  A drizzle puts each sample in its own colour plane, so a
        saturated G sample says nothing of the R plane beside it: flagged there too, a good R value (weight
        1e-6) lost to any sliver of a wing sample's drop that another frame laid on the pixel — a dark hole in
        the edge of a bright star (1 600 ADU among 15 000), rung to −20 000 by the compensation."""
        lattice = np.asarray(lattice_channels(self.pattern))
        out = []
        if self.needs_mask(points):      # very many (the Moon): the mask of each sub-lattice, warped
            for c in range(self.channels):
                mask = np.zeros_like(frame.saturated)
                for (ox, oy), ch in zip(LATTICES, lattice):
                    if ch == c:
                        mask[oy::2, ox::2] = frame.saturated[oy::2, ox::2]
                # (warp_mask's rule is a bilinear read's, 1 sensor px: as wide as a drop reaches, or wider)
                ys, xs = np.nonzero(warp_mask(mask, matrix, self.shape, reach=1.0))
                out.append((ys, xs, np.full(len(ys), c)))
        else:
            xs, ys = points.reshape(-1, 2).T
            channel = lattice[(xs % 2) + 2 * (ys % 2)]
            for c in range(self.channels):
                sel = channel == c
                gy, gx = warp_points(ys[sel], xs[sel], matrix, self.shape,
                                     reach=drop_reach(self.pixfrac, self.scale))
                out.append((gy, gx, np.full(len(gy), c)))
        return np.concatenate([np.stack(p).astype(np.int32).reshape(3, -1) for p in out], axis=1)

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict:
        """Plain values: what the grid is (for matching frames against it); its WCS separately (wcs_state)."""
        s = {"mode": self.mode, "sensor_shape": list(self.sensor_shape), "pattern": self.pattern}
        if self.drizzled:
            s.update(scale=self.scale, pixfrac=self.pixfrac)
        return s

    def wcs_state(self) -> str | None:
        """The WCS as FITS header text, for a checkpoint."""
        if self.wcs is None:
            return None
        from .solve import wcs_to_text

        return wcs_to_text(self.wcs)

    @classmethod
    def from_state(cls, s: dict, wcs_text: str | None = None) -> "Grid":
        drizzle = DrizzleParams(scale=s["scale"], pixfrac=s["pixfrac"]) if s["mode"] == "drizzle" else None
        grid = cls.for_frame(tuple(s["sensor_shape"]), s["pattern"],
                             "bilinear" if drizzle else DEBAYER_OF_MODE[s["mode"]] or "bilinear", drizzle)
        if wcs_text:
            from .solve import wcs_from_header_text

            grid = dataclasses.replace(grid, wcs=wcs_from_header_text(wcs_text))
        return grid


def refine_demosaiced(cfa: np.ndarray, pattern: str, method: str, xy: np.ndarray, fwhm: float) -> np.ndarray:
    """stars.refine_centroids on debayer(cfa, pattern, method) without demosaicing the frame: only a patch
    around each star is (the patches, stacked into one narrow mosaic, demosaic in one call; each keeps a
    margin the kernels' reach wide, so its inside has the whole mosaic's values; each is 4 px wider than the
    window on every side, more than refine_centroids lets a star move).  (N, 2) float64 positions; stars too
    near the edge keep theirs."""
    xy = np.asarray(xy, np.float64)
    if len(xy) == 0 or not fwhm <= STAMP_MAX_FWHM:
        return xy.copy()
    h, w = cfa.shape
    r = stamp_radius(fwhm)
    half = r + 4                     # the window may walk a few px from the detection before it is refused
    s = 2 * half + 2                 # patch side (even: patches keep the CFA phase)
    m = DEBAYER_REACH[method] + DEBAYER_REACH[method] % 2       # margin, even
    out = xy.copy()
    # refine_centroids' own edge rule, on the frame
    inside = (xy[:, 0] >= r + 1) & (xy[:, 0] < w - r - 2) & (xy[:, 1] >= r + 1) & (xy[:, 1] < h - r - 2)
    idx = np.flatnonzero(inside)
    if idx.size == 0 or h < s or w < s:
        return out
    origin = np.empty((idx.size, 2), np.int64)
    for k, size in ((0, w), (1, h)):
        origin[:, k] = np.clip((np.rint(xy[idx, k]).astype(np.int64) - half) & ~1, 0, (size - s) & ~1)
    span = np.arange(-m, s + m)
    ys = _reflect(origin[:, 1, None] + span[None], h)          # (N, s + 2m), reflected as the demosaic would
    xs = _reflect(origin[:, 0, None] + span[None], w)
    patches = cfa[ys[:, :, None], xs[:, None, :]].reshape(-1, s + 2 * m)
    rgb = debayer(patches, pattern, method).reshape(3, idx.size, s + 2 * m, s + 2 * m)
    stamps = np.ascontiguousarray(rgb[:, :, m:m + s, m:m + s]).reshape(3, idx.size * s, s)
    local = xy[idx] - origin
    local[:, 1] += np.arange(idx.size) * s                   # patch i lies at rows i·s … i·s + s − 1
    refined = refine_centroids(stamps, local, fwhm)
    refined[:, 1] -= np.arange(idx.size) * s
    out[idx] = refined + origin
    return out


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Indices beyond 0 … n − 1 reflected as BORDER_REFLECT_101 does (the demosaic's border)."""
    i = np.abs(i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)
