"""A frame made on the grid a block of rows at a time (render.py) is the whole-frame path's: debayer, then warp."""
import numpy as np
import pytest

from livestack.engine import geometry
from livestack.engine.debayer import debayer, debayer_window
from livestack.engine.grid import refine_demosaiced
from livestack.engine.normalize import normalize_inplace, normalize_mosaic
from livestack.engine.render import FrameOnGrid
from livestack.engine.stars import refine_centroids
from livestack.engine.warp import warp

H, W = 300, 420


def mosaic(seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    cfa = rng.normal(100, 10, (H, W)) + 0.05 * xx - 0.03 * yy
    for x, y in rng.uniform([8, 8], [W - 8, H - 8], (40, 2)):
        cfa += 2000 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.1 ** 2))
    return cfa.astype(np.float32)


def by_blocks(f: FrameOnGrid, rows=64):
    return np.concatenate([np.stack(f.rows(r0, min(H, r0 + rows))) for r0 in range(0, H, rows)], axis=1)


@pytest.mark.parametrize("method", ["mhc", "bilinear"])
@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
def test_debayer_window_is_the_whole_mosaics(method, pattern):
    cfa = mosaic()
    full = debayer(cfa, pattern, method)
    for rows, cols in [((0, 9), (0, W)), ((57, 99), (33, 151)), ((291, 300), (409, 420)), ((1, 2), (5, 6))]:
        win, a, p = debayer_window(cfa, pattern, method, rows, cols)
        assert a <= rows[0] and p <= cols[0]
        got = win[:, rows[0] - a:rows[1] - a, cols[0] - p:cols[1] - p]
        np.testing.assert_allclose(got, full[:, rows[0]:rows[1], cols[0]:cols[1]], rtol=0, atol=1e-3)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("angle", [0.0, 0.03, 5.0, 12.0, 45.0, 90.0, 180.0, -33.0])
def test_blocks_are_the_warped_demosaic(angle, interpolation):
    """Same values and the same footprint (NaN outside) as debayer + warp, whatever the rotation — also when a
    block is made in column segments (the steep rotations)."""
    cfa = mosaic()
    m = geometry.similarity(1.0, angle, 2.3, -1.7, center=(W / 2, H / 2))
    want = warp(debayer(cfa, "RGGB", "mhc"), m, (H, W), interpolation=interpolation)
    got = by_blocks(FrameOnGrid(cfa, m, (H, W), interpolation=interpolation, pattern="RGGB", debayer="mhc"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    inside = np.isfinite(want)
    assert inside.mean() > 0.3
    # OpenCV rounds source positions to 1/32 px from the map's own origin: a block's origin moves a few
    # positions across a rounding boundary (a difference far below the noise of 10) — and bicubic's clamp
    # (warp.clamp_below) takes the 2×2 samples from ⌊s⌋, which for a position within 1/1024 px of a whole
    # pixel may be either (measured: 2 pixels of 300 000 differ by up to 1.4 at 45°)
    assert np.abs(got - want)[inside].max() < (0.5 if interpolation == "bilinear" else 2.0)
    assert np.abs(got - want)[inside].mean() < 1e-3


@pytest.mark.parametrize("angle", [0.0, 180.0, 0.03, 5.0, 12.0, 90.0])
@pytest.mark.parametrize("planes", [False, True])
def test_compensated_blocks_are_the_whole_frames_warp(angle, planes):
    """A compensated warp's sharpening is chosen per block from the fractions it reads: the whole frame's when
    they are one (a shift, a flip, a quarter turn: the same values), their local mean under a rotation (close).
    Planes (mono, superpixel) are sharpened in the thread's memory, never in the frame."""
    cfa = mosaic()
    m = geometry.similarity(1.0, angle, 2.3, -1.7, center=(W / 2, H / 2))
    if angle in (0.0, 180.0, 90.0):
        m = np.round(m, 9)          # exact quarter turns: one fraction per axis over the frame
    img = debayer(cfa, "RGGB", "mhc")
    before = img.copy()
    want = warp(img, m, (H, W), interpolation="compensated")
    f = FrameOnGrid(img, m, (H, W), interpolation="compensated") if planes else \
        FrameOnGrid(cfa, m, (H, W), interpolation="compensated", pattern="RGGB", debayer="mhc")
    got = by_blocks(f)
    np.testing.assert_array_equal(img, before)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    inside = np.isfinite(want)
    assert inside.mean() > 0.3
    if angle in (0.0, 180.0, 90.0):
        assert np.abs(got - want)[inside].max() < 0.05
    else:       # the blocks' own mean fractions (measured: mean 0.08 at 0.03°, 0.007 at 12°); the bilinear warp
        assert np.abs(got - want)[inside].mean() < 0.25    # is 1.9 away from both


def test_on_grid_blocks_are_the_demosaic_and_planes_pass_through():
    cfa = mosaic()
    got = by_blocks(FrameOnGrid(cfa, geometry.identity(), (H, W), interpolation="bilinear", pattern="GRBG",
                                debayer="mhc"), rows=50)
    np.testing.assert_allclose(got, debayer(cfa, "GRBG", "mhc"), rtol=0, atol=1e-3)
    planes = np.stack([cfa, cfa + 1])
    f = FrameOnGrid(planes, geometry.identity(), (H, W), interpolation="bilinear")
    rows = f.rows(10, 20)
    assert all(np.shares_memory(r, planes) for r in rows)
    m = geometry.similarity(1.0, 3.0, 1.5, 0.5, center=(W / 2, H / 2))
    want = warp(planes, m, (H, W), interpolation="bilinear")
    got = by_blocks(FrameOnGrid(planes, m, (H, W), interpolation="bilinear"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) < 0.5


def test_a_block_beyond_the_frame_is_all_outside():
    cfa = mosaic()
    m = geometry.similarity(1.0, 0.0, 0.0, 250.0)        # the frame covers the last 50 grid rows only
    f = FrameOnGrid(cfa, m, (H, W), interpolation="bilinear", pattern="RGGB", debayer="bilinear")
    assert np.isnan(np.stack(f.rows(0, 64))).all()
    assert np.isfinite(np.stack(f.rows(260, 290))[:, :, :-1]).all()     # (the last column's taps leave it)


@pytest.mark.parametrize("method", ["mhc", "bilinear"])
def test_centroids_on_demosaiced_patches_are_the_whole_images(method):
    cfa = mosaic(3)
    rng = np.random.default_rng(0)
    peaks = np.argwhere(cfa > 800)                       # the stars' brightest pixels
    start = peaks[:, ::-1].astype(float) + rng.normal(0, 0.3, peaks.shape)
    want = refine_centroids(debayer(cfa, "BGGR", method), start, 2.6)
    got = refine_demosaiced(cfa, "BGGR", method, start, 2.6)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (np.abs(got - start).sum(axis=1) > 0).mean() > 0.8       # most were refined


@pytest.mark.parametrize("pattern", ["RGGB", "GBRG", "BGGR", "GRBG"])
def test_normalising_the_mosaic_then_demosaicing_is_normalising_the_demosaic(pattern):
    cfa = mosaic(5)
    plane = np.array([[50, 1e-2, -2e-2], [90, 2e-2, 1e-2], [30, -1e-2, 3e-2]])
    ref = np.array([[51, 1.1e-2, -2e-2], [88, 2.2e-2, 1e-2], [31, -1e-2, 2e-2]])
    m = geometry.similarity(1.0, 0.4, 3.0, -2.0, center=(W / 2, H / 2))
    want = debayer(cfa, pattern, "mhc")
    normalize_inplace(want, plane, 0.9, ref, m)
    got = cfa.copy()
    normalize_mosaic(got, pattern, plane, 0.9, ref, m)
    got = debayer(got, pattern, "mhc")
    # exact inside; the mosaic's reflected border rows and columns are not linear
    np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], rtol=0, atol=2e-3)


@pytest.mark.parametrize("angle", [0.0, 0.01, 30.0])
def test_a_stack_fed_by_blocks_is_the_one_fed_whole_planes(angle):
    """Through RunningStack: the bootstrap's buffer and the streaming sums, saturated points included, whether a
    frame comes as whole warped planes or as blocks (256-row squares for a rotated frame)."""
    from livestack.engine.stack import RunningStack, StackParams, bin2

    cfa = mosaic(7)
    m = geometry.similarity(1.0, angle, 1.3, -0.6, center=(W / 2, H / 2))
    f = FrameOnGrid(cfa, m, (H, W), interpolation="bilinear", pattern="RGGB", debayer="mhc")
    assert f.block_rows == (256 if angle > 1 else 64)
    results = []
    for whole in (True, False):
        st = RunningStack((3, H, W), np.array([100.0, 100, 100]), StackParams(threads=2, bootstrap=2),
                          lum_weights=[0.25, 0.5, 0.25], cell_samples=[1, 2, 1])
        for k in range(4):
            planes = warp(debayer(cfa + k, "RGGB", "mhc"), m, (H, W), interpolation="bilinear")
            cells = bin2(0.25 * planes[0] + 0.5 * planes[1] + 0.25 * planes[2])
            sat = (np.array([10, 200, 201]), np.array([50, 300, 300]))
            src = (lambda c, p=planes: p[c]) if whole else \
                FrameOnGrid(cfa + k, m, (H, W), interpolation="bilinear", pattern="RGGB", debayer="mhc")
            st.add_channels(cells, src, 1.0 + k, np.full(3, 10.0), saturated=sat)
        results.append(st.result())
        st.close()
    (a, wa), (b, wb) = results
    np.testing.assert_array_equal(wa, wb)
    assert np.abs(a - b).max() < 0.5 and np.abs(a - b).mean() < 1e-3     # (OpenCV's 1/32 px rounding, above)


@pytest.mark.parametrize("angle", [0.0, 0.02, 12.0, 180.0])
@pytest.mark.parametrize("interpolation", ["compensated", "bilinear"])
@pytest.mark.parametrize("signal", [False, True])
def test_superpixel_windows_are_the_whole_superpixel_image(angle, interpolation, signal):
    """A superpixel frame is made a window at a time from the mosaic, each normalised as it is made: the same
    values, bit for bit, as the whole superpixel image normalised and rendered as planes — on the grid (the
    reference), shifted, rotated, flipped; with the sharpening everywhere and only where there is signal."""
    from livestack.engine.normalize import Normalisation
    from livestack.engine.render import signal_cells

    cfa = mosaic(3)
    h, w = H // 2, W // 2
    plane = np.array([[100.0, 0.02, -0.01], [98.0, 0.01, 0.0], [103.0, 0.0, 0.015]])
    ref_plane = plane + np.array([[5.0, 0.001, 0.0], [-3.0, 0.0, 0.002], [1.0, 0.0, 0.0]])
    m = geometry.identity() if angle == 0.0 else \
        geometry.similarity(1.0, angle, 1.37, -0.61, center=(w / 2, h / 2))
    planes = debayer(cfa, "RGGB", "superpixel")
    lum = planes.mean(axis=0)
    sig = signal_cells(lum) if signal else None
    assert sig is None or 0 < (sig > 0).mean() < 0.5
    normalize_inplace(planes, plane, 0.9, ref_plane, m)
    want = np.concatenate([np.stack(r) for r in _all_rows(FrameOnGrid(
        planes, m, (h, w), interpolation=interpolation, signal=sig, signal_step=2), h)], axis=1)
    f = FrameOnGrid(cfa, m, (h, w), interpolation=interpolation, pattern="RGGB", debayer="superpixel",
                    signal=sig, signal_step=2, normalise=Normalisation(plane, 0.9, ref_plane, m, (h, w)))
    got = np.concatenate([np.stack(r) for r in _all_rows(f, h)], axis=1)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).mean() > 0.5


def _all_rows(f: FrameOnGrid, h: int):
    """Every block of ``f``'s rows, copied (a block is the thread's memory until its next one)."""
    return [[r.copy() for r in f.rows(r0, min(h, r0 + f.block_rows))] for r0 in range(0, h, f.block_rows)]
