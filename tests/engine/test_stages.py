"""Each stage alone, on arrays with a known answer: dtype float32, inputs unchanged, the right numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from livestack.engine.calibrate import CosmeticParams, cosmetic_correct
from livestack.engine.debayer import bin2x2_mean, debayer, debayer_mask
from livestack.engine.frame import FrameRecord, Quality
from livestack.engine.normalize import normalize_inplace, sky_model, transparency_scale
from livestack.engine.read import FULL_SCALE_MARGIN, read_frame
from livestack.engine.reject import FrameJudge, RejectParams
from livestack.engine.stack import RunningStack, StackParams
from livestack.engine.stars import StarParams, detect_stars, refine_centroids
from livestack.engine.stretch import StretchParams, auto_stretch
from livestack.engine.warp import warp
from livestack.session import FramesLog, read_frames_log


def gaussian_image(h, w, stars, fwhm, sky=100.0, noise=0.0, rng=None):
    yy, xx = np.mgrid[0:h, 0:w]
    s = fwhm / 2.3548
    img = np.full((h, w), sky, np.float64)
    for x, y, f in stars:
        img += f / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    if noise:
        img += rng.normal(0, noise, img.shape)
    return img.astype(np.float32)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_debayer_constant_colour_every_pattern(pattern):
    rgb = {"R": 10.0, "G": 20.0, "B": 30.0}
    cfa = np.zeros((10, 12), np.float32)
    for k, ch in enumerate(pattern):
        cfa[k // 2::2, k % 2::2] = rgb[ch]
    before = cfa.copy()
    out = debayer(cfa, pattern)
    assert out.dtype == np.float32 and out.shape == (3, 10, 12)
    np.testing.assert_allclose(out, np.broadcast_to(np.array([10, 20, 30], np.float32)[:, None, None], out.shape))
    sp = debayer(cfa, pattern, "superpixel")
    assert sp.shape == (3, 5, 6)
    np.testing.assert_allclose(sp, np.broadcast_to(np.array([10, 20, 30], np.float32)[:, None, None], sp.shape))
    np.testing.assert_array_equal(cfa, before)


def test_debayer_bilinear_is_linear_interpolation_of_a_ramp():
    # a horizontal ramp: bilinear interpolation reproduces it exactly away from the borders in every channel
    cfa = np.tile(np.arange(16, dtype=np.float32), (8, 1))
    out = debayer(cfa, "RGGB")
    np.testing.assert_allclose(out[:, 2:-2, 2:-2], np.broadcast_to(cfa[2:-2, 2:-2], (3, 4, 12)))


def test_debayer_mask_and_binning():
    m = np.zeros((6, 6), bool)
    m[2, 2] = True
    d = debayer_mask(m, "RGGB")
    assert d[1:4, 1:4].all() and d.sum() == 9
    assert debayer_mask(m, "RGGB", "superpixel")[1, 1] and debayer_mask(m, "RGGB", "superpixel").sum() == 1
    cfa = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(bin2x2_mean(cfa) * 4, [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]])
    assert bin2x2_mean(np.ones((5, 7), np.float32)).shape == (2, 3)


def test_cosmetic_removes_hot_pixels_keeps_stars():
    rng = np.random.default_rng(1)
    img = gaussian_image(64, 64, [(20.3, 30.7, 20000), (45, 12, 5000)], fwhm=2.2, noise=5, rng=rng)
    star_peak = img[31, 20]
    hot = [(5, 50), (40, 40), (60, 7)]
    for y, x in hot:
        img[y, x] += 3000
    n = cosmetic_correct(img, CosmeticParams(), colour=False)
    assert n == 3
    for y, x in hot:
        assert abs(img[y, x] - 100) < 30
    assert img[31, 20] == star_peak   # an undersampled star (FWHM 2.2 px) is not a hot pixel


@pytest.mark.parametrize("colour", [False, True], ids=["mono", "bayer"])
def test_cosmetic_row_blocks_on_threads_find_the_same_pixels(colour):
    """The hot-pixel search's row blocks on worker threads (a live frame's calibration): the same pixels
    replaced by the same values, hot pixels in every block and on the blocks' edges."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    img = rng.normal(500, 8, (203, 150)).astype(np.float32)
    ys = np.r_[rng.integers(3, 200, 40), [15, 16, 31, 32, 33, 47]]
    xs = rng.integers(3, 147, ys.size)
    img[ys, xs] += rng.uniform(500, 4000, ys.size).astype(np.float32)
    serial, threaded = img.copy(), img.copy()
    n = cosmetic_correct(serial, CosmeticParams(), colour=colour, block_rows=16)
    with ThreadPoolExecutor(2) as pool:
        m = cosmetic_correct(threaded, CosmeticParams(), colour=colour, block_rows=16,
                             parallel_map=lambda fn, items: list(pool.map(fn, items)))
    assert n == m >= 40
    np.testing.assert_array_equal(serial, threaded)


def test_stars_fwhm_centroids_and_quality():
    rng = np.random.default_rng(2)
    truth = [(x, y, f) for x, y, f in zip(rng.uniform(10, 190, 40), rng.uniform(10, 140, 40),
                                           rng.uniform(2e3, 5e4, 40))]
    img = gaussian_image(150, 200, truth, fwhm=3.5, sky=200, noise=3, rng=rng)
    before = img.copy()
    stars, q = detect_stars(img, StarParams())
    np.testing.assert_array_equal(img, before)
    assert q.stars >= 30
    assert abs(q.fwhm - 3.5) < 0.35 and q.eccentricity < 0.3
    assert abs(q.background - 200) < 2 and abs(q.noise - 3) < 0.5
    assert np.all(np.diff(stars.flux) <= 0)            # brightest first
    t = np.array([(x, y) for x, y, _ in truth])
    d = np.min(np.hypot(*(stars.xy[:, None, :] - t[None]).transpose(2, 0, 1)), axis=1)
    assert np.median(d) < 0.05
    refined = refine_centroids(img[None], stars.xy + 0.3, q.fwhm)
    d2 = np.min(np.hypot(*(refined[:, None, :] - t[None]).transpose(2, 0, 1)), axis=1)
    assert np.median(d2) < 0.05
    # wide stars (defocus, not a star field) are left as detected: no stamps the size of FWHM²
    np.testing.assert_array_equal(refine_centroids(img[None], stars.xy + 0.3, 40.0), stars.xy + 0.3)


def test_stars_on_a_large_frame_reduced_background():
    """From 2 Mpx on, sep's background is estimated on a 2×2-averaged copy: same stars, level and noise."""
    rng = np.random.default_rng(12)
    h, w = 1400, 1500
    yy, xx = np.mgrid[0:h, 0:w]
    img = (300 + 0.05 * xx - 0.03 * yy + rng.normal(0, 4, (h, w))).astype(np.float32)
    truth = np.column_stack([rng.uniform(20, w - 20, 200), rng.uniform(20, h - 20, 200)])
    s = 3.2 / 2.3548
    for x, y in truth:
        x0, y0 = int(x) - 8, int(y) - 8
        sy, sx = np.mgrid[y0:y0 + 17, x0:x0 + 17]
        img[y0:y0 + 17, x0:x0 + 17] += (2e4 / (2 * np.pi * s * s)
                                       * np.exp(-((sx - x) ** 2 + (sy - y) ** 2) / (2 * s * s)))
    stars, q = detect_stars(img, StarParams())
    assert q.stars >= 190 and abs(q.fwhm - 3.2) < 0.3
    assert abs(q.noise - 4) < 0.3 and abs(q.background - (300 + 0.05 * w / 2 - 0.03 * h / 2)) < 5
    d = np.min(np.hypot(*(stars.xy[:, None, :] - truth[None]).transpose(2, 0, 1)), axis=1)
    assert np.median(d) < 0.05


def test_stars_elongated_frame_has_high_eccentricity():
    rng = np.random.default_rng(3)
    pts = [(x + dx, y, f / 9) for x, y, f in zip(rng.uniform(15, 185, 30), rng.uniform(10, 140, 30),
                                                 rng.uniform(5e3, 5e4, 30)) for dx in np.linspace(-4, 4, 9)]
    _, q = detect_stars(gaussian_image(150, 200, pts, fwhm=3.0, noise=3, rng=rng), StarParams())
    assert q.eccentricity > 0.8


def test_empty_sky_gives_zero_stars_not_an_error():
    img = np.random.default_rng(0).normal(100, 5, (100, 100)).astype(np.float32)
    stars, q = detect_stars(img, StarParams())
    assert len(stars) == 0 and q.stars == 0 and np.isnan(q.fwhm)


def test_sky_model_recovers_plane_and_noise():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:400, 0:600]
    cfa = (300 + 0.2 * xx - 0.1 * yy + rng.normal(0, 8, (400, 600))).astype(np.float32)
    cfa[0::2, 0::2] += 50           # red channel brighter
    planes, noise = sky_model(cfa, "RGGB")
    np.testing.assert_allclose(planes[:, 1], 0.2, atol=0.01)
    np.testing.assert_allclose(planes[:, 2], -0.1, atol=0.01)
    np.testing.assert_allclose(planes[:, 0], [350, 300, 300], atol=1.5)
    np.testing.assert_allclose(noise, 8, rtol=0.05)


def test_normalize_matches_sky_and_scale():
    img = np.full((1, 50, 60), 500.0, np.float32)
    img[0, 20, 30] = 1500.0                                # a star of 1000 above a 500 sky
    plane = np.array([[500.0, 0.0, 0.0]])
    ref = np.array([[300.0, 0.5, 0.0]])                    # reference sky: 300 + 0.5 x on the stack grid
    m = np.array([[1.0, 0, 10], [0, 1.0, 0]])              # frame x -> stack x + 10
    same = img.copy()
    normalize_inplace(img, plane, 2.0, ref, m)
    assert img[0, 5, 4] == pytest.approx(300 + 0.5 * 14)
    assert img[0, 20, 30] == pytest.approx(2000 + 300 + 0.5 * 40)
    # in row blocks on worker threads: the same numbers
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        normalize_inplace(same, plane, 2.0, ref, m, parallel_map=lambda f, xs: list(pool.map(f, xs)),
                          block_rows=7)
    np.testing.assert_array_equal(same, img)
    assert transparency_scale(np.array([10.0, 20, 30, 40]), np.array([5.0, 10, 15, 20])) == pytest.approx(2)


def test_warp_shift_and_footprint():
    img = np.zeros((1, 20, 30), np.float32)
    img[0, 10, 10] = 1.0
    out = warp(img, np.array([[1.0, 0, 3], [0, 1.0, -2]]), (20, 30))
    assert out[0, 8, 13] == pytest.approx(1.0) and np.nansum(out) == pytest.approx(1.0)
    assert np.isnan(out[0, :, :3]).all() and np.isnan(out[0, -2:, :]).all()
    assert not np.isnan(out[0, :-3, 4:]).any()   # interpolation touching the border is NaN too (1 px)


def test_running_stack_equals_brute_force_weighted_mean_without_outliers():
    rng = np.random.default_rng(5)
    frames = [rng.normal(100, 10, (3, 40, 50)).astype(np.float32) for _ in range(7)]
    frames[2][:, :, :5] = np.nan                             # partial footprint
    weights = rng.uniform(0.5, 2.0, 7)
    st = RunningStack((3, 40, 50), np.array([100, 100, 100.]), StackParams(kappa=20, bootstrap=0))
    for f, w in zip(frames, weights):
        st.add(f.copy(), w, np.array([10, 10, 10.]))
    mean, wsum = st.result()
    a = np.stack(frames)
    wm = np.where(np.isnan(a), 0, weights[:, None, None, None])
    expected = np.nansum(a * weights[:, None, None, None], axis=0) / wm.sum(axis=0)
    np.testing.assert_allclose(mean, expected, rtol=1e-5)
    np.testing.assert_allclose(wsum, wm[:, 0].sum(axis=0), rtol=1e-6)


def test_running_stack_rejects_outliers_in_any_frame_and_weights_are_order_free():
    rng = np.random.default_rng(6)
    base = [rng.normal(100, 5, (1, 30, 30)).astype(np.float32) for _ in range(8)]
    for k in (0, 4):
        base[k][0, 15, 3:27] += 500                          # a trail, in the first frame and a later one
    w = rng.uniform(0.5, 2, 8)
    results = []
    for order in (range(8), reversed(range(8))):
        st = RunningStack((1, 30, 30), np.array([100.0]), StackParams())
        for i in order:
            st.add(base[i].copy(), w[i], np.array([5.0]))
        results.append(st.result()[0])
        assert np.abs(results[-1][0, 15, 5:25] - 100).max() < 10
    np.testing.assert_allclose(results[0][0, 10:20], results[1][0, 10:20], atol=6)


@pytest.mark.parametrize("channels, bootstrap", [(3, 3), (1, 3), (3, 5)])
def test_combination_excess_is_the_buffer_less_the_accumulators_that_replace_it(channels, bootstrap):
    """What the engine decides the memory peak by (Engine._combination_peaks): predicted before the first
    frame, it is the full buffer's bytes less the accumulators' once they exist."""
    rng = np.random.default_rng(3)
    st = RunningStack((channels, 41, 60), np.full(channels, 100.0), StackParams(bootstrap=bootstrap))
    predicted = st.combination_excess()
    for _ in range(bootstrap):
        st.add(rng.normal(100, 5, (channels, 41, 60)).astype(np.float32), 1.0, np.full(channels, 5.0))
    buffered = st.nbytes
    st.finish_bootstrap()
    assert st.buffer == [] and predicted == buffered - st.nbytes
    assert (predicted > 41 * 60 * 4) == (bootstrap == 5)      # more than a float32 mosaic: the peak


class _Rows:
    """A frame given block by block, as the pipeline's render.FrameOnGrid gives it (rows(r0, r1), block_rows)."""

    block_rows = 6

    def __init__(self, img):
        self.img = img

    def rows(self, r0, r1):
        return [self.img[c, r0:r1].copy() for c in range(self.img.shape[0])]


@pytest.mark.parametrize("channels, bootstrap", [(3, 3), (1, 5)])
def test_the_frame_filling_the_bootstrap_combined_as_it_is_added_makes_the_same_stack(channels, bootstrap):
    """add_channels(combine=True) adds the frame that fills the bootstrap buffer straight to the accumulators,
    beside the buffered frames' rows: the same cells judged, the same sums in the same order as the buffer's
    combination (finish_bootstrap) makes them — bit for bit where the frame's values are float16's own (whole
    numbers below 2048: the buffer stores them exactly) — with a trail in the first frame and in the filling
    one, NaN borders, saturated pixels; and so after the next frame too."""
    rng = np.random.default_rng(11)
    shape = (channels, 41, 60)
    frames, sats = [], []
    for i in range(bootstrap + 1):
        f = rng.integers(490, 511, shape).astype(np.float32)     # a sky of 500 ± 6
        f[:, :, : i + 1] = np.nan                               # a footprint's edge, a column more each frame
        if i in (0, bootstrap - 1):
            f[:, 9 + i, 10:50] += 600                           # a satellite
        sats.append((np.array([20, 21 + i]), np.array([30, 31])))
        frames.append(f)
    weights = rng.uniform(0.5, 2, len(frames))
    stacks = []
    for combine in (False, True):
        st = RunningStack(shape, np.full(channels, 500.0), StackParams(bootstrap=bootstrap))
        for i, f in enumerate(frames):
            source = _Rows(f.copy()) if i == bootstrap - 1 else (lambda c, f=f.copy(): f[c])
            st.add_channels(st.cells_of(f), source, weights[i], np.full(channels, 6.0), saturated=sats[i],
                            combine=combine)
            if combine and i == bootstrap - 1:
                assert st.buffer == [] and st.sums is not None        # combined as it was added
        stacks.append(st)
    a, b = stacks
    assert a.bootstrap_rejected == b.bootstrap_rejected and a.bootstrap_rejected[0] > 0 \
        and a.bootstrap_rejected[-1] > 0 and a.rejected_total == b.rejected_total
    for name in ("sums", "wsum", "lsum", "lw", "sq", "count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    mean, _ = b.result()
    for row in (9, 9 + bootstrap - 1):                                          # neither satellite in the stack
        assert np.nanmax(np.abs(mean[:, row, 10:50] - 500)) < 20


def test_stack_cell_noise_model_matches_pure_noise():
    """Cells of 4 independent pixels per channel: with cell_samples = 4 the κσ test sees the true variance and
    rejects ~0.27 % of pure-noise cells (κ = 3); claiming 16 samples (a 2× too small σ) rejects far more."""
    rng = np.random.default_rng(11)
    frames = [rng.normal(0, 2.0, (3, 200, 200)).astype(np.float32) for _ in range(6)]
    rates = []
    for n in (4, 16):
        st = RunningStack((3, 200, 200), np.zeros(3), StackParams(bootstrap=0, grow=False),
                          [0.25, 0.5, 0.25], [n, n, n])
        rej = [st.add(f.copy(), 1.0, np.full(3, 2.0)) for f in frames]
        rates.append(sum(rej[1:4]) / (3 * 200 * 200))   # frames 2-4: judged against the noise floor
    assert 0.0005 < rates[0] < 0.006 and rates[1] > 5 * rates[0], rates
    with pytest.raises(ValueError, match="lum_weights"):
        RunningStack((3, 4, 4), np.zeros(3), StackParams(), [0.5, 0.5, 0.5])


@pytest.mark.parametrize("bootstrap", [0, 3])
def test_stack_saturated_pixels_count_only_where_nothing_better(bootstrap):
    frames = [np.full((1, 12, 12), 100.0 + i, np.float32) for i in range(6)]
    masks = []
    for i, f in enumerate(frames):
        m = np.zeros((12, 12), bool)
        m[7, 7] = True                        # saturated in every frame: the saturated values are all there is
        f[0, 7, 7] = 1000.0
        if i == 2:
            m[2, 2] = True                    # in one frame only (an ordinary value: no outlier): the others decide
        masks.append(m)
    st = RunningStack((1, 12, 12), np.array([100.0]), StackParams(kappa=20, bootstrap=bootstrap))
    for i, (f, m) in enumerate(zip(frames, masks)):
        st.add(f, 1.0, np.array([1.0]), saturated=m if i % 2 else np.nonzero(m))   # a mask or (rows, cols)
    mean, wsum = st.result()
    others = np.mean([100.0 + i for i in range(6) if i != 2])
    assert mean[0, 2, 2] == pytest.approx(others, abs=1e-3) and others - 102.5 > 0.09
    assert mean[0, 7, 7] == pytest.approx(1000.0, rel=1e-5) and wsum[7, 7] == pytest.approx(6e-6, rel=1e-3)
    assert mean[0, 10, 10] == pytest.approx(102.5, abs=1e-4) and wsum[10, 10] == 6


@pytest.mark.parametrize("angle, reach", [(0.0, 1.5), (1.3, 2.0), (-2.1, 1.0), (180.0, 2.0)])
def test_warp_points_match_the_dense_masks(angle, reach):
    """The sparse saturation path flags what debayer_mask + warp_mask flag (give or take the few pixels where
    OpenCV's fixed-point weights round a tiny tap weight to zero)."""
    import cv2

    from livestack.engine.warp import warp_mask, warp_points
    rng = np.random.default_rng(int(abs(angle) * 10))
    mask = np.zeros((120, 160), bool)
    mask[rng.integers(0, 120, 40), rng.integers(0, 160, 40)] = True
    mask[60:63, 80:86] = True
    r, c = np.nonzero(mask)
    if reach == 1.5:        # the reference: no warp, only the bilinear debayer's 3×3
        gy, gx = warp_points(r, c, np.array([[1.0, 0, 0], [0, 1.0, 0]]), mask.shape, reach=reach)
        dense = debayer_mask(mask, "RGGB")
    else:
        m = cv2.getRotationMatrix2D((80, 60), angle, 1.0)
        m[:, 2] += (2.3, -1.7)
        gy, gx = warp_points(r, c, m, mask.shape, reach=reach)
        dense = warp_mask(debayer_mask(mask, "RGGB") if reach == 2.0 else mask, m, mask.shape)
    sparse = np.zeros_like(mask)
    sparse[gy, gx] = True
    assert not (dense & ~sparse).any()
    assert (sparse & ~dense).sum() <= 0.03 * dense.sum()     # OpenCV weighs taps in steps of 1/32


def test_stack_state_round_trip_mid_bootstrap():
    rng = np.random.default_rng(7)
    st = RunningStack((1, 10, 10), np.array([0.0]), StackParams())
    st.add(rng.normal(0, 1, (1, 10, 10)).astype(np.float32), 1.0, np.array([1.0]))
    st2 = RunningStack.from_state(st.state(), StackParams())
    f = rng.normal(0, 1, (1, 10, 10)).astype(np.float32)
    st.add(f.copy(), 1.0, np.array([1.0]))
    st2.add(f.copy(), 1.0, np.array([1.0]))
    np.testing.assert_array_equal(st.result()[0], st2.result()[0])


def test_judge_reasons_carry_numbers():
    j = FrameJudge(RejectParams())
    good = Quality(100, 3.0, 0.2, 400.0, 20.0)
    for _ in range(5):
        j.accept(good)
    assert j.check(good) is None
    assert "fwhm 5.00 px > 1.5 × running median 3.00 px" in j.check(Quality(100, 5.0, 0.2, 400, 20))
    assert "stars 20" in j.check(Quality(20, 3.0, 0.2, 400, 20))
    assert "background" in j.check(Quality(100, 3.0, 0.2, 900, 20))
    assert "eccentricity 0.70" in j.check(Quality(100, 3.0, 0.7, 400, 20))
    assert "transparency 0.30" in j.check(good, transparency=0.3)
    # the setting that decides it, named: a sparse narrowband night had every frame rejected, nothing said why
    assert j.check_reference(Quality(5, 3.0, 0.2, 400, 20)) == \
        "only 5 stars (a reference frame needs 15: [reject] min_ref_stars)"


def test_stretch_background_and_stars():
    rng = np.random.default_rng(8)
    img = np.stack([gaussian_image(300, 400, [(200, 150, 2e5), (50, 60, 2e4)], 3.0, sky=s, noise=4, rng=rng)
                    for s in (500, 300, 200)])                 # a colour cast in the sky
    before = img.copy()
    out = auto_stretch(img, StretchParams())
    np.testing.assert_array_equal(img, before)
    assert out.dtype == np.uint8 and out.shape == (300, 400, 3)
    bg = np.median(out.reshape(-1, 3), axis=0)
    assert np.all(np.abs(bg - 0.2 * 255) < 15) and np.ptp(bg) <= 4   # neutral sky at the target level
    assert out[150, 200].min() > 200                                  # the bright star is white, not tinted


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_stretch_channels_on_threads_give_the_same_bytes(channels, dtype):
    """The preview's channels stretched on worker threads: the same image, with coverage and NaN, C-ordered."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    img = np.stack([gaussian_image(300, 400, [(200, 150, 2e5), (50, 60, 2e4)], 3.0, sky=s, noise=4, rng=rng)
                    for s in (500, 300, 200)][:channels])
    img[:, :20] = np.nan
    cov = np.ones(img.shape[1:], bool)
    cov[:, :20] = False
    serial = auto_stretch(img, StretchParams(), coverage=cov, dtype=dtype)
    with ThreadPoolExecutor(2) as pool:
        threaded = auto_stretch(img, StretchParams(), coverage=cov, dtype=dtype,
                                parallel_map=lambda fn, items: list(pool.map(fn, items)))
    assert threaded.dtype == dtype and threaded.shape == (300, 400, 3) and threaded.flags.c_contiguous
    np.testing.assert_array_equal(serial, threaded)
    assert not threaded[:, :20].any() and threaded[:, 20:].any()
    if channels == 1:
        assert np.array_equal(threaded[..., 0], threaded[..., 2])


def test_frames_log_round_trip_and_torn_line(tmp_path):
    log = FramesLog(tmp_path / "frames.jsonl")
    rec = FrameRecord(file="a.fits", status="stacked", matrix=[[1.0, 0, 0], [0, 1.0, 0]], fwhm=2.5, weight=1.0)
    log.append(rec)
    with open(tmp_path / "frames.jsonl", "a") as f:
        f.write('{"file": "b.fits", "sta')                     # power lost mid-append
    assert [r["file"] for r in read_frames_log(tmp_path / "frames.jsonl")] == ["a.fits"]
    log2 = FramesLog(tmp_path / "frames.jsonl")
    log2.append(FrameRecord(file="c.fits", status="failed", reason="truncated"))
    recs = read_frames_log(tmp_path / "frames.jsonl")
    assert [r["file"] for r in recs] == ["a.fits", "c.fits"]
    assert FrameRecord.from_dict(recs[0]) == rec
    assert json.loads((tmp_path / "frames.jsonl").read_text().splitlines()[1])["reason"] == "truncated"


def test_read_fits_bottom_up_bayer_offsets_and_float(tmp_path):
    data = np.arange(18 * 20, dtype=np.uint16).reshape(18, 20) + 1000
    h = fits.Header()
    h["BAYERPAT"], h["XBAYROFF"], h["YBAYROFF"], h["ROWORDER"] = "RGGB", 1, 0, "BOTTOM-UP"
    h["EXPTIME"], h["DATE-OBS"], h["IMAGETYP"] = 30.0, "2026-01-02T03:04:05.5", "Light Frame"
    fits.PrimaryHDU(data, header=h).writeto(tmp_path / "a.fits")
    f = read_frame(tmp_path / "a.fits")
    assert f.data.dtype == np.float32
    np.testing.assert_array_equal(f.data, data[::-1].astype(np.float32))
    assert f.pattern == "GRBG"            # XBAYROFF 1 shifts RGGB by a column; 18 rows: flip keeps the phase
    assert f.meta.exptime == 30 and f.meta.imagetyp == "light" and f.meta.time.second == 5
    fits.PrimaryHDU(np.ones((20, 20), np.float32) * 1000.5).writeto(tmp_path / "b.fit")
    g = read_frame(tmp_path / "b.fit")
    assert g.pattern is None and g.saturated is None and g.data.mean() == 1000.5 and g.white == np.inf


def test_read_float_fits_of_0_to_1_is_16_bit_adu(tmp_path):
    """Siril and PixInsight write float images as 0…1 of the 16-bit range: a master dark made there and put
    among the darks (or a calibrated light) is read in ADU like every other frame, 1.0 saturated — a dark of
    0.002 would otherwise be subtracted from lights of 1000 ADU as nothing."""
    adu = np.random.default_rng(1).uniform(90, 140, (20, 24)).astype(np.float32)
    adu[5, 6] = 65535
    fits.PrimaryHDU(adu / np.float32(65535)).writeto(tmp_path / "siril.fit")
    g = read_frame(tmp_path / "siril.fit")
    np.testing.assert_allclose(g.data, adu, rtol=1e-6)
    assert g.white == 65535 and g.saturated is not None and g.saturated.sum() == 1


@pytest.mark.parametrize("program", [None, "Siril v1.2.4"])
def test_read_float_fits_of_0_to_1_with_a_few_values_above_1_is_still_16_bit_adu(tmp_path, program):
    """The unit of a float FITS was decided by its largest value alone: a flat in 0…1 peaking at 0.98 was read
    ×65535 and one whose few brightest pixels reach 1.02 (a hot pixel, a calibrated frame's overshoot) was not,
    so two flats of one set came out 65535× apart.  Both are ADU now; so is a frame with 0.5 % of its pixels
    above 1 when its header says Siril wrote it."""
    rng = np.random.default_rng(2)
    adu = rng.uniform(20000, 60000, (40, 50)).astype(np.float32)
    h = fits.Header()
    if program:
        h["PROGRAM"] = program
    fits.PrimaryHDU(adu * np.float32(0.98 / 60000), header=h).writeto(tmp_path / "flat_098.fit")
    over = adu.copy()
    over.flat[rng.choice(over.size, 10 if program else 2, replace=False)] = 66800      # 1.019 of 65535
    fits.PrimaryHDU(over / np.float32(65535), header=h).writeto(tmp_path / "flat_102.fit")
    a, b = read_frame(tmp_path / "flat_098.fit"), read_frame(tmp_path / "flat_102.fit")
    assert a.white == b.white == 65535 and 0.97 < np.median(b.data) / np.median(a.data) * 0.98 / 60000 * 65535 < 1.03
    np.testing.assert_allclose(b.data, over, rtol=1e-6)
    assert b.saturated is not None and b.saturated.sum() == (10 if program else 2)


@pytest.mark.parametrize("name, values", [
    ("adu_light", lambda r: r.normal(1200, 30, (40, 50))),                  # a float light in ADU
    ("mean_1_flat", lambda r: r.normal(1.0, 0.05, (40, 50))),               # a master flat normalised to mean 1
    ("dark_current_master", lambda r: r.normal(0.1, 0.3, (40, 50))),        # bias-subtracted dark in ADU
])
def test_read_float_fits_in_adu_or_normalised_to_mean_1_is_not_scaled(tmp_path, name, values):
    """What stays as stored: data whose bulk is not within 0…1 (an ADU light, a flat of mean 1, a dark-current
    master with its negative noise), even with a few pixels in 0…1 or above 1."""
    data = values(np.random.default_rng(3)).astype(np.float32)
    fits.PrimaryHDU(data).writeto(tmp_path / f"{name}.fits")
    f = read_frame(tmp_path / f"{name}.fits")
    np.testing.assert_array_equal(f.data, data)
    assert f.white == np.inf


@pytest.mark.parametrize("top, left", [(0, 0), (1, 0), (0, 3), (5, 7), (8, 2)])
@pytest.mark.parametrize("n", [2, 6])
def test_read_raw_colours_of_the_visible_corner_match_rawpys_map(top, left, n):
    """_colors_2x2 is rawpy's raw_colors_visible[:2, :2] (its pattern tiled over the sensor, less the margins),
    whatever the margins' parity and for X-Trans-sized patterns too, without building the map."""
    from types import SimpleNamespace

    from livestack.engine.read import _colors_2x2

    pattern = np.random.default_rng(n + top + left).integers(0, 4, (n, n)).astype(np.uint8)
    raw = SimpleNamespace(raw_pattern=pattern, sizes=SimpleNamespace(top_margin=top, left_margin=left))
    rawpy_map = np.pad(pattern, ((0, 40 - n), (0, 40 - n)), mode="wrap")[top:top + 20, left:left + 20]
    np.testing.assert_array_equal(_colors_2x2(raw), rawpy_map[:2, :2])


@pytest.mark.parametrize("roworder", ["TOP-DOWN", "BOTTOM-UP"])
def test_read_fits_into_a_reused_buffer(tmp_path, roworder):
    """A FITS frame is converted into ``out`` (the pipeline's warm buffer), flipped and cleaned there: the same
    frame as a fresh read."""
    data = np.arange(18 * 20, dtype=np.float32).reshape(18, 20)
    data[3, 4] = np.nan
    h = fits.Header()
    h["BAYERPAT"], h["ROWORDER"] = "RGGB", roworder
    fits.PrimaryHDU(data, header=h).writeto(tmp_path / "a.fits")
    fresh = read_frame(tmp_path / "a.fits")
    out = np.full((18, 20), -1.0, np.float32)
    f = read_frame(tmp_path / "a.fits", out=out)
    assert f.data is out
    np.testing.assert_array_equal(f.data, fresh.data)
    assert f.pattern == fresh.pattern and np.isfinite(f.data).all()
    assert read_frame(tmp_path / "a.fits", out=np.empty((18, 22), np.float32)).data.shape == (18, 20)


# (BITPIX as stored, BZERO, BSCALE, BLANK): a camera's unsigned 16 bit, signed, 8 bit, unsigned and signed 32 bit,
# offsets beyond float32's integers, and what astropy must scale (a fraction, BSCALE, BLANK)
_FITS_INTEGERS = [(np.int16, 32768, 1, None), (np.int16, 0, 1, None), (np.uint8, 0, 1, None),
                  (np.int32, 2 ** 31, 1, None), (np.int32, 0, 1, None), (np.int32, 123456789, 1, None),
                  (np.int16, -40000, 1, None), (np.int16, 0.5, 1, None), (np.int16, 0, 2, None),
                  (np.int16, 0, 1, -5), (np.int16, 32768, 1, -5)]


@pytest.mark.parametrize("stored, bzero, bscale, blank", _FITS_INTEGERS)
@pytest.mark.parametrize("reuse", [False, True])
def test_read_fits_integers_as_astropy_scales_them(tmp_path, stored, bzero, bscale, blank, reuse):
    """A camera's integers are made float32 straight from the stored values (no scaled copy by astropy): the
    values, levels and saturation flags are those of astropy's scaling, to the bit, for every integer layout —
    and the layouts only astropy handles (BSCALE, a fractional BZERO, BLANK pixels, which become 0) still are."""
    rng = np.random.default_rng(7)
    info = np.iinfo(stored)
    raw = rng.integers(info.min, int(info.max) + 1, (18, 20), dtype=np.int64).astype(stored)
    raw[0, :3] = info.max                       # the type's largest value: saturated in an unsigned layout
    raw[5, 6] = -5 if info.min < 0 else 5
    hdu = fits.PrimaryHDU(raw, do_not_scale_image_data=True)
    hdu.header["BZERO"], hdu.header["BSCALE"] = bzero, bscale
    if blank is not None:
        hdu.header["BLANK"] = blank
    hdu.writeto(tmp_path / "a.fits")
    with fits.open(tmp_path / "a.fits") as hdul:
        want = hdul[0].data.astype(np.float32)           # astropy's physical values, rounded once
    assert np.isnan(want).any() == (blank is not None and bzero == 0)   # (astropy keeps unsigned 16 bit whole)
    want = np.nan_to_num(want, nan=0.0)
    out = np.full(raw.shape, -1.0, np.float32) if reuse else None
    f = read_frame(tmp_path / "a.fits", out=out)
    assert f.data.dtype == np.float32 and (f.data is out) == reuse
    np.testing.assert_array_equal(f.data, want)
    top = np.float64(want).max()
    if stored is np.uint8 and bzero == 0 and bscale == 1:
        assert f.white == 255.0                         # a camera's RAW8: saturated at its top, not at 16 bits'
    else:
        assert f.white == (65535.0 if top < 65536 else 4294967295.0)
    # a camera's unsigned 16 bit: from 65535 − FULL_SCALE_MARGIN (12- and 14-bit cameras never reach 65535)
    clip = f.white - (FULL_SCALE_MARGIN if (stored, bzero, bscale) == (np.int16, 32768, 1) else 0)
    assert (f.saturated is not None) == bool((want >= clip).any())
    if f.saturated is not None:
        np.testing.assert_array_equal(f.saturated, want >= clip)


def test_median_of_three_with_missing_values_equals_the_sorted_rule():
    """_median_rows' sorting network for three frames with NaN borders: the middle of three, the lower of two,
    the one, or NaN — exactly what sorting gives."""
    from livestack.engine.stack import _median_rows

    rng = np.random.default_rng(5)
    block = rng.normal(0, 1, (3, 200, 300)).astype(np.float32)
    block[rng.random(block.shape) < 0.4] = np.nan
    srt = np.sort(block, axis=0)
    n = np.isfinite(block).sum(axis=0)
    want = np.take_along_axis(srt, np.maximum(np.where(n == 2, 0, (n - 1) // 2), 0)[None], axis=0)[0]
    got = _median_rows(block)
    assert np.array_equal(got, want, equal_nan=True)
    assert {0, 1, 2, 3} <= set(np.unique(n).tolist())


def test_eccentricity_of_stars_too_small_to_measure_is_not_a_trail():
    """Undersampled stars (FWHM < 2 px) get eccentricities of 0.1–0.8 from pixel phase alone: no rejection for it;
    resolved stars still are rejected when elongated."""
    j = FrameJudge(RejectParams())
    for ecc in (0.30, 0.35, 0.32, 0.28, 0.33):
        j.accept(Quality(40, 3.0, ecc, 100.0, 5.0))
    assert j.check(Quality(40, 1.7, 0.75, 100.0, 5.0)) is None
    assert "eccentricity" in j.check(Quality(40, 3.1, 0.75, 100.0, 5.0))


def test_exifread_tracing_is_not_relogged_as_complaints(daemon_night, caplog):
    """With every logger at DEBUG, reading a DNG logs no "EXIF not read" lines: exifread's own tracing (a line
    per tag) is dropped, only its complaints are logged again, at DEBUG, naming the file."""
    import logging

    from livestack.engine.read import read_frame

    with caplog.at_level(logging.DEBUG):
        logging.getLogger("exifread").setLevel(logging.DEBUG)
        try:
            fr = read_frame(daemon_night[0][0])
        finally:
            logging.getLogger("exifread").setLevel(logging.NOTSET)
    assert fr.meta.exptime == 60
    assert not [r for r in caplog.records if "EXIF not read" in r.getMessage()]
    logging.getLogger("exifread").warning("File format not recognized.")      # outside a read: its own
    assert caplog.records[-1].name == "exifread"


def _masked_accumulate(sums, wsum, xs, bad_cells, weight, sat, w_sat):
    """The full-resolution accumulation as masked passes over whole planes (what _accumulate_pixels did before
    it took the left-out pixels by index): the reference its blocks must equal bit for bit."""
    c, h, w = xs.shape
    valid = np.isfinite(xs[0]) & ~np.repeat(np.repeat(bad_cells, 2, 0), 2, 1)[:h, :w]
    ys, xx = sat
    ok = valid[ys, xx]
    valid[ys, xx] = False
    wsum[ys[ok], xx[ok]] += w_sat
    for k in range(c):
        sums[k, ys[ok], xx[ok]] += w_sat * xs[k, ys[ok], xx[ok]]
    import cv2
    cv2.add(wsum, float(weight), dst=wsum, mask=valid.view(np.uint8))
    for k in range(c):
        x = np.where(valid, xs[k], np.float32(0))
        cv2.scaleAdd(x, float(weight), sums[k], dst=sums[k])


@pytest.mark.parametrize("case", ["few left out", "many left out", "none left out"])
def test_stack_pixels_left_out_by_index_equal_masked_passes(case):
    """A block's pixels outside the footprint, in rejected cells or saturated are taken out by index when they
    are few and by masks when they are many: both give the masked passes' sums and weights exactly — odd width
    and height (a last cell of one column and one row), rejected cells on those edges, saturated points."""
    rng = np.random.default_rng(21)
    c, h, w = 3, 131, 77                    # 131 rows: blocks of 64, 64 and 3 rows
    st = RunningStack((c, h, w), np.zeros(c), StackParams(bootstrap=0, saturated_weight=0.01))
    st._allocate()
    st.sums[:] = rng.normal(50, 5, st.sums.shape)
    st.wsum[:] = rng.uniform(1, 3, st.wsum.shape)
    sums, wsum = st.sums.copy(), st.wsum.copy()
    xs = rng.normal(100, 10, (c, h, w)).astype(np.float32)
    bad = np.zeros(st.cells, bool)
    sat = (np.array([], int), np.array([], int))
    if case != "none left out":
        xs[:, :, :3] = np.nan                   # a footprint's edge
        xs[:, 100:, 70:] = np.nan
        bad[[0, 5, 30, 65, 65], [0, 38, 20, 38, 3]] = True      # incl. the last row and column of cells
        sat = (np.array([1, 64, 127, 130, 10]), np.array([76, 40, 2, 50, 1]))
    if case == "many left out":
        xs[:, 64:128, :40] = np.nan             # more than an eighth of the middle block
    weight = 1.7
    _masked_accumulate(sums, wsum, xs.copy(), bad, weight, sat, np.float32(weight * 0.01))
    st._accumulate_pixels(lambda k: xs[k], bad, weight, st._points(sat))
    assert np.array_equal(st.wsum, wsum) and np.array_equal(st.sums, sums)


@pytest.mark.parametrize("counts", ["one count", "a few differ", "middle cell differs", "no count dominates"])
def test_times_table_equals_the_gather(counts):
    """x *= table[count], done as one factor for the usual count and a lookup for the others, gives exactly the
    gather's values — whichever count the middle cell has and however many cells differ."""
    from livestack.engine.stack import _times_table
    rng = np.random.default_rng(4)
    count = np.full((40, 60), 9, np.uint16)
    if counts == "no count dominates":
        count = rng.integers(0, 20, (40, 60)).astype(np.uint16)
    elif counts != "one count":
        count[rng.random((40, 60)) < 0.05] = 3
        count[20, 30] = 3 if counts == "middle cell differs" else 9     # the cell the usual count is taken from
    table = rng.uniform(0.5, 2, 65536).astype(np.float32)
    x = rng.normal(1, 0.3, (40, 60)).astype(np.float32)
    expected = x * table[count]
    where = _times_table(x, table, count)
    assert np.array_equal(x, expected)
    x2 = rng.normal(1, 0.3, (40, 60)).astype(np.float32)
    expected2 = x2 * table[::-1][count]
    _times_table(x2, table[::-1].copy(), count, where)          # the other cells found once, used again
    assert np.array_equal(x2, expected2)


def test_stack_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    """The worker threads are as many as the CPUs in the process's affinity (taskset, systemd's CPUAffinity=),
    at most 4 — not the machine's count: pinned to one core, a second thread only took turns with the first."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert StackParams().threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 3}, raising=False)
    assert StackParams().threads == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert StackParams().threads == 4
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)     # (macOS, Windows)
    assert StackParams().threads == 4
    assert StackParams(threads=3).threads == 3                      # the setting wins


def test_a_fits_time_with_its_offset_is_utc_and_a_negative_exposure_unknown(tmp_path):
    """DATE-OBS '…T21:00:00+05:00' was read as 21:00 (the offset dropped): out of capture order beside UTC
    times; EXPTIME = -5 took 5 s off the total integration."""
    import datetime as dt

    from livestack.engine.read import read_frame

    h = fits.Header()
    h["DATE-OBS"], h["EXPTIME"] = "2026-11-25T21:00:00+05:00", -5.0
    fits.PrimaryHDU(np.full((32, 32), 100, np.uint16), header=h).writeto(tmp_path / "a.fits")
    m = read_frame(tmp_path / "a.fits").meta
    assert m.time == dt.datetime(2026, 11, 25, 16, 0, 0) and m.exptime is None


@pytest.mark.parametrize("value", [1e300, 86401.0])
def test_an_exposure_longer_than_a_day_is_unknown(tmp_path, value):
    """A damaged EXPTIME (fuzzed: 1e300) was taken as read: a 300-digit integration in the summary, and a
    settings group of its own whose expected transparency was scaled by 1e298.  A day is the longest a frame is
    taken to be exposed; 60 s and a day itself are read as they are."""
    from livestack.engine.read import read_frame

    for t, want in ((value, None), (60.0, 60.0), (86400.0, 86400.0)):
        h = fits.Header()
        h["EXPTIME"] = t
        fits.PrimaryHDU(np.full((32, 32), 100, np.uint16), header=h).writeto(tmp_path / "a.fits", overwrite=True)
        assert read_frame(tmp_path / "a.fits").meta.exptime == want


@pytest.mark.parametrize("bootstrap", [3, 0])
def test_values_beyond_float16_survive_the_bootstrap(bootstrap):
    """The bootstrap buffers its frames as float16, which ends at 65504: a normalised star core of a 16-bit
    camera (×1.2 to a brighter reference) or float FITS data passed it and was clipped there — a stack of three
    frames of 70000 said 65504 (a review; 0.63–0.92 of the true value on a float night).  Also across a
    checkpoint in the bootstrap."""
    from livestack.engine.stack import RunningStack, StackParams

    def frame(v):
        img = np.full((1, 8, 8), 1000, np.float32)
        img[0, 4, 4] = v
        return img

    p = StackParams(bootstrap=bootstrap, threads=1)
    st = RunningStack((1, 8, 8), np.zeros(1), p)
    for v in (70000, 80000):
        st.add(frame(v), 1.0, np.array([10.0]))
    saved = {k: np.array(v, copy=True) for k, v in st.state().items()}     # as a checkpoint file holds it
    st.add(frame(90000), 1.0, np.array([10.0]))
    mean = st.result()[0][0, 4, 4]
    assert mean == pytest.approx(80000, rel=1e-3), mean
    again = RunningStack.from_state(saved, p)
    again.add(frame(90000), 1.0, np.array([10.0]))
    assert again.result()[0][0, 4, 4] == mean


def test_a_bootstrap_checkpoint_of_an_older_livestack_is_read_as_it_was():
    """Older checkpoints hold the buffered frames' float16 values unscaled (no f16_scale): read as they were."""
    from livestack.engine.stack import F16_SCALE, RunningStack, StackParams

    p = StackParams(bootstrap=3, threads=1)
    rng = np.random.default_rng(3)
    frames = [rng.normal(1000, 30, (1, 8, 8)).astype(np.float32) for _ in range(3)]
    st = RunningStack((1, 8, 8), np.zeros(1), p)
    for f in frames[:2]:
        st.add(f.copy(), 1.0, np.array([30.0]))
    saved = {k: np.array(v, copy=True) for k, v in st.state().items()}
    old = {k: v for k, v in saved.items() if k != "f16_scale"}
    for k in [k for k in old if k.endswith("_img")]:
        old[k] = (old[k].astype(np.float32) / F16_SCALE).astype(np.float16)    # as it was written (exact)
    results = []
    for state in (saved, old):
        s2 = RunningStack.from_state(state, p)
        s2.add(frames[2].copy(), 1.0, np.array([30.0]))
        results.append(s2.result()[0])
    np.testing.assert_array_equal(results[0], results[1])
