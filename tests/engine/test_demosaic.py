"""The Malvar-He-Cutler demosaic (debayer "mhc"): exact where a linear interpolation must be, each sample kept,
saturation carried as far as its kernels reach, and sharper stacks than bilinear on a simulated colour night."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import truth_matrix

from livestack.config import Config
from livestack.engine import geometry
from livestack.engine.debayer import colour_offsets, debayer, debayer_mask
from livestack.engine.grid import Grid
from livestack.engine.pipeline import Engine
from livestack.engine.settings import EngineParams
from livestack.engine.stars import StarParams, detect_stars
from livestack.engine.warp import warp_mask, warp_points

PATTERNS = ["RGGB", "BGGR", "GRBG", "GBRG"]


def mosaic(planes: dict[str, np.ndarray], pattern: str) -> np.ndarray:
    """The CFA a sensor with ``pattern`` records of full (H, W) colour planes {'R': …, 'G': …, 'B': …}."""
    cfa = np.empty(planes["R"].shape, np.float32)
    for ch, sites in colour_offsets(pattern).items():
        for (i, j) in sites:
            cfa[i::2, j::2] = planes[ch][i::2, j::2]
    return cfa


def mhc_reference(cfa: np.ndarray, pattern: str) -> np.ndarray:
    """The paper's rule pixel by pixel (float64): keep the sample; G at R/B from the cross kernel; at a G site
    the colour of its row from the row kernel, the other from the column kernel; R at B and B at R diagonal."""
    from livestack.engine import debayer as d

    site = {(k // 2, k % 2): ch for k, ch in enumerate(pattern)}
    pad = np.pad(cfa.astype(np.float64), 2, mode="reflect")     # = BORDER_REFLECT_101
    out = np.empty((3,) + cfa.shape)
    for y, x in np.ndindex(cfa.shape):
        here = site[(y % 2, x % 2)]
        row_colour = ({site[(y % 2, 0)], site[(y % 2, 1)]} - {"G"}).pop()
        win = pad[y:y + 5, x:x + 5]
        for c, ch in enumerate("RGB"):
            if ch == here:
                out[c, y, x] = cfa[y, x]
            elif ch == "G":
                out[c, y, x] = (win * d._MHC_G).sum()
            elif here == "G":
                out[c, y, x] = (win * (d._MHC_ROW if ch == row_colour else d._MHC_COL)).sum()
            else:
                out[c, y, x] = (win * d._MHC_DIAG).sum()
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_the_pixel_by_pixel_rule(pattern):
    cfa = np.random.default_rng(1).normal(100, 30, (14, 18)).astype(np.float32)
    np.testing.assert_allclose(debayer(cfa, pattern, "mhc"), mhc_reference(cfa, pattern), atol=1e-3)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_flat_field_stays_flat_exactly(pattern):
    cfa = np.full((12, 14), 1234.5, np.float32)
    out = debayer(cfa, pattern, "mhc")
    assert out.dtype == np.float32 and out.shape == (3, 12, 14)
    np.testing.assert_array_equal(out, 1234.5)      # borders too: reflection keeps the CFA phase


@pytest.mark.parametrize("pattern", PATTERNS)
def test_uniform_colour_is_exact_and_each_site_keeps_its_sample(pattern):
    rgb = {"R": 10.0, "G": 20.0, "B": -3.0}            # calibrated data may be negative
    cfa = mosaic({ch: np.full((10, 12), v, np.float32) for ch, v in rgb.items()}, pattern)
    before = cfa.copy()
    out = debayer(cfa, pattern, "mhc")
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([10, 20, -3], np.float32)[:, None, None],
                                                       out.shape))
    np.testing.assert_array_equal(cfa, before)
    noisy = np.random.default_rng(3).normal(100, 40, (10, 12)).astype(np.float32)
    out = debayer(noisy, pattern, "mhc")
    for c, ch in enumerate("RGB"):
        for (i, j) in colour_offsets(pattern)[ch]:
            np.testing.assert_array_equal(out[c, i::2, j::2], noisy[i::2, j::2])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_gradients_of_each_colour_are_exact_away_from_the_edges(pattern):
    # the correction terms are Laplacians (zero on a linear signal), the rest is bilinear: any linear ramp per
    # colour comes back exactly, 2 px (the kernels' reach) from the edges
    y, x = np.mgrid[0:16, 0:20].astype(np.float32)
    planes = {"R": 100 + 3 * x - 2 * y, "G": 50 + 0.5 * x + 4 * y, "B": 10 - 1.5 * x + 0.25 * y}
    out = debayer(mosaic(planes, pattern), pattern, "mhc")
    for c, ch in enumerate("RGB"):
        np.testing.assert_allclose(out[c, 2:-2, 2:-2], planes[ch][2:-2, 2:-2], atol=1e-4)


def test_reused_buffers_give_the_same_image():
    cfa = np.random.default_rng(1).normal(0, 5, (24, 30)).astype(np.float32)
    out, scratch = np.full((3, 24, 30), np.nan, np.float32), np.full((24, 30), np.nan, np.float32)
    assert debayer(cfa, "GRBG", "mhc", out=out, scratch=scratch) is out
    np.testing.assert_array_equal(out, debayer(cfa, "GRBG", "mhc"))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_saturation_mask_covers_what_a_sample_changes(pattern):
    """A sample's change spreads through the 5×5 kernels: every output pixel it changes is flagged, by the dense
    mask and by the sparse points the grid gives."""
    h, w = 16, 18
    base = np.random.default_rng(2).normal(100, 10, (h, w)).astype(np.float32)
    ref = debayer(base, pattern, "mhc")
    grid = Grid.for_frame((h, w), pattern, "mhc")
    for (i, j) in [(7, 8), (7, 9), (8, 8), (8, 9), (0, 0), (1, 17)]:   # the four sites, and at the edges
        cfa = base.copy()
        cfa[i, j] = 16383.0
        changed = (debayer(cfa, pattern, "mhc") != ref).any(axis=0)
        mask = np.zeros((h, w), bool)
        mask[i, j] = True
        dense = debayer_mask(mask, pattern, "mhc")
        assert changed.any() and not (changed & ~dense).any()
        assert dense.sum() <= 25
        frame = SimpleNamespace(saturated=mask, pattern=pattern)
        rows, cols = grid.saturated(frame, cv2.findNonZero(mask.view(np.uint8)), geometry.identity(),
                                    interpolation="bilinear", warped=False)
        sparse = np.zeros((h, w), bool)
        sparse[rows, cols] = True
        np.testing.assert_array_equal(sparse, dense)


@pytest.mark.parametrize("angle", [1.3, 180.0])
def test_warped_saturation_points_cover_the_dense_mask(angle):
    rng = np.random.default_rng(5)
    mask = np.zeros((120, 160), bool)
    mask[rng.integers(0, 120, 40), rng.integers(0, 160, 40)] = True
    m = cv2.getRotationMatrix2D((80, 60), angle, 1.0)
    m[:, 2] += (2.3, -1.7)
    frame = SimpleNamespace(saturated=mask, pattern="RGGB")
    rows, cols = Grid.for_frame(mask.shape, "RGGB", "mhc").saturated(
        frame, cv2.findNonZero(mask.view(np.uint8)), m, interpolation="bilinear")
    sparse = np.zeros_like(mask)
    sparse[rows, cols] = True
    dense = warp_mask(debayer_mask(mask, "RGGB", "mhc"), m, mask.shape)
    assert not (dense & ~sparse).any()
    assert (sparse & ~dense).sum() <= 0.03 * dense.sum()     # OpenCV weighs taps in steps of 1/32
    r, c = np.nonzero(mask)
    gy, _ = warp_points(r, c, m, mask.shape, reach=3.0)        # bilinear warp 1 + mhc 2
    assert len(gy) == len(rows)


def test_grid_mode_setting_and_checkpoint_state():
    g = Grid.for_frame((40, 60), "RGGB", "mhc")
    assert (g.mode, g.debayer, g.shape, g.channels) == ("bayer-mhc", "mhc", (40, 60), 3)
    back = Grid.from_state(g.state())
    assert (back.mode, back.debayer, back.state()) == ("bayer-mhc", "mhc", g.state())
    old = {"mode": "bayer", "sensor_shape": [40, 60], "pattern": "RGGB"}     # a checkpoint from before mhc
    assert Grid.from_state(old).debayer == "bilinear" and Grid.from_state(old).state() == old
    assert Grid.for_frame((40, 60), None, "mhc").mode == "mono"
    with pytest.raises(ValueError, match="unknown debayer method 'vng'"):
        Grid.for_frame((40, 60), "RGGB", "vng")
    assert EngineParams(debayer="mhc").debayer == "mhc"
    with pytest.raises(ValueError, match="engine.debayer"):
        EngineParams(debayer="vng")


def stack_fwhm(files, method: str) -> tuple[float, list]:
    cfg = Config()
    eng = Engine(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer=method)))
    recs = [eng.process(f) for f in files]
    img, _ = eng.result()
    lum = np.nan_to_num(img.mean(axis=0)).astype(np.float32)
    _, q = detect_stars(lum[8:-8, 8:-8], StarParams())
    return q.fwhm, recs


def test_mhc_stacks_sharper_than_bilinear_and_registers_as_well(night):
    files, truth = night(n_frames=5, seed=2, fwhm_px=2.7, rotation_deg=0.1, dither_px=3.0)
    f_bil, _ = stack_fwhm(files, "bilinear")
    f_mhc, recs = stack_fwhm(files, "mhc")
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 4, [r.reason for r in recs]
    assert f_mhc < 0.95 * f_bil, (f_mhc, f_bil)      # 2.74 vs 3.16 px when written
    errs = [geometry.rms_error(np.array(r.matrix), truth_matrix(truth, i), (480, 640)) for i, r in enumerate(recs)]
    assert float(np.sqrt(np.mean(np.square(errs)))) <= 0.05, errs
