"""Sharper stacks: the warp's footprint is exact geometry (the same on x86 and aarch64), and a bicubic warp keeps
stacked stars tighter than a bilinear one without hurting registration."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from conftest import truth_matrix
from livestack.engine import geometry
from livestack.engine import warp as warp_mod
from livestack.engine.pipeline import Engine
from livestack.engine.settings import Config
from livestack.engine.stars import StarParams, detect_stars
from livestack.engine.warp import REACH, TAP_ROUNDING, footprint_rows, warp

SRC = (61, 83)       # (H, W) of the source: odd sizes, not square
GRID = (70, 90)


def _matrices():
    rot = np.deg2rad(0.7)
    c, s = np.cos(rot), np.sin(rot)
    return {
        "integer shift": np.array([[1.0, 0, 3], [0, 1.0, -2]]),
        "fractional shift": np.array([[1.0, 0, 2.37], [0, 1.0, -1.61]]),
        "rotation": np.array([[c, -s, 4.2], [s, c, -3.3]]),
        "rotation + scale": np.array([[1.003 * c, -1.003 * s, -2.9], [1.003 * s, 1.003 * c, 5.1]]),
        "meridian flip": np.array([[-1.0, 0, 82.4], [0, -1.0, 59.8]]),
        "90°": np.array([[0.0, -1, 75.5], [1, 0.0, 2.25]]),
    }


def _brute_force(matrix, reach):
    """Each grid pixel's source position, mapped one by one: inside when reach − 1 ≤ s < size − reach (less
    OpenCV's 1/32 px rounding of positions at the top)."""
    h, w = GRID
    gy, gx = np.mgrid[0:h, 0:w]
    s = geometry.apply(geometry.invert(matrix), np.column_stack([gx.ravel(), gy.ravel()]).astype(float))
    ok = np.ones(len(s), bool)
    for axis, size in ((0, SRC[1]), (1, SRC[0])):
        ok &= (s[:, axis] >= reach - 1) & (s[:, axis] < size - reach - TAP_ROUNDING)
    return ok.reshape(h, w)


@pytest.mark.parametrize("interp", ["bilinear", "compensated", "bicubic", "lanczos"])
@pytest.mark.parametrize("name", list(_matrices()))
def test_footprint_is_the_kernel_inside_the_source(interp, name):
    m = _matrices()[name]
    img = np.random.default_rng(1).uniform(100, 200, (1, *SRC)).astype(np.float32)
    before = img.copy()
    out = warp(img, m, GRID, interpolation=interp)
    assert out.dtype == np.float32 and out.shape == (1, *GRID)
    np.testing.assert_array_equal(img, before)
    expected = _brute_force(m, REACH[interp])
    assert expected.sum() > 0.5 * expected.size
    np.testing.assert_array_equal(np.isfinite(out[0]), expected)
    # the margin is the kernel's reach, no more: a 1 px band (bilinear: 0) past the source's edge pixel centres
    x0, x1 = footprint_rows(m, SRC, GRID, reach=REACH[interp])
    np.testing.assert_array_equal(x1 - x0, expected.sum(axis=1))


@pytest.mark.parametrize("interp", ["bilinear", "compensated", "bicubic", "lanczos"])
@pytest.mark.parametrize("border", [(cv2.BORDER_CONSTANT, 1e6), (cv2.BORDER_CONSTANT, 0.0),
                                    (cv2.BORDER_REFLECT_101, 0.0), (cv2.BORDER_WRAP, 0.0)])
def test_footprint_and_values_do_not_depend_on_opencvs_border_handling(interp, border, monkeypatch):
    """OpenCV's bicubic warp with a NaN border leaves a NaN band of 8 px on the left edge on x86-64 (OpenCV
    5.0 here; narrower on aarch64): its SIMD code lets the border into more pixels than the kernel reaches.
    Whatever OpenCV puts beyond the edge, no pixel the warp keeps may read it: the output is bit-identical."""
    m = _matrices()["rotation"]
    img = np.random.default_rng(2).uniform(100, 200, (2, *SRC)).astype(np.float32)
    reference = warp(img, m, GRID, interpolation=interp)
    real = cv2.warpAffine
    mode, value = border

    def other_border(src, M, dsize, *, dst, flags, borderMode, borderValue=0.0):
        return real(src, M, dsize, dst=dst, flags=flags, borderMode=mode, borderValue=value)

    monkeypatch.setattr(warp_mod.cv2, "warpAffine", other_border)
    np.testing.assert_array_equal(warp(img, m, GRID, interpolation=interp), reference)


def _keys(t):
    """Keys' cubic convolution weights (a = −½) of the taps ⌊s⌋−1 … ⌊s⌋+2 at fraction t."""
    return np.array([-t * (1 - t) ** 2 / 2, 1 - 2.5 * t ** 2 + 1.5 * t ** 3, t / 2 + 2 * t ** 2 - 1.5 * t ** 3,
                     -t ** 2 * (1 - t) / 2])


@pytest.mark.parametrize("shift", [(0.3, -0.4), (-2.75, 1.5), (0.5, 0.0)])
def test_compensated_warp_of_a_shift_is_keys_cubic_convolution(shift):
    """The 3-tap sharpening with a = t(1 − t)/2 followed by the bilinear read is Keys' cubic, tap for tap."""
    img = np.random.default_rng(4).uniform(0, 1000, (1, *SRC)).astype(np.float32)
    dx, dy = shift
    m = np.array([[1.0, 0, dx], [0, 1.0, dy]])
    out = warp(img, m, GRID, interpolation="compensated")[0]
    h, w = GRID
    want = np.full(GRID, np.nan)
    for y in range(h):
        sy = y - dy
        iy = int(np.floor(sy)) + np.arange(-1, 3)
        for x in range(w):
            sx = x - dx
            ix = int(np.floor(sx)) + np.arange(-1, 3)
            if iy[0] >= 0 and ix[0] >= 0 and iy[-1] < SRC[0] and ix[-1] < SRC[1]:
                want[y, x] = _keys(sy - np.floor(sy)) @ img[0][np.ix_(iy, ix)].astype(np.float64) @ _keys(sx - np.floor(sx))
    inside = np.isfinite(want) & np.isfinite(out)
    assert inside.sum() > 0.5 * want.size
    np.testing.assert_allclose(out[inside], want[inside], rtol=0, atol=1e-2)   # float32 of values to 1000


def test_compensation_is_half_the_mean_bilinear_variance():
    inv = geometry.invert(np.array([[1.0, 0, 0.25], [0, 1.0, -3.0]]))
    ax, ay = warp_mod.compensation(inv, (0, 100), (0, 64))
    assert ax == pytest.approx(0.75 * 0.25 / 2) and ay == 0.0                   # one fraction per axis
    rot = geometry.invert(geometry.similarity(1.0, 0.5, 0.1, 0.2, center=(3000, 2000)))
    ax, ay = warp_mod.compensation(rot, (0, 6000), (0, 64))   # 0.5° sweeps y's fraction across 52 rows
    assert ay == pytest.approx(1 / 12, abs=0.005)                              # E[t(1 − t)] / 2 over uniform t


def test_opencvs_nan_border_band_is_wider_than_the_kernel_here():
    """Why the footprint is ours: on this machine OpenCV's own NaN band of a bicubic warp is 8 px on the left
    (the kernel reaches 2).  If OpenCV changes, this test says so; the warp does not depend on it."""
    img = np.random.default_rng(3).uniform(100, 200, SRC).astype(np.float32)
    m = np.array([[1.0, 0, 0.3], [0, 1.0, 0.0]])
    cv = cv2.warpAffine(img, m, GRID[::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=float("nan"))
    ours = warp(img[None], m, GRID, interpolation="bicubic")[0]
    first_cv = int(np.flatnonzero(np.isfinite(cv[30]))[0])
    first_ours = int(np.flatnonzero(np.isfinite(ours[30]))[0])
    assert first_ours == 2                              # s = x − 0.3 ≥ 1
    if first_cv == first_ours:
        pytest.xfail("this OpenCV build's NaN band is the kernel's reach (no SIMD band)")
    assert first_cv > first_ours


def test_footprint_rows_at_full_size_touches_only_the_edges():
    """At 24 MP the rows' ranges, not a full-size mask: checked against one-by-one mapping on sample rows."""
    m = np.array([[0.99999, -0.0035, 2.6], [0.0035, 0.99999, -3.4]])     # 0.2°: slanted edges
    h, w = 4000, 6000
    x0, x1 = footprint_rows(m, (h, w), (h, w), reach=REACH["bicubic"])
    assert x0.dtype == np.int64 and x0.shape == (h,)
    inv = geometry.invert(m)
    for y in (0, 1, 5, 17, 2000, 3990, 3999):
        s = geometry.apply(inv, np.column_stack([np.arange(w), np.full(w, y)]).astype(float))
        inside = ((s >= 1) & (s < np.array([w, h]) - 2 - TAP_ROUNDING)).all(axis=1)
        np.testing.assert_array_equal(np.flatnonzero(inside), np.arange(x0[y], x1[y]))
    idx = warp_mod.outside_index(x0, x1, w)
    assert len(idx) == int((w - (x1 - x0)).sum()) < 0.01 * h * w
    assert len(np.unique(idx)) == len(idx)


def _stack(files, interpolation):
    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, interpolation=interpolation))
    eng = Engine(cfg)
    recs = [eng.process(f) for f in files]
    img, _ = eng.result()
    return recs, img


def test_bicubic_and_compensated_stacks_have_tighter_stars_than_bilinear_and_register_as_well(night):
    files, truth = night(n_frames=6, seed=13, mono=True, fwhm_px=2.6, dither_px=3.0, rotation_deg=0.05,
                         n_stars=800)
    fwhm = {}
    for interp in ("bilinear", "compensated", "bicubic"):
        recs, img = _stack(files, interp)
        assert all(r.status in ("reference", "stacked") for r in recs)
        errs = [geometry.rms_error(np.array(r.matrix), truth_matrix(truth, i), (480, 640))
                for i, r in enumerate(recs)]
        assert max(errs) <= 0.05, errs
        stars, q = detect_stars(np.ascontiguousarray(img[0, 20:-20, 20:-20]), StarParams())
        assert q.stars > 100
        fwhm[interp] = q.fwhm
    # measured (seed 13, sep FWHM of the stack): bilinear 2.85 px, bicubic 2.73 (−4.4 %), compensated 2.75 (−3.4 %)
    assert fwhm["bicubic"] < 0.97 * fwhm["bilinear"], fwhm
    assert fwhm["compensated"] < 0.97 * fwhm["bilinear"], fwhm


@pytest.mark.parametrize("interp", ["bicubic", "lanczos"])
def test_bicubic_and_lanczos_leave_no_dark_ring_beside_a_clipped_star(interp):
    """A star clipped at the white level, warped by a fraction of a pixel: OpenCV's bicubic and Lanczos-4 ring to
    ~250 ADU on a sky of 500 ± 10 (a dark halo on the page, 25 σ); Siril clamps them for that.  Clamped from
    below at the 2×2 samples each value lies between: no pixel far below the sky, the stars' peaks as OpenCV
    gives them (their width kept), the background's mean and noise as before within a few hundredths."""
    rng = np.random.default_rng(1)
    h, w = 200, 200
    y, x = np.mgrid[0:h, 0:w]
    sky = 500 + rng.normal(0, 10, (h, w))
    stars = np.zeros((h, w))
    for cy, cx, amp in ((60.3, 70.6, 2e5), (140.5, 120.2, 3e4)):
        stars += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (3 / 2.355) ** 2))
    img = np.minimum(sky + stars, 60000).astype(np.float32)[None]
    m = np.array([[1.0, 0, 0.43], [0, 1.0, 0.37]])
    out = warp(img, m, (h, w), interpolation=interp)[0]
    plain = cv2.warpAffine(img[0], m, (w, h), flags=warp_mod.INTERPOLATIONS[interp], borderMode=cv2.BORDER_REPLICATE)
    near = np.s_[50:72, 60:82]
    assert np.nanmin(plain[near]) < 300                      # the ring this is about
    assert np.nanmin(out[near]) > 450, np.nanmin(out[near])
    faint = np.s_[130:152, 110:132]
    assert np.nanmax(out[faint]) == np.nanmax(plain[faint])
    bg = np.s_[150:190, 150:190]
    assert abs(np.nanmean(out[bg]) - np.nanmean(plain[bg])) < 0.15
    assert abs(np.nanstd(out[bg]) - np.nanstd(plain[bg])) < 0.2
    inside = np.isfinite(out)
    assert (out[inside] >= plain[inside]).all()              # raised where it undershoots, nothing lowered
