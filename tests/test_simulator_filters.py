"""drivers.simulator's filter wheel: filters cycled frame by frame, what each filter passes, and the truth
(true_signal, nebula_truth, nebula_knots) that the per-filter stacks and the colour composite are checked against."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import sep
from astropy.io import fits

from drivers.simulator import (LINES, Passband, SimConfig, canonical_filter, hot_pixels, invert_affine, nebula_knots,
                               nebula_truth, render_calibration, render_frame, render_night, sky_field, true_signal)
from drivers.simulator.__main__ import main as cli_main

SMALL = dict(width=400, height=300)
WHEEL = ("L", "R", "G", "B", "Ha", "OIII", "SII")


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("kw, index, digest", [
    # sha256 of the raw pixels, computed with the simulator before it had a filter wheel (numpy 2's PCG64,
    # scipy's erf and OpenCV's resize: another version of these may change them)
    (dict(SMALL, mono=True, dither_px=3.0, rotation_deg=0.3), 2, "998855c81c087a02"),
    (dict(SMALL, dither_px=2.0, defects={1: "cosmic"}), 1, "f0280a5c78a39d76"),
    # `filter` alone is a label: the sky stays unfiltered
    (dict(width=320, height=240, mono=True, filter="Ha"), 1, "94bba1f847c7cf7f"),
])
def test_no_wheel_renders_the_same_pixels_as_before(kw, index, digest):
    cfg = SimConfig(**kw)
    raw, meta = render_frame(cfg, index)
    assert hashlib.sha256(raw.tobytes()).hexdigest()[:16] == digest
    assert meta["filter"] == cfg.filter_name and meta["exptime"] == 60.0


def test_the_wheel_changes_the_light_not_the_seeing_drift_or_dither():
    plain = SimConfig(**SMALL, mono=True, dither_px=3.0, rotation_deg=0.2)
    wheel = SimConfig(**SMALL, mono=True, dither_px=3.0, rotation_deg=0.2, filters=("L", "Ha"))
    for i in (0, 1):
        _, a = render_frame(plain, i)
        _, b = render_frame(wheel, i)
        for key in ("frame_to_sky", "fwhm", "transparency", "dither"):
            assert a[key] == b[key], key
    # the L filter passes what no wheel does, except the nebula, which is drawn as emission lines
    flat_sky = dict(SMALL, mono=True, nebula=False)
    assert np.array_equal(render_frame(SimConfig(**flat_sky), 0)[0],
                          render_frame(SimConfig(**flat_sky, filters=("L",)), 0)[0])


def test_filters_cycle_into_headers_file_names_exposures_and_times(tmp_path):
    wheel = ("L", "R", "G", "B", "H-alpha", "OIII", "SII")
    cfg = SimConfig(**SMALL, n_frames=9, mono=True, filters=wheel, filter_exptime={"sii": 240.0}, n_stars=50)
    truth = render_night(tmp_path, cfg)
    expect = [("L", 60), ("R", 60), ("G", 60), ("B", 60), ("H-alpha", 180), ("OIII", 180), ("SII", 240),
              ("L", 60), ("R", 60)]
    names = [f"light_{i:04d}_{t}s_{f}.fits" for i, (f, t) in enumerate(expect)]
    assert sorted(p.name for p in tmp_path.glob("*.fits")) == names
    assert [(f["file"], f["filter"], f["exptime"]) for f in truth["frames"]] == \
        [(n, f, float(t)) for n, (f, t) in zip(names, expect)]
    for name, (f, t) in zip(names, expect):
        h = fits.getheader(tmp_path / name)
        assert (h["FILTER"], h["EXPTIME"]) == (f, t)
    # each frame starts after the ones before it and a 2 s gap: 4 × 62 + 182 + 182 s before frame 6
    assert truth["frames"][6]["time"] == "2026-11-25T21:10:12"
    assert truth["config"]["filters"] == list(wheel) and truth["config"]["filter_exptime"] == {"sii": 240.0}
    assert json.loads((tmp_path / "truth.json").read_text()) == truth


@pytest.mark.parametrize("spelling, canon", [
    ("lum", "L"), ("Luminance", "L"), ("Red", "R"), ("green", "G"), ("BLUE", "B"), ("H-alpha", "Ha"),
    ("Halpha", "Ha"), ("Ha 7nm", "Ha"), ("O3", "OIII"), ("oiii", "OIII"), ("S2", "SII"), ("S-II", "SII"),
    ("L-eXtreme", "HaOIII"), ("L-eNhance", "HaOIII"), ("DualBand", "HaOIII"), ("Ha+OIII", "HaOIII"),
])
def test_common_spellings_are_accepted(spelling, canon):
    assert canonical_filter(spelling) == canon
    assert SimConfig(filters=(spelling,)).passband(0).name == canon


def test_bad_wheels_are_refused_with_the_name():
    with pytest.raises(ValueError, match="'Hbeta' unknown"):
        SimConfig(filters=("L", "Hbeta"))
    with pytest.raises(ValueError, match="'UV' unknown"):
        SimConfig(filters=("L",), filter_exptime={"UV": 60.0})
    with pytest.raises(ValueError, match="must be > 0"):
        SimConfig(filters=("Ha",), filter_exptime={"Ha": 0})
    with pytest.raises(ValueError, match="one filter named twice"):
        SimConfig(filters=("Ha",), filter_exptime={"Ha": 300, "H-alpha": 240})
    with pytest.raises(ValueError, match="set one, not both"):
        SimConfig(filter="L", filters=("L",))
    with pytest.raises(ValueError, match="a sequence of names"):
        SimConfig(filters="LRGB")
    with pytest.raises(ValueError, match="not an emission line"):
        nebula_truth(SimConfig(), "R")


def test_narrowband_is_three_times_longer_and_its_sky_16_to_18_times_darker_per_second():
    cfg = SimConfig(**SMALL, mono=True, filters=WHEEL, nebula=False, n_stars=50)
    rate = {}
    for i, f in enumerate(WHEEL):
        raw, meta = render_frame(cfg, i)
        assert meta["exptime"] == (180.0 if Passband.of(f).narrowband else 60.0)
        t = meta["exptime"]
        rate[f] = (np.median(raw) - cfg.bias - cfg.dark_rate * t) / t     # sky e-/s, through the flat
        assert meta["sky"] / t == pytest.approx(rate[f], rel=0.03)
    # measured: L/R 2.95, L/G 3.06, L/B 3.06, L/Ha 16.8, L/OIII 16.1, L/SII 17.8
    for f in ("R", "G", "B"):
        assert rate["L"] / rate[f] == pytest.approx(3.0, abs=0.15)
    for f in ("Ha", "OIII", "SII"):
        assert 10 < rate["L"] / rate[f] < 20


def detected_stars(cfg: SimConfig, index: int) -> tuple[int, np.ndarray]:
    """Sources in light `index` found as the engine finds them (sep, 5σ, 5 px, default kernel; hot pixels
    patched): (number matching a true star within 2 px, (K, 2) sky positions of the others)."""
    raw, meta = render_frame(cfg, index)
    img = raw.astype(np.float32) - cfg.bias
    hot = hot_pixels(cfg)
    img[hot[:, 1], hot[:, 0]] = np.median(img)
    bkg = sep.Background(img, bw=64, bh=64, fw=3, fh=3)
    obj = sep.extract(img - bkg.back(), 5.0, err=bkg.globalrms, minarea=5, filter_kernel=sep.default_kernel)
    inv = invert_affine(np.array(meta["frame_to_sky"]))
    xy = sky_field(cfg).xy @ inv[:, :2].T + inv[:, 2]
    near = np.hypot(obj["x"][:, None] - xy[None, :, 0], obj["y"][:, None] - xy[None, :, 1]).min(axis=1) < 2
    m = np.array(meta["frame_to_sky"])
    return int(near.sum()), np.column_stack([obj["x"][~near], obj["y"][~near]]) @ m[:, :2].T + m[:, 2]


def test_narrowband_shows_a_third_of_the_stars_of_L_and_the_halpha_knots():
    # The default 800×600 night (n_stars 400: ~206 in the frame), seed 1, at the engine's 5σ. Measured:
    # L 49, R 29, G 36, B 33, Hα 19, [OIII] 18, [SII] 13 true stars (at 3σ: L 80, Hα 28, [OIII] 23, [SII] 23;
    # with n_stars 1600 at 5σ: L 178, Hα 59, [OIII] 52, [SII] 45). Narrowband passes 0.09 of the continuum in
    # 3× the exposure over 0.18 of the sky: as an L star 4.7× fainter, and N(>F) ∝ F^-0.8 leaves 4.7^-0.8 ≈ 0.3.
    cfg = SimConfig(mono=True, filters=WHEEL, dither_px=3.0)
    found = {f: detected_stars(cfg, i) for i, f in enumerate(WHEEL)}
    n = {f: v[0] for f, v in found.items()}
    assert 35 <= n["L"] <= 60
    for f in ("R", "G", "B"):
        assert 0.5 * n["L"] <= n[f] < n["L"]
    for f in ("Ha", "OIII", "SII"):
        assert 10 <= n[f] <= 0.45 * n["L"], (f, n)
    # what else Hα finds is its knots (measured: 5 sources, each within a knot's FWHM of its centre)
    knots = nebula_knots(cfg)
    assert knots.shape == (6, 4) and (knots[:, 2] >= knots[:, 3]).all() and (knots[:, 2] >= 20).all()
    extra = found["Ha"][1]
    d = np.hypot(extra[:, None, 0] - knots[None, :, 0], extra[:, None, 1] - knots[None, :, 1])
    on_knot = d.min(axis=1) < knots[d.argmin(axis=1), 2]
    assert on_knot.sum() >= 3 and on_knot.mean() >= 0.75


def test_lines_differ_in_structure_and_broadband_filters_pass_their_lines():
    for seed in (1, 2, 3):
        cfg = SimConfig(**SMALL, mono=True, seed=seed, n_stars=0, filters=WHEEL)
        line = {name: nebula_truth(cfg, name) for name in LINES}
        # measured (Hα-[OIII], Hα-[SII], [OIII]-[SII]): seed 1 (-0.24, -0.11, -0.15), 2 (-0.22, 0.07, -0.15),
        # 3 (-0.30, 0.03, -0.08); ≤ 0.23 over seeds 1–40 at 400×300, 600×600, 800×600 and 1200×400
        for a, b in (("Ha", "OIII"), ("Ha", "SII"), ("OIII", "SII")):
            assert corr(line[a], line[b]) < 0.3, (seed, a, b)
        assert line["Ha"].dtype == np.float32 and line["Ha"].shape == (300, 400)
        assert line["Ha"].max() > line["OIII"].max() > line["SII"].max() > 0
        # no stars (n_stars 0): what a filter sees is its lines, × its exposure / exptime
        expect = {"L": line["Ha"] + line["OIII"] + line["SII"], "R": line["Ha"] + line["SII"],
                  "G": 0.5 * line["OIII"], "B": 0.5 * line["OIII"],
                  "Ha": 3 * line["Ha"], "OIII": 3 * line["OIII"], "SII": 3 * line["SII"]}
        for f, e in expect.items():
            np.testing.assert_allclose(true_signal(cfg, f), e, atol=1e-3 * float(e.max()))


def test_narrowband_nebula_stands_above_the_narrowband_sky_noise():
    cfg = SimConfig(mono=True, filters=("Ha", "OIII", "SII"))
    for i, name in enumerate(LINES):
        _, meta = render_frame(cfg, i)
        noise = np.sqrt(meta["sky"] + cfg.dark_rate * meta["exptime"] + cfg.read_noise ** 2)   # e- per frame
        peak = float(nebula_truth(cfg, name).max()) * meta["exptime"] / cfg.exptime
        # measured: Hα 10.5 (on a knot), [OIII] 5.9, [SII] 3.1 × the per-frame noise
        assert 2.5 < peak / noise < 15, (name, peak / noise)


def test_true_signal_is_what_frame_0_sees_without_sky_flat_and_noise():
    # frame 0 minus the same frame without stars and nebula (same sky, dark, per-frame draws) is stars + nebula;
    # 10 s (and for L 4 e-/ADU) keeps the brightest star below saturation
    bare = dict(SMALL, mono=True, exptime=10.0, vignetting=0.0, n_dust=0, prnu=0.0, n_hot=0)
    for f in ("L", "Ha", "SII"):
        gain = 4.0 if f == "L" else 1.0
        cfg = SimConfig(**bare, gain=gain, filters=(f,))
        raw, meta = render_frame(cfg, 0, noise=False)
        empty, _ = render_frame(SimConfig(**bare, gain=gain, filters=(f,), n_stars=0, nebula=False), 0,
                                noise=False)
        assert raw.max() < cfg.white
        img = (raw.astype(np.float64) - empty) * cfg.gain
        truth = true_signal(cfg, f)
        assert truth.dtype == np.float32 and truth.shape == (300, 400)
        # measured: correlation 0.9997 (L), 0.9998 (Hα), 0.9993 ([SII]) although frame 0's seeing is the
        # nominal ±10 %; sums 1.0018, 1.0001, 0.9997 × its transparency (0.995)
        assert corr(img, truth) > 0.995, f
        assert img.sum() / truth.sum() == pytest.approx(meta["transparency"], rel=0.005)
        np.testing.assert_allclose(true_signal(cfg, f, exptime=1.0) * meta["exptime"], truth, rtol=1e-4,
                                   atol=1e-3)


def test_dual_band_colour_camera_sees_halpha_in_red_and_oiii_in_green_and_blue():
    cfg = SimConfig(**SMALL, filters=("L", "L-eXtreme"), n_stars=0)
    assert Passband.of("L-eXtreme").name == "HaOIII" and cfg.light_exptime(1) == 180.0
    sig = true_signal(cfg, "L-eXtreme", exptime=60.0)
    assert sig.dtype == np.float32 and sig.shape == (3, 300, 400)
    ha, oiii = nebula_truth(cfg, "Ha"), nebula_truth(cfg, "OIII")
    np.testing.assert_allclose(sig[0], 3 * ha, atol=1e-3 * float(ha.max()) * 3)
    np.testing.assert_allclose(sig[1], 1.5 * oiii, atol=1e-3 * float(oiii.max()) * 3)
    np.testing.assert_allclose(sig[2], sig[1], atol=1e-3)
    # in the raw frame (minus the same frame without a nebula): R sites follow Hα, G and B sites [OIII]
    raw, meta = render_frame(cfg, 1, noise=False)
    assert meta["filter"] == "L-eXtreme" and meta["exptime"] == 180.0
    img = raw.astype(np.float64) - render_frame(SimConfig(**SMALL, filters=("L", "L-eXtreme"), n_stars=0,
                                                          nebula=False), 1, noise=False)[0]
    assert corr(img[0::2, 0::2], ha[0::2, 0::2]) > 0.9 > 0.1 > corr(img[0::2, 0::2], oiii[0::2, 0::2])
    assert corr(img[1::2, 1::2], oiii[1::2, 1::2]) > 0.9 > 0.1 > corr(img[1::2, 1::2], ha[1::2, 1::2])
    # sky: R sites 0.18, G and B sites 0.09 of L's per second; their mean 0.12 (measured from the pixels)
    dark = SimConfig(**SMALL, filters=("L", "HaOIII"), n_stars=0, nebula=False)
    per_s = []
    for i in (0, 1):
        raw, meta = render_frame(dark, i)
        e = (raw.astype(np.float64) - dark.bias - dark.dark_rate * meta["exptime"]) / meta["exptime"]
        per_s.append([np.median(e[r::2, c::2]) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))])
    ratio = np.array(per_s[1]) / np.array(per_s[0])
    assert ratio == pytest.approx([0.18, 0.09, 0.09, 0.09], abs=0.01)
    assert 0.08 < (ratio[0] + ratio[1] + ratio[3]) / 3 < 0.15


def test_colour_camera_behind_a_red_or_halpha_filter_sees_it_in_red_pixels_only():
    cfg = SimConfig(**SMALL, filters=("R", "Ha"), nebula=False)
    for f in ("R", "Ha"):
        sig = true_signal(cfg, f)
        assert sig[0].max() > 0 and sig[1].max() == 0 and sig[2].max() == 0
    assert true_signal(cfg, "Ha")[0].sum() == pytest.approx(0.09 * 3 * true_signal(cfg, "R")[0].sum(), rel=1e-4)


def test_cli_and_calibration_with_a_wheel(tmp_path, capsys):
    out = tmp_path / "night"
    rc = cli_main([str(out), "--frames", "3", "--width", "64", "--height", "48", "--mono", "--filters", "L, Ha",
                   "--filter-exptime", "Ha:120", "--dither-px", "3"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    truth = json.loads((out / "truth.json").read_text())
    assert [f["file"] for f in truth["frames"]] == ["light_0000_60s_L.fits", "light_0001_120s_Ha.fits",
                                                    "light_0002_60s_L.fits"]
    assert cli_main([str(out), "--filters", "L,Hb"]) == 2
    assert "'Hb' unknown" in capsys.readouterr().err
    assert cli_main([str(out), "--filters", "Ha", "--filter-exptime", "Ha=300"]) == 2
    cfg = SimConfig(width=64, height=48, mono=True, filters=("L", "Ha", "L"))
    files = render_calibration(tmp_path / "cal", cfg, n_bias=1, n_dark=1, n_flat=2, n_darkflat=1)
    assert [p.name for p in files["flats"]] == ["flat_0000_1s_L.fits", "flat_0001_1s_L.fits",
                                                "flat_0002_1s_Ha.fits", "flat_0003_1s_Ha.fits"]
    assert [fits.getheader(p).get("FILTER") for p in files["flats"]] == ["L", "L", "Ha", "Ha"]
    assert "FILTER" not in fits.getheader(files["darks"][0]) and files["bias"][0].name == "bias_0000_0s.fits"
