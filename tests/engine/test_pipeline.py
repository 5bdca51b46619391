"""The core engine end to end on simulated nights with known truth (issue #2's acceptance tests)."""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
from astropy.io import fits

from conftest import through_checkpoints, truth_matrix
from livestack.config import Config
from livestack.engine import geometry
from livestack.engine.pipeline import Engine
from livestack.session import SessionError, load_engine, save_engine


def run(files, cfg=None):
    eng = Engine(cfg or Config())
    return eng, [eng.process(f) for f in files]


def block_noise(img: np.ndarray, box: int = 4) -> float:
    """Background σ of 4×4-block means, from differences of neighbouring blocks (a smooth nebula or gradient
    does not count, and neither does the pixel-scale correlation that interpolation adds)."""
    h, w = (img.shape[0] // box) * box, (img.shape[1] // box) * box
    b = img[:h, :w].reshape(h // box, box, w // box, box).mean(axis=(1, 3))
    d = np.diff(b, axis=1).ravel()
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)


@pytest.mark.parametrize("kw", [
    {"rotation_deg": 0.5 / 9},                 # field rotation reaching 0.5° at the last frame
    {"rotation_deg": 0.02, "flip_at": 5},      # meridian flip: 180° from frame 5 on
    {"drift_px": (3.0, -2.0), "dither_px": 4.0},
])
def test_registration_matches_known_transforms(night, kw):
    files, truth = night(n_frames=10, seed=11, **kw)
    _, recs = run(files)
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 9, [r.reason for r in recs]
    errs = [geometry.rms_error(np.array(r.matrix), truth_matrix(truth, i), (480, 640)) for i, r in enumerate(recs)]
    rms = float(np.sqrt(np.mean(np.square(errs))))
    assert rms <= 0.05, errs
    if "flip_at" in kw:
        assert abs(abs(recs[7].rotation) - 180) < 2


def test_cloudy_and_wind_frames_rejected_no_good_frame_rejected(night):
    files, truth = night(n_frames=12, seed=5, defects={4: "cloudy", 8: "wind"})
    _, recs = run(files)
    by_status = {r.file: r.status for r in recs}
    for i, f in enumerate(truth["frames"]):
        expected = "rejected" if f["defect"] in ("cloudy", "wind") else ("reference" if i == 0 else "stacked")
        assert by_status[f["file"]] == expected, (f["file"], recs[i].reason)
    assert "clouds" in recs[4].reason
    assert "eccentricity" in recs[8].reason or "fwhm" in recs[8].reason


def run_judged(files, cfg=None):
    """(engine, records, Engine.amended of every frame) of ``files`` processed in turn."""
    eng = Engine(cfg or Config())
    recs, amended = [], []
    for f in files:
        recs.append(eng.process(f))
        amended += eng.amended
        eng.amended.clear()
    return eng, recs, amended


@pytest.mark.parametrize("filters", [(), ("L", "R")])
def test_a_trailed_first_frame_is_judged_by_the_frames_after_it(night, tmp_path, filters):
    """The first frame of a filter (the session's reference among them) is stacked before there is anything to
    judge it by: a trailed one (the mount settling after a slew) is rejected once its bootstrap holds the next
    frames, left out of the stack (the WEIGHT sum is the stacked frames' weights alone) and out of the counts,
    and reported through Engine.amended; a checkpoint inside the bootstrap gives the same.  With two filters
    the R stack's first frame (the second file) is judged the same way."""
    n = 10 if not filters else 14
    bad = 0 if not filters else 1
    files, truth = night(n_frames=n, seed=5, defects={bad: "wind"}, filters=filters)
    eng, recs, amended = run_judged(files)
    assert [a["file"] for a in amended] == [files[bad].name]
    assert amended[0]["status"] == "rejected" and "left out of the stack" in amended[0]["reason"], amended
    assert ("still the grid's reference" in amended[0]["reason"]) == (bad == 0)
    assert recs[bad].status == ("reference" if bad == 0 else "stacked")        # as it was first recorded
    assert all(r.status in ("reference", "stacked") for r in recs), [r.reason for r in recs]
    fs = list(eng.filters.values())[bad]
    mine = [r for r in recs if r.file != files[bad].name and r.filter == recs[bad].filter]
    assert fs.counts.stacked == len(mine) and fs.counts.rejected == 1
    assert fs.counts.exptime == pytest.approx(sum(r.exptime for r in mine))
    _, wsum = eng.result(recs[bad].filter)
    assert float(np.nanmax(wsum)) == pytest.approx(sum(r.weight for r in mine), rel=1e-4)
    part = through_checkpoints(files, [bad + 2, bad + 5], tmp_path)   # before and after the verdict
    for key in eng.filters:
        a, wa = eng.result(eng.filters[key].name)
        b, wb = part.result(part.filters[key].name)
        assert np.array_equal(a, b) and np.array_equal(wa, wb)


def test_a_trailed_first_frame_is_judged_with_a_bootstrap_of_two(night, tmp_path):
    """`[stack] bootstrap = 2`: the buffer holds the first frame and the one after it — judged against that one
    (as that one was against it), the trailed first frame is left out; it stayed in the stack unjudged."""
    import dataclasses

    files, _ = night(n_frames=6, seed=5, defects={0: "wind"})
    cfg = dataclasses.replace(Config(), stack=dataclasses.replace(Config().stack, bootstrap=2))
    eng, _, amended = run_judged(files, cfg)
    assert [a["file"] for a in amended] == [files[0].name], amended
    assert "against the 1 frame after it: left out of the stack" in amended[0]["reason"], amended[0]["reason"]
    assert eng.n_stacked == 5 and eng.n_rejected == 1
    part = through_checkpoints(files, [1, 2, 3], tmp_path, cfg)
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb) and part.counts == eng.counts


@pytest.mark.parametrize("window", [1, 2])
def test_a_trailed_first_frame_is_judged_with_a_window_below_the_bootstrap(night, tmp_path, window):
    """`[reject] window` below `[stack] bootstrap` (3): the judge's history no longer held every frame of the
    buffer and the first frame's verdict never came — a trailed first frame stayed in the stack.  It is judged
    against all the frames after it whatever the window; the same through checkpoints inside the bootstrap."""
    files, _ = night(n_frames=6, seed=5, defects={0: "wind"})
    cfg = dataclasses.replace(Config(), reject=dataclasses.replace(Config().reject, window=window))
    eng, recs, amended = run_judged(files, cfg)
    assert [a["file"] for a in amended] == [files[0].name], amended
    assert "against the 2 frames after it: left out of the stack" in amended[0]["reason"], amended[0]["reason"]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 5, [r.reason for r in recs]
    assert eng.n_stacked == 5 and eng.n_rejected == 1
    assert len(list(eng.filters.values())[0].judge.history) == window
    part = through_checkpoints(files, [1, 2, 3], tmp_path, cfg)
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb) and part.counts == eng.counts


def test_a_good_first_frame_stays_in_the_stack(night):
    """Frames after a good first frame that are a little worse (or better) do not reject it."""
    files, _ = night(n_frames=5, seed=8, defects={3: "wind"})
    eng = Engine(Config())
    recs = [eng.process(f) for f in files]
    assert [r.status for r in recs] == ["reference", "stacked", "stacked", "rejected", "stacked"]
    assert eng.amended == [] and eng.n_stacked == 4


@pytest.mark.parametrize("defects", [{2: "satellite"}, {0: "wind"}])
def test_the_frame_filling_the_bootstrap_is_combined_as_it_is_stacked(night, monkeypatch, defects):
    """The third frame goes straight into the accumulators beside the two buffered (RunningStack.add_channels'
    combine) when the first frames' verdict leaves none out — the stack the buffer's combination would make,
    but for that frame's float16 rounding (2^-11 of its values) — and waits in the buffer when the verdict
    leaves the trailed first frame out, which it still does (the frame that fills the buffer again is
    combined)."""
    from livestack.engine.stack import RunningStack

    trailed = defects == {0: "wind"}
    files, _ = night(n_frames=5, seed=5 if trailed else 8, defects=defects)
    combined, recs = [], []
    real = RunningStack._combine_with
    monkeypatch.setattr(RunningStack, "_combine_with", lambda st, *a: combined.append(len(recs)) or real(st, *a))
    eng = Engine(Config())
    for f in files:
        recs.append(eng.process(f))
    a, wa = eng.result()
    # the third file combined as it is stacked; with the first frame left out, the fourth, which fills the buffer again
    assert combined == ([3] if trailed else [2])
    assert bool(eng.amended) == trailed and eng.n_stacked == (4 if trailed else 5), [r.reason for r in recs]
    fs = list(eng.filters.values())[0]
    assert fs.first_judged and len(fs.boot) == (2 if trailed else 3) and fs.stack.buffer == []
    monkeypatch.setattr(RunningStack, "fills_bootstrap", property(lambda st: False))
    old = Engine(Config())
    for f in files:
        old.process(f)
    b, wb = old.result()
    assert np.array_equal(wa, wb) and np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=2 ** -10, atol=0.25)     # (float16: 2^-11 of a value, one of five frames)
    assert np.nanmedian(np.abs(a - b)) < 2 ** -11 * np.nanmedian(b)
    assert fs.stack.rejected_total == list(old.filters.values())[0].stack.rejected_total


@pytest.mark.parametrize("defect_frame", [0, 5])   # an outlier in the reference itself must vanish too
def test_satellite_and_cosmic_rays_vanish(night, defect_frame):
    defects = {defect_frame: "satellite", 7: "cosmic"}
    files_d, truth = night("defects", n_frames=9, seed=21, defects=defects)
    files_c, _ = night("clean", n_frames=9, seed=21)  # identical noise: a defect changes only itself
    eng_d, _ = run(files_d)
    eng_c, _ = run(files_c)
    img_d, w_d = eng_d.result()
    img_c, _ = eng_c.result()
    sigma = block_noise(img_c[1], box=1)
    x0, y0, x1, y1 = truth["satellite"][str(defect_frame)]
    # sample the trail in the stack's coordinates (= reference frame; map from the defect frame)
    m = truth_matrix(truth, defect_frame)
    t = np.linspace(0.05, 0.95, 400)
    pts = geometry.apply(m, np.column_stack([x0 + t * (x1 - x0), y0 + t * (y1 - y0)]))
    ok = (pts[:, 0] > 3) & (pts[:, 0] < 636) & (pts[:, 1] > 3) & (pts[:, 1] < 476)
    xi, yi = np.rint(pts[ok]).astype(int).T
    resid = (img_d - img_c)[:, yi, xi]
    # No systematic leak along the trail, and no trail pixel left: one surviving trail pixel would stand at
    # its amplitude (≥ 300 e-) / 9 frames ≥ 10σ.  Dropping the trail frame's pixels changes the stack there by
    # the noise of one frame / 9 (~0.8σ), so over 1,200 samples the largest honest residual is ~4σ.
    assert np.abs(resid.mean()) < sigma / 3, (resid.mean(), sigma)
    assert np.abs(resid).max() < 5 * sigma, (np.abs(resid).max(), sigma)
    cosm = np.array(truth["cosmics"]["7"], float)
    cx, cy = np.rint(geometry.apply(truth_matrix(truth, 7), cosm)).astype(int).T
    inside = (cx > 1) & (cx < 638) & (cy > 1) & (cy < 478)
    hits = np.abs((img_d - img_c)[:, cy[inside], cx[inside]])
    assert hits.max() < 5 * sigma, hits.max()


def test_outlier_test_does_not_depend_on_where_its_chunks_end(night):
    """The streaming outlier test works in chunks of cell rows on the worker threads; a strong outlier's grown
    border (a satellite's) crosses chunk edges, so chunks of 8 rows reject exactly what one chunk does."""
    import dataclasses

    files, _ = night("defects", n_frames=8, seed=21, defects={5: "satellite", 6: "cosmic"})
    base = Config()
    out = []
    for rows in (256, 8):
        cfg = dataclasses.replace(base, stack=dataclasses.replace(base.stack, chunk_rows=rows))
        eng, recs = run(files, cfg)
        img, w = eng.result()
        out.append(([r.rejected_pixels for r in recs], img, w))
    assert out[0][0] == out[1][0] and max(r or 0 for r in out[0][0][4:]) > 0, out[0][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_array_equal(out[0][2], out[1][2])


def test_noise_falls_as_one_over_sqrt_n(night):
    from drivers.simulator import SimConfig, sky_field

    # A camera whose flat is perfect (no pixel response pattern, dust or vignetting): those are fixed patterns
    # that do not average down with N — calibration removes them, tests/engine/test_calibrate.py covers that —
    # and this test is about shot and read noise.
    kw = dict(n_frames=16, seed=9, nebula=False, prnu=0.0, n_dust=0, vignetting=0.0)
    files, truth = night(**kw)
    eng1, _ = run(files[:1])
    engn, recs = run(files)
    w = np.array([r.weight for r in recs])
    img1, _ = eng1.result()
    imgn, wmap = engn.result()
    # Faint stars are signal that the stack reveals, not noise: measure only 8×8 blocks far from every star
    # of the simulated sky (the reference frame is the sky grid).
    stars = sky_field(SimConfig(width=640, height=480, n_stars=600, **{k: v for k, v in kw.items()
                                                                        if k != "n_frames"})).xy
    yy, xx = np.mgrid[0:480, 0:640]
    near = np.zeros((480, 640), bool)
    for x, y in stars:
        if -10 < x < 650 and -10 < y < 490:
            xi, yi = int(round(x)), int(round(y))
            near[max(0, yi - 9):yi + 10, max(0, xi - 9):xi + 10] = True
    near[:40], near[440:], near[:, :40], near[:, 600:] = True, True, True, True  # edges: fewer frames
    assert (wmap[~near] > 0.9 * w.sum()).mean() > 0.97

    def clean_block_noise(img):
        # 8×8 blocks: the warp's interpolation correlates neighbouring pixels (a single unwarped frame has
        # none), which biases smaller blocks
        b = img.reshape(60, 8, 80, 8).mean(axis=(1, 3))
        ok = ~near.reshape(60, 8, 80, 8).any(axis=(1, 3))
        pair = ok[:, 1:] & ok[:, :-1]
        d = np.diff(b, axis=1)[pair]
        return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)

    # Inverse-variance weights: the stack's σ is the reference's σ / sqrt(sum of weights).
    ratio = clean_block_noise(imgn[1]) / clean_block_noise(img1[1])
    expected = 1 / np.sqrt(w.sum())
    assert abs(ratio / expected - 1) < 0.10, (ratio, expected)


def test_dng_and_fits_give_the_same_stack(night):
    fits_files, _ = night("fits", n_frames=5, seed=4, fmt="fits")
    dng_files, _ = night("dng", n_frames=5, seed=4, fmt="dng")
    e1, r1 = run(fits_files)
    e2, r2 = run(dng_files)
    assert [r.status for r in r1] == [r.status for r in r2] == ["reference"] + ["stacked"] * 4
    a, _ = e1.result()
    b, _ = e2.result()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_mono_night_stacks(night):
    files, truth = night(n_frames=6, seed=8, mono=True, rotation_deg=0.1)
    eng, recs = run(files)
    assert all(r.status in ("reference", "stacked") for r in recs)
    img, _ = eng.result()
    assert img.shape == (1, 480, 640) and img.dtype == np.float32
    errs = [geometry.rms_error(np.array(r.matrix), truth_matrix(truth, i), (480, 640)) for i, r in enumerate(recs)]
    assert max(errs) < 0.05


def test_a_frame_through_another_filter_goes_to_its_own_stack(night):
    lum, _ = night("lum", n_frames=3, seed=8, mono=True, filter="L")
    ha, _ = night("ha", n_frames=1, seed=8, mono=True, filter="Ha")
    eng, recs = run(lum[:2] + ha + lum[2:])
    assert [r.status for r in recs] == ["reference", "stacked", "stacked", "stacked"], [r.reason for r in recs]
    assert recs[2].filter == "Ha"
    assert eng.n_stacked == 4 and eng.filter == "L"
    assert [(fs.name, fs.counts.stacked) for fs in eng.stacks] == [("L", 3), ("Ha", 1)]


def test_bad_files_fail_with_reason_and_the_run_carries_on(night, tmp_path):
    files, _ = night(n_frames=4, seed=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.fits").write_text("this is not a FITS file\n")
    trunc = bad / "trunc.dng"
    trunc.write_bytes(files[1].read_bytes()[:5000])
    (bad / "empty.cr2").write_bytes(b"")
    (bad / "random.nef").write_bytes(np.random.default_rng(0).bytes(20000))
    order = [files[0], bad / "notes.fits", files[1], trunc, bad / "empty.cr2", files[2], bad / "random.nef",
             bad / "missing.fits", files[3]]
    eng, recs = run(order)
    status = [r.status for r in recs]
    assert status == ["reference", "failed", "stacked", "failed", "failed", "stacked", "failed", "failed",
                      "stacked"]
    for r in recs:
        if r.status == "failed":
            assert r.reason and "\n" not in r.reason and len(r.reason) < 200, r.reason
    assert "empty" in recs[4].reason and "not found" in recs[7].reason
    assert eng.n_stacked == 4


def test_snapshot_writes_outputs_with_provenance(night, tmp_path):
    files, truth = night(n_frames=4, seed=3, defects={2: "cloudy"})
    eng, recs = run(files)
    assert eng.snapshot(tmp_path / "out")
    with fits.open(tmp_path / "out" / "stack.fits") as h:
        hdr, data = h[0].header, h[0].data
        assert data.shape == (3, 480, 640) and data.dtype.kind == "f" and data.dtype.itemsize == 4
        assert hdr["NCOMBINE"] == 3 and hdr["EXPTIME"] == pytest.approx(180.0)
        assert hdr["DATE-OBS"] == truth["frames"][0]["time"]
        assert hdr["DATE-END"].startswith("2026-11-25T21:0")
        assert hdr["INSTRUME"] == "SIMCAM 1" and hdr["BAYERPAT"] == "RGGB"
        assert hdr["SOFTWARE"].startswith("livestack")
        assert h["WEIGHT"].data.shape == (480, 640)
    jpg = (tmp_path / "out" / "preview.jpg").read_bytes()
    assert jpg[:2] == b"\xff\xd8"


def test_checkpoint_resume_equals_uninterrupted(night, tmp_path):
    files, _ = night(n_frames=8, seed=12, defects={5: "satellite"})
    full, _ = run(files)
    part = through_checkpoints(files, [2, 5], tmp_path)      # the first inside the bootstrap buffer
    a, wa = full.result()
    b, wb = part.result()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(wa, wb, rtol=1e-6)
    assert part.n_stacked == full.n_stacked == 8


def test_checkpoint_of_another_format_is_refused(night, tmp_path):
    import json

    files, _ = night(n_frames=1, seed=12)
    eng = Engine(Config())
    eng.process(files[0])
    save_engine(eng, tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(SessionError, match="checkpoint format 1"):
        load_engine(tmp_path / "old.npz", Config())


def test_clean_frames_lose_few_pixels_to_the_outlier_test(night):
    """κ = 3 on Gaussian noise flags ~0.27 % of cells; stars that move between frames must not add much."""
    files, _ = night(n_frames=8, seed=4, rotation_deg=0.2, drift_px=(2.0, -1.5))
    _, recs = run(files)
    rates = [r.rejected_pixels / (640 * 480) for r in recs if r.rejected_pixels is not None]
    assert len(rates) == 5 and max(rates) < 0.004, rates


def test_sparse_and_dense_saturation_paths_agree(night, monkeypatch):
    """Saturated samples go to the stack as points (few) or as whole-frame masks (the Moon): same stack, but
    for the odd pixel where OpenCV's 1/32-step bilinear weights round a tiny tap to zero."""
    from livestack.engine import grid

    files, _ = night(n_frames=6, seed=3, rotation_deg=0.3)
    sparse, recs = run(files)
    assert all(r.saturated_pixels > 20 for r in recs)
    monkeypatch.setattr(grid, "SPARSE_SATURATED", -1)
    dense, _ = run(files)
    (a, wa), (b, wb) = sparse.result(), dense.result()
    assert (wa < 1e-3 * wa.max()).sum() > 20          # star cores saturated in every frame: tiny weights
    differ = ~np.isclose(a, b, rtol=1e-5, atol=1e-3).all(axis=0) | ~np.isclose(wa, wb, rtol=1e-5)
    assert differ.sum() <= 16, differ.sum()     # measured: 8 with a bilinear warp, 11 compensated (wider masks)


def test_superpixel_mode_halves_the_grid(night):
    files, truth = night(n_frames=5, seed=6, rotation_deg=0.1)
    cfg = Config()
    import dataclasses
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer="superpixel"))
    eng, recs = run(files, cfg)
    img, _ = eng.result()
    assert img.shape == (3, 240, 320)
    # a superpixel frame coordinate u maps to CFA coordinate 2u + 0.5: compare in CFA units
    s = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5]])
    s_inv = geometry.invert(s)
    for i, r in enumerate(recs):
        m_cfa = geometry.compose(s, geometry.compose(np.array(r.matrix), s_inv))
        # centroids refined on the mosaic: ~0.03 CFA px (0.1-0.15 without)
        assert geometry.rms_error(m_cfa, truth_matrix(truth, i), (480, 640)) < 0.06


def test_a_change_of_exposure_mid_night_is_not_clouds(tmp_path):
    """60 s frames, then the user shortens them to 15 s: a 15 s frame has a quarter of the sky and a third of
    the stars, and every one was rejected as "clouds" against the 60 s frames — the rest of the night lost.
    Counts, sky and transparency are now compared among frames of one exposure (a cloudy 15 s frame is still
    rejected), FWHM and shapes among all; the same through a checkpoint."""
    from drivers.simulator import SimConfig, render_night

    render_night(tmp_path / "a", SimConfig(width=640, height=480, n_frames=3, exptime=60, seed=1, sky_seed=1))
    render_night(tmp_path / "b", SimConfig(width=640, height=480, n_frames=7, exptime=15, seed=2, sky_seed=1,
                                           defects={4: "cloudy"}))
    files = sorted((tmp_path / "a").glob("*.fits")) + sorted((tmp_path / "b").glob("*.fits"))
    eng = Engine(Config())
    recs = [eng.process(f) for f in files]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 6 + ["rejected", "stacked", "stacked"], \
        [r.reason for r in recs]
    assert "clouds" in recs[7].reason or "only 0 frame stars" in recs[7].reason, recs[7].reason
    assert all(3 < r.scale < 5.5 for r in recs[3:7]), [r.scale for r in recs]    # normalised to the 60 s frames
    part = through_checkpoints(files, [5], tmp_path / "ckpt")
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb) and part.n_rejected == eng.n_rejected == 1


def test_a_first_frame_is_judged_on_its_sky_against_the_next_frame_of_its_exposure(tmp_path):
    """A first frame in twilight (its sky twice the next frames'), then one more 60 s frame and 15 s frames: the
    first frame's sky is compared with the 60 s frame after it — as that frame's was with it — and it is left
    out.  It was compared with nothing as soon as one of the two frames after it had another exposure."""
    from drivers.simulator import SimConfig, render_night

    render_night(tmp_path / "a", SimConfig(width=640, height=480, n_frames=2, exptime=60, seed=1, sky_seed=1,
                                           n_stars=3000))
    render_night(tmp_path / "b", SimConfig(width=640, height=480, n_frames=3, exptime=15, seed=2, sky_seed=1,
                                           n_stars=3000))
    files = sorted((tmp_path / "a").glob("*.fits")) + sorted((tmp_path / "b").glob("*.fits"))
    with fits.open(files[0], mode="update") as h:     # dusk: 500 ADU more sky
        d = h[0].data.astype(np.float64) + np.random.default_rng(0).poisson(500.0, h[0].data.shape)
        h[0].data = np.clip(d, 0, 16383).astype(np.uint16)
        h[0].scale("int16", bzero=32768)
    eng, _, amended = run_judged(files)
    assert [a["file"] for a in amended] == [files[0].name], amended
    assert amended[0]["reason"].startswith("background"), amended[0]["reason"]
    assert eng.n_stacked == 4 and eng.n_rejected == 1


def test_a_checkpoint_of_before_the_judge_by_exposure_still_judges_the_next_frame(night):
    """A checkpoint written before star counts, sky and transparency were judged per exposure has no `levels` nor
    `bases`: resumed, the next frame was a 'first frame of new settings', judged on FWHM and shape only — a
    cloudy one was stacked (and became its exposure's transparency baseline).  It is judged against the frames
    before, as it was before the upgrade."""
    files, _ = night(n_frames=7, seed=5, defects={5: "cloudy"}, n_stars=3000)
    eng = Engine(Config())
    for f in files[:5]:
        eng.process(f)
    meta, arrays, stacks = eng.state()
    for fm in meta["filters"]:
        for k in ("levels", "bases", "legacy", "boot", "first_judged"):
            fm.pop(k, None)
    arrays = dict(arrays)
    for prefix, st in stacks:
        arrays.update({prefix + k: v for k, v in st.state().items()})
    old = Engine.from_state(meta, arrays, Config())
    recs = [old.process(f) for f in files[5:]]
    assert [r.status for r in recs] == ["rejected", "stacked"], [r.reason for r in recs]
    assert "clouds" in recs[0].reason, recs[0].reason


def test_a_measured_exposure_keeps_its_frames_in_one_group():
    """A camera that writes the exposure it measured (59.9987 s, 60.0013 s) must not make a group of each frame
    (then none would be judged on stars, sky or transparency); 15 s and 60 s, ISO 800 and 1600 are groups."""
    from livestack.engine.filterstack import settings_key
    from livestack.engine.frame import FrameMeta

    def key(exptime, iso=800):
        m = FrameMeta()
        m.exptime, m.iso = exptime, iso
        return settings_key(m)

    assert key(59.9987) == key(60.0013) == key(60)
    assert len({key(60), key(15), key(60, 1600)}) == 3


def test_two_trailed_frames_at_the_start_both_leave_the_stack(night, tmp_path):
    """The mount settling for two frames: the second passed against the first (as trailed as itself) and was
    never judged again.  Once the first is left out, the frames kept with it are judged against each other."""
    files, truth = night(n_frames=8, seed=5, defects={0: "wind", 1: "wind"})
    eng, recs, amended = run_judged(files)
    assert [a["file"] for a in amended] == [files[0].name, files[1].name], amended
    assert "after the first was left out: left out of the stack" in amended[1]["reason"]
    assert [r.status for r in recs[2:]] == ["stacked"] * 6, [r.reason for r in recs]
    assert eng.n_stacked == 6 and eng.n_rejected == 2
    _, wsum = eng.result(None)
    assert float(np.nanmax(wsum)) == pytest.approx(sum(r.weight for r in recs[2:]), rel=1e-4)
    part = through_checkpoints(files, [2, 4], tmp_path)
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb) and part.n_rejected == 2


def test_the_last_frame_of_the_bootstrap_left_out_is_no_longer_the_filters_last(night, tmp_path):
    """`[stack] bootstrap = 5`, the first and the fifth frame hazy (their star fluxes halved): the fifth passed
    against the first, and is left out with it once the first is — the frame in hand.  The filter's last frame
    time (the page, /api/status) and its counters' end were still those of that frame, left out of the stack."""
    files, truth = night(n_frames=5, seed=5, mono=True, n_stars=3000)
    for i in (0, 4):
        with fits.open(files[i], mode="update") as h:
            d = h[0].data.astype(np.float64)
            sky = np.median(d)
            h[0].data = np.clip(sky + 0.45 * (d - sky), 0, 16383).astype(np.uint16)
            h[0].scale("int16", bzero=32768)
    cfg = dataclasses.replace(Config(), stack=dataclasses.replace(Config().stack, bootstrap=5))
    eng, recs, amended = run_judged(files, cfg)
    assert [a["file"] for a in amended] == [files[0].name, files[4].name], amended
    fs = list(eng.filters.values())[0]
    assert fs.counts.stacked == 3 and fs.counts.rejected == 2
    assert fs.last_time == recs[3].time and fs.summary()["last_frame_time"] == recs[3].time
    end = dt.datetime.fromisoformat(recs[3].time) + dt.timedelta(seconds=recs[3].exptime)
    assert fs.counts.first_time == recs[1].time and fs.counts.last_end == end.isoformat()


def test_a_first_frame_left_out_leaves_the_baseline_of_other_exposures_alone(tmp_path):
    """`[stack] bootstrap = 5` over a trailed 60 s first frame, one more 60 s frame, then 15 s frames, the second
    of them a little hazy (its star fluxes × 0.7).  Leaving out the first frame set every group's transparency
    baseline to the median of its frames kept — the 15 s one too, whose first frame stayed: moved by the hazy
    one, it let a hazier 15 s frame (× 0.55: rejected against the first 15 s frame) into the stack."""
    from drivers.simulator import SimConfig, render_night

    kw = dict(width=640, height=480, sky_seed=1, mono=True, n_stars=3000)
    render_night(tmp_path / "a", SimConfig(n_frames=2, exptime=60, seed=1, defects={0: "wind"}, **kw))
    render_night(tmp_path / "b", SimConfig(n_frames=4, exptime=15, seed=2, **kw))
    files = sorted((tmp_path / "a").glob("*.fits")) + sorted((tmp_path / "b").glob("*.fits"))
    for i, k in ((3, 0.7), (5, 0.55)):
        with fits.open(files[i], mode="update") as h:
            d = h[0].data.astype(np.float64)
            sky = np.median(d)
            h[0].data = np.clip(sky + k * (d - sky), 0, 16383).astype(np.uint16)
            h[0].scale("int16", bzero=32768)
    cfg = dataclasses.replace(Config(), stack=dataclasses.replace(Config().stack, bootstrap=5))
    eng, recs, amended = run_judged(files, cfg)
    assert [a["file"] for a in amended] == [files[0].name], amended
    fs = list(eng.filters.values())[0]
    assert fs.bases["15s|iso 800|gain 120.0"] == 0.25     # the exposures' ratio, as it was before the verdict
    assert recs[5].status == "rejected" and "transparency" in recs[5].reason, recs[5].reason


def test_the_first_frame_of_a_new_exposure_is_judged_on_its_transparency(tmp_path):
    """Star flux is proportional to the exposure: the first 15 s frame after 60 s ones, hazy (its star fluxes
    × 0.45), is rejected for its transparency against the first frame's scaled by 15/60 — it was judged on its
    FWHM and shape alone and, stacked, set its exposure's transparency baseline.  A clear one is stacked."""
    from drivers.simulator import SimConfig, render_night

    kw = dict(width=640, height=480, sky_seed=1, mono=True, n_stars=3000)
    render_night(tmp_path / "a", SimConfig(n_frames=3, exptime=60, seed=1, **kw))
    render_night(tmp_path / "b", SimConfig(n_frames=3, exptime=15, seed=2, **kw))
    files = sorted((tmp_path / "a").glob("*.fits")) + sorted((tmp_path / "b").glob("*.fits"))
    with fits.open(files[3], mode="update") as h:
        d = h[0].data.astype(np.float64)
        sky = np.median(d)
        h[0].data = np.clip(sky + 0.45 * (d - sky), 0, 16383).astype(np.uint16)
        h[0].scale("int16", bzero=32768)
    eng, recs, _ = run_judged(files)
    assert [r.status for r in recs] == ["reference", "stacked", "stacked", "rejected", "stacked", "stacked"], \
        [r.reason for r in recs]
    assert recs[3].reason.startswith("transparency 0.4"), recs[3].reason
    assert list(eng.filters.values())[0].bases["15s|iso 800|gain 120.0"] == 0.25


def haze(path, k: float, seed: int) -> None:
    """Star fluxes (and the nebula) × k on the same sky and the same noise — as a thin cloud dims a frame; scaling
    the pixels alone would lower the noise with them, as a change of the pixel scale (ISO, gain) does."""
    with fits.open(path, mode="update") as h:
        d = h[0].data.astype(np.float64)
        sky = np.median(d)
        dd = np.diff(d, axis=1)
        sig = 1.4826 * float(np.median(np.abs(dd - np.median(dd)))) / np.sqrt(2)
        d = sky + k * (d - sky) + np.random.default_rng(seed).normal(0, sig * np.sqrt(1 - k * k), d.shape)
        h[0].data = np.clip(d, 0, 16383).astype(np.uint16)
        h[0].scale("int16", bzero=32768)


def iso_night(root, n_a: int, n_b: int, **b):
    """n_a frames at ISO 800 (1 e-/ADU), then n_b at ISO 1600 (0.5 e-/ADU: twice the ADU for the same sky);
    ``b``: more SimConfig fields of the second part."""
    from drivers.simulator import SimConfig, render_night

    kw = dict(width=640, height=480, sky_seed=1, mono=True, n_stars=3000)
    render_night(root / "a", SimConfig(n_frames=n_a, iso=800, gain=1.0, seed=1, **kw))
    render_night(root / "b", SimConfig(n_frames=n_b, iso=1600, gain=0.5, seed=2, **{**kw, **b}))
    return sorted((root / "a").glob("*.fits")) + sorted((root / "b").glob("*.fits"))


def test_the_first_frame_of_a_new_iso_is_judged_on_its_transparency(tmp_path):
    """ISO 800 -> 1600 mid-night, the first ISO 1600 frame hazy (star fluxes × 0.45, same sky): it was judged on
    FWHM and shape alone, stacked, and made its group's baseline (then a hazier frame passed against it).  Its
    transparency is now judged against the latest frame's scaled by their noises (the ADU per electron: 2×
    here): rejected; the clear frame after it becomes the baseline.  The same through a checkpoint."""
    files = iso_night(tmp_path, 4, 5)
    haze(files[4], 0.45, 0)
    haze(files[6], 0.5, 1)
    eng, recs, amended = run_judged(files)
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 3 + ["rejected", "stacked", "rejected",
                                                                          "stacked", "stacked"], \
        [r.reason for r in recs]
    assert recs[4].reason.startswith("transparency 0.4"), recs[4].reason
    assert recs[6].reason.startswith("transparency 0.4"), recs[6].reason
    assert amended == []
    assert 1.8 < list(eng.filters.values())[0].bases["60s|iso 1600|gain 120.0"] < 2.2
    part = through_checkpoints(files, [4, 5], tmp_path / "ckpt")
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb) and part.n_rejected == eng.n_rejected == 2


def test_a_clear_night_whose_gain_and_exposure_change_together_loses_no_frame(tmp_path):
    """120 s at ISO 400 (2 e-/ADU), then 30 s at ISO 3200 (0.25 e-/ADU), on the simulator's sky (the same
    electrons per frame whatever the exposure: the noise does not follow it).  Scaled by the noise and √ of the
    exposures, every clear 30 s frame until the third was "transparency 0.5"; by the lower of r and √r, none."""
    from drivers.simulator import SimConfig, render_night

    kw = dict(width=640, height=480, sky_seed=1, mono=True, n_stars=3000)
    render_night(tmp_path / "a", SimConfig(n_frames=3, iso=400, gain=2.0, exptime=120, seed=1, **kw))
    render_night(tmp_path / "b", SimConfig(n_frames=3, iso=3200, gain=0.25, exptime=30, seed=2, **kw))
    files = sorted((tmp_path / "a").glob("*.fits")) + sorted((tmp_path / "b").glob("*.fits"))
    eng, recs, amended = run_judged(files)
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 5, [r.reason for r in recs]
    assert amended == []


def test_a_new_gain_misjudged_by_its_noise_recovers(tmp_path):
    """The noise estimate of a new gain is off when read noise weighs (40 e- here against 400 e- of sky: the
    noise 2.2× the ADU scale's, every clear frame "transparency 0.45").  Three frames in a row, agreeing with
    each other, replace the estimate: two are lost, not the rest of the night."""
    files = iso_night(tmp_path, 4, 6, read_noise=40.0)
    eng, recs, amended = run_judged(files)
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 3 + ["rejected"] * 2 + ["stacked"] * 4, \
        [r.reason for r in recs]
    assert all(r.reason.startswith("transparency 0.4") for r in recs[4:6]), [r.reason for r in recs]
    assert amended == [] and eng.n_stacked == 8


def corrupt(path, factor: float) -> None:
    """The frame's pixels × factor, as float32 (a broken BSCALE or a program's scaling)."""
    with fits.open(path) as h:
        d, hdr = h[0].data.astype(np.float32) * np.float32(factor), h[0].header.copy()
    for k in ("BZERO", "BSCALE"):
        hdr.pop(k, None)
    fits.PrimaryHDU(d, hdr).writeto(path, overwrite=True)


def test_a_first_frame_of_another_pixel_scale_is_left_out(night, tmp_path):
    """A first frame whose pixels are × 10⁵: every later frame was "transparency 0.00" against it, and its
    verdict needed frames accepted after it — the night was lost.  Three frames in a row rejected against it
    for their transparency alone, agreeing with each other and with their noise as much lower as their star
    fluxes (a pixel scale, not a cloud), leave it out of the stack; the night goes on from the third.  The same
    through checkpoints."""
    files, _ = night(n_frames=8, seed=5, mono=True, n_stars=3000)
    corrupt(files[0], 1e5)
    eng, recs, amended = run_judged(files)
    assert [r.status for r in recs] == ["reference", "rejected", "rejected"] + ["stacked"] * 5, \
        [r.reason for r in recs]
    assert [a["file"] for a in amended] == [files[0].name], amended
    assert "another pixel scale" in amended[0]["reason"] and "(still the grid's reference)" in amended[0]["reason"]
    assert eng.n_stacked == 5 and eng.n_rejected == 3
    part = through_checkpoints(files, [2, 4], tmp_path / "ckpt")
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(wa, wb) and part.n_rejected == 3


@pytest.mark.parametrize("weather", ["haze", "cloudy"])
def test_a_good_first_frame_stays_when_clouds_come_after_it(night, weather):
    """A good first frame, then clouds for the rest of the night: every frame is rejected for its transparency
    against it, and they agree with each other — but their noise did not fall with their stars (haze: the same
    sky; the simulator's cloud: star fluxes × 0.3 and the sky × 2.5), so the first frame stays and so does its
    baseline.  The star count and sky tests are loosened so that transparency alone judges them."""
    files, _ = night(n_frames=8, seed=5, mono=True, n_stars=3000,
                     defects={i: "cloudy" for i in range(1, 8)} if weather == "cloudy" else {})
    if weather == "haze":
        for i in range(1, 8):
            haze(files[i], 0.45, i)
    cfg = dataclasses.replace(Config(), reject=dataclasses.replace(Config().reject, min_star_fraction=0.05,
                                                                   background_factor=10.0))
    eng, recs, amended = run_judged(files, cfg)
    assert [r.status for r in recs] == ["reference"] + ["rejected"] * 7, [r.reason for r in recs]
    assert all(r.reason.startswith("transparency") for r in recs[1:]), [r.reason for r in recs]
    assert amended == [] and list(eng.filters.values())[0].bases == {"60s|iso 800|gain 120.0": 1.0}


def _two_nights(tmp_path, **second):
    """A night of 2.6 px stars and the next evening's of 4.2 px on the same field (RGGB FITS, 480×360)."""
    from drivers.simulator import SimConfig, render_night

    render_night(tmp_path / "n1", SimConfig(width=480, height=360, n_frames=6, fwhm_px=2.6, seed=3, sky_seed=3,
                                            start="2026-11-25T21:00:00"))
    render_night(tmp_path / "n2", SimConfig(width=480, height=360, n_frames=8, fwhm_px=4.2, seed=4, sky_seed=3,
                                            start="2026-11-26T20:30:00", **second))
    return sorted((tmp_path / "n1").glob("*.fits")) + sorted((tmp_path / "n2").glob("*.fits"))


def test_a_second_night_is_judged_against_its_own_frames(tmp_path):
    """Two nights of one target, the second's seeing 1.6× the first's: every frame of the second was judged against
    the first night's median FWHM and most were rejected (`fwhm > 1.5 × running median`), kept or not by their
    jitter.  A frame taken `[reject] new_night_after_h` (6) after the last one stacked starts the running
    statistics afresh; the second night's trailed and cloudy frames are still rejected, against its own; the
    same through a checkpoint at the nights' boundary (the last frame's time is in it)."""
    files = _two_nights(tmp_path, defects={3: "wind", 6: "cloudy"})
    eng = Engine(Config())
    recs = [eng.process(f) for f in files]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 8 + ["rejected", "stacked", "stacked",
                                                                          "rejected", "stacked"], \
        [r.reason for r in recs]
    # the wind's frame against the second night's median (4.1–4.2 px, whichever test takes it), not the first's
    assert "trailed" in recs[9].reason or "running median 4." in recs[9].reason, recs[9].reason
    part = through_checkpoints(files, [6], tmp_path / "ckpt")
    assert part.counts == eng.counts
    a, wa = eng.result(None)
    b, wb = part.result(None)
    assert np.array_equal(a, b) and np.array_equal(wa, wb)
    # without it (0: never), the second night against the first's seeing: most of its frames go
    never = dataclasses.replace(Config(), reject=dataclasses.replace(Config().reject, new_night_after_h=0))
    eng0 = Engine(never)
    recs0 = [eng0.process(f) for f in files]
    lost = [r for r in recs0[6:] if r.status == "rejected" and "fwhm" in r.reason]
    assert len(lost) >= 4, [r.reason for r in lost]


def test_a_new_night_by_the_gap_between_capture_times():
    """The gap is between the frame's capture time and its filter's last stacked frame's, either way round (an
    earlier night's folder after a later one), with or without a time zone; a frame without a time, a filter
    with nothing judged yet, or `new_night_after_h = 0` start nothing."""
    from livestack.engine.filterstack import FilterStack
    from livestack.engine.frame import FrameMeta, Quality
    from livestack.engine.reject import RejectParams
    from livestack.engine.stack import StackParams

    def fs_with(last, **kw):
        fs = FilterStack("L", StackParams(), RejectParams(**kw))
        fs.judge.accept(Quality(100, 3.0, 0.2, 500.0, 10.0))
        fs.levels["k"] = fs.judge.__class__(fs.judge.p)
        fs.levels["k"].accept(Quality(100, 3.0, 0.2, 500.0, 10.0))
        fs.last_time = last
        return fs

    utc = dt.timezone.utc
    at = lambda *a, tz=None: FrameMeta(time=dt.datetime(*a, tzinfo=tz))   # noqa: E731
    fs = fs_with("2026-11-25T23:00:00")
    assert fs.new_night(at(2026, 11, 26, 4, 59)) is None and fs.judge.history      # 5 h 59 min: the same night
    fs.streak = [("k", 0.5, 10.0, 0.5, 0.5, False)]       # a frame rejected for its transparency at dawn
    assert fs.new_night(at(2026, 11, 26, 5, 0, tz=utc)) == pytest.approx(6.0)
    assert not fs.judge.history and not fs.levels["k"].history and fs.streak == []
    assert fs_with("2026-11-26T21:00:00+00:00").new_night(at(2026, 11, 25, 21, 0)) == pytest.approx(24.0)
    assert fs_with("2026-11-25T21:00:00").new_night(FrameMeta()) is None
    assert fs_with(None).new_night(at(2026, 12, 25, 21, 0)) is None
    assert fs_with("2026-11-25T21:00:00", new_night_after_h=0).new_night(at(2026, 12, 25, 21, 0)) is None
    empty = FilterStack("L", StackParams(), RejectParams())
    empty.last_time = "2026-11-25T21:00:00"
    assert empty.new_night(at(2026, 12, 25, 21, 0)) is None
    with pytest.raises(ValueError, match="new_night_after_h"):
        RejectParams(new_night_after_h=-1)


def test_a_new_nights_first_frames_are_judged_by_what_the_night_does_not_change(tmp_path):
    """The first frame of a new night has nothing of its night to be judged by: it was judged on nothing at all
    — a trailed one (the mount settling after the evening's slew, eccentricity 0.78, 6 px against the last
    night's 0.24 and 2.8 px) was stacked, and the night's next frames judged against it.  Now its star shape
    against the previous night's median and its transparency against the filter's first frame, as any frame's;
    the same through a checkpoint taken just after it.  A night whose every frame is more elongated than the
    last night's loses at most PRIOR_FRAMES of them, then is judged against its own."""
    files = _two_nights(tmp_path / "a", defects={0: "wind", 1: "wind"})
    recs = run(files)[1]
    assert [r.status for r in recs[6:]] == ["rejected"] * 2 + ["stacked"] * 6, [r.reason for r in recs[6:]]
    assert all("previous night's median" in r.reason for r in recs[6:8]), [r.reason for r in recs[6:8]]
    part = through_checkpoints(files, [7], tmp_path / "ckpt")
    assert part.counts == run(files)[0].counts
    # every frame of the second night trailed: the first PRIOR_FRAMES go, the rest are judged against each other
    from livestack.engine.filterstack import PRIOR_FRAMES

    files = _two_nights(tmp_path / "b", defects={i: "wind" for i in range(8)})
    recs = run(files)[1]
    assert [r.status for r in recs[6:]] == ["rejected"] * PRIOR_FRAMES + ["stacked"] * (8 - PRIOR_FRAMES), \
        [r.reason for r in recs[6:]]


def test_a_new_nights_first_frame_is_judged_on_its_transparency():
    """With its running statistics started afresh, a new night's first frame had no test at all, its transparency
    (against the filter's first frame, which needs no statistics of the night) neither: a frame at 0.4 of it was
    stacked, then the night's clear frames were judged against its star counts and sky."""
    from livestack.engine.filterstack import FilterStack
    from livestack.engine.frame import FrameMeta, Quality
    from livestack.engine.reject import RejectParams
    from livestack.engine.stack import StackParams

    fs = FilterStack("L", StackParams(), RejectParams())
    m1 = FrameMeta(time=dt.datetime(2026, 11, 25, 23, 0), exptime=60.0)
    for _ in range(3):
        fs.accept(Quality(100, 3.0, 0.2, 500.0, 10.0), m1, file="n1.fits")
    m2 = FrameMeta(time=dt.datetime(2026, 11, 26, 20, 0), exptime=60.0)
    assert fs.new_night(m2) == pytest.approx(21.0) and not fs.judge.history
    assert fs.check(Quality(60, 3.0, 0.2, 500.0, 10.0), m2, scale=2.5).startswith("transparency 0.40")
    assert fs.check(Quality(100, 4.5, 0.2, 1500.0, 10.0), m2, scale=1.05) is None   # seeing, moon: the night's


def test_a_rejection_counted_before_the_first_frame_waits_for_its_filters_judge(night, tmp_path):
    """Engine.count_unread_rejection (a restack keeping a rejected frame whose file is gone) before any frame: no
    grid yet to set its filter's judge by — a superpixel grid halves the judge's eccentricity limit — so the count
    waits for the filter's stack (and counts, and survives a checkpoint, meanwhile); later ones go to the stack."""
    files, _ = night(n_frames=4, seed=3)
    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer="superpixel"))
    eng = Engine(cfg)
    assert eng.count_unread_rejection(None) == 0 and eng.n_rejected == 1 and eng.filters == {}
    path = tmp_path / "checkpoint.npz"
    save_engine(eng, path)
    eng, _ = load_engine(path, cfg)
    assert eng.n_rejected == 1 and eng.index == 1
    recs = [eng.process(f) for f in files]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 3 and [r.index for r in recs] == [1, 2, 3, 4]
    fs = eng.main
    assert fs.counts.rejected == 1 and eng.n_rejected == 1
    assert fs.judge.p.eccentricity_fwhm == cfg.reject.eccentricity_fwhm / 2      # the superpixel grid's judge
    assert eng.count_unread_rejection(None) == 5 and fs.counts.rejected == 2 and eng.n_rejected == 2
