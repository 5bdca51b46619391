"""calibrate.py: Frame + Masters -> calibrated CFA, on small synthetic mosaics with known answers."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from livestack.engine.calibrate import (CosmeticParams, Masters, calibrate, cosmetic_correct, nonzero_xy,
                                        replace_from_neighbours, same_exposure)
from livestack.engine.frame import Frame, FrameMeta

H, W = 40, 60
OFF = CosmeticParams(enabled=False)


def make_frame(data, *, exptime=60.0, black=100.0, pattern="RGGB") -> Frame:
    data = np.asarray(data, np.float32)
    return Frame(Path("f.fits"), data, pattern, np.full((2, 2), black, np.float32), 65535.0, None,
                 FrameMeta(exptime=exptime))


def test_no_masters_removes_black_per_cfa_position_and_keeps_input():
    black = np.array([[100, 110], [120, 130]], np.float32)
    data = np.tile(black, (H // 2, W // 2)) + 50
    f = make_frame(data)
    f.black = black
    before = f.data.copy()
    cal, info = calibrate(f, None, OFF)
    assert cal.dtype == np.float32 and np.array_equal(f.data, before)
    np.testing.assert_array_equal(cal, 50)
    assert info == {}


def test_exact_dark_and_flat():
    rng = np.random.default_rng(1)
    flat = rng.uniform(0.6, 1.2, (H, W)).astype(np.float32)
    dark = (100 + rng.uniform(0, 20, (H, W))).astype(np.float32)
    signal = 1000.0
    f = make_frame(dark + signal * flat)
    cal, info = calibrate(f, Masters(dark=dark, dark_exptime=60.0, flat=flat, names={"dark": "d", "flat": "fl"}),
                          OFF)
    np.testing.assert_allclose(cal, signal, rtol=1e-5)
    assert info == {"dark": "d", "flat": "fl"}


def test_dark_scaled_with_bias():
    rng = np.random.default_rng(2)
    bias = (100 + rng.normal(0, 2, (H, W))).astype(np.float32)
    rate = rng.uniform(0.1, 5, (H, W)).astype(np.float32)       # ADU/s thermal
    dark30 = bias + 30 * rate
    f = make_frame(bias + 120 * rate + 7.0, exptime=120.0)
    cal, info = calibrate(f, Masters(bias=bias, dark=dark30, dark_exptime=30.0, names={"bias": "b", "dark": "d"}),
                          OFF)
    np.testing.assert_allclose(cal, 7.0, atol=2e-3)
    assert info["dark_scaled"] == 4.0 and info["bias"] == "b" and info["dark"] == "d"


def test_dark_scaled_with_the_black_level_when_there_is_no_bias():
    rate = np.full((H, W), 2.0, np.float32)
    f = make_frame(100 + 90 * rate, exptime=90.0, black=100.0)
    cal, info = calibrate(f, Masters(dark=100 + 30 * rate, dark_exptime=30.0), OFF)
    np.testing.assert_allclose(cal, 0, atol=1e-3)
    assert info["dark_scaled"] == 3.0 and info["dark_base"] == "black level"


def test_dark_of_other_exposure_without_any_offset_is_recorded():
    f = make_frame(np.full((H, W), 200.0), exptime=90.0, black=0.0)
    _, info = calibrate(f, Masters(dark=np.full((H, W), 150, np.float32), dark_exptime=30.0), OFF)
    assert "dark_unscaled" in info and "dark_scaled" not in info


def test_same_exposure():
    assert same_exposure(60.0, 60.0) and same_exposure(60.0, 60.05) and same_exposure(None, None)
    assert not same_exposure(60.0, 61.0) and not same_exposure(None, 60.0) and not same_exposure(0.5, 1.0)


def test_bad_pixels_replaced_from_same_colour_neighbours_and_notes_recorded():
    data = np.tile(np.array([[100, 300], [300, 500]], np.float32), (H // 2, W // 2)) + 100
    data[10, 10] = 60000   # an R site
    data[11, 11] = 0       # a B site
    bad = np.zeros((H, W), bool)
    bad[10, 10] = bad[11, 11] = True
    f = make_frame(data, black=100.0)
    cal, info = calibrate(f, Masters(bad=bad, notes={"flat_skipped": "why"}), OFF)
    assert cal[10, 10] == 100 and cal[11, 11] == 500        # the colour of their own CFA site
    assert info["bad_pixels"] == 2 and info["flat_skipped"] == "why"


def test_replace_from_neighbours_mono_cluster():
    img = np.full((H, W), 10.0, np.float32)
    bad = np.zeros((H, W), bool)
    bad[5:8, 5:8] = True
    img[bad] = 1e6
    replace_from_neighbours(img, bad, colour=False)
    assert np.all(img == 10.0)


def test_cosmetic_correction_without_masters_still_finds_hot_pixels():
    rng = np.random.default_rng(3)
    data = (200 + rng.normal(0, 5, (H, W))).astype(np.float32)
    data[20, 30] = 5000
    cal, info = calibrate(make_frame(data, pattern=None), None, CosmeticParams())
    assert info["hot_pixels"] >= 1 and cal[20, 30] < 150
    img = data - 100
    assert cosmetic_correct(img, CosmeticParams(), colour=False) >= 1


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 33), (513, 600)])
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.01, 0.5, 1.0])
def test_nonzero_xy_is_findnonzero(shape, density):
    """The word-at-a-time scan gives cv2.findNonZero's points, in its order, sparse or dense (fallback)."""
    mask = (np.random.default_rng(7).random(shape) < density).astype(np.uint8) * 255
    want = cv2.findNonZero(mask)
    for got in (nonzero_xy(mask), nonzero_xy(mask, dense=0)):
        if want is None:
            assert got is None
        else:
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got.reshape(-1, 2), want.reshape(-1, 2))
