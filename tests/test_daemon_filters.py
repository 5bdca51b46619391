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


def test_exclude_leaves_no_stack_file_of_a_filter_without_frames(tmp_path):
    """After a restack a filter with no frame left has no stack_<F>.fits — as `livestack stack` of the
    included files gives — and a filter whose name clash is gone gets back its plain file name: no stale
    file keeps the excluded frame."""
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    night = tmp_path / "night"
    seq = ("L", "H a", "L", "H_a")            # "H a" and "H_a" both come out as stack_H_a…
    truth = render_night(night, SimConfig(width=320, height=240, n_stars=600, n_frames=len(seq), mono=True,
                                          seed=11, filters=seq, dither_px=2.0))
    files = [night / f["file"] for f in truth["frames"]]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files:
        (watch / f.name).write_bytes(f.read_bytes())
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out)))
    svc.start()
    try:
        deadline = time.monotonic() + 60
        while not ((s := svc.status())["frames"] >= 4 and s["state"] == "idle") and time.monotonic() < deadline:
            time.sleep(0.05)
        stacks = lambda: sorted(p.name for p in out.glob("stack*.fits"))
        while len(stacks()) < 4 and time.monotonic() < deadline:     # written once idle
            time.sleep(0.05)
        assert stacks() == ["stack.fits", "stack_H_a-2.fits", "stack_H_a.fits", "stack_L.fits"], \
            [(r["file"], r["status"], r["reason"]) for r in read_frames_log(out / "frames.jsonl")]
        svc.exclude(files[1].name).result(timeout=60)       # "H a": its only frame
        assert stacks() == ["stack.fits", "stack_H_a.fits", "stack_L.fits"]
        assert fits.getheader(out / "stack_H_a.fits")["FILTER"] == "H_a"
        svc.exclude(files[3].name).result(timeout=60)       # "H_a" too: L alone
        assert stacks() == ["stack.fits", "stack_L.fits"]
        assert fits.getheader(out / "stack.fits")["FILTER"] == "L"
        svc.exclude(files[3].name, False).result(timeout=60)
        assert stacks() == ["stack.fits", "stack_H_a.fits", "stack_L.fits"]
        for f in (files[0], files[2], files[3]):               # every frame out: no stack at all
            svc.exclude(f.name).result(timeout=60)
        assert stacks() == [] and not (out / "preview.jpg").exists()
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
