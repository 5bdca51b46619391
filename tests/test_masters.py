"""masters.py: a calibration library built from simulator frames with a known flat, dark and hot pixels.

The truth: drivers.simulator's camera (true_flat, hot_pixels, render_frame(noise=False) for expected values).
Gain is 1 e-/ADU and read noise 3 e-, so noise figures below are in ADU = e-.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from drivers.simulator import SimConfig, hot_pixels, render_calibration, render_frame, render_night, true_flat
from drivers.simulator.write import write_fits as sim_write_fits
from livestack.cli import main as cli_main
from livestack.config import ConfigError, config_from_dict
from livestack.engine.calibrate import CosmeticParams, calibrate
from livestack.engine.frame import FrameError
from livestack.masters import (CalibrationParams, MasterLibrary, Spill, build_library, combine_block,
                                      combine_spill, kind_from_folder)
from livestack.masters_cli import calibration_params
from livestack.engine.read import read_frame

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIM = SimConfig(width=320, height=240, seed=3)
N = 8                      # frames per calibration kind
DARK_T = 60.0
NO_COSMETIC = CosmeticParams(enabled=False)


def write_sim(path: Path, cfg: SimConfig, raw: np.ndarray, kind: str, exptime: float) -> Path:
    meta = {"imagetyp": {"light": "Light Frame", "flat": "Flat Field", "dark": "Dark Frame",
                         "bias": "Bias Frame"}[kind], "exptime": exptime, "time": "2026-11-26T01:00:00"}
    sim_write_fits(path, np.clip(np.rint(raw), 0, cfg.white).astype(np.uint16), meta, cfg)
    return path


def sim_frame(tmp: Path, cfg: SimConfig, kind: str, exptime: float, *, index: int = 90, noise: bool = False,
              name: str | None = None):
    raw, _ = render_frame(cfg, index, kind=kind, exptime=exptime, noise=noise)
    path = write_sim(tmp / (name or f"{kind}_{index}_{exptime:g}s.fits"), cfg, raw, kind, exptime)
    return read_frame(path), raw.astype(np.float64)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    base = tmp_path_factory.mktemp("calib")
    render_calibration(base / "calib", SIM, n_bias=N, n_dark=N, n_flat=N, n_darkflat=N, dark_exptime=DARK_T)
    t0 = time.perf_counter()
    library = build_library(base / "calib", base / "masters")
    library.build_seconds = time.perf_counter() - t0
    return MasterLibrary.load(base / "masters")


# ---------------------------------------------------------------- discovery and the library files

@pytest.mark.parametrize("name,kind", [
    ("bias", "bias"), ("BIAS", "bias"), ("Biases", "bias"), ("offset", "bias"), ("Offsets_ISO800", "bias"),
    ("zeros", "bias"), ("darks", "dark"), ("Dark_60s", "dark"), ("dark", "dark"), ("flats", "flat"),
    ("Flat-Ha", "flat"), ("FlatField", "flat"), ("darkflats", "darkflat"), ("dark_flat", "darkflat"),
    ("DarkFlats 2s", "darkflat"), ("flatdarks", "darkflat"), ("flat_darks", "darkflat"), ("Lights", "light"),
    ("2026-11-25", None), ("M31", None),
])
def test_kind_from_folder_name(name, kind):
    assert kind_from_folder(name) == kind


def test_library_index_and_headers(lib):
    doc = json.loads((lib.root / "masters.json").read_text())
    kinds = sorted(m["kind"] for m in doc["masters"])
    assert kinds == ["bias", "dark", "darkflat", "flat"]
    assert doc["params"]["method"] == "clipped" and doc["skipped"] == []
    for m in doc["masters"]:
        assert m["ncombine"] == N and len(m["sources"]) == N
        assert (m["width"], m["height"], m["pattern"], m["camera"]) == (320, 240, "RGGB", "SIMCAM 1")
        with fits.open(lib.root / m["file"]) as hdul:
            h, data = hdul[0].header, hdul[0].data
            assert data.dtype == np.dtype(">f4") and data.shape == (240, 320)
            assert h["NCOMBINE"] == N and h["INSTRUME"] == "SIMCAM 1" and h["BAYERPAT"] == "RGGB"
            assert h["ISOSPEED"] == 800 and h["GAIN"] == 120 and h["CCD-TEMP"] == -10
            assert h["IMAGETYP"] == {"bias": "Master Bias", "dark": "Master Dark", "darkflat": "Master Dark Flat",
                                     "flat": "Master Flat"}[m["kind"]]
            assert h["NSOURCE"] == N and sum("source:" in str(c) for c in h["HISTORY"]) == N
            assert h["SOFTWARE"].startswith("livestack")
    dark = next(m for m in doc["masters"] if m["kind"] == "dark")
    assert dark["exptime"] == DARK_T and fits.getheader(lib.root / dark["file"])["EXPTIME"] == DARK_T
    flat = next(m for m in doc["masters"] if m["kind"] == "flat")
    assert flat["subtracted"].startswith("darkflat_1s")
    assert not list(lib.root.glob(".scratch*")), "scratch files are removed"


def test_bad_pixel_map_has_the_simulator_hot_and_cold_pixels(lib):
    dark = next(e for e in lib.entries if e.kind == "dark")
    flat = next(e for e in lib.entries if e.kind == "flat")
    hot = lib.bad_map(dark.name)
    truth_hot = hot_pixels(SIM)
    assert hot[truth_hot[:, 1], truth_hot[:, 0]].all()
    assert hot.sum() <= len(truth_hot) + 5            # hardly any false alarm in 76 800 pixels
    cold = lib.bad_map(flat.name)
    assert 20 <= cold.sum() <= 25                     # the simulator's 20 cold pixels (20 % response)


# ---------------------------------------------------------------- the flat

def _residual(cal: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """(rms, max of 8×8-block means) of cal / its mean per CFA colour - 1, bad pixels left out."""
    rms, block = [], []
    for i in range(2):
        for j in range(2):
            p, b = cal[i::2, j::2].astype(np.float64), bad[i::2, j::2]
            r = p / p[~b].mean() - 1
            r[b] = 0
            rms.append(np.sqrt(np.mean(r[~b] ** 2)))
            h, w = (r.shape[0] // 8) * 8, (r.shape[1] // 8) * 8
            block.append(np.abs(r[:h, :w].reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))).max())
    return max(rms), max(block)


def test_flat_field_residual_below_one_percent(lib, tmp_path):
    # A flat-field-only light: the uniform panel through the optics, expected values (no noise), 1 s.
    frame, raw = sim_frame(tmp_path, SIM, "flat", 1.0)
    m = lib.select(frame)
    assert m.flat is not None and m.names["flat"].startswith("flat_")
    cal, info = calibrate(frame, m, NO_COSMETIC)
    assert cal.dtype == np.float32 and np.array_equal(frame.data, raw.astype(np.float32))  # input unchanged
    assert info["dark_scaled"] == pytest.approx(1 / 60, rel=1e-5) and info["flat"] == m.names["flat"]
    rms_raw, block_raw = _residual(raw - SIM.bias, m.bad)
    rms, block = _residual(cal, m.bad)
    print(f"flat residual: rms {100 * rms:.2f} %, worst 8×8 block {100 * block:.2f} % "
          f"(uncalibrated: {100 * rms_raw:.1f} %, {100 * block_raw:.1f} %)")
    assert block_raw > 0.15                           # vignetting and dust were there …
    assert rms < 0.01 and block < 0.01                # … and are gone
    # the four colours come out at the same level: the panel is grey
    levels = [cal[i::2, j::2][~m.bad[i::2, j::2]].mean() for i in range(2) for j in range(2)]
    assert max(levels) / min(levels) - 1 < 0.002


def test_master_flat_matches_the_true_flat(lib):
    flat = lib.array(next(e.name for e in lib.entries if e.kind == "flat"))
    truth = true_flat(SIM)
    bad = lib.bad_map(next(e.name for e in lib.entries if e.kind == "flat"))
    for i in range(2):
        for j in range(2):
            f, t, b = flat[i::2, j::2], truth[i::2, j::2], bad[i::2, j::2]
            assert f[~b].mean() == pytest.approx(1.0, abs=1e-5)
            r = f[~b] / (t[~b] / t[~b].mean()) - 1
            # photon noise of 8 flats at ~6 300 e-: 1.26 % / sqrt(8) = 0.45 % per pixel
            assert np.sqrt(np.mean(r ** 2)) < 0.006


def test_per_colour_normalisation_keeps_a_grey_card_grey(tmp_path):
    """Flats of a coloured panel (R 0.5 : G 1 : B 1.6): normalising each CFA colour on its own removes the
    panel's colour; a grey light through the same optics must stay grey."""
    cfg = dataclasses.replace(SIM, seed=11)
    truth = true_flat(cfg).astype(np.float64)
    colour = np.tile(np.array([[0.5, 1.0], [1.0, 1.6]]), (cfg.height // 2, cfg.width // 2))
    rng = np.random.default_rng(5)
    calib = tmp_path / "calib"
    (calib / "flats").mkdir(parents=True)
    (calib / "bias").mkdir()
    for k in range(6):
        e = 5000 * colour * truth
        write_sim(calib / "flats" / f"flat_{k}.fits", cfg, rng.poisson(e) + cfg.bias + rng.normal(0, 3, e.shape),
                  "flat", 1.0)
        write_sim(calib / "bias" / f"bias_{k}.fits", cfg, cfg.bias + rng.normal(0, 3, e.shape), "bias", 0.0)
    lib = build_library(calib, tmp_path / "M")
    assert next(e for e in lib.entries if e.kind == "flat").subtracted.startswith("bias_")
    grey = cfg.bias + 3000 * truth                     # a grey card: equal signal in R, G and B
    frame = read_frame(write_sim(tmp_path / "grey.fits", cfg, grey, "light", 10.0))
    m = lib.select(frame)
    cal, _ = calibrate(frame, m, NO_COSMETIC)
    ok = ~m.bad
    r, g1, g2, b = (cal[i::2, j::2][ok[i::2, j::2]].mean() for i in range(2) for j in range(2))
    print(f"grey card after calibration R:G:B = {r / g1:.4f} : 1 : {b / g1:.4f}")
    assert abs(r / g1 - 1) < 0.003 and abs(b / g1 - 1) < 0.003 and abs(g2 / g1 - 1) < 0.003
    raw_ratio = [(grey - cfg.bias)[i::2, j::2].mean() for i, j in ((0, 0), (1, 1))]
    assert raw_ratio[0] == pytest.approx(raw_ratio[1], rel=0.01)   # the card really is grey


def test_a_flat_without_light_is_left_out_not_the_whole_group(tmp_path):
    """A capped or black frame among the flats (level ≤ 0 after the bias) is skipped with its reason; the
    other flats still make the master, equal to the one made without it."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=13)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=3, n_dark=0, n_flat=4, n_darkflat=0)
    clean = build_library(calib, tmp_path / "clean")
    first = sorted((calib / "flats").glob("*.fits"))[0]
    with fits.open(first) as h:
        fits.writeto(calib / "flats" / "flat_capped.fits", np.zeros_like(h[0].data), h[0].header)
    lib = build_library(calib, tmp_path / "M")
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    assert flat.ncombine == 4 and "flats/flat_capped.fits" not in flat.sources
    (why,) = [s["reason"] for s in lib.skipped if s["file"] == "flats/flat_capped.fits"]
    assert why.startswith("flat without light: mean level ≤ 0 after subtracting bias_")
    assert np.array_equal(lib.array(flat.name), clean.array(flat.name))


def test_calibration_frames_are_trimmed_like_lights(tmp_path):
    """A CCD's bias, darks and flats carry the TRIMSEC of its lights: each is cut to it when read, so the
    masters are the lights' size and Bayer phase (a cut at column 2, row 2 makes RGGB BGGR) — the same masters,
    to the bit, as from files cut by hand; and a trimmed light selects them."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=21)
    calib, by_hand = tmp_path / "calib", tmp_path / "by_hand"
    render_calibration(calib, cfg, n_bias=3, n_dark=3, n_flat=3, n_darkflat=0, dark_exptime=DARK_T)
    for path in sorted(calib.rglob("*.fits")):
        with fits.open(path, mode="update") as hdul:
            header = hdul[0].header
            cut = hdul[0].data[1:117, 1:155].copy()
            header["TRIMSEC"] = "[2:155,2:117]"
        hand = header.copy()
        del hand["TRIMSEC"]
        hand["XBAYROFF"], hand["YBAYROFF"] = 1, 1
        (by_hand / path.relative_to(calib)).parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(cut, header=hand).writeto(by_hand / path.relative_to(calib))
    lib = build_library(calib, tmp_path / "M")
    ref = build_library(by_hand, tmp_path / "M_by_hand")
    assert sorted(e.kind for e in lib.entries) == ["bias", "dark", "flat"]
    for e, r in zip(sorted(lib.entries, key=lambda e: e.kind), sorted(ref.entries, key=lambda e: e.kind)):
        assert (e.width, e.height, e.pattern) == (154, 116, "BGGR") == (r.width, r.height, r.pattern)
        assert np.array_equal(lib.array(e.name), ref.array(r.name))
    raw, _ = render_frame(cfg, 90, kind="light", exptime=DARK_T, noise=False)
    light = write_sim(tmp_path / "light.fits", cfg, raw, "light", DARK_T)
    with fits.open(light, mode="update") as hdul:
        hdul[0].header["TRIMSEC"] = "[2:155,2:117]"
    frame = read_frame(light)
    assert frame.shape == (116, 154) and frame.pattern == "BGGR"
    chosen = lib.select(frame)
    assert chosen is not None and chosen.dark is not None and chosen.flat is not None


def test_flats_of_two_exposures_each_get_the_dark_flat_of_their_own(tmp_path):
    """Sky flats or an automatic panel: flats of 1 s and 2 s in one folder, dark-flats of both, files without
    BLKLEVEL (as most capture programs write them).  Each flat has the dark-flat of its exposure subtracted (not
    nothing because no dark-flat has the flats' mean exposure, 1.5 s), so the master is the true flat."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=17)
    calib = tmp_path / "calib"
    for t in (1.0, 2.0):
        render_calibration(tmp_path / f"t{t:g}", cfg, n_bias=0, n_dark=0, n_flat=4, n_darkflat=3, flat_exptime=t)
        for kind in ("flats", "darkflats"):
            (calib / kind).mkdir(parents=True, exist_ok=True)
            for f in (tmp_path / f"t{t:g}" / kind).glob("*.fits"):
                fits.delval(f, "BLKLEVEL")
                f.rename(calib / kind / f"{t:g}s_{f.name}")
    lib = build_library(calib, tmp_path / "M")
    (e,) = [e for e in lib.entries if e.kind == "flat"]
    assert e.ncombine == 8
    assert sorted(e.subtracted.split(", ")) == [f"darkflat_{t}s_iso800_g120_SIMCAM-1_160x120" for t in (1, 2)]
    flat, bad, truth = lib.array(e.name), lib.bad_map(e.name), true_flat(cfg)
    for i in range(2):
        for j in range(2):
            f, t, b = flat[i::2, j::2], truth[i::2, j::2], bad[i::2, j::2]
            x, y = t[~b] / t[~b].mean() - 1, f[~b] - 1
            # the vignetting's full depth: a pedestal left in would flatten it (512 ADU under ~6 000: 0.92)
            assert float(np.sum(x * y) / np.sum(x * x)) == pytest.approx(1.0, abs=0.02)
    with fits.open(lib.root / e.file) as h:
        assert h[0].header["CALSUB"] == e.subtracted


def test_dark_flats_that_fit_no_flat_are_said_not_silently_passed_over(tmp_path):
    """Dark-flats of 2 s for flats of 1 s: the flats had their black level subtracted instead and the build log said
    only "minus black level 512" — the dark-flats taken for them were made into a master and never used, without a
    word.  The log now says which dark-flat fits no flat, and why."""
    small = dataclasses.replace(SIM, width=64, height=48)
    render_calibration(tmp_path / "calib", small, n_bias=0, n_dark=0, n_flat=3, n_darkflat=3, flat_exptime=1.0)
    for f in (tmp_path / "calib" / "darkflats").iterdir():         # the same frames, said to be of 2 s
        with fits.open(f, mode="update") as h:
            h[0].header["EXPTIME"] = 2.0
    with fits.open(sorted((tmp_path / "calib" / "flats").iterdir())[0], mode="update") as h:
        h[0].header["EXPTIME"] = 3.0          # sky flats: of several exposures, said in one line
    lines: list[str] = []
    lib = build_library(tmp_path / "calib", tmp_path / "M", log=lines.append)
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    assert flat.subtracted == "black level 512"
    assert [line for line in lines if line.startswith("    ")] == [
        "    no master dark-flat fits the flats of 1 s, 3 s (darkflat_2s_iso800_g120_SIMCAM-1_64x48 is of 2 s): "
        "their black level 512 was subtracted instead"], lines


def test_darks_at_an_odd_setpoint_make_one_master(tmp_path):
    """Darks were binned by round(T / 2 °C): a camera cooled to −15 °C reads −15.1, −15.0, −14.9, which fell on both
    sides of a bin edge (−7.5) and made two masters of half the frames each.  A dark joins the group whose first
    dark is within temperature_bin / 2; darks at −20 °C stay a master of their own."""
    folder = tmp_path / "calib" / "darks"
    folder.mkdir(parents=True)
    for i, t in enumerate([-15.1, -15.0, -14.9, -15.0, -14.9, -15.1, -20.0, -20.1, -19.9]):
        cfg = dataclasses.replace(SIM, width=64, height=48, temperature=t)
        raw, _ = render_frame(cfg, i, kind="dark", exptime=60.0)
        write_sim(folder / f"dark_{i}.fits", cfg, raw, "dark", 60.0)
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    assert sorted((e.ncombine, round(e.temperature, 2)) for e in lib.entries) == [(3, -20.0), (6, -15.0)]


def test_flats_of_two_targets_folders_made_into_one_master_are_said(tmp_path):
    """Ekos keeps flats per target (NGC 7000/Flat/L, M31/Flat/L): `livestack masters` given the parent made one
    flat_L of both nights without a word, though flats of another night (dust moved, the camera turned) do not
    fit its lights.  The log says which folders went into the master."""
    small = dataclasses.replace(SIM, width=64, height=48, mono=True, filters=("L",))
    for target in ("NGC 7000", "M31"):
        render_calibration(tmp_path / "pictures" / target / "tmp", small, n_bias=0, n_dark=0, n_flat=3,
                           n_darkflat=0)
        shutil.move(tmp_path / "pictures" / target / "tmp" / "flats", tmp_path / "pictures" / target / "Flat")
        shutil.rmtree(tmp_path / "pictures" / target / "tmp")
    lines: list[str] = []
    lib = build_library(tmp_path / "pictures", tmp_path / "M", log=lines.append)
    assert [e.ncombine for e in lib.entries] == [6]
    notes = [line for line in lines if line.startswith("    made of flats from 2 folders")]
    assert len(notes) == 1 and "(M31/Flat, NGC 7000/Flat)" in notes[0], lines


def test_a_saturated_flat_is_left_out(tmp_path):
    """A flat clipped at the white level (a panel too bright) is flat where the optics are not: it is skipped
    with the reason, and the master is the one the good flats make."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=19)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=3, n_dark=0, n_flat=4, n_darkflat=0)
    clean = build_library(calib, tmp_path / "clean")
    first = sorted((calib / "flats").glob("*.fits"))[0]
    with fits.open(first) as h:
        bright = np.clip((h[0].data.astype(np.float64) - cfg.bias) * 3 + cfg.bias, 0, cfg.white)
        fits.writeto(calib / "flats" / "flat_bright.fits", bright.astype(np.uint16), h[0].header)
    lib = build_library(calib, tmp_path / "M")
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    assert flat.ncombine == 4
    (why,) = [s["reason"] for s in lib.skipped if s["file"] == "flats/flat_bright.fits"]
    assert why.startswith("saturated flat: ") and f"at the white level {cfg.white:g}" in why
    assert np.array_equal(lib.array(flat.name), clean.array(flat.name))


def _bad_copies(folder: Path, cfg: SimConfig, bad: dict[str, np.ndarray]) -> None:
    """Write ``bad`` (file name -> pixels) into ``folder`` with the header of its first good frame."""
    first = sorted(folder.glob("*.fits"))[0]
    with fits.open(first) as h:
        header = h[0].header
    for name, data in bad.items():
        fits.writeto(folder / name, data, header)


def test_blank_constant_and_light_frames_are_left_out_of_the_master_dark(tmp_path):
    """Among 10 good darks: two all-zero frames (a camera writing a blank frame), one constant at 4095 and a
    light dropped into the darks folder.  Each is left out with a one-line reason naming it; the master is the
    one the 10 good darks make (before: 14 frames combined, master median 515 -> 467 ADU, 668 'hot' pixels)."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=23)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=0, n_dark=10, n_flat=0, n_darkflat=0, dark_exptime=DARK_T)
    clean = build_library(calib, tmp_path / "clean")
    shape = (cfg.height, cfg.width)
    light, _ = render_frame(cfg, 5, kind="light", exptime=DARK_T)
    _bad_copies(calib / "darks", cfg, {"blank_a.fits": np.zeros(shape, np.uint16),
                                       "blank_b.fits": np.zeros(shape, np.uint16),
                                       "white.fits": np.full(shape, 4095, np.uint16),
                                       "m31_light.fits": np.clip(np.rint(light), 0, cfg.white).astype(np.uint16)})
    said: list[str] = []
    lib = build_library(calib, tmp_path / "M", log=said.append)
    (dark,) = lib.entries
    reasons = {s["file"]: s["reason"] for s in lib.skipped}
    print("\n".join(said))
    assert dark.ncombine == 10 and set(reasons) == {f"darks/{n}" for n in
                                                     ("blank_a.fits", "blank_b.fits", "white.fits", "m31_light.fits")}
    assert reasons["darks/blank_a.fits"].startswith("constant frame: every pixel is 0")
    assert reasons["darks/white.fits"].startswith("constant frame: every pixel is 4095")
    assert reasons["darks/m31_light.fits"].startswith("median ") and " above the 11 darks' " in reasons[
        "darks/m31_light.fits"]
    for f, why in reasons.items():                      # one line each, naming the file, in the log too
        assert "\n" not in why and f"  skipped {f}: {why}" in said
    assert np.array_equal(lib.array(dark.name), clean.array(dark.name))
    assert np.median(lib.array(dark.name)) == np.median(clean.array(dark.name)) == 515


def test_bias_of_other_noise_or_level_is_left_out(tmp_path):
    """Bias frames: one with an offset 40 ADU up (another offset setting, light leaking in), one with three
    times the read noise (another gain): both left out, by their numbers; a slow 1-ADU drift of the others is
    not."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=29)
    rng = np.random.default_rng(29)
    calib = tmp_path / "calib" / "bias"
    calib.mkdir(parents=True)
    shape = (cfg.height, cfg.width)
    for k in range(8):
        write_sim(calib / f"bias_{k}.fits", cfg, cfg.bias + k / 8 + rng.normal(0, 3, shape), "bias", 0.0)
    write_sim(calib / "bias_up.fits", cfg, cfg.bias + 40 + rng.normal(0, 3, shape), "bias", 0.0)
    write_sim(calib / "bias_noisy.fits", cfg, cfg.bias + rng.normal(0, 9, shape), "bias", 0.0)
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    (bias,) = lib.entries
    reasons = {s["file"]: s["reason"] for s in lib.skipped}
    assert bias.ncombine == 8 and set(reasons) == {"bias/bias_up.fits", "bias/bias_noisy.fits"}
    assert reasons["bias/bias_up.fits"].startswith("median 552 ADU")
    assert reasons["bias/bias_noisy.fits"].startswith("noise ")
    assert abs(float(np.median(lib.array(bias.name))) - (cfg.bias + 0.44)) < 0.5


@pytest.mark.parametrize("step", [1, 16])
@pytest.mark.parametrize("sigma, offsets", [(0.3, [0, 0.02, 0.05, 0.01, 0.45, 0.55]), (0.15, [0, 0.02, 0.05, 0.01, 0.55])])
def test_bias_below_one_step_of_noise_is_kept_across_a_sub_step_drift(tmp_path, step, sigma, offsets):
    """Integer bias frames with a read noise below one step of the data (0.3 or 0.15 ADU; as much of a 12-bit
    camera's step of 16 in 16-bit files) and an offset drifting by half a step are all good: but a median of
    such data moves by a whole step, and its measured noise from 0.31 to 0.51 step, as the offset crosses half a
    step.  Before: the frames at +0.45 and +0.55 were left out ("noise 0.507 ADU, 10 σ above", "median 101 ADU,
    29 σ above"); the 12-bit ones measured a noise of 0 (differences clipped at 5 ADU, not 5 steps) and a frame
    5 steps up (another offset) was kept."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=41)
    rng = np.random.default_rng(41)
    calib = tmp_path / "calib" / "bias"
    calib.mkdir(parents=True)
    shape = (cfg.height, cfg.width)
    for k, d in enumerate(offsets):
        write_sim(calib / f"bias_{k}.fits", cfg, step * np.rint(100 + rng.normal(d, sigma, shape)), "bias", 0.0)
    write_sim(calib / "bias_up.fits", cfg, step * np.rint(105 + rng.normal(0, sigma, shape)), "bias", 0.0)
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    (bias,) = lib.entries
    reasons = {s["file"]: s["reason"] for s in lib.skipped}
    assert bias.ncombine == len(offsets) and set(reasons) == {"bias/bias_up.fits"}, reasons
    assert reasons["bias/bias_up.fits"].startswith(f"median {105 * step} ADU")
    assert f" above the {len(offsets) + 1} biases' " in reasons["bias/bias_up.fits"]


def test_a_constant_flat_is_left_out(tmp_path):
    """A flat whose pixels are all one value above the bias (a blank frame) would pass as a perfect flat — no
    vignetting — and flatten the master's vignetting by 1/5: it is left out."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=31)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=3, n_dark=0, n_flat=4, n_darkflat=0)
    clean = build_library(calib, tmp_path / "clean")
    _bad_copies(calib / "flats", cfg, {"flat_blank.fits": np.full((cfg.height, cfg.width), 9000, np.uint16)})
    lib = build_library(calib, tmp_path / "M")
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    (why,) = [s["reason"] for s in lib.skipped if s["file"] == "flats/flat_blank.fits"]
    assert flat.ncombine == 4 and why.startswith("constant frame: every pixel is 9000")
    assert np.array_equal(lib.array(flat.name), clean.array(flat.name))


def test_float_flats_of_0_to_1_are_one_set_whatever_their_brightest_pixel(tmp_path):
    """Flats saved by Siril (float, 0…1 of 16 bits), with 16-bit bias frames: the one whose brightest pixels
    reach 1.02 was read in other units than its siblings peaking at 0.98, came out at 0.5 'ADU' below the
    bias and was left out as a flat without light; now all four make the master."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=37)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=3, n_dark=0, n_flat=4, n_darkflat=0)
    for k, f in enumerate(sorted((calib / "flats").glob("*.fits"))):
        with fits.open(f) as h:
            data, header = h[0].data.astype(np.float32), h[0].header
        if k == 3:
            data[10, 10:14] = 66800                     # four pixels at 1.019 (a calibrated frame's overshoot)
        for key in ("BZERO", "BSCALE", "SATURATE", "BLKLEVEL"):       # (Siril writes its own levels)
            del header[key]
        header["PROGRAM"] = "Siril v1.2.4"
        fits.writeto(f, data / np.float32(65535), header, overwrite=True)
    lib = build_library(calib, tmp_path / "M")
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    assert flat.ncombine == 4 and lib.skipped == []


@pytest.mark.parametrize("made_by", ["siril", "livestack"])
def test_a_master_flat_made_elsewhere_is_not_offset_again(tmp_path, made_by):
    """A master flat made by another program (Siril: float 0…1, STACKCNT) or by livestack (mean 1, IMAGETYP
    'Master Flat', NCOMBINE) has had the bias or dark-flat taken off its flats already.  Put among the flats
    beside bias frames, it had the master bias subtracted once more: Siril's came out 4 % too dark in the
    corners (lights calibrated with it too bright there), livestack's own went below 0 and was left out as
    'a flat without light'."""
    cfg = dataclasses.replace(SIM, width=160, height=120, seed=41, mono=True)
    calib = tmp_path / "calib"
    render_calibration(calib, cfg, n_bias=3, n_dark=0, n_flat=0, n_darkflat=0)
    truth = true_flat(cfg)
    (calib / "flats").mkdir(exist_ok=True)
    h = fits.Header()
    h["INSTRUME"], h["GAIN"], h["ISOSPEED"], h["FILTER"], h["EXPTIME"] = cfg.camera, cfg.gain_setting, cfg.iso, "L", 1.0
    if made_by == "siril":                   # bias-subtracted, in 0…1 of 16 bits
        h["IMAGETYP"], h["STACKCNT"], h["PROGRAM"] = "Flat Field", 20, "Siril v1.2.4"
        data = truth * np.float32(0.4 * (cfg.white - cfg.bias) / 65535)
    else:
        h["IMAGETYP"], h["NCOMBINE"] = "Master Flat", 20
        data = truth / truth.mean()
    fits.writeto(calib / "flats" / "master_flat_L.fits", data.astype(np.float32), h)
    lib = build_library(calib, tmp_path / "M")
    (flat,) = [e for e in lib.entries if e.kind == "flat"]
    assert lib.skipped == [] and flat.subtracted is None
    bad = lib.bad_map(flat.name)
    r = lib.array(flat.name)[~bad] / (truth[~bad] / truth[~bad].mean()) - 1
    assert np.abs(r).max() < 1e-3


# ---------------------------------------------------------------- darks

def test_dark_of_60s_scaled_to_120s_matches_a_true_120s_dark(lib, tmp_path):
    frame, raw120 = sim_frame(tmp_path, SIM, "dark", 120.0)
    m = lib.select(frame)
    assert m.dark_exptime == DARK_T and m.bias is not None and set(m.names) == {"bias", "dark", "flat"}
    cal, info = calibrate(frame, dataclasses.replace(m, bad=None, flat=None), NO_COSMETIC)
    assert info["dark_scaled"] == 2.0 and info["bias"] == m.names["bias"]
    # cal = E(120 s) - [B + 2 (D60 - B)]; variance from the masters' noise: 4 var(D60) + var(B)
    e60, _ = render_frame(SIM, 0, kind="dark", exptime=DARK_T, noise=False)
    e60 = e60.astype(np.float64) - SIM.bias
    q = 1 / 12  # rounding to whole ADU
    var = 4 * (SIM.read_noise ** 2 + q + e60) / N + (SIM.read_noise ** 2 + q) / N
    ok = (raw120 < SIM.white) & (e60 + SIM.bias < SIM.white)       # saturated hot pixels cannot scale
    z = cal[ok] / np.sqrt(var[ok])
    hot = np.zeros(cal.shape, bool)
    hot[hot_pixels(SIM)[:, 1], hot_pixels(SIM)[:, 0]] = True
    print(f"scaled dark - true 120 s dark: mean {cal[ok & ~hot].mean():+.3f} ADU, rms {cal[ok].std():.2f} ADU, "
          f"<z²> {np.mean(z ** 2):.2f}, max |z| {np.abs(z).max():.1f}, hot pixels max |z| "
          f"{np.abs(cal[ok & hot] / np.sqrt(var[ok & hot])).max():.1f}")
    assert abs(cal[ok & ~hot].mean()) < 0.1          # thermal signal 6 e-: scaled without bias
    assert 0.8 < np.mean(z ** 2) < 1.3 and np.abs(z).max() < 6
    assert (ok & hot).sum() > 20 and np.abs(cal[ok & hot] / np.sqrt(var[ok & hot])).max() < 5
    unscaled, _ = calibrate(frame, dataclasses.replace(m, bias=None, bad=None, flat=None, dark_exptime=120.0),
                            NO_COSMETIC)
    assert unscaled[ok & ~hot].mean() > 2.5          # the unscaled 60 s dark leaves 3 e- behind


def test_a_light_of_0_s_gets_the_dark_scaled_to_nothing(lib, tmp_path):
    """EXPTIME = 0 is an exposure, not 'unknown': the 60 s dark was subtracted as it is, and nothing said so."""
    frame, raw0 = sim_frame(tmp_path, SIM, "dark", 0.0)
    m = lib.select(frame)
    cal, info = calibrate(frame, dataclasses.replace(m, bad=None, flat=None), NO_COSMETIC)
    assert info["dark_scaled"] == 0.0 and info["bias"] == m.names["bias"]
    hot = np.zeros(cal.shape, bool)
    hot[hot_pixels(SIM)[:, 1], hot_pixels(SIM)[:, 0]] = True
    assert abs(float(cal[~hot].mean())) < 0.5                    # only the bias taken off: ~0 left


def test_exact_dark_is_preferred_and_no_bias_then(lib, tmp_path):
    frame, _ = sim_frame(tmp_path, SIM, "light", 60.0)
    m = lib.select(frame)
    assert m.dark_exptime == DARK_T and m.bias is None and set(m.names) == {"dark", "flat"}
    assert m.bad is not None and m.bad.sum() == 80
    assert lib.select(frame) is m                     # chosen once per kind of frame, arrays read once


def test_hot_pixels_absent_from_a_calibrated_light(lib, tmp_path):
    frame, raw = sim_frame(tmp_path, SIM, "light", 60.0, index=1, noise=True)
    cal, info = calibrate(frame, lib.select(frame), NO_COSMETIC)
    assert info["bad_pixels"] == 80
    # hot pixels on a flat patch of sky (the same-colour neighbours of the noise-free light within 100 ADU):
    # next to a star "excess over the neighbours" is the star, not the pixel
    expected, _ = render_frame(SIM, 1, noise=False)
    def neighbours(img, x, y):
        return np.array([img[y + dy, x + dx] for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                         if (dx or dy) and 0 <= y + dy < img.shape[0] and 0 <= x + dx < img.shape[1]], float)

    xy = [(x, y) for x, y in hot_pixels(SIM) if np.ptp(neighbours(expected, x, y)) < 100]
    assert len(xy) > 50

    def excess(img):
        """value minus the median of the 8 same-colour neighbours, at each hot pixel"""
        return np.array([img[y, x] - np.median(neighbours(img, x, y)) for x, y in xy])

    before, after = excess(raw - SIM.bias), excess(cal)
    print(f"hot pixels: excess over neighbours {np.median(before):.0f} ADU before, max {np.abs(after).max():.1f} "
          "ADU after calibration")
    assert before.min() > 1000
    assert np.abs(after).max() < 60                   # sky noise ~ 20 ADU, star slopes


def test_hot_pixels_absent_from_the_stack(lib, tmp_path):
    lights = tmp_path / "lights"
    render_night(lights, dataclasses.replace(SIM, n_frames=5, drift_px=(0.4, -0.3)))
    cfgfile = tmp_path / "livestack.toml"
    cfgfile.write_text("[cosmetic]\nenabled = false\n")   # the masters alone must do it
    excess = {}
    for label, extra in (("masters", ["--masters", str(lib.root)]), ("none", [])):
        out = tmp_path / f"out_{label}"
        assert cli_main(["stack", str(lights), "-o", str(out), "--config", str(cfgfile), "-q", *extra]) == 0
        recs = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
        assert sum(r["status"] in ("reference", "stacked") for r in recs) >= 4
        if label == "masters":
            assert all(r["calibration"]["dark"].startswith("dark_60s") for r in recs)
            assert "CALIBRAT" in fits.getheader(out / "stack.fits")
        stack = fits.getdata(out / "stack.fits").astype(np.float32)
        lum = stack.mean(axis=0)
        resid = lum - cv2.medianBlur(lum, 5)
        sigma = 1.4826 * np.median(np.abs(resid))
        # hot pixels are fixed to the sensor: in the stack they sit at the reference frame's positions,
        # drifting by < 2 px over 5 frames; take the worst pixel within 1 px of each
        vals = [resid[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max() / sigma for x, y in hot_pixels(SIM)
                if 2 < x < SIM.width - 3 and 2 < y < SIM.height - 3]
        excess[label] = np.median(vals)
    print(f"stack: median excess at hot pixels {excess['masters']:.1f} σ with masters, {excess['none']:.1f} σ "
          "without (cosmetic correction off in both)")
    assert excess["none"] > 20 and excess["masters"] < 4


def test_each_filter_stack_names_its_own_flat_in_calibrat(tmp_path):
    """CALIBRAT of stack_R.fits names the R flat (not the last flat any frame used), whole (not cut at 68
    characters, where the flat's name was lost), and the composite lists every master."""
    cfg = dataclasses.replace(SIM, n_frames=4, filters=("R", "G"))
    render_calibration(tmp_path / "calib", cfg, n_bias=0, n_dark=3, n_flat=3, n_darkflat=3)
    build_library(tmp_path / "calib", tmp_path / "M")
    render_night(tmp_path / "lights", cfg)
    out = tmp_path / "out"
    assert cli_main(["stack", str(tmp_path / "lights"), "-o", str(out), "--masters", str(tmp_path / "M"),
                     "--no-solve", "-q"]) == 0
    dark = "dark=dark_60s_-10C_iso800_g120_SIMCAM-1_320x240"
    for f in ("R", "G"):
        flat = f"flat=flat_{f}_iso800_g120_SIMCAM-1_320x240"
        assert fits.getheader(out / f"stack_{f}.fits")["CALIBRAT"] == f"{dark}, {flat}"
    assert fits.getheader(out / "stack.fits")["CALIBRAT"] == (f"{dark}, flat=flat_G_iso800_g120_SIMCAM-1_320x240, "
                                                              "flat=flat_R_iso800_g120_SIMCAM-1_320x240")


def test_a_damaged_fits_header_holds_up_no_master(tmp_path):
    """A FITS file in a folder whose name says no kind, with no IMAGETYP and a NAXIS1 card garbled to -3000:
    looking for its IMAGETYP in every HDU, astropy found the next HDU where that one starts — the same header, for
    ever: `livestack masters` hung.  It is skipped, and the darks beside it make their master."""
    import subprocess
    import sys

    render_calibration(tmp_path / "calib", SIM, n_bias=0, n_dark=3, n_flat=0, n_darkflat=0)
    (tmp_path / "calib" / "other").mkdir()
    garbled = tmp_path / "calib" / "other" / "garbled.fits"
    fits.PrimaryHDU(np.zeros((1, 16), np.uint8)).writeto(garbled)   # -3000 bytes: the next HDU is this one
    data = bytearray(garbled.read_bytes())
    i = data.index(b"NAXIS1  =")
    data[i:i + 80] = b"NAXIS1  = -3000".ljust(80)
    garbled.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "masters", str(tmp_path / "calib"), "-o",
                        str(tmp_path / "M"), "-q"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "M" / "masters.json").read_text())
    assert [e["kind"] for e in index["masters"]] == ["dark"], index
    assert any(s["file"].endswith("garbled.fits") for s in index["skipped"]), index["skipped"]


def test_a_targets_folder_named_like_a_kind_does_not_make_its_lights_darks(tmp_path):
    """ASIAIR keeps lights in Autorun/Light/<target>/: a target named "Dark Shark Nebula" was read as a darks folder
    (the nearest folder whose name begins with a kind won), so its lights went into the master dark — more lights
    than darks, and the real darks were the ones left out as "another offset".  A name that goes on with other
    words gives way to a folder further up (Light/), then to IMAGETYP; it decides only when nothing else says
    anything (a user's "darks_canon" of IMAGETYP-less frames)."""
    from livestack.masters import discover

    small = dataclasses.replace(SIM, width=64, height=48)
    calib = tmp_path / "Autorun"
    for folder, kind, t in (("Light/Dark Shark Nebula", "light", 60.0), ("Dark", "dark", 60.0),
                            ("Flatiron Nebula", "light", 60.0)):      # a target's folder, lights by IMAGETYP
        (calib / folder).mkdir(parents=True)
        for i in range(2):
            raw, _ = render_frame(small, i, kind=kind, exptime=t, noise=False)
            write_sim(calib / folder / f"{kind}_{i}.fits", small, raw, kind, t)
    (calib / "darks_canon").mkdir()
    fits.PrimaryHDU(np.full((48, 64), 600, np.uint16)).writeto(calib / "darks_canon" / "d.fits")  # no IMAGETYP
    found, skipped = discover(calib)
    assert [p.relative_to(calib).as_posix() for p in found["dark"]] == [
        "Dark/dark_0.fits", "Dark/dark_1.fits", "darks_canon/d.fits"]
    assert not found["flat"]
    why = {s["file"]: s["reason"] for s in skipped}
    assert why["Light/Dark Shark Nebula/light_0.fits"] == (
        "a light frame (its folder 'Light' says so; the folder 'Dark Shark Nebula' reads as a target's name, not "
        "as dark frames)")
    assert why["Flatiron Nebula/light_1.fits"].startswith("a light frame (its IMAGETYP says so; the folder "
                                                              "'Flatiron Nebula'")


def test_masters_are_found_by_their_imagetyp_master_kind(tmp_path):
    """Masters made earlier (by livestack: IMAGETYP 'Master Dark', …; other programs write 'MASTERDARK' and the
    like) in a folder whose name says no kind were "not a calibration frame": `livestack masters` on a folder of
    them said "no calibration frames found (… or FITS IMAGETYP)".  'Master <kind>' is that kind."""
    from livestack.masters import discover

    small = dataclasses.replace(SIM, width=64, height=48)
    render_calibration(tmp_path / "calib", small, n_bias=3, n_dark=3, n_flat=3, n_darkflat=3)
    build_library(tmp_path / "calib", tmp_path / "M")
    (tmp_path / "again" / "last_month").mkdir(parents=True)
    for f in (tmp_path / "M").glob("*.fits"):
        shutil.copy(f, tmp_path / "again" / "last_month" / f.name)
    other = tmp_path / "again" / "last_month" / "other_program.fits"
    fits.PrimaryHDU(np.full((48, 64), 500, np.float32), fits.Header([("IMAGETYP", "MASTERDARK")])).writeto(other)
    found, skipped = discover(tmp_path / "again")
    assert {k: sorted(p.name.split("_")[0] for p in v) for k, v in found.items()} == {
        "bias": ["bias"], "dark": ["dark", "other"], "darkflat": ["darkflat"], "flat": ["flat"]}
    assert skipped == []
    lib = build_library(tmp_path / "again", tmp_path / "M2")
    assert sorted(e.kind for e in lib.entries) == ["bias", "dark", "dark", "darkflat", "flat"]


def test_xisf_calibration_frames_are_said_not_passed_over(tmp_path):
    """NINA can save XISF: a calibration folder of XISF frames gave "no calibration frames found (folders bias/,
    darks/, … or FITS IMAGETYP)" although its DARK/ and FLAT/ were full — the files were passed over unsaid.
    Each is listed as skipped with what livestack reads, and the error says how many and why."""
    from livestack.masters import MasterError

    for folder in ("DARK", "FLAT"):
        (tmp_path / "calib" / folder).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "calib" / folder / f"{folder.lower()}_{i}.xisf").write_bytes(b"XISF0100" + bytes(100))
    with pytest.raises(MasterError) as err:
        build_library(tmp_path / "calib", tmp_path / "M")
    assert str(err.value).endswith("or FITS IMAGETYP); 4 files skipped, DARK/dark_0.xisf: an XISF file: livestack "
                                   "reads FITS and camera RAW files (have the capture program save FITS)"), err.value


def test_a_library_in_its_calibration_folder_is_not_read_as_frames_on_a_rebuild(tmp_path):
    """`livestack masters CALIB -o CALIB` run again: the masters of the first build, at CALIB's top level, were read
    as frames (their IMAGETYP 'Master Flat' is a flat) — the master flat went into the new one, the master dark and
    bias were left out with "noise … below …: a processed frame?".  The library's own masters are not frames."""
    small = dataclasses.replace(SIM, width=64, height=48)
    calib = tmp_path / "calib"
    render_calibration(calib, small, n_bias=3, n_dark=3, n_flat=3, n_darkflat=0)
    first = build_library(calib, calib)
    again = build_library(calib, calib)
    assert sorted((e.kind, e.ncombine) for e in again.entries) == [("bias", 3), ("dark", 3), ("flat", 3)]
    assert again.skipped == first.skipped == []


def test_a_flat_is_found_under_another_spelling_of_its_filter(tmp_path):
    """Flats taken as 'R' calibrate lights whose capture program writes 'Red' (and not the G ones): the library
    matches filters as the stacks do (filter_key), not by the exact name."""
    cfg = dataclasses.replace(SIM, n_frames=2, filters=("R", "G"))
    render_calibration(tmp_path / "calib", cfg, n_bias=0, n_dark=3, n_flat=3, n_darkflat=3)
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    frame, _ = sim_frame(tmp_path, cfg, "light", 60.0)
    for spelling, flat in (("Red", "flat_R"), ("green", "flat_G")):
        frame.meta.filter = spelling
        assert lib.select(frame).names["flat"].startswith(flat + "_"), spelling


def test_a_light_without_filter_gets_no_guessed_flat_among_several_filters(tmp_path):
    """A light with no FILTER card and a library of R and G flats (none without a filter) was given the flat of
    most frames, silently: which filter it was taken through is unknown, so that is a mismatch — failed, or
    calibrated without a flat under on_mismatch = "skip", with the reason.  With one filter's flats alone, or a
    flat without filter among them, the light still gets that flat."""
    cfg = dataclasses.replace(SIM, width=64, height=48, n_frames=2, filters=("R", "G"))
    render_calibration(tmp_path / "calib", cfg, n_bias=0, n_dark=0, n_flat=3, n_darkflat=0)
    build_library(tmp_path / "calib", tmp_path / "M")
    frame, _ = sim_frame(tmp_path, cfg, "light", 60.0)
    frame.meta.filter = None
    why = "the frame has no FILTER and the master flats are for filters 'G', 'R': which one is unknown"
    with pytest.raises(FrameError, match=why):
        MasterLibrary.load(tmp_path / "M").select(frame)
    skip = MasterLibrary.load(tmp_path / "M", CalibrationParams(on_mismatch="skip")).select(frame)
    assert skip.flat is None and skip.notes == {"flat_skipped": why}
    frame.meta.filter = "R"
    assert MasterLibrary.load(tmp_path / "M").select(frame).names["flat"].startswith("flat_R_")


# ---------------------------------------------------------------- mismatches

def test_wrong_size_master_gives_the_clear_error(lib, tmp_path):
    small = dataclasses.replace(SIM, width=256, height=192)
    frame, _ = sim_frame(tmp_path, small, "light", 60.0)
    with pytest.raises(FrameError) as err:
        lib.select(frame)
    assert str(err.value) == (f"{frame.path.name}: master dark dark_60s_-10C_iso800_g120_SIMCAM-1_320x240 "
                              "is 320×240 but the frame is 256×192")
    assert err.value.path == frame.path


def test_wrong_camera_master_gives_the_clear_error(lib, tmp_path):
    frame, _ = sim_frame(tmp_path, dataclasses.replace(SIM, camera="OTHER CAM"), "light", 60.0)
    with pytest.raises(FrameError, match="is from camera 'SIMCAM 1' but the frame is from 'OTHER CAM'"):
        lib.select(frame)


def test_warm_dark_is_refused(lib, tmp_path):
    frame, _ = sim_frame(tmp_path, dataclasses.replace(SIM, temperature=0.0), "light", 60.0)
    with pytest.raises(FrameError, match=r"taken at -10.0 °C but the frame at 0.0 °C"):
        lib.select(frame)


def test_a_bias_of_another_iso_does_not_fail_a_light_with_its_exact_dark(tmp_path):
    calib = tmp_path / "calib"
    render_calibration(calib, SIM, n_bias=0, n_dark=3, n_flat=0, n_darkflat=0)
    render_calibration(tmp_path / "b", dataclasses.replace(SIM, iso=100), n_bias=3, n_dark=0, n_flat=0,
                       n_darkflat=0)
    shutil.move(tmp_path / "b" / "bias", calib / "bias")
    lib = build_library(calib, tmp_path / "M")
    frame, _ = sim_frame(tmp_path, SIM, "light", 60.0)
    assert set(lib.select(frame).names) == {"dark"}
    frame, _ = sim_frame(tmp_path, SIM, "light", 120.0)          # now the bias is needed to scale
    with pytest.raises(FrameError, match="master bias bias_iso100_.* is ISO 100 but the frame is ISO 800"):
        lib.select(frame)


def test_skip_mode_calibrates_without_the_master_and_records_why(lib, tmp_path):
    skip = MasterLibrary.load(lib.root, CalibrationParams(on_mismatch="skip"))
    frame, _ = sim_frame(tmp_path, dataclasses.replace(SIM, width=256, height=192), "light", 60.0)
    m = skip.select(frame)
    assert m.dark is None and m.flat is None and m.bias is None and m.names == {}
    cal, info = calibrate(frame, m, NO_COSMETIC)
    assert "is 320×240 but the frame is 256×192" in info["dark_skipped"]
    assert set(info) >= {"bias_skipped", "dark_skipped", "flat_skipped"}
    assert abs(float(np.median(cal))) < 1000          # black level still removed


def test_the_masters_chosen_and_a_master_skipped_are_said_once_in_the_log(lib, tmp_path, caplog):
    """Under on_mismatch = "skip" a light calibrated without its dark (none fitted) was recorded so in frames.jsonl
    only: `livestack stack` printed the light as stacked, the daemon's log said nothing, and the night looked
    calibrated.  The first light of each set of settings says, as a WARNING, which master was left out and why,
    and at INFO which masters it gets (a scaled dark too); the lights after it say nothing more."""
    import logging

    skip = MasterLibrary.load(lib.root, CalibrationParams(on_mismatch="skip"))
    warm = dataclasses.replace(SIM, temperature=5.0)
    frames_ = [sim_frame(tmp_path, warm, "light", 60.0, index=i)[0] for i in (1, 2)]
    frames_ += [sim_frame(tmp_path, SIM, "light", 120.0, index=i)[0] for i in (3, 4)]
    with caplog.at_level(logging.INFO, logger="livestack"):
        for f in frames_:
            skip.select(f)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("WARNING", "light_1_60s.fits (and the lights of its settings): calibrated without a master dark "
                    "(on_mismatch = \"skip\"): master dark dark_60s_-10C_iso800_g120_SIMCAM-1_320x240 was taken at "
                    "-10.0 °C but the frame at 5.0 °C (tolerance 3 °C)"),
        ("INFO", "light_1_60s.fits (and the lights of its settings): masters bias=bias_iso800_g120_SIMCAM-1_320x240, "
                 "flat=flat_iso800_g120_SIMCAM-1_320x240"),
        ("INFO", "light_3_120s.fits (and the lights of its settings): masters bias=bias_iso800_g120_SIMCAM-1_320x240, "
                 "dark=dark_60s_-10C_iso800_g120_SIMCAM-1_320x240, flat=flat_iso800_g120_SIMCAM-1_320x240 "
                 "(dark scaled ×2)")], said
    assert skip.summary() == "1 bias, 1 dark, 1 dark-flat, 1 flat"      # `livestack run` says it as it starts


def test_a_mismatch_names_every_flat_filter_and_the_nearest_dark(tmp_path):
    """No master fits: the reason named the first one listed — "master flat flat_L… is for filter 'L'" when an
    OIII flat was there too, "taken at -25.0 °C" when a dark at -15 °C was nearer the light's -10 °C.  Flats of
    other filters are all named; among darks, the nearest temperature."""
    from livestack.masters import MasterEntry

    def entry(kind, name, **kw):
        d = dict(name=name, file=name + ".fits", kind=kind, camera="SIMCAM 1", width=64, height=48, pattern="RGGB",
                 iso=800, gain=120.0, exptime=None, temperature=None, filter=None, ncombine=3, method="clipped",
                 kappa=3.0, sources=())
        d.update(kw)
        return MasterEntry(**d)

    lib = MasterLibrary(tmp_path, [entry("flat", "flat_L", filter="L"), entry("flat", "flat_OIII", filter="OIII"),
                                   entry("dark", "dark_m25", exptime=60.0, temperature=-25.0),
                                   entry("dark", "dark_m15", exptime=60.0, temperature=-15.0)],
                        CalibrationParams(on_mismatch="skip"))
    frame, _ = sim_frame(tmp_path, dataclasses.replace(SIM, width=64, height=48, filter="Ha"), "light", 60.0)
    notes = lib.select(frame).notes
    assert notes["flat_skipped"] == "no master flat for filter 'Ha' (the master flats are for 'L', 'OIII')"
    assert notes["dark_skipped"] == ("master dark dark_m15 was taken at -15.0 °C but the frame at -10.0 °C "
                                     "(tolerance 3 °C)")


def test_a_light_without_temperature_gets_no_guessed_dark_among_several_temperatures(tmp_path):
    """A light without CCD-TEMP and master darks of its exposure at -20 °C and -10 °C: the dark of most frames was
    taken, silently, whichever its temperature — the tolerance exists because dark current doubles every few
    degrees.  Which one fits is unknown: a mismatch (failed, or skipped and said).  Darks within the tolerance of
    each other, or a dark of another exposure than the nearest, are no guess."""
    from livestack.masters import MasterEntry

    def dark(name, temperature, exptime=60.0, n=3):
        return MasterEntry(name=name, file=name + ".fits", kind="dark", camera="SIMCAM 1", width=64, height=48,
                           pattern="RGGB", iso=800, gain=120.0, exptime=exptime, temperature=temperature,
                           filter=None, ncombine=n, method="clipped", kappa=3.0, sources=())

    frame, _ = sim_frame(tmp_path, dataclasses.replace(SIM, width=64, height=48), "light", 60.0)
    frame.meta.temperature = None
    lib = MasterLibrary(tmp_path, [dark("d_m20", -20.0, n=5), dark("d_m10", -10.0), dark("d_300", -30.0, 300.0)],
                        CalibrationParams(on_mismatch="skip"))
    assert lib.select(frame).notes == {"dark_skipped": (
        "the frame has no sensor temperature (CCD-TEMP) and the master darks of 60 s were taken at -20.0 °C, "
        "-10.0 °C: which one fits is unknown")}
    near = MasterLibrary(tmp_path, [dark("d_m10", -10.0), dark("d_m11", -11.5, n=5)])
    near._arrays = {"d_m10": np.zeros((48, 64), np.float32), "d_m11": np.zeros((48, 64), np.float32)}
    near._bad = {"d_m10": None, "d_m11": None}
    assert near.select(frame).names == {"dark": "d_m11"}


def test_darks_of_another_offset_or_binning_are_kept_apart_and_refused(tmp_path):
    """NINA, ASIAIR and INDI write the camera's OFFSET: darks taken at offset 10 and at 50 have pedestals apart, yet
    they made one master (or the minority was left out as "another offset"), and a light of offset 50 was given a
    dark of offset 10 — its level wrong, which the flat then turns into a vignetting pattern.  Frames are grouped
    by OFFSET and binning (XBINNING × YBINNING) when the FITS says them, and a bias or dark of another offset, a
    master of another binning, is refused like one of another gain."""

    small = dataclasses.replace(SIM, width=64, height=48)
    folder = tmp_path / "calib" / "DARK"
    folder.mkdir(parents=True)
    for i in range(6):
        raw, _ = render_frame(small, i, kind="dark", exptime=60.0)
        f = write_sim(folder / f"dark_{i}.fits", small, raw, "dark", 60.0)
        with fits.open(f, mode="update") as h:
            h[0].header["OFFSET"] = 10 if i < 3 else 50
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    assert sorted((e.offset, e.ncombine, e.binning) for e in lib.entries) == [(10.0, 3, "1x1"), (50.0, 3, "1x1")]
    assert {fits.getheader(tmp_path / "M" / e.file)["OFFSET"] for e in lib.entries} == {10, 50}
    lib = MasterLibrary.load(tmp_path / "M")
    frame, _ = sim_frame(tmp_path, small, "light", 60.0)
    frame.meta.extra["OFFSET"] = 50
    assert lib.select(frame).names["dark"] == next(e.name for e in lib.entries if e.offset == 50)
    frame.meta.extra["OFFSET"] = 30
    with pytest.raises(FrameError, match="has offset 10 but the frame has offset 30"):
        lib.select(frame)
    frame.meta.extra.update(OFFSET=50, XBINNING=2, YBINNING=2)
    with pytest.raises(FrameError, match="is binned 1x1 but the frame 2x2"):
        lib.select(frame)


def test_engine_records_a_mismatch_as_failed(lib, tmp_path):
    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    small = dataclasses.replace(SIM, width=256, height=192, n_frames=1)
    render_night(tmp_path / "l", small)
    rec = Engine(Config(), masters=lib).process(next((tmp_path / "l").glob("light_*.fits")))
    assert rec.status == "failed" and "is 320×240 but the frame is 256×192" in rec.reason


# ---------------------------------------------------------------- combining: streaming == in memory

def clipped_reference(a: np.ndarray, kappa: float) -> np.ndarray:
    """The documented rule, written plainly on the whole (N, H, W) stack in float64."""
    a = a.astype(np.float64)
    med = np.median(a, axis=0)
    keep = np.empty(a.shape, bool)
    for i in range(a.shape[0]):
        others = np.delete(a, i, axis=0)
        keep[i] = np.abs(a[i] - med) <= kappa * others.std(axis=0, ddof=1)
    n = keep.sum(axis=0)
    return np.where(n > 0, (a * keep).sum(axis=0) / np.maximum(n, 1), med)


def _frames(n, h, w, seed, *, integer=True):
    rng = np.random.default_rng(seed)
    a = 1000 + 10 * rng.standard_normal((n, h, w))
    a += np.linspace(0, 300, w)[None, None, :]                    # structure, so rows differ
    hits = rng.random(a.shape) < 0.003
    a[hits] += rng.uniform(500, 5000, hits.sum())                 # cosmic rays
    return (np.rint(a) if integer else a).astype(np.float32), hits


@pytest.mark.parametrize("method", ["clipped", "median"])
@pytest.mark.parametrize("integer", [True, False])
def test_streaming_combine_equals_in_memory(tmp_path, method, integer):
    a, hits = _frames(9, 50, 40, seed=2, integer=integer)
    spill = Spill(tmp_path / "s.bin", (50, 40))
    for f in a:
        spill.append(f)
    assert spill.dtype == (np.uint16 if integer else np.float32)
    p = CalibrationParams(method=method, chunk_rows=4)
    got, _ = combine_spill(spill, p)
    spill.remove()
    ref = np.median(a, axis=0) if method == "median" else clipped_reference(a, p.kappa)
    assert got.dtype == np.float32 and got.shape == (50, 40)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
    if method == "clipped":  # a lone cosmic-ray hit in a pixel is rejected (a plain mean would keep 1/9 of it)
        one = hits.sum(axis=0) == 1
        clean_mean = np.where(hits, 0, a).sum(axis=0)[one] / 8
        assert one.sum() > 40 and np.abs(got[one] - clean_mean).max() < 12


def test_spill_switches_to_float32_when_a_frame_is_not_integer(tmp_path):
    a, _ = _frames(3, 20, 16, seed=4)
    spill = Spill(tmp_path / "s.bin", (20, 16))
    spill.append(a[0])
    spill.append(a[1] + np.float32(0.25))
    spill.append(a[2])
    assert spill.dtype == np.float32
    np.testing.assert_array_equal(spill.rows(0, 20), np.stack([a[0], a[1] + np.float32(0.25), a[2]]))
    spill.remove()
    assert not (tmp_path / "s.bin").exists()


def test_clipping_rejects_a_lone_cosmic_ray_among_five():
    block = np.full((5, 1, 1), 1000.0, np.float32) + np.array([0, 2, -2, 1, 3000], np.float32)[:, None, None]
    out, clipped = combine_block(block, "clipped", 3.0)
    assert out[0, 0] == pytest.approx(1000.25) and clipped == 1


def test_build_memory_is_bounded(tmp_path):
    """24 flats of 640×480: the combine reads 8 rows of all frames at a time, so the peak is a few frames
    (reading one, the master and its bad map), not 24."""
    n = 24
    cfg = dataclasses.replace(SIM, seed=8, width=640, height=480)
    calib = tmp_path / "calib" / "flats"
    calib.mkdir(parents=True)
    for k in range(n):
        raw, meta = render_frame(cfg, k, kind="flat")
        sim_write_fits(calib / f"f{k:02d}.fits", raw, meta, cfg)
    frame_bytes = cfg.width * cfg.height * 4
    # warm-up: the first build imports astropy's table and I/O modules (~5 MiB traced), not frame data
    tiny = dataclasses.replace(cfg, width=32, height=32)
    render_calibration(tmp_path / "tiny", tiny, n_bias=0, n_dark=3, n_flat=0, n_darkflat=0)
    build_library(tmp_path / "tiny", tmp_path / "tinyM")
    tracemalloc.start()
    t0 = time.perf_counter()
    lib = build_library(tmp_path / "calib", tmp_path / "M", CalibrationParams(chunk_rows=8))
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"build of {n} × {cfg.width}×{cfg.height}: peak {peak / 2**20:.2f} MiB traced "
          f"(all frames: {n * frame_bytes / 2**20:.1f} MiB), {seconds:.2f} s")
    assert lib.entries[0].ncombine == n
    assert peak < 6 * frame_bytes                     # all 24 frames would be 24 × frame_bytes


# ---------------------------------------------------------------- real files, config, command line

@pytest.mark.skipif(not (SHARED / "not_alfosc_raw_flat.fits").exists(), reason="../shared/data not present")
def test_real_files_grouped_by_imagetyp(tmp_path):
    calib = tmp_path / "night"
    calib.mkdir()
    for name in ("not_alfosc_raw_flat.fits", "saao_1m_ste3_ccd_light_a8280271.fits",
                 "sbig_st1602_maxim_light_thar.fit"):
        (calib / name).symlink_to(SHARED / name)
    lib = build_library(calib, tmp_path / "M")
    (e,) = lib.entries
    assert (e.kind, e.ncombine, e.width, e.height, e.pattern) == ("flat", 1, 2148, 2052, None)
    assert e.camera == "ALFOSC_FASU" and e.exptime == 1.0
    flat = lib.array(e.name)
    bad = lib.bad_map(e.name)
    assert flat.dtype == np.float32 and np.isfinite(flat).all() and flat.min() >= 0.05
    assert flat[~bad].mean() == pytest.approx(1.0, abs=1e-4)
    assert bad.mean() < 0.05
    reasons = {s["file"]: s["reason"] for s in lib.skipped}
    assert set(reasons) == {"saao_1m_ste3_ccd_light_a8280271.fits", "sbig_st1602_maxim_light_thar.fit"}
    assert all("light" in r for r in reasons.values())


def test_calibration_config_section():
    cfg = config_from_dict({"calibration": {"on_mismatch": "skip", "kappa": 2.5}})
    p = calibration_params(cfg, method="median")
    assert (p.on_mismatch, p.kappa, p.method) == ("skip", 2.5, "median")
    with pytest.raises(ConfigError, match="unknown key on_mismatc"):
        calibration_params(config_from_dict({"calibration": {"on_mismatc": "skip"}}))
    with pytest.raises(ConfigError, match="on_mismatch"):
        calibration_params(config_from_dict({"calibration": {"on_mismatch": "ignore"}}))


def test_cli_masters(tmp_path, capsys):
    calib = tmp_path / "Calibration"
    render_calibration(calib, dataclasses.replace(SIM, seed=21), n_bias=3, n_dark=3, n_flat=3, n_darkflat=0)
    shutil.move(calib / "darks", calib / "Dark_60s")            # a user's own folder name
    out = tmp_path / "M"
    assert cli_main(["masters", str(calib), "-o", str(out), "--method", "median", "--kappa", "2", "-q"]) == 0
    doc = json.loads((out / "masters.json").read_text())
    assert sorted(m["kind"] for m in doc["masters"]) == ["bias", "dark", "flat"]
    assert all(m["method"] == "median" for m in doc["masters"])
    assert "3 masters" in capsys.readouterr().out
    assert cli_main(["masters", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["masters", str(tmp_path / "empty"), "-o", str(out)]) == 1


def test_stack_summary_says_the_masters_it_calibrated_with(tmp_path, capsys):
    """`livestack stack --masters M` said nothing of calibration: which masters its lights got was in the stack's
    CALIBRAT and frames.jsonl alone, and lights calibrated with none (on_mismatch = "skip") looked the same.  The
    summary says them, or that there were none."""
    cfg = dataclasses.replace(SIM, seed=23, n_frames=2)
    render_calibration(tmp_path / "calib", cfg, n_bias=0, n_dark=3, n_flat=3, n_darkflat=0)
    render_night(tmp_path / "night", cfg)
    assert cli_main(["masters", str(tmp_path / "calib"), "-o", str(tmp_path / "M"), "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["stack", str(tmp_path / "night"), "-o", str(tmp_path / "out"), "--masters", str(tmp_path / "M"),
                     "--no-solve", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("calibrated with dark=dark_60s_-10C_iso800_g120_SIMCAM-1_320x240, "
                        "flat=flat_iso800_g120_SIMCAM-1_320x240"), lines
    (tmp_path / "skip.toml").write_text('[calibration]\non_mismatch = "skip"\n')
    for e in MasterLibrary.load(tmp_path / "M").entries:     # masters of another camera: none fits
        f = tmp_path / "M" / e.file
        with fits.open(f, mode="update") as h:
            h[0].header["INSTRUME"] = "OTHER"
    doc = json.loads((tmp_path / "M" / "masters.json").read_text())
    for m in doc["masters"]:
        m["camera"] = "OTHER"
    (tmp_path / "M" / "masters.json").write_text(json.dumps(doc))
    assert cli_main(["stack", str(tmp_path / "night"), "-o", str(tmp_path / "out"), "--masters", str(tmp_path / "M"),
                     "--no-solve", "-q", "--config", str(tmp_path / "skip.toml")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "calibrated with no master (see frames.jsonl)"


def test_an_interrupted_rebuild_keeps_the_masters_it_has_not_made_again(tmp_path, monkeypatch):
    """`livestack masters` run again on a library (new flats added, say) saves masters.json after each master it
    makes; it started from an empty list, so a rebuild interrupted after the bias (Ctrl-C, a power cut) left an
    index of the bias alone: the darks and flats, still on disk, were no longer found and the night's lights
    went uncalibrated.  Each master not yet made again stays listed until the rebuild replaces it; a finished
    rebuild lists exactly what it made."""
    import livestack.masters as masters

    render_calibration(tmp_path / "calib", SIM, n_bias=3, n_dark=3, n_flat=3, n_darkflat=3, dark_exptime=DARK_T)
    build_library(tmp_path / "calib", tmp_path / "lib")
    before = {e.file: e.kind for e in MasterLibrary.load(tmp_path / "lib").entries}
    assert sorted(before.values()) == ["bias", "dark", "darkflat", "flat"]

    make = masters._make_master

    def interrupted(g, lib, p, skipped):
        if g.kind == "dark":
            raise KeyboardInterrupt
        return make(g, lib, p, skipped)

    monkeypatch.setattr(masters, "_make_master", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_library(tmp_path / "calib", tmp_path / "lib")
    after = MasterLibrary.load(tmp_path / "lib")
    assert {e.file: e.kind for e in after.entries} == before
    assert after.select(sim_frame(tmp_path, SIM, "light", DARK_T)[0]).flat is not None
    # one master's file deleted by hand meanwhile: the index that lists it is not usable as it is, but the other
    # masters it lists still stay until made again (only the missing one is left out)
    gone = next(f for f, kind in before.items() if kind == "darkflat")
    (tmp_path / "lib" / gone).unlink()
    with pytest.raises(KeyboardInterrupt):
        build_library(tmp_path / "calib", tmp_path / "lib")
    assert {e.file: e.kind for e in MasterLibrary.load(tmp_path / "lib").entries} == \
        {f: kind for f, kind in before.items() if f != gone}

    monkeypatch.setattr(masters, "_make_master", make)
    shutil.rmtree(tmp_path / "calib" / "flats")            # a rebuild that ends lists what it made, no more
    build_library(tmp_path / "calib", tmp_path / "lib")
    assert sorted(e.kind for e in MasterLibrary.load(tmp_path / "lib").entries) == ["bias", "dark", "darkflat"]
