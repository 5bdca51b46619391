"""Hardening the daemon: a full disk under the session folder (it keeps stacking and recording in memory, says so
once, keeps the old outputs, and catches up when space returns), temporaries of killed writes cleaned at start,
a capped checkpoint, and exclude/include requests merged into one restack."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import record
from astropy.io import fits

from livestack.config import Config
from livestack.daemon.config import DaemonParams, WatchParams
from livestack.daemon.service import Service
from livestack.session import SessionFolder, load_checkpoint, read_frames_log

STACKED = ("reference", "stacked")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int):
    """A tmpfs of ``size_mb`` mounted on ``path`` (root only: skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("a small filesystem to fill needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free < 4096
    return filler


def status(d) -> dict:
    with urllib.request.urlopen(d.url + "api/status", timeout=5) as r:
        return json.loads(r.read())


def wait_for(cond, timeout: float, what: str, d=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        if d is not None and d.proc.poll() is not None:
            raise AssertionError(f"daemon exited {d.proc.returncode} waiting for {what}:\n{d.log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout} s" + (f":\n{d.log.read_text()}" if d else ""))


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for folder in (out, out / "session") if folder.is_dir() for p in folder.glob(".*.tmp"))


def ncombine(out: Path) -> int:
    with fits.open(out / "stack.fits") as h:
        return int(h[0].header["NCOMBINE"])


def well_formed_lines(path: Path) -> list[dict]:
    """frames.jsonl, asserting that every line is whole (no torn line from a failed append)."""
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- a full disk

def test_full_disk_keeps_stacking_says_so_once_and_catches_up(make_daemon, daemon_night):
    """Session folder on a 16 MB tmpfs (stack.fits 2.8 MB, checkpoint 3.4 MB at 480×360): filled after 4 frames,
    4 more frames come.  The daemon stays up and counts them, says "disk full: <file>, N MB needed" in the status
    and once in the log, leaves the old stack.fits whole and no temporary behind; when the filler goes, frames.jsonl,
    stack.fits and the checkpoint catch up with all 8 frames without a new frame to trigger it."""
    files, _ = daemon_night
    names = [f.name for f in files[:8]]
    d = make_daemon(name="full")
    with tmpfs(d.out, 16):
        feed = d.feeder(files)
        d.start()
        feed(4, 0.2)
        d.wait_lines(4)
        ckpt = SessionFolder(d.out).checkpoint
        wait_for(lambda: status(d)["state"] == "idle" and (d.out / "stack.fits").exists() and ckpt.exists()
                 and ncombine(d.out) == 4 and load_checkpoint(ckpt, Config())[1]["lines"] == 4,
                 15, "outputs of 4 frames", d)
        old_stack = (d.out / "stack.fits").read_bytes()
        filler = fill(d.out)

        feed(4, 0.2)
        st = wait_for(lambda: (s := status(d))["frames"] == 8 and s["state"] == "idle" and s["disk"] and s, 30,
                      "8 frames counted with the disk full", d)
        assert d.proc.poll() is None
        assert st["disk"]["error"].startswith(f"disk full: {d.out}/") and st["disk"]["error"].endswith("MB needed")
        assert st["disk"]["since"]
        assert st["stacked"] + st["rejected"] == 8
        assert (d.out / "stack.fits").read_bytes() == old_stack          # the old stack, whole
        assert temporaries(d.out) == []                                  # each failed write removed its temporary
        logged = well_formed_lines(d.out / "frames.jsonl")               # what fitted, in order, no torn line
        assert [r["path"] for r in logged] == names[:len(logged)]
        time.sleep(2.5)                                                  # idle retries: not one log line each
        assert d.log.read_text().count("disk full") == 1, d.log.read_text()

        filler.unlink()                                                  # space returns, no new frame needed
        wait_for(lambda: status(d)["disk"] is None, 15, "catch-up", d)
        recs = well_formed_lines(d.out / "frames.jsonl")
        assert [r["path"] for r in recs] == names
        n_stacked = sum(r["status"] in STACKED for r in recs)
        assert n_stacked == status(d)["stacked"] and ncombine(d.out) == n_stacked
        wait_for(lambda: load_checkpoint(ckpt, Config())[1]["lines"] == 8, 10, "a checkpoint of 8 frames", d)
        assert temporaries(d.out) == []
        assert "disk space back" in d.log.read_text()
        assert d.stop() == 0


def test_kill_while_disk_full_then_restart_counts_every_frame_once(make_daemon, daemon_night):
    """kill -9 while records wait in memory for space: after space returns, the restart stacks the frames
    frames.jsonl lacks, and no frame counts twice."""
    files, _ = daemon_night
    names = [f.name for f in files[:8]]
    d = make_daemon(name="killed")
    with tmpfs(d.out, 16):
        feed = d.feeder(files)
        d.start()
        feed(4, 0.2)
        d.wait_lines(4)
        wait_for(lambda: status(d)["state"] == "idle" and SessionFolder(d.out).checkpoint.exists(), 15,
                 "a checkpoint", d)
        filler = fill(d.out)
        feed(4, 0.2)
        wait_for(lambda: (s := status(d))["frames"] == 8 and s["disk"], 30, "8 frames with the disk full", d)
        d.kill9()
        filler.unlink()
        d.start()
        recs = d.wait_lines(8)
        wait_for(lambda: status(d)["state"] == "idle", 15, "idle", d)
        assert d.stop() == 0
        recs = well_formed_lines(d.out / "frames.jsonl")
        assert sorted(r["path"] for r in recs) == sorted(names)            # each once
        assert ncombine(d.out) == sum(r["status"] in STACKED for r in recs)


# ---------------------------------------------------------------- temporaries of killed writes

ORPHAN = """
import sys, time
from pathlib import Path
from livestack.engine.write import atomic_write_with
def writer(tmp):
    Path(tmp).write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(60)
atomic_write_with(Path(sys.argv[1]), writer)
"""


def killed_write(path: Path) -> None:
    """Leave the temporary of a write killed mid-way (kill -9), as a power cut or the OOM killer would."""
    with subprocess.Popen([sys.executable, "-c", ORPHAN, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                          text=True) as p:
        try:
            assert p.stdout.readline().strip() == "writing"
        finally:
            p.send_signal(signal.SIGKILL)


def test_temporaries_of_killed_writes_are_removed_at_start_but_not_in_the_watch_folder(make_daemon, daemon_night):
    files, _ = daemon_night
    d = make_daemon(name="orphans")
    (d.out / "session").mkdir(parents=True)
    for target in (d.out / "stack.fits", d.out / "stack.fits", d.out / "session" / "checkpoint.npz",
                   d.watch / "light_0099_60s.dng"):
        killed_write(target)
    assert len(temporaries(d.out)) == 3 and len(list(d.watch.glob(".*.tmp"))) == 1
    keep = [d.out / ".notes.tmp", d.out / "my.stack.fits.abcdefgh.tmp"]     # not ours: not hidden, or no random part
    for p in keep:
        p.write_bytes(b"mine")
    (d.out / ".stack.fits.abcdefgh.tmp").mkdir()                              # a folder, whatever its name
    d.start()
    d.feeder(files)(1)
    d.wait_lines(1)
    # stopped first: a live daemon may be writing stack.fits after its first frame, whose own temporary is
    # then in the folder (CI saw '.stack.fits.7zvzent5.tmp' beside the two kept)
    assert d.stop() == 0
    assert temporaries(d.out) == [".notes.tmp", ".stack.fits.abcdefgh.tmp"]   # not ours, and the folder
    assert len(list(d.watch.glob(".*.tmp"))) == 1                            # the capture program's
    assert all(p.exists() for p in keep)
    assert "removed 3 temporary files of interrupted writes (0.3 MB)" in d.log.read_text()


# ---------------------------------------------------------------- a capped checkpoint

def _service(watch: Path, out: Path, files, **daemon) -> Service:
    watch.mkdir(exist_ok=True)
    for f in files:
        shutil.copy(f, watch / f.name)
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out), **daemon))
    svc.start()
    return svc


def _wait_idle(svc: Service, n_frames: int, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (s := svc.status())["frames"] >= n_frames and s["state"] == "idle" and s, timeout,
                    f"{n_frames} frames, idle")


def test_checkpoint_over_its_cap_is_not_written_and_said_once(tmp_path, daemon_night, caplog):
    """A 480×360 colour stack's checkpoint is 3.4 MB: with checkpoint_max_mb = 1 none is written, one warning
    says so, the status gives its cost; a restart restacks frames.jsonl and counts every frame once."""
    six = daemon_night[0][:6]
    caplog.set_level(logging.WARNING, logger="livestack")
    svc = _service(tmp_path / "watch", tmp_path / "out", six, checkpoint_every=1, checkpoint_max_mb=1.0)
    _wait_idle(svc, 6)
    # (on a busy machine stack.fits is slow to write, the checkpoint's cost estimated from it high: none is tried
    # during the backlog and the first comes at an idle moment, up to 5 s after the start — idle with 6 frames
    # came before it)
    st = wait_for(lambda: (s := svc.status())["checkpoint"]["capped"] and s, 30, "the checkpoint over its cap")
    svc.stop(timeout=10)
    assert svc.error is None
    ck = st["checkpoint"]
    assert ck["capped"] is True and ck["max_mb"] == 1.0 and ck["frames"] is None
    assert 3.0 * 2 ** 20 < ck["bytes"] < 4.0 * 2 ** 20, ck
    assert not SessionFolder(tmp_path / "out").checkpoint.exists()
    warnings = [r.getMessage() for r in caplog.records if "checkpoint_max_mb" in r.getMessage()]
    assert len(warnings) == 1 and "MB, over [daemon] checkpoint_max_mb = 1: none written" in warnings[0], warnings

    svc = _service(tmp_path / "watch", tmp_path / "out", [], checkpoint_max_mb=1.0)
    _wait_idle(svc, 6)
    n = svc.engine.n_stacked + svc.engine.n_rejected
    svc.stop(timeout=10)
    recs = read_frames_log(tmp_path / "out" / "frames.jsonl")
    assert sorted(r["path"] for r in recs) == sorted(f.name for f in six) and n == 6


def test_checkpoint_without_cap_reports_its_cost(tmp_path, daemon_night):
    svc = _service(tmp_path / "watch", tmp_path / "out", daemon_night[0][:3], checkpoint_every=1)
    _wait_idle(svc, 3)
    # (on a busy machine the third frame's checkpoint may wait for the idle loop: 9× the last one's duration)
    st = wait_for(lambda: (s := svc.status())["checkpoint"]["frames"] == 3 and s, 30, "a checkpoint of 3 frames")
    svc.stop(timeout=10)
    ck = st["checkpoint"]
    size = SessionFolder(tmp_path / "out").checkpoint.stat().st_size
    assert ck["capped"] is False and ck["max_mb"] is None and ck["frames"] == 3
    assert 0.99 * size < ck["bytes"] <= size               # the arrays: all but a few kB of headers


# ---------------------------------------------------------------- exclude / include merged

def _burst(svc: Service, requests: list[tuple[str, bool]]) -> None:
    """Submit ``requests`` (file, exclude) at once, as a page tapped repeatedly would; wait for every answer.
    The status reads "restacking" from the first request until the work is done, never idle in between."""
    seen: list[str] = []
    futs = [svc.exclude(name, ex) for name, ex in requests]
    while not all(f.done() for f in futs):
        state = svc.status()["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        time.sleep(0.002)
    assert seen in (["restacking"], ["restacking", "idle"]), seen
    results = [f.result(timeout=30) for f in futs]
    assert all(r == results[-1] for r in results)           # every request answered with the final status
    assert results[-1]["state"] == "idle" and results[-1]["restack"] is None


def test_exclude_include_requests_merge_into_one_restack(tmp_path, daemon_night):
    files = daemon_night[0][:8]
    svc = _service(tmp_path / "watch", tmp_path / "out", files)
    try:
        _wait_idle(svc, 8)
        before = svc.engine.result()[0].copy()
        n_stacked = svc.engine.n_stacked
        x = files[2].name

        _burst(svc, [(x, True)] * 5)                         # five taps on "exclude"
        st = svc.status()
        assert st["restacks"] == 1 and st["excluded"] == 1 and st["stacked"] == n_stacked - 1

        _burst(svc, [(x, i % 2 == 1) for i in range(21)])   # include, exclude, …, include: 21 requests
        st = svc.status()
        assert 2 <= st["restacks"] <= 3, st["restacks"]
        assert st["excluded"] == 0 and st["stacked"] == n_stacked
        assert np.array_equal(svc.engine.result()[0], before, equal_nan=True)   # the original stack again

        restacks = st["restacks"]
        _burst(svc, [(x, i % 2 == 0) for i in range(20)])   # exclude, include, …: back where it started
        st = svc.status()
        assert st["restacks"] - restacks <= 2 and st["excluded"] == 0 and st["stacked"] == n_stacked
        recs = read_frames_log(tmp_path / "out" / "frames.jsonl")
        assert [r["path"] for r in recs] == [f.name for f in files] and not any(r["status"] == "excluded"
                                                                                for r in recs)
        assert json.loads((tmp_path / "out" / "session" / "excluded.json").read_text()) == []
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_a_repeated_request_with_nothing_pending_is_still_refused(tmp_path, daemon_night):
    from livestack.session import Refused

    files = daemon_night[0][:4]
    svc = _service(tmp_path / "watch", tmp_path / "out", files)
    try:
        _wait_idle(svc, 4)
        svc.exclude(files[1].name).result(timeout=30)
        with pytest.raises(Refused, match="already excluded"):
            svc.exclude(files[1].name)
        with pytest.raises(Refused, match="is not excluded"):
            svc.exclude(files[2].name, False)
    finally:
        svc.stop(timeout=10)


def test_an_exclusion_with_stacked_frames_gone_from_the_capture_folder_keeps_the_stack(tmp_path, daemon_night):
    """Two stacked frames' files moved out of the capture folder (its USB disk unplugged, frames deleted to make room
    on a full card), then "exclude" on another: the restack recorded them failed ("file not found") and the stack,
    its checkpoint and frames.jsonl lost them for good.  Now the request is refused (409) naming them, and nothing
    changes; with the files back, the exclusion is made."""
    from livestack.session import Refused

    files = daemon_night[0][:6]
    watch, out = tmp_path / "watch", tmp_path / "out"
    svc = _service(watch, out, files)
    try:
        st = _wait_idle(svc, 6)
        before, n_stacked = svc.engine.result()[0].copy(), st["stacked"]
        lines = (out / "frames.jsonl").read_text()
        stacked = [d["path"] for d in svc.records if d["status"] in STACKED]
        aside = tmp_path / "aside"
        aside.mkdir()
        for rel in stacked[1:3]:
            shutil.move(watch / rel, aside / rel)

        with pytest.raises(Refused, match="2 frames of the stack are no longer in the capture folder") as err:
            svc.exclude(stacked[3]).result(timeout=30)
        assert err.value.status == 409 and stacked[1] in str(err.value) and stacked[2] in str(err.value)
        st = svc.status()
        assert st["state"] == "idle" and st["stacked"] == n_stacked and st["excluded"] == 0 and st["failed"] == 0
        assert np.array_equal(svc.engine.result()[0], before, equal_nan=True)
        assert (out / "frames.jsonl").read_text() == lines
        with pytest.raises(Refused, match="is not excluded"):      # nothing pending: the set is the stack's again
            svc.exclude(stacked[3], False)

        for rel in stacked[1:3]:
            shutil.move(aside / rel, watch / rel)
        st = svc.exclude(stacked[3]).result(timeout=30)
        assert st["excluded"] == 1 and st["stacked"] == n_stacked - 1 and st["failed"] == 0
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_a_rejected_frame_whose_file_is_gone_keeps_its_verdict_through_an_exclusions_restack(tmp_path, daemon_night):
    """A rejected frame's file deleted (a user clearing the cloudy frames off the card), then "exclude" on another:
    the restack read it again and recorded it failed ("file not found"), its reason and measurements gone and a
    failure counted.  It is not in the stack either way: now its record is kept, rejected as it was, and counted
    so."""
    files = daemon_night[0][:7]                  # frame 5 is cloudy
    watch, out = tmp_path / "watch", tmp_path / "out"
    svc = _service(watch, out, files)
    try:
        st = _wait_idle(svc, 7)
        assert st["rejected"] == 1 and st["failed"] == 0
        was = next(d for d in svc.records if d["status"] == "rejected")
        assert was["matrix"] is None        # cloudy: rejected before it was registered — placed here as a frame
        was.update(matrix=[[1.0, 0.0, 2.5], [0.0, 1.0, -1.5]], shift_x=2.5, shift_y=-1.5, rotation=0.0, scale=1.0)
        was = dict(was)                     # rejected after registering (its FWHM, its trail) is: the worker idle
        (watch / was["path"]).unlink()
        stacked = [d["path"] for d in svc.records if d["status"] in STACKED]
        st = svc.exclude(stacked[2]).result(timeout=30)
        assert st["excluded"] == 1 and st["rejected"] == 1 and st["failed"] == 0, st
        now = next(d for d in svc.records if d["path"] == was["path"])
        assert now["status"] == "rejected" and now["reason"] == was["reason"] and now["fwhm"] == was["fwhm"]
        indexes = [d["index"] for d in svc.records if d["status"] != "excluded"]
        assert sorted(indexes) == list(range(6))        # its place among the frames the restack went through
        logged = {d["path"]: d for d in map(json.loads, (out / "frames.jsonl").read_text().splitlines())}
        assert logged[was["path"]]["status"] == "rejected" and logged[was["path"]]["reason"] == was["reason"]
        assert svc.engine.n_rejected == 1 and svc.engine.n_failed == 0
        assert now["matrix"] == was["matrix"] and now["shift_x"] == 2.5     # the same grid: its placement holds
        # the reference excluded: another grid, on which the kept rejection's placement means nothing
        st = svc.exclude(stacked[0]).result(timeout=30)
        assert st["excluded"] == 2 and st["rejected"] == 1 and st["failed"] == 0, st
        now = next(d for d in svc.records if d["path"] == was["path"])
        assert now["status"] == "rejected" and now["reason"] == was["reason"]
        assert now["matrix"] is None and now["shift_x"] is None and now["fwhm"] == was["fwhm"]
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_frames_out_of_the_stack_whose_files_are_gone_keep_their_lines_through_a_start_that_restacks(
        tmp_path, daemon_night):
    """A start that restacks every frame from its file (no usable checkpoint) queued the files again and rewrote
    frames.jsonl with none of their lines: an excluded or rejected frame whose file had been deleted meanwhile was
    never found again, and its line — why it was left out — was gone.  Now such lines are kept as they were."""
    files = daemon_night[0][:7]                  # frame 5 is cloudy
    watch, out = tmp_path / "watch", tmp_path / "out"
    svc = _service(watch, out, files)
    try:
        _wait_idle(svc, 7)
        stacked = [d["path"] for d in svc.records if d["status"] in STACKED]
        svc.exclude(stacked[2]).result(timeout=30)
        before = {d["path"]: d for d in svc.records}
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    rejected = next(rel for rel, d in before.items() if d["status"] == "rejected")
    for rel in (stacked[2], rejected):
        (watch / rel).unlink()
    (out / "session" / "checkpoint.npz").unlink()
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out)))
    svc.start()
    try:
        st = _wait_idle(svc, 7)
        assert st["excluded"] == 1 and st["rejected"] == 1 and st["failed"] == 0, st
        after = {d["path"]: d for d in svc.records}
        assert set(after) == set(before)
        for rel in (stacked[2], rejected):
            assert after[rel]["status"] == before[rel]["status"] and after[rel]["reason"] == before[rel]["reason"]
            assert after[rel]["fwhm"] == before[rel]["fwhm"]
        logged = [json.loads(x)["path"] for x in (out / "frames.jsonl").read_text().splitlines()]
        assert sorted(logged) == sorted(before)
        assert svc.engine.n_rejected == 1 and svc.engine.n_failed == 0
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_an_exclusion_with_files_gone_is_refused_at_once_and_by_a_busy_worker(tmp_path, daemon_night):
    """The refusal came from the worker only: busy with a frame (1–2 s at 24 MP on a Pi) it answered after the
    page's 2 s, so the page got 202 "restacking" and the refusal went to the log alone.  Now the request is refused
    as it is made; files that go after it was queued are still caught by the worker."""
    from livestack.session import Refused

    files = daemon_night[0][:6]
    watch, aside = tmp_path / "watch", tmp_path / "aside"
    aside.mkdir()
    svc = _service(watch, tmp_path / "out", files)
    try:
        st = _wait_idle(svc, 6)
        stacked = [d["path"] for d in svc.records if d["status"] in STACKED]
        shutil.move(watch / stacked[1], aside / stacked[1])
        with pytest.raises(Refused, match=f"1 frame of the stack is no longer in the capture folder .*{stacked[1]}"):
            svc.exclude(stacked[2])                               # at once: no future to wait for
        shutil.move(aside / stacked[1], watch / stacked[1])

        assert st["refused"] is None
        busy = svc._submit(time.sleep, 1.0)                       # the worker busy (a frame, a write)
        fut = svc.exclude(stacked[2])
        svc.follow(fut, f"exclude {stacked[2]}")                  # answered 202, as the page's after 2 s
        shutil.move(watch / stacked[1], aside / stacked[1])        # gone after the request was taken
        with pytest.raises(Refused, match="1 frame of the stack is no longer") as err:
            fut.result(timeout=30)
        assert err.value.status == 409 and busy.done()
        # the status says it by the time it no longer says "restacking" (the page's 202 said "restacking")
        st2 = _wait_idle(svc, 6)
        assert st2["stacked"] == st["stacked"] and st2["excluded"] == 0 and st2["failed"] == 0
        assert st2["refused"]["request"] == f"exclude {stacked[2]}"
        assert st2["refused"]["error"] == str(err.value) and st2["refused"]["time"].endswith("+00:00")

        # a later one accepted and done leaves it as it was; another refused replaces it, with the next id
        shutil.move(aside / stacked[1], watch / stacked[1])
        fut = svc.exclude(stacked[2])
        svc.follow(fut, f"exclude {stacked[2]}")
        assert fut.result(timeout=30)["excluded"] == 1
        assert svc.status()["refused"] == st2["refused"]
        busy = svc._submit(time.sleep, 1.0)
        fut = svc.exclude(stacked[2], False)
        svc.follow(fut, f"include {stacked[2]}")
        shutil.move(watch / stacked[1], aside / stacked[1])
        with pytest.raises(Refused, match="1 frame of the stack is no longer"):
            fut.result(timeout=30)
        r = _wait_idle(svc, 6)["refused"]
        assert r["request"] == f"include {stacked[2]}" and r["id"] == st2["refused"]["id"] + 1, r
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_a_file_gone_during_an_exclusions_restack_keeps_the_stack(tmp_path, daemon_night, monkeypatch):
    """A stacked frame's file moved out of the capture folder while the restack runs (after the check made before
    it): the restack recorded it failed ("file not found") and swapped in a stack without it — its checkpoint,
    stack.fits and frames.jsonl lost the frame for good.  Now the restack notices, the stack and every file of
    the session stay as they were, and the exclusion is refused (in `refused`, for a request answered 202) with
    the sentence the check before gives."""
    from livestack.engine.pipeline import Engine
    from livestack.session import Refused

    files = daemon_night[0][:6]
    watch, out, aside = tmp_path / "watch", tmp_path / "out", tmp_path / "aside"
    aside.mkdir()
    svc = _service(watch, out, files)
    try:
        st = _wait_idle(svc, 6)
        stacked = [d["path"] for d in svc.records if d["status"] in STACKED]
        before, lines = svc.engine.result()[0].copy(), (out / "frames.jsonl").read_bytes()
        real = Engine.process

        def process(self, path, *a, **k):
            if Path(path).name == stacked[1] and svc._state == "restacking":
                shutil.move(watch / stacked[3], aside / stacked[3])     # gone after the check, before its turn
            return real(self, path, *a, **k)

        monkeypatch.setattr(Engine, "process", process)
        fut = svc.exclude(stacked[2])
        svc.follow(fut, f"exclude {stacked[2]}")
        with pytest.raises(Refused, match=f"1 frame of the stack is no longer in the capture folder .*{stacked[3]}") \
                as err:
            fut.result(timeout=60)
        assert err.value.status == 409
        st2 = _wait_idle(svc, 6)
        assert (st2["stacked"], st2["excluded"], st2["failed"]) == (st["stacked"], 0, 0), st2
        assert st2["refused"]["request"] == f"exclude {stacked[2]}" and st2["refused"]["error"] == str(err.value)
        assert np.array_equal(svc.engine.result()[0], before, equal_nan=True)
        assert svc.excluded == set() and [d["status"] for d in svc.records] == \
            [d["status"] for d in read_frames_log(out / "frames.jsonl")]
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    assert (out / "frames.jsonl").read_bytes() == lines
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == st["stacked"]
    excl = out / "session" / "excluded.json"
    assert not excl.exists() or json.loads(excl.read_text()) == []
    _, info = load_checkpoint(out / "session" / "checkpoint.npz", Config())
    assert (info["lines"], info["excluded"]) == (6, []), info
    shutil.move(aside / stacked[3], watch / stacked[3])
    again = _service(watch, out, [])          # the restart resumes the checkpoint: nothing restacked, nothing lost
    try:
        st3 = _wait_idle(again, 6)
        assert (st3["stacked"], st3["excluded"], st3["failed"]) == (st["stacked"], 0, 0), st3
        assert again.status()["restacks"] == 0
    finally:
        again.stop(timeout=10)


def test_a_frame_waiting_during_a_burst_of_requests_is_not_held_by_one_restack_each(tmp_path, daemon_night):
    """50 mixed requests on 4 frames: a frame arriving meanwhile waits for about one restack, not ten."""
    files = daemon_night[0]
    svc = _service(tmp_path / "watch", tmp_path / "out", files[:12])
    try:
        _wait_idle(svc, 12)
        names = [f.name for f in files[1:5]]
        state = {n: False for n in names}
        reqs = []
        rng = np.random.default_rng(1)
        for _ in range(50):
            n = names[int(rng.integers(4))]
            state[n] = not state[n]
            reqs.append((n, state[n]))
        t0 = time.monotonic()
        threading.Timer(0.05, lambda: shutil.copy(files[12], svc.watch_dir / files[12].name)).start()
        _burst(svc, reqs)
        t_burst = time.monotonic() - t0
        st = _wait_idle(svc, 13)
        assert st["restacks"] <= 3, st["restacks"]
        assert st["excluded"] == sum(state.values())
        assert t_burst < 10, t_burst
    finally:
        svc.stop(timeout=10)


def test_exclude_on_a_full_disk_restacks_in_memory_and_saves_when_space_returns(tmp_path, daemon_night):
    """The restack needs no space; excluded.json, the rewritten frames.jsonl and the checkpoint wait for it (in
    that order: a restart in between must not mix an old log with a new checkpoint).  "New stack" is refused
    meanwhile: the current stack is not saved yet."""
    from livestack.session import Refused

    files = daemon_night[0][:6]
    out = tmp_path / "out"
    with tmpfs(out, 16):
        svc = _service(tmp_path / "watch", out, files, checkpoint_every=1)
        try:
            _wait_idle(svc, 6)
            wait_for(lambda: svc.status()["checkpoint"]["frames"] == 6, 10, "a checkpoint of 6 frames")
            old_log = (out / "frames.jsonl").read_bytes()
            filler = fill(out)
            st = svc.exclude(files[2].name).result(timeout=30)
            assert st["excluded"] == 1 and st["restacks"] == 1 and st["disk"]["error"].startswith("disk full: ")
            assert (out / "frames.jsonl").read_bytes() == old_log and temporaries(out) == []
            with pytest.raises(Refused, match="disk full: .*not saved yet") as err:
                svc.new_session().result(timeout=30)
            assert err.value.status == 507
            filler.unlink()
            wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
            wait_for(lambda: svc.status()["checkpoint"]["frames"] == 6 and svc.status()["state"] == "idle", 10,
                     "the checkpoint")
        finally:
            svc.stop(timeout=10)
        assert svc.error is None
        recs = well_formed_lines(out / "frames.jsonl")
        assert [r["path"] for r in recs] == [f.name for f in files]
        assert [r["path"] for r in recs if r["status"] == "excluded"] == [files[2].name]
        assert json.loads((out / "session" / "excluded.json").read_text()) == [files[2].name]
        _, info = load_checkpoint(SessionFolder(out).checkpoint, Config())
        assert info["lines"] == 6 and info["excluded"] == [files[2].name]


def test_a_start_on_a_full_disk_resumes_and_rewrites_frames_jsonl_later(tmp_path, daemon_night, monkeypatch):
    """The lines after the checkpoint are dropped from frames.jsonl at start; when that rewrite meets a full disk
    the start goes on (systemd would loop otherwise) and the service rewrites the log once there is room."""
    import livestack.session as session_mod
    from livestack.engine.write import DiskFull

    files = daemon_night[0][:5]
    folder = SessionFolder(tmp_path / "out")
    from livestack.engine.pipeline import Engine
    from livestack.session import FramesLog

    eng, log = Engine(Config()), FramesLog(folder.frames)
    record(eng, files[:3], log)
    folder.save_checkpoint(eng, lines=3, excluded=set())
    record(eng, files[3:], log)
    real = session_mod.rewrite_frames_log

    def full(path, records):
        raise DiskFull(path, 1000)

    monkeypatch.setattr(session_mod, "rewrite_frames_log", full)
    r = folder.resume(Config())
    assert r.log_stale and "disk full" in r.note and len(r.records) == 3 and len(r.dropped) == 2
    assert len(read_frames_log(folder.frames)) == 5          # not rewritten yet
    monkeypatch.setattr(session_mod, "rewrite_frames_log", real)


def test_spilled_stacks_stay_in_memory_when_their_blocks_cannot_be_reserved(tmp_path, night, monkeypatch):
    """A memory-mapped stack reserves its file's blocks first: on a full disk (ENOSPC) it stays in memory — the
    same stack — instead of dying of SIGBUS when the kernel writes a page back."""
    import dataclasses
    import errno

    from livestack.engine.pipeline import Engine

    files, _ = night(mono=True, n_frames=6, seed=12, filters=("L", "Ha"))
    low = dataclasses.replace(Config(), stack=dataclasses.replace(Config().stack, memory_mb=0))
    ref = Engine(low, spill_dir=tmp_path / "a")
    for f in files:
        ref.process(f)

    def enospc(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    eng = Engine(low, spill_dir=tmp_path / "b")
    for f in files:
        eng.process(f)
    for name in ("L", "Ha"):
        a, wa = ref.result(name)
        b, wb = eng.result(name)
        assert np.array_equal(a, b) and np.array_equal(wa, wb)
    assert not any(isinstance(getattr(fs.stack, "sums", None), np.memmap) for fs in eng.stacks)
    assert any(isinstance(fs.stack.sums, np.memmap) for fs in ref.stacks)


# ---------------------------------------------------------------- a disk that takes no writes at all

def _remount(path: Path, mode: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -o remount,{mode} failed: {r.stderr.strip() or r.returncode}")


def test_a_read_only_remount_keeps_stacking_and_catches_up_when_writable_again(tmp_path, daemon_night):
    """ext4 remounts an SD card read-only after an error: every write fails with EROFS.  That stopped the worker
    (a traceback, exit 1, and a crash loop: a start on a read-only folder fails).  Like a full disk, the frames
    are stacked in memory, the status says why, and everything is written once the folder takes writes again."""
    files = daemon_night[0][:7]
    out, watch = tmp_path / "out", tmp_path / "watch"
    with tmpfs(out, 16):
        svc = _service(watch, out, files[:4], checkpoint_every=1)
        try:
            _wait_idle(svc, 4)
            wait_for(lambda: svc.status()["checkpoint"]["frames"] == 4, 10, "a checkpoint of 4 frames")
            _remount(out, "ro")
            try:
                for f in files[4:]:
                    shutil.copy(f, watch / f.name)
                st = wait_for(lambda: (s := svc.status())["frames"] == 7 and s["state"] == "idle" and s["disk"]
                              and s, 30, "7 frames counted on a read-only disk")
                assert svc.running and svc.error is None
                assert st["disk"]["error"].startswith(f"cannot write {out}/")
                assert st["disk"]["error"].endswith(": read-only file system")
                assert len(well_formed_lines(out / "frames.jsonl")) == 4
                from livestack.session import Refused

                with pytest.raises(Refused) as err:     # (it said "free some space": none is wanted)
                    svc.new_session().result(timeout=30)
                assert str(err.value).endswith("not saved yet; make the disk writable again, then start a new one")
            finally:
                _remount(out, "rw")
            wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
            wait_for(lambda: svc.status()["checkpoint"]["frames"] == 7, 10, "a checkpoint of 7 frames")
        finally:
            svc.stop(timeout=10)
        assert svc.error is None
        recs = well_formed_lines(out / "frames.jsonl")
        assert [r["path"] for r in recs] == [f.name for f in files]
        assert ncombine(out) == sum(r["status"] in STACKED for r in recs)
        assert temporaries(out) == []


def test_a_disk_pulled_out_keeps_stacking_and_catches_up_when_back(tmp_path, daemon_night, monkeypatch):
    """A USB disk pulled out mid-night: every write fails with EIO (simulated: no root needed).  The worker goes
    on in memory and says so; when writes succeed again, frames.jsonl, stack.fits and the checkpoint catch up."""
    import errno

    import livestack.engine.write as write_mod
    import livestack.session as session_mod

    files = daemon_night[0][:6]
    out, watch = tmp_path / "out", tmp_path / "watch"
    gone = threading.Event()
    real_temp, real_append = write_mod.temp_name, session_mod.FramesLog.append

    def temp_name(path):
        if gone.is_set():
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_temp(path)

    def append(self, rec):
        if gone.is_set():
            raise OSError(errno.EIO, "Input/output error", str(self.path))
        return real_append(self, rec)

    monkeypatch.setattr(write_mod, "temp_name", temp_name)
    monkeypatch.setattr(session_mod.FramesLog, "append", append)
    svc = _service(watch, out, files[:3], checkpoint_every=1)
    try:
        _wait_idle(svc, 3)
        wait_for(lambda: svc.status()["checkpoint"]["frames"] == 3, 10, "a checkpoint of 3 frames")
        gone.set()
        for f in files[3:]:
            shutil.copy(f, watch / f.name)
        st = wait_for(lambda: (s := svc.status())["frames"] == 6 and s["state"] == "idle" and s["disk"] and s, 30,
                      "6 frames counted with the disk gone")
        assert svc.running and svc.error is None
        assert st["disk"]["error"].startswith(f"cannot write {out}/")
        assert st["disk"]["error"].endswith(": input/output error")
        gone.clear()
        wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
        wait_for(lambda: svc.status()["checkpoint"]["frames"] == 6, 10, "a checkpoint of 6 frames")
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    assert [r["path"] for r in well_formed_lines(out / "frames.jsonl")] == [f.name for f in files]
    assert ncombine(out) == sum(r["status"] in STACKED for r in read_frames_log(out / "frames.jsonl"))


def _frames_while_gone(svc: Service, watch: Path, files, out: Path, n_frames: int) -> None:
    """``files`` come while the session folder is gone: counted (``n_frames`` in all), idle, an idle catch-up
    tried, and the status says the folder is gone."""
    for f in files:
        shutil.copy(f, watch / f.name)
    st = wait_for(lambda: (s := svc.status())["frames"] == n_frames and s["state"] == "idle" and s["disk"] and s,
                  30, f"{n_frames} frames counted with the session folder gone")
    time.sleep(1.5)                                  # an idle catch-up too
    assert f"the session folder {out} is gone" in st["disk"]["error"]


def _checkpointed(svc: Service, n_frames: int, what: str = "") -> None:
    """Idle with ``n_frames`` frames (and disk trouble, if any, gone: ``what`` says why it was waited for) and a
    checkpoint of them all."""
    if what:
        wait_for(lambda: svc.status()["disk"] is None, 15, what)
    else:
        _wait_idle(svc, n_frames)
    wait_for(lambda: svc.status()["checkpoint"]["frames"] == n_frames, 10, f"a checkpoint of {n_frames} frames")


def _caught_up(svc: Service, files, out: Path) -> None:
    """After the folder came back and the service stopped: every frame in frames.jsonl and the checkpoint."""
    assert svc.error is None
    assert [r["path"] for r in well_formed_lines(out / "frames.jsonl")] == [f.name for f in files]
    _, info = load_checkpoint(SessionFolder(out).checkpoint, Config())
    assert info["lines"] == len(files)


def test_a_session_folder_gone_mid_night_is_not_made_again(tmp_path, daemon_night):
    """The session folder's disk unmounted (systemd does so when a USB disk is pulled out): the writes made the
    folder again under the mount point — on the SD card — with a frames.jsonl of the later frames only, beside a
    checkpoint counting them all, and nothing said.  Now they wait, the status says why, and when the folder is
    back (the same disk mounted again; here: renamed away and back) frames.jsonl and the outputs catch up."""
    files = daemon_night[0][:6]
    out, watch, away = tmp_path / "out", tmp_path / "watch", tmp_path / "unmounted"
    svc = _service(watch, out, files[:3], checkpoint_every=1)
    try:
        _checkpointed(svc, 3)
        os.rename(out, away)
        _frames_while_gone(svc, watch, files[3:], out, 6)
        assert not out.exists()
        assert svc.running and svc.error is None
        os.rename(away, out)
        _checkpointed(svc, 6, "catch-up")
    finally:
        svc.stop(timeout=10)
    _caught_up(svc, files, out)


def test_a_session_folder_back_as_another_device_is_written_again(tmp_path, daemon_night):
    """The session folder's USB disk plugged back in comes back as another device (sdb1: the old mount still holds
    sda1), or with other inode numbers (exFAT and FAT number them at each mount): the writes waited all night for
    the folder of the start's device and inode, the page saying it gone (reproduced with an ext4 image mounted from
    /dev/loop0, then again from /dev/loop1).  Now the folder is known by its contents: an empty mount point is not
    written in, the same session under another number is (here: a copy, which has another inode)."""
    files = daemon_night[0][:6]
    out, watch, away = tmp_path / "out", tmp_path / "watch", tmp_path / "unplugged"
    svc = _service(watch, out, files[:3], checkpoint_every=1)
    try:
        _checkpointed(svc, 3)
        os.rename(out, away)
        out.mkdir()                                      # the empty mount point
        _frames_while_gone(svc, watch, files[3:], out, 6)
        assert list(out.iterdir()) == []                 # nothing written in the mount point
        out.rmdir()
        shutil.copytree(away, out)                       # the same session, under another inode
        _checkpointed(svc, 6, "catch-up")
    finally:
        svc.stop(timeout=10)
    _caught_up(svc, files, out)


def test_a_folder_of_another_session_at_the_session_folder_is_not_written_in(tmp_path, daemon_night):
    """The daemon started before its USB disk was plugged in (its session folder the empty mount point), then the
    disk mounted there, with an earlier night's session on it: a folder with session/ under another device and
    inode.  Before a frame of this session is on disk it was taken for this session's — the earlier night's
    frames.jsonl appended to, its stack.fits and checkpoint overwritten.  It holds frames of its own: not ours."""
    files = daemon_night[0][:2]
    out, watch = tmp_path / "out", tmp_path / "watch"
    svc = _service(watch, out, [])
    try:
        time.sleep(0.5)
        out.rename(tmp_path / "empty-mount-point")
        (out / "session").mkdir(parents=True)
        earlier = '{"file": "m31_001.fits", "path": "m31_001.fits", "status": "reference"}\n'
        (out / "frames.jsonl").write_text(earlier)
        _frames_while_gone(svc, watch, files, out, 2)
    finally:
        svc.stop(timeout=10)
    assert (out / "frames.jsonl").read_text() == earlier
    assert sorted(p.name for p in out.iterdir()) == ["frames.jsonl", "session"]


def test_a_reference_json_owed_does_not_restart_the_plate_solve_every_frame(tmp_path, daemon_night, monkeypatch):
    """session/reference.json meets a full disk: it is owed like the other files — but the target's naming and
    plate solve, which came with it, were redone with every frame until it could be written (solve-field killed
    and started again each frame: the solve never landed).  Now they are done once; the file comes later."""
    import livestack.daemon.service as service_mod
    from livestack.engine.write import DiskFull

    files = daemon_night[0][:6]
    out = tmp_path / "out"
    full = threading.Event()
    full.set()
    real_save, real_begin = service_mod.save_reference, Service._sky_begin
    begun = []

    def save_reference(out_dir, engine):
        if full.is_set():
            raise DiskFull(out_dir / "session" / "reference.json", 2000)
        return real_save(out_dir, engine)

    def sky_begin(self):
        begun.append(self.engine.has_stack)
        return real_begin(self)

    monkeypatch.setattr(service_mod, "save_reference", save_reference)
    monkeypatch.setattr(Service, "_sky_begin", sky_begin)
    svc = _service(tmp_path / "watch", out, files)
    try:
        st = _wait_idle(svc, 6)
        assert st["disk"]["error"].startswith("disk full: ") and not (out / "session" / "reference.json").exists()
        assert begun.count(True) == 1, begun            # once, at the reference frame
        full.clear()
        wait_for(lambda: (out / "session" / "reference.json").exists() and svc.status()["disk"] is None, 15,
                 "reference.json written when space returns")
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    assert begun.count(True) == 1
    assert json.loads((out / "session" / "reference.json").read_text())


def test_run_new_session_on_a_full_disk_says_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    """`livestack run --new-session` whose archive meets a full disk: one line and exit 1, as any start that
    cannot be made — not a traceback."""
    import errno

    from livestack.cli import main

    def full(self, ignore=frozenset()):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out / ".new-session.tmp"))

    monkeypatch.setattr(SessionFolder, "new_session", full)
    (tmp_path / "watch").mkdir()
    out = tmp_path / "out"
    logger = logging.getLogger("livestack")
    level = logger.level
    try:
        assert main(["run", "--watch", str(tmp_path / "watch"), "--out", str(out), "--no-web", "--new-session"]) == 1
    finally:
        logger.setLevel(level)      # (`run` sets the level for its process; other tests read DEBUG records)
    err = capsys.readouterr().err
    assert err == f"livestack run: --new-session: {out}: No space left on device\n"


def test_a_checkpoint_too_large_for_the_filesystem_is_left_out_like_a_capped_one(tmp_path, daemon_night,
                                                                                  monkeypatch, caplog):
    """FAT32 takes 4 GB a file (a multi-filter or drizzled 24 MP checkpoint is more): the write fails with EFBIG,
    which stopped the worker (a traceback, exit 1).  Now no checkpoint is written, as over checkpoint_max_mb:
    one warning, the status says capped, and it is not tried again each frame (gigabytes written each time)."""
    import errno

    files = daemon_night[0][:5]
    tries = []

    def too_large(self, engine, lines, excluded):
        tries.append(lines)
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(SessionFolder, "save_checkpoint", too_large)
    caplog.set_level(logging.WARNING, logger="livestack")
    svc = _service(tmp_path / "watch", tmp_path / "out", files, checkpoint_every=1)
    try:
        _wait_idle(svc, 5)
        # (the first checkpoint may come at an idle moment, after idle with 5 frames: see the test above)
        st = wait_for(lambda: (s := svc.status())["checkpoint"]["capped"] and s, 30, "the checkpoint left out")
        time.sleep(1.0)
        assert svc.running and svc.error is None
        assert st["checkpoint"]["capped"] and st["disk"] is None
    finally:
        svc.stop(timeout=10)
    assert svc.error is None and len(tries) == 1, tries
    warnings = [r.getMessage() for r in caplog.records if "none written" in r.getMessage()]
    assert len(warnings) == 1 and "more than the filesystem of" in warnings[0], warnings
    assert len(read_frames_log(tmp_path / "out" / "frames.jsonl")) == 5


def test_after_a_restart_the_status_says_what_the_checkpoint_covers(tmp_path, daemon_night, monkeypatch):
    """status.checkpoint.frames ("the frames the last one covers") read null after every start until a new
    checkpoint was written — all night on a full disk, when it matters most what a crash would keep."""
    from livestack.engine.write import DiskFull

    files = daemon_night[0][:4]
    svc = _service(tmp_path / "watch", tmp_path / "out", files, checkpoint_every=1)
    try:
        _wait_idle(svc, 4)
    finally:
        svc.stop(timeout=10)
    assert load_checkpoint(SessionFolder(tmp_path / "out").checkpoint, Config())[1]["lines"] == 4

    def full(self, engine, lines, excluded):
        raise DiskFull(self.checkpoint, 4_000_000)

    monkeypatch.setattr(SessionFolder, "save_checkpoint", full)
    svc = _service(tmp_path / "watch", tmp_path / "out", [], checkpoint_every=1)
    try:
        st = _wait_idle(svc, 4)
        assert st["checkpoint"]["frames"] == 4
    finally:
        svc.stop(timeout=10)


# ---------------------------------------------------------------- a start on a disk that takes no writes

def test_a_start_on_a_read_only_session_folder_serves_the_page_stacks_and_writes_later(make_daemon, daemon_night):
    """The SD card came up read-only (ext4 remounted it after an error) with last night's session on it: the
    start exited 1 with one line (`cannot write …/targets.json: read-only file system`), and under systemd
    that is a restart every 5 s with no page.  Now it starts as a mid-night read-only remount goes on: the page
    and the status say why, the frames are stacked in memory, and everything is written once the folder takes
    writes again."""
    files, _ = daemon_night
    d = make_daemon(name="ro-start")
    with tmpfs(d.out, 16):
        d.run_through(files[:3])
        killed_write(d.out / "stack.fits")     # a power cut mid-write (what made ext4 remount it read-only)
        _remount(d.out, "ro")
        try:
            d.start()
            st = wait_for(lambda: (s := status(d))["state"] == "idle" and s, 15, "the page", d)
            assert st["frames"] == 3 and st["disk"]["since"]
            assert st["disk"]["error"] == f"cannot write {d.out}: read-only file system", st["disk"]
            d.feeder(files[3:])(3)
            st = wait_for(lambda: (s := status(d))["frames"] == 6 and s["state"] == "idle" and s, 30,
                          "6 frames counted on a read-only disk", d)
            assert st["disk"] and st["stacked"] + st["rejected"] == 6
            assert len(well_formed_lines(d.out / "frames.jsonl")) == 3
        finally:
            _remount(d.out, "rw")
        wait_for(lambda: status(d)["disk"] is None, 15, "catch-up", d)
        wait_for(lambda: status(d)["checkpoint"]["frames"] == 6, 15, "a checkpoint of 6 frames", d)
        assert d.stop() == 0
        recs = well_formed_lines(d.out / "frames.jsonl")
        assert [r["path"] for r in recs] == [f.name for f in files[:6]]
        assert ncombine(d.out) == sum(r["status"] in STACKED for r in recs)
        assert len(temporaries(d.out)) == 1          # the power cut's: removed at the next start, not this one
        assert d.log.read_text().count("read-only file system") == 1, d.log.read_text()


def test_a_start_on_a_full_disk_serves_the_page_stacks_and_writes_later(make_daemon, daemon_night):
    """A new session folder on a full disk: the start exited 1 (`disk full: …/targets.json, 0.1 MB needed`).  Now
    the page comes up saying so, frames are stacked in memory, and the files are written when space returns."""
    files, _ = daemon_night
    d = make_daemon(name="full-start")
    with tmpfs(d.out, 16):
        filler = fill(d.out)
        d.start()
        st = wait_for(lambda: (s := status(d))["state"] == "idle" and s, 15, "the page", d)
        assert st["disk"]["error"] == f"disk full: {d.out}", st["disk"]
        d.feeder(files)(4)
        wait_for(lambda: (s := status(d))["frames"] == 4 and s["state"] == "idle", 30, "4 frames in memory", d)
        assert not (d.out / "stack.fits").exists()
        filler.unlink()
        wait_for(lambda: status(d)["disk"] is None, 15, "catch-up", d)
        assert d.stop() == 0
        recs = well_formed_lines(d.out / "frames.jsonl")
        assert [r["path"] for r in recs] == [f.name for f in files[:4]]
        assert ncombine(d.out) == sum(r["status"] in STACKED for r in recs)
        assert json.loads((d.out / "targets.json").read_text())["targets"][0]["folder"] == "."
        assert d.log.read_text().count("disk full") == 1, d.log.read_text()


def test_a_torn_last_line_on_a_read_only_disk_is_cut_before_the_next_append(tmp_path):
    """frames.jsonl with a torn last line (a power cut mid-append) on a disk that came up read-only: the cut
    cannot be made at start, which stopped the start; it is made before the first append once writes work
    again — or the next record would be glued to the torn one and both lost."""
    from livestack.session import FramesLog

    out = tmp_path / "out"
    with tmpfs(out, 16):
        path = out / "frames.jsonl"
        path.write_bytes(b'{"file": "a.dng", "status": "stacked"}\n{"file": "b.d')
        _remount(out, "ro")
        try:
            flog = FramesLog(path)
            assert flog.torn
        finally:
            _remount(out, "rw")
        flog.append({"file": "c.dng", "status": "stacked"})
        assert [d["file"] for d in well_formed_lines(path)] == ["a.dng", "c.dng"]


GARBLED = b'["light_00\x00\x00'      # a list torn by a power cut


@pytest.mark.parametrize("name, then", [
    ("excluded.json", "; 1 exclusion recovered from frames.jsonl"),
    ("ignore.json", "; files from before the last new stack may be stacked again"),
    ("inflight.json", ""),
])
def test_an_unreadable_session_list_on_a_read_only_disk_is_left_where_it_is(tmp_path, caplog, name, then):
    """An excluded.json, ignore.json or inflight.json that cannot be read is moved aside at start — a rename,
    which a disk remounted read-only refuses: the start failed with EROFS, under systemd a restart loop.  Now it
    stays where it is, its one line says it was not moved aside and why, and it is not read as valid: the
    exclusions come back from frames.jsonl and apply in memory; excluded.json is written (the unreadable one
    moved aside first, for a look) when the disk takes writes again."""
    from livestack.session import FramesLog

    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="livestack")
    with tmpfs(out, 16):
        folder = SessionFolder(out)
        flog = FramesLog(folder.frames)
        for f, status in (("a", "stacked"), ("b", "excluded")):
            flog.append({"file": f"{f}.dng", "path": f"n/{f}.dng", "status": status})
        folder.dir.mkdir()
        (folder.dir / name).write_bytes(GARBLED)
        _remount(out, "ro")
        try:
            folder.resume(Config())
            assert folder.excluded() == ({"n/b.dng"} if name == "excluded.json" else set())
            assert folder.ignored() == set() and folder.inflight() is None
            assert (folder.dir / name).read_bytes() == GARBLED
        finally:
            _remount(out, "rw")
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(f"livestack: {name}: unreadable"), lines
        assert lines[0].endswith(f"; not moved aside: Read-only file system{then}"), lines
        if name == "excluded.json":
            folder.set_excluded(folder.excluded())
            assert json.loads(folder.excluded_file.read_text()) == ["n/b.dng"]
            assert [p.read_bytes() for p in folder.dir.glob("excluded.json.corrupt-*")] == [GARBLED]
            assert SessionFolder(out).excluded() == {"n/b.dng"}


def test_a_start_on_a_read_only_disk_with_an_unreadable_excluded_json_keeps_the_exclusion(tmp_path, daemon_night):
    """The daemon's side of the above: started on a read-only disk with an unreadable excluded.json (it raised
    EROFS), the exclusion recovered from frames.jsonl applies — the checkpoint built with it is resumed, the
    frame stays out — and once the disk takes writes again excluded.json is written before the next checkpoint
    (which must match it), the unreadable one kept aside for a look."""
    files = daemon_night[0][:4]
    out, watch = tmp_path / "out", tmp_path / "watch"
    excl = out / "session" / "excluded.json"
    with tmpfs(out, 16):
        svc = _service(watch, out, files[:3], checkpoint_every=1)
        try:
            _wait_idle(svc, 3)
            svc.exclude(files[1].name).result(timeout=30)
            wait_for(lambda: (s := svc.status())["checkpoint"]["frames"] == 3 and s["state"] == "idle", 10,
                     "a checkpoint with the exclusion")
        finally:
            svc.stop(timeout=10)
        assert svc.error is None and json.loads(excl.read_text()) == [files[1].name]
        excl.write_bytes(GARBLED)
        _remount(out, "ro")
        try:
            svc = _service(watch, out, [], checkpoint_every=1)
            try:
                st = wait_for(lambda: (s := svc.status())["state"] == "idle" and s["disk"] and s, 10, "the page")
                assert svc.excluded == {files[1].name} and st["excluded"] == 1
                assert st["checkpoint"]["frames"] == 3          # resumed: built with that exclusion
                assert excl.read_bytes() == GARBLED
            finally:
                _remount(out, "rw")
            wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
            assert json.loads(excl.read_text()) == [files[1].name]
            assert [p.read_bytes() for p in excl.parent.glob("excluded.json.corrupt-*")] == [GARBLED]
            shutil.copy(files[3], watch / files[3].name)
            wait_for(lambda: (s := svc.status())["checkpoint"]["frames"] == 4 and s["state"] == "idle", 30,
                     "a checkpoint of 4 frames")
        finally:
            svc.stop(timeout=10)
        assert svc.error is None
        _, info = load_checkpoint(SessionFolder(out).checkpoint, Config())
        assert info["lines"] == 4 and info["excluded"] == [files[1].name]


@pytest.mark.parametrize("name", ["targets.json", ".switch.json"])
def test_an_unreadable_targets_file_on_a_read_only_disk_is_left_where_it_is(tmp_path, caplog, name):
    """targets.json or a switch's journal (.switch.json) that cannot be read is moved aside at start: on a disk
    remounted read-only the journal's move raised EROFS out of the start (a restart loop), and the book's was
    caught without a word.  Now each stays where it is with one line saying it was not moved aside and why;
    the book is rebuilt from the folders in memory (saved with the stack files once the disk takes writes)."""
    from livestack.targets import Book

    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="livestack")
    with tmpfs(out, 16):
        (out / "frames.jsonl").write_text(json.dumps({"file": "a.fits", "path": "a.fits", "status": "reference"})
                                          + "\n")
        (out / name).write_bytes(GARBLED)
        _remount(out, "ro")
        try:
            book = Book.open(out)
            assert [t.folder for t in book.targets] == ["."]
            assert (out / name).read_bytes() == GARBLED
        finally:
            _remount(out, "rw")
    lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    then = "; rebuilt from the session folders" if name == "targets.json" else ""
    assert len(lines) == 1 and lines[0].startswith(f"livestack: {name}: unreadable ("), lines
    assert lines[0].endswith(f"; not moved aside: Read-only file system{then}"), lines


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livestack.cli", "run", "--port", "0", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_a_session_folder_that_cannot_be_one_is_a_configuration_error(tmp_path):
    """A file where the session folder should be, or on its way: no disk to wait for, a path to correct.  One
    line and exit 2, a configuration error — which the unit's RestartPreventExitStatus=2 keeps systemd from
    restarting into every 5 s (it was exit 1 and `[Errno 20] Not a directory: …`)."""
    watch = tmp_path / "watch"
    watch.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    r = _run("--watch", str(watch), "--out", str(afile))
    assert (r.returncode, r.stderr) == (2, f"livestack run: {afile}: not a folder; the session folder must be one\n")
    r = _run("--watch", str(watch), "--out", str(afile / "out"))
    assert (r.returncode, r.stderr) == (2, f"livestack run: {afile / 'out'}: cannot make the session folder "
                                           f"(Not a directory)\n")
    r = _run("--watch", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.endswith("watch folder does not exist\n"), r.stderr   # restarts: see README


def test_a_session_folder_that_cannot_be_made_on_a_read_only_disk_is_a_configuration_error(tmp_path):
    """There is no folder to wait on (and a missing one is never made later: it may be an unmounted disk's mount
    point): one line, exit 2."""
    ro, watch = tmp_path / "ro", tmp_path / "watch"
    watch.mkdir()
    with tmpfs(ro, 1):
        _remount(ro, "ro")
        r = _run("--watch", str(watch), "--out", str(ro / "out"))
    assert (r.returncode, r.stderr) == (2, f"livestack run: {ro / 'out'}: cannot make the session folder "
                                           f"(Read-only file system)\n")


def test_a_read_only_bind_mount_of_a_writable_disk_is_a_configuration_error(tmp_path):
    """systemd's ProtectSystem=strict mounts every folder its unit's ReadWritePaths= leaves out read-only over a
    writable filesystem — an `out` moved in livestack.toml and not in the unit.  Taken for a read-only disk,
    the daemon stacked the whole night in memory and wrote nothing; no remount mends it: one line naming the
    mount, exit 2.  (A disk itself read-only — ext4 after an error — is still waited out: the tests above.)"""
    from livestack.engine.write import read_only_mount

    disk, view, watch = tmp_path / "disk", tmp_path / "view", tmp_path / "watch"
    watch.mkdir()
    with tmpfs(disk, 4):
        (disk / "out").mkdir()
        view.mkdir()
        r = subprocess.run(["mount", "--bind", str(disk), str(view)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount --bind failed: {r.stderr.strip() or r.returncode}")
        try:
            _remount(view, "ro,bind")
            assert read_only_mount(view / "out") == view and read_only_mount(disk / "out") is None
            r = _run("--watch", str(watch), "--out", str(view / "out"))
        finally:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
        _remount(disk, "ro")             # the filesystem itself read-only: a disk to wait for, not this error
        assert read_only_mount(disk / "out") is None
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"livestack run: {view / 'out'}: cannot write in the session folder: {view} is mounted "
                        "read-only here while its filesystem is writable (systemd's ProtectSystem=strict: is the "
                        "folder in the unit's ReadWritePaths=?)\n")


def test_a_session_folder_without_write_permission_is_a_configuration_error(tmp_path, monkeypatch, capsys):
    """No permission to write in it (the unit's User= does not own it; ReadWritePaths= left out): no restart
    mends that.  (Simulated: the tests run as root, whom permissions do not stop.)"""
    import errno
    import tempfile

    from livestack.cli import main

    out, watch = tmp_path / "out", tmp_path / "watch"
    out.mkdir()
    watch.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(out / ".probe.x.tmp"))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    logger = logging.getLogger("livestack")
    level = logger.level
    try:
        assert main(["run", "--watch", str(watch), "--out", str(out), "--no-web"]) == 2
    finally:
        logger.setLevel(level)
    assert capsys.readouterr().err == f"livestack run: {out}: cannot write in the session folder (Permission denied)\n"


@pytest.mark.parametrize("where", ["session/", "frames.jsonl"])
def test_a_session_folder_whose_files_are_another_users_is_a_configuration_error(tmp_path, monkeypatch, where):
    """session/ or frames.jsonl left by another user (a `sudo livestack run` once): the start went through, then
    the first frame stopped the worker with a PermissionError traceback (exit 1), and systemd restarted it into
    the same stop every 5 s.  Now the start says which one, exit 2.  (Simulated: root passes permissions.)"""
    import errno
    import tempfile

    from livestack.session import FolderError

    out, watch = tmp_path / "out", tmp_path / "watch"
    (out / "session").mkdir(parents=True)
    (out / "frames.jsonl").write_text("")
    watch.mkdir()
    real_mkstemp, real_open = tempfile.mkstemp, os.open

    def mkstemp(*args, dir=None, **kw):
        if where == "session/" and Path(dir) == out / "session":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kw)

    def os_open(path, flags, *args, **kw):
        if where == "frames.jsonl" and Path(path) == out / "frames.jsonl" and flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "open", os_open)
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch)), DaemonParams(out=str(out)))
    try:
        with pytest.raises(FolderError) as err:      # (FolderError: `livestack run` exits 2, as tested above)
            svc.start()
    finally:
        svc.stop(timeout=10)
    assert str(err.value) == (f"{out}: cannot write in the session folder: {where} (Permission denied); give its "
                              "files to the user livestack runs as (chown -R)")


def test_the_unit_does_not_restart_into_a_configuration_error():
    """Exit 2 (usage, configuration, a session folder that cannot be one) is not restarted by systemd."""
    unit = (REPO / "systemd" / "livestack.service").read_text()
    assert "\nRestart=on-failure\n" in unit and "\nRestartPreventExitStatus=2\n" in unit


def test_a_stop_on_a_read_only_start_names_only_the_files_not_written(tmp_path, daemon_night, caplog):
    """Stopped while the session folder still takes no writes: the last line names the files not written — not
    the folder's own check at start (".probe not written" named a file there never was)."""
    files = daemon_night[0][:2]
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="livestack")
    with tmpfs(out, 16):
        _remount(out, "ro")
        try:
            svc = _service(tmp_path / "watch", out, [])
            try:
                wait_for(lambda: svc.status()["disk"], 10, "the disk's status")
            finally:
                svc.stop(timeout=10)
            svc = _service(tmp_path / "watch", out, files)
            try:
                _wait_idle(svc, 2)
            finally:
                svc.stop(timeout=10)
        finally:
            _remount(out, "rw")
    stops = [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()]
    assert stops[0] == f"livestack: stopping with cannot write {out}: read-only file system", stops
    assert stops[1].startswith(f"livestack: stopping with cannot write {out}: read-only file system: ")
    assert ".probe" not in stops[1] and "frames.jsonl" in stops[1] and "stack.fits" in stops[1], stops
    assert stops[1].endswith("; 2 frames not in frames.jsonl are stacked again at the next start"), stops


def test_a_torn_line_cut_late_is_not_brought_back_by_a_failed_append(tmp_path, daemon_night, monkeypatch):
    """The torn line of a read-only start is cut before the first append; when that append then fails (the disk
    writable again, but full: simulated, as a small append into a page the file already has succeeds on a full
    tmpfs), the log is cut back to its size before the append — which, measured before the cut, held the torn
    line: truncate() brought its length back as NUL bytes, glued to the next line."""
    import errno

    import livestack.session as session_mod

    files = daemon_night[0][:3]
    out, watch = tmp_path / "out", tmp_path / "watch"
    full = threading.Event()
    real_append = session_mod.FramesLog.append

    def append(self, rec):
        if full.is_set():
            self.cut()                  # the cut (a truncate) needs no room; the line does
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_append(self, rec)

    with tmpfs(out, 16):
        svc = _service(watch, out, files[:2])
        try:
            _wait_idle(svc, 2)
        finally:
            svc.stop(timeout=10)
        with open(out / "frames.jsonl", "ab") as f:
            f.write(b'{"file": "torn.dng", "sta')
        monkeypatch.setattr(session_mod.FramesLog, "append", append)
        full.set()
        _remount(out, "ro")
        try:
            svc = _service(watch, out, [])
        finally:
            _remount(out, "rw")
        try:
            assert svc.flog.torn
            shutil.copy(files[2], watch / files[2].name)
            wait_for(lambda: (s := svc.status())["frames"] == 3 and s["state"] == "idle" and s["disk"], 30,
                     "3 frames, frames.jsonl owed")
            full.clear()
            wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
        finally:
            svc.stop(timeout=10)
        assert svc.error is None
        assert [r["path"] for r in well_formed_lines(out / "frames.jsonl")] == [f.name for f in files]


def test_pause_and_resume_on_a_read_only_disk_apply_and_are_kept_when_writable_again(tmp_path, daemon_night,
                                                                                        monkeypatch):
    """paused.json cannot be written on a read-only disk (ext4 remounts a failing SD card so; simulated: no root
    needed): pause and resume still answer and apply at once, the status says what is owed, and the file is
    written when the disk takes writes again — a restart then comes back paused."""
    import errno

    import livestack.engine.write as write_mod

    files = daemon_night[0][:2]
    out, watch = tmp_path / "out", tmp_path / "watch"
    ro = threading.Event()
    real_temp = write_mod.temp_name

    def temp_name(path):
        if ro.is_set():
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_temp(path)

    monkeypatch.setattr(write_mod, "temp_name", temp_name)
    svc = _service(watch, out, files, checkpoint_every=1)
    try:
        _wait_idle(svc, 2)
        wait_for(lambda: svc.status()["checkpoint"]["frames"] == 2 and (out / "stack.fits").exists()
                 and ncombine(out) == 2, 10, "a checkpoint and stack.fits of 2 frames")
        ro.set()
        assert svc.pause()["paused"]
        assert not svc.resume()["paused"]
        assert svc.pause()["paused"]
        st = wait_for(lambda: (s := svc.status())["disk"] and s, 10, "the owed paused.json in the status")
        assert "paused.json" in st["disk"]["error"] and svc.running, st
        assert not (out / "paused.json").exists()
        ro.clear()
        wait_for(lambda: svc.status()["disk"] is None, 15, "catch-up")
        assert json.loads((out / "paused.json").read_text())["paused"] is True
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    svc = _service(watch, out, [])
    try:
        assert svc.status()["paused"]
    finally:
        svc.stop(timeout=10)
