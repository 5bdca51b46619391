"""drivers.capture.common and the sim driver: names, folders, atomic writes, retry, stop."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from drivers.atomic import atomic_write
from drivers.capture.common import (CALIB_DIRS, Backoff, CapturePlan, Stop, StopRequested, clean_stale_temps, frame_folder, frame_name, next_index, retry,
                                    sniff_extension)
from drivers.simulator.write import CALIB_DIRS as SIMULATOR_CALIB_DIRS

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          **kw)


# ---------------------------------------------------------------- names and folders

def test_names_sort_in_capture_order_and_say_what_they_are():
    exposures = [60, 0.5, 300, 1e-3, 120]   # an exposure change mid-run must not reorder the files
    names = [frame_name("light", i, exposures[i % 5], ".fits", filter="L") for i in range(10000)]
    assert sorted(names) == names   # 10000 frames per folder: 28 h of 10 s frames
    assert names[3] == "light_0003_0.001s_L.fits" and names[5] == "light_0005_60s_L.fits"
    assert frame_name("dark", 7, 0.001, ".fits") == "dark_0007_0.001s.fits"
    assert frame_name("flat", 0, 2.5, ".fits", filter="H-alpha 7nm/2") == "flat_0000_2.5s_H-alpha7nm2.fits"
    assert frame_name("light", 42, 30, ".CR2", original="IMG_0042") == "light_0042_30s_IMG_0042.CR2"


def test_numbering_continues_after_existing_frames(tmp_path):
    assert next_index(tmp_path / "missing", "light") == 0
    for name in ("light_0000_60s.fits", "light_0007_30s_L.fits", "dark_0020_60s.fits", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert next_index(tmp_path, "light") == 8
    assert next_index(tmp_path, "dark") == 21
    assert next_index(tmp_path, "flat") == 0


def test_a_deleted_last_frame_number_is_not_used_again(tmp_path):
    """The last frame of a run is deleted (a bad one); the next run does not reuse its name, which the daemon,
    having handled that path already, would skip. The numbers used are kept in a hidden file, per kind."""
    args = ["-m", "drivers.capture.sim", "1", "--count", "3", "--width", "64", "--height", "48", "-q",
            "-o", str(tmp_path)]
    assert run(*args).returncode == 0
    (tmp_path / "light_0002_1s.fits").unlink()
    assert run(*args[:3], "--count", "1", *args[5:]).returncode == 0
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["light_0000_1s.fits", "light_0001_1s.fits", "light_0003_1s.fits"]
    for f in tmp_path.glob("light_*"):
        f.unlink()                                  # all of them gone: still no number used twice
    assert next_index(tmp_path, "light") == 4 and next_index(tmp_path, "dark") == 0
    assert [p.name for p in tmp_path.iterdir()] == [".livestack-capture-index"]
    (tmp_path / ".livestack-capture-index").write_text("{not json")   # unreadable: the files count, warned
    assert next_index(tmp_path, "light") == 0


def test_capture_sim_points_where_it_is_told_with_the_seeing_it_is_given(tmp_path):
    # `livestack capture sim` has the simulator's sky arguments: --pointing and --object go into the FITS
    # headers (a second target for `livestack run` to find), --fwhm sets the stars' width
    from astropy.io import fits

    r = run("-m", "drivers.capture.sim", "1", "--count", "1", "--width", "64", "--height", "48", "-q",
            "--pointing", "283.40", "33.03", "--object", "M 57", "--fwhm", "1.5", "--sky-seed", "22",
            "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    h = fits.getheader(tmp_path / "light_0000_1s.fits")
    assert (h["RA"], h["DEC"], h["OBJECT"]) == (283.40, 33.03, "M 57")
    r = run("-m", "drivers.capture.sim", "1", "--count", "1", "--fwhm", "0", "-o", str(tmp_path))
    assert r.returncode == 2 and "the stars' FWHM must be > 0 px" in r.stderr, r.stderr


def test_two_runs_into_one_folder_never_write_the_same_name(tmp_path):
    """Two capture runs writing into one folder at once (two cameras of a dual rig, a second run started by
    mistake): every frame keeps its own number (before: each run numbered from where the folder was when it
    started, and frames of one replaced the other's under the same name — 4 files left of 6 frames)."""
    args = [sys.executable, "-m", "drivers.capture.sim", "1", "--count", "3", "--interval", "0.3", "--width", "64",
            "--height", "48", "-q", "-o", str(tmp_path)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == [f"light_{i:04d}_1s.fits" for i in range(6)]


def test_calibration_folders_are_what_masters_reads(tmp_path):
    """bias/, darks/, flats/, darkflats/ under OUT (the simulator's --calib layout, which `livestack masters`
    reads); lights in OUT itself. Checked by capturing each type with the sim driver."""
    assert CALIB_DIRS == SIMULATOR_CALIB_DIRS
    assert frame_folder(tmp_path, "light") == tmp_path
    for kind, exposure in (("bias", "0"), ("dark", "60"), ("flat", "1.5"), ("darkflat", "1.5")):
        r = run("-m", "drivers.capture.sim", exposure, "--type", kind, "--count", "2", "--width", "64",
                "--height", "48", "-q", "-o", str(tmp_path))
        assert r.returncode == 0, r.stderr
    found = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("[!.]*") if p.is_file()}
    assert found == {"bias/bias_0000_0s.fits", "bias/bias_0001_0s.fits",
                     "darks/dark_0000_60s.fits", "darks/dark_0001_60s.fits",
                     "flats/flat_0000_1.5s.fits", "flats/flat_0001_1.5s.fits",
                     "darkflats/darkflat_0000_1.5s.fits", "darkflats/darkflat_0001_1.5s.fits"}
    h = fits.getheader(tmp_path / "darkflats" / "darkflat_0001_1.5s.fits")
    assert (h["IMAGETYP"], h["EXPTIME"]) == ("Dark Flat", 1.5)


def test_masters_builds_from_a_captured_calibration_run(tmp_path):
    help_text = run("-m", "livestack.cli", "--help").stdout
    if " masters" not in help_text:
        pytest.skip("`livestack masters` is not in this tree yet (livestack/masters_cli.py)")
    for kind, exposure in (("bias", "0"), ("dark", "60"), ("flat", "1"), ("darkflat", "1")):
        r = run("-m", "drivers.capture.sim", exposure, "--type", kind, "--count", "3", "--width", "96",
                "--height", "64", "-q", "-o", str(tmp_path / "calib"))
        assert r.returncode == 0, r.stderr
    r = run("-m", "livestack.cli", "masters", str(tmp_path / "calib"), "-o", str(tmp_path / "lib"), "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("4 masters in"), r.stdout   # bias, dark, dark-flat, flat: every folder found
    assert "skipped" not in r.stdout


# ---------------------------------------------------------------- atomic writes

WRITER = """
import sys, time
from pathlib import Path
from drivers.atomic import atomic_write
out, size = Path(sys.argv[1]), int(sys.argv[2])
for i in range(1000):
    def write(fh, i=i):
        for k in range(16):  # slowly, so that the kill lands mid-file most of the time
            fh.write(bytes([i % 251]) * (size // 16))
            time.sleep(0.002)
    atomic_write(out / f"light_{i:04d}_1s.fits", write)
"""


def test_a_killed_writer_leaves_only_complete_files(tmp_path):
    size = 1 << 20
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(size)], cwd=ROOT)
    try:
        end = time.monotonic() + 20
        while len(list(tmp_path.glob("light_*"))) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.017)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    visible = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(visible) >= 3
    for i, p in enumerate(visible):
        data = p.read_bytes()
        assert p.name == f"light_{i:04d}_1s.fits"
        assert len(data) == size and data == bytes([i % 251]) * size, p.name
    # what the kill left behind is hidden, and the next run clears it
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert all(n.endswith(f".{proc.pid}.tmp") for n in leftovers)
    assert sorted(p.name for p in clean_stale_temps(tmp_path)) == sorted(leftovers)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_write_leaves_no_temp_file_on_error(tmp_path):
    def failing(fh):
        fh.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.fits", failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "b.fits", b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["b.fits"]


# ---------------------------------------------------------------- retry and stop

class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.slept: list[float] = []

    def sleep(self, s):
        self.slept.append(s)
        self.t += s

    def __call__(self):
        return self.t


def test_retry_backs_off_and_logs_one_line_per_failure(caplog):
    clock, calls = FakeClock(), []

    def flaky():
        calls.append(clock.t)
        if len(calls) <= 4:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "frame"
    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        got = retry(flaky, what="INDI pi:7624 (frame 3)", backoff=Backoff(first=1, factor=2, cap=5),
                    retry_on=(OSError,), sleep=clock.sleep, clock=clock)
    assert got == "frame"
    assert clock.slept == [1, 2, 4, 5]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0] == ("INDI pi:7624 (frame 3): ConnectionResetError: [Errno 104] Connection reset by peer; "
                        "retrying in 1 s")


def test_retry_gives_up_after_the_limit_and_lets_other_errors_through():
    """--retry-for 20 means tries for 20 s: the last wait is cut to end at 20 s, that try is made, then it gives
    up (before: it gave up at 15 s, because the next wait, 8 s, would have passed 20)."""
    clock, tries = FakeClock(), []

    def down():
        tries.append(clock.t)
        raise ConnectionRefusedError("refused")
    with pytest.raises(ConnectionRefusedError):
        retry(down, what="x", backoff=Backoff(first=1, cap=8, give_up=20), retry_on=(OSError,),
              sleep=clock.sleep, clock=clock)
    assert clock.slept == [1, 2, 4, 8, 5] and tries == [0, 1, 3, 7, 15, 20]

    def bug():
        raise KeyError("not retried")
    with pytest.raises(KeyError):
        retry(bug, what="x", backoff=Backoff(), retry_on=(OSError,), sleep=clock.sleep, clock=clock)


def test_the_line_that_ends_a_given_up_run_names_the_server_or_camera(tmp_path, capsys, monkeypatch):
    """After --retry-for the run's last line (the journal's, under systemd) says what was lost and for how long
    (before: 'capture indi: gave up: [Errno 111] Connection refused', naming neither the server nor the frame)."""
    from drivers.capture.common import run_capture, run_plan

    def take(index):
        return retry(lambda: (_ for _ in ()).throw(ConnectionRefusedError(111, "Connection refused")),
                     what=f"INDI pi:7624 (frame {index})", backoff=Backoff(first=0.01, give_up=0.05),
                     retry_on=(OSError,))
    plan = CapturePlan(exposure=1, count=1, out=tmp_path)
    monkeypatch.setattr(Stop, "install_signals", lambda self: None)    # pytest's own Ctrl-C handling stays
    assert run_capture("indi", plan, lambda stop: run_plan(plan, take, stop),
                       gave_up=lambda err: isinstance(err, OSError)) == 1
    assert capsys.readouterr().err == ("capture indi: gave up after 0 s: INDI pi:7624 (frame 0): "
                                       "ConnectionRefusedError: [Errno 111] Connection refused\n")


def test_a_stop_during_back_off_ends_the_wait():
    stop = Stop()
    stop.stop()
    t0 = time.monotonic()
    with pytest.raises(StopRequested):
        retry(lambda: (_ for _ in ()).throw(OSError("gone")), what="x", backoff=Backoff(first=30),
              retry_on=(OSError,), stop=stop)
    assert time.monotonic() - t0 < 1


def test_a_stop_while_waiting_to_retry_says_what_was_not_done(tmp_path, caplog):
    """SIGTERM while the server is down: the run ends with a line saying which frame was not taken and why it
    was waiting (before: 'WARNING INDI pi:7624 (frame 2)', and nothing else); the same for a frame waiting for
    disk space (before: two lines, the second one the folder's name alone)."""
    import errno

    from drivers.capture.common import run_plan, write_frame

    stop = Stop()

    def take(index):
        if index == 0:
            return tmp_path / "light_0000_1s.fits"
        stop.stop()      # SIGTERM, during the back-off
        return retry(lambda: (_ for _ in ()).throw(ConnectionRefusedError(111, "Connection refused")),
                     what=f"INDI pi:7624 (frame {index})", backoff=Backoff(first=30), retry_on=(OSError,), stop=stop)
    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        assert len(run_plan(CapturePlan(exposure=1, count=3, out=tmp_path), take, stop)) == 1
    assert [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()] == [
        "INDI pi:7624 (frame 1): stopped while waiting to try again (ConnectionRefusedError: [Errno 111] "
        "Connection refused)"]
    caplog.clear()
    path = tmp_path / "light_0002_1s.fits"
    full = OSError(errno.ENOSPC, "No space left on device")
    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        with pytest.raises(StopRequested) as e:
            write_frame(path, lambda w=_failing_writes([full] * 3): w(path), stop=stop, give_up=600)
    assert str(e.value) == f"stopped while waiting for space: {path} not written"


def _failing_writes(errors):
    """A write function that raises the given OSErrors, one per call, then writes."""
    errors = list(errors)

    def write(path, *args):
        if errors:
            raise errors.pop(0)
        Path(path).write_bytes(b"frame")
    return write


def test_a_run_that_stops_without_a_frame_says_why(tmp_path, caplog):
    """A stop while the cooler worked ended with '0 frame(s)' and nothing saying why."""
    from drivers.capture.common import run_plan

    def take(index):
        raise StopRequested("Fake CCD: stopped while cooling (at -1.5 °C)")

    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        assert run_plan(CapturePlan(exposure=10.0, count=3, out=tmp_path), take, Stop()) == []
    assert [r.getMessage() for r in caplog.records] == ["Fake CCD: stopped while cooling (at -1.5 °C)"]


def test_a_full_disk_keeps_the_frame_and_retries_its_write_only(caplog):
    """ENOSPC: the frame in hand waits for space (one line per try) and is written once there is some; after
    give_up s, or at once for an unwritable folder, one CaptureError naming the file and the reason."""
    import errno
    import tempfile

    from drivers.capture.common import CaptureError, write_frame

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "light_0003_60s.fits"
        full = OSError(errno.ENOSPC, "No space left on device")
        with caplog.at_level(logging.WARNING, logger="drivers.capture"):
            got = write_frame(path, lambda w=_failing_writes([full]): w(path), stop=Stop(), give_up=600)
        assert got == path and path.read_bytes() == b"frame"
        assert [r.getMessage() for r in caplog.records] == [
            f"{d}: cannot write light_0003_60s.fits: No space left on device (ENOSPC); retrying in 1 s"]
        with pytest.raises(CaptureError) as e:
            write_frame(path, lambda w=_failing_writes([full] * 9): w(path), stop=Stop(), give_up=0)
        assert str(e.value) == f"cannot write {path}: No space left on device (ENOSPC)"
        denied = PermissionError(errno.EACCES, "Permission denied")
        t0 = time.monotonic()
        with pytest.raises(CaptureError) as e:
            write_frame(path, lambda w=_failing_writes([denied]): w(path), stop=Stop(), give_up=600)
        assert str(e.value) == f"cannot write {path}: Permission denied (EACCES)" and time.monotonic() - t0 < 1


def test_sim_driver_into_an_unwritable_folder_stops_with_one_line(tmp_path, monkeypatch):
    """The review's repro showed a raw traceback: it is now a CaptureError (exit 1, one line) naming the file."""
    import errno

    import drivers.simulator
    from drivers.capture import sim
    from drivers.capture.common import CaptureError

    monkeypatch.setattr(drivers.simulator, "write_fits",
                        _failing_writes([PermissionError(errno.EACCES, "Permission denied")]))
    plan = CapturePlan(exposure=1, count=2, out=tmp_path)
    with pytest.raises(CaptureError, match=r"cannot write .*light_0000_1s.fits: Permission denied \(EACCES\)"):
        sim.capture(plan, drivers.simulator.SimConfig(width=64, height=48), Stop())
    r = run("-m", "drivers.capture.sim", "1", "--count", "1", "-o", "/proc/livestack-nowhere")
    assert r.returncode == 1 and r.stderr.startswith("capture sim: cannot create /proc/livestack-nowhere: "), r.stderr
    assert "Traceback" not in r.stderr


def test_an_unwritable_folder_is_said_before_the_camera_is_touched(tmp_path, monkeypatch):
    """A read-only or foreign folder (root ignores permissions: the refusal is simulated): one line naming the
    folder, before the first take() (before: the camera was set up, cooled and exposed for a whole frame, and
    only the write of that frame said the folder was not writable); a full disk is not refused there."""
    import errno

    from drivers.capture import common
    from drivers.capture.common import CaptureError, run_plan

    def refuse(err):
        def write(path, data):
            if path.name == ".livestack-write-check":
                raise err
            return atomic_write(path, data)
        return write
    taken = []
    plan = CapturePlan(exposure=300, count=2, out=tmp_path)
    monkeypatch.setattr(common, "atomic_write", refuse(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(CaptureError) as e:
        run_plan(plan, taken.append, Stop())
    assert str(e.value) == f"cannot write in {tmp_path}: Read-only file system (EROFS)" and taken == []
    monkeypatch.setattr(common, "atomic_write", refuse(OSError(errno.ENOSPC, "No space left on device")))
    assert len(run_plan(plan, lambda i: taken.append(i) or tmp_path / f"light_{i:04d}_300s.fits", Stop())) == 2
    assert taken == [0, 1] and not [f for f in tmp_path.iterdir() if "write-check" in f.name]


def test_a_folder_removed_mid_night_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """The watched folder deleted between frames (by hand, a clean-up script, a USB disk unmounted): one line
    naming the folder and the reason, exit 1 (before: numbering the next frame raised FileNotFoundError — a
    traceback from the sim driver, 'gave up' as if the camera had gone from INDI and gphoto2)."""
    import shutil

    from drivers.capture.common import run_capture, run_plan

    out = tmp_path / "lights"

    def take(index):
        path = out / f"light_{index:04d}_1s.fits"
        atomic_write(path, b"frame")
        shutil.rmtree(out)
        return path
    plan = CapturePlan(exposure=1, count=3, out=out)
    monkeypatch.setattr(Stop, "install_signals", lambda self: None)    # pytest's own Ctrl-C handling stays
    assert run_capture("sim", plan, lambda stop: run_plan(plan, take, stop)) == 1
    assert capsys.readouterr().err == f"capture sim: cannot write in {out}: No such file or directory (ENOENT)\n"


def test_sigterm_finishes_the_frame_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "drivers.capture.sim", "30", "--interval", "0.2",
                             "--width", "320", "--height", "240", "-o", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while len(list(tmp_path.glob("light_*.fits"))) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 3
    assert "SIGTERM: finishing the current exposure" in err
    files = sorted(f for f in tmp_path.iterdir() if f.name != ".livestack-capture-index")
    assert files and all(not f.name.startswith(".") for f in files)   # no temporary file left
    for i, f in enumerate(files):
        assert f.name == f"light_{i:04d}_30s.fits"
        assert fits.getdata(f).shape == (240, 320)


def test_sim_driver_frames_stack_and_resume_numbering(tmp_path):
    args = ["-m", "livestack.cli", "capture", "sim", "60", "--count", "3", "--width", "480", "--height", "360",
            "--format", "dng", "--gain", "200", "-o", str(tmp_path / "in")]
    assert run(*args).returncode == 0
    assert run(*args).returncode == 0   # a second run appends 0003..0005 and continues the drift
    names = sorted(p.name for p in (tmp_path / "in").iterdir() if not p.name.startswith("."))
    assert names == [f"light_{i:04d}_60s.dng" for i in range(6)]
    r = run("-m", "livestack.cli", "stack", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q", "--no-solve")
    assert r.returncode == 0 and r.stdout.startswith("6 stacked, 0 rejected, 0 failed of 6"), r.stdout + r.stderr


def test_plan_refuses_nonsense():
    with pytest.raises(ValueError, match="--count 0"):
        CapturePlan(exposure=1, count=0)
    with pytest.raises(ValueError, match="--type"):
        CapturePlan(exposure=1, kind="science")
    r = run("-m", "drivers.capture.sim", "1", "--count", "0", "-o", "/nonexistent")
    assert r.returncode == 2 and "--count 0" in r.stderr


@pytest.mark.parametrize("driver, args, said", [
    ("sim", ["nan"], "exposure nan s: must be"),
    ("sim", ["inf"], "exposure inf s: must be"),
    ("sim", ["1", "--interval", "nan"], "--interval nan s: must be"),
    ("sim", ["1", "--retry-for", "-5"], "--retry-for -5 s: must be"),
    ("sim", ["1", "--retry-for", "nan"], "--retry-for nan s: must be"),
    ("indi", ["1", "--download-timeout", "-1"], "--download-timeout -1 s: must be"),
    ("indi", ["1", "--temp-timeout", "nan"], "--temp-timeout nan s: must be"),
    ("indi", ["1", "--temperature", "nan"], "--temperature nan °C: must be"),
    ("sim", ["1", "--gain", "nan"], "gain nan: must be a finite number"),     # was a ValueError traceback
    ("sim", ["1", "--gain", "inf"], "gain inf: must be a finite number"),     # an OverflowError traceback
    ("indi", ["1", "--gain", "nan"], "gain nan: must be a finite number"),    # the camera asked, then exit 1
    ("gphoto2", ["1", "--iso", "nan"], "gain nan: must be a finite number"),
])
def test_a_number_that_cannot_be_one_is_a_usage_error(tmp_path, driver, args, said):
    """NaN and infinity parse as floats: an exposure of 'nan' or 'inf' went on to the simulator (a numpy
    traceback, exit 1), a NaN interval or --retry-for was taken silently (no pause; no retry at all). Each is
    one line naming the option, exit 2, before any camera is touched or folder made."""
    port = ["--port", "1"] if driver == "indi" else []        # nothing listens there: not asked
    r = run("-m", "livestack.cli", "capture", driver, *args, "--count", "1", *port, "-o", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"capture {driver}: ") and said in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("head, camera_ext, want", [
    (b"II*\x00\x08\x00\x00\x00", ".JPG", ".dng"),          # the virtual camera: DNG under a .JPG name
    (b"MM\x00*\x00\x00\x00\x08", ".jpg", ".dng"),
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", ".CR2", ".CR2"),  # a real raw keeps the camera's extension
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", ".JPG", ".cr2"),
    (b"II*\x00\x08\x00\x00\x00", ".NEF", ".NEF"),
    (b"\x00\x00\x00\x18ftypcrx \x00\x00", ".CR3", ".CR3"),
    (b"\xff\xd8\xff\xe1\x00\x10Exif", ".JPG", ".JPG"),
    (b"SIMPLE  =                    T", ".fit", ".fit"),
    (b"unknown bytes...", ".ARW", ".ARW"),
])
def test_file_type_comes_from_the_bytes(head, camera_ext, want):
    assert sniff_extension(head + b"\x00" * 64, camera_ext) == want


def test_a_filter_wheel_night_gets_each_filter_its_own_flat(tmp_path):
    """The sim driver turns a wheel (L, Ha: Ha 3× longer); flats through each filter become one master flat per
    filter, and `livestack stack` calibrates every light with its own filter's flat and says so."""
    calib, lights = tmp_path / "calib", tmp_path / "lights"
    common = ("--mono", "--width", "640", "--height", "480", "-q")
    for kind, exposure, extra in (("bias", "0", ()), ("dark", "60", ()), ("dark", "180", ()),
                                  ("flat", "1", ("--filters", "L,Ha")), ("darkflat", "1", ())):
        r = run("-m", "drivers.capture.sim", exposure, "--type", kind, "--count", "4", *common, *extra,
                "-o", str(calib))
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (calib / "flats").glob("[!.]*")) == [
        "flat_0000_1s_L.fits", "flat_0001_1s_Ha.fits", "flat_0002_1s_L.fits", "flat_0003_1s_Ha.fits"]
    r = run("-m", "livestack.cli", "masters", str(calib), "-o", str(tmp_path / "lib"), "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("-m", "drivers.capture.sim", "60", "--count", "4", "--filters", "L,Ha", *common, "-o", str(lights))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in lights.glob("[!.]*")) == [
        "light_0000_60s_L.fits", "light_0001_180s_Ha.fits", "light_0002_60s_L.fits", "light_0003_180s_Ha.fits"]
    r = run("-m", "livestack.cli", "stack", str(lights), "-o", str(tmp_path / "out"), "--masters",
            str(tmp_path / "lib"), "-q", "--no-solve")
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    recs = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["reference", "stacked", "stacked", "stacked"], [r["reason"] for r in recs]
    for rec in recs:
        flat = rec["calibration"]["flat"]
        assert f"_{rec['filter']}_" in flat, (rec["file"], flat)
        assert rec["calibration"]["dark"].startswith("dark_180s" if rec["filter"] == "Ha" else "dark_60s")
    assert (tmp_path / "out" / "stack_L.fits").exists() and (tmp_path / "out" / "stack_Ha.fits").exists()
