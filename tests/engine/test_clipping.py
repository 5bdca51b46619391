"""Issue #12: the stack's outlier rejection must not clip star cores when the seeing changes between frames.
Mono nights whose seeing alternates between 4 and 2.5 px FWHM, improves from 4 to 2.5 px, or stays at 3.16 px
(± the simulator's 10 % jitter); truth known.  Figures: benchmarks/bench_clipping.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drivers.simulator import SimConfig, frame_name, render_frame, sky_field, write_frame
from livestack.engine import geometry
from livestack.engine.pipeline import Engine
from livestack.engine.settings import Config
from livestack.engine.stack import RunningStack
from livestack.engine.stars import StarParams, detect_stars

SHARP, SOFT = 2.5, 4.0
SIM = {"width": 640, "height": 480, "n_stars": 600, "mono": True, "seed": 17, "dither_px": 3.0,
       "rotation_deg": 0.05}
NIGHTS = {"alternating, soft first": [SOFT, SHARP] * 5,
          "improving": list(np.geomspace(SOFT, SHARP, 10)),
          "steady": [float(np.sqrt(SOFT * SHARP))] * 8}


def seeing_night(root, fwhms):
    """Mono lights, light i at median seeing fwhms[i] px (±10 % jitter); every other draw as in a steady night.
    Returns (files, per-frame truth: fwhm, frame_to_sky)."""
    cfg = SimConfig(n_frames=len(fwhms), **SIM)
    root.mkdir(parents=True, exist_ok=True)
    files, truth = [], []
    for i, f in enumerate(fwhms):
        c = dataclasses.replace(cfg, fwhm_px=f)
        raw, meta = render_frame(c, i)
        files.append(root / frame_name("light", i, meta["exptime"], "fits"))
        write_frame(files[-1], raw, meta, c)
        truth.append({"fwhm": meta["fwhm"], "m": meta["frame_to_sky"]})
    return files, truth


def config(**stack) -> Config:
    """Defaults (and ``stack`` fields), but the frame judge lets the 4 px frames through: its 1.5 × running-
    median FWHM test would reject them after 2.5 px ones, and this is about what the stack does with what
    reaches it."""
    cfg = Config()
    return dataclasses.replace(cfg, reject=dataclasses.replace(cfg.reject, fwhm_factor=3.0),
                               stack=dataclasses.replace(cfg.stack, **stack))


def stack(files, cfg, *, reject=True):
    """((1, H, W) stack, [(cells − sky, rejected cells) per stacked frame]): RunningStack watched, and with
    ``reject`` False told that no cell is an outlier (the plain weighted mean of the same frames)."""
    seen, given = [], []
    orig_add, orig_adder = RunningStack.add_channels, RunningStack._pixel_adder

    def add_channels(self, cells, channel, weight, noise, **kw):
        seen.append([cells - self.sky_lum])
        return orig_add(self, cells, channel, weight, noise, **kw)

    def adder(self, bad_cells, weight, saturated, sums, wsum):
        # a frame joins the stack (not a combination for reading), once (a buffer's combination makes an adder
        # for each span of rows, with the same cells)
        if sums is self.sums and not any(b is bad_cells for b in given):
            given.append(bad_cells)
            next(s for s in seen if len(s) == 1).append(bad_cells.copy())
        return orig_adder(self, bad_cells, weight, saturated, sums, wsum)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunningStack, "add_channels", add_channels)
        m.setattr(RunningStack, "_pixel_adder", adder)
        if not reject:
            m.setattr(RunningStack, "_threshold", lambda self, b, centre, var: np.zeros(b.shape, bool))
        eng = Engine(cfg)
        recs = [eng.process(f) for f in files]
        img, _ = eng.result()
        eng.close()
    assert all(r.status in ("reference", "stacked") for r in recs), [r.reason for r in recs]
    assert len(seen) == len(files) and all(len(s) == 2 for s in seen)
    return img, seen


def star_cells(truth, shape) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the 2×2 cells within 6 px of the true positions of isolated stars, bright enough to
    matter and unsaturated in the sharpest frame, on the grid (the reference frame's pixels)."""
    sky = sky_field(SimConfig(**SIM))
    xy = geometry.apply(geometry.invert(np.array(truth[0]["m"])), sky.xy)
    peak = sky.rate * 60.0 / (2 * np.pi * (0.9 * SHARP / 2.3548) ** 2)     # e- = ADU at gain 1
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    h, w = shape
    ok = (xy[:, 0] > 20) & (xy[:, 0] < w - 20) & (xy[:, 1] > 20) & (xy[:, 1] < h - 20) & \
         (peak > 500) & (peak < 6000) & (d.min(axis=1) > 12)
    assert ok.sum() >= 15, ok.sum()
    rows, cols = [], []
    for x, y in xy[ok]:
        cy, cx = np.mgrid[int(y / 2) - 4:int(y / 2) + 5, int(x / 2) - 4:int(x / 2) + 5]
        near = np.hypot(2 * cx + 0.5 - x, 2 * cy + 0.5 - y) <= 6.0
        rows.append(cy[near]), cols.append(cx[near])
    return np.concatenate(rows), np.concatenate(cols)


def lost_to_rejection(seen, cells) -> np.ndarray:
    """Per stacked frame: the fraction of its star flux (the star cells) that fell in rejected cells."""
    rows, cols = cells
    out = []
    for b, bad in seen:
        v = np.nan_to_num(b[rows, cols])
        out.append(v[bad[rows, cols]].sum() / v.sum())
    return np.array(out)


def stack_fwhm(img) -> float:
    """sep + aperture-moment FWHM of a stack's stars, as tests/engine/test_sharpness.py measures it."""
    _, q = detect_stars(np.ascontiguousarray(img[0, 20:-20, 20:-20]), StarParams())
    assert q.stars > 50
    return q.fwhm


@pytest.fixture(scope="module", params=list(NIGHTS))
def night(request, tmp_path_factory):
    """(files, truth, FWHM of the plain weighted mean of the night's frames)."""
    files, truth = seeing_night(tmp_path_factory.mktemp("night"), NIGHTS[request.param])
    plain, _ = stack(files, config(), reject=False)
    return files, truth, stack_fwhm(plain)


def check_star_cores_keep_their_flux(night, cfg):
    files, truth, plain_fwhm = night
    img, seen = stack(files, cfg)
    lost = lost_to_rejection(seen, star_cells(truth, img.shape[1:]))
    # None of these stars meets a cosmic ray or a trail: every rejected core cell is a false rejection.
    # Measured (seed 17; soft first / improving / steady): the engine before (rel_floor 0.1, dropped after 5
    # frames) took 41 / 14 / 6 % of the sharp frames' star flux and its stars were 4.3 / 0.9 / −0.3 % wider than
    # the plain mean's; with the relative floor 0.3 kept for good ≤ 0.8 % on average and within 0.3 % (seeds 3
    # and 5 alike).  The one frame that
    # may lose a little is a minority seeing among the first three, clipped against their median (4.5 %).
    assert lost.mean() < 0.02 and lost.max() < 0.08, lost
    assert abs(stack_fwhm(img) / plain_fwhm - 1) < 0.01


def test_star_cores_keep_their_flux(night):
    check_star_cores_keep_their_flux(night, config())

