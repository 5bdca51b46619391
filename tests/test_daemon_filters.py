"""`livestack run` while the filter wheel turns: a stack per filter, the composite, and kill -9 in between."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from drivers.simulator import SimConfig, render_night
from livestack.session import read_frames_log


@pytest.fixture(scope="module")
def wheel_night(tmp_path_factory) -> list[Path]:
    """16 mono frames: 5 × L, 5 × Ha, 3 × L, 3 × OIII (a wheel turned by hand twice, then a third filter)."""
    root = tmp_path_factory.mktemp("wheel")
    seq = ("L",) * 5 + ("Ha",) * 5 + ("L",) * 3 + ("OIII",) * 3
    cfg = SimConfig(width=400, height=300, n_stars=900, n_frames=len(seq), mono=True, seed=7, filters=seq,
                    dither_px=2.0, filter_exptime={"L": 30, "Ha": 60, "OIII": 60})
    truth = render_night(root, cfg)
    return [root / f["file"] for f in truth["frames"]]


def read(out: Path, name: str):
    with fits.open(out / name) as h:
        return np.array(h[0].data), dict(h[0].header)


def test_filter_changes_and_kill9_give_the_uninterrupted_stacks(make_daemon, wheel_night):
    files = wheel_night
    ref = make_daemon(name="uninterrupted").run_through(files)
    ref_recs = {r["file"]: (r["status"], r["filter"]) for r in read_frames_log(ref.out / "frames.jsonl")}
    assert all(s in ("reference", "stacked") for s, _ in ref_recs.values()), ref_recs

    d = make_daemon(name="killed")
    copy = d.feeder(files)
    copy(4)
    d.start()
    d.wait_lines(3)
    copy(4, pause=0.1)                  # the wheel turns to Ha while the daemon runs
    d.wait_lines(6)
    d.kill9()
    copy(4)                             # Ha and back to L while it is down
    d.start()
    d.wait_lines(11)
    d.kill9()
    copy(4)                             # the last L frames and a third filter
    d.start()
    d.wait_lines(len(files))
    time.sleep(0.5)
    assert d.stop() == 0

    recs = read_frames_log(d.out / "frames.jsonl")
    assert sorted(r["file"] for r in recs) == sorted(f.name for f in files)    # none twice, none skipped
    assert {r["file"]: (r["status"], r["filter"]) for r in recs} == ref_recs
    for name, n, t in (("stack_L.fits", 8, 240.0), ("stack_Ha.fits", 5, 300.0), ("stack_OIII.fits", 3, 180.0)):
        a, ha = read(ref.out, name)
        b, hb = read(d.out, name)
        assert ha["NCOMBINE"] == hb["NCOMBINE"] == n and hb["EXPTIME"] == pytest.approx(t), name
        assert a.shape == (300, 400) and np.allclose(a, b, rtol=1e-5, atol=1e-3), (name, np.abs(a - b).max())
    a, ha = read(ref.out, "stack.fits")
    b, hb = read(d.out, "stack.fits")
    assert a.shape == (3, 300, 400) and hb["PALETTE"] == ha["PALETTE"] and hb["NCOMBINE"] == 16
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert "resumed" in "".join(p.read_text() for p in sorted(d.tmp.glob("daemon-*.log")))
