"""A frame's own WCS (capture programs write one) against the grid's predicts where the frame lies: registration
starts from it — no star pattern needed — and the stars still decide."""
from __future__ import annotations

import numpy as np
import pytest

from drivers.simulator import SimConfig, render_night
from livestack.config import Config
from livestack.engine import geometry
from livestack.engine.pipeline import Engine, _wcs_guess
from livestack.engine.read import read_frame
from livestack.engine.solve import wcs_to_grid

from conftest import truth_matrix

M13 = (250.42, 36.46)


@pytest.fixture(scope="module")
def jumpy(tmp_path_factory):
    """Mono frames with a TAN WCS in each header, 60 px random jumps and 2° of rotation a frame."""
    d = tmp_path_factory.mktemp("wcs-night")
    cfg = SimConfig(width=480, height=360, n_frames=8, mono=True, seed=4, sky_seed=9, n_stars=500, pointing=M13,
                    wcs=True, dither_px=60, rotation_deg=2.0, nebula=False)
    truth = render_night(d, cfg)
    return [d / f["file"] for f in truth["frames"]], truth


def _run(files, *, with_wcs: bool):
    eng = Engine(Config())
    recs = []
    for f in files:
        rec = eng.process(f)
        if rec.status == "reference" and with_wcs:       # what the daemon does with the reference's own WCS
            eng.set_wcs(wcs_to_grid(read_frame(f).meta.wcs, eng.grid.sensor_to_grid))
        recs.append(rec)
    return eng, recs


def test_the_wcs_guess_is_the_true_transform(jumpy):
    files, truth = jumpy
    eng, recs = _run(files[:1], with_wcs=True)
    assert recs[0].status == "reference"
    for i in range(1, len(files)):
        guess = _wcs_guess(read_frame(files[i]).meta.wcs, eng.grid)
        assert geometry.rms_error(guess, truth_matrix(truth, i), (360, 480)) < 0.01


def test_frames_register_from_the_wcs_guess_and_land_where_the_stars_say(jumpy):
    files, truth = jumpy
    _, plain = _run(files, with_wcs=False)
    _, wcs = _run(files, with_wcs=True)
    stacked = [i for i, r in enumerate(wcs) if r.status == "stacked"]
    assert len(stacked) >= 5 and [r.status for r in plain] == [r.status for r in wcs]
    assert all(wcs[i].registration == "predicted" for i in stacked)
    assert sum(plain[i].registration == "pattern" for i in stacked) >= 3      # the jumps defeat last frame's
    for i in stacked:
        err = geometry.rms_error(np.array(wcs[i].matrix), truth_matrix(truth, i), (360, 480))
        assert err < 0.05, (i, err)


def test_a_wrong_wcs_does_not_mislead_the_stars(jumpy, tmp_path):
    """A frame whose header WCS is off by 30 px (an approximate pointing WCS): the guess pairs no stars, the
    pattern match registers it — correctly."""
    from astropy.io import fits

    files, truth = jumpy
    bad = tmp_path / files[3].name
    with fits.open(files[3]) as h:
        h[0].header["CRPIX1"] += 30.0
        h.writeto(bad)
    eng, recs = _run([files[0], bad], with_wcs=True)
    assert recs[1].status == "stacked" and recs[1].registration == "pattern"
    assert geometry.rms_error(np.array(recs[1].matrix), truth_matrix(truth, 3), (360, 480)) < 0.05
