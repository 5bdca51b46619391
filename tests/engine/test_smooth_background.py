"""[engine] smooth_background: the sharpening (an mhc demosaic, a compensated warp) only where a frame has signal.

Where signal_cells finds none the frame's pixels are the plain path's (bilinear demosaic, bilinear read) exactly;
where it finds signal throughout, the sharp path's; stars keep their flux and their sharpness; the background
keeps the plain path's noise."""
import dataclasses

import cv2
import numpy as np
import pytest

from livestack.engine import geometry
from livestack.engine.pipeline import Engine
from livestack.engine.render import FrameOnGrid, signal_cells
from livestack.engine.settings import Config
from livestack.engine.stack import bin2

H, W = 320, 448


def by_blocks(f: FrameOnGrid, rows=64):
    return np.concatenate([np.stack(f.rows(r0, min(H, r0 + rows))) for r0 in range(0, H, rows)], axis=1)


def sky(seed=1, stars=60, sigma=1.2, peak=3000.0):
    """A noisy mosaic (σ 10 on 100) with Gaussian stars, and the stars' (x, y)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    cfa = rng.normal(100, 10, (H, W))
    xy = rng.uniform([16, 16], [W - 16, H - 16], (stars, 2))
    for x, y in xy:
        cfa += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return cfa.astype(np.float32), xy


def render(cfa, m, *, debayer="mhc", interpolation="compensated", signal=None, planes=False):
    if planes:
        return by_blocks(FrameOnGrid(cfa[None], m, (H, W), interpolation=interpolation, signal=signal))
    return by_blocks(FrameOnGrid(cfa, m, (H, W), interpolation=interpolation, pattern="RGGB", debayer=debayer,
                                 signal=signal))


MATRICES = {"shift": geometry.similarity(1.0, 0.0, 2.37, -1.61),
            "rotation": geometry.similarity(1.0, 0.4, 2.3, -1.7, center=(W / 2, H / 2)),
            "reference": geometry.identity()}


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("planes", [False, True])
def test_no_signal_is_the_plain_path_and_signal_everywhere_the_sharp_one(name, planes):
    cfa, _ = sky()
    m = MATRICES[name]
    none = np.zeros((H // 4, W // 4), np.uint8)
    full = np.full((H // 4, W // 4), 255, np.uint8)
    plain = render(cfa, m, debayer="bilinear", interpolation="bilinear", planes=planes)
    sharp = render(cfa, m, planes=planes)
    got_none = render(cfa, m, signal=none, planes=planes)
    got_full = render(cfa, m, signal=full, planes=planes)
    inside = np.isfinite(sharp) & np.isfinite(plain)
    assert inside.mean() > 0.9
    # (float32 rounding: the plain windows start where the sharp ones do, a column or row earlier)
    np.testing.assert_allclose(got_full[inside], sharp[inside], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got_none[inside], plain[inside], rtol=1e-5, atol=1e-3)
    if name != "reference" or not planes:       # (mono on the grid: nothing sharpens)
        assert np.abs(sharp - plain)[inside].mean() > 1.0


@pytest.mark.parametrize("planes, interpolation", [(False, "compensated"), (False, "bilinear"),
                                                    (True, "compensated")])
def test_signal_cells_get_the_sharp_values_and_the_rest_the_plain_ones(planes, interpolation):
    """Only the columns of cells with signal are made the sharp way (a tile of a block), copied over the plain
    window: a grid pixel whose taps all lie in such cells is the sharp path's, one whose taps lie outside all of
    them the plain path's."""
    cfa, _ = sky(seed=4)
    m = MATRICES["rotation"]
    sig = np.zeros((H // 4, W // 4), np.uint8)
    sig[10:20, 30:45] = 255
    sig[50:52, 5:7] = 255
    plain = render(cfa, m, debayer="bilinear", interpolation="bilinear", planes=planes)
    sharp = render(cfa, m, interpolation=interpolation, planes=planes)
    got = render(cfa, m, interpolation=interpolation, signal=sig, planes=planes)
    yy, xx = np.mgrid[0:H, 0:W]
    src = geometry.apply(geometry.invert(m), np.column_stack([xx.ravel(), yy.ravel()])).reshape(H, W, 2)
    cx, cy = src[..., 0] / 4, src[..., 1] / 4             # source position in cells
    # taps (demosaic 2 + warp 2 px) at most 4 px = 1 cell from the position
    inner = (cx > 31) & (cx < 44) & (cy > 11) & (cy < 19)
    outer = ~(((cx > 29) & (cx < 46) & (cy > 9) & (cy < 21)) | ((cx > 4) & (cx < 8) & (cy > 49) & (cy < 53)))
    ok = np.isfinite(got).all(axis=0)
    inner, outer = inner & ok, outer & ok
    assert inner.sum() > 1000 and outer.sum() > 0.8 * H * W
    np.testing.assert_allclose(got[:, inner], sharp[:, inner], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got[:, outer], plain[:, outer], rtol=1e-5, atol=1e-3)
    assert np.abs(sharp[:, inner] - plain[:, inner]).mean() > 1.0


def test_signal_cells_find_stars_and_little_else():
    cfa, xy = sky(stars=40, peak=400.0)          # faint stars: 400 on σ 10 noise
    lum = bin2(cfa)
    sig = signal_cells(lum)
    assert sig.shape == (H // 4, W // 4) and sig.dtype == np.uint8
    cells = (xy // 4).astype(int)
    assert (sig[cells[:, 1], cells[:, 0]] == 255).all()           # every star's core, fully
    # each star is grown by one cell: 3 × 3 cells (4 × 4 across a cell's edge) a star, the rest is plain
    assert (sig > 0).mean() < 40 * 16 / sig.size + 0.005
    noise = signal_cells(bin2(np.random.default_rng(7).normal(100, 10, (H, W)).astype(np.float32)))
    assert (noise > 0).mean() < 0.01                               # pure noise: (almost) nothing


def test_stars_keep_their_flux_and_sharpness_and_the_background_its_plain_noise():
    cfa, xy = sky(seed=3, stars=50, peak=2000.0)
    m = MATRICES["rotation"]
    sig = signal_cells(bin2(cfa))
    plain = render(cfa, m, debayer="bilinear", interpolation="bilinear")
    sharp = render(cfa, m)
    gated = render(cfa, m, signal=sig)
    lum = {k: v.mean(axis=0) for k, v in (("plain", plain), ("sharp", sharp), ("gated", gated))}
    on_grid = geometry.apply(m, xy)
    yy, xx = np.mgrid[0:H, 0:W]
    flux = {k: [] for k in lum}
    peak = {k: [] for k in lum}
    for x, y in on_grid:
        if not (12 < x < W - 12 and 12 < y < H - 12):
            continue
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        ring = (r2 > 8 ** 2) & (r2 < 11 ** 2)
        for k, v in lum.items():
            flux[k].append(float(np.nansum(v[r2 < 6 ** 2] - np.nanmedian(v[ring]))))
            peak[k].append(float(np.nanmax(v[r2 < 2 ** 2])))
    f = {k: np.array(v) for k, v in flux.items()}
    np.testing.assert_allclose(f["gated"], f["sharp"], rtol=0.01)     # the same flux as the sharp path
    # as peaked (sharp) as the sharp path, more than the plain one
    assert np.median(np.array(peak["gated"]) / np.array(peak["sharp"])) > 0.995
    assert np.median(np.array(peak["gated"]) / np.array(peak["plain"])) > 1.1
    far = np.ones((H, W), bool)
    for x, y in on_grid:
        far &= (xx - x) ** 2 + (yy - y) ** 2 > 16 ** 2
    far &= np.isfinite(lum["sharp"])
    sd = {k: float(np.std(v[far])) for k, v in lum.items()}
    assert sd["gated"] < 1.02 * sd["plain"] and sd["sharp"] > 1.2 * sd["plain"], sd


def test_a_smooth_background_stack_is_as_sharp_and_as_quiet(night):
    """Through the engine: a colour night stacked with mhc + compensated, with and without smooth_background,
    and with the plain path (bilinear + bilinear)."""
    from livestack.engine.stars import StarParams, detect_stars

    files, _ = night(n_frames=5, seed=21, fwhm_px=2.4, dither_px=3.0, rotation_deg=0.05, n_stars=500)
    out = {}
    for name, engine in {"plain": dict(debayer="bilinear", interpolation="bilinear", smooth_background=False),
                         "sharp": dict(debayer="mhc", interpolation="compensated", smooth_background=False),
                         "gated": dict(debayer="mhc", interpolation="compensated", smooth_background=True)}.items():
        cfg = Config()
        eng = Engine(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **engine)))
        recs = [eng.process(f) for f in files]
        assert all(r.status in ("reference", "stacked") for r in recs)
        img, _ = eng.result()
        out[name] = np.ascontiguousarray(img.mean(axis=0)[20:-20, 20:-20])
    fwhm = {k: detect_stars(v, StarParams())[1].fwhm for k, v in out.items()}
    assert fwhm["gated"] < 1.01 * fwhm["sharp"] and fwhm["gated"] < 0.93 * fwhm["plain"], fwhm
    # background noise: robust σ per pixel around a 15 × 15 mean, where the plain stack shows no source
    _, q = detect_stars(out["plain"], StarParams())
    blank = out["plain"] - cv2.blur(out["plain"], (15, 15)) < 2 * q.noise
    blank = cv2.erode(blank.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)

    def robust_sd(v):
        d = (v - cv2.blur(v, (15, 15)))[blank]
        return 1.4826 * float(np.median(np.abs(d - np.median(d))))

    sd = {k: robust_sd(v) for k, v in out.items()}
    assert sd["gated"] < 1.03 * sd["plain"] and sd["sharp"] > 1.2 * sd["plain"], sd
