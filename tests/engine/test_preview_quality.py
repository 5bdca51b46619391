"""The preview's look, measured on the rendered image's statistics (no stored images)."""
from __future__ import annotations

import numpy as np

from livestack.engine.stretch import StretchParams, auto_stretch


def noisy_colour_sky(rng, h=400, w=500, skies=(900.0, 1000.0, 800.0), noise=(14.0, 14.0, 13.0)):
    """A colour stack's sky: each channel its own level and independent noise (a demosaiced stack's R, G, B),
    with a few stars."""
    yy, xx = np.mgrid[0:h, 0:w]
    stars = np.zeros((h, w))
    for _ in range(40):
        x, y, f = rng.uniform(10, w - 10), rng.uniform(10, h - 10), rng.uniform(2e3, 2e5)
        stars += f / (2 * np.pi * 1.5 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
    return np.stack([s + stars * k + rng.normal(0, n, (h, w))
                     for s, n, k in zip(skies, noise, (1.0, 1.1, 0.9))]).astype(np.float32)


def test_colour_background_is_not_crushed_to_black():
    """The black point is 2.8 σ below the sky in each channel, not 2.8 σ of the luminance (the channels' mean,
    whose noise is ~1/√3 of theirs): a Seestar stack's preview had 9.6 % of its blue pixels at 0."""
    img = noisy_colour_sky(np.random.default_rng(3))
    out = auto_stretch(img, StretchParams())
    zero = (out == 0).mean(axis=(0, 1))
    assert np.all(zero < 0.006), zero          # a Gaussian sky clips 0.26 % at 2.8 σ (before: 4–5 %)
    assert np.all(np.abs(np.median(out.reshape(-1, 3), axis=0) - 51) <= 2)   # the sky stays at the target


def test_mono_black_point_unchanged():
    """A mono image's luminance is its one channel: 2.8 σ of it, ~0.26 % of a Gaussian sky at 0."""
    rng = np.random.default_rng(4)
    img = noisy_colour_sky(rng)[:1]
    zero = (auto_stretch(img, StretchParams())[..., 0] == 0).mean()
    assert 0.0005 < zero < 0.006, zero


def test_preview_keeps_its_size_through_the_bootstrap():
    """The reduced copy the preview is drawn from has one size from the first frame on: in the bootstrap it is
    made from subsampled frames (a 6000 × 4000 frame's preview was 1600 × 1067 for the first frames, then
    1500 × 1000; here a 1600 × 1200 frame at max_size 427: 427 × 320, then 400 × 300)."""
    from livestack.engine.stack import RunningStack, StackParams

    rng = np.random.default_rng(9)
    st = RunningStack((3, 1200, 1600), np.array([100.0, 100, 100]), StackParams(bootstrap=3))
    shapes, means = [], []
    for _ in range(4):
        st.add(rng.normal(100, 10, (3, 1200, 1600)).astype(np.float32), 1.0, np.array([10.0, 10, 10]))
        mean, wsum = st.reduced(427)
        shapes.append((mean.shape, wsum.shape))
        means.append(float(np.nanmean(mean)))
    assert shapes == [((3, 300, 400), (300, 400))] * 4, shapes
    assert np.allclose(means, 100, atol=0.5)
