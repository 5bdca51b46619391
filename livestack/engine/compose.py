"""Colour composite of several filter stacks on one pixel grid: linear stacks in, one linear RGB image out.

Each source s (a mono stack, a channel or a mean of channels of a colour stack) gets its own LINEAR brightness
mapping, measured once on a reduced copy, and the composite is a linear combination of the mapped sources:

    out_c(x, y) = Σ_s mix_s[c] · (x_s(x, y) − bg_s(x, y)) / white_s

``bg_s`` is a smooth background (a degree ≤ 2 polynomial in the pixel coordinates, fitted to clipped medians of a
coarse mesh of cells, so it can be evaluated anywhere on the full-resolution grid); ``white_s`` is the level that
maps to 1: a high percentile of the background-subtracted covered pixels, at least ``white_sigma`` × the
background noise (a filter without signal is not amplified into noise).  Nothing is stretched: a positive scale
and an added plane on any stack leave the composite unchanged.  ``mix_s`` holds the palette's colour of the
source times the user's weight:

    RGB    R, G, B                       LRGB   out_c = C_c + (L − (C_R + C_G + C_B)/3), C_c from R, G, B
    SHO    R = SII, G = Ha, B = OIII     HOO    R = Ha, G = B = OIII
    HUES   each filter a hue from its wavelength order (shortest blue, longest red; L white) or from the config;
           colour stacks alone (one colour camera, several filters): each stack's channels in their own colours

The palette is chosen and the mappings measured once (``plan_composite``, on reduced copies ≤ ~1600 px: ~0.1 s
per stack) and applied in blocks of rows at full resolution (``composite_rows``): a 26 MP composite (300 MB) is
streamed into its file without whole-image temporaries, or to a reduced copy for a preview.  Pixels where a
source in use has no data (NaN) are NaN in all three channels: a colour is only right where every filter is.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
import numbers

import numpy as np

from .filtername import canonical_filter, folded, is_dual_band
from .normalize import pair_noise
from .stretch import reduce

PALETTES = ("auto", "RGB", "LRGB", "SHO", "HOO", "HUES")


# Central wavelengths, nm.  L is a broad band: white in HUES, whatever its wavelength.
_WAVELENGTH = {"B": 450.0, "OIII": 501.0, "G": 530.0, "L": 550.0, "R": 640.0, "Ha": 656.0, "SII": 672.0}
_UNKNOWN_WAVELENGTH = 560.0   # a filter of unknown name sorts in the middle of the visible range, by name
# Stacks of unfiltered light, white in HUES as L: the frames without a FILTER card (the engine's label "none"),
# and FILTER values that say there is none
_UNFILTERED = ("none", "nofilter", "clear")

_THIRD = 1.0 / 3.0
# palette -> {canonical filter: its (R, G, B) mix}, and the mapping as written in the PALETTE card.
_MIXES = {
    "RGB": {"R": (1.0, 0.0, 0.0), "G": (0.0, 1.0, 0.0), "B": (0.0, 0.0, 1.0)},
    # out_c = C_c + L − (C_R + C_G + C_B)/3: the luminance is L's, the colour differences RGB's
    "LRGB": {"L": (1.0, 1.0, 1.0), "R": (2 * _THIRD, -_THIRD, -_THIRD), "G": (-_THIRD, 2 * _THIRD, -_THIRD),
             "B": (-_THIRD, -_THIRD, 2 * _THIRD)},
    "SHO": {"SII": (1.0, 0.0, 0.0), "Ha": (0.0, 1.0, 0.0), "OIII": (0.0, 0.0, 1.0)},
    "HOO": {"Ha": (1.0, 0.0, 0.0), "OIII": (0.0, 1.0, 1.0)},
}
_MAPPING_TEXT = {"RGB": "R=R G=G B=B", "LRGB": "L=L R=R G=G B=B", "SHO": "R=SII G=Ha B=OIII",
                 "HOO": "R=Ha G=OIII B=OIII"}
_AUTO = {frozenset(m): name for name, m in _MIXES.items()}   # exactly these filters -> this palette

HEADER_MAX = 68   # characters of a FITS string value on one card


def _lookup(table: Mapping, name: str, default):
    """The entry of ``table`` for filter ``name``: the same name, the same name in other case or spacing, or
    another spelling of the same filter ("H-alpha" finds "Ha")."""
    if name in table:
        return table[name]
    cased, canon = name.strip().casefold(), canonical_filter(name)
    for k, v in table.items():
        if k.strip().casefold() == cased or (canon is not None and canonical_filter(k) == canon):
            return v
    return default


def _number(v) -> float:
    """A number of the configuration or of a request as a float; NaN for anything else — a string or true/false,
    which float() takes ("1", True: a palette weight of 1 sent as text or as a switch is a client's mistake, not
    a weight), or an int beyond a float (10**400)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return float("nan")
    try:
        return float(v)
    except OverflowError:
        return float("nan")


@dataclass(frozen=True, slots=True)
class ComposeParams:
    palette: str = "auto"        # auto | RGB | LRGB | SHO | HOO | HUES (any case)
    # filter name -> (r, g, b) in [0, 1], its colour in HUES; other filters get one from their wavelength order
    hues: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)   # filter name -> factor in [0, 10] on its contribution; 0 drops it
    background_degree: int = 1   # background polynomial: 0 constant, 1 plane (gradients), 2 also curvature
    background_cells: int = 16   # mesh cells on the long side for the background's clipped medians
    white_percentile: float = 99.5   # white point: this percentile of the covered background-subtracted pixels
    white_sigma: float = 20.0    # ... and at least this many background σ (noise alone is not amplified)
    # RGB, LRGB: the filters' white points in the ratio of their stars' fluxes (the typical star comes out white),
    # scaled so that none is below its own rule above; else (and with < STAR_WHITE_MIN stars) that rule alone
    star_white: bool = True

    def __post_init__(self):
        known = {p.casefold(): p for p in PALETTES}
        if not isinstance(self.palette, str) or self.palette.strip().casefold() not in known:
            raise ValueError(f"compose.palette = {self.palette!r}: unknown (known: {', '.join(PALETTES)})")
        object.__setattr__(self, "palette", known[self.palette.strip().casefold()])
        hues = {}
        for name, hue in dict(self.hues).items():
            h = tuple(_number(v) for v in hue) if isinstance(hue, (list, tuple)) else ()
            if not isinstance(name, str) or len(h) != 3 or not all(0.0 <= v <= 1.0 for v in h):
                raise ValueError(f"compose.hues[{name!r}] = {hue!r}: must be 3 numbers in [0, 1] (r, g, b)")
            hues[name] = h
        object.__setattr__(self, "hues", hues)
        weights = {}
        for name, w in dict(self.weights).items():
            v = _number(w)
            if not isinstance(name, str) or not 0.0 <= v <= 10.0:
                raise ValueError(f"compose.weights[{name!r}] = {w!r}: must be a number in [0, 10]")
            weights[name] = v
        object.__setattr__(self, "weights", weights)
        if self.background_degree not in (0, 1, 2):
            raise ValueError(f"compose.background_degree = {self.background_degree}: must be 0, 1 or 2")
        if not 2 <= self.background_cells <= 64:
            raise ValueError(f"compose.background_cells = {self.background_cells}: must be in [2, 64]")
        if not 50.0 <= self.white_percentile <= 100.0:
            raise ValueError(f"compose.white_percentile = {self.white_percentile}: must be in [50, 100]")
        if not 0.0 < self.white_sigma <= 1000.0:
            raise ValueError(f"compose.white_sigma = {self.white_sigma}: must be in (0, 1000]")
        if not isinstance(self.star_white, bool):
            raise ValueError(f"compose.star_white = {self.star_white!r}: must be true or false")


def _terms(degree: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of u^i v^j of a 2-D polynomial of total degree ≤ ``degree``: 1, u, v, u², uv, v²."""
    return [(t - j, j) for t in range(degree + 1) for j in range(t + 1)]


def _norm(px: np.ndarray, n: int) -> np.ndarray:
    """Full-resolution pixel coordinates 0 … n − 1 -> −1 … 1 (float64): keeps a degree-2 fit well conditioned."""
    return 2.0 * np.asarray(px, np.float64) / (n - 1) - 1.0 if n > 1 else np.zeros(np.shape(px))


def _axis(idx: np.ndarray, n_grid: int, n_full: int) -> np.ndarray:
    """Pixel indices along an axis of a grid of ``n_grid`` pixels spanning the full grid's ``n_full`` (a reduced
    copy: pixel j covers full pixels j·s … (j + 1)·s, s = n_full / n_grid) -> normalised full coordinates."""
    x = np.asarray(idx, np.float64)
    if n_grid != n_full:
        x = (x + 0.5) * (n_full / n_grid) - 0.5
    return _norm(x, n_full)


def _poly_rows(coef: np.ndarray, degree: int, r0: int, r1: int, full: tuple[int, int],
               grid: tuple[int, int]) -> np.ndarray:
    """Σ coef_k u^i v^j on rows r0:r1 of ``grid`` -> (r1 − r0, w) float32 (see SourceMap.background_rows)."""
    v = _axis(np.arange(r0, r1), grid[0], full[0])
    u = _axis(np.arange(grid[1]), grid[1], full[1])
    out = np.zeros((r1 - r0, grid[1]), np.float64)
    for i in range(degree + 1):        # Σ_i (Σ_j c_ij v^j) u^i: row terms × column terms
        row = np.zeros(r1 - r0)
        for k, (ii, j) in enumerate(_terms(degree)):
            if ii == i:
                row += coef[k] * v ** j
        out += row[:, None] * (u ** i)[None, :]
    return out.astype(np.float32)


@dataclass(frozen=True, slots=True)
class SourceMap:
    """One source of a composite and its brightness mapping (x − bg(x, y)) / white, x in stack units."""
    stack: str                   # its stack: the key in the mapping of images
    channels: tuple[int, ...]    # channels of that stack averaged: (0,) mono or one channel, (1, 2) OIII of a
                                 # dual-band colour stack, (0, 1, 2) a colour stack's luminance
    label: str                   # the filter it stands for ("Ha", "R", …), else the stack's own name
    background: np.ndarray       # (k,) float64 coefficients of u^i v^j (_terms(degree)); u, v = −1…1 over the grid
    degree: int                  # of the background polynomial (lower than asked when few cells had data)
    sigma: float                 # background noise of the reduced copy, stack units (0 when unmeasurable)
    white: float                 # stack units above the background mapped to 1.0
    mix: tuple[float, float, float]   # contribution of the mapped source to R, G, B, the weight included

    def background_rows(self, r0: int, r1: int, full: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        """The background model on rows r0:r1 of ``grid`` (h, w), a grid spanning the full-resolution (H, W)
        ``full`` (the same, or a reduced copy): (r1 − r0, w) float32, a new array.  Each row is computed alone,
        so any split into blocks gives the same values."""
        return _poly_rows(self.background, self.degree, r0, r1, full, grid)

    def mapped_rows(self, block: np.ndarray, r0: int, full: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        """(C, n, w) rows r0:r0 + n of this source's stack on ``grid`` (see background_rows) -> (n, w) float32
        (x − bg) / white, NaN kept (a new array)."""
        x = block[self.channels[0]].astype(np.float32, copy=True)
        for c in self.channels[1:]:
            x += block[c]
        if len(self.channels) > 1:
            x *= np.float32(1.0 / len(self.channels))
        x -= self.background_rows(r0, r0 + block.shape[1], full, grid)
        x *= np.float32(1.0 / self.white)
        return x


@dataclass(frozen=True, slots=True)
class CompositePlan:
    """How to build a composite: the palette chosen, each source's mapping, and its description."""
    palette: str                      # chosen: "RGB", "LRGB", "SHO", "HOO" or "HUES"
    requested: str                    # ComposeParams.palette ("auto" or a palette name)
    sources: tuple[SourceMap, ...]
    shape: tuple[int, int]            # (H, W) of the full-resolution grid
    channels: dict                    # stack name -> C (1 or 3) of every stack used
    header: str                       # value of the FITS card PALETTE: ASCII, ≤ 68 characters, palette name first
    description: str                  # the long form for the UI: mapping, notes, weights, white points
    fallback: bool                    # the requested palette's filters were not all there: HUES instead
    ignored: tuple[str, ...]          # stacks left out (not in the requested palette, or weight 0)

    @property
    def stacks(self) -> tuple[str, ...]:
        """Names of the stacks whose rows composite_rows needs."""
        return tuple(self.channels)


@dataclass(frozen=True, slots=True)
class _Candidate:
    stack: str
    channels: tuple[int, ...]
    label: str
    canon: str | None
    luminance: bool             # a colour stack's luminance: white in HUES unless a hue is configured
    whole: bool                 # the whole stack (False: channels of a colour stack standing for filters)
    hue: tuple[float, float, float] | None = None   # its colour in HUES, whatever the order (a colour channel)


# A colour stack's channels as sources: (channels, filter they stand for, colour in HUES) — its R, G, B, or behind
# a dual-band filter Ha from the R pixels and OIII from the G and B pixels.
_RGB_CHANNELS = (((0,), "R", (1.0, 0.0, 0.0)), ((1,), "G", (0.0, 1.0, 0.0)), ((2,), "B", (0.0, 0.0, 1.0)))
_HOO_CHANNELS = (((0,), "Ha", (1.0, 0.0, 0.0)), ((1, 2), "OIII", (0.0, 1.0, 1.0)))


def _candidates(chans: Mapping[str, int], p: ComposeParams) -> list[_Candidate]:
    """The sources the stacks offer.  A single colour stack offers its channels as R, G, B — or, for HOO (a
    dual-band filter), Ha from R and OIII from (G + B)/2.  Among several stacks a colour stack offers its
    luminance (the mean of its channels) as one source beside mono stacks, or when a hue is configured for it;
    when every stack is colour (one colour camera behind several filters: a UV/IR cut and a dual-band filter,
    the Seestar's IRCUT and LP) each offers its channels as above (HOO when its name is a dual-band filter's),
    named "<stack>:<channel>" and drawn in their own colours — as luminances every one was white, and the
    composite grey."""
    if len(chans) == 1 and next(iter(chans.values())) == 3:
        name = next(iter(chans))
        if p.palette == "HOO":
            return [_Candidate(name, (0,), "Ha", "Ha", False, False),
                    _Candidate(name, (1, 2), "OIII", "OIII", False, False)]
        return [_Candidate(name, (c,), lab, lab, False, False) for c, lab in enumerate("RGB")]
    all_colour = all(c == 3 for c in chans.values())
    canons = [canonical_filter(name) for name in chans]
    out = []
    for (name, c), canon in zip(chans.items(), canons):
        if all_colour and _lookup(p.hues, name, None) is None:
            out += [_Candidate(name, ch, f"{name}:{lab}", lab, False, False, hue)
                    for ch, lab, hue in (_HOO_CHANNELS if is_dual_band(name) else _RGB_CHANNELS)]
        else:
            # labelled by its filter ("L" for "Luminance") unless another stack is that filter too: "Ha 7nm" and
            # "Ha 3nm" were both "Ha" in the mapping, and which one was drawn red could not be told
            label = canon if canon is not None and canons.count(canon) == 1 else name
            out.append(_Candidate(name, (0,) if c == 1 else (0, 1, 2), label, canon, c == 3, True))
    return out


def _hsv(deg: float) -> np.ndarray:
    """Fully saturated colour of hue angle ``deg`` (0 red, 120 green, 240 blue): (3,) float64, max 1."""
    h = (deg % 360.0) / 60.0
    x = 1.0 - abs(h % 2.0 - 1.0)
    return np.array([(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6], np.float64)


def _hues(cands: list[_Candidate], p: ComposeParams) -> list[np.ndarray]:
    """The (3,) colour of each candidate in HUES: configured, white (L, unfiltered light, a colour stack's
    luminance, a lone filter), else from the wavelength order of the rest: spread from blue (240°) to red (0°);
    two filters get cyan and red (they add up to white)."""
    out: list[np.ndarray | None] = []
    free = []
    for i, c in enumerate(cands):
        hue = c.hue or _lookup(p.hues, c.stack if c.whole else c.label, None)
        if hue is not None:
            out.append(np.array(hue, np.float64))
        elif c.canon == "L" or c.luminance or (c.whole and folded(c.stack) in _UNFILTERED):
            # (frames without a FILTER among filtered ones took a hue of their own, 560 nm's yellow-green, and
            # pushed G to teal: {L, R, G, B, none} drew G as (0, 1, 0.67))
            out.append(np.ones(3))
        else:
            out.append(None)
            free.append(i)
    order = sorted(free, key=lambda i: (_WAVELENGTH.get(cands[i].canon, _UNKNOWN_WAVELENGTH),
                                        cands[i].label.casefold(), cands[i].stack))
    n = len(order)
    for rank, i in enumerate(order):
        if n == 1:
            lam = _WAVELENGTH.get(cands[i].canon)
            # alone: shown grey; beside white sources: its own colour (Ha red with an L or a colour stack)
            out[i] = np.ones(3) if len(cands) == 1 or lam is None else _hsv(float(np.interp(
                lam, [450.0, 501.0, 530.0, 640.0], [240.0, 180.0, 120.0, 0.0])))
        elif n == 2:
            out[i] = _hsv(180.0 if rank == 0 else 0.0)
        else:
            out[i] = _hsv(240.0 * (1.0 - rank / (n - 1)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


def _choose(cands: list[_Candidate], p: ComposeParams):
    """-> (palette, [(candidate, base mix (3,), hue shown or None)], notes, ignored stacks, fallback, whether
    notes[0] goes in the PALETTE card: a fallback's, or auto's palette lacking a filter)."""
    canon: dict[str, _Candidate] = {}
    for c in cands:
        if c.canon is not None and c.canon not in canon:
            canon[c.canon] = c
    notes, ignored, fallback = [], [], False
    palette = p.palette
    if palette == "auto":
        exact = len(canon) == len(cands)          # no unknown names, no two stacks of one filter
        palette = _AUTO.get(frozenset(canon), "HUES") if exact and len(cands) >= 2 else "HUES"
        near = [name for name, mix in _MIXES.items() if exact and len(cands) >= 2 and set(canon) < set(mix)]
        if palette == "HUES" and near:
            # some of a palette's filters (one still to come, or every frame of one rejected): HUES drew L, R, G
            # as white, red and cyan, and nothing said why the LRGB night was not LRGB
            best = min(near, key=lambda name: len(_MIXES[name]))
            notes.append(f"{best} lacks {', '.join(f for f in _MIXES[best] if f not in canon)}")
    elif palette != "HUES":
        missing = [f for f in _MIXES[palette] if f not in canon]
        if missing:
            notes.append(f"{palette} lacks {', '.join(missing)}")
            palette, fallback = "HUES", True
    headed = bool(notes)        # the only note so far: a fallback's, or the palette auto's filters lack
    if palette == "HUES":
        hues = _hues(cands, p)
        total = np.sum(hues, axis=0)
        # at most 1 per channel where every filter is at its white point, whatever the number of filters
        scale = 1.0 / max(1.0, float(total.max()))
        if scale != 1.0:
            notes.append(f"hues scaled by {_fmt(scale)}")
        return palette, [(c, h * scale, h) for c, h in zip(cands, hues)], notes, ignored, fallback, headed
    used = {id(canon[f]) for f in _MIXES[palette]}
    chosen = [(canon[f], np.array(m, np.float64), None) for f, m in _MIXES[palette].items()]
    ignored = list(dict.fromkeys(c.stack for c in cands if id(c) not in used))   # a colour stack's channels: once
    if ignored:
        notes.append(f"ignored {', '.join(ignored)} (not in {palette})")
    return palette, chosen, notes, ignored, fallback, False


def _row_medians(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of the finite values of each row of an (n, m) array (NaN: missing) -> (medians (n,) float64, NaN
    for a row without values; counts (n,)).  One sort (NaN sorts last): no per-row Python loop."""
    srt = np.sort(a, axis=1)
    k = np.isfinite(a).sum(axis=1)
    lo, hi = np.maximum(k - 1, 0) // 2, k // 2
    rows = np.arange(a.shape[0])
    med = 0.5 * (srt[rows, lo].astype(np.float64) + srt[rows, np.minimum(hi, a.shape[1] - 1)])
    return np.where(k > 0, med, np.nan), k


def _cell_medians(img: np.ndarray, full: tuple[int, int], cells: int):
    """(h, w) reduced image -> cell centres u, v (normalised full-resolution coordinates) and the median of each
    cell after clipping its pixels at 3σ of their MAD (stars).  Cells less than half covered are left out.
    Vectorised over the cells (three sorts of the image): ~30 ms for a 1600 × 1067 copy."""
    h, w = img.shape
    # at least 8 × 8 pixels a cell: a median of fewer is noise (and a small image needs few cells)
    gy = max(1, min(h // 8, round(cells * h / max(h, w))))
    gx = max(1, min(w // 8, round(cells * w / max(h, w))))
    bh, bw = -(-h // gy), -(-w // gx)          # the last row and column of cells may be cut short
    pad = np.full((gy * bh, gx * bw), np.nan, np.float32)
    pad[:h, :w] = img
    a = pad.reshape(gy, bh, gx, bw).transpose(0, 2, 1, 3).reshape(gy * gx, bh * bw)
    med, n = _row_medians(a)
    with np.errstate(invalid="ignore"):
        dev = np.abs(a - med[:, None].astype(np.float32))
        s = 1.4826 * _row_medians(dev)[0]
        clip = dev > 3 * s[:, None]                     # s = 0 (a flat cell): nothing to clip
    a = np.where(clip & (s[:, None] > 0), np.float32(np.nan), a)
    med = _row_medians(a)[0]
    # real pixels of each cell (the padding is not a pixel) and its centre
    ys, xs = np.arange(gy) * bh, np.arange(gx) * bw
    ny, nx = np.minimum(ys + bh, h) - ys, np.minimum(xs + bw, w) - xs
    ok = (n >= np.maximum(1, (ny[:, None] * nx[None, :]).ravel() // 2)) & np.isfinite(med)
    cy = np.repeat(ys + (ny - 1) / 2.0, gx)
    cx = np.tile(xs + (nx - 1) / 2.0, gy)
    return _axis(cx[ok], w, full[1]), _axis(cy[ok], h, full[0]), med[ok]


def _clipped_fit(u: np.ndarray, v: np.ndarray, m: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares polynomial through the cell medians ``m`` at (u, v) -> (k,) float64 coefficients; cells above
    the fit by 2.5σ (nebulae, clusters) or below by 4σ are left out, up to five rounds."""
    terms = _terms(degree)
    a = np.column_stack([u ** i * v ** j for i, j in terms])
    keep = np.ones(m.size, bool)
    coef = np.zeros(len(terms))
    for _ in range(5):
        coef = np.linalg.lstsq(a[keep], m[keep], rcond=None)[0]
        r = m - a @ coef
        s = 1.4826 * np.median(np.abs(r[keep]))
        new = (r <= 2.5 * s) & (r >= -4.0 * s)
        if new.sum() < len(terms) or np.array_equal(new, keep):
            break
        keep = new
    return coef


def _fit_background(img: np.ndarray, full: tuple[int, int], p: ComposeParams) -> tuple[np.ndarray, int]:
    """Background polynomial of a reduced (h, w) image -> (coefficients (k,) float64, degree); the degree falls
    when fewer than 2 cells per coefficient have data.  Three passes, each fitting what the previous model left:
    a median does not commute with a gradient across its cell, a median of the flattened cell nearly does (so
    a·x + plane gives a·bg + plane to float precision, and the cells' clipping sees flat sky)."""
    coef, degree = np.zeros(1), 0
    for it in range(3):
        rest = img if it == 0 else img - _poly_rows(coef, degree, 0, img.shape[0], full, img.shape)
        u, v, m = _cell_medians(rest, full, p.background_cells)
        if m.size == 0:
            vals = img[np.isfinite(img)]
            return np.array([float(np.median(vals)) if vals.size else 0.0]), 0
        if it == 0:
            degree = p.background_degree
            while degree > 0 and m.size < 2 * len(_terms(degree)):
                degree -= 1
            coef = np.zeros(len(_terms(degree)))
        coef = coef + _clipped_fit(u, v, m, degree)
    return coef, degree


def _measure(cand: _Candidate, img: np.ndarray, full: tuple[int, int], mix: np.ndarray,
             p: ComposeParams) -> SourceMap:
    """Fit the background and the white point of one source on its reduced (C, h, w) stack."""
    x = img[cand.channels[0]].astype(np.float32)
    for c in cand.channels[1:]:
        x = x + img[c]
    x /= np.float32(len(cand.channels))
    coef, degree = _fit_background(x, full, p)
    rest = (x - _poly_rows(coef, degree, 0, x.shape[0], full, x.shape))[np.isfinite(x)]
    d = np.diff(x[::max(1, x.size // 200_000)], axis=1)      # ≤ ~2·10⁵ pairs of neighbours: enough for σ
    d = d[np.isfinite(d)]
    sigma = pair_noise(d) if d.size >= 10 else 0.0
    white = max(float(np.percentile(rest, p.white_percentile)) if rest.size else 0.0, p.white_sigma * sigma)
    if not (np.isfinite(white) and white > 0):
        white = 1.0          # no signal and no noise (a constant stack): it maps to 0 whatever the scale
    return SourceMap(cand.stack, cand.channels, cand.label, coef, degree, float(sigma), white,
                     tuple(float(c) for c in mix))


STAR_WHITE_MIN = 8      # stars measured in every filter before star_white decides the balance
STAR_WHITE_MAX = 30     # … of which the brightest this many decide it


def _star_ratios(sources: tuple[SourceMap, ...], star_fluxes: Mapping) -> tuple[np.ndarray | None, int]:
    """Each source's star flux over the first's, the typical ratio (_middle_mean) of the brightest STAR_WHITE_MAX
    stars measured at ≥ 10 σ in every source, and how many stars that was — None for the ratios when fewer than
    STAR_WHITE_MIN.  ``star_fluxes`` maps a stack's name to ((C, N) fluxes, (C, N) errors) of the same N stars,
    brightest first (NaN: not measured), from the caller's full-resolution photometry.

    The ratio of a star's fluxes does not depend on how deep each filter's stack is: the white point of a star
    field otherwise comes from each stack's noise (`white_sigma` × σ beats the percentile when stars fill
    < 0.5 % of the pixels), and a filter with a sixth of the frames came out √6 dimmer — R/G of the stars
    0.72 → 0.24 of the truth with one R frame against six (simulated RGB).  The brightest only: stars differ in
    colour, and a deeper stack of one filter measuring more of the faint ones moved the median (B/G of the
    whites 0.93 → 0.81 with 52 → 38 stars, R alone shallower); the brightest are measured however deep."""
    fluxes = []
    ok = None
    for s in sources:
        if s.stack not in star_fluxes:
            return None, 0
        f, e = (np.asarray(a, np.float64)[list(s.channels)] for a in star_fluxes[s.stack])
        f, e = f.mean(axis=0), np.sqrt((e ** 2).sum(axis=0)) / len(s.channels)
        good = np.isfinite(f) & np.isfinite(e) & (f > 10.0 * e)
        ok = good if ok is None else ok & good
        fluxes.append(f)
    idx = np.flatnonzero(ok)[:STAR_WHITE_MAX]
    if len(idx) < STAR_WHITE_MIN:
        return None, len(idx)
    return np.array([_middle_mean(f[idx] / fluxes[0][idx]) for f in fluxes]), len(idx)


def _middle_mean(ratios: np.ndarray) -> float:
    """The typical of positive ``ratios``: the geometric mean of their middle half.  Stars' colours are often
    bimodal (hot and cool stars), and a median then sits in the gap between the two: a set one star apart moved
    it by 10–16 % (simulated RGB, the stars measured with one R frame against four), the middle half's mean by
    2–7 %."""
    x = np.sort(np.log(ratios))
    k = len(x) // 4
    return float(np.exp(x[k:len(x) - k].mean()))


def _star_whites(sources: tuple[SourceMap, ...], star_fluxes: Mapping):
    """The sources with white points in the ratio of their star fluxes (_star_ratios), the common scale the least
    that keeps each at or above its own (so no filter's noise is amplified more than its rule allows), and a
    note for the description."""
    ratios, n = _star_ratios(sources, star_fluxes)
    if ratios is None or not np.all(np.isfinite(ratios) & (ratios > 0)):
        return sources, f"white per filter (stars measured in every filter: {n}, {STAR_WHITE_MIN} needed)"
    k = max(s.white / r for s, r in zip(sources, ratios))
    return (tuple(dataclasses.replace(s, white=float(k * r)) for s, r in zip(sources, ratios)),
            f"white from {n} stars (the typical star white)")


def single_stack_palette(channels: int, p: ComposeParams) -> bool:
    """Whether one stack of ``channels`` (1 or 3) channels alone needs a composite: only a colour stack behind a
    dual-band filter (palette HOO) does; otherwise the stack is shown as it is (mono, or its own RGB)."""
    return channels == 3 and p.palette == "HOO"


def _ascii(s: str) -> str:
    return s.encode("ascii", "replace").decode("ascii")


def plan_composite(reduced: Mapping[str, np.ndarray], p: ComposeParams, *,
                   full_shape: tuple[int, int] | None = None, star_fluxes: Mapping | None = None) -> CompositePlan:
    """Choose the palette from the stacks' filter names and measure each source's brightness mapping.

    ``reduced``: filter name -> (C, h, w) reduced copy of its linear stack (C = 1 mono, 3 colour; float, NaN
    where no frame covers; all on one grid, ≤ ~1600 px on the long side: the cost grows with its size), in the
    order the stacks should be listed.  ``full_shape``: (H, W) of the full-resolution grid the composite will be
    computed on (default: the reduced size); the background models are fitted in its coordinates.
    ``star_fluxes``: for star_white, each stack's photometry of the same stars at full resolution (see
    _star_ratios; the reduced copies of a 24 MP grid are too coarse for it: at 800 px its stars are
    sub-pixel, and measured there the whites moved ±10 %) — without it each filter keeps its own white
    point.  The inputs
    are not modified.  A requested palette whose filters are not all there falls back to HUES (said in
    ``header`` and ``description``); filters outside a requested palette are ignored (said in ``description``).
    Every weight 0 makes a black composite (NaN where a stack has no data), said in ``description``.  Raises
    ValueError when no stack is given or the shapes disagree.
    """
    shapes = {k: np.shape(v) for k, v in reduced.items()}
    bad = [k for k, s in shapes.items() if len(s) != 3 or s[0] not in (1, 3)]
    if bad:
        raise ValueError(f"stack {bad[0]!r} has shape {shapes[bad[0]]}: (C, h, w) with C = 1 or 3 is needed")
    if len({s[1:] for s in shapes.values()}) > 1:
        raise ValueError(f"the reduced stacks are not on one grid: {shapes}")
    if not shapes:
        raise ValueError("no stack to compose: none given")
    dropped = [k for k in reduced if _lookup(p.weights, k, 1.0) == 0.0]
    # every weight 0 (the page's sliders all at 0): every source at weight 0, the composite black — this raised,
    # and the daemon stopped at its next frame and at every start after (palette.json keeps the weights)
    chans = {k: s[0] for k, s in shapes.items() if k not in dropped} or {k: s[0] for k, s in shapes.items()}
    small = next(iter(shapes.values()))[1:]
    full = tuple(int(n) for n in (full_shape if full_shape is not None else small))
    if len(full) != 2 or full[0] < small[0] or full[1] < small[1]:
        raise ValueError(f"full_shape {full_shape} is smaller than the reduced stacks {small}")

    cands = _candidates(chans, p)
    weights = []
    for c in cands:        # a channel of a lone colour stack: its filter's weight times the stack's
        weights.append(_lookup(p.weights, c.stack, 1.0) * (1.0 if c.whole else _lookup(p.weights, c.label, 1.0)))
    black = not any(w > 0 for w in weights)
    if black:
        dropped = []
    else:
        dropped += [f"{c.stack}:{c.label}" for c, w in zip(cands, weights) if w == 0.0]
    weights = {id(c): w for c, w in zip(cands, weights)}
    if not black:
        cands = [c for c in cands if weights[id(c)] > 0]

    palette, chosen, notes, ignored, fallback, headed = _choose(cands, p)
    sources = tuple(_measure(c, np.asarray(reduced[c.stack]), full, mix * weights[id(c)], p)
                    for c, mix, _ in chosen)
    balance = None
    if p.star_white and palette in ("RGB", "LRGB") and star_fluxes is not None:
        sources, balance = _star_whites(sources, star_fluxes)
    elif p.star_white and palette == "HUES" and star_fluxes is not None:
        # a colour stack's R, G, B among colour stacks: balanced on its stars as RGB is (each channel's own white
        # point is its noise's on a star field: the Bayer G's, the lowest, made a Seestar's M94 green)
        out = list(sources)
        for stack in dict.fromkeys(c.stack for c, _, _ in chosen):
            idx = [i for i, (c, _, _) in enumerate(chosen) if c.stack == stack and c.hue is not None]
            if len(idx) == 3 and not is_dual_band(stack):
                balanced, note = _star_whites(tuple(sources[i] for i in idx), star_fluxes)
                for i, src in zip(idx, balanced):
                    out[i] = src
                balance = f"{stack}: {note}" if balance is None else f"{balance}; {stack}: {note}"
        sources = tuple(out)

    # The card: palette first, then a fallback note, then the mapping (truncated: the UI has the long form).
    if palette == "HUES":
        parts: dict = {}      # a colour stack's channels in their own colours, said once: "L=RGB HaOIII=HOO"
        for s, (c, _, hue) in zip(sources, chosen):
            if c.hue is not None:
                parts.setdefault(c.stack, f"{c.stack}={'HOO' if is_dual_band(c.stack) else 'RGB'}")
            else:
                parts[id(c)] = f"{s.label}=({','.join(_fmt(v) for v in hue)})"
        mapping = " ".join(parts.values())
    else:
        mapping = _MAPPING_TEXT[palette]
    colour = [k for k, c in chans.items() if c == 3]
    if len(chans) == 1 and colour:
        how = "Ha=R OIII=(G+B)/2" if any(s.channels == (1, 2) for s in sources) else "channels"   # dual-band
        mapping += f" ({how} of colour {colour[0]})"
    head = palette + (f" ({notes[0]})" if headed else "")
    header = _ascii(f"{head}: {mapping}")
    if len(header) > HEADER_MAX:
        header = header[:HEADER_MAX - 3] + "..."
    extra = list(notes[1:] if headed else notes)
    if dropped:
        extra.append(f"dropped (weight 0): {', '.join(dropped)}")
    if black:
        extra.append("every weight is 0: the composite is black")
    ws = [f"{s.label}={_fmt(weights[id(c)])}" for s, (c, _, _) in zip(sources, chosen) if weights[id(c)] != 1.0]
    if ws:
        extra.append(f"weights {' '.join(ws)}")
    empty = [s.label for s in sources if not np.isfinite(np.asarray(reduced[s.stack])[list(s.channels)]).any()]
    if empty:
        extra.append(f"no data yet: {', '.join(empty)} (the composite is empty)")
    extra.append(f"background degree {max(s.degree for s in sources)}")
    if balance:
        extra.append(balance)
    extra.append("white " + " ".join(f"{s.label}={s.white:.4g} (sigma {s.sigma:.3g})" for s in sources))
    description = f"{head}: {mapping}; " + "; ".join(extra)
    used = {s.stack: chans[s.stack] for s in sources}
    return CompositePlan(palette, p.palette, sources, (full[0], full[1]), used, header, description, fallback,
                         tuple(ignored) + tuple(d for d in dropped if ":" not in d))


def plan_from_images(images: Mapping[str, np.ndarray], p: ComposeParams, *, max_size: int = 1600) -> CompositePlan:
    """plan_composite on reduced copies (≤ ``max_size`` px on the long side, area-averaged) of full-resolution
    (C, H, W) stacks.  Allocates the reduced copies only."""
    full = None
    small = {}
    for k, v in images.items():
        if np.ndim(v) != 3:
            raise ValueError(f"stack {k!r} has shape {np.shape(v)}: (C, H, W) with C = 1 or 3 is needed")
        full = full or v.shape[1:]
        small[k] = reduce(np.asarray(v, np.float32), max_size)
    return plan_composite(small, p, full_shape=full)


def composite_rows(plan: CompositePlan, blocks: Mapping[str, np.ndarray], r0: int, r1: int, *,
                   grid: tuple[int, int] | None = None) -> np.ndarray:
    """Rows r0:r1 of the composite: (3, r1 − r0, W) float32, linear, NaN where any source in use has no data.

    ``blocks``: stack name -> its rows r0:r1, (C, r1 − r0, W) (stacks the plan does not use may be there; they
    are not read).  Not modified.  ``grid``: (H, W) of the grid the rows belong to: the plan's full-resolution
    grid (default) or a reduced copy of it (a preview), on which the backgrounds are evaluated at the reduced
    pixels' centres.  The result does not depend on how the rows are split into blocks.  Memory: the output and
    temporaries of ~6 (r1 − r0, W) float32 planes (the background is evaluated in float64).  Raises ValueError
    on missing stacks or wrong shapes.
    """
    grid = plan.shape if grid is None else (int(grid[0]), int(grid[1]))
    h, w = grid
    if not 0 <= r0 < r1 <= h:
        raise ValueError(f"rows {r0}:{r1} are not within the grid's {h} rows")
    for name, c in plan.channels.items():
        if name not in blocks:
            raise ValueError(f"stack {name!r} is missing: the plan needs {', '.join(plan.stacks)}")
        if np.shape(blocks[name]) != (c, r1 - r0, w):
            raise ValueError(f"stack {name!r} rows have shape {np.shape(blocks[name])}, not {(c, r1 - r0, w)}")
    out = np.zeros((3, r1 - r0, w), np.float32)
    tmp = np.empty((r1 - r0, w), np.float32)
    for s in plan.sources:
        x = s.mapped_rows(np.asarray(blocks[s.stack]), r0, plan.shape, grid)
        for c in range(3):
            # also where mix[c] = 0: 0·NaN = NaN marks the pixels without data in every channel
            np.multiply(x, np.float32(s.mix[c]), out=tmp)
            out[c] += tmp
    return out


def composite(plan: CompositePlan, images: Mapping[str, np.ndarray], *, block_rows: int = 256) -> np.ndarray:
    """The whole composite, (3, H, W) float32 (a new array: 300 MB at 26 MP), from (C, H, W) stacks on the
    plan's full-resolution grid or all on one reduced copy of it (a preview); computed in blocks of
    ``block_rows`` rows (the same values as composite_rows on any blocks).  Raises ValueError as composite_rows."""
    missing = [k for k in plan.stacks if k not in images]
    if missing:
        raise ValueError(f"stack {missing[0]!r} is missing: the plan needs {', '.join(plan.stacks)}")
    grid = np.shape(images[plan.stacks[0]])[1:]
    if len(grid) != 2:
        raise ValueError(f"stack {plan.stacks[0]!r} has shape {np.shape(images[plan.stacks[0]])}: (C, H, W) is "
                         f"needed")
    out = np.empty((3, *grid), np.float32)
    for r0 in range(0, grid[0], block_rows):
        r1 = min(grid[0], r0 + block_rows)
        out[:, r0:r1] = composite_rows(plan, {k: np.asarray(images[k])[:, r0:r1] for k in plan.stacks}, r0, r1,
                                       grid=grid)
    return out
