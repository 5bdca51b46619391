"""A WCS on every stack: `livestack stack` and the daemon plate-solve the reference in the background, check the
solution, write it into the stack files in the stack's own pixel grid, and fall back on the frame's own WCS."""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from livestack.config import Config

SOLVER = shutil.which("solve-field") is not None and Path("/usr/share/astrometry").is_dir() and any(
    Path("/usr/share/astrometry").glob("index-tycho2-1*.fits"))
needs_solver = pytest.mark.skipif(not SOLVER, reason="needs Debian astrometry.net and astrometry-data-tycho2-*")
M94 = (192.7208, 41.1203)


def _stack_wcs(path: Path) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = fits.getheader(path)
        return WCS(h, naxis=2)


def _sep_arcsec(w1: WCS, w2: WCS, xy: np.ndarray) -> np.ndarray:
    a = np.column_stack(w1.all_pix2world(xy[:, 0], xy[:, 1], 0))
    b = np.column_stack(w2.all_pix2world(xy[:, 0], xy[:, 1], 0))
    dra = (a[:, 0] - b[:, 0] + 180) % 360 - 180
    return np.hypot(dra * np.cos(np.radians(a[:, 1])), a[:, 1] - b[:, 1]) * 3600


def _grid(shape, n=7) -> np.ndarray:
    h, w = shape
    ys, xs = np.meshgrid(np.linspace(0, h - 1, n), np.linspace(0, w - 1, n), indexing="ij")
    return np.column_stack([xs.ravel(), ys.ravel()])


@pytest.mark.solver
@needs_solver
def test_stack_of_a_seestar_night_carries_a_wcs_that_agrees_with_the_other_grid(tmp_path, shared_data):
    """Seestar M94 night 1 stacked at full resolution and in superpixels: both stacks carry a solved WCS
    (centre on M94), and the two agree within a pixel of the coarser grid at every point of the field — the
    superpixel grid's WCS is the same sky, not off by half a pixel or a factor two."""
    src = shared_data / "sequences" / "seestar_m94_night1"
    out = {}
    for mode in ("bilinear", "superpixel"):
        out[mode] = tmp_path / mode
        cfg = tmp_path / f"{mode}.toml"
        cfg.write_text(f'[engine]\ndebayer = "{mode}"\n')
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "livestack.cli", "stack", str(src), "-o", str(out[mode]), "-q",
                            "--config", str(cfg)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert "plate solved in" in r.stdout and "M 94" in r.stdout, r.stdout
    full, half = _stack_wcs(out["bilinear"] / "stack.fits"), _stack_wcs(out["superpixel"] / "stack.fits")
    shape_full = fits.getdata(out["bilinear"] / "stack.fits").shape[-2:]
    assert shape_full == (1920, 1080)
    # pixel (x, y) of the full grid is (x/2 − 0.25, y/2 − 0.25) of the superpixel grid
    xy = _grid(shape_full)
    d = _sep_arcsec(full, WCS_shifted(half), xy)
    scale = np.sqrt(abs(np.linalg.det(full.pixel_scale_matrix))) * 3600
    assert scale == pytest.approx(2.38, rel=0.03)
    assert np.max(d) < 2 * scale, (np.median(d), np.max(d))      # a superpixel is 2 px of the full grid
    ra, dec = full.all_pix2world([[539.5, 959.5]], 0)[0]
    assert abs(ra - M94[0]) * np.cos(np.radians(dec)) < 0.3 and abs(dec - M94[1]) < 0.3
    # every file of the stack carries it
    for name in ("stack_IRCUT.fits",):
        w = _stack_wcs(out["bilinear"] / name)
        assert np.max(_sep_arcsec(full, w, xy)) < 1e-6


def WCS_shifted(half: WCS):
    """A callable-free adapter: the superpixel WCS evaluated at full-grid pixel coordinates."""
    class _W:
        def all_pix2world(self, x, y, origin):
            return half.all_pix2world(np.asarray(x) / 2 - 0.25, np.asarray(y) / 2 - 0.25, origin)
    return _W()


@pytest.mark.parametrize("off", ["config", "--no-solve"])
def test_without_a_solver_the_reference_frames_own_wcs_is_used(tmp_path, shared_data, off):
    """[solve] enabled = false or --no-solve: the KStars frame's own (pointing) WCS goes into the stack, said as
    such."""
    src = tmp_path / "src"
    src.mkdir()
    f = shared_data / "sequences" / "kstars_asi1600mm" / "ngc4535-autofocus3.fits"
    shutil.copy(f, src / f.name)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[solve]\nenabled = false\n" if off == "config" else "")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "livestack.cli", "stack", str(src), "-o", str(tmp_path / "out"), "-q",
                        "--config", str(cfg), *(["--no-solve"] if off == "--no-solve" else [])],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "WCS from the reference frame" in r.stdout
    mine = _stack_wcs(tmp_path / "out" / "stack.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = WCS(fits.getheader(f))
    assert np.max(_sep_arcsec(mine, theirs, _grid((1760, 2328)))) < 0.01


def _service(watch: Path, out: Path, **solve):
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    cfg = Config()
    if solve:
        cfg.extra["solve"] = solve
    return Service(cfg, watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                   DaemonParams(out=str(out), checkpoint_every=2))


def _started(tmp_path: Path, files, until, seconds: float, **solve):
    """A service started on a capture folder holding ``files``, once ``until(svc)`` holds (or ``seconds`` have
    passed): (svc, watch, out)."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files:
        shutil.copy(f, watch / f.name)
    svc = _service(watch, out, **solve)
    svc.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until(svc):
        time.sleep(0.1)
    return svc, watch, out


@pytest.mark.solver
@needs_solver
def test_daemon_solves_in_the_background_and_keeps_the_wcs_across_a_restart(tmp_path, shared_data):
    files = sorted((shared_data / "sequences" / "seestar_m94_night1").glob("*.fit"))[:5]
    svc, watch, out = _started(tmp_path, files, lambda svc: len(svc.snapshot.frames) == len(files) and (
        (st := svc.snapshot.status).get("sky") or {}).get("state") == "solved" and st["state"] == "idle", 120)
    # an exclusion restacks through a fresh engine on the same reference: the solution stays on the stack (it
    # was lost from every file written after it, while the status still said solved)
    svc.exclude(files[3].name).result(60)
    svc.stop(timeout=30)
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == 4
    sky = svc.snapshot.status["sky"]
    assert sky["state"] == "solved" and sky["object"] == "M 94" and sky["seconds"] < 60
    assert sky["scale_arcsec"] == pytest.approx(2.38, rel=0.03)
    assert 0.6 < sky["width_deg"] < 0.8 and 1.2 < sky["height_deg"] < 1.35
    book = json.loads((out / "targets.json").read_text())["targets"]
    assert book[0]["name"] == "M 94" and book[0]["sky"]["state"] == "solved"
    assert book[0]["pointing"] == pytest.approx([sky["ra"], sky["dec"]])
    w = _stack_wcs(out / "stack.fits")
    assert np.allclose(w.all_pix2world([[539.5, 959.5]], 0)[0], [sky["ra"], sky["dec"]], atol=1e-6)
    # a restart keeps it: no second solve, the same WCS
    svc = _service(watch, out)
    svc.start()
    assert svc.snapshot.status["sky"]["state"] == "solved" and svc._solver is None
    svc.stop(timeout=30)
    assert svc.engine.grid.wcs is not None


@pytest.mark.solver
def test_a_failed_solve_is_a_note_never_an_error(tmp_path, shared_data):
    """An index folder with no index: the daemon stacks on, the status says why in one sentence."""
    files = sorted((shared_data / "sequences" / "seestar_m94_night1").glob("*.fit"))[:3]
    (tmp_path / "empty").mkdir()
    svc, watch, out = _started(tmp_path, files, lambda svc: len(svc.snapshot.frames) == len(files) and (
        svc.snapshot.status.get("sky") or {}).get("state") in ("failed", "off"), 60, index_dir=str(tmp_path / "empty"))
    svc.stop(timeout=30)
    assert svc.error is None
    sky = svc.snapshot.status["sky"]
    assert sky["state"] in ("failed", "off") and len(sky["note"].splitlines()) == 1, sky
    if SOLVER:
        assert "index" in sky["note"], sky
    assert svc.engine.grid.wcs is None
    assert "CTYPE1" not in fits.getheader(out / "stack.fits")
    assert svc.snapshot.status["stacked"] == 3


@pytest.mark.solver
@needs_solver
def test_a_solve_no_other_frame_can_help_is_not_tried_again(tmp_path, shared_data, caplog):
    """No index for the field: the daemon said "plate solve of M 94 failed: no astrometry.net index files in …;
    tried again on a later frame" three times in a night, each retry as sure to fail as the first.  Now once,
    without the promise; a failure another frame's stars may mend (too few stars) is still tried again."""
    import logging

    from livestack.engine.solve import Hints, SolveError, SolveParams
    from livestack.sky import RETRY_AFTER, SkySolver

    files = sorted((shared_data / "sequences" / "seestar_m94_night1").glob("*.fit"))
    (tmp_path / "empty").mkdir()
    caplog.set_level(logging.WARNING, logger="livestack")
    svc, watch, out = _started(tmp_path, files, lambda svc: len(svc.snapshot.frames) == len(files) and
                               svc.snapshot.status["state"] == "idle", 60, index_dir=str(tmp_path / "empty"))
    time.sleep(1.0)
    svc.stop(timeout=30)
    assert svc.error is None and svc.snapshot.status["stacked"] == len(files)
    failed = [r.getMessage() for r in caplog.records if "plate solve of" in r.getMessage()]
    assert len(failed) == 1 and "no astrometry.net index files" in failed[0], failed
    assert "tried again" not in failed[0]
    assert svc.snapshot.status["sky"]["state"] == "failed"

    few = SkySolver(SolveParams())
    assert few.start(np.array([[10.0, 10.0], [50, 80], [90, 20]]), np.ones(3), (100, 100), Hints())
    assert isinstance(few.wait(30), SolveError)
    few.frames_since = RETRY_AFTER
    assert few.retry_due()


@pytest.mark.solver
@needs_solver
def test_a_target_visited_briefly_in_a_backlog_is_archived_solved(tmp_path, shared_data):
    """A night captured while the daemon was stopped: the KStars frame of NGC 4535 (another target: 2020, RA/DEC
    33° from M 94), then 6 Seestar frames of M 94, all waiting at the start.  The slew came 0.1 s after NGC's
    reference, its plate solve (0.6 s) was cancelled, and its archived stack kept the frame's approximate KStars
    WCS for good (1.2′ off; a frame without one would have had none), its targets.json entry no sky.  The switch
    now lets the closing target's solve finish (up to SWITCH_WAIT_S)."""
    seq = shared_data / "sequences"
    files = [seq / "kstars_asi1600mm" / "ngc4535-autofocus3.fits",
             *sorted((seq / "seestar_m94_night1").glob("*.fit"))[:6]]
    svc, _, out = _started(tmp_path, files, lambda svc: svc.snapshot.status["stacked"] == 6 and
                           svc.snapshot.status["state"] == "idle", 60)
    svc.stop(timeout=30)
    assert svc.error is None
    book = json.loads((out / "targets.json").read_text())["targets"]
    ngc = next(t for t in book if not t["current"])
    assert ngc["name"] == "NGC_4492" and ngc["frames"] == 1
    assert (ngc["sky"] or {}).get("state") == "solved", ngc
    assert fits.getheader(out / ngc["folder"] / "stack.fits")["CTYPE1"] == "RA---TAN-SIP"


def _solve_image(image: np.ndarray, folder: Path, scale=(1.0, 10.0)) -> WCS:
    """astrometry.net's own solve of an image (its own star extraction): an independent WCS to compare with."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    img = np.nan_to_num(image, nan=float(np.nanmedian(image))).astype(np.float32)
    fits.writeto(folder / "img.fits", img, overwrite=True)
    subprocess.run(["solve-field", str(folder / "img.fits"), "--no-plots", "--overwrite", "--dir", str(folder),
                    "--new-fits", "none", "--cpulimit", "60", "--scale-units", "arcsecperpix",
                    "--scale-low", str(scale[0]), "--scale-high", str(scale[1])], capture_output=True, timeout=90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(fits.getheader(folder / "img.wcs"))


def _pixel_offsets(ours: WCS, theirs: WCS, shape) -> np.ndarray:
    """Where each point of a 9×9 grid of our pixels lands in their pixels: the distances, px."""
    xy = _grid(shape, 9)
    ra, dec = ours.all_pix2world(xy[:, 0], xy[:, 1], 0)
    x, y = theirs.all_world2pix(ra, dec, 0)
    return np.hypot(x - xy[:, 0], y - xy[:, 1])


@pytest.mark.solver
@needs_solver
@pytest.mark.parametrize("debayer", ["bilinear", "superpixel"])
def test_the_stack_wcs_agrees_with_a_solve_of_the_stack_image_itself(tmp_path, shared_data, debayer):
    """Seestar M94 night 1 stacked (12 frames, re-centring jump included): the WCS in stack.fits and
    astrometry.net's own solve of the stacked image (its own star extraction) agree within a pixel across the
    field (measured: median 0.09 / max 0.48 px full resolution, 0.05 / 0.23 px superpixel)."""
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[engine]\ndebayer = "{debayer}"\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "stack",
                        str(shared_data / "sequences" / "seestar_m94_night1"), "-o", str(out), "-q", "--config",
                        str(cfg)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    data = fits.getdata(out / "stack.fits")
    d = _pixel_offsets(_stack_wcs(out / "stack.fits"), _solve_image(data[1], tmp_path / "solve"), data.shape[-2:])
    assert np.median(d) < 0.3 and d.max() < 1.0, (np.median(d), d.max())


@pytest.mark.solver
@needs_solver
def test_a_mono_frame_wcs_agrees_with_a_solve_of_the_image(tmp_path, shared_data):
    """The KStars ASI1600MM frame: our WCS (from our star list) against solve-field's solve of the image file:
    measured median 0.015, max 0.08 px."""
    from livestack.cli import stack_files

    f = shared_data / "sequences" / "kstars_asi1600mm" / "ngc4535-autofocus3.fits"
    s = stack_files([f], tmp_path / "out", Config(), quiet=True)
    assert s["sky"]["source"] == "solve" and s["sky"]["object"] == "NGC_4492"
    d = _pixel_offsets(_stack_wcs(tmp_path / "out" / "stack.fits"),
                       _solve_image(fits.getdata(f).astype(np.float32), tmp_path / "solve", (2.4, 2.9)), (1760, 2328))
    assert np.median(d) < 0.2 and d.max() < 0.5, (np.median(d), d.max())


@pytest.mark.solver
@needs_solver
def test_a_drizzle_grid_keeps_the_solution_its_sensor_grid_accepts(tmp_path, shared_data):
    """The same KStars frame with --drizzle 2: its stars, measured on the sensor, solve as at 1× (0.64 sensor px
    RMS), but the check counted the residual in drizzle pixels (1.29 > max_rms_px 1) and refused the solve — the
    stack got only KStars' approximate pointing WCS (1.2′ off), and a frame without one would have got none."""
    from livestack.cli import stack_files
    from livestack.config import with_overrides

    f = shared_data / "sequences" / "kstars_asi1600mm" / "ngc4535-autofocus3.fits"
    s = stack_files([f], tmp_path / "out", with_overrides(Config(), drizzle={"scale": 2.0}), quiet=True)
    assert s["sky"]["source"] == "solve", s["sky"]["note"]
    assert s["sky"]["scale_arcsec"] == pytest.approx(2.65 / 2, rel=0.02)


def test_a_retry_solves_the_last_stacked_frames_stars_not_a_rejected_ones(tmp_path, shared_data):
    """A retry plate solve took the latest frame's stars with the latest stacked frame's matrix: after a
    rejected frame (shifted, bright sky) they lay ~73 px off, and solve-field solved them — correctly, as a
    place 173″ away — onto the stack.  Now the stars and the matrix of the same stacked frame."""
    from scipy.spatial import cKDTree

    from livestack.config import Config
    from livestack.engine.pipeline import Engine
    from livestack.sky import stars_on_grid

    src = sorted((shared_data / "sequences" / "seestar_m94_night1").glob("*.fit"))
    with fits.open(src[5]) as h:
        data, hdr = h[0].data.astype(np.int64), h[0].header.copy()
    bad = tmp_path / "bright_shifted.fit"
    fits.PrimaryHDU(np.clip(np.roll(data, (40, 60), axis=(0, 1)) + 6000, 0, 65535).astype(np.uint16),
                    hdr).writeto(bad)
    e = Engine(Config())
    recs = [e.process(f) for f in src[:5] + [bad]]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 4 + ["rejected"]
    xy, _ = stars_on_grid(e)
    dist, _ = cKDTree(e.ref_stars_on_grid()[0]).query(xy)
    assert np.median(dist) < 0.5, np.median(dist)
