"""Issue 13, hardening the daemon: what a power cut, a hostile or odd capture folder, or a signal can do to a
night — each answered by a start that goes on, a frame recorded `failed` with one line, or a clean stop."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import record
from astropy.io import fits

from livestack.engine.frame import FrameError
from livestack.session import read_frames_log

REPO = Path(__file__).resolve().parents[1]
STACKED = ("reference", "stacked")


def read_stack(out: Path):
    with fits.open(out / "stack.fits") as h:
        return np.array(h[0].data), np.array(h["WEIGHT"].data), dict(h[0].header)


def uninterrupted(make_daemon, files) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """The stack and {file: status} of one daemon run over ``files``, all there before it starts."""
    ref = make_daemon(name="uninterrupted").run_through(files)
    img, w, hdr = read_stack(ref.out)
    return img, w, hdr, {r["file"]: r["status"] for r in read_frames_log(ref.out / "frames.jsonl")}


def stopped_after_three(make_daemon, files, name: str):
    """A daemon that stacked the first 3 of ``files`` and stopped: (the Daemon, its feeder of the rest)."""
    d = make_daemon(name=name)
    feed = d.feeder(files)
    feed(3)
    d.start()
    d.wait_lines(3)
    assert d.stop() == 0
    return d, feed


def assert_same_stack(out: Path, ref) -> None:
    ref_img, ref_w, ref_hdr, ref_status = ref
    recs = read_frames_log(out / "frames.jsonl")
    assert sorted(r["file"] for r in recs) == sorted(ref_status)          # none twice, none skipped
    assert {r["file"]: r["status"] for r in recs} == ref_status
    img, w, hdr = read_stack(out)
    assert hdr["NCOMBINE"] == ref_hdr["NCOMBINE"] and hdr["EXPTIME"] == ref_hdr["EXPTIME"]
    assert np.allclose(img, ref_img, rtol=1e-5, atol=1e-3), float(np.abs(img - ref_img).max())
    assert np.allclose(w, ref_w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 1. an unusable checkpoint

def test_an_unusable_checkpoint_is_restacked_from_frames_jsonl(make_daemon, daemon_night):
    """Empty (power cut mid-write), random bytes, cut at half, a directory in its place: each start says
    "unusable checkpoint … restacking", restacks, and the night ends with the uninterrupted run's stack; what
    was there is moved aside, not overwritten by the next checkpoint."""
    files = daemon_night[0][:7]
    ref = uninterrupted(make_daemon, files)
    d, feed = stopped_after_three(make_daemon, files, "damaged")
    ckpt = d.out / "session" / "checkpoint.npz"
    for n, kind in enumerate(("empty", "random", "half", "directory")):
        good = ckpt.read_bytes()
        if kind == "empty":
            ckpt.write_bytes(b"")
        elif kind == "random":
            ckpt.write_bytes(np.random.default_rng(n).bytes(len(good)))
        elif kind == "half":
            ckpt.write_bytes(good[: len(good) // 2])
        else:
            ckpt.unlink()
            (ckpt / "x").mkdir(parents=True)
        d.start()
        feed(1)
        d.wait_lines(4 + n)
        time.sleep(0.3)
        assert d.stop() == 0, d.log.read_text()
        log = d.log.read_text()
        assert "unusable checkpoint" in log and "restacking" in log, (kind, log)
        assert "Traceback" not in log, log
        assert ckpt.is_file()
    # the damaged ones and the directory moved aside for a look (the empty one holds nothing to look at)
    aside = sorted(ckpt.parent.glob("checkpoint.npz.corrupt-*"))
    assert len(aside) == 3 and sum(p.is_dir() for p in aside) == 1, aside
    assert_same_stack(d.out, ref)


# ---------------------------------------------------------------- 2. memory bombs

def sparse_fits(path: Path, width: int, height: int) -> Path:
    """A FITS whose header claims width × height int16 pixels: the data is a hole (no disk, no memory)."""
    h = fits.Header()
    h["SIMPLE"], h["BITPIX"], h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = True, 16, 2, width, height
    head = h.tostring().encode()
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + -(-2 * width * height // 2880) * 2880)
    return path


def sparse_dng(path: Path, width: int, height: int) -> Path:
    """An uncompressed CFA DNG of width × height whose strips are a hole in the file."""
    import tifffile

    tags = [(50706, 1, 4, (1, 4, 0, 0), True), (50707, 1, 4, (1, 1, 0, 0), True), (271, 2, 0, "Sim", True),
            (272, 2, 0, "Bomb", True), (50708, 2, 0, "Sim Bomb", True), (33421, 3, 2, (2, 2), True),
            (33422, 1, 4, (0, 1, 1, 2), True), (50710, 1, 3, (0, 1, 2), True), (50711, 3, 1, 1, True),
            (50714, 4, 1, 100, True), (50717, 4, 1, 16383, True)]
    tifffile.imwrite(path, shape=(height, width), dtype=np.uint16, photometric=32803, subfiletype=0,
                     metadata=None, extratags=tags)
    return path


def fz_bomb(path: Path) -> Path:
    """A 256 KB tile-compressed FITS that decompresses to 16000 × 16000 pixels."""
    data = np.zeros((16000, 16000), np.uint8)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="GZIP_1", tile_shape=(500, 16000))]
                 ).writeto(path)
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    return {"fits": sparse_fits(d / "light.fits", 100000, 100000), "fz": fz_bomb(d / "light.fits.fz"),
            "dng": sparse_dng(d / "light.dng", 32000, 32000)}


PEAK = """
import sys
from livestack.engine.read import read_frame
from livestack.engine.frame import FrameError
try:
    read_frame(sys.argv[1], max_megapixels=200)
except FrameError as err:
    print(err)
# This process's own high-water mark: VmHWM belongs to the memory map exec() made.  (ru_maxrss is not: it
# keeps the high-water mark of the image exec() replaced — the forking test process, ~450 MB by the time the
# whole suite reaches this test.)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


@pytest.mark.parametrize("kind, mp", [("fits", 10000), ("fz", 256), ("dng", 1024)])
def test_a_frame_above_the_pixel_limit_is_refused_before_reading(bombs, kind, mp):
    """The header's size is checked before any pixel is read: one line naming the file, the size, the limit and
    the key; the process stays small (it passed 4 GB before: see the note of this change)."""
    path = bombs[kind]
    r = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    msg, peak_mb = r.stdout.strip().splitlines()
    assert msg.startswith(f"{path.name}: ") and f"({mp} MP) is above the limit of 200 MP" in msg, msg
    assert "[engine] max_megapixels" in msg and "refused before reading" in msg, msg
    assert int(peak_mb) < 400, peak_mb


def test_the_default_pixel_limit_comes_from_the_machine(tmp_path, daemon_night):
    from livestack.engine.read import default_max_megapixels, read_frame

    limit = default_max_megapixels()
    assert limit >= 50
    assert read_frame(daemon_night[0][0], max_megapixels=0.2).data.shape == (360, 480)    # 0.17 MP: read
    with pytest.raises(FrameError, match=r"above the limit of 0\.1 MP"):
        read_frame(daemon_night[0][0], max_megapixels=0.1)
    with pytest.raises(FrameError, match=f"above the limit of {limit:.0f} MP .from this machine's memory"):
        read_frame(sparse_fits(tmp_path / "big.fits", 100000, 100000))


def test_the_daemon_records_a_bomb_failed_and_goes_on(make_daemon, daemon_night, tmp_path):
    files = daemon_night[0][:3]
    d = make_daemon()
    shutil.copy(files[0], d.watch / files[0].name)
    sparse_fits(d.watch / "light_9999.fits", 100000, 100000)
    for f in files[1:]:
        shutil.copy(f, d.watch / f.name)
    d.start()
    recs = d.wait_lines(4, timeout=60)
    assert d.stop() == 0
    by = {r["file"]: r for r in recs}
    assert by["light_9999.fits"]["status"] == "failed"
    assert "100000×100000 pixels (10000 MP) is above the limit" in by["light_9999.fits"]["reason"]
    assert sum(r["status"] in STACKED for r in recs) == 3


def test_engine_max_megapixels_is_a_checked_setting(tmp_path):
    from livestack.config import ConfigError, load_config

    p = tmp_path / "livestack.toml"
    p.write_text("[engine]\nmax_megapixels = 120\n")
    assert load_config(p).engine.max_megapixels == 120
    p.write_text("[engine]\nmax_megapixels = -1\n")
    with pytest.raises(ConfigError, match="max_megapixels"):
        load_config(p)


def test_the_configured_limit_reaches_the_engine(tmp_path, daemon_night):
    import dataclasses

    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, max_megapixels=0.1))
    rec = Engine(cfg).process(daemon_night[0][0])
    assert rec.status == "failed" and "above the limit of 0.1 MP" in rec.reason


# ---------------------------------------------------------------- 3. a garbled line in frames.jsonl

def garble_line(path: Path, n: int) -> None:
    """Overwrite the middle of line ``n`` (0-based) in place, as a bad sector or a torn page would."""
    data = bytearray(path.read_bytes())
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    a, b = starts[n], starts[n + 1] - 1
    data[a + 5:b - 5] = b"\x00" * (b - a - 10)
    path.write_bytes(bytes(data))


def test_a_garbled_line_in_frames_jsonl_never_counts_a_frame_twice(make_daemon, daemon_night):
    """The checkpoint covers lines 1-3, frames.jsonl has 6 (a crash before the next checkpoint), and line 2 is
    garbled: the checkpoint cannot be matched to its lines, so the start restacks — the final stack is the
    uninterrupted run's (it had frame 2 twice and frame 4 never)."""
    files = daemon_night[0][:8]
    ref = uninterrupted(make_daemon, files)
    d, feed = stopped_after_three(make_daemon, files, "garbled")
    ckpt = d.out / "session" / "checkpoint.npz"
    covers_3 = ckpt.read_bytes()
    d.start()
    feed(3)
    d.wait_lines(6)
    assert d.stop() == 0
    ckpt.write_bytes(covers_3)                 # as if killed after the checkpoint at 3, before the next one
    garble_line(d.out / "frames.jsonl", 1)
    assert len(read_frames_log(d.out / "frames.jsonl")) == 5
    d.start()
    feed(2)
    d.wait_lines(8)
    time.sleep(0.3)
    assert d.stop() == 0
    assert "restacking" in d.log.read_text()
    assert_same_stack(d.out, ref)


def test_checkpoint_coverage_is_matched_by_content(tmp_path, daemon_night):
    """In-process: a garbled line after the covered ones only requeues its file; one inside restacks; an older
    checkpoint without the digest is still matched by its line count."""
    from livestack.config import Config
    from livestack.engine.pipeline import Engine
    from livestack.session import FramesLog, SessionFolder

    six = daemon_night[0][:6]
    folder = SessionFolder(tmp_path)
    eng, flog = Engine(Config()), FramesLog(folder.frames)
    record(eng, six[:3], flog)
    folder.save_checkpoint(eng, 3, set())
    record(eng, six[3:], flog)
    text = folder.frames.read_bytes()

    garble_line(folder.frames, 4)                                  # after the checkpoint
    r = folder.resume(Config())
    assert [x["file"] for x in r.records] == [f.name for f in six[:3]] and r.engine.n_stacked == 3
    assert [x["file"] for x in r.dropped] == [six[3].name, six[5].name]
    assert "line 5" in r.note
    assert [x["file"] for x in read_frames_log(folder.frames)] == [f.name for f in six[:3]]

    folder.frames.write_bytes(text)
    garble_line(folder.frames, 1)                                  # inside what the checkpoint covers
    r = folder.resume(Config())
    assert r.records == [] and r.engine.ref is None and "line 2" in r.note and "restacking" in r.note
    assert read_frames_log(folder.frames) == []


# ---------------------------------------------------------------- 4. garbled session lists

def test_garbled_session_lists_are_moved_aside_not_a_restart_loop(make_daemon, daemon_night):
    files = daemon_night[0][:4]
    d = make_daemon()
    feed = d.feeder(files)
    feed(3)
    (d.out / "session").mkdir(parents=True)
    (d.out / "session" / "excluded.json").write_text(json.dumps([files[1].name]))
    d.start()
    d.wait_lines(3)
    assert d.stop() == 0
    s = d.out / "session"
    (s / "excluded.json").write_bytes(b'["light_00\x00\x00')
    (s / "ignore.json").write_text('{"not": "a list"}')
    (s / "inflight.json").write_bytes(b"\xff\xfe garbage")
    d.start()
    feed(1)
    recs = d.wait_lines(4)
    time.sleep(0.3)
    assert d.stop() == 0
    log = d.log.read_text()
    for name in ("excluded.json", "ignore.json", "inflight.json"):
        assert len(list(s.glob(name + ".corrupt-*"))) == 1, name
        assert len([x for x in log.splitlines() if name + ".corrupt-" in x]) == 1, log
    # the exclusion came back from frames.jsonl: the frame stays excluded and the checkpoint stays valid
    assert json.loads((s / "excluded.json").read_text()) == [files[1].name]
    assert {r["file"]: r["status"] for r in recs}[files[1].name] == "excluded"
    assert "resumed 3 frames" in log
    assert read_stack(d.out)[2]["NCOMBINE"] == 3


# ---------------------------------------------------------------- 5. symbolic links

def run_watcher(root: Path, wp, n: int, timeout: float = 10.0) -> list:
    """Start a Watcher on ``root``, return the first ``n`` Ready items (bounded wait), stop it."""
    import queue

    from livestack.daemon.watch import Watcher

    q: queue.Queue = queue.Queue()
    w = Watcher(root, wp, q)
    w.start()
    got = []
    try:
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            try:
                got.append(q.get(timeout=0.1))
            except queue.Empty:
                pass
    finally:
        w.stop()
    return got


@pytest.mark.parametrize("follow", [False, True])
def test_symlinks_out_of_the_watch_folder(tmp_path, daemon_night, follow):
    from livestack.daemon.config import WatchParams

    root, elsewhere = tmp_path / "watch", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    src = daemon_night[0][0]
    shutil.copy(src, elsewhere / "secret.dng")
    shutil.copy(src, root / "a.dng")
    (root / "out.dng").symlink_to(elsewhere / "secret.dng")          # leaves the folder
    (root / ".hidden").mkdir()
    shutil.copy(src, root / ".hidden" / "b.dng")
    (root / "in.dng").symlink_to(root / ".hidden" / "b.dng")         # stays inside: always followed
    wp = WatchParams(settle_s=0.1, timeout_s=5.0, rescan_s=0.5, follow_symlinks=follow)
    got = {r.rel: r for r in run_watcher(root, wp, 3)}
    assert set(got) == {"a.dng", "in.dng", "out.dng"}
    assert got["a.dng"].reason is None and got["in.dng"].reason is None
    if follow:
        assert got["out.dng"].reason is None
    else:
        assert "symbolic link" in got["out.dng"].reason and "follow_symlinks" in got["out.dng"].reason


def test_a_symlink_to_a_watched_frame_does_not_stack_it_twice(make_daemon, daemon_night):
    """latest.dng -> a.dng (a capture script's link to the last frame): the watcher read the frame through the
    link as well as under its own name, and the stack counted it twice.  The link is recorded failed, naming the
    frame it leads to; after a restart too, the frame is stacked once."""
    d = make_daemon()
    a, b = daemon_night[0][:2]
    shutil.copy(a, d.watch / "a.dng")
    (d.watch / "latest.dng").symlink_to(d.watch / "a.dng")
    d.start()
    recs = {r["path"]: r for r in d.wait_lines(2)}
    assert set(recs) == {"a.dng", "latest.dng"}
    assert recs["a.dng"]["status"] == "reference"
    assert recs["latest.dng"]["status"] == "failed" and "a.dng" in recs["latest.dng"]["reason"]
    assert d.stop() == 0
    shutil.copy(b, d.watch / "b.dng")
    d.start()
    assert sorted(r["path"] for r in d.wait_lines(3)) == ["a.dng", "b.dng", "latest.dng"]
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text()


def test_a_symlink_loop_is_failed_at_timeout_not_kept_waiting(tmp_path):
    """stat() of a link to itself says ELOOP: the watcher kept it pending (and the page "1 queued") for ever."""
    from livestack.daemon.config import WatchParams

    root = tmp_path / "watch"
    root.mkdir()
    # made while the watcher runs: its creation event tracks it (a scan passes it by: not a file)
    later = threading.Timer(0.5, lambda: (root / "loop.dng").symlink_to(root / "loop.dng"))
    later.start()
    got = run_watcher(root, WatchParams(settle_s=0.1, timeout_s=1.0, rescan_s=0.5), 1, timeout=6.0)
    later.join()
    assert got and got[0].rel == "loop.dng" and got[0].reason.startswith("unreadable after 1 s"), got


def test_follow_symlinks_is_a_watch_setting(tmp_path):
    from livestack.config import load_config
    from livestack.daemon.config import shell_sections

    p = tmp_path / "livestack.toml"
    p.write_text("[watch]\nfollow_symlinks = true\n")
    assert shell_sections(load_config(p))[0].follow_symlinks is True
    assert shell_sections(load_config(None))[0].follow_symlinks is False


# ---------------------------------------------------------------- 6. a file that keeps growing

def test_a_file_still_growing_is_failed_at_timeout(tmp_path, daemon_night):
    from livestack.daemon.config import WatchParams

    root = tmp_path / "watch"
    root.mkdir()
    stop = threading.Event()
    target = root / "growing.dng"
    head = daemon_night[0][0].read_bytes()[:4096]

    def writer():                                  # appends every 50 ms for up to 8 s
        with open(target, "wb") as f:
            f.write(head)
            for _ in range(160):
                if stop.wait(0.05):
                    return
                f.write(b"\0" * 1000)
                f.flush()

    t = threading.Thread(target=writer)
    t.start()
    t0 = time.monotonic()
    try:
        got = run_watcher(root, WatchParams(settle_s=0.2, timeout_s=1.0, rescan_s=0.5), 1, timeout=6.0)
        waited = time.monotonic() - t0
        still_writing = t.is_alive()
    finally:
        stop.set()
        t.join()
    assert got and got[0].rel == "growing.dng", got
    assert got[0].reason.startswith("still incomplete after 1 s") and "being written" in got[0].reason
    assert still_writing and waited < 2.5, waited


# ---------------------------------------------------------------- 7. SIGHUP

def test_sighup_is_a_clean_stop(make_daemon, daemon_night):
    files = daemon_night[0][:3]
    d = make_daemon(checkpoint_every=100)
    d.feeder(files)(3)
    d.start()
    d.wait_lines(3)
    assert d.stop(signal.SIGHUP) == 0
    log = d.log.read_text()
    assert "SIGHUP received" in log and "stopped;" in log, log
    assert read_stack(d.out)[2]["NCOMBINE"] == 3
    assert (d.out / "session" / "checkpoint.npz").is_file()


def test_quiet_run_keeps_the_milestones_not_the_frames(make_daemon, daemon_night):
    """-q: the session's milestones (NOTICE: started, the page, the solver off by choice, a signal,
    stopped) and problems only."""
    d = make_daemon("-q", checkpoint_every=100)
    d.feeder(daemon_night[0][:2])(2)
    d.start()
    d.wait_lines(2)
    assert d.stop() == 0
    lines = d.log.read_text().splitlines()
    notices = [line.split(" NOTICE ", 1)[1] for line in lines if " NOTICE " in line]
    said = [n.split(";")[0].split(" at ")[0] for n in notices]
    assert said[0] == "livestack: new session" and said[-2:] == [          # the page and the reference: any order
        "livestack: SIGTERM received: finishing the current frame", "livestack: stopped"], lines
    assert sorted(said[1:-2]) == ["livestack: page", "livestack: plate solving is off ([solve] enabled = false)"]
    assert not [line for line in lines if " INFO " in line or " WARNING " in line], lines


# ---------------------------------------------------------------- 8. one log line per message

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_odd_file_names_and_libraw_messages_stay_on_one_line(make_daemon, daemon_night):
    files = daemon_night[0][:2]
    d = make_daemon()
    feed = d.feeder(files)
    feed(2)
    junk = np.random.default_rng(0).bytes(6000)
    (d.watch / "bad\nname.dng").write_bytes(junk)
    (d.watch / "odd.cr2").write_bytes(junk)
    d.start()
    recs = d.wait_lines(4)
    time.sleep(0.3)
    assert d.stop() == 0
    log = d.log.read_text()
    lines = [x for x in log.splitlines() if x.strip()]
    assert all(LOG_LINE.match(x) for x in lines), log            # no message split over two lines
    assert "bad\\nname.dng" in log, log
    assert "b'" not in log, log
    assert not [x for x in lines if "File format not recognized" in x and ".cr2" not in x and ".dng" not in x]
    by = {r["file"]: r for r in recs}
    assert by["odd.cr2"]["status"] == "failed" and "b'" not in by["odd.cr2"]["reason"], by["odd.cr2"]
    assert "Unsupported file format" in by["odd.cr2"]["reason"]


def test_file_names_beyond_ascii_and_utf8_are_stacked_and_resumed(make_daemon, daemon_night):
    """Andromède (UTF-8) as the reference — its FITS card escaped —, and a name with a byte that is not UTF-8 (a
    FAT card's Latin-1 é: Python holds a lone surrogate, which UTF-8 JSON and rawpy could not take: the worker
    died on it at every start)."""
    files = daemon_night[0][:3]
    d = make_daemon(checkpoint_every=100)
    names = [b"Androm\xc3\xa8de_0000.dng", b"light_\xe9t\xe9_0001.dng", b"light_0002.dng"]
    for f, name in zip(files, names):
        shutil.copy(f, os.fsencode(d.watch) + b"/" + name)
    d.start()
    recs = d.wait_lines(3)
    assert d.stop() == 0
    assert [r["file"] for r in recs] == [os.fsdecode(n) for n in names]
    assert [r["status"] for r in recs] == ["reference", "stacked", "stacked"], recs
    assert read_stack(d.out)[2]["REFFRAME"] == "Androm\\xe8de_0000.dng"
    d.start()                 # resumed: every file known by its name, none stacked twice
    time.sleep(1.0)
    assert d.stop() == 0
    assert len(d.lines()) == 3 and read_stack(d.out)[2]["NCOMBINE"] == 3


def test_exifread_complaints_name_the_file(tmp_path, caplog):
    import logging

    from livestack.engine.read import capture_time

    p = tmp_path / "odd.cr2"
    p.write_bytes(np.random.default_rng(0).bytes(6000))
    # (the livestack logger's own level too: an in-process `livestack run` earlier in the session sets it)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="livestack"):
        assert capture_time(p) is None
    assert not [r for r in caplog.records if r.name == "exifread"]
    assert [r for r in caplog.records if "odd.cr2" in r.getMessage()], caplog.records
