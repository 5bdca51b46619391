"""What every capture driver shares: the capture plan, file names, folders, atomic writes, retry, stop.

The daemon's only interface to a camera is its watched folder, so these rules are the contract:
- a frame appears all at once (temporary hidden name ".NAME.PID.tmp", fsync, rename), never half written;
- its name sorts in capture order and says type, exposure and filter: ``light_0003_60s_L.fits``;
- calibration runs go where ``livestack masters`` looks: OUT/bias, OUT/darks, OUT/flats, OUT/darkflats;
- SIGINT/SIGTERM end the run after the current exposure; a second one aborts at once.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import atomic_write

log = logging.getLogger("drivers.capture")

KINDS = ("light", "dark", "flat", "bias", "darkflat")
CALIB_DIRS = {"bias": "bias", "dark": "darks", "flat": "flats", "darkflat": "darkflats"}
IMAGETYP = {"light": "Light Frame", "bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
            "darkflat": "Dark Flat"}
_NAME_RE = re.compile(r"^(?P<kind>[a-z]+)_(?P<index>\d{4,})_")


class CaptureError(Exception):
    """The camera cannot do what was asked (one line: what and why); the run stops with exit 1."""


@dataclass(frozen=True, slots=True)
class CapturePlan:
    exposure: float                 # s
    count: int | None = None        # None: until stopped
    interval: float = 0.0           # s pause between frames (dither settle, intervalometer)
    kind: str = "light"             # one of KINDS
    out: Path = Path(".")           # the watched folder (calibration frames go to a sub-folder of it)
    binning: int = 1
    gain: float | None = None       # INDI gain, or ISO for gphoto2

    def __post_init__(self):
        check_seconds(self.exposure, "exposure")
        if self.count is not None and self.count < 1:
            raise ValueError(f"--count {self.count}: must be ≥ 1 (leave it out to run until stopped)")
        check_seconds(self.interval, "--interval")
        if self.kind not in KINDS:
            raise ValueError(f"--type {self.kind!r}: unknown (known: {', '.join(KINDS)})")
        if not 1 <= self.binning <= 16:
            raise ValueError(f"--binning {self.binning}: must be 1..16")
        if self.gain is not None and not math.isfinite(self.gain):   # argparse's float() takes 'nan', 'inf'
            raise ValueError(f"gain {self.gain:g}: must be a finite number")

    @property
    def folder(self) -> Path:
        return frame_folder(self.out, self.kind)


def check_seconds(value: float, what: str) -> None:
    """ValueError unless `value` is a duration: a finite number ≥ 0. argparse's float() takes 'nan' and 'inf',
    and NaN passes every `< 0` test: an exposure of nan reached the camera, a NaN --retry-for never retried."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} {value:g} s: must be a finite number ≥ 0")


def frame_folder(out: Path, kind: str) -> Path:
    """Where frames of `kind` go: lights in OUT itself (the watched folder), calibration frames in
    OUT/bias, OUT/darks, OUT/flats, OUT/darkflats — the layout `livestack masters OUT` reads."""
    return Path(out) if kind == "light" else Path(out) / CALIB_DIRS[kind]


def _slug(text: str) -> str:
    """A filter or camera name made safe for a file name: 'H-alpha 7nm' -> 'H-alpha7nm'."""
    return re.sub(r"[^A-Za-z0-9.+-]", "", text)


def frame_name(kind: str, index: int, exposure: float, ext: str, *, filter: str | None = None,
               original: str | None = None) -> str:
    """'light_0003_60s_L.fits': type, 4-digit (or more) index, exposure, filter; `ext` with its dot.

    Names of one kind sort in capture order as long as index < 10000 per run folder. `original` (a camera's
    own file name, e.g. 'IMG_0042') is kept at the end: 'light_0003_30s_IMG_0042.CR2'."""
    parts = [kind, f"{index:04d}", f"{exposure:g}s"]
    if filter:
        parts.append(_slug(filter))
    if original:
        parts.append(original)
    return "_".join(parts) + ext


INDEX_FILE = ".livestack-capture-index"


def next_index(folder: Path, kind: str) -> int:
    """The index after the highest one ever used for `kind` in `folder`: the highest existing
    `kind_NNNN_…` file, or the highest recorded in the folder's INDEX_FILE (record_index), whichever is
    higher; 0 for none. A restarted run appends instead of overwriting, and a number whose file was deleted
    (a bad last frame) is not used again: the daemon remembers every path it has handled and would skip a
    new file under an old name."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    top = _recorded(folder).get(kind, -1)
    for f in folder.iterdir():
        m = _NAME_RE.match(f.name)
        if m and m["kind"] == kind:
            top = max(top, int(m["index"]))
    return top + 1


def _recorded(folder: Path) -> dict[str, int]:
    """INDEX_FILE's {kind: highest index used}; {} when missing or unreadable (then the files alone count)."""
    path = Path(folder) / INDEX_FILE
    try:
        got = json.loads(path.read_text())
        return {k: int(v) for k, v in got.items() if k in KINDS}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        log.warning("%s unreadable (%s): numbering from the files present", path, err)
        return {}


def record_index(folder: Path, kind: str, index: int) -> None:
    """Remember that `index` was used for `kind` in `folder` (INDEX_FILE, hidden, written atomically), so
    that next_index never hands it out again, even once its file is deleted. A failure is a warning: the
    frame itself is written, and its file still counts while it is there."""
    folder = Path(folder)
    seen = _recorded(folder)
    if seen.get(kind, -1) >= index:
        return
    seen[kind] = index
    try:
        atomic_write(folder / INDEX_FILE, (json.dumps(seen, sort_keys=True) + "\n").encode())
    except OSError as err:
        log.warning("could not record frame number %d in %s (%s)", index, folder / INDEX_FILE, err)


def claim_index(folder: Path, kind: str) -> int:
    """The next index for `kind` in `folder` (next_index), recorded as used (record_index) before it is returned,
    both under an exclusive lock on the folder: two runs writing into one folder at once (the cameras of a dual
    rig, a second run started by mistake) each get numbers of their own, where each used to number from the
    folder as it was when it started, and a frame of one replaced the other's under the same name. A number
    claimed for a frame that is then not written stays unused, like a deleted frame's."""
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:    # a filesystem without locks: numbering still works for one run
            log.debug("no lock on %s (%s)", folder, err)
        index = next_index(folder, kind)
        record_index(folder, kind, index)
        return index
    finally:
        os.close(fd)      # and with it the lock


_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temporary files (".NAME.PID.tmp") whose writer is no longer running — what a killed writer
    leaves behind. Readers never see them (hidden names); this only reclaims the space. Returns them."""
    removed = []
    for f in Path(folder).iterdir() if Path(folder).is_dir() else ():
        m = _TMP_RE.match(f.name)
        if not m or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue              # its writer is alive (another driver on the same folder)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def sniff_extension(data: bytes, camera_ext: str) -> str:
    """The extension a file should carry, from its first bytes. The camera's extension is kept when it
    agrees with the content (a .CR2, .NEF, .ARW is a TIFF inside); when it does not — e.g. DNG bytes served
    under a .JPG name — the content's own extension is used, so the daemon reads the file as what it is."""
    ext = camera_ext.lower()
    head = data[:16]
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        tiff_like = {".dng", ".cr2", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".pef", ".tif", ".tiff", ".3fr",
                     ".erf", ".kdc", ".mos", ".iiq", ".srw", ".raw", ".fff", ".mef"}
        if ext in tiff_like:
            return camera_ext
        return ".cr2" if head[8:10] == b"CR" else ".dng"
    if head[:4] == b"IIU\x00":
        return camera_ext if ext in (".rw2", ".raw", ".rwl") else ".rw2"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return camera_ext if ext == ".orf" else ".orf"
    if head[4:12] == b"ftypcrx ":
        return camera_ext if ext == ".cr3" else ".cr3"
    if head[:16] == b"FUJIFILMCCD-RAW ":
        return camera_ext if ext == ".raf" else ".raf"
    if head[:9] == b"SIMPLE  =":
        return camera_ext if ext in (".fits", ".fit", ".fts") else ".fits"
    if head[:3] == b"\xff\xd8\xff":
        return camera_ext if ext in (".jpg", ".jpeg") else ".jpg"
    return camera_ext


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits between retries: first, first·factor, … capped at `cap`; give up once `give_up` seconds have
    passed since the first failure (None: never)."""
    first: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    give_up: float | None = 600.0

    def delays(self) -> Iterator[float]:
        d = self.first
        while True:
            yield d
            d = min(d * self.factor, self.cap)


def retry(fn: Callable[[], object], *, what: str, backoff: Backoff, retry_on: tuple[type[BaseException], ...],
          stop: "Stop | None" = None, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic):
    """Call fn() until it returns; on an exception in `retry_on` log one line (what failed, why, when the
    next try is) and wait per `backoff`, the last wait cut so that a try is made when backoff.give_up seconds
    have passed since the first failure. Raises the last error when that try fails too, and StopRequested if
    `stop` is requested while waiting."""
    start = None
    delays = backoff.delays()
    while True:
        try:
            return fn()
        except retry_on as err:
            now = clock()
            start = now if start is None else start
            delay = next(delays)
            if backoff.give_up is not None:
                if now - start >= backoff.give_up:
                    log.error("%s: %s; giving up after %.0f s", what, _reason(err), now - start)
                    try:    # for the run's last line (run_capture): what was lost, not only the system's error
                        err.gave_up = f"after {now - start:.0f} s: {what}: {_reason(err)}"
                    except (AttributeError, TypeError):
                        pass
                    raise
                delay = min(delay, backoff.give_up - (now - start))   # a last try when the time is up
            log.warning("%s: %s; retrying in %.0f s", what, _reason(err), delay)
            if stop is not None:
                if stop.wait(delay):   # the line run_plan logs: what was not done, and why it was being retried
                    raise StopRequested(f"{what}: stopped while waiting to try again ({_reason(err)})") from err
            else:
                sleep(delay)


def _reason(err: BaseException) -> str:
    """'ConnectionResetError: [Errno 104] …' for Python's own errors (the type says what happened); a
    driver's own exception (IndiLost, GPhoto2Error) already says it in a sentence."""
    text = str(err).strip()
    if type(err).__module__ == "builtins" or not text:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


class DiskFull(Exception):
    """A frame in hand could not be written for want of space (ENOSPC, EDQUOT): its write is retried."""


_WAIT_FOR_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_frame(path: Path, write: Callable[[], object], *, stop: "Stop | None", give_up: float | None) -> Path:
    """Write a frame already in hand: `write()` writes `path` atomically. The camera is not involved, so a
    failure here never costs another exposure. A full disk (ENOSPC, EDQUOT: the daemon or the user may free
    space) is retried with back-off, one line each, waiting on `stop`, until `give_up` s; any other OSError
    (a read-only or unwritable folder) stops the run at once. Raises CaptureError, one line naming the file and
    the reason; StopRequested if a stop comes while waiting for space (the frame is then not written)."""
    path = Path(path)

    def once():
        try:
            write()
        except OSError as err:
            if err.errno in _WAIT_FOR_SPACE:
                raise DiskFull(f"cannot write {path.name}: {_os_reason(err)}") from err
            raise CaptureError(f"cannot write {path}: {_os_reason(err)}") from err
    try:
        retry(once, what=str(path.parent), backoff=Backoff(first=1.0, cap=30.0, give_up=give_up),
              retry_on=(DiskFull,), stop=stop)
    except DiskFull as err:
        raise CaptureError(f"cannot write {path}: {_os_reason(err.__cause__)}") from err
    except StopRequested as err:   # one line (run_plan logs it), not retry's and this one
        raise StopRequested(f"stopped while waiting for space: {path} not written") from err
    return path


def _os_reason(err: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's sentence and the name to search for."""
    name = errno.errorcode.get(err.errno or 0)
    return f"{err.strerror or err} ({name})" if name else str(err)


class StopRequested(Exception):
    """Raised when a stop was requested and the run ends there, without another exposure: out of a retry's
    wait (the frame in hand has been written already), out of a wait for the cooler or for disk space."""


class Stop:
    """A stop request: set by SIGINT/SIGTERM (install_signals, main thread) or by stop() from any thread
    (the demo). Drivers check `requested` between exposures and wait with wait()."""

    def __init__(self):
        self._event = threading.Event()
        self.signals = 0
        self.signal_name: str | None = None   # the last signal's ('SIGINT'), for the line that ends a run

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def stop(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True at once if a stop is (or becomes) requested."""
        end = time.monotonic() + max(0.0, seconds)
        while not self._event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._event.wait(min(left, 0.1))  # short slices: a signal handler's set() is seen promptly
        return True

    def install_signals(self) -> None:
        """SIGINT/SIGTERM: the first finishes the current exposure and stops; a second aborts at once."""
        def handler(signum, frame):
            self.signals += 1
            self.signal_name = signal.Signals(signum).name
            if self.signals > 1:
                raise KeyboardInterrupt
            log.warning("%s: finishing the current exposure, then stopping (again to abort)",
                        signal.Signals(signum).name)
            self._event.set()
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def check_writable(folder: Path) -> None:
    """CaptureError, one line naming the folder and the reason, unless a file can be created in `folder` (a
    read-only mount, a folder of another user, an immutable one). Checked at the start of a run: found only
    when the first frame was written, it cost the cooler's wait and a whole exposure first. A full disk
    (ENOSPC, EDQUOT) is not refused here: each frame waits for space (write_frame)."""
    probe = Path(folder) / ".livestack-write-check"
    try:
        atomic_write(probe, b"")
        probe.unlink(missing_ok=True)   # another run on the folder may have removed it first
    except OSError as err:
        if err.errno in _WAIT_FOR_SPACE:
            return
        raise CaptureError(f"cannot write in {folder}: {_os_reason(err)}") from err


def run_plan(plan: CapturePlan, take: Callable[[int], Path], stop: Stop, *,
             on_frame: Callable[[Path], None] | None = None) -> list[Path]:
    """The capture loop: take(index) -> written path, plan.count times (or until stopped), pausing
    plan.interval between frames. Each frame's number is claimed just before it is taken (claim_index): after
    the highest ever used for the kind in the folder, by this run or by another one writing there too."""
    try:
        plan.folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaptureError(f"cannot create {plan.folder}: {_os_reason(err)}") from err
    for f in clean_stale_temps(plan.folder):
        log.info("removed %s, left by a writer that was killed", f.name)
    check_writable(plan.folder)      # before the camera is touched: not after cooling and a whole exposure
    written: list[Path] = []
    n = 0
    while (plan.count is None or n < plan.count) and not stop.requested:
        if n and plan.interval and stop.wait(plan.interval):
            break
        try:
            index = claim_index(plan.folder, plan.kind)   # per frame: another run may share the folder
        except OSError as err:    # the folder removed (or made unreadable) since the start: not a lost camera
            raise CaptureError(f"cannot write in {plan.folder}: {_os_reason(err)}") from err
        try:
            path = take(index)
        except StopRequested as err:
            if str(err):              # why no frame came (e.g. "stopped while cooling (at -1.5 °C)")
                log.warning("%s", err)
            break
        written.append(path)
        n += 1
        total = f"/{plan.count}" if plan.count else ""
        log.info("wrote %s (%d%s)", path, n, total)
        if on_frame is not None:
            on_frame(path)
    return written


# ---------------------------------------------------------------- command line

def add_plan_arguments(p: argparse.ArgumentParser, *, gain_help: str, gain_flags=("--gain",)) -> None:
    """The arguments every driver takes (exposure, count, interval, gain/ISO, binning, type, out)."""
    p.add_argument("exposure", type=float, help="exposure time, s")
    p.add_argument("-n", "--count", type=int, help="number of frames (default: until Ctrl-C / SIGTERM)")
    p.add_argument("--interval", type=float, default=0.0,
                   help="pause between frames, s (dither settle, intervalometer); default 0")
    p.add_argument(*gain_flags, dest="gain", type=float, metavar=gain_flags[0].lstrip("-").upper(), help=gain_help)
    p.add_argument("--binning", type=int, default=1, help="binning N×N (default 1)")
    p.add_argument("--type", dest="kind", choices=KINDS, default="light",
                   help="frame type; calibration frames go to OUT/bias, darks, flats, darkflats")
    p.add_argument("-o", "--out", required=True, help="output folder (the daemon's watched folder)")
    p.add_argument("--retry-for", type=float, default=600.0,
                   help="keep retrying a lost camera/server this long, s (default 600)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def plan_from_args(args) -> CapturePlan:
    return CapturePlan(exposure=args.exposure, count=args.count, interval=args.interval, kind=args.kind,
                       out=Path(args.out).expanduser(), binning=args.binning, gain=args.gain)


def start_capture(name: str, args, *, no_binning: str | None = None) -> CapturePlan | None:
    """The drivers' command-line head: logging, then the plan from the parsed arguments — or None after one
    line on stderr for a usage error (exit 2).  ``no_binning``: why this driver refuses --binning ≠ 1."""
    setup_logging(getattr(args, "quiet", False))
    try:
        if no_binning and args.binning != 1:
            raise ValueError(f"--binning: {no_binning}")
        check_seconds(args.retry_for, "--retry-for")
        return plan_from_args(args)
    except ValueError as err:
        print(f"capture {name}: {err}", file=sys.stderr)
        return None


def module_main(module: str, doc: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m drivers.capture.X``: the driver's own arguments, then its run()."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def setup_logging(quiet: bool = False) -> None:
    """Stand-alone runs: one line per event on stderr. Inside `livestack`, its root handler is used and
    only our logger's level is raised, so frames are reported without -v."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def run_capture(name: str, plan: CapturePlan, capture: Callable[["Stop"], list[Path]], *,
                gave_up: Callable[[BaseException], bool] = lambda err: False) -> int:
    """The drivers' command-line tail: install the stop signals, run ``capture(stop)``, turn a CaptureError
    (the camera cannot do it) or an error ``gave_up`` accepts (the camera stayed away past --retry-for) into one
    line and exit 1; 0 when the count is done or a stop was requested; 130, with one line, when a second stop
    aborted the run (never a KeyboardInterrupt traceback)."""
    stop = Stop()
    stop.install_signals()
    try:
        files = capture(stop)
    except CaptureError as err:
        print(f"capture {name}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:     # a second SIGINT/SIGTERM: the driver has aborted the exposure on its way out
        print(f"capture {name}: aborted by a second {stop.signal_name or 'SIGINT'}: the frame in progress is "
              f"not written", file=sys.stderr)
        return 130
    except Exception as err:
        if not gave_up(err):
            raise
        # 'gave up after 600 s: INDI pi:7624 (frame 12): ConnectionRefusedError: …': the server or camera, not only
        # '[Errno 111] Connection refused', in the line that ends the run (the journal's last line under systemd)
        detail = getattr(err, "gave_up", None)
        print(f"capture {name}: gave up {detail}" if detail else f"capture {name}: gave up: {err}", file=sys.stderr)
        return 1
    log.info("%d frame(s) in %s", len(files), plan.folder)
    return 0
