"""drivers.simulator: the truth it claims is the truth in its pixels and files."""
from __future__ import annotations

import json
import math

import exifread
import numpy as np
import pytest
import rawpy
from astropy.io import fits

from drivers.simulator import (SimConfig, frame_to_sky, hot_pixels, invert_affine, render_calibration,
                               render_frame, render_night, sky_field, true_flat)
from drivers.simulator.__main__ import main as cli_main
from drivers.simulator.camera import stamp_stars

SMALL = dict(width=320, height=240)


def frame_positions(cfg: SimConfig, meta: dict) -> np.ndarray:
    """(N, 2) frame positions of the sky's stars in this frame, from the truth matrix."""
    inv = invert_affine(np.array(meta["frame_to_sky"]))
    return sky_field(cfg).xy @ inv[:, :2].T + inv[:, 2]


def isolated_stars(cfg: SimConfig, meta: dict, *, border: int, min_sep: float) -> np.ndarray:
    """Indices of stars inside the frame by `border` px with no other star within `min_sep` px."""
    xy = frame_positions(cfg, meta)
    inside = ((xy[:, 0] > border) & (xy[:, 0] < cfg.width - 1 - border)
              & (xy[:, 1] > border) & (xy[:, 1] < cfg.height - 1 - border))
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return np.flatnonzero(inside & (d.min(axis=1) > min_sep))


def box_flux(img: np.ndarray, x: float, y: float, h: int) -> float:
    """Flux in a (2h+1)² box minus the box border's median per pixel."""
    xi, yi = int(round(x)), int(round(y))
    box = img[yi - h:yi + h + 1, xi - h:xi + h + 1].astype(np.float64)
    edge = np.concatenate([box[0], box[-1], box[1:-1, 0], box[1:-1, -1]])
    return float((box - np.median(edge)).sum())


def test_frame0_of_default_config_is_identity():
    cfg = SimConfig()
    assert np.array_equal(frame_to_sky(cfg, 0), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    _, meta = render_frame(cfg, 0)
    assert meta["frame_to_sky"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_frame_to_sky_composes_rotation_drift_and_flip():
    cfg = SimConfig(rotation_deg=0.5, flip_at=4, drift_px=(0.7, -0.4))
    centre = np.array([(cfg.width - 1) / 2, (cfg.height - 1) / 2, 1.0])
    m3 = frame_to_sky(cfg, 3)
    # the centre moves by the drift only; a step of +x turns by 1.5°
    assert np.allclose(m3 @ centre, centre[:2] + [2.1, -1.2], atol=1e-12)
    step = m3[:, :2] @ [1.0, 0.0]
    assert math.degrees(math.atan2(step[1], step[0])) == pytest.approx(1.5, abs=1e-12)
    step = frame_to_sky(cfg, 4)[:, :2] @ [1.0, 0.0]
    assert math.degrees(math.atan2(step[1], step[0])) % 360 == pytest.approx(182.0, abs=1e-9)


def test_star_centroids_match_truth_in_rotated_shifted_flipped_frame():
    # no sky, dark or hot pixels, and no noise: what is left is the stars through the flat's 0.5 % PRNU
    cfg = SimConfig(**SMALL, mono=True, rotation_deg=0.7, flip_at=5, dither_px=3.0, sky_level=0.0,
                    nebula=False, dark_rate=0.0, n_hot=0, n_dust=0, vignetting=0.0, n_stars=300)
    raw, meta = render_frame(cfg, 7, noise=False)
    assert meta["dither"] != [0.0, 0.0]
    img = raw.astype(np.float64) - cfg.bias
    xy = frame_positions(cfg, meta)
    flux = sky_field(cfg).rate * cfg.exptime * meta["transparency"]
    picks = [i for i in isolated_stars(cfg, meta, border=10, min_sep=16) if 3e3 < flux[i] < 1e5]
    assert len(picks) >= 5
    h = 7
    ys, xs = np.mgrid[-h:h + 1, -h:h + 1]
    for i in picks:
        x, y = xy[i]
        xi, yi = int(round(x)), int(round(y))
        box = img[yi - h:yi + h + 1, xi - h:xi + h + 1]
        cx = xi + (box * xs).sum() / box.sum()
        cy = yi + (box * ys).sum() / box.sum()
        assert abs(cx - x) < 0.05 and abs(cy - y) < 0.05, (i, cx - x, cy - y)


def test_stamps_equal_slow_full_frame_reference():
    rng = np.random.default_rng(3)
    h, w, sigma = 40, 50, 1.3
    xy = np.column_stack([rng.uniform(-3, w + 2, 12), rng.uniform(-3, h + 2, 12)])  # some off the edges
    flux = rng.uniform(100, 1000, 12)
    rgb = rng.uniform(0.5, 1.5, (12, 3)).astype(np.float32)
    fast = np.zeros((h, w), np.float32)
    stamp_stars(fast, xy, flux, rgb, sigma, mono=False)

    def cdf(v):
        return np.array([0.5 * (1 + math.erf(t / (math.sqrt(2) * sigma))) for t in v])
    slow = np.zeros((h, w))
    cols, rows = np.arange(w), np.arange(h)
    chan = (rows[:, None] % 2) + (cols[None, :] % 2)   # RGGB: 0 R, 1 G, 2 B
    for (x, y), f, c in zip(xy, flux, rgb):
        px = cdf(cols + 0.5 - x) - cdf(cols - 0.5 - x)
        py = cdf(rows + 0.5 - y) - cdf(rows - 0.5 - y)
        slow += f * np.outer(py, px) * c[chan]
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=1e-3 * flux.max() * 0.1)


def test_same_config_renders_identical_pixels():
    cfg = SimConfig(**SMALL, rotation_deg=0.3, dither_px=2.0, defects={2: "cosmic"})
    a, ma = render_frame(cfg, 2)
    b, mb = render_frame(cfg, 2)
    assert a.dtype == np.uint16 and a.shape == (240, 320)
    assert np.array_equal(a, b) and ma == mb
    c, _ = render_frame(SimConfig(**SMALL, seed=2, rotation_deg=0.3, dither_px=2.0), 2)
    assert not np.array_equal(a, c)


def test_cloudy_frame_has_brighter_sky_and_fainter_stars():
    # 300 s: the same sky per frame, 5× the starlight, so enough stars stand well above the sky noise
    cfg = SimConfig(**SMALL, defects={3: "cloudy"}, n_stars=300, exptime=300.0)
    clear, mc = render_frame(cfg, 2)
    cloudy, md = render_frame(cfg, 3)
    assert md["defect"] == "cloudy" and mc["defect"] is None
    assert np.median(cloudy) - cfg.bias > 2.0 * (np.median(clear) - cfg.bias)
    flux = sky_field(cfg).rate * cfg.exptime
    ratios = []
    for i in isolated_stars(cfg, md, border=12, min_sep=20):
        if 1.5e4 < flux[i] < 1.2e5:   # bright, unsaturated
            fc = box_flux(clear, *frame_positions(cfg, mc)[i], 8)
            fd = box_flux(cloudy, *frame_positions(cfg, md)[i], 8)
            ratios.append(fd / fc)
    assert len(ratios) >= 3
    assert np.median(ratios) == pytest.approx(md["transparency"] / mc["transparency"], abs=0.08)
    assert np.median(ratios) < 0.4


def test_hot_pixels_are_bright_in_a_dark_at_the_returned_positions():
    cfg = SimConfig(**SMALL, n_hot=40)
    hot = hot_pixels(cfg)
    assert hot.shape == (40, 2) and np.array_equal(hot, hot_pixels(SimConfig(**SMALL, n_hot=40, n_frames=3)))
    dark, meta = render_frame(cfg, 0, kind="dark")
    assert meta["imagetyp"] == "Dark Frame" and meta["exptime"] == 60.0
    # 50–500 e-/s × 60 s ≫ the ~3.5 e- of dark-current and read noise elsewhere
    assert (dark[hot[:, 1], hot[:, 0]] > cfg.bias + 2500).all()
    others = np.ones(dark.shape, bool)
    others[hot[:, 1], hot[:, 0]] = False
    assert abs(np.median(dark[others]) - (cfg.bias + cfg.dark_rate * 60)) <= 1
    assert (dark[others] < cfg.bias + 40).mean() > 0.9999


def test_mean_flat_frame_over_true_flat_is_flat_within_noise():
    cfg = SimConfig(**SMALL)
    flat = true_flat(cfg)
    assert flat.dtype == np.float32 and flat.mean() == pytest.approx(1.0, abs=1e-5)
    corner = flat[:10, :10].mean() / flat[115:125, 155:165].mean()
    assert corner == pytest.approx(1 - cfg.vignetting, abs=0.05)
    n = 4
    frames = [render_frame(cfg, i, kind="flat")[0].astype(np.float64) for i in range(n)]
    dflat = render_frame(cfg, 0, kind="darkflat")[0].astype(np.float64)
    mean = np.mean(frames, axis=0) - np.median(dflat)
    ratio = mean / flat
    ratio /= ratio.mean()
    level = 0.4 * (cfg.white - cfg.bias) * cfg.gain
    expected = math.sqrt(level + cfg.read_noise ** 2) / level / math.sqrt(n)   # per pixel, Poisson + read
    assert np.std(ratio) == pytest.approx(expected, rel=0.15)
    blocks = ratio.reshape(12, 20, 16, 20).mean(axis=(1, 3))                   # 400-pixel blocks
    assert np.abs(blocks - 1).max() < 6 * expected / 20


def test_fits_round_trip(tmp_path):
    cfg = SimConfig(**SMALL, n_frames=2, mono=True)
    truth = render_night(tmp_path, cfg)
    raw, meta = render_frame(cfg, 1)
    with fits.open(tmp_path / "light_0001_60s.fits") as hdul:
        h = hdul[0].header
        data = hdul[0].data
        assert h["BITPIX"] == 16 and h["BZERO"] == 32768
        assert data.dtype == np.uint16 and np.array_equal(data, raw)
        assert h["IMAGETYP"] == "Light Frame" and h["EXPTIME"] == 60.0
        assert h["DATE-OBS"] == "2026-11-25T21:01:02" == truth["frames"][1]["time"]
        assert (h["GAIN"], h["ISOSPEED"], h["CCD-TEMP"], h["INSTRUME"]) == (120, 800, -10.0, "SIMCAM 1")
        assert h["FILTER"] == "L" and "BAYERPAT" not in h
        assert (h["ROWORDER"], h["XPIXSZ"], h["PIXSIZE2"], h["XBINNING"]) == ("TOP-DOWN", 3.76, 3.76, 1)
    cfg = SimConfig(**SMALL, n_frames=1)
    render_night(tmp_path / "colour", cfg)
    h = fits.getheader(tmp_path / "colour" / "light_0000_60s.fits")
    assert (h["BAYERPAT"], h["XBAYROFF"], h["YBAYROFF"]) == ("RGGB", 0, 0) and "FILTER" not in h


def test_dng_round_trips_bit_exactly_through_rawpy(tmp_path):
    cfg = SimConfig(**SMALL, n_frames=1, fmt="dng", exptime=30.0)
    render_night(tmp_path, cfg)
    path = tmp_path / "light_0000_30s.dng"
    raw, _ = render_frame(cfg, 0)
    with rawpy.imread(str(path)) as r:
        assert np.array_equal(r.raw_image_visible, raw)
        assert r.color_desc == b"RGBG" and r.raw_pattern.tolist() == [[0, 1], [3, 2]]   # = RGGB
        assert r.black_level_per_channel == [cfg.bias] * 4 and r.white_level == cfg.white
    with open(path, "rb") as fh:
        tags = exifread.process_file(fh, details=False)

    def tag(name):
        return next(str(v) for k, v in tags.items() if k in (f"Image {name}", f"EXIF {name}"))
    assert tag("ExposureTime") == "30" and tag("ISOSpeedRatings") == "800"
    assert tag("DateTimeOriginal") == "2026:11:25 21:00:00"
    assert tag("Make") + " " + tag("Model") == "SIMCAM 1"


def test_mono_dng_is_refused():
    with pytest.raises(ValueError, match="mono cameras write FITS"):
        SimConfig(mono=True, fmt="dng")


def test_render_night_truth_layout_and_defects(tmp_path):
    cfg = SimConfig(**SMALL, n_frames=4, defects={1: "satellite", 2: "cosmic", 3: "wind"})
    truth = render_night(tmp_path, cfg)
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"light_{i:04d}_60s.fits" for i in range(4)] + ["truth.json"]
    assert [f["defect"] for f in truth["frames"]] == [None, "satellite", "cosmic", "wind"]
    assert truth["config"]["defects"] == {"1": "satellite", "2": "cosmic", "3": "wind"}
    assert truth["hot_pixels"] == hot_pixels(cfg).tolist()
    assert [f["time"][-8:] for f in truth["frames"]] == ["21:00:00", "21:01:02", "21:02:04", "21:03:06"]
    assert set(truth["satellite"]) == {"1"} and set(truth["cosmics"]) == {"2"}
    # the satellite line is bright along its truth segment
    sat = fits.getdata(tmp_path / "light_0001_60s.fits").astype(np.float64)
    x0, y0, x1, y1 = truth["satellite"]["1"]
    t = np.linspace(0.05, 0.95, 50)
    on = sat[np.rint(y0 + t * (y1 - y0)).astype(int), np.rint(x0 + t * (x1 - x0)).astype(int)]
    assert np.median(on) > np.median(sat) + 200
    # cosmic hits: thousands of e- at the listed pixels
    cos = fits.getdata(tmp_path / "light_0002_60s.fits")
    hits = np.array(truth["cosmics"]["2"])
    assert 30 <= len(hits) <= 90 and (cos[hits[:, 1], hits[:, 0]] > cfg.bias + 1500).all()
    assert len((tmp_path / "truth.json").read_bytes()) < 20_000


def test_cli_writes_lights_calibration_and_truth(tmp_path, capsys):
    out = tmp_path / "night"
    rc = cli_main([str(out), "--frames", "2", "--width", "64", "--height", "48", "--format", "dng",
                   "--rotation-deg", "0.5", "--defects", "cloudy:1", "--calib"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    truth = json.loads((out / "truth.json").read_text())
    assert [f["file"] for f in truth["frames"]] == ["light_0000_60s.dng", "light_0001_60s.dng"]
    assert truth["calibration"]["bias"][0] == "bias/bias_0000_0s.dng"
    for sub, name in [("bias", "bias_0009_0s"), ("darks", "dark_0009_60s"), ("flats", "flat_0009_1s"),
                      ("darkflats", "darkflat_0009_1s")]:
        assert len(list((out / sub).iterdir())) == 10 and (out / sub / f"{name}.dng").exists()
    assert not list(out.rglob(".*.tmp"))
    assert cli_main([str(out), "--defects", "rain:1"]) == 2


def test_cli_sets_the_seeing_the_pointing_and_the_object(tmp_path, capsys):
    # what the Python API had and the command line did not: --fwhm (undersampled stars, for a drizzle), and
    # --pointing / --object / --sky-seed (another target, as the plate solving and targets tests make)
    from astropy.io import fits

    out = tmp_path / "m95"
    assert cli_main([str(out), "--frames", "2", "--width", "64", "--height", "48", "--fwhm", "1.4",
                     "--pointing", "160.99", "11.70", "--object", "M 95", "--sky-seed", "7"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["config"]["fwhm_px"] == 1.4 and all(1.2 < f["fwhm"] < 1.6 for f in truth["frames"])
    h = fits.getheader(out / truth["frames"][0]["file"])
    assert (h["RA"], h["DEC"], h["OBJECT"]) == (160.99, 11.70, "M 95")
    assert truth["config"]["sky_seed"] == 7
    capsys.readouterr()
    assert cli_main([str(tmp_path / "x"), "--fwhm", "0"]) == 2
    assert cli_main([str(tmp_path / "x"), "--pointing", "361", "0"]) == 2
    assert "RA 0…360°" in capsys.readouterr().err


def test_render_calibration_levels(tmp_path):
    cfg = SimConfig(**SMALL)
    files = render_calibration(tmp_path, cfg, n_bias=2, n_dark=1, n_flat=1, n_darkflat=1, dark_exptime=120)
    assert [p.name for p in files["darks"]] == ["dark_0000_120s.fits"]
    bias = fits.getdata(files["bias"][0]).astype(np.float64)
    assert fits.getheader(files["bias"][0])["IMAGETYP"] == "Bias Frame"
    assert bias.mean() == pytest.approx(cfg.bias, abs=0.1) and bias.std() == pytest.approx(cfg.read_noise, rel=0.1)
    flat = fits.getdata(files["flats"][0]).astype(np.float64)
    assert fits.getheader(files["flats"][0])["IMAGETYP"] == "Flat Field"
    assert np.median(flat) - cfg.bias == pytest.approx(0.4 * (cfg.white - cfg.bias), rel=0.1)
    assert fits.getheader(files["darkflats"][0])["IMAGETYP"] == "Dark Flat"
