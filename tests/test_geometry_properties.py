"""Property tests for livestack.engine.geometry: algebra of (2, 3) affine transforms and exact fits."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livestack.engine import geometry as geo

coord = st.floats(-5000.0, 5000.0, allow_nan=False)
angle = st.floats(-180.0, 180.0, allow_nan=False)
scale = st.floats(0.5, 2.0, allow_nan=False)


@st.composite
def affines(draw):
    """Well-conditioned affines: a similarity times a mild shear/anisotropic scale (det > 0, cond < ~3)."""
    sim = geo.similarity(draw(scale), draw(angle), draw(coord), draw(coord))
    sx, sy = draw(st.floats(0.7, 1.4)), draw(st.floats(0.7, 1.4))
    sh = draw(st.floats(-0.3, 0.3))
    return geo.compose(sim, np.array([[sx, sh, 0.0], [0.0, sy, 0.0]]))


@st.composite
def points(draw, n_min=1, n_max=30):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    n = draw(st.integers(n_min, n_max))
    return np.random.default_rng(seed).uniform(-3000.0, 3000.0, size=(n, 2))


@given(affines())
def test_invert_then_compose_is_identity(m):
    np.testing.assert_allclose(geo.compose(geo.invert(m), m), geo.identity(), atol=1e-9)
    np.testing.assert_allclose(geo.compose(m, geo.invert(m)), geo.identity(), atol=1e-9)


@given(affines(), affines(), points())
def test_compose_is_apply_twice(a, b, xy):
    np.testing.assert_allclose(geo.apply(geo.compose(a, b), xy), geo.apply(a, geo.apply(b, xy)),
                               rtol=1e-12, atol=1e-6)


@given(affines())
def test_3x3_round_trip(m):
    np.testing.assert_array_equal(geo.from3x3(geo.to3x3(m)), m)
    np.testing.assert_allclose(geo.to3x3(geo.compose(m, m)), geo.to3x3(m) @ geo.to3x3(m), rtol=1e-12, atol=1e-9)


@given(affines(), points(n_min=3, n_max=50))
def test_fit_affine_recovers_noiseless(m, xy):
    sv = np.linalg.svd(xy - xy.mean(axis=0), compute_uv=False)
    if sv[1] < 1e-3 * sv[0]:        # (nearly) collinear points determine no affine
        return
    fit = geo.fit_affine(xy, geo.apply(m, xy))
    # Exact up to float rounding, judged where it matters: the mapped points (px).
    np.testing.assert_allclose(geo.apply(fit, xy), geo.apply(m, xy), atol=1e-6)
    np.testing.assert_allclose(fit[:, :2], m[:, :2], atol=1e-8)


@given(scale, angle, coord, coord, points(n_min=2, n_max=50), st.booleans())
def test_fit_similarity_recovers_noiseless(s, ang, tx, ty, xy, weighted):
    if np.ptp(xy, axis=0).max() < 1.0:
        return
    m = geo.similarity(s, ang, tx, ty)
    w = np.linspace(0.5, 2.0, len(xy)) if weighted else None
    fit = geo.fit_similarity(xy, geo.apply(m, xy), weights=w)
    np.testing.assert_allclose(geo.apply(fit, xy), geo.apply(m, xy), atol=1e-6)
    assert np.linalg.det(fit[:, :2]) > 0


@given(points(n_min=3, n_max=30))
def test_fit_similarity_never_reflects(xy):
    if np.ptp(xy, axis=0).min() < 1.0:
        return
    mirrored = xy * np.array([-1.0, 1.0])
    fit = geo.fit_similarity(xy, mirrored)
    assert np.linalg.det(fit[:, :2]) >= 0


@given(scale, angle, coord, coord, coord, coord)
def test_decompose_round_trips_similarity(s, ang, tx, ty, cx, cy):
    m = geo.similarity(s, ang, tx, ty, center=(cx, cy))
    dx, dy, rot, sc = geo.decompose(m, center=(cx, cy))
    assert abs(dx - tx) <= 1e-6 and abs(dy - ty) <= 1e-6
    assert abs(sc - s) <= 1e-12
    assert -180.0 < rot <= 180.0
    d = (rot - ang + 180.0) % 360.0 - 180.0      # -180 and 180 are the same angle
    assert abs(d) <= 1e-9 or abs(abs(d) - 360.0) <= 1e-9


@given(affines())
def test_rms_error_zero_for_same_and_shift_for_shifted(m):
    assert geo.rms_error(m, m, (600, 800)) <= 1e-9
    shifted = geo.compose(geo.similarity(1.0, 0.0, 0.3, 0.4), m)
    assert abs(geo.rms_error(shifted, m, (600, 800)) - 0.5) <= 1e-9


def test_rms_error_rotation_about_centre():
    # 0.1° about the centre of an 800 × 600 frame: points move r × 0.1° (rad); RMS r over the grid ~ 288 px.
    h, w = 600, 800
    m = geo.similarity(1.0, 0.1, 0.0, 0.0, center=((w - 1) / 2, (h - 1) / 2))
    gx, gy = np.meshgrid(np.linspace(0, w - 1, 21), np.linspace(0, h - 1, 21))
    r_rms = math.sqrt(np.mean((gx - (w - 1) / 2) ** 2 + (gy - (h - 1) / 2) ** 2))
    expect = 2 * math.sin(math.radians(0.1) / 2) * r_rms
    assert abs(geo.rms_error(m, geo.identity(), (h, w)) - expect) <= 1e-9


def test_invert_singular_raises():
    with pytest.raises(ValueError, match="singular"):
        geo.invert(np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]))


@given(affines(), points())
def test_halved_is_the_same_map_between_cell_grids(m, xy):
    """Cell u of a 2×2-binned grid sits at pixel 2u + 0.5: halved(m) maps cells where m maps their centres."""
    cells = (xy - 0.5) / 2.0
    np.testing.assert_allclose(geo.apply(geo.halved(m), cells), (geo.apply(m, xy) - 0.5) / 2.0, atol=1e-6)
