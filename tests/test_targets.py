"""Several targets in one night: a new stack on each new target, the old ones archived and resumed on a return,
none of their frames lost or counted twice — also across kill -9 and a later night."""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import Config
from livestack.session import read_frames_log
from livestack.targets import SWITCH_FILE, Book, Target, recover, separation

from conftest import sky_frames, stack_with_cli

STACKED = ("reference", "stacked")
M13, M57 = (250.42, 36.46), (283.40, 33.03)


def _sky(root: Path, key: str, sky_seed: int, n: int, hour: int, pointing=None, name=None, **kw) -> list[Path]:
    return sky_frames(root, key, n, sky_seed=sky_seed, start=f"2026-11-25T{hour:02d}:00:00", pointing=pointing,
                      object=name, drift_px=(0.4, -0.3), **kw)


@pytest.fixture(scope="module")
def three_targets(tmp_path_factory):
    """M13 (5 frames), M57 (5), M13 again (4): (files in capture order, {key: files}), with and without pointing."""
    root = tmp_path_factory.mktemp("targets")
    sets = {}
    for pointing in (False, True):
        r = root / ("pointing" if pointing else "stars")
        a = _sky(r, "a", 11, 5, 20, M13 if pointing else None, "M 13" if pointing else None)
        b = _sky(r, "b", 22, 5, 21, M57 if pointing else None, "M 57" if pointing else None)
        c = _sky(r, "c", 11, 4, 22, M13 if pointing else None, "M 13" if pointing else None)
        sets[pointing] = (a + b + c, {"a": a, "b": b, "c": c})
    return sets


def _service(tmp_path, watch: Path, out: Path, daemon: dict | None = None, **session):
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    cfg = Config()
    if session:
        cfg.extra["session"] = session
    return Service(cfg, watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                   DaemonParams(**{"out": str(out), "checkpoint_every": 2, **(daemon or {})}))


def _feed_live(svc, watch: Path, files, *, timeout: float = 60.0) -> None:
    """Copy each file into the watched folder once the previous one is done (as a camera writes them)."""
    fed: set[str] = set()
    for f in files:
        shutil.copy(f, watch / f.name)
        fed.add(f.name)
        deadline = time.monotonic() + timeout
        while True:
            snap = svc.snapshot           # one status: its state goes with its frames and held ones
            if fed <= _handled(snap, svc.out) and snap.status.get("state") == "idle" and not svc._redo:
                break
            assert svc.running, svc.error
            assert time.monotonic() < deadline, f"{f.name} not done in {timeout} s: {snap.status}"
            time.sleep(0.05)


def _handled(snap, out: Path) -> set[str]:
    """The files recorded in some target's frames.jsonl, or held (in the status ``snap``) — by name: while a
    switch of targets moves the folders (the one closed into archive/ before the one resumed comes out of it) and
    until its status is published, a target's lines are in two places at once.  Counted, they were counted twice
    and a frame still being read passed for done (the last status before the switch said "idle")."""
    names = {d.get("path") or d["file"] for d in snap.frames} | set(snap.status.get("held", []))
    for p in (out / "archive").glob("*/frames.jsonl"):
        try:
            names |= {d.get("path") or d["file"] for d in read_frames_log(p)}
        except FileNotFoundError:         # moved out of archive/ meanwhile: its lines are in the status then
            pass
    return names


def _by_target(out: Path) -> dict[str, list[dict]]:
    """{target name: its frames.jsonl records}, from targets.json and the folders it names."""
    book = json.loads((out / "targets.json").read_text())
    items = book["targets"] if isinstance(book, dict) else book
    return {t["name"]: read_frames_log(out / t["folder"] / "frames.jsonl") for t in items}


def _stacked_names(recs) -> list[str]:
    return [r["path"] for r in recs if r["status"] in STACKED]


@pytest.mark.parametrize("pointing", [False, True], ids=["stars", "pointing"])
def test_a_night_of_three_targets_ends_with_one_stack_per_target(tmp_path, three_targets, pointing):
    """M13, M57, back to M13: two targets, M13 resumed on its own grid; every frame recorded exactly once, in
    its target's folder; with pointing headers the switch comes at the first frame of M57, without them at the
    third (new_target_after = 3) — and the return at the first frame either way."""
    files, parts = three_targets[pointing]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, files)
    svc.stop(timeout=30)
    assert svc.error is None

    book = json.loads((out / "targets.json").read_text())["targets"]
    assert len(book) == 2
    first, second = book
    assert first["folder"] == "." and first["current"] and second["folder"].startswith("archive/")
    if pointing:
        assert (first["name"], second["name"]) == ("M 13", "M 57")
        assert first["pointing"] == pytest.approx(list(M13)) and second["pointing"] == pytest.approx(list(M57))
    else:
        assert (first["name"], second["name"]) == ("target 1", "target 2")
        assert first["pointing"] is None
    by = _by_target(out)
    m13, m57 = by[first["name"]], by[second["name"]]
    assert _stacked_names(m13) == [f.name for f in parts["a"] + parts["c"]]
    assert _stacked_names(m57) == [f.name for f in parts["b"]]
    assert len(m13) + len(m57) == len(files)                     # none lost, none counted twice
    assert first["frames"] == 9 and second["frames"] == 5
    # each target's stack is what `livestack stack` makes of that target's files
    for recs, folder in ((m13, out), (m57, out / second["folder"])):
        src = tmp_path / f"cli-{folder.name}"
        src.mkdir()
        for r in recs:
            shutil.copy(watch / r["path"], src / r["path"])
        stack_with_cli(src, tmp_path / f"cli-out-{folder.name}")
        mine = fits.getdata(folder / "stack.fits")
        theirs = fits.getdata(tmp_path / f"cli-out-{folder.name}" / "stack.fits")
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-3)
    # the archived target has everything it wrote: stack, preview, checkpoint, reference
    arch = out / second["folder"]
    for name in ("stack.fits", "preview.jpg", "frames.jsonl", "session/checkpoint.npz", "session/reference.json"):
        assert (arch / name).exists(), name


def test_back_to_a_target_without_a_checkpoint_keeps_its_reference(tmp_path, three_targets):
    """M13's checkpoint over [daemon] checkpoint_max_mb: back on M13 its frames are stacked again from
    frames.jsonl — its own first (the reference, the grid as it was), then the frame that brought it back; the
    returning frame went first and became the reference.  Meanwhile the page counts them as queued."""
    files, parts = three_targets[True]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out, {"checkpoint_max_mb": 0.001})
    seen = []
    real = type(svc)._frame

    def frame(self, item):
        if self._redo or seen:
            seen.append((len(self._redo), self.status()["queued"], self.status()["state"]))
        return real(self, item)

    svc._frame = frame.__get__(svc)
    svc.start()
    _feed_live(svc, watch, parts["a"] + parts["b"] + parts["c"][:1])
    svc.stop(timeout=30)
    assert svc.error is None
    m13 = _by_target(out)["M 13"]
    assert [(r["path"], r["status"]) for r in m13] == [(parts["a"][0].name, "reference")] + [
        (f.name, "stacked") for f in parts["a"][1:] + parts["c"][:1]]
    redone = [x for x in seen if x[0] > 0]
    assert redone and all(q >= n and state == "processing" for n, q, state in redone), seen


_NO_CKPT = {"checkpoint_max_mb": 0.001}       # no target ever has a checkpoint: a return restacks its frames


@pytest.fixture(scope="module")
def night_without_checkpoints(tmp_path_factory, three_targets):
    """{pointing: OUT of an uninterrupted daemon run over M13, M57, M13 again} with no checkpoint ever written."""
    done = {}

    def run(pointing: bool) -> Path:
        if pointing not in done:
            files, _ = three_targets[pointing]
            root = tmp_path_factory.mktemp("uninterrupted")
            watch, out = root / "watch", root / "out"
            watch.mkdir()
            svc = _service(root, watch, out, _NO_CKPT)
            svc.start()
            _feed_live(svc, watch, files)
            svc.stop(timeout=30)
            assert svc.error is None
            done[pointing] = out
        return done[pointing]
    return run


def _records(recs) -> list[tuple]:
    return [(r["path"], r["status"], r.get("index")) for r in recs]


@pytest.mark.parametrize("pointing", [False, True], ids=["stars", "pointing"])
@pytest.mark.parametrize("stop_at", ["switched", "a_02", "c_00"])
def test_a_stop_while_a_returning_target_is_restacked_loses_nothing(tmp_path, three_targets, night_without_checkpoints,
                                                                   pointing, stop_at):
    """Back on M13, which has no checkpoint: its frames are stacked again from its frames.jsonl, which the
    resume rewrote empty — the frames not restacked yet are then in no list but the worker's queue.  The daemon
    stopped (SIGTERM) right after the switch, while a_02 is restacked, or while c_00 (the frame that brought M13
    back) is stacked: the next start finds them again (no list names them) and stacks them in capture order —
    every frame once, in its own target, M13's stack and records as an uninterrupted night's."""
    files, parts = three_targets[pointing]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out, _NO_CKPT)
    reached, release, back = threading.Event(), threading.Event(), []
    real_switch, real_frame = svc._switch, type(svc)._frame

    def hold():
        reached.set()
        assert release.wait(60), "never released"

    def switch(to, redo, why):
        done = real_switch(to, redo, why)
        if done and to is not None:           # the return to M13: its frames are in _redo now, nowhere else
            back.append([i.rel for i in svc._redo])
            if stop_at == "switched":
                hold()
        return done

    def frame(self, item):
        if back and item.rel == f"{stop_at}.fits":
            hold()                            # the frame in hand: finished by the stop
        return real_frame(self, item)

    svc._switch = switch
    svc._frame = frame.__get__(svc)
    svc.start()
    _feed_live(svc, watch, parts["a"] + parts["b"])
    shutil.copy(parts["c"][0], watch / parts["c"][0].name)      # slews back to M13
    assert reached.wait(60), svc.snapshot.status
    assert back[0] == [f.name for f in parts["a"] + parts["c"][:1]]
    stopper = threading.Thread(target=svc.stop, kwargs={"timeout": 30})
    stopper.start()
    deadline = time.monotonic() + 10
    while not svc._stopping.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    stopper.join(60)
    assert not svc.running and svc.error is None
    # what the stop left: M13 current, with only the frames restacked before it — the others in no list
    assert not (out / SWITCH_FILE).exists()
    left = [r["path"] for r in read_frames_log(out / "frames.jsonl")]
    redone = {"switched": 0, "a_02": 3, "c_00": 6}[stop_at]
    assert left == [f.name for f in parts["a"] + parts["c"][:1]][:redone]
    assert not (out / "session" / "checkpoint.npz").exists()

    svc = _service(tmp_path, watch, out, _NO_CKPT)
    svc.start()
    want = {f.name for f in parts["a"] + parts["b"] + parts["c"][:1]}
    deadline = time.monotonic() + 60
    while not (want <= _handled(svc.snapshot, out) and svc.snapshot.status.get("state") == "idle"):
        assert svc.running, svc.error
        assert time.monotonic() < deadline, svc.snapshot.status
        time.sleep(0.05)
    _feed_live(svc, watch, parts["c"][1:])
    svc.stop(timeout=30)
    assert svc.error is None

    ref = night_without_checkpoints(pointing)
    by, ref_by = _by_target(out), _by_target(ref)
    assert sorted(by) == sorted(ref_by) and len(by) == 2
    for name in by:                             # each target's lines: the same files, statuses and indexes
        assert _records(by[name]) == _records(ref_by[name]), name
    names = sorted(r["path"] for recs in by.values() for r in recs)
    assert names == sorted(f.name for f in files)          # none lost, none twice, none in the other target
    book, ref_book = (json.loads((o / "targets.json").read_text())["targets"] for o in (out, ref))
    assert [(t["name"], t["folder"] == ".", t["frames"]) for t in book] == \
        [(t["name"], t["folder"] == ".", t["frames"]) for t in ref_book]
    for t, r in zip(book, ref_book):            # each target's stack as the uninterrupted night's
        with fits.open(out / t["folder"] / "stack.fits") as h, fits.open(ref / r["folder"] / "stack.fits") as g:
            assert h[0].header["NCOMBINE"] == g[0].header["NCOMBINE"] == t["frames"]
            np.testing.assert_allclose(h[0].data, g[0].data, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(h["WEIGHT"].data, g["WEIGHT"].data, rtol=1e-5, atol=1e-5)


def _wait_handled(d, n: int, timeout: float = 60.0) -> None:
    """Until at least n files are recorded in some target's frames.jsonl or held by the running daemon."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        logs = [d.out / "frames.jsonl", *sorted((d.out / "archive").glob("*/frames.jsonl"))]
        recorded = sum(len(read_frames_log(p)) for p in logs if p.exists())
        with urllib.request.urlopen(d.url.rstrip("/") + "/api/targets", timeout=5) as r:
            held = len(json.loads(r.read())["held"])
        if recorded + held >= n:
            return
        assert d.proc.poll() is None, d.log.read_text()
        assert time.monotonic() < deadline, f"{recorded} recorded + {held} held of {n} after {timeout} s"
        time.sleep(0.05)


def test_kill9_during_a_night_of_targets_loses_nothing(tmp_path, three_targets, make_daemon):
    """The daemon killed at several moments of the night (while frames of the second target are held, after
    the switch, after the return), restarted each time: every file ends in exactly one target's frames.jsonl,
    the right one, and a restart never stacks an archived target's files into the current one."""
    files, parts = three_targets[False]
    d = make_daemon(name="k9", checkpoint_every=1)
    d.start()
    for i, f in enumerate(files):
        shutil.copy(f, d.watch / f.name)
        if i in (6, 10, 12):            # two of M57 held; M57 current; M13 resumed
            # the moment is reached before the kill: on a loaded machine three kills could otherwise all land
            # while the first frame is still being stacked, which the daemon rightly takes for a file that kills
            # it (skipped as failed after max_attempts)
            _wait_handled(d, i)
            time.sleep(0.3)
            d.kill9()
            d.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if (d.out / "targets.json").exists():
            by = _by_target(d.out)
            if sum(len(v) for v in by.values()) >= len(files) and not (d.out / SWITCH_FILE).exists():
                break
        time.sleep(0.2)
    time.sleep(1.0)
    assert d.stop() == 0
    by = _by_target(d.out)
    assert len(by) == 2, by.keys()
    names = sorted(r["path"] for recs in by.values() for r in recs)
    assert names == sorted(f.name for f in files)             # each file once
    m13, m57 = by["target 1"], by["target 2"]
    seen = {k: [(r["path"], r["status"], r.get("reason") or r.get("error")) for r in v] for k, v in by.items()}
    assert _stacked_names(m13) == [f.name for f in parts["a"] + parts["c"]], seen
    assert _stacked_names(m57) == [f.name for f in parts["b"]], seen


def test_a_later_night_resumes_each_target(tmp_path, three_targets):
    """Night 1: M13 then M57 (archived M13).  Night 2 in the same output folder, the camera turned by 180°
    (the other side of the meridian): M13 frames first — they register onto M13's original reference and
    resume it — then M57's, resumed too: still two targets."""
    files, parts = three_targets[False]
    parts = {**parts, "c": _sky(tmp_path / "night2", "n2", 11, 4, 22, flip_at=0)}
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, parts["a"][:3] + parts["b"][:4])
    svc.stop(timeout=30)
    assert svc.error is None
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, parts["c"] + parts["b"][4:])
    svc.stop(timeout=30)
    assert svc.error is None
    by = _by_target(out)
    assert sorted(by) == ["target 1", "target 2"]
    assert _stacked_names(by["target 1"]) == [f.name for f in parts["a"][:3] + parts["c"]]
    assert all(abs(abs(r["rotation"]) - 180) < 0.5 for r in by["target 1"][3:]), by["target 1"]
    assert _stacked_names(by["target 2"]) == [f.name for f in parts["b"]]


def test_a_target_resumed_under_another_pixfrac_is_restacked_and_says_why(tmp_path, three_targets, caplog):
    """Night 1 drizzled ×1 (pixfrac 1): M13, then M57.  A restart with pixfrac 0.7, and M13 again: its frames made
    a third target (the archived grid, pixfrac and all, was compared with the frame's); now they resume M13,
    whose frames are stacked again under the new pixfrac — and the switch says so, as a start does."""
    import dataclasses
    import logging

    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service
    from livestack.engine.drizzle import DrizzleParams

    def service(pixfrac):
        cfg = dataclasses.replace(Config(), drizzle=DrizzleParams(scale=1, pixfrac=pixfrac))
        return Service(cfg, watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                       DaemonParams(out=str(out), checkpoint_every=2))

    files, parts = three_targets[False]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = service(1.0)
    svc.start()
    _feed_live(svc, watch, parts["a"][:3] + parts["b"][:4])
    svc.stop(timeout=30)
    assert svc.error is None
    svc = service(0.7)
    svc.start()
    with caplog.at_level(logging.INFO, logger="livestack"):
        _feed_live(svc, watch, parts["c"])
    svc.stop(timeout=30)
    assert svc.error is None
    by = _by_target(out)
    assert sorted(by) == ["target 1", "target 2"]
    assert _stacked_names(by["target 1"]) == [f.name for f in parts["a"][:3] + parts["c"]]
    said = [r.getMessage() for r in caplog.records if "resumed target 1" in r.getMessage()]
    assert said and "[drizzle] pixfrac = 1.0, now 0.7" in said[0] and "restacking all 3 frames" in said[0], said


def _by_night(tmp_path: Path, *nights: list[Path]) -> Path:
    """Each night's frames fed live to a daemon started for it on the same folders (stopped at dawn); the
    output folder."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for night in nights:
        svc = _service(tmp_path, watch, out)
        svc.start()
        _feed_live(svc, watch, night)
        svc.stop(timeout=30)
        assert svc.error is None
    return out


def test_a_later_night_with_another_camera_makes_a_new_target(tmp_path):
    """Night 1: M13 then M57 with one camera.  Night 2 in the same output folder: M13 again, through another
    camera (another sensor size).  Its frames cannot go on M13's grid: every one of them was recorded failed
    ("size … differs from the session's"), the night lost.  They make a target of their own (M 13 again, by its
    OBJECT), and the first night's two stay as they were."""
    a = _sky(tmp_path, "a", 11, 3, 20, M13, "M 13")
    b = _sky(tmp_path, "b", 22, 3, 21, M57, "M 57")
    c = _sky(tmp_path / "night2", "c", 11, 4, 22, M13, "M 13", width=360, height=280, seed=5)
    out = _by_night(tmp_path, a + b, c)
    book = json.loads((out / "targets.json").read_text())["targets"]
    got = [(t["name"], t["frames"], [(r["path"], r["status"]) for r in read_frames_log(out / t["folder"] / "frames.jsonl")])
           for t in book]
    assert got == [("M 13", 3, [(a[0].name, "reference"), (a[1].name, "stacked"), (a[2].name, "stacked")]),
                   ("M 57", 3, [(b[0].name, "reference"), (b[1].name, "stacked"), (b[2].name, "stacked")]),
                   ("M 13", 4, [(c[0].name, "reference")] + [(f.name, "stacked") for f in c[1:]])]
    assert book[2]["current"] and fits.getdata(out / "stack.fits").shape == (280, 360)


@pytest.mark.parametrize("night2", [{"sky_level": 1200.0}, {"fwhm_px": 4.8}], ids=["moon", "seeing"])
def test_a_new_target_on_a_later_night_with_the_moon_or_a_softer_seeing_is_a_new_target(tmp_path, night2):
    """Night 1: M13 (no pointing headers).  Night 2 in the same output folder: another field, under a sky 3×
    brighter (the moon) or with 1.6× the stars' width.  Its frames do not register onto M13 and were judged
    against M13's night-1 medians (sky, FWHM): every one 'not good', none counted for a new target — the whole
    night rejected as 'registration failed' in M13.  Judged as a new night's first frames (their shape alone),
    they make the new target."""
    a = _sky(tmp_path, "a", 11, 4, 20)
    c = sky_frames(tmp_path / "night2", "c", 5, sky_seed=33, start="2026-11-26T20:00:00", drift_px=(0.4, -0.3),
                   seed=5, **night2)
    out = _by_night(tmp_path, a, c)
    by = _by_target(out)
    assert sorted(by) == ["target 1", "target 2"], {k: [r.get("reason") for r in v] for k, v in by.items()}
    assert _stacked_names(by["target 1"]) == [f.name for f in a] and len(by["target 1"]) == 4
    assert _stacked_names(by["target 2"]) == [f.name for f in c]


def test_a_target_taken_up_again_on_a_softer_night_resumes_at_its_first_frame(tmp_path):
    """Night 1: M13 then M57 (no pointing headers).  Night 2: M13 again with 1.6× the stars' width.  Its frames do
    not register onto M57 (current) and were judged against M57's night-1 FWHM: 'not good', so never matched
    against M13's reference — the first three recorded 'registration failed' in M57 until one passed by its
    jitter.  Judged as a new night's first frames, the first of them resumes M13 and none is lost."""
    a, b = _sky(tmp_path, "a", 11, 4, 20), _sky(tmp_path, "b", 22, 4, 21)
    c = sky_frames(tmp_path / "night2", "c", 5, sky_seed=11, start="2026-11-26T20:00:00", drift_px=(0.4, -0.3),
                   seed=5, fwhm_px=4.8)
    out = _by_night(tmp_path, a + b, c)
    by = _by_target(out)
    assert sorted(by) == ["target 1", "target 2"]
    assert [r["path"] for r in by["target 1"]] == _stacked_names(by["target 1"]) == [f.name for f in a + c]
    assert [r["path"] for r in by["target 2"]] == [f.name for f in b]


def test_a_frame_that_fails_alone_is_rejected_not_a_new_target(tmp_path, three_targets):
    """One frame of another field between frames of the target: held, then rejected when the next frame
    registers — recorded in order, no new target."""
    files, parts = three_targets[False]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, parts["a"][:3] + parts["b"][:1] + parts["a"][3:])
    svc.stop(timeout=30)
    recs = read_frames_log(out / "frames.jsonl")
    assert [r["path"] for r in recs] == [f.name for f in parts["a"][:3] + parts["b"][:1] + parts["a"][3:]]
    odd = recs[3]
    assert odd["status"] == "rejected" and odd["reason"].startswith("registration failed")
    assert len(json.loads((out / "targets.json").read_text())["targets"]) == 1
    assert svc.engine.n_rejected == 1 and svc.engine.n_stacked == 5


def test_a_block_of_a_filter_whose_frames_do_not_register_is_not_a_new_target(tmp_path):
    """A filter wheel shooting blocks: L × 4, SII × 4 whose 7-9 stars do not register, L × 2.  A filter's first
    frames are judged on nothing, so the SII frames counted as good frames of a new field: the third made a new
    target, none of them could be its reference (a reference needs 15 stars), and the L frames after them
    became target 2's reference — the night's L split into two targets, where `livestack stack` made one.  A
    frame with too few stars for a reference now counts for no new target: the SII frames are rejected, the L
    frames stack on one target."""
    from drivers.simulator import SimConfig, render_night

    seq = ("L",) * 4 + ("SII",) * 4 + ("L",) * 2
    truth = render_night(tmp_path / "night", SimConfig(width=640, height=480, n_frames=len(seq), mono=True,
                                                       seed=21, filters=seq, n_stars=250, dither_px=2.0))
    files = [tmp_path / "night" / f["file"] for f in truth["frames"]]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, files[:6])
    assert svc.status()["held"] == []          # rejected as they come, not held for as long as the SII block
    _feed_live(svc, watch, files[6:])
    svc.stop(timeout=30)
    assert svc.error is None
    assert len(json.loads((out / "targets.json").read_text())["targets"]) == 1
    recs = read_frames_log(out / "frames.jsonl")
    assert [(r["path"], r["status"]) for r in recs] == [
        (f.name, "reference" if i == 0 else "rejected" if 4 <= i < 8 else "stacked") for i, f in enumerate(files)]
    assert all(r["stars"] < 15 and r["reason"].startswith("registration failed") for r in recs[4:8])


def test_a_stray_frame_between_two_close_targets_does_not_bounce_between_them(tmp_path):
    """Two fields 0.3° apart (mosaic panels: closer than slew_deg), then one frame that registers onto neither,
    the mount on the second: its pointing is within slew_deg of both, so it cannot say which — the stars do.  It
    went back to the first target by its pointing, failed there, went back to the second by its pointing, …: an
    endless switch of targets, the night's frames stuck behind it."""
    a_at, b_at = (250.42, 36.46), (250.42, 36.76)
    a = _sky(tmp_path, "a", 11, 3, 20, a_at, "NGC A")
    b = _sky(tmp_path, "b", 22, 5, 21, b_at, "NGC B")
    odd = _sky(tmp_path, "odd", 33, 1, 22, b_at, "NGC B")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    switches = []
    real = svc._switch

    def switch(to, redo, why):
        switches.append(why)
        if len(switches) > 4:
            svc._stopping.set()          # an endless loop: end it, the asserts below say what happened
        return real(to, redo, why)

    svc._switch = switch
    svc.start()
    try:
        _feed_live(svc, watch, a + b[:3] + odd + b[3:], timeout=30)
    except AssertionError:
        if len(switches) <= 4:
            raise
    finally:
        svc.stop(timeout=30)
    assert svc.error is None
    assert switches == ["3 good frames in a row do not register onto NGC A"]
    by = _by_target(out)
    assert _stacked_names(by["NGC A"]) == [f.name for f in a]
    assert _stacked_names(by["NGC B"]) == [f.name for f in b]
    assert [r["status"] for r in by["NGC B"] if r["path"] == odd[0].name] == ["rejected"]


def test_clouds_between_the_frames_of_a_new_field_still_make_a_new_target(tmp_path):
    """After a slew (no pointing headers: only the stars tell), every other frame of the new field is cloudy: the
    cloudy ones broke the row of good frames, and each break rejected the held ones into the old target — the
    new target never came, every frame of the new field was lost.  The cloudy frames are held too, counted for
    nothing, and go where the good ones go."""
    a = _sky(tmp_path, "a", 11, 3, 20)
    b = _sky(tmp_path, "b", 22, 6, 21, defects={1: "cloudy", 3: "cloudy"})
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, a + b)
    svc.stop(timeout=30)
    assert svc.error is None
    by = _by_target(out)
    assert sorted(by) == ["target 1", "target 2"]
    assert [r["path"] for r in by["target 1"]] == [f.name for f in a]
    assert [(r["path"], r["status"]) for r in by["target 2"]] == [
        (b[0].name, "reference"), (b[1].name, "rejected"), (b[2].name, "stacked"), (b[3].name, "rejected"),
        (b[4].name, "stacked"), (b[5].name, "stacked")]


def test_back_from_a_target_whose_every_frame_was_rejected_resumes_the_first(tmp_path):
    """M13, then M57 under clouds (every frame rejected: it never has a stack), then M13 again: the return was
    not seen — a target without a stack had no pointing to have slewed from — so M13's frames became the
    reference of the cloudy target, and M13 was stacked in two halves, two targets of one name."""
    a = _sky(tmp_path, "a", 11, 3, 20, M13, "M 13")
    b = _sky(tmp_path, "b", 22, 3, 21, M57, "M 57", defects={0: "cloudy", 1: "cloudy", 2: "cloudy"})
    c = _sky(tmp_path, "c", 11, 2, 22, M13, "M 13")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, a + b + c)
    svc.stop(timeout=30)
    assert svc.error is None
    book = json.loads((out / "targets.json").read_text())["targets"]
    assert [t["name"] for t in book if t["current"]] == ["M 13"] and len(book) == 2
    cur = read_frames_log(out / "frames.jsonl")
    assert _stacked_names(cur) == [f.name for f in a + c]
    assert [r["status"] for r in cur].count("reference") == 1
    other = next(t for t in book if not t["current"])
    assert [(r["path"], r["status"]) for r in read_frames_log(out / other["folder"] / "frames.jsonl")] == [
        (f.name, "rejected") for f in b]


def test_an_exclusion_asked_on_a_target_just_archived_is_refused_not_applied_to_the_next(tmp_path):
    """The page's "exclude" on a frame of M13 while the frame that slews to M57 is being read: the request ran
    after the switch, on M57 — answered as done, M57 restacked for nothing with a_02 in its excluded.json, and
    a_02 still stacked in M13.  It is refused (the frame is another target's now); M57 is left as it was."""
    from livestack.session import Refused

    a = _sky(tmp_path, "a", 11, 4, 20, M13, "M 13")
    b = _sky(tmp_path, "b", 22, 2, 21, M57, "M 57")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out)
    svc.start()
    _feed_live(svc, watch, a)
    real, futs = svc._switch, []

    def switch(to, redo, why):      # the click lands while b_00 is being read
        futs.append(svc.exclude(a[2].name))
        svc.follow(futs[0], f"exclude {a[2].name}")     # answered 202, as the page's after 2 s
        return real(to, redo, why)

    svc._switch = switch
    _feed_live(svc, watch, b)
    with pytest.raises(Refused, match="M 13"):
        futs[0].result(30)
    svc.stop(timeout=30)
    assert svc.error is None and svc.snapshot.status["restacks"] == 0
    # the page that got 202 learns it from the status: the worker's refusal reached its log only
    r = svc.status()["refused"]
    assert r["request"] == f"exclude {a[2].name}" and "is a frame of M 13, archived since" in r["error"], r
    assert not (out / "session" / "excluded.json").exists()
    assert [r["status"] for r in read_frames_log(out / "archive" / "M_13" / "frames.jsonl")].count("excluded") == 0
    assert _stacked_names(read_frames_log(out / "frames.jsonl")) == [f.name for f in b]


def test_new_target_after_zero_keeps_one_target(tmp_path, three_targets):
    files, parts = three_targets[False]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(tmp_path, watch, out, new_target_after=0)
    svc.start()
    _feed_live(svc, watch, parts["a"][:2] + parts["b"][:3])
    svc.stop(timeout=30)
    recs = read_frames_log(out / "frames.jsonl")
    assert [r["status"] for r in recs] == ["reference", "stacked", "rejected", "rejected", "rejected"]
    assert len(json.loads((out / "targets.json").read_text())["targets"]) == 1


# ---------------------------------------------------------------------- the switch itself, crash by crash

def _session(folder: Path, tag: str) -> None:
    (folder / "session").mkdir(parents=True, exist_ok=True)
    (folder / "frames.jsonl").write_text(json.dumps({"file": f"{tag}.fits", "path": f"{tag}.fits",
                                                     "status": "reference"}) + "\n")
    (folder / "stack.fits").write_text(tag)
    (folder / "session" / "checkpoint.npz").write_text(tag)


def _two_targets(tmp_path, archived: tuple[str, str, str], current: tuple[str, str]) -> tuple[Path, Book]:
    """OUT with target 1 archived (name, folder, its files' text) and target 2 current (name, text)."""
    out = tmp_path / "out"
    out.mkdir()
    _session(out, current[1])
    _session(out / archived[1], archived[2])
    (out / "targets.json").write_text(json.dumps({"targets": [
        Target(1, archived[0], archived[1], frames=1).to_dict(), Target(2, current[0], ".", frames=1).to_dict()]}))
    return out, Book.open(out)


@pytest.mark.parametrize("crash_after", ["journal", "archive", "bring", "none"])
def test_a_switch_interrupted_anywhere_is_finished_at_the_next_start(tmp_path, crash_after, monkeypatch):
    out, book = _two_targets(tmp_path, ("M 13", "archive/M_13", "m13"), ("M 57", "m57"))
    import livestack.targets as tg

    real_write, real_replace = tg.write_json_atomic, tg.os.replace
    state = {"journal": 0}

    class Crash(Exception):
        pass

    def write(path, obj):
        real_write(path, obj)
        if Path(path).name == SWITCH_FILE:
            state["journal"] += 1
            if crash_after == "journal" and obj["phase"] == "archive":
                raise Crash
            if crash_after == "archive" and obj["phase"] == "bring":
                raise Crash

    moved = []

    def replace(a, b):
        real_replace(a, b)
        moved.append(b)
        if crash_after == "bring" and Path(a).parent.name == "M_13" and len(moved) > 4:
            raise Crash

    monkeypatch.setattr(tg, "write_json_atomic", write)
    monkeypatch.setattr(tg.os, "replace", replace)
    try:
        book.switch(book.get(1))
    except Crash:
        pass
    monkeypatch.undo()
    book = Book.open(out)             # the next start
    assert not (out / SWITCH_FILE).exists()
    assert book.current.name == "M 13" and book.get(2).folder == "archive/M_57"
    assert (out / "stack.fits").read_text() == "m13"
    assert (out / "session" / "checkpoint.npz").read_text() == "m13"
    assert (out / "archive" / "M_57" / "stack.fits").read_text() == "m57"
    assert (out / "archive" / "M_57" / "session" / "checkpoint.npz").read_text() == "m57"
    assert not (out / "archive" / "M_13").exists()
    assert book.known_files() == {"m57.fits"}


def test_back_to_a_target_of_the_same_name_keeps_both(tmp_path):
    """Two panels of one OBJECT ("M 31"): going back to the first archived the current one into the first's own
    folder (archive/M_31) — over its stack — and the move of session/ then failed at this and every start."""
    out, book = _two_targets(tmp_path, ("M 31", "archive/M_31", "panel1"), ("M 31", "panel2"))
    book.switch(book.get(1))
    book = Book.open(out)             # the next start
    assert book.current.id == 1 and book.get(2).folder == "archive/M_31-2"
    assert (out / "stack.fits").read_text() == "panel1"
    assert (out / "session" / "checkpoint.npz").read_text() == "panel1"
    assert (out / "archive" / "M_31-2" / "stack.fits").read_text() == "panel2"
    assert (out / "archive" / "M_31-2" / "session" / "checkpoint.npz").read_text() == "panel2"
    assert not (out / "archive" / "M_31").exists() and not (out / SWITCH_FILE).exists()


def test_targets_json_unreadable_is_rebuilt_from_the_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _session(out, "cur")
    _session(out / "archive" / "20261125T210000Z", "old")
    (out / "targets.json").write_text("{not json")
    book = Book.open(out)
    assert [t.folder for t in book.targets] == [".", "archive/20261125T210000Z"]
    assert book.targets[1].closed                  # no reference.json: never matched
    assert list(out.glob("targets.json.*"))       # the unreadable one kept aside
    assert not recover(out)


def test_separation():
    assert separation((10, 0), (10, 0)) == 0
    assert separation((0, 0), (90, 0)) == pytest.approx(90)
    assert separation((359.9, 45), (0.1, 45)) == pytest.approx(0.2 * np.cos(np.radians(45)), rel=1e-3)
    assert separation((0, 89.9), (180, 89.9)) == pytest.approx(0.2, rel=1e-6)


def test_a_reference_of_another_demosaic_is_still_matched_by_its_stars():
    """A target archived by a bilinear session is found again by an MHC session: same sensor, same grid."""
    from livestack.engine.register import RegisterParams
    from livestack.engine.frame import Stars
    from livestack.targets import match_target

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 600, (60, 2))
    flux = rng.uniform(100, 1000, 60)
    ref = {"grid": {"mode": "bayer", "sensor_shape": [600, 600], "pattern": "RGGB"}, "xy": xy, "flux": flux}
    t = Target(1, "M 13", "archive/M_13")
    stars = Stars(xy + [3.0, -2.0], flux, 3.0, np.ones(60), np.ones(60))
    mhc = {"mode": "bayer-mhc", "sensor_shape": [600, 600], "pattern": "RGGB"}
    sp = {"mode": "superpixel", "sensor_shape": [600, 600], "pattern": "RGGB"}
    kw = dict(slew_deg=0.5, rng=np.random.default_rng(0))
    assert match_target(stars, mhc, None, [(t, ref)], RegisterParams(), **kw) is t
    assert match_target(stars, sp, None, [(t, ref)], RegisterParams(), **kw) is None    # another grid scale


def test_a_drizzled_reference_of_another_pixfrac_is_still_matched_by_its_stars():
    """A ×2 target archived under pixfrac 1, and a restart with pixfrac 0.7: the telescope back on it made a new
    target ("3 good frames in a row do not register onto …") instead of resuming it — the stars lie where the
    scale puts them, whatever the drop size.  Another drizzle scale is another grid, as before."""
    from livestack.engine.frame import Stars
    from livestack.engine.register import RegisterParams
    from livestack.targets import match_target

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1200, (60, 2))
    flux = rng.uniform(100, 1000, 60)
    grid = {"mode": "drizzle", "sensor_shape": [600, 600], "pattern": "RGGB", "scale": 2.0}
    ref = {"grid": {**grid, "pixfrac": 1.0}, "xy": xy, "flux": flux}
    t = Target(1, "M 13", "archive/M_13")
    stars = Stars(xy + [3.0, -2.0], flux, 3.0, np.ones(60), np.ones(60))
    kw = dict(slew_deg=0.5, rng=np.random.default_rng(0))
    assert match_target(stars, {**grid, "pixfrac": 0.7}, None, [(t, ref)], RegisterParams(), **kw) is t
    assert match_target(stars, {**grid, "scale": 1.0, "pixfrac": 1.0}, None, [(t, ref)], RegisterParams(),
                        **kw) is None


def test_two_real_seestar_nights_two_weeks_apart_stack_into_one_target(tmp_path, shared_data):
    """Seestar S50 on M94, 2025-03-27 and 2025-04-09 (another framing, the field turned ~69°): the second night,
    in the same output folder, registers onto the first night's grid — one target, every frame registered; the
    second night's five trailed frames rejected as when it is stacked alone (judged against its own night's
    frames, not the first's rounder median)."""
    seq = shared_data / "sequences"
    n1, n2 = sorted((seq / "seestar_m94_night1").glob("*.fit")), sorted((seq / "seestar_m94_night2").glob("*.fit"))
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for night in (n1, n2):
        for f in night:
            shutil.copy(f, watch / f.name)
        svc = _service(tmp_path, watch, out)
        svc.start()
        deadline = time.monotonic() + 120
        while (len(svc.snapshot.frames) < len(n1) + (len(n2) if night is n2 else 0)
               or svc.snapshot.status["state"] != "idle") and time.monotonic() < deadline:
            time.sleep(0.1)
        svc.stop(timeout=60)
        assert svc.error is None
    book = json.loads((out / "targets.json").read_text())["targets"]
    assert len(book) == 1 and book[0]["name"] == "M 94"
    recs = read_frames_log(out / "frames.jsonl")
    assert len(recs) == len(n1) + len(n2) and all(r["status"] in STACKED for r in recs[:len(n1)])
    second = recs[len(n1):]
    gone = [r for r in second if r["status"] not in STACKED]
    assert len(gone) == 5 and all("trailed" in r["reason"] for r in gone), [r["reason"] for r in gone]
    assert all(r["registration"] for r in second)
    rot = [r["rotation"] for r in second if r["status"] in STACKED]
    assert len(rot) == 6 and all(60 < abs(x) < 80 for x in rot), rot


def test_a_stop_while_frames_are_held_keeps_every_index(tmp_path, three_targets):
    """Stopped (SIGTERM: a checkpoint is written) while two frames of another field were held, then back on the
    first target: the held frames are rejected into it and every line keeps the index an uninterrupted night
    gives it (0, 1, 2, … in order).  The checkpoint used to count the held frames, which the restart processed
    again: b_00 and b_01 came out as 5 and 6 where 3 and 4 were due, and every later frame two higher."""
    files, parts = three_targets[False]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    daemon = {"checkpoint_every": 100, "checkpoint_s": 3600}    # frames since the last checkpoint at the stop
    svc = _service(tmp_path, watch, out, daemon)
    svc.start()
    _feed_live(svc, watch, parts["a"][:3] + parts["b"][:2])
    assert len(svc.snapshot.status["held"]) == 2
    svc.stop(timeout=30)
    assert svc.error is None
    svc = _service(tmp_path, watch, out, daemon)
    svc.start()
    deadline = time.monotonic() + 60
    while len(svc.snapshot.status.get("held", [])) < 2 or svc.snapshot.status.get("state") != "idle":
        assert svc.running and time.monotonic() < deadline, svc.snapshot.status    # held again after the start
        time.sleep(0.05)
    _feed_live(svc, watch, parts["c"][:2])
    svc.stop(timeout=30)
    assert svc.error is None
    recs = read_frames_log(out / "frames.jsonl")
    assert [r["path"] for r in recs] == [f.name for f in parts["a"][:3] + parts["b"][:2] + parts["c"][:2]]
    assert [r["status"] for r in recs] == ["reference", "stacked", "stacked", "rejected", "rejected", "stacked",
                                           "stacked"]
    assert [r["index"] for r in recs] == list(range(7))


@contextlib.contextmanager
def _running(tmp_path, watch: Path, out: Path):
    """A service on ``watch`` → ``out``, started; stopped afterwards, and it ended without an error."""
    svc = _service(tmp_path, watch, out)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop(timeout=30)
    assert svc.error is None


def test_each_target_keeps_the_palette_chosen_for_it(tmp_path, three_targets):
    """The page's palette is its target's (session/palette.json moves with its folder): M57 starts with the
    config's, and back on M13 — or after a restart — M13's colours are as they were left."""
    _, parts = three_targets[True]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    with _running(tmp_path, watch, out) as svc:
        _feed_live(svc, watch, parts["a"][:2])
        svc.set_palette("HUES", {"L": 2}).result(timeout=30)
        _feed_live(svc, watch, parts["b"][:2])                    # M57: a new target
        p = svc.status()["palette"]
        assert svc.status()["target"]["name"] == "M 57" and (p["requested"], p["weights"]) == ("auto", {}), p
        svc.set_palette("SHO").result(timeout=30)
        _feed_live(svc, watch, parts["c"][:1])                    # back to M13
        p = svc.status()["palette"]
        assert svc.status()["target"]["name"] == "M 13" and (p["requested"], p["weights"]) == ("HUES", {"L": 2.0})
    arch = out / json.loads((out / "targets.json").read_text())["targets"][1]["folder"]
    assert json.loads((arch / "session" / "palette.json").read_text()) == {"palette": "SHO"}
    with _running(tmp_path, watch, out) as again:
        assert again.status()["palette"]["requested"] == "HUES"


def test_each_target_keeps_the_stretch_chosen_for_it(tmp_path, three_targets):
    """The page's stretch is its target's (session/stretch.json moves with its folder): M57 starts with the
    config's, and back on M13 — or after a restart — M13's points are as they were left."""
    _, parts = three_targets[True]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    with _running(tmp_path, watch, out) as svc:
        _feed_live(svc, watch, parts["a"][:2])
        svc.set_stretch(0.001, 0.5, 0.6).result(timeout=30)
        _feed_live(svc, watch, parts["b"][:2])                    # M57: a new target
        s = svc.status()
        assert s["target"]["name"] == "M 57" and s["stretch"]["auto"] is True, s["stretch"]
        svc.set_stretch(midtones=0.3).result(timeout=30)
        _feed_live(svc, watch, parts["c"][:1])                    # back to M13
        s = svc.status()
        assert s["target"]["name"] == "M 13" and s["stretch"] == {"black": 0.001, "midtones": 0.5, "white": 0.6,
                                                                  "auto": False}, s["stretch"]
    arch = out / json.loads((out / "targets.json").read_text())["targets"][1]["folder"]
    assert json.loads((arch / "session" / "stretch.json").read_text()) == {"black": None, "midtones": 0.3,
                                                                           "white": None}
    with _running(tmp_path, watch, out) as again:
        assert again.status()["stretch"]["midtones"] == 0.5
