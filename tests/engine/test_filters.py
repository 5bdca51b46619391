"""Several filters, one grid: a stack per filter, judged against its own filter, and a linear colour composite
(issue #10's acceptance tests, on the simulator's filter wheel with known truth)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from conftest import through_checkpoints, truth_matrix
from drivers.simulator import SimConfig, nebula_truth
from livestack.config import Config
from livestack.engine import geometry
from livestack.engine.compose import ComposeParams
from livestack.engine.filtername import filter_key
from livestack.engine.pipeline import Engine

SEVEN = ("L", "R", "G", "B", "Ha", "OIII", "SII")
STACKED = ("reference", "stacked")


def run(files, cfg=None, **kw):
    eng = Engine(cfg or Config(), **kw)
    return eng, [eng.process(f) for f in files]


def sim_cfg(**kw) -> SimConfig:
    """The SimConfig conftest's night() renders with (its size and star count)."""
    return SimConfig(**{"width": 640, "height": 480, "n_stars": 600, **kw})


def test_every_filter_registers_onto_one_grid(night):
    """L has ~60 stars here, narrowband 12–16: each frame lands on the reference's grid within 0.05 px RMS."""
    files, truth = night(mono=True, n_frames=14, seed=11, filters=SEVEN, dither_px=3.0, rotation_deg=0.02)
    eng, recs = run(files)
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 13, [r.reason for r in recs]
    errs = [geometry.rms_error(np.array(r.matrix), truth_matrix(truth, i), (480, 640)) for i, r in enumerate(recs)]
    assert float(np.sqrt(np.mean(np.square(errs)))) <= 0.05, errs
    assert max(errs) <= 0.1, errs
    assert [r.filter for r in recs] == list(SEVEN) * 2
    assert [(fs.name, fs.counts.stacked) for fs in eng.stacks] == [(f, 2) for f in SEVEN]
    assert {fs.stack.shape for fs in eng.stacks} == {(1, 480, 640)}
    assert eng.counts.exptime == pytest.approx(2 * (4 * 60 + 3 * 180))


def test_each_filter_is_judged_and_weighted_against_its_own_frames(night):
    """The Ha sky is ~17× darker and its star count a third of L's: nothing is compared across filters (else
    every Ha frame would be rejected for its star count).  Bad Ha frames are rejected against the Ha frames; the
    Ha frames' weights are ~1 (their own reference's noise)."""
    files, _ = night(mono=True, n_frames=12, seed=3, filters=("L", "Ha"), defects={7: "cloudy", 9: "wind"})
    eng, recs = run(files)
    status = [r.status for r in recs]
    assert status == ["reference"] + ["stacked"] * 6 + ["rejected", "stacked", "rejected", "stacked", "stacked"], \
        [r.reason for r in recs]
    assert recs[7].filter == recs[9].filter == "Ha"
    assert "eccentricity" in recs[9].reason or "fwhm" in recs[9].reason, recs[9].reason
    ha = [r for r in recs if r.filter == "Ha" and r.status == "stacked"]
    lum = [r for r in recs if r.filter == "L" and r.status in STACKED]
    # per frame (180 s Ha against 60 s L) the Ha sky is ~4.7× darker, per second ~14×
    assert np.median([r.background for r in lum]) > 4 * np.median([r.background for r in ha])
    assert all(0.7 < r.weight < 1.4 for r in ha + lum), [(r.filter, r.weight) for r in ha + lum]
    fs = {f.name: f for f in eng.stacks}
    assert (fs["L"].counts.stacked, fs["L"].counts.rejected) == (6, 0)
    assert (fs["Ha"].counts.stacked, fs["Ha"].counts.rejected) == (4, 2)


def test_per_filter_noise_falls_as_one_over_sqrt_n(night):
    """Each filter's stack: background σ of 8×8 blocks ∝ 1/√(Σ weights) of that filter alone."""
    kw = dict(mono=True, n_frames=16, seed=9, filters=("L", "Ha"), nebula=False, prnu=0.0, n_dust=0,
              vignetting=0.0)
    files, _ = night(**kw)
    one, _ = run(files[:2])              # one frame per filter
    eng, recs = run(files)               # eight per filter

    def block_noise(img):
        b = img[40:440, 40:600].reshape(50, 8, 70, 8).mean(axis=(1, 3))
        d = np.diff(b, axis=1).ravel()
        return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)

    for name in ("L", "Ha"):
        w = sum(r.weight for r in recs if r.filter == name)
        ratio = block_noise(eng.result(name)[0][0]) / block_noise(one.result(name)[0][0])
        assert abs(ratio * np.sqrt(w) - 1) < 0.15, (name, ratio, 1 / np.sqrt(w))


def _corr(a, b, mask):
    a, b = a[mask], b[mask]
    return float(np.corrcoef(a, b)[0, 1])


def _structure(img):
    """Large-scale structure: stars removed by a median, noise by a Gaussian."""
    return ndimage.gaussian_filter(ndimage.median_filter(np.nan_to_num(img), size=9), 4)


def test_sho_composite_channels_follow_their_filters(night, tmp_path):
    kw = dict(mono=True, n_frames=9, seed=4, filters=("Ha", "OIII", "SII"), dither_px=2.0)
    files, _ = night(**kw)
    eng, recs = run(files)
    assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
    assert eng.snapshot(tmp_path / "out")
    out = tmp_path / "out"
    for name in ("Ha", "OIII", "SII"):
        with fits.open(out / f"stack_{name}.fits") as h:
            assert h[0].data.shape == (480, 640) and h[0].data.dtype.itemsize == 4
            assert h[0].header["FILTER"] == name and h[0].header["NCOMBINE"] == 3
            assert h[0].header["EXPTIME"] == pytest.approx(540.0)
    with fits.open(out / "stack.fits") as h:
        rgb, hdr = h[0].data.astype(np.float32), h[0].header
    assert rgb.shape == (3, 480, 640)
    assert hdr["PALETTE"].startswith("SHO: R=SII G=Ha B=OIII"), hdr["PALETTE"]
    assert hdr["NCOMBINE"] == 9
    cfg = sim_cfg(**kw)
    truth = {line: _structure(nebula_truth(cfg, line)) for line in ("Ha", "OIII", "SII")}
    mask = np.zeros((480, 640), bool)
    mask[30:450, 30:610] = True
    mask &= np.isfinite(rgb).all(axis=0)
    for c, line in enumerate(("SII", "Ha", "OIII")):
        chan = _structure(rgb[c])
        right = _corr(chan, truth[line], mask)
        others = [_corr(chan, truth[o], mask) for o in truth if o != line]
        assert right > 0.8 and right > max(others) + 0.4, (line, right, others)
    # linear, not stretched: the background is removed (≈ 0), the bright signal near 1
    assert abs(float(np.nanmedian(rgb[:, mask]))) < 0.05


def test_the_stretched_export_of_a_composite_has_the_pages_colours(night):
    """The export's stretch (full resolution) re-balanced the composite's colours, which the palette sets and
    the page's preview leaves as they are: HOO came out red instead of cyan."""
    import dataclasses

    from livestack.engine import outputs
    from livestack.engine.compose import ComposeParams

    files, _ = night(mono=True, n_frames=9, seed=4, filters=("Ha", "OIII", "SII"), dither_px=2.0)
    eng, recs = run(files)
    cfg = Config()
    for palette in ("SHO", "HOO"):
        comp = ComposeParams(palette=palette)
        page = eng.preview(stretch=cfg.stretch, compose=comp).reshape(-1, 3).astype(float) / 255
        img, wsum = outputs.full_image(eng, comp)
        full = dataclasses.replace(cfg.stretch, max_size=max(img.shape[1:]))
        export = eng.preview(img, wsum, stretch=full, compose=comp, dtype=np.uint16).reshape(-1, 3) / 65535
        bright = [x[x.sum(1) > np.percentile(x.sum(1), 99.5)].mean(0) for x in (page, export)]
        np.testing.assert_allclose(bright[1], bright[0], atol=0.03, err_msg=palette)


def test_dual_band_colour_camera_makes_hoo_from_one_stack(night, tmp_path):
    kw = dict(n_frames=4, seed=6, filters=("HaOIII",))
    files, _ = night(**kw)
    cfg = dataclasses.replace(Config(), compose=ComposeParams(palette="HOO"))
    eng, recs = run(files, cfg)
    assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
    assert eng.snapshot(tmp_path / "out")
    with fits.open(tmp_path / "out" / "stack.fits") as h:
        rgb, hdr = h[0].data.astype(np.float32), h[0].header
    with fits.open(tmp_path / "out" / "stack_HaOIII.fits") as h:
        assert h[0].data.shape == (3, 480, 640)        # the colour stack itself, linear
    assert rgb.shape == (3, 480, 640) and hdr["PALETTE"].startswith("HOO"), hdr["PALETTE"]
    assert np.array_equal(rgb[1], rgb[2], equal_nan=True)      # green = blue = OIII
    cfg_sim = sim_cfg(**kw)
    ha, oiii = (_structure(nebula_truth(cfg_sim, line)) for line in ("Ha", "OIII"))
    mask = np.zeros((480, 640), bool)
    mask[30:450, 30:610] = True
    r, g = _structure(rgb[0]), _structure(rgb[1])
    assert _corr(r, ha, mask) > _corr(r, oiii, mask) + 0.4
    assert _corr(g, oiii, mask) > _corr(g, ha, mask) + 0.4
    # with palette auto the FILTER name says it is a dual-band filter: the same composite
    auto, _ = run(files)
    assert auto.snapshot(tmp_path / "auto")
    with fits.open(tmp_path / "auto" / "stack.fits") as h:
        assert h[0].header["PALETTE"] == hdr["PALETTE"]
        assert np.array_equal(h[0].data, rgb, equal_nan=True)


def test_a_colour_camera_behind_two_filters_keeps_its_colours(night, tmp_path):
    """A colour camera behind a UV/IR cut and a dual-band filter (a Seestar's IRCUT and LP): each stack was one
    white luminance in the composite, and stack.fits and the preview came out grey (its three channels equal)."""
    kw = dict(n_frames=6, seed=6, filters=("L", "HaOIII"))
    files, _ = night(**kw)
    eng, recs = run(files)
    assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
    assert eng.snapshot(tmp_path / "out")
    with fits.open(tmp_path / "out" / "stack.fits") as h:
        rgb, hdr = h[0].data.astype(np.float32), h[0].header
    assert hdr["PALETTE"] == "HUES: L=RGB HaOIII=HOO", hdr["PALETTE"]
    ha, oiii = (_structure(nebula_truth(sim_cfg(**kw), line)) for line in ("Ha", "OIII"))
    mask = np.zeros((480, 640), bool)
    mask[30:450, 30:610] = True
    r, g, b = (_structure(rgb[c]) for c in range(3))
    assert _corr(r, ha, mask) > _corr(r, oiii, mask) + 0.3
    assert _corr(g, oiii, mask) > _corr(g, ha, mask) + 0.3 and _corr(b, oiii, mask) > _corr(b, ha, mask) + 0.3
    # the broadband stack's channels balanced on its stars, as RGB is: each channel's own white point (its noise,
    # on a star field) gave the stars R/G 0.72
    rg, bg = _star_colours(rgb)
    assert 0.85 < rg < 1.15 and 0.85 < bg < 1.15, (rg, bg)


def test_a_mono_frame_among_a_colour_cameras_says_so(night):
    """A mono camera's frames in a colour camera's session (two cameras' frames in one folder) failed with
    'CFA pattern None differs from the session's RGGB': the sensor kinds are now said in words."""
    colour, _ = night("colour", n_frames=2, seed=3)
    mono, _ = night("mono", n_frames=1, seed=3, mono=True)
    eng, recs = run([colour[0], mono[0]])
    assert recs[1].status == "failed"
    assert recs[1].reason == "mono (no CFA pattern) differs from the session's CFA pattern RGGB", recs[1].reason
    eng, recs = run([mono[0], colour[1]])
    assert recs[1].reason == "CFA pattern RGGB differs from the session's mono (no CFA pattern)", recs[1].reason


def test_a_frame_of_another_binning_says_so(night, tmp_path):
    """L at 1×1 and R binned 2×2, as LRGB is often taken: each R frame failed with 'size 320×240 differs from
    the session's 640×480', nothing saying that the binning is what differs.  The reason says it now."""
    files, _ = night(mono=True, n_frames=2, seed=3, filters=("L", "R"))
    with fits.open(files[1]) as h:
        binned = h[0].data.astype(np.float32).reshape(240, 2, 320, 2).mean(axis=(1, 3))
        fits.PrimaryHDU(binned.astype(np.uint16), h[0].header).writeto(tmp_path / "r_bin2.fits")
    eng, recs = run([files[0], tmp_path / "r_bin2.fits"])
    assert recs[1].status == "failed"
    assert recs[1].reason == ("size 320×240 differs from the session's 640×480 (2× smaller: another binning? the "
                              "frames of one binning only are stacked together)"), recs[1].reason
    eng, recs = run([files[0], tmp_path / "r_bin2.fits"][::-1])
    assert "(2× larger: another binning?" in recs[1].reason, recs[1].reason


def test_rows_of_a_stack_in_its_bootstrap_equal_the_whole(night):
    """The composite is written in blocks of rows; a filter still in its bootstrap combines only those rows
    (plus a cell of margin): the same values as the whole combination, without a full-frame temporary."""
    files, _ = night(n_frames=2, seed=21, defects={1: "satellite"})
    eng, _ = run(files)
    st = eng.stacks[0].stack
    assert st.sums is None                              # both frames still in the bootstrap buffer
    mean, w = st.result()
    mean[:, ~(w > 0)] = np.nan
    for r0, r1 in ((0, 7), (7, 100), (100, 256), (256, 480), (3, 4), (479, 480), (0, 480)):
        assert np.array_equal(st.mean_rows(r0, r1), mean[:, r0:r1], equal_nan=True), (r0, r1)


@pytest.mark.parametrize("mono", [False, True])
def test_a_stack_in_its_bootstrap_is_written_as_block_by_block(night, tmp_path, mono):
    """stack.fits of a stack still in its bootstrap (the daemon writes it after each of its first frames) is
    written from one combination of each block of rows for every channel and the weights: the same bytes as
    the channel-by-channel writer, which combined each block four times."""
    from livestack.engine import outputs
    from livestack.engine.write import write_fits_blocks

    files, _ = night(n_frames=2, seed=23, mono=mono)
    eng, _ = run(files)
    fs = eng.stacks[0]
    assert fs.stack.sums is None
    c, (h, w) = eng.grid.channels, eng.grid.shape
    outputs._write_filter(eng, fs, tmp_path / "new.fits")
    write_fits_blocks(tmp_path / "old.fits", (h, w) if c == 1 else (c, h, w), fs.stack.mean_blocks(),
                      outputs.filter_header(eng, fs), weight=fs.stack.weight_blocks())
    assert (tmp_path / "new.fits").read_bytes() == (tmp_path / "old.fits").read_bytes()
    with fits.open(tmp_path / "new.fits") as hd:
        assert hd[0].data.shape == ((h, w) if c == 1 else (c, h, w)) and hd["WEIGHT"].data.shape == (h, w)
        assert np.isfinite(hd[0].data).all() and (hd["WEIGHT"].data > 0).mean() > 0.9


def test_checkpoints_and_spilled_stacks_give_the_uninterrupted_stack(night, tmp_path):
    """N stacks through a checkpoint (state saved inside every filter's bootstrap and after it) and with every
    stack but the one in use in memory-mapped files ([stack] memory_mb = 0): the same result, exactly."""
    files, _ = night(mono=True, n_frames=12, seed=12, filters=("L", "Ha", "OIII"), defects={7: "satellite"})
    full, _ = run(files)
    part = through_checkpoints(files, [4, 10], tmp_path)
    low = dataclasses.replace(Config(), stack=dataclasses.replace(Config().stack, memory_mb=0))
    spilled, _ = run(files, low, spill_dir=tmp_path / "spill")
    assert all(fs.stack.spill_dir is not None for fs in spilled.stacks)
    assert not list((tmp_path / "spill").iterdir())          # the mapped files are unlinked at once
    for name in ("L", "Ha", "OIII"):
        a, wa = full.result(name)
        for other in (part, spilled):
            b, wb = other.result(name)
            assert np.array_equal(a, b) and np.array_equal(wa, wb), name
    assert part.n_stacked == spilled.n_stacked == full.n_stacked == 12


def test_filters_whose_names_make_one_file_name_get_two_files(night, tmp_path):
    """FILTER 'C a' and 'C_a' are two filters with one file-safe name, as are 'nofilter' and no FILTER card:
    each stack gets its own file (the second 'stack_C_a-2.fits'), also after a checkpoint — before, the second
    overwrote the first's stack_C_a.fits."""
    files, _ = night(mono=True, n_frames=6, seed=5, filters=("L", "Ha", "OIII"))
    names = {"L": "C a", "Ha": "C_a", "OIII": None}
    for f in files:
        with fits.open(f, mode="update") as hd:
            new = names[hd[0].header["FILTER"]]
            if new is None:
                del hd[0].header["FILTER"]
            else:
                hd[0].header["FILTER"] = new
    extra = tmp_path / "extra.fits"
    with fits.open(files[3]) as hd:
        hd[0].header["FILTER"] = "nofilter"
        hd.writeto(extra)
    files = files + [extra]
    for eng in (run(files)[0], through_checkpoints(files, [4], tmp_path)):
        assert [(fs.name, fs.file_name, fs.label) for fs in eng.filters.values()] == [
            ("C a", "stack_C_a.fits", "C a"), ("C_a", "stack_C_a-2.fits", "C_a"),
            (None, "stack_nofilter.fits", "none"), ("nofilter", "stack_nofilter-2.fits", "nofilter")]
    out = tmp_path / "out"
    assert eng.snapshot(out)
    for fs in eng.stacks:
        with fits.open(out / fs.file_name) as hd:
            assert hd[0].header.get("FILTER") == fs.name and hd[0].header["NCOMBINE"] == fs.counts.stacked
    with fits.open(out / "stack.fits") as hd:
        assert hd[0].header["FILTER"] == "C a,C_a,none,nofilter"


def _relabel(files, names: dict) -> None:
    """FILTER of each file (by its index) set to ``names[i]``."""
    for i, new in names.items():
        with fits.open(files[i], mode="update") as hd:
            hd[0].header["FILTER"] = new


def test_spellings_of_one_filter_make_one_stack(night, tmp_path):
    """'Ha', 'H-alpha' and 'HALPHA' (two capture programs naming one wheel's filter) are one filter: one stack,
    named as first seen, with all their frames; a bandwidth keeps two apart ('Ha 7nm', 'Ha 3nm').  Before, each
    spelling made a stack of its own and the composite had two greens."""
    files, _ = night(mono=True, n_frames=10, seed=5, filters=("L", "Ha"))
    _relabel(files, {3: "H-alpha", 5: "HALPHA", 7: "Ha"})
    eng, recs = run(files)
    assert [(fs.name, fs.file_name) for fs in eng.filters.values()] == [("L", "stack_L.fits"),
                                                                         ("Ha", "stack_Ha.fits")]
    ha = eng.filters[filter_key("H-alpha")]
    assert ha is eng.filters[filter_key("Ha")] and ha.counts.stacked == sum(r.status in STACKED and r.filter != "L"
                                                                 for r in recs) == 5
    assert [r.filter for r in recs][1:9:2] == ["Ha", "H-alpha", "HALPHA", "Ha"]     # each frame says its own
    _relabel(files, {1: "Ha 7nm", 3: "H-alpha 7.0 nm", 5: "Ha 3nm", 7: "Ha 3 nm", 9: "Ha 3nm"})
    eng, _ = run(files)
    assert [(fs.name, fs.counts.stacked) for fs in eng.filters.values()] == [("L", 5), ("Ha 7nm", 2),
                                                                              ("Ha 3nm", 3)]


def test_a_checkpoint_keyed_by_spelling_resumes(night, tmp_path, monkeypatch):
    """A checkpoint written when each spelling was a filter of its own: a night of 'H-alpha' alone resumes into
    its stack (its reference found under the new key), and one with both 'Ha' and 'H-alpha' keeps the two stacks
    it had, each taking its own spelling's frames."""
    from livestack.engine import filterstack, pipeline
    from livestack.session import load_engine, save_engine

    def old_key(name):
        return (name or "").strip().casefold()

    new_state = pipeline.Engine.state

    def old_state(self):        # without the mark of filter_key's keys
        meta, arrays, stacks = new_state(self)
        del meta["filter_keys"]
        return meta, arrays, stacks

    files, _ = night(mono=True, n_frames=10, seed=5, filters=("Ha", "L"))
    _relabel(files, {i: "H-alpha" for i in range(0, 10, 2)})
    for both in (False, True):
        if both:
            _relabel(files, {2: "Ha", 6: "Ha"})
        with monkeypatch.context() as m:
            m.setattr(pipeline, "filter_key", old_key)
            m.setattr(filterstack, "filter_key", old_key)
            m.setattr(pipeline.Engine, "state", old_state)
            eng, _ = run(files[:8])
            assert eng.ref.filter == "h-alpha" and len(eng.filters) == 2 + both
            save_engine(eng, tmp_path / "old.npz")
        eng, _ = load_engine(tmp_path / "old.npz", Config())
        assert eng.main is not None and eng.main.name == "H-alpha"
        assert sorted(eng._recent) == sorted(eng.filters), (eng._recent, list(eng.filters))   # each one's key
        before = {fs.name: fs.counts.stacked for fs in eng.filters.values()}
        recs = [eng.process(f) for f in files[8:]]
        assert [r.status for r in recs] == ["stacked", "stacked"], [r.reason for r in recs]
        assert {fs.name: fs.counts.stacked - before[fs.name] for fs in eng.filters.values()} == \
            {"H-alpha": 1, "L": 1, **({"Ha": 0} if both else {})}


SPILL_KILLED = """
import os, signal, sys, types
from pathlib import Path
import numpy as np
from livestack.engine.stack import RunningStack

def killed(fd, offset, length):          # the power goes (or kill -9) while the blocks are being reserved
    os.kill(os.getpid(), signal.SIGKILL)

os.posix_fallocate = killed
RunningStack._new(types.SimpleNamespace(spill_dir=Path(sys.argv[1])), (3, 300, 400), np.float32)
"""


def test_a_spill_file_is_not_left_behind_by_a_kill(tmp_path):
    """A spilled array's file was unlinked only after its blocks were reserved and mapped: killed meanwhile (on
    exFAT or vfat posix_fallocate writes every block: seconds for a 24 MP stack's arrays), a `.stack-*.dat` as
    big as the array stayed in session/ for good — nothing at start removes it.  It is unlinked first now."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    spill = tmp_path / "session"
    spill.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", SPILL_KILLED, str(spill)], env=env, capture_output=True, timeout=60)
    assert r.returncode == -9, r.stderr.decode()[-500:]
    assert list(spill.iterdir()) == []


def test_a_filter_file_kept_between_writes_says_its_rejected_frames(night, tmp_path):
    """A filter that stacked nothing since its file was written keeps the file; a frame of it rejected still
    changes its header: NREJECT said 0 in stack_R.fits while the engine (and the page) counted 1 — the file
    was kept on the filter's stack version alone."""
    files, _ = night(mono=True, n_frames=4, seed=6, filters=("L", "R"))
    bad = tmp_path / "light_0099_60s_R.fits"          # no stars: registration fails, the R frame is rejected
    with fits.open(files[1]) as hd:
        hd[0].data = (np.median(hd[0].data) + np.random.default_rng(0).normal(0, 20, hd[0].data.shape)).astype(
            hd[0].data.dtype)
        hd.writeto(bad)
    eng, recs = run(files)
    out = tmp_path / "out"
    assert eng.snapshot(out)
    rec = eng.process(bad)
    assert rec.status == "rejected" and rec.filter == "R", rec.reason
    assert eng.snapshot(out)
    for name, rejected in (("stack_R.fits", 1), ("stack_L.fits", 0), ("stack.fits", 1)):
        assert fits.getheader(out / name)["NREJECT"] == rejected, name


def _star_colours(rgb: np.ndarray) -> tuple[float, float]:
    """Median R/G and B/G of the stars of a linear (3, H, W) composite (aperture sums with a local annulus)."""
    import sep

    ok = np.isfinite(rgb).all(axis=0)
    img = np.ascontiguousarray(np.where(ok, rgb, 0), np.float32)
    g = img[1]
    obj = sep.extract(g, 10.0, err=float(np.std(g[ok & (g < np.percentile(g[ok], 90))])), mask=~ok, minarea=4)
    flux = [sep.sum_circle(img[c], obj["x"], obj["y"], 3.0, mask=~ok, bkgann=(5.0, 8.0))[0] for c in range(3)]
    good = (flux[1] > 0) & np.isfinite(flux[0]) & np.isfinite(flux[2])
    assert good.sum() >= 20, good.sum()
    return float(np.median(flux[0][good] / flux[1][good])), float(np.median(flux[2][good] / flux[1][good]))


@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7, 8])
def test_the_composites_star_colours_do_not_depend_on_each_filters_integration(night, tmp_path, seed):
    """RGB: each filter's white point came from its stack's noise (20 σ beats the 99.5th percentile in a star
    field), so the filter with less integration was darker: with one R frame against four, the stars' R/G fell
    to a third.  Now the whites follow the stars' fluxes: the median star is white, however deep each stack."""
    files, _ = night(mono=True, n_frames=12, seed=seed, filters=("R", "G", "B"), dither_px=2.0)
    colours = []
    for name, keep in (("even", files), ("one_r", [f for i, f in enumerate(files) if i % 3 or i == 0])):
        eng, recs = run(keep)
        assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
        assert eng.snapshot(tmp_path / name)
        with fits.open(tmp_path / name / "stack.fits") as h:
            rgb, palette = h[0].data.astype(np.float32), h[0].header["PALETTE"]
        assert palette.startswith("RGB"), palette
        colours.append(_star_colours(rgb))
    (rg_even, bg_even), (rg_one, bg_one) = colours
    assert 0.85 < rg_even < 1.15 and 0.85 < bg_even < 1.15, colours
    assert abs(rg_one / rg_even - 1) < 0.1 and abs(bg_one / bg_even - 1) < 0.1, colours


def test_star_white_leaves_out_the_stars_saturated_in_every_frame(night):
    """star_white's photometry takes the reference's brightest stars — the first to saturate, most in the longest
    exposures: a star clipped in every B frame measured the clip level, and its B/R came out at 0.24–0.85 of the
    same star's unclipped.  Such a star (its pixels count with saturated_weight) is left out: every star measured
    on the clipped night has the colour it has on the same night with a sensor that does not saturate."""
    from livestack.engine import outputs

    colours = []
    for white in (60000, 2500):
        files, _ = night(f"white{white}", mono=True, n_frames=6, seed=3, filters=("R", "B"), dither_px=2.0,
                         white=white, filter_exptime={"R": 30.0, "B": 120.0})
        eng, recs = run(files)
        assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
        fluxes = outputs.star_fluxes(eng)
        colours.append(fluxes["B"][0][0] / fluxes["R"][0][0])
    deep, clipped = colours
    both = np.isfinite(deep) & np.isfinite(clipped)
    assert both.sum() >= 20, both.sum()
    np.testing.assert_allclose(clipped[both], deep[both], rtol=0.05)


@pytest.mark.parametrize("drizzle, n", [(None, 2), (None, 5), (2.0, 5), (1.0, 2)])
def test_a_window_of_the_mean_equals_the_whole_means(night, drizzle, n):
    """stack.mean_window (the stamps star_white measures stars on) reads only its window — widened by the hole
    filling's and the sharpening's reach on a drizzle grid, not whole rows (60 stamps of a 96 MP drizzle grid
    would have read 60 bands of 12 000 px) — and gives the whole mean's values there."""
    from livestack.engine.drizzle import DrizzleParams

    files, _ = night(n_frames=n, seed=22, fmt="dng")
    cfg = dataclasses.replace(Config(), drizzle=DrizzleParams(scale=drizzle)) if drizzle else Config()
    eng, recs = run(files, cfg)
    assert all(r.status in STACKED for r in recs), [r.reason for r in recs]
    st = eng.stacks[0].stack
    whole = st.mean_rows(0, st.shape[1])
    h, w = st.shape[1:]
    for r0, r1, c0, c1 in ((0, 9, 0, 11), (40, 61, 100, 121), (h - 13, h, w - 17, w), (3, 4, 5, 6)):
        # (the drizzle's sharpening rounds a little otherwise on a window: OpenCV's filters, ≤ 1e-7 relative)
        np.testing.assert_allclose(st.mean_window(r0, r1, c0, c1), whole[:, r0:r1, c0:c1], rtol=1e-6 if drizzle else 0,
                                   atol=0, equal_nan=True, err_msg=str((r0, r1, c0, c1)))
