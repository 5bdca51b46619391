"""Tethered capture from a DSLR or mirrorless camera over USB (Canon, Nikon, Sony, …) with python-gphoto2.

    python -m drivers.capture.gphoto 120 --count 40 --iso 800 -o ~/lights

`pip install gphoto2` (the PyPI wheel bundles libgphoto2). Exposures up to the camera's longest shutter speed
use that speed (the nearest one the camera offers); longer ones use bulb: the shutter is held open through
`eosremoterelease` (Canon) or the `bulb` switch (Nikon, Sony, …) for the exposure, with the mode dial on M or
B. Each file is downloaded with the camera's own name and extension after our prefix
(`light_0003_120s_IMG_0042.CR2`); when the content says otherwise (a DNG served under a .JPG name) the
content's extension is used so that the daemon reads it as what it is.

gphoto2 is imported on first use, so `VCAMERADIR` (the wheel's virtual camera, for tests) can still be set.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write
from .common import (Backoff, CaptureError, CapturePlan, Stop, add_plan_arguments, frame_name, module_main, retry,
                     run_capture, run_plan, sniff_extension, start_capture, write_frame)

log = logging.getLogger("drivers.capture.gphoto")

ISO_WIDGETS = ("iso", "isospeed")
SHUTTER_WIDGETS = ("shutterspeed", "shutterspeed2", "eos-shutterspeed")
BULB_CHOICES = ("bulb", "b")
JPEG_EXTS = (".jpg", ".jpeg")   # of RAW+JPEG's files the other one is the frame
BUSY = (-110, -53)              # GP_ERROR_CAMERA_BUSY, GP_ERROR_IO_USB_CLAIM (another program has the camera)


class NoCamera(ConnectionError):
    """libgphoto2 found no camera at all: its own words, '[-105] Unknown model', read as a camera it does not
    support. Retried like a lost camera (one switched on or plugged in later is used)."""


@dataclass(frozen=True, slots=True)
class GphotoOptions:
    port: str | None = None            # e.g. "usb:001,004"; None: the first camera found
    delete_from_card: bool = False
    event_timeout: float = 30.0        # s to wait for the file after a bulb exposure, beyond the exposure's
                                       # length (long-exposure noise reduction: a dark as long, first)
    event_quiet: float = 1.0           # s without a new file that ends a bulb frame's files (RAW+JPEG: two)


def _on_card(folder: str, name: str) -> str:
    """'/store_00020001/DCIM/100CANON/IMG_0042.CR2': libgphoto2's folders have no trailing '/'."""
    return f"{folder.rstrip('/')}/{name}"


def parse_speed(text: str) -> float | None:
    """A shutter speed choice in seconds: '1/250', '30', '0.5', '1.0000s', '2"5' (Olympus 2.5 s); None for
    'bulb', 'time' and anything else that is not a duration."""
    t = text.strip().lower().rstrip("s").replace('"', ".").strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(num) / float(den)
        v = float(t)
        return v if v > 0 else None
    except ValueError:
        return None


class GphotoCamera:
    """One camera over libgphoto2; open() on first use and after each loss."""

    def __init__(self, opts: GphotoOptions, plan: CapturePlan, stop: Stop, *, retry_for: float | None = 600.0):
        import gphoto2 as gp  # after VCAMERADIR, which the tests set

        self.gp = gp
        self.opts, self.plan, self.stop = opts, plan, stop
        self.retry_for = retry_for          # s a frame in hand waits for disk space (write_frame)
        self.camera = None
        self.bulb: str | None = None      # widget name pressed for bulb, or None for a timed shutter
        self.exposure = plan.exposure     # what the camera will actually do
        self.renamed = False
        self.undownloaded: tuple[str, str] | None = None   # a frame exposed whose download failed: on the card

    # ------------------------------------------------------------ set-up

    def open(self) -> None:
        gp = self.gp
        cam = gp.Camera()
        if self.opts.port:
            self._select_port(cam, self.opts.port)
        try:
            cam.init()
        except gp.GPhoto2Error as err:
            if err.code == getattr(gp, "GP_ERROR_MODEL_NOT_FOUND", -105):
                raise NoCamera(f"no camera found (is it on and plugged in? gphoto2: {err})") from err
            raise
        self.camera = cam
        summary = cam.get_abilities().model
        log.info("camera %s%s", summary, f" on {self.opts.port}" if self.opts.port else "")
        self._configure()

    def _select_port(self, cam, port: str) -> None:
        """Point `cam` at the camera detected on `port`. USB port numbers change when a camera is plugged
        in again, so a port with no camera is an error naming the cameras that are there."""
        gp = self.gp
        found = gp.Camera.autodetect()
        detected = {found.get_value(i): found.get_name(i) for i in range(found.count())}
        if port not in detected:
            there = ", ".join(f"{m} on {p}" for p, m in detected.items()) or "none"
            raise CaptureError(f"--camera-port {port}: no camera there (detected: {there})")
        ports = gp.PortInfoList()
        ports.load()
        cam.set_port_info(ports[ports.lookup_path(port)])
        abilities = gp.CameraAbilitiesList()
        abilities.load()
        cam.set_abilities(abilities[abilities.lookup_model(detected[port])])

    def close(self) -> None:
        if self.camera is not None:
            try:
                self.camera.exit()
            except self.gp.GPhoto2Error:
                pass
        self.camera = None

    def _widget(self, config, names):
        for name in names:
            try:
                return config.get_child_by_name(name)
            except self.gp.GPhoto2Error:
                continue
        return None

    def _choices(self, widget) -> list[str]:
        return [widget.get_choice(i) for i in range(widget.count_choices())]

    def _configure(self) -> None:
        """ISO, then shutter speed or bulb. A control the camera lacks is a warning, not an error."""
        cam, plan = self.camera, self.plan
        config = cam.get_config()
        changed = False
        iso = self._widget(config, ISO_WIDGETS)
        if plan.gain is not None:
            want = f"{plan.gain:g}"
            if iso is None:
                log.warning("camera has no ISO control; ignoring --iso %s", want)
            elif want not in self._choices(iso):
                raise CaptureError(f"--iso {want}: not offered by the camera "
                                   f"(choices: {', '.join(self._choices(iso))})")
            elif iso.get_value() != want:
                iso.set_value(want)
                changed = True

        shutter = self._widget(config, SHUTTER_WIDGETS)
        self.bulb, self.exposure = None, plan.exposure
        if shutter is None:
            log.warning("camera has no shutter speed control; exposure is what the camera is set to")
        else:
            choices = self._choices(shutter)
            speeds = {c: s for c in choices if (s := parse_speed(c)) is not None}
            longest = max(speeds.values(), default=0.0)
            if plan.exposure > longest * 1.01 or not speeds:
                self.bulb = self._bulb_control(config)
                bulb_choice = next((c for c in choices if c.strip().lower() in BULB_CHOICES), None)
                if self.bulb is None:
                    log.warning("%g s is longer than the camera's longest shutter speed %g s and it has no bulb "
                                "control (eosremoterelease, bulb); taking %g s frames", plan.exposure,
                                longest, longest)
                    want = max(speeds, key=speeds.get)
                    self.exposure = speeds[want]
                else:
                    want = bulb_choice
            else:
                # the nearest speed on a log scale: 1/3-stop steps are even there
                want = min(speeds, key=lambda c: abs(math.log(speeds[c] / max(plan.exposure, 1e-6))))
                self.exposure = speeds[want]
                if abs(self.exposure - plan.exposure) > 0.05 * plan.exposure:
                    log.warning("camera's nearest shutter speed to %g s is %s", plan.exposure, want)
            if want is not None and shutter.get_value() != want:
                shutter.set_value(want)
                changed = True
        if changed:
            cam.set_config(config)

    def _bulb_control(self, config) -> str | None:
        w = self._widget(config, ("eosremoterelease",))
        if w is not None:
            return "eosremoterelease"
        w = self._widget(config, ("bulb",))
        return "bulb" if w is not None else None

    # ------------------------------------------------------------ exposures

    def take(self, index: int) -> Path:
        gp = self.gp
        try:
            if self.camera is None:
                self.open()
            if self.undownloaded is not None:
                # exposed, then lost on the way (a USB error in the download): the frame is on the card; it is
                # downloaded once more rather than exposed again (a 300 s bulb frame is 300 s of the night)
                (folder, name), self.undownloaded = self.undownloaded, None
                log.info("downloading %s again: exposed before the camera was lost", _on_card(folder, name))
                again = True
            else:
                folder, name = self._bulb_exposure() if self.bulb else self._timed_exposure()
                again = False
            try:
                data = self._download(folder, name)
            except gp.GPhoto2Error as err:
                if again:     # twice: the file is not to be had (gone from the card, a card error); expose again
                    log.warning("%s not downloaded (%s); left on the card, taking the frame again",
                                _on_card(folder, name), err)
                else:
                    self.undownloaded = (folder, name)
                raise
        except gp.GPhoto2Error:
            # the next try re-opens the camera (USB glitch, camera asleep, cable pulled) and sets it up again: one
            # lost during open() is not open — it would expose at whatever speed it had, never set to bulb
            self.close()
            raise
        stem, dot, ext = name.rpartition(".")
        ext = sniff_extension(data, f".{ext}" if dot else "")
        if dot and ext.lower() != f".{name.rpartition('.')[2].lower()}" and not self.renamed:
            self.renamed = True  # said once: every frame of the night would say it again
            log.info("%s holds %s data: saved as %s (and so on)", name, ext, ext)
        path = self.plan.folder / frame_name(self.plan.kind, index, self.exposure, ext,
                                             original=stem if dot else name)
        # a full disk or an unwritable folder is not a lost camera: the frame in hand is kept (write_frame) and the
        # card's copy too, never thrown away for a new exposure
        write_frame(path, lambda: atomic_write(path, data), stop=self.stop, give_up=self.retry_for)
        if self.opts.delete_from_card:
            try:
                self.camera.file_delete(folder, name)
            except gp.GPhoto2Error as err:  # the frame is safe on disk: a card left full is only a warning
                log.warning("could not delete %s from the card: %s", _on_card(folder, name), err)
        return path

    def _timed_exposure(self) -> tuple[str, str]:
        p = self.camera.capture(self.gp.GP_CAPTURE_IMAGE)
        return p.folder, p.name

    def _set(self, widget_name: str, value) -> None:
        config = self.camera.get_config()
        config.get_child_by_name(widget_name).set_value(value)
        self.camera.set_config(config)

    def _bulb_exposure(self) -> tuple[str, str]:
        gp, w = self.gp, self.bulb
        press, release = (("Press Full", "Release Full") if w == "eosremoterelease" else (1, 0))
        for folder, name in self._pending_files():   # the last frame's late ones: not this exposure's
            self._drop(folder, name, "announced before this exposure")
        try:
            self._set(w, press)
        except gp.GPhoto2Error as err:
            # busy (still writing the last frame to the card, or a desktop automounter holding it): retried like a
            # lost camera, not taken for a camera that refuses bulb — one busy answer ended the night
            if err.code not in BUSY and self._responds():
                raise CaptureError(f"the camera refused a bulb exposure ({w}: {err}); set the mode dial to M "
                                   f"or B, or use an exposure of at most its longest shutter speed") from err
            raise
        # not stop.wait: a stop request ends the run after this exposure, it does not cut it short
        try:
            time.sleep(self.plan.exposure)
        except BaseException:     # a second Ctrl-C / SIGTERM aborts: the shutter must not stay open
            try:
                self._set(w, release)
            except Exception as err:  # the abort's own error is the one to report
                log.warning("could not release the shutter (%s: %s)", w, err)
            raise
        self._set(w, release)
        # RAW+JPEG (and RAW on two cards) adds two or more files, each with its own event: take them all, until
        # none has come for event_quiet s, or the next frame would take this one's leftover
        # with long-exposure noise reduction the camera then takes a dark as long as the exposure before it
        # writes the file: wait for that too (a fixed 30 s gave up on every 60 s+ frame, and took a new one)
        added: list[tuple[str, str]] = []
        end = time.monotonic() + self.plan.exposure + self.opts.event_timeout
        last = None
        while time.monotonic() < end and (last is None or time.monotonic() - last < self.opts.event_quiet):
            kind, data = self.camera.wait_for_event(100 if added else 500)
            if kind == gp.GP_EVENT_FILE_ADDED:
                added.append((data.folder, data.name))
                last = time.monotonic()
        if not added:
            raise gp.GPhoto2Error(gp.GP_ERROR_TIMEOUT)
        keep = next((f for f in added if not f[1].lower().endswith(JPEG_EXTS)), added[0])
        for folder, name in added:
            if (folder, name) != keep:
                self._drop(folder, name, f"the same exposure as {keep[1]}")
        return keep

    def _pending_files(self) -> list[tuple[str, str]]:
        """The files the camera has announced and not yet been asked about (events read until a quiet one,
        2 s at most: some cameras send property changes without end)."""
        gp, found = self.gp, []
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            kind, data = self.camera.wait_for_event(10)
            if kind == gp.GP_EVENT_FILE_ADDED:
                found.append((data.folder, data.name))
            elif kind == gp.GP_EVENT_TIMEOUT:
                break
        return found

    def _drop(self, folder: str, name: str, why: str) -> None:
        """A file that is not a frame we keep (the JPEG of RAW+JPEG): skipped, and deleted from the card with
        --delete-from-card like the frames."""
        log.debug("skipping %s (%s)", _on_card(folder, name), why)
        if self.opts.delete_from_card:
            try:
                self.camera.file_delete(folder, name)
            except self.gp.GPhoto2Error as err:
                log.warning("could not delete %s from the card: %s", _on_card(folder, name), err)

    def _responds(self) -> bool:
        try:
            self.camera.get_config()
            return True
        except self.gp.GPhoto2Error:
            return False

    def _download(self, folder: str, name: str) -> bytes:
        f = self.camera.file_get(folder, name, self.gp.GP_FILE_TYPE_NORMAL)
        return bytes(memoryview(f.get_data_and_size()))


def capture(plan: CapturePlan, opts: GphotoOptions, stop: Stop | None = None, *, retry_for: float = 600.0,
            on_frame=None) -> list[Path]:
    """Take plan.count frames (or until stopped); returns the written paths in capture order. Raises
    CaptureError when the camera cannot do what was asked, GPhoto2Error once it has been gone `retry_for` s."""
    import gphoto2 as gp

    stop = stop or Stop()
    cam = GphotoCamera(opts, plan, stop, retry_for=retry_for)
    backoff = Backoff(first=1.0, cap=30.0, give_up=retry_for)
    where = f"camera on {opts.port}" if opts.port else "camera"

    def take(index: int) -> Path:
        return retry(lambda: cam.take(index), what=f"{where} (frame {index})", backoff=backoff,
                     retry_on=(gp.GPhoto2Error, OSError), stop=stop)
    try:
        return run_plan(plan, take, stop, on_frame=on_frame)
    finally:
        cam.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_arguments(p, gain_help="ISO (one the camera offers, e.g. 800)", gain_flags=("--iso", "--gain"))
    p.add_argument("--camera-port", help="e.g. usb:001,004 (see `gphoto2 --auto-detect`); default: the first")
    p.add_argument("--delete-from-card", action="store_true", help="delete each frame from the card once saved")


def run(args) -> int:
    plan = start_capture("gphoto2", args, no_binning="cameras over gphoto2 do not bin")
    if plan is None:
        return 2
    try:
        import gphoto2  # noqa: F401
    except ImportError:
        print("capture gphoto2: python-gphoto2 is not installed (pip install gphoto2)", file=sys.stderr)
        return 1
    opts = GphotoOptions(port=args.camera_port, delete_from_card=args.delete_from_card)
    # GPhoto2Error (or an OSError) after --retry-for: the camera stayed away
    return run_capture("gphoto2", plan, lambda stop: capture(plan, opts, stop, retry_for=args.retry_for),
                       gave_up=lambda err: type(err).__name__ == "GPhoto2Error" or isinstance(err, OSError))


def main(argv: list[str] | None = None) -> int:
    return module_main("drivers.capture.gphoto", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
