"""stars.py keeps extended sources (knots of nebula, galaxies) out of the star list and the frame quality.

The truth: Gaussian stars and elliptical Gaussian blobs drawn at known positions on a noisy sky. A blob centre
in the star list is a failure; so is a lost star above 10σ: saturated, blended, near an edge, or in a frame whose
stars are all wide (trailed, defocused) or few. The rule is relative to the frame's own stars.
"""
from __future__ import annotations

import numpy as np
import pytest

from livestack.engine.debayer import bin2x2_mean
from livestack.engine.stars import StarParams, detect_stars

SKY, NOISE = 200.0, 5.0


def add_source(img, x, y, flux, fwhm, fwhm_minor=None, angle=0.0, *, beta=None, oversample=1):
    """Add to ``img`` in place a source of total ``flux`` centred at (x, y): an elliptical Gaussian of FWHM
    ``fwhm`` × ``fwhm_minor`` px, major axis at ``angle`` rad from +x, or a round Moffat of index ``beta``.
    ``oversample``: sub-pixels per axis integrated (undersampled stars)."""
    h, w = img.shape
    minor = fwhm if fwhm_minor is None else fwhm_minor
    r = int(12 * fwhm if beta else 3 * fwhm) + 3
    x0, x1, y0, y1 = max(0, int(x) - r), min(w, int(x) + r + 1), max(0, int(y) - r), min(h, int(y) + r + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    c, s = np.cos(angle), np.sin(angle)
    sa, sb = fwhm / 2.3548, minor / 2.3548
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1)) if beta else 0.0
    acc = np.zeros_like(xx)
    for oy in sub:
        for ox in sub:
            dx, dy = xx + ox - x, yy + oy - y
            if beta:
                acc += (beta - 1) / (np.pi * alpha ** 2) * (1 + (dx * dx + dy * dy) / alpha ** 2) ** -beta
            else:
                u, v = dx * c + dy * s, -dx * s + dy * c
                acc += np.exp(-u * u / (2 * sa * sa) - v * v / (2 * sb * sb)) / (2 * np.pi * sa * sb)
    img[y0:y1, x0:x1] += flux * acc / oversample ** 2


def blob_field(rng, shape=(600, 800), n_blobs=8):
    """(x, y, fwhm) of ``n_blobs`` bright nebula blobs, FWHM 20–80 px, 2:5 to 1:1, peaking 30–300 ADU (6–60σ);
    every other one has a compact knot of FWHM ~8 px at its centre, peaking 50–300 ADU above it."""
    h, w = shape
    blobs, img = [], np.zeros(shape)
    while len(blobs) < n_blobs:
        x, y, fwhm = rng.uniform(60, w - 60), rng.uniform(60, h - 60), rng.uniform(20, 80)
        if any(np.hypot(x - bx, y - by) < (fwhm + bf) / 2 + 10 for bx, by, bf in blobs):
            continue
        minor = fwhm * rng.uniform(0.4, 1.0)
        peak = rng.uniform(30, 300)
        add_source(img, x, y, peak * 2 * np.pi * fwhm * minor / 2.3548 ** 2, fwhm, minor, rng.uniform(0, np.pi))
        if len(blobs) % 2 == 0:
            core = 8.0 * rng.uniform(0.7, 1.0)
            add_source(img, x, y, rng.uniform(50, 300) * 2 * np.pi * 8.0 * core / 2.3548 ** 2, 8.0, core,
                       rng.uniform(0, np.pi))
        blobs.append((x, y, fwhm))
    return img, np.array(blobs)


def star_field(rng, n, shape=(600, 800), *, avoid=None, margin=8, flux=(500, 1e5), apart=20.0):
    """(n, 3) x, y, flux of stars, log-uniform in flux, ``apart`` px from each other (blends are tested on
    their own) and 1.5 blob FWHM from any blob (x, y, fwhm) of ``avoid``: a star on a bright nebula is merged
    with it, or deblended with part of it and then may be judged extended (see stars.extended_sources)."""
    h, w = shape
    out = []
    while len(out) < n:
        x, y = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        if avoid is not None and np.any(np.hypot(avoid[:, 0] - x, avoid[:, 1] - y) < 1.5 * avoid[:, 2]):
            continue
        if out and np.min(np.hypot(*(np.array(out)[:, :2] - (x, y)).T)) < apart:
            continue
        out.append((x, y, np.exp(rng.uniform(np.log(flux[0]), np.log(flux[1])))))
    return np.array(out)


def render(stars, fwhm=3.0, *, noise, extra=None, **kw) -> np.ndarray:
    """float32 image: SKY + ``extra`` + ``stars`` (x, y, flux) of FWHM ``fwhm`` + ``noise`` (its shape)."""
    img = np.full(noise.shape, SKY) + noise
    if extra is not None:
        img += extra
    for x, y, f in stars:
        add_source(img, x, y, f, fwhm, **kw)
    return img.astype(np.float32)


def nearest(xy: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance from each of ``points`` (M, 2+) to the nearest of ``xy`` (N, 2); inf when N == 0."""
    if len(xy) == 0:
        return np.full(len(points), np.inf)
    return np.min(np.hypot(*(points[:, None, :2] - xy[None]).transpose(2, 0, 1)), axis=1)


def peak_snr(stars: np.ndarray, fwhm: float, fwhm_minor: float | None = None) -> np.ndarray:
    """Peak / noise of each Gaussian star (x, y, flux)."""
    minor = fwhm if fwhm_minor is None else fwhm_minor
    return stars[:, 2] / (2 * np.pi * fwhm * minor / 2.3548 ** 2) / NOISE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nebula_knots_are_not_stars(seed):
    """8 blobs of FWHM 20–80 px, 4 with an 8 px knot, among 40 stars of FWHM 3 px: only the stars remain."""
    rng = np.random.default_rng(seed)
    nebula, blobs = blob_field(rng)
    stars = star_field(rng, 40, avoid=blobs)
    noise = rng.normal(0, NOISE, nebula.shape)
    img = render(stars, noise=noise, extra=nebula)
    before = img.copy()
    found, q = detect_stars(img, StarParams())
    np.testing.assert_array_equal(img, before)
    assert found.xy.dtype == np.float64 and q.stars == len(found)

    # Without the rule the blobs are there: the scene does test something.
    everything, q_all = detect_stars(img, StarParams(max_width=np.inf))
    assert np.count_nonzero(nearest(everything.xy, blobs) < 5) >= 6

    assert np.all(nearest(found.xy, blobs) > 5), "a blob centre is in the star list"
    # Every detection that is not a blob is a star (nothing else was drawn), and every star detected is kept.
    assert np.all(nearest(stars[:, :2], found.xy) < 1.0)
    assert np.array_equal(nearest(found.xy, stars) < 1.0, nearest(everything.xy, stars) < 1.0)
    assert np.all(nearest(found.xy, stars)[peak_snr(stars, 3.0) > 15] < 1.0)

    # The quality is the stars': the same stars and noise on a sky without nebula measure the same.
    _, q_clean = detect_stars(render(stars, noise=noise), StarParams())
    assert abs(q.fwhm - q_clean.fwhm) < 0.03 * q_clean.fwhm and abs(q.fwhm - 3.0) < 0.1
    assert abs(q.eccentricity - q_clean.eccentricity) < 0.05


def test_saturated_stars_are_kept_and_need_the_saturation_level():
    """Clipped stars are flat-topped, and Moffat wings widen them more: here 2.0–4.7 × the median star width."""
    rng = np.random.default_rng(3)
    shape, white = (400, 600), 16000.0
    stars = star_field(rng, 44, shape, margin=20, flux=(1e3, 5e4), apart=40.0)
    saturated, stars = stars[:4].copy(), stars[4:]
    saturated[:, 2] = [1e6, 3e6, 1e7, 3e7]                  # peaks 4–115 × the white level
    img = np.full(shape, SKY)
    for x, y, f in stars:
        add_source(img, x, y, f, 3.0)
    for x, y, f in saturated:
        add_source(img, x, y, f, 3.0, beta=2.5)
    img = np.minimum(img + rng.normal(0, NOISE, shape), white).astype(np.float32)
    found, q = detect_stars(img, StarParams(), saturation=white)
    assert np.all(nearest(found.xy, saturated) < 0.5)
    assert np.all(nearest(found.xy, stars)[peak_snr(stars, 3.0) > 10] < 1.0)
    assert abs(q.fwhm - 3.0) < 0.1
    # Without the level they are judged by their width, and the brightest go: the exemption is what keeps them.
    blind, _ = detect_stars(img, StarParams())
    assert np.count_nonzero(nearest(blind.xy, saturated) < 0.5) < len(saturated)


def _only_stars(kind, rng):
    """(image, stars that must be found, their peak / noise) of a frame holding nothing but stars."""
    shape = (400, 600)
    noise = rng.normal(0, NOISE, shape)
    if kind == "trailed":         # wind or tracking: every star 3:1, same angle
        stars = star_field(rng, 60, shape, flux=(2e3, 1e5))
        return render(stars, 9.0, noise=noise, fwhm_minor=3.0, angle=0.5), stars, peak_snr(stars, 9.0, 3.0)
    if kind == "defocused":       # or bad seeing: every star FWHM 9 px
        stars = star_field(rng, 60, shape, flux=(5e3, 3e5))
        return render(stars, 9.0, noise=noise), stars, peak_snr(stars, 9.0)
    if kind == "trailed, hot pixels":   # uncalibrated: 100 hot pixels outnumber the 30 stars
        stars = star_field(rng, 30, shape, flux=(2e3, 1e5))
        img = render(stars, 9.0, noise=noise, fwhm_minor=3.0, angle=2.0)
        img[rng.integers(0, shape[0], 100), rng.integers(0, shape[1], 100)] += rng.uniform(500, 4000, 100)
        return img, stars, peak_snr(stars, 9.0, 3.0)
    if kind == "few":
        stars = star_field(rng, 15, shape, flux=(2e3, 5e4))
        return render(stars, noise=noise), stars, peak_snr(stars, 3.0)
    if kind == "doubles":         # half of the stars have a companion 2.5–6 px away, 0.3–1 × as bright
        prim = star_field(rng, 40, shape, margin=15, flux=(2e3, 1e5))
        d, a = rng.uniform(2.5, 6, 20), rng.uniform(0, 2 * np.pi, 20)
        comp = np.column_stack([prim[:20, 0] + d * np.cos(a), prim[:20, 1] + d * np.sin(a),
                                prim[:20, 2] * rng.uniform(0.3, 1, 20)])
        img = render(np.vstack([prim, comp]), noise=noise)
        return img, prim[20:], peak_snr(prim[20:], 3.0)   # a blended pair's centroid is neither star's
    if kind == "edge":            # half of the stars 4–8 px from a border (sep biases their centroids)
        stars = star_field(rng, 40, shape, flux=(2e3, 1e5))
        e = rng.uniform(4, 8, 20)
        stars[:10, 0] = np.where(np.arange(10) % 2, e[:10], shape[1] - 1 - e[:10])
        stars[10:20, 1] = np.where(np.arange(10) % 2, e[10:], shape[0] - 1 - e[10:])
        return render(stars, noise=noise), stars, peak_snr(stars, 3.0)
    if kind == "undersampled":    # FWHM 1.4 px: the peak pixel depends on where the star falls in it
        stars = star_field(rng, 80, shape, flux=(1e3, 2e4))
        return render(stars, 1.4, noise=noise, oversample=8), stars, peak_snr(stars, 1.4)
    if kind == "moffat":          # seeing wings (β = 2): bright stars' isophotes hold more of their flux
        stars = star_field(rng, 60, shape, flux=(1e3, 3e5), apart=40.0)
        return render(stars, 3.0, noise=noise, beta=2.0), stars, peak_snr(stars, 3.0)
    raise ValueError(kind)


ONLY_STARS = ["trailed", "trailed, hot pixels", "defocused", "few", "doubles", "edge", "undersampled", "moffat"]


@pytest.mark.parametrize("kind", ONLY_STARS)
def test_frames_of_only_stars_lose_none(kind):
    """The rule is relative to the frame's own stars: when every star is wide nothing is cut, and the judge still
    sees the evidence (eccentricity of a trailed frame, FWHM of a defocused one)."""
    img, stars, snr = _only_stars(kind, np.random.default_rng(10 + ONLY_STARS.index(kind)))
    found, q = detect_stars(img, StarParams())
    everything, q_all = detect_stars(img, StarParams(max_width=np.inf))
    np.testing.assert_array_equal(found.xy, everything.xy)
    assert q == q_all
    bright = snr > 10
    assert bright.sum() >= 10 and np.all(nearest(found.xy, stars)[bright] < (4.0 if kind == "edge" else 1.0))
    if kind == "few":
        assert len(found) == 15
    if kind == "trailed":             # (with hot pixels the quality is theirs, as it was before the rule)
        assert q.eccentricity > 0.85      # 3:1 is 0.94
    if kind == "defocused":
        assert abs(q.fwhm - 9.0) < 0.5


def test_binned_colour_mosaic():
    """Colour cameras: stars are found on the 2×2-binned Bayer mosaic, where a 3 px star is 1.5 px and knots
    are half their sensor size; saturation is the sensor's white level."""
    rng = np.random.default_rng(4)
    shape, white = (800, 1200), 15871.0
    nebula, blobs = blob_field(rng, shape, n_blobs=8)
    stars = star_field(rng, 63, shape, avoid=blobs, margin=12, flux=(3e3, 3e5), apart=30.0)
    saturated, stars = stars[:3].copy(), stars[3:]
    saturated[:, 2] = 1e7                                    # peaks ~60 × the white level
    rgb = np.stack([np.full(shape, SKY) + 2.0 * nebula] * 3)  # brighter: binned, a blob covers 4× fewer pixels
    for (x, y, f), c in zip(np.vstack([stars, saturated]), rng.uniform(0.6, 1.4, (len(stars) + 3, 3))):
        for k in range(3):
            add_source(rgb[k], x, y, f * c[k], 3.0)
    cfa = np.empty(shape)
    for (py, px), k in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [0, 1, 1, 2]):    # RGGB
        cfa[py::2, px::2] = rgb[k, py::2, px::2]
    cfa = np.minimum(cfa + rng.normal(0, NOISE, shape), white).astype(np.float32)
    lum = bin2x2_mean(cfa)
    found, q = detect_stars(lum, StarParams(), saturation=white, extra_var=1 / 12 - 1 / 48)
    everything, _ = detect_stars(lum, StarParams(max_width=np.inf), saturation=white, extra_var=1 / 12 - 1 / 48)
    xy, xy_all = found.xy * 2.0 + 0.5, everything.xy * 2.0 + 0.5   # binned cell i covers sensor pixels 2i, 2i + 1
    assert np.count_nonzero(nearest(xy_all, blobs) < 10) >= 6
    assert np.all(nearest(xy, blobs) > 10), "a blob centre is in the star list"
    assert np.all(nearest(xy, saturated) < 1.0)
    assert np.all(nearest(xy, stars) < 1.0)                  # all of them ≥ 50σ
    assert abs(2.0 * q.fwhm - 3.0) < 0.3


def test_max_width_is_checked():
    with pytest.raises(ValueError, match="max_width"):
        StarParams(max_width=1.0)
    with pytest.raises(ValueError, match="max_width"):
        StarParams(max_width=float("nan"))
