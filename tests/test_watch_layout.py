"""A file whose own layout shows a whole image is read after [watch] settle_complete_s, not the full settle_s:
the page shows a live frame sooner; a file the layout cannot vouch for still waits the full settle time."""
from __future__ import annotations

import os
import queue
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.daemon.config import WatchParams
from livestack.daemon.watch import Watcher, layout


def _first_ready(root: Path, wp: WatchParams, drop, timeout: float = 10.0) -> tuple[float, object]:
    """Seconds from ``drop()`` (which puts the file in place) to the watcher's Ready for it."""
    q: queue.Queue = queue.Queue()
    w = Watcher(root, wp, q)
    w.start()
    try:
        t0 = time.monotonic()
        drop()
        item = q.get(timeout=timeout)
        return time.monotonic() - t0, item
    finally:
        w.stop()


WP = WatchParams(settle_s=2.0, settle_complete_s=0.2, timeout_s=30.0, rescan_s=0.5)


def _collect(q: queue.Queue, want: set[str], *, at_least: float = 0.0, at_most: float) -> set[str]:
    """The paths handed on: until all of ``want`` have come (a loaded machine takes its time) and ``at_least``
    seconds have passed (what must not come would come as soon as they do), ``at_most`` seconds in all."""
    got, t0 = set(), time.monotonic()
    while (not want <= got or time.monotonic() < t0 + at_least) and time.monotonic() < t0 + at_most:
        try:
            got.add(q.get(timeout=0.2).rel)
        except queue.Empty:
            pass
    return got


def test_a_complete_fits_is_read_after_the_short_settle(tmp_path):
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(src)
    assert layout(src) == (True, None)
    (tmp_path / "watch").mkdir()
    dt, item = _first_ready(tmp_path / "watch", WP, lambda: shutil.copy(src, tmp_path / "watch" / "a.fits"))
    assert item.reason is None and dt < 1.2, dt


def test_a_complete_dng_is_read_after_the_short_settle(tmp_path, daemon_night):
    src = daemon_night[0][0]
    assert layout(src) == (True, None)
    (tmp_path / "watch").mkdir()
    dt, item = _first_ready(tmp_path / "watch", WP, lambda: shutil.copy(src, tmp_path / "watch" / src.name))
    assert item.reason is None and dt < 1.2, dt


def test_what_the_layout_cannot_vouch_for_waits_the_full_settle(tmp_path):
    """A FITS whose primary HDU has no data (its image extension may still come) and a file of a format the
    layout cannot read (CR3-like) wait settle_s."""
    empty = tmp_path / "empty.fits"
    fits.PrimaryHDU().writeto(empty)
    assert layout(empty) == (False, None)
    other = tmp_path / "x.cr3"
    other.write_bytes(b"\0\0\0\x18ftypcrx " + bytes(5000))
    assert layout(other) == (False, None)
    for src in (empty, other):
        watch = tmp_path / f"watch-{src.suffix[1:]}"
        watch.mkdir()
        dt, _ = _first_ready(watch, WP, lambda s=src, w=watch: shutil.copy(s, w / s.name))
        assert dt >= 1.9, (src.name, dt)


def test_a_fits_cut_short_is_not_read_early(tmp_path):
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((256, 256), np.uint16)).writeto(src)
    data = src.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[: len(data) // 2])
    ok, why = layout(cut)
    assert not ok and why.startswith("FITS data")
    watch = tmp_path / "watch"
    watch.mkdir()

    def drop():
        (watch / "a.fits").write_bytes(data[: len(data) // 2])      # half of it, then the rest 1 s later
        time.sleep(1.0)
        with open(watch / "a.fits", "ab") as f:
            f.write(data[len(data) // 2:])

    dt, item = _first_ready(watch, WP, drop)
    assert item.reason is None and dt >= 1.0       # taken only once whole
    assert (watch / "a.fits").stat().st_size == len(data)


def test_a_whole_frame_renamed_into_place_is_read_at_once(tmp_path, daemon_night):
    """Written under a hidden name, then moved in (what capture programs do): no settle time when the layout is
    whole; the same file copied in place still waits settle_complete_s."""
    src = daemon_night[0][0]
    wp = WatchParams(settle_s=6.0, settle_complete_s=3.0, timeout_s=30.0, rescan_s=0.5)
    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copy(src, watch / f".{src.name}.part")
    dt, item = _first_ready(watch, wp, lambda: (watch / f".{src.name}.part").rename(watch / src.name))
    assert item.reason is None and dt < 1.0, dt
    slow = tmp_path / "watch2"
    slow.mkdir()
    dt, _ = _first_ready(slow, wp, lambda: shutil.copy(src, slow / src.name))
    assert dt >= 2.9, dt


def test_a_cut_frame_renamed_into_place_still_waits(tmp_path):
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((256, 256), np.uint16)).writeto(src)
    data = src.read_bytes()
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / ".a.part").write_bytes(data[: len(data) // 2])
    wp = WatchParams(settle_s=1.0, settle_complete_s=0.2, timeout_s=3.0, rescan_s=0.5)
    dt, item = _first_ready(watch, wp, lambda: (watch / ".a.part").rename(watch / "a.fits"))
    assert dt >= 2.9 and item.reason is not None and "FITS data" in item.reason, (dt, item)


def test_a_garbled_naxis_is_judged_at_once(tmp_path):
    """NAXIS = 999999999 (a garbled card; the standard allows 999): the layout walked that many axes in Python,
    in the watcher's thread — minutes a call, and no other file handled meanwhile."""
    src = tmp_path / "garbled.fits"
    fits.PrimaryHDU(np.zeros((16, 16), np.uint16)).writeto(src)
    data = bytearray(src.read_bytes())
    i = data.index(b"NAXIS   =")
    data[i:i + 80] = b"NAXIS   = 999999999".ljust(80)
    src.write_bytes(bytes(data))
    t0 = time.monotonic()
    assert layout(src) == (False, None)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("card", [b"NAXIS1  =                -3000", b"NAXIS   = 999999999"])
def test_a_damaged_fits_header_holds_up_no_other_frame(tmp_path, card):
    """NAXIS1 = -3000 (a garbled card) makes the data length negative: the layout, and astropy after it, found
    the next HDU where that one starts — the same header again, for ever; NAXIS = 999999999 made astropy build a
    shape of a billion axes (minutes) when the watcher sorted the file by its DATE-OBS.  The watcher's thread
    spun, no frame of the night was handed on, not a line in the log.  The file is handed on, the frame beside it
    too, and the reader refuses it in one line."""
    import threading

    from livestack.engine.frame import FrameError
    from livestack.engine.read import read_frame

    src = tmp_path / "garbled.fits"
    fits.PrimaryHDU(np.zeros((1, 16), np.uint8)).writeto(src)
    data = bytearray(src.read_bytes())
    i = data.index(card[:9])
    data[i:i + 80] = card.ljust(80)
    src.write_bytes(bytes(data))
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(good)
    watch = tmp_path / "watch"
    watch.mkdir()
    q: queue.Queue = queue.Queue()
    w = Watcher(watch, WatchParams(settle_s=0.5, settle_complete_s=0.2, timeout_s=30.0, rescan_s=0.5), q)
    w.start()
    try:
        shutil.copy(src, watch / "a_garbled.fits")
        shutil.copy(good, watch / "b_good.fits")
        got = {q.get(timeout=5).rel, q.get(timeout=5).rel}
    finally:
        w.stop()
    assert got == {"a_garbled.fits", "b_good.fits"}
    err = []

    def read():
        try:
            read_frame(src)
        except FrameError as e:
            err.append(str(e))
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5.0)
    assert len(err) == 1 and "damaged FITS header" in err[0], err


def test_recursive_leaves_calibration_folders_to_the_masters(tmp_path):
    """`livestack capture --type dark -o OUT` writes OUT/darks/ beside the lights; a daemon watching OUT with
    --recursive stacked those darks (and flats) as lights — DSLR ones have no IMAGETYP to refuse them by.
    Folders whose name says calibration (as `livestack masters` reads names) are not watched; lights in any
    other subfolder are, whether there at the start or arriving later — a target's named like one ("Dark Shark
    Nebula") too: no light of it was stacked, and not a line said why."""
    import dataclasses

    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(src)
    root = tmp_path / "watch"
    early = ["M31/a.fits", "darks/d1.fits", "Flat_Fields/f1.fits", "night1/Offsets/b1.fits", "night1/lights/l1.fits"]
    late = ["M31/b.fits", "darkflats/df1.fits", "bias/b2.fits", "c.fits", "2026-11-29/Dark Shark Nebula/L/s1.fits",
            "Darks_300s_gain100_-10C/d2.fits"]
    for rel in early:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
    q: queue.Queue = queue.Queue()
    w = Watcher(root, dataclasses.replace(WP, recursive=True), q)
    w.start()
    try:
        time.sleep(0.3)
        for rel in late:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / rel)
        # until every light has come (a loaded machine takes its time), and for 3 s at least: a calibration
        # frame wrongly handed on would come as soon as they do
        want = {"M31/a.fits", "night1/lights/l1.fits", "M31/b.fits", "c.fits",
                "2026-11-29/Dark Shark Nebula/L/s1.fits"}
        got = _collect(q, want, at_least=3.0, at_most=30.0)
    finally:
        w.stop()
    assert got == want, got


def test_recursive_sees_nested_folders_made_at_once(tmp_path):
    """A capture program making date/target/filter folders in one `mkdir -p` while the daemon watches: watchdog
    (7.x) may add the new folders' watch twice and warn "Callback with id … already exists … It will be
    Overwritten" from its inotify thread — harmless, but under `-W error` (the tests' setting) that thread died
    and no later file was seen except by a rescan.  Every frame here is seen from its events alone (no rescan
    after the first), and the warning is silenced where it is raised."""
    import dataclasses

    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((16, 16), np.uint16)).writeto(src)
    root = tmp_path / "watch"
    root.mkdir()
    q: queue.Queue = queue.Queue()
    w = Watcher(root, dataclasses.replace(WP, recursive=True, rescan_s=3600.0), q)
    w.start()
    want = set()
    try:
        time.sleep(0.2)
        for i in range(25):
            rel = f"2026-11-{i:02d}/Target {i}/L/s{i}.fits"
            (root / rel).parent.mkdir(parents=True)
            shutil.copy(src, root / rel)
            want.add(rel)
            time.sleep(0.05)
        got = _collect(q, want, at_most=5.0)
    finally:
        w.stop()
    assert got == want, sorted(want - got)


@pytest.mark.parametrize("name, calibration", [
    ("darks", True), ("Darks_300s_gain100_-10C", True), ("Flat_Fields", True), ("flatframes", True),
    ("DarkFrames", True), ("BIAS", True), ("Offsets", True), ("darkflats", True), ("Flat-Darks", True),
    ("flatfield", True), ("zeros", True), ("Flats Halpha bin2", True),
    # one word that only begins like a kind: a target's folder, whose lights were left unwatched
    ("Flatiron", False), ("Darkhorse", False), ("DarkNebula", False), ("FLATIRON", False), ("Biased", False),
    ("Dark Shark Nebula", False), ("Flaming Star", False), ("lights", False), ("M31", False),
])
def test_a_folder_is_calibration_only_when_its_first_word_is_a_kind(name, calibration):
    """`--recursive` leaves calibration folders to `livestack masters`, by name; a target's folder whose one
    word begins like a kind ("Flatiron", "Darkhorse", a camel-cased "DarkNebula") was taken for one and its
    lights were never stacked, without a line."""
    from livestack.daemon.watch import calibration_folder

    assert calibration_folder(name) is calibration


def test_watchdogs_error_on_a_stop_amid_events_is_not_logged(tmp_path, caplog):
    """Stopping the daemon while files arrive made watchdog log "InotifyEmitter.queue_events() called when the
    thread is inactive" at ERROR: a line in the journal that reads like a fault at every such stop.  Once a
    watcher has started, that record is dropped; the same logger's other records still pass."""
    import logging

    w = Watcher(tmp_path, WP, queue.Queue())
    w.start()
    w.stop()
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.WARNING):
        inotify_log.error("InotifyEmitter.queue_events() called when the thread is inactive")
        inotify_log.warning("Inotify queue overflowed; reconciling recursive watches below %r", b"/x")
    assert [r.getMessage() for r in caplog.records] == [
        "Inotify queue overflowed; reconciling recursive watches below b'/x'"]


def test_a_file_given_up_while_it_is_handed_on_is_not_handed_on(tmp_path, monkeypatch):
    """"New stack" gives up the files still settling (settle_none: the old session's ignore list names them) and
    empties the queue.  One that completed while it did — found complete by the watcher's check, put on the queue
    just after — was stacked as the new session's frame although the old session's ignore list named it (a
    restart without a checkpoint then dropped it).  The window is held open here: settle_none() runs while the
    watcher orders the files it found complete."""
    from livestack.daemon import watch

    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(src)
    root = tmp_path / "watch"
    root.mkdir()
    q: queue.Queue = queue.Queue()
    w = Watcher(root, WatchParams(settle_s=0.5, settle_complete_s=0.1, timeout_s=30.0, rescan_s=0.5), q)
    given_up: list[set] = []
    real = watch.capture_order

    def ordering(paths):
        if not given_up:
            given_up.append(w.settle_none())      # the user's "new stack", at this moment
        return real(paths)

    monkeypatch.setattr(watch, "capture_order", ordering)
    w.start()
    try:
        shutil.copy(src, root / "a.fits")
        deadline = time.monotonic() + 10
        while not given_up and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.stop()                                      # (joins the watcher's thread: its put, if any, is done)
    assert given_up == [{"a.fits"}]
    assert q.empty(), q.get_nowait()


def test_a_folder_without_file_events_is_said_once(tmp_path, monkeypatch, caplog):
    """On a network mount (NFS, SMB) the kernel sends no file events: every frame waited for the next rescan (up
    to rescan_s, 10 s by default) and nothing said why.  A new file the rescan finds first, written seconds before,
    is said once; where events come, a file is never taken for one."""
    import logging
    import os

    from livestack.daemon import watch

    def run(root: Path, events: bool) -> list[str]:
        root.mkdir()
        shutil.copy(src, root / "there_before.fits")            # the first scan's: no event expected for it
        q: queue.Queue = queue.Queue()
        w = Watcher(root, WatchParams(settle_s=0.3, settle_complete_s=0.1, timeout_s=30.0, rescan_s=0.5), q)
        caplog.clear()
        with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="livestack"):
            if not events:
                mp.setattr(watch._Handler, "on_any_event", lambda self, event: None)
            w.start()
            try:
                time.sleep(0.3)
                for name in ("a.fits", "b.fits"):
                    shutil.copy(src, root / name)
                    past = time.time() - 5                          # written 5 s ago (a copy that keeps times)
                    os.utime(root / name, (past, past))
                got = _collect(q, {"there_before.fits", "a.fits", "b.fits"}, at_most=10.0)
            finally:
                w.stop()
        assert got == {"there_before.fits", "a.fits", "b.fits"}
        return [r.getMessage() for r in caplog.records if "not by a file event" in r.getMessage()]

    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((16, 16), np.uint16)).writeto(src)
    said = run(tmp_path / "mount", events=False)
    assert len(said) == 1 and "file events do not reach this folder" in said[0] and "rescan_s = 0.5 s" in said[0], said
    assert run(tmp_path / "local", events=True) == []


def test_a_new_file_under_a_known_name_is_said_not_passed_over(tmp_path, caplog):
    """Frames are known by their path: a night whose capture numbers its files from light_0000 again, in the
    folder emptied of the last night's, had every frame passed over and nothing said.  A file made (written or
    moved in) under a name the session has is said — a warning the first time, with what to do; a file only
    written to again is not."""
    import logging
    import os

    watch = tmp_path / "watch"
    watch.mkdir()
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(src)
    shutil.copy(src, watch / "old.fits")                     # last night's, still in the folder
    q: queue.Queue = queue.Queue()
    w = Watcher(watch, WP, q, known={"light_0000.fits", "light_0001.fits", "old.fits"})
    caplog.set_level(logging.INFO, logger="livestack")
    w.start()
    try:
        with open(watch / "old.fits", "ab") as f:            # written to again: no new frame
            f.write(b"\0" * 2880)
        os.utime(watch / "old.fits")
        shutil.copy(src, watch / "light_0000.fits")          # tonight's, under last night's names
        shutil.copy(src, tmp_path / "tmp.fits")
        os.replace(tmp_path / "tmp.fits", watch / "light_0001.fits")
        shutil.copy(src, watch / "light_0002.fits")          # a new name: stacked
        assert _collect(q, {"light_0002.fits"}, at_least=1.0, at_most=10.0) == {"light_0002.fits"}
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if "already has" in r.getMessage()]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    said = [r for r in caplog.records if "already has" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "INFO"], [r.getMessage() for r in said]
    assert said[0].getMessage().startswith("light_0000.fits is a new file under the name of a frame")
    assert "its own folder" in said[0].getMessage() and "light_0001.fits" in said[1].getMessage()
    assert not any("old.fits" in r.getMessage() for r in said)


def test_a_frame_put_back_is_not_said_to_be_a_new_file(tmp_path, caplog):
    """Stacked frames moved aside (to free a full card) and put back — as an exclusion refused while they are gone
    asks — were each warned as a new file under a known name, not stacked, "give each night its own folder".  A
    file whose modification time is older than when its name became known (`mv` keeps it) is that frame back:
    one info line; a new file under the name (written now) is still warned."""
    import logging
    import os

    watch, aside = tmp_path / "watch", tmp_path / "aside"
    watch.mkdir()
    aside.mkdir()
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((64, 64), np.uint16)).writeto(src)
    q: queue.Queue = queue.Queue()
    w = Watcher(watch, WP, q, known={"light_0000.fits"})      # the session's, from before this start
    caplog.set_level(logging.INFO, logger="livestack")
    w.start()
    try:
        shutil.copy(src, watch / "light_0001.fits")
        assert _collect(q, {"light_0001.fits"}, at_most=10.0) == {"light_0001.fits"}
        for name in ("light_0000.fits", "light_0001.fits"):  # moved aside and back: their times kept
            shutil.copy(src, aside / name)
            past = time.time() - 60
            os.utime(aside / name, (past, past))
            (watch / name).unlink(missing_ok=True)
            os.replace(aside / name, watch / name)
        time.sleep(0.5)                                      # (the events of those first: they stat the file)
        shutil.copy(src, tmp_path / "tmp.fits")
        os.replace(tmp_path / "tmp.fits", watch / "light_0001.fits")   # and then a new file under a known name
        deadline = time.monotonic() + 5
        while not any("already has" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        w.stop()
    said = [r.getMessage() for r in caplog.records if "already has" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("light_0001.fits is a new file"), said
    back = [r.getMessage() for r in caplog.records if "is back in the capture folder" in r.getMessage()]
    assert sorted(back) == ["light_0000.fits is back in the capture folder",
                            "light_0001.fits is back in the capture folder"], back
    assert q.empty()


def test_a_capture_disk_unplugged_and_back_is_said_and_watched_again(tmp_path, caplog):
    """The capture folder on a USB disk: unplugged (unmounted), the watcher said nothing the page could show and
    logged one line every rescan_s; plugged back, its file events still watched the folder gone, so frames came
    only with the rescan (up to rescan_s late) and a warning blamed a network mount.  Now problem() says it from the
    moment it is gone (one warning), and once it is back a new frame comes by its file event, at once."""
    import logging
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem to unplug needs root")
    disk = tmp_path / "usb"
    disk.mkdir()

    def plug() -> None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}")
        (disk / "captures").mkdir()

    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((16, 16), np.uint16)).writeto(src)
    plug()
    q: queue.Queue = queue.Queue()
    # rescans 60 s apart: a frame within seconds comes by its file event
    w = Watcher(disk / "captures", WatchParams(settle_s=0.3, settle_complete_s=0.1, timeout_s=30.0, rescan_s=60.0), q)
    caplog.set_level(logging.INFO, logger="livestack")
    w.start()
    try:
        shutil.copy(src, disk / "captures" / "a.fits")
        assert _collect(q, {"a.fits"}, at_most=10.0) == {"a.fits"}
        assert w.problem() is None

        subprocess.run(["umount", "-l", str(disk)], check=True)
        deadline = time.monotonic() + 5
        while w.problem() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        gone = w.problem()
        assert gone is not None and gone["since"], gone
        assert gone["error"].startswith(f"the capture folder {disk / 'captures'} is gone"), gone
        time.sleep(1.0)
        warned = [r for r in caplog.records if "is gone" in r.getMessage()]
        assert [r.levelname for r in warned] == ["WARNING"], [r.getMessage() for r in warned]

        plug()
        deadline = time.monotonic() + 5
        while w.problem() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.problem() is None
        shutil.copy(src, disk / "captures" / "b.fits")
        assert _collect(q, {"b.fits"}, at_most=5.0) == {"b.fits"}
    finally:
        w.stop()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    said = [r.getMessage() for r in caplog.records]
    assert any("is back" in m for m in said), said
    assert not any("not by a file event" in m for m in said), said


@pytest.mark.parametrize("recursive", [False, True])
def test_a_capture_folder_it_may_not_read_is_said(tmp_path, monkeypatch, caplog, recursive):
    """A capture folder livestack's user may not read (the capture program made it 0700): the page said idle all
    night and no frame came; the log had one line every rescan_s — with --recursive none (os.walk passes over
    what it cannot read).  Now problem() says it, one warning; once readable, its frames come.  (Simulated:
    root passes permissions.)"""
    import errno
    import logging

    root = tmp_path / "captures"
    root.mkdir()
    src = tmp_path / "light.fits"
    fits.PrimaryHDU(np.zeros((16, 16), np.uint16)).writeto(src)
    shutil.copy(src, root / "a.fits")
    denied = True
    real = os.scandir

    def scandir(path="."):
        if denied and os.fsdecode(path) == str(root):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    q: queue.Queue = queue.Queue()
    w = Watcher(root, WatchParams(settle_s=0.3, settle_complete_s=0.1, timeout_s=30.0, rescan_s=0.5,
                                  recursive=recursive), q)
    caplog.set_level(logging.INFO, logger="livestack")
    w.start()
    try:
        deadline = time.monotonic() + 5
        while w.problem() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        said = w.problem()
        assert said is not None and said["error"].startswith(f"cannot read the capture folder {root} (Permission "
                                                             "denied)"), said
        time.sleep(1.5)                                   # three rescans more: still one warning
        assert [r.levelname for r in caplog.records if "cannot read" in r.getMessage()] == ["WARNING"]
        denied = False
        assert _collect(q, {"a.fits"}, at_most=10.0) == {"a.fits"}
        assert w.problem() is None
    finally:
        w.stop()
    assert any("readable again" in r.getMessage() for r in caplog.records)
