"""`livestack run` as a subprocess fed simulator frames: what lands in frames.jsonl and the stack, and that a
kill -9 at any moment followed by a restart gives the uninterrupted run's stack."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.session import read_frames_log

STACKED = ("reference", "stacked")


def _running(make_daemon, files, n: int, *flags: str, **kw):
    """A daemon (``make_daemon(*flags, **kw)``) started on the first ``n`` of ``files``, which it has stacked: (it,
    its feeder of the rest)."""
    d = make_daemon(*flags, **kw)
    copy = d.feeder(files)
    copy(n)
    d.start()
    d.wait_lines(n)
    return d, copy


def read_stack(out: Path):
    with fits.open(out / "stack.fits") as h:
        return np.array(h[0].data), np.array(h["WEIGHT"].data), dict(h[0].header)


def test_end_to_end_rename_slow_burst_corrupt_and_sigterm(make_daemon, daemon_night):
    files, _ = daemon_night
    d = make_daemon()
    w = d.watch
    for f in files[:3]:                                  # backlog: there before the daemon starts
        shutil.copy(f, w / f.name)
    d.start()
    d.wait_lines(3)

    part = w / (files[3].name + ".part")                 # written under a temporary name, renamed into place
    shutil.copy(files[3], part)
    time.sleep(0.6)                                      # > settle time: a .part must not be taken
    assert len(d.lines()) == 3
    os.rename(part, w / files[3].name)

    data = files[4].read_bytes()                         # written slowly: pauses longer than the settle time
    with open(w / files[4].name, "wb") as fh:
        for i in range(4):
            fh.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
            fh.flush()
            time.sleep(0.35)

    for name in ("light_0003_60s.xmp", "light_0003_60s.jpg", ".hidden.dng", "notes.txt", "light_9999.dng~",
                 "stack.tmp"):
        (w / name).write_bytes(data[:1000])              # sidecars, hidden and temporary files: never frames
    (w / "corrupt.fits").write_bytes(np.random.default_rng(0).bytes(6000))
    (w / "cut.dng").write_bytes(data[: len(data) // 3])  # never completes

    burst = []                                           # 100 files at once
    for i in range(100):
        src = files[6 + i % 10]
        burst.append(f"burst_{i:03d}.dng")
        shutil.copy(src, w / burst[-1])

    recs = d.wait_lines(107, timeout=60)
    time.sleep(0.5)                                      # nothing more may come
    recs = d.lines()
    assert d.stop() == 0                                 # SIGTERM: finish, write, exit 0

    paths = [r["path"] for r in recs]
    expected = {f.name for f in files[:5]} | set(burst) | {"corrupt.fits", "cut.dng"}
    assert sorted(paths) == sorted(expected)             # each exactly once; no sidecar, no .part
    by = {r["path"]: r for r in recs}
    assert by[files[0].name]["status"] == "reference"
    assert by[files[4].name]["status"] == "stacked", by[files[4].name]   # the slow file was not read half-written
    assert by["corrupt.fits"]["status"] == "failed" and "FITS" in by["corrupt.fits"]["reason"]
    assert by["cut.dng"]["status"] == "failed"
    assert by["cut.dng"]["reason"].startswith("still incomplete after 3 s"), by["cut.dng"]["reason"]
    n_stacked = sum(r["status"] in STACKED for r in recs)
    assert n_stacked == 105, [(r["path"], r["status"], r["reason"]) for r in recs if r["status"] not in STACKED]

    img, weight, hdr = read_stack(d.out)
    assert hdr["NCOMBINE"] == 105 and hdr["NFAILED"] == 2
    assert img.shape == (3, 360, 480) and np.isfinite(img).all() and weight.max() > 50
    assert (d.out / "preview.jpg").stat().st_size > 1000
    assert (d.out / "session" / "checkpoint.npz").exists()
    assert "SIGTERM received" in d.log.read_text()
    assert not [p for p in d.out.iterdir() if p.name.endswith(".tmp")]


def test_kill9_at_any_moment_then_restart_equals_uninterrupted_run(make_daemon, daemon_night):
    files, _ = daemon_night
    ref = make_daemon(name="uninterrupted").run_through(files)
    ref_img, ref_w, ref_hdr = read_stack(ref.out)
    ref_recs = {r["file"]: r["status"] for r in read_frames_log(ref.out / "frames.jsonl")}
    assert ref_recs[files[5].name] == "rejected"         # the cloudy frame, so rejection state is resumed too

    d, copy = _running(make_daemon, files, 4, name="killed")
    copy(4, pause=0.1)                                   # live frames; killed while they are being stacked
    d.wait_lines(6)
    d.kill9()
    copy(4)                                              # frames that land while the daemon is down
    d.start()
    d.wait_lines(10)
    d.kill9()
    copy(4)
    d.start()
    recs = d.wait_lines(len(files))
    time.sleep(0.4)
    assert d.stop() == 0

    recs = read_frames_log(d.out / "frames.jsonl")
    assert sorted(r["file"] for r in recs) == sorted(f.name for f in files)   # none twice, none skipped
    assert {r["file"]: r["status"] for r in recs} == ref_recs
    img, w, hdr = read_stack(d.out)
    assert hdr["NCOMBINE"] == ref_hdr["NCOMBINE"] == 15
    assert hdr["EXPTIME"] == ref_hdr["EXPTIME"]
    assert np.allclose(img, ref_img, rtol=1e-5, atol=1e-3), float(np.abs(img - ref_img).max())
    assert np.allclose(w, ref_w, rtol=1e-5, atol=1e-5)
    logs = "".join(p.read_text() for p in sorted(d.tmp.glob("daemon-*.log")))
    assert "resumed" in logs or "restacking" in logs


def test_new_session_flag_archives_and_restarts(make_daemon, daemon_night):
    files, _ = daemon_night
    d = make_daemon()
    for f in files[:3]:
        shutil.copy(f, d.watch / f.name)
    d.start()
    d.wait_lines(3)
    assert d.stop() == 0
    d.start("--new-session")
    d.wait_lines(3)
    assert d.stop() == 0
    (arch,) = (d.out / "archive").iterdir()
    assert len(read_frames_log(arch / "frames.jsonl")) == 3 and (arch / "stack.fits").exists()
    assert (arch / "session" / "checkpoint.npz").exists()
    assert len(d.lines()) == 3 and read_stack(d.out)[2]["NCOMBINE"] == 3


def test_usage_errors_are_one_line(make_daemon, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "--watch DIR" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[watch]\nsettle = 1\n")
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--watch", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--config", str(bad)], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "unknown key settle" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--watch", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"), "--port", "0"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 1 and "watch folder does not exist" in r.stderr, r.stderr


def test_a_capture_folder_in_the_session_folder_is_refused(tmp_path):
    """`--watch night/lights --out night` (or the same folder twice) started, and stacked nothing without a word:
    the session folder is kept out of the watch.  Now one line and exit 2, before anything is made or archived."""
    import subprocess
    import sys

    night = tmp_path / "night"
    (night / "lights").mkdir(parents=True)
    for watch in (night / "lights", night):
        try:
            r = subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--watch", str(watch), "--out",
                                str(night), "--no-web", "--new-session"], capture_output=True, text=True,
                               cwd=Path(__file__).parents[1], timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"--watch {watch} --out {night}: the daemon started")
        assert r.returncode == 2 and "session folder" in r.stderr and "never be stacked" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in night.iterdir()) == ["lights"]       # nothing archived, nothing made


def test_a_second_daemon_on_a_session_folder_is_refused(tmp_path):
    """A second `livestack run` on a session folder another one holds (started by hand beside the systemd unit's,
    with --no-web or another --port) started, appended to the same frames.jsonl and checkpointed over the first
    one's stack; with --new-session it archived the running night from under it.  Now one line and exit 1
    (under systemd: retried until the other stops), nothing archived; the folder is free once it is let go."""
    import os
    import subprocess
    import sys

    from livestack.session import hold_folder

    watch, night = tmp_path / "captures", tmp_path / "night"
    watch.mkdir()
    held = hold_folder(night, make=True)               # the other daemon
    assert held is not None
    (night / "frames.jsonl").write_text("")
    try:
        try:
            r = subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--watch", str(watch), "--out",
                                str(night), "--no-web", "--new-session"], capture_output=True, text=True,
                               cwd=Path(__file__).parents[1], timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a second daemon started on a session folder another one holds")
        assert r.returncode == 1, r.stderr
        assert "another livestack run is using this session folder" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert sorted(p.name for p in night.iterdir()) == ["frames.jsonl"]     # nothing archived
    finally:
        os.close(held)
    again = hold_folder(night, make=False)             # let go: the next start takes it
    assert again is not None
    os.close(again)


@pytest.mark.parametrize("name, taken", [("IMG_0001.CR3", True), ("a.fits", True), ("a.fit.fz", True),
                                         ("a.dng.part", False), (".a.dng", False), ("a.xmp", False),
                                         ("a.jpg", False), ("a.dng~", False), ("a.tmp", False)])
def test_candidate_names(name, taken):
    from livestack.daemon.watch import is_candidate

    assert is_candidate(name) is taken


def test_incomplete_reason_from_the_file_layout(tmp_path, daemon_night):
    from livestack.daemon.watch import incomplete_reason
    from drivers.simulator import SimConfig, render_frame, write_fits

    files, _ = daemon_night
    data = files[0].read_bytes()
    p = tmp_path / "a.dng"
    for cut in (100, len(data) // 2, len(data) - 1):
        p.write_bytes(data[:cut])
        assert incomplete_reason(p) is not None, cut
    p.write_bytes(data)
    assert incomplete_reason(p) is None
    cfg = SimConfig(width=64, height=48, n_frames=1)
    raw, meta = render_frame(cfg, 0)
    f = tmp_path / "a.fits"
    write_fits(f, raw, meta, cfg)
    full = f.read_bytes()
    assert incomplete_reason(f) is None
    for cut in (1000, 2880, 2880 * 2 + 10, len(full) - 2880):
        f.write_bytes(full[:cut])
        assert incomplete_reason(f) is not None, cut
    f.write_bytes(b"garbage" * 1000)                     # not FITS-looking: the reader will say why
    assert incomplete_reason(f) is None


def test_drizzle_in_the_daemon_survives_kill9_and_equals_livestack_stack(make_daemon, daemon_night, tmp_path):
    """`run --drizzle 2`: the status says which grid, a kill -9 mid-night loses nothing, and the stack equals
    `livestack stack --drizzle 2` of the same files."""
    import subprocess
    import sys
    import urllib.request
    import json

    files = daemon_night[0][:8]
    d, copy = _running(make_daemon, files, 5, "--drizzle", "2", "--pixfrac", "0.8", name="drizzle")
    st = json.loads(urllib.request.urlopen(d.url.rstrip("/") + "/api/status", timeout=10).read())
    assert st["grid"] == {"mode": "drizzle", "debayer": "drizzle", "shape": [720, 960], "channels": 3,
                          "scale": 2.0, "pixfrac": 0.8}
    d.kill9()
    copy(3)
    d.start()
    d.wait_lines(len(files))
    time.sleep(0.4)
    assert d.stop() == 0
    img, w, hdr = read_stack(d.out)
    assert img.shape == (3, 720, 960) and hdr["DEBAYER"] == hdr["INTERP"] == "drizzle"     # (no warp either)
    assert (hdr["DRIZZLE"], hdr["PIXFRAC"]) == (2.0, 0.8)
    assert hdr["DRZSHARP"] == round(((0.8 * 2) ** 2 + 1) / 24, 5)     # the compensation, through the restart
    from livestack.engine.drizzle import compensation
    assert hdr["DRZTAPS"] == ",".join(f"{t:.5f}" for t in compensation(0.8, 2)[:3])

    src = tmp_path / "src"
    src.mkdir()
    for f in files:
        shutil.copy(f, src / f.name)
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "stack", str(src), "-o", str(tmp_path / "batch"),
                        "-q", "--no-solve", "--drizzle", "2", "--pixfrac", "0.8", "--debayer", "superpixel"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "superpixel has no effect with a drizzle" in r.stderr, r.stderr      # and the same stack below
    ref_img, ref_w, _ = read_stack(tmp_path / "batch")
    assert np.allclose(img, ref_img, rtol=1e-4, atol=1e-2), float(np.abs(img - ref_img).max())
    assert np.allclose(w, ref_w, rtol=1e-4, atol=1e-4)


def test_files_waiting_reach_the_page_while_paused(make_daemon, daemon_night):
    """The page's "N queued" comes from the status events; a file landing made none (the count was computed
    only when something else changed): paused, it stayed at 0 while frames waited."""
    import http.client
    import json
    from urllib.parse import urlsplit

    d = make_daemon()
    d.start()
    u = urlsplit(d.url)
    post = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    post.request("POST", "/api/pause")
    assert post.getresponse().status == 200
    post.close()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
    conn.request("GET", "/api/events")
    r = conn.getresponse()

    def statuses():
        while True:
            line = r.fp.readline().decode()
            if line.startswith("data: "):
                yield json.loads(line[6:])

    events = statuses()
    while not next(events)["paused"]:
        pass
    for f in daemon_night[0][:2]:
        shutil.copy(f, d.watch / f.name)
    end = time.monotonic() + 10
    while (s := next(events))["queued"] < 2 and time.monotonic() < end:     # the read times out (15 s) if none
        pass
    assert s["queued"] == 2 and s["paused"], s
    conn.close()
    assert d.stop() == 0


def test_a_restart_is_a_new_generation_of_the_frames_list(tmp_path, daemon_night):
    """The page refetches frames.jsonl whole when `generation` changes; it started at 0 in every process, so a
    page open across a restart (whose resume may rewrite the log) kept its old list."""
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    gens = []
    for _ in range(2):
        svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0),
                      DaemonParams(out=str(out)))
        svc.start()
        gens.append(svc.status()["generation"])
        svc.stop(timeout=10)
        time.sleep(0.01)
    assert gens[0] != gens[1], gens


def _four_frames_watched(tmp_path: Path, daemon_night):
    """(the night's first four files, a capture folder holding them, an output folder)."""
    files = daemon_night[0][:4]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files:
        shutil.copy(f, watch / f.name)
    return files, watch, out


def _started_idle(watch: Path, out: Path, frames: int):
    """A Service on ``watch`` → ``out``, started and waited for until it has ``frames`` records and is idle."""
    svc = _started_service(watch, out)
    deadline = time.monotonic() + 60
    while not ((s := svc.status())["frames"] >= frames and s["state"] == "idle") and time.monotonic() < deadline:
        time.sleep(0.05)
    return svc


def test_a_restart_rewrites_stack_files_the_checkpoint_is_ahead_of(tmp_path, daemon_night):
    """kill -9 after the checkpoint, before stack.fits (a restack writes them in that order; during a backlog
    they are on separate schedules): the restart resumes the checkpoint's stack and writes it out — stack.fits
    no longer keeps the frames of before until the next frame lands, even past a clean stop."""
    files, watch, out = _four_frames_watched(tmp_path, daemon_night)

    def service():
        return _started_idle(watch, out, 4)

    svc = service()
    svc.stop(timeout=10)
    n = fits.getheader(out / "stack.fits")["NCOMBINE"]
    before = (out / "stack.fits").read_bytes()
    svc = service()
    svc.exclude(files[1].name).result(timeout=60)      # restack: checkpoint, then stack.fits
    svc.stop(timeout=10)
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == n - 1
    (out / "stack.fits").write_bytes(before)            # killed between the two writes
    svc = service()
    assert svc.status()["stacked"] == n - 1
    deadline = time.monotonic() + 30
    while fits.getheader(out / "stack.fits")["NCOMBINE"] != n - 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    svc.stop(timeout=10)
    assert svc.error is None
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == n - 1


def test_a_frame_excluded_before_a_kill_keeps_its_measurements(tmp_path, daemon_night):
    """kill -9 after an exclusion was saved, before the restack's checkpoint: the restart restacks ("built
    before the last exclusion") and the excluded frame's line keeps its measurements — filter, index, FWHM,
    stars — as a restack without the kill keeps them (the plots still show why it was excluded); they were
    recorded bare, the frame shown with no filter and no numbers."""
    files, watch, out = _four_frames_watched(tmp_path, daemon_night)

    def service():
        return _started_idle(watch, out, 4)

    service().stop(timeout=10)
    before = read_frames_log(out / "frames.jsonl")[1]
    (out / "session" / "excluded.json").write_text(json.dumps([files[1].name]))   # what the restack saves first
    svc = service()
    svc.stop(timeout=10)
    assert svc.error is None
    recs = read_frames_log(out / "frames.jsonl")
    assert [r["file"] for r in recs] == [f.name for f in files]
    after = recs[1]
    assert after["status"] == "excluded" and after["weight"] is None, after
    assert {k: after[k] for k in ("filter", "index", "fwhm", "stars", "time", "exptime", "matrix")} == \
        {k: before[k] for k in ("filter", "index", "fwhm", "stars", "time", "exptime", "matrix")}, (before, after)


def test_a_kill_after_an_exclusion_with_a_stacked_file_gone_keeps_the_stack(tmp_path, daemon_night, caplog):
    """kill -9 after an exclusion was saved, before the restack's checkpoint, and a stacked frame's file gone by the
    restart (its USB disk unplugged, deleted to make room): the start restacked ("built before the last
    exclusion") without it — the frame left the stack, frames.jsonl and the checkpoint for good, which the live
    restack refuses to do.  The checkpoint's stack is kept as it is, the exclusion not applied: excluded.json back
    to the checkpoint's, a warning naming the file; a later start does not restack either."""
    import logging

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)

    def service():
        svc = _started_service(watch, out)
        deadline = time.monotonic() + 20
        while not ((s := svc.status())["frames"] >= 4 and s["state"] == "idle") and time.monotonic() < deadline:
            time.sleep(0.05)
        return svc

    svc = service()
    svc.stop(timeout=10)
    before = read_frames_log(out / "frames.jsonl")
    stacked = svc.status()["stacked"]
    assert before[2]["status"] in ("stacked", "reference") and stacked >= 3, before
    (out / "session" / "excluded.json").write_text(json.dumps([files[1].name]))   # what the restack saves first
    (watch / files[2].name).unlink()
    with caplog.at_level(logging.WARNING, logger="livestack"):
        svc = service()
    try:
        assert svc.status()["stacked"] == stacked and svc.excluded == set()
        assert json.loads((out / "session" / "excluded.json").read_text()) == []
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    assert [(r["file"], r["status"]) for r in read_frames_log(out / "frames.jsonl")] == \
        [(r["file"], r["status"]) for r in before]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and files[2].name in r.getMessage()]
    assert len(warned) == 1 and "not applied" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="livestack"):
        svc = service()                                  # the exclusions agree with the checkpoint: resumed
    svc.stop(timeout=10)
    assert svc.status()["stacked"] == stacked
    assert not [r for r in caplog.records if "before the last exclusion" in r.getMessage()]


def test_the_reference_excluded_before_a_kill_keeps_no_matrix(tmp_path, daemon_night):
    """The same with the reference excluded: the restart's restack puts the grid on the next frame, and the
    excluded reference's line kept its identity matrix onto it (null now: it is on no grid), its measurements
    kept.  Another frame excluded with it loses its matrix, and its shift, rotation and scale against the old
    reference too (they were kept)."""
    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    _started_idle(watch, out, 4).stop(timeout=10)
    before = read_frames_log(out / "frames.jsonl")
    placed = ("matrix", "shift_x", "shift_y", "rotation", "scale")
    assert before[0]["status"] == "reference" and before[0]["matrix"] is not None
    assert before[2]["status"] == "stacked" and all(before[2][k] is not None for k in placed), before[2]
    (out / "session" / "excluded.json").write_text(json.dumps([files[0].name, files[2].name]))
    svc = _started_idle(watch, out, 4)
    svc.stop(timeout=10)
    assert svc.error is None
    recs = read_frames_log(out / "frames.jsonl")
    assert [r["status"] for r in recs[:3]] == ["excluded", "reference", "excluded"], recs
    assert recs[0]["matrix"] is None and recs[0]["fwhm"] == before[0]["fwhm"], recs[0]
    assert [recs[2][k] for k in placed] == [None] * 5 and recs[2]["fwhm"] == before[2]["fwhm"], recs[2]


def test_every_frame_excluded_then_a_new_frame_is_the_targets_reference(tmp_path, daemon_night):
    """A restack that excludes every frame leaves no stack; the next frame to arrive is the new reference: the
    target, session/reference.json (what a returning frame is matched against) and the plate solve are its —
    they kept naming the last excluded reference."""
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    files = daemon_night[0]
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files[:2]:
        shutil.copy(f, watch / f.name)
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out)))
    svc.start()

    def wait(n):
        deadline = time.monotonic() + 60
        while not ((s := svc.status())["frames"] >= n and s["state"] == "idle") and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        wait(2)
        for f in files[:2]:
            svc.exclude(f.name).result(timeout=60)
        assert not svc.engine.has_stack
        for f in files[2:4]:
            shutil.copy(f, watch / f.name)
        wait(4)
        assert svc.engine.ref.file == files[2].name
        assert json.loads((out / "session" / "reference.json").read_text())["file"] == files[2].name
        assert svc.book.current.reference == files[2].name
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


# ---------------------------------------------------------------- the pause across a restart

def _started_service(watch: Path, out: Path):
    """A Service on ``watch`` → ``out``, started (paused or not: it does not wait for idle)."""
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out)))
    svc.start()
    return svc


def _until(cond, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := cond()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got, f"not within {timeout} s"
    return got


def test_a_pause_survives_a_restart_and_resume_stacks_what_waited(tmp_path, daemon_night):
    """Paused for a slew or a meridian flip, the daemon restarted (a crash and systemd's Restart=, an OOM kill,
    `systemctl restart`): it came back unpaused and stacked the frames the user had paused for.  The pause is
    the session folder's now: the restart is paused, the frames that land wait in the queue, and Resume stacks
    them — and a resumed daemon stays resumed across the next restart."""
    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    svc = _started_idle(watch, out, 4)
    try:
        assert svc.pause()["paused"]
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    shutil.copy(daemon_night[0][4], watch / daemon_night[0][4].name)    # lands while the daemon is down
    svc = _started_service(watch, out)
    try:
        s = svc.status()
        assert s["paused"] and s["state"] == "paused", s
        shutil.copy(daemon_night[0][5], watch / daemon_night[0][5].name)    # lands while paused
        _until(lambda: svc.status()["queued"] >= 2)
        time.sleep(0.5)
        assert svc.status()["frames"] == 4 and len(read_frames_log(out / "frames.jsonl")) == 4
        svc.resume()
        _until(lambda: (s := svc.status())["frames"] == 6 and s["state"] == "idle")
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    svc = _started_service(watch, out)        # resumed before this restart: it stacks
    try:
        assert not svc.status()["paused"]
        shutil.copy(daemon_night[0][6], watch / daemon_night[0][6].name)
        _until(lambda: (s := svc.status())["frames"] == 7 and s["state"] == "idle")
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def call(d, method: str, path: str) -> dict:
    """The daemon's answer to ``method path`` (no body), which must be 200."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(d.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        assert r.status == 200, (path, r.status)
        return json.loads(r.read())
    finally:
        conn.close()


def test_a_pause_survives_kill9_and_the_journal_says_why_nothing_stacks(make_daemon, daemon_night):
    """The same through the HTTP API and a kill -9 (an OOM kill, a power blip): the restarted daemon says in
    its log that it is paused, /api/status says so, and POST /api/resume stacks the frames that waited."""
    d, copy = _running(make_daemon, daemon_night[0], 2)
    assert call(d, "POST", "/api/pause")["paused"]
    d.kill9()
    copy(2)
    d.start()
    s = call(d, "GET", "/api/status")
    assert s["paused"] and s["state"] == "paused", s
    assert "paused before the restart" in d.log.read_text(), d.log.read_text()
    kept = len(d.lines())        # (the frames after the last checkpoint are queued again, as after any kill)
    _until(lambda: (s := call(d, "GET", "/api/status"))["queued"] + s["frames"] == 4)
    time.sleep(1.0)
    assert call(d, "GET", "/api/status")["frames"] == len(d.lines()) == kept
    assert not call(d, "POST", "/api/resume")["paused"]
    d.wait_lines(4)
    assert d.stop() == 0


def test_new_stack_keeps_the_pause_and_new_session_flag_ends_it(make_daemon, daemon_night):
    """The page's New stack (a new target after a slew, paused meanwhile) keeps the pause, across a restart
    too; `run --new-session`, a fresh start typed at the keyboard, begins unpaused."""
    d, copy = _running(make_daemon, daemon_night[0], 2)
    call(d, "POST", "/api/pause")
    assert call(d, "POST", "/api/new-session")["paused"]
    assert d.stop() == 0
    d.start()
    assert call(d, "GET", "/api/status")["paused"]
    assert d.stop() == 0
    d.start("--new-session")
    assert not call(d, "GET", "/api/status")["paused"]
    d.wait_lines(2)                          # the capture folder's files, stacked again (as with a fresh --out)
    assert d.stop() == 0


def test_an_unreadable_pause_file_is_moved_aside_and_counts_as_not_paused(tmp_path, daemon_night, caplog):
    """A paused.json torn by a power cut or edited by hand must not stop every start (under systemd, a restart
    loop): it is moved aside with one log line and the daemon stacks."""
    import logging

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    out.mkdir()
    (out / "paused.json").write_text('{"paused": tr')
    with caplog.at_level(logging.WARNING, logger="livestack"):
        svc = _started_service(watch, out)
        try:
            assert not svc.status()["paused"]
            _until(lambda: (s := svc.status())["frames"] == 4 and s["state"] == "idle")
        finally:
            svc.stop(timeout=10)
    assert svc.error is None
    lines = [r.getMessage() for r in caplog.records if "paused.json" in r.getMessage()]
    assert len(lines) == 1 and "moved aside to paused.json.corrupt-" in lines[0] and "not paused" in lines[0], lines
    assert not (out / "paused.json").exists() or json.loads((out / "paused.json").read_text())["paused"] is False
    assert len(list(out.glob("paused.json.corrupt-*"))) == 1


def test_a_request_made_as_the_daemon_stops_is_answered(tmp_path):
    """A change asked for (a page's POST) at the moment the daemon stops: its check "stopping?" passed just before
    the worker's last look at the queue, and the request was queued after it — its future never answered, the
    page's request waiting out its timeout during the SIGTERM.  The window is held open here: the request's
    thread reaches the queue only once the worker has ended."""
    import threading

    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service
    from livestack.session import Refused

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0),
                  DaemonParams(out=str(out)))
    svc.start()
    asking, real = threading.Event(), svc._cmd_lock

    class HeldOpen:
        """The command lock; the requesting thread is held at its door until the worker has ended."""

        def __enter__(self):
            if threading.current_thread().name == "asker":
                asking.set()
                svc._thread.join(30)
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    svc._cmd_lock = HeldOpen()
    got: list = []

    def ask():
        try:
            got.append(svc.set_stretch(midtones=0.3))
        except Refused as err:
            got.append(err)

    t = threading.Thread(target=ask, name="asker", daemon=True)
    t.start()
    try:
        assert asking.wait(10)
    finally:
        svc.stop(timeout=10)
    t.join(30)
    assert svc.error is None and len(got) == 1
    if isinstance(got[0], Refused):              # refused at once: the daemon is stopping
        err = got[0]
    else:                                        # or queued, and then answered
        with pytest.raises(Refused) as info:
            got[0].result(timeout=5)
        err = info.value
    assert err.status == 503 and "stopping" in str(err)


def test_the_status_says_which_file_is_being_processed(tmp_path, daemon_night, monkeypatch):
    """The status was published once a frame was done, so while one was worked on (1–2 s at 24 MP on a Pi) the
    page said "idle" and `state: processing` was never seen for a live frame.  It is published as the worker
    takes the file: `state` processing and `processing` its path; null and idle once it is done."""
    from livestack.engine.pipeline import Engine

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    svc = _started_idle(watch, out, 4)
    slow = threading.Event()
    try:
        assert (svc.status()["state"], svc.status()["processing"]) == ("idle", None)
        real = Engine.process

        def held(self, *a, **k):
            slow.wait(10)
            return real(self, *a, **k)

        monkeypatch.setattr(Engine, "process", held)
        shutil.copy(daemon_night[0][4], watch / "live.dng")
        s = _until(lambda: (st := svc.status())["processing"] is not None and st)
        assert (s["state"], s["processing"], s["frames"]) == ("processing", "live.dng", 4)
        slow.set()
        s = _until(lambda: (st := svc.status())["frames"] == 5 and st["state"] == "idle" and st)
        assert s["processing"] is None
    finally:
        slow.set()
        svc.stop()
    assert svc.error is None


def test_a_stop_says_how_many_files_found_are_not_stacked_yet(tmp_path, daemon_night, caplog):
    """Stopped with files waiting (a backlog, a pause, a returning target's frames to stack again), the journal
    said only "stopped; N stacked …": where the others went was a guess.  The line counts them and says the next
    start takes them — and it does."""
    import logging

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    svc = _started_idle(watch, out, 4)
    svc.pause()
    for f in daemon_night[0][4:6]:
        shutil.copy(f, watch / f.name)
    _until(lambda: svc.status()["queued"] == 2)
    with caplog.at_level(logging.INFO, logger="livestack"):
        svc.stop()
    assert svc.error is None
    said = [r.getMessage() for r in caplog.records if "livestack: stopped;" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("; 2 files found but not stacked yet: taken at the next start"), said
    svc = _started_service(watch, out)           # paused still (the pause is kept): resumed, they are stacked
    try:
        _until(lambda: (s := svc.status())["paused"] and s["queued"] == 2)
        svc.resume()
        _until(lambda: (s := svc.status())["frames"] == 6 and s["state"] == "idle")
    finally:
        svc.stop()
    assert svc.error is None


def test_a_pause_right_after_a_frame_still_writes_its_stack_file(tmp_path, daemon_night):
    """Frames coming in, stack.fits is written at the next idle moment (at most every outputs_s meanwhile); a pause
    pressed while a frame was stacked left no idle moment — the worker only waited — so stack.fits (what the page's
    download and a user copying the night off the Pi get) stayed a frame short for as long as the pause lasted,
    and so did the checkpoint.  Both are written while paused."""
    from astropy.io import fits

    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service
    from livestack.engine.pipeline import Engine

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out), outputs_s=3600.0))
    held = threading.Event()
    real = Engine.process

    def process(self, path, *a, **k):
        if Path(path).name == "live.dng":
            held.wait(10)
        return real(self, path, *a, **k)

    Engine.process = process
    try:
        svc.start()
        _until(lambda: (s := svc.status())["frames"] == 4 and s["state"] == "idle"
               and s["checkpoint"]["frames"] == 4)
        assert fits.getheader(out / "stack.fits")["NCOMBINE"] == 4
        shutil.copy(daemon_night[0][4], watch / "live.dng")
        _until(lambda: svc.status()["processing"] == "live.dng")
        svc.pause()
        held.set()
        _until(lambda: (s := svc.status())["frames"] == 5 and s["checkpoint"]["frames"] == 5, timeout=20)
        assert svc.status()["paused"]
        _until(lambda: fits.getheader(out / "stack.fits")["NCOMBINE"] == 5, timeout=20)
    finally:
        held.set()
        Engine.process = real
        svc.stop()
    assert svc.error is None


def test_files_written_under_stacked_names_while_stopped_are_said_at_start(tmp_path, daemon_night, caplog):
    """The daemon stopped at dawn; the next evening's capture, in the folder emptied of last night's frames,
    numbered its files from the start again — under the names of frames the session has. Known by their path,
    they were never stacked and nothing said so. At start, files written after the frame of their name was
    stacked are named in one warning; files untouched since are not."""
    import logging

    files, watch, out = _four_frames_watched(tmp_path, daemon_night)
    svc = _started_idle(watch, out, 4)
    svc.stop(timeout=30)
    later = time.time() + 5                                  # tonight's frames, under last night's first two names
    for f in files[:2]:
        os.utime(watch / f.name, (later, later))
    caplog.set_level(logging.INFO, logger="livestack")
    svc = _started_idle(watch, out, 4)
    svc.stop(timeout=30)
    said = [r.getMessage() for r in caplog.records if "written after the frame of" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("livestack: 2 files of the capture folder were written after"), said
    assert files[0].name in said[0] and files[1].name in said[0] and files[2].name not in said[0], said
    assert "its own folder" in said[0]
