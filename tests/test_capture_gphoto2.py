"""drivers.capture.gphoto through the PyPI gphoto2 wheel's virtual camera (VCAMERADIR): the real PTP
capture-download path, with simulator DNG frames that the camera serves under .JPG names."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import stack_with_cli
from drivers.capture.gphoto import parse_speed
from drivers.simulator import SimConfig, render_night

ROOT = Path(__file__).resolve().parents[1]
needs_gphoto2 = pytest.mark.skipif(importlib.util.find_spec("gphoto2") is None,
                                   reason="python-gphoto2 not installed (pip install gphoto2)")


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    """A virtual camera's card: simulator DNGs renamed IMG_000k.JPG (it lists only .jpg/.JPG names)."""
    d = tmp_path_factory.mktemp("vcamera")
    render_night(d, SimConfig(width=480, height=360, n_frames=3, fmt="dng", seed=5))
    (d / "truth.json").unlink()
    for i, f in enumerate(sorted(d.glob("*.dng"))):
        f.rename(d / f"IMG_{i + 1:04d}.JPG")
    return d


def run(card: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # a subprocess, so that VCAMERADIR is set before gphoto2 is first imported
    env = {**os.environ, "VCAMERADIR": str(card)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_gphoto2
def test_captured_frames_are_dngs_and_stack(card, tmp_path):
    out = tmp_path / "lights"
    n = 4
    r = run(card, "-m", "livestack.cli", "capture", "gphoto2", "1", "--count", str(n), "--iso", "800",
            "--delete-from-card", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "camera has no ISO control; ignoring --iso 800" in r.stderr   # the virtual camera has none
    files = sorted(out.glob("[!.]*"))
    assert len(files) == n
    served = (card / "IMG_0001.JPG").read_bytes()   # the virtual camera serves its first file every time
    for i, f in enumerate(files):
        # our prefix, then the camera's own name; the extension from the bytes (TIFF → .dng), not ".JPG"
        assert f.name.startswith(f"light_{i:04d}_1s_GPH_") and f.suffix == ".dng", f.name
        assert f.read_bytes() == served
    stack = tmp_path / "stack"
    records = stack_with_cli(out, stack)
    assert sorted(x["status"] for x in records) == ["reference"] + ["stacked"] * (n - 1)


@needs_gphoto2
def test_camera_gone_mid_run_is_retried_and_the_count_completed(card, tmp_path):
    """The virtual camera's card folder vanishes for 2 s (as a camera does on a USB glitch): the driver logs
    one line per failed try, re-opens the camera and takes the frame it missed."""
    out, n = tmp_path / "lights", 4
    away = card.with_name(card.name + "-away")
    env = {**os.environ, "VCAMERADIR": str(card)}
    proc = subprocess.Popen([sys.executable, "-m", "drivers.capture.gphoto", "1", "--count", str(n),
                             "--interval", "1", "-o", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while len(list(out.glob("*.dng"))) < 2:
            assert time.monotonic() < end and proc.poll() is None, "no frames before the glitch"
            time.sleep(0.02)
        card.rename(away)
        time.sleep(2)
        away.rename(card)
        _, err = proc.communicate(timeout=60)
    finally:
        if away.exists():
            away.rename(card)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert sorted(f.name[:13] for f in out.glob("[!.]*")) == [f"light_{i:04d}_1s" for i in range(n)]
    assert "camera (frame 2): " in err or "camera (frame 3): " in err, err
    assert "retrying in 1 s" in err


@needs_gphoto2
def test_bulb_refused_by_the_camera_is_one_clear_error(card, tmp_path):
    """The virtual camera's longest speed is 1 s and its `bulb` switch fails: a 5 s frame stops the run
    with a sentence (not a retry loop), and nothing is written."""
    r = run(card, "-m", "drivers.capture.gphoto", "5", "--count", "1", "-o", str(tmp_path))
    assert r.returncode == 1
    assert "the camera refused a bulb exposure" in r.stderr and "mode dial" in r.stderr
    assert [f.name for f in tmp_path.iterdir()] == [".livestack-capture-index"]   # the number claimed, no file


@needs_gphoto2
def test_unknown_port_is_a_usage_error(card, tmp_path):
    r = run(card, "-m", "drivers.capture.gphoto", "1", "--count", "1", "--camera-port", "usb:999,999",
            "-o", str(tmp_path))
    assert r.returncode == 1 and "--camera-port usb:999,999" in r.stderr, r.stderr


@pytest.mark.parametrize("text, seconds", [
    ("1/250", 0.004), ("30", 30.0), ("0.3", 0.3), ("1.0000s", 1.0), ("2\"5", 2.5), ("30s", 30.0),
    ("bulb", None), ("Bulb", None), ("Time", None), ("0", None),
])
def test_shutter_speed_choices_parse(text, seconds):
    got = parse_speed(text)
    assert got == seconds if seconds is None else abs(got - seconds) < 1e-9


@pytest.fixture
def fake_gp(monkeypatch):
    """The fake gphoto2 module (tests/fake_gphoto2.py) in place of the real one: a RAW+JPEG bulb camera."""
    import fake_gphoto2

    monkeypatch.setitem(sys.modules, "gphoto2", fake_gphoto2)
    monkeypatch.setattr(fake_gphoto2.Camera, "file_delay", 0.0)
    monkeypatch.setattr(fake_gphoto2.Camera, "config_failures", 0)
    monkeypatch.setattr(fake_gphoto2.Camera, "press_failures", [])
    monkeypatch.setattr(fake_gphoto2.Camera, "download_failures", [])
    monkeypatch.setattr(fake_gphoto2.Camera, "init_failures", [])
    fake_gphoto2.Camera.last = None
    return fake_gphoto2


def test_raw_plus_jpeg_bulb_frames_are_each_their_own_raw(fake_gp, tmp_path):
    """A camera set to RAW+JPEG announces two files per bulb frame: each frame is its own exposure's RAW,
    never the JPEG left over from the frame before (the review's repro: frame 1 was IMG_0001.JPG, and every
    other RAW was lost)."""
    from drivers.capture.common import CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    plan = CapturePlan(exposure=0.2, count=3, out=tmp_path)
    files = capture(plan, GphotoOptions(delete_from_card=True), Stop())
    assert [f.name for f in files] == [f"light_{i:04d}_0.2s_IMG_{i + 1:04d}.CR2" for i in range(3)]
    for i, f in enumerate(files):
        assert f.read_bytes().endswith(f"raw frame {i + 1}".encode())
    cam = fake_gp.Camera.last
    assert [x for x in cam.log if x.startswith("download")] == [f"download IMG_{i:04d}.CR2" for i in (1, 2, 3)]
    assert cam.card == {}     # --delete-from-card: the JPEGs too, not only the frames kept


def test_a_full_disk_keeps_the_frame_instead_of_taking_another(fake_gp, tmp_path, monkeypatch):
    """ENOSPC on writing a downloaded frame: that frame is written once there is space, and no exposure is taken
    and thrown away for it (before: the OSError was retried as a lost camera, with a new bulb exposure)."""
    import errno

    from drivers.capture import gphoto
    from drivers.capture.common import CapturePlan, Stop

    real, calls = gphoto.atomic_write, []

    def full_once(path, data):
        calls.append(path.name)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(gphoto, "atomic_write", full_once)
    files = gphoto.capture(CapturePlan(exposure=0.2, count=2, out=tmp_path), gphoto.GphotoOptions(), Stop())
    assert [f.name for f in files] == [f"light_{i:04d}_0.2s_IMG_{i + 1:04d}.CR2" for i in range(2)]
    assert fake_gp.Camera.last.log.count("set eosremoterelease=Press Full") == 2


def test_an_aborted_bulb_exposure_releases_the_shutter(fake_gp, tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt) in the middle of a bulb exposure: the shutter is released on the way
    out, not left open on the camera (before: pressed, then never released)."""
    import types

    from drivers.capture import gphoto
    from drivers.capture.common import CapturePlan, Stop

    def interrupted(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(gphoto, "time", types.SimpleNamespace(sleep=interrupted, monotonic=time.monotonic))
    cam = gphoto.GphotoCamera(gphoto.GphotoOptions(), CapturePlan(exposure=60, count=1, out=tmp_path), Stop())
    with pytest.raises(KeyboardInterrupt):
        cam.take(0)
    log = fake_gp.Camera.last.log
    assert log[-2:] == ["set eosremoterelease=Press Full", "set eosremoterelease=Release Full"], log


def test_a_frame_that_comes_late_after_noise_reduction_is_kept(fake_gp, tmp_path):
    """Long-exposure noise reduction (on by default on many Canons): after a bulb frame the camera takes a dark
    as long as the exposure, and the file comes only then. It is waited for and kept (before: the wait for the
    file ended 30 s after the release — here 0.5 s —, the frame was retried as a lost camera, a new exposure
    started, and the late file was dropped as the last frame's leftover, for every frame of the night)."""
    from drivers.capture.common import CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    fake_gp.Camera.file_delay = 1.0        # a dark as long as the 1 s exposure
    plan = CapturePlan(exposure=1.0, count=2, out=tmp_path)
    files = capture(plan, GphotoOptions(event_timeout=0.5), Stop(), retry_for=3)
    assert [f.name for f in files] == [f"light_{i:04d}_1s_IMG_{i + 1:04d}.CR2" for i in range(2)]
    assert fake_gp.Camera.last.log.count("set eosremoterelease=Press Full") == 2   # no exposure thrown away


def test_a_camera_lost_during_its_set_up_is_set_up_again(fake_gp, tmp_path):
    """A USB glitch while the camera is being set up (after init, reading its configuration): the next try sets
    it up again before exposing (before: it was taken as open, never set to bulb, and the frame was a timed
    capture at whatever speed the camera had — 1/10 s — written as light_0000_1s)."""
    from drivers.capture.common import CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    fake_gp.Camera.config_failures = 1
    files = capture(CapturePlan(exposure=1.0, count=1, out=tmp_path), GphotoOptions(), Stop(), retry_for=5)
    assert [f.name for f in files] == ["light_0000_1s_IMG_0001.CR2"]
    log = fake_gp.Camera.last.log
    assert not [x for x in log if x.startswith("capture")], log
    assert log.count("set eosremoterelease=Press Full") == 1, log


def test_a_busy_camera_at_the_bulb_press_is_retried_not_refused(fake_gp, tmp_path, caplog):
    """GP_ERROR_CAMERA_BUSY (-110) at the bulb press — the camera still writing the last frame to its card, or the
    desktop's automounter holding it — is retried like a lost camera, one line each (before: the camera answered
    get_config, so it was taken for one whose mode dial is not on M/B, and the run stopped: 'the camera refused a
    bulb exposure … set the mode dial to M or B'). A refusal of another kind still stops the run at once."""
    import logging

    from drivers.capture.common import CaptureError, CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    fake_gp.Camera.press_failures = [-110, -110]
    plan = CapturePlan(exposure=0.2, count=2, out=tmp_path / "busy")
    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        files = capture(plan, GphotoOptions(), Stop(), retry_for=10)
    assert [f.name for f in files] == [f"light_{i:04d}_0.2s_IMG_{i + 1:04d}.CR2" for i in range(2)]
    assert [r.getMessage() for r in caplog.records] == [
        "camera (frame 0): [-110] fake error; retrying in 1 s", "camera (frame 0): [-110] fake error; retrying in 2 s"]
    fake_gp.Camera.press_failures = [-2]
    with pytest.raises(CaptureError, match="refused a bulb exposure"):
        capture(CapturePlan(exposure=0.2, count=1, out=tmp_path / "refused"), GphotoOptions(), Stop(), retry_for=10)


def test_a_frame_whose_download_failed_is_downloaded_again_not_exposed_again(fake_gp, tmp_path):
    """A USB error while a frame is downloaded: the camera is opened again and that frame — on its card — is
    downloaded, not exposed again (before: a new exposure was taken, and the first one left on the card: a bulb
    frame's whole exposure lost to the night). A frame whose second download fails too is taken again."""
    from drivers.capture.common import CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    fake_gp.Camera.download_failures = [-7]          # GP_ERROR_IO
    files = capture(CapturePlan(exposure=0.2, count=2, out=tmp_path / "a"), GphotoOptions(), Stop(), retry_for=10)
    assert [f.name for f in files] == [f"light_{i:04d}_0.2s_IMG_{i + 1:04d}.CR2" for i in range(2)]
    assert files[0].read_bytes().endswith(b"raw frame 1")
    log = fake_gp.Camera.last.log
    assert log.count("set eosremoterelease=Press Full") == 2, log
    fake_gp.Camera.last = None
    fake_gp.Camera.download_failures = [-7, -108]    # then GP_ERROR_FILE_NOT_FOUND: not to be had
    files = capture(CapturePlan(exposure=0.2, count=1, out=tmp_path / "b"), GphotoOptions(), Stop(), retry_for=10)
    assert [f.name for f in files] == ["light_0000_0.2s_IMG_0002.CR2"]


def test_no_camera_on_usb_is_said_as_such_not_as_an_unknown_model(fake_gp, tmp_path, caplog):
    """libgphoto2 says '[-105] Unknown model' when it finds no camera at all (off, unplugged, asleep): each retry
    line says that no camera was found (before: 'camera (frame 0): [-105] Unknown model', which reads as a camera
    gphoto2 does not support), and the camera switched on later is used."""
    import logging

    from drivers.capture.common import CapturePlan, Stop
    from drivers.capture.gphoto import GphotoOptions, capture

    fake_gp.Camera.init_failures = [-105]
    with caplog.at_level(logging.WARNING, logger="drivers.capture"):
        files = capture(CapturePlan(exposure=0.2, count=1, out=tmp_path), GphotoOptions(), Stop(), retry_for=10)
    assert [f.name for f in files] == ["light_0000_0.2s_IMG_0001.CR2"]
    assert [r.getMessage() for r in caplog.records] == [
        "camera (frame 0): no camera found (is it on and plugged in? gphoto2: [-105] fake error); retrying in 1 s"]
