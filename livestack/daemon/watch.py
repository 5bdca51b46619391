"""watchdog -> a queue of complete files, in capture order.

A file is handed on only when it is *complete*: its size and mtime have not changed for ``settle_s`` and, for
the formats whose layout says how long they must be (FITS, TIFF-based RAWs such as DNG/NEF/CR2/ARW), it is at
least that long — ``settle_complete_s`` then suffices.  A file renamed into the folder (written under another
name, then moved into place: how capture programs make a frame appear whole) whose layout shows a whole image
is handed on at once; files written slowly in chunks wait.  A file
still incomplete — or still growing — ``timeout_s`` after it appeared is handed on with a reason, and the worker
records it failed.  So is a symbolic link leading out of the folder, unless ``follow_symlinks``, and one leading to
another file the watcher takes (the same frame, twice).

The watcher never opens pixel data and never waits on the worker: it only stats files and reads headers.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .. import NOTICE
from ..engine.read import FITS_SUFFIXES, capture_order, fits_data_bytes, fits_header_numbers, is_supported, suffix_of
from .config import WatchParams

log = logging.getLogger("livestack")

# Partial downloads, editor backups and sidecars: never frames.  (A .jpg next to a RAW is not a supported
# type, so is_supported() already skips it.)
IGNORED_ENDINGS = (".part", ".partial", ".tmp", ".temp", "~", ".xmp", ".swp", ".crdownload", ".download",
                   ".filepart")


def calibration_folder(name: str) -> bool:
    """A subfolder of calibration frames — bias/, darks/, flats/, darkflats/ as `livestack capture --type` writes
    them beside the lights, or a name `livestack masters` takes for one ("Darks_60s", "Offsets") — which
    `--recursive` leaves to `livestack masters`: its DSLR darks and flats were stacked as lights (rejected for
    want of stars, a line each in frames.jsonl, or worse).  A name that goes on with another word is a target's
    ("Dark Shark Nebula", "Dark Horse"): masters' reading of the first letters alone left such a target's lights
    unwatched — not one stacked, not a line in the log."""
    from ..masters import KINDS, folder_kind

    kind, sure = folder_kind(name)
    return sure and kind in KINDS


def is_candidate(name: str) -> bool:
    """True for a file name that may be a frame: a supported type, not hidden, not temporary, not a sidecar."""
    low = name.lower()
    return not name.startswith(".") and not low.endswith(IGNORED_ENDINGS) and is_supported(Path(name))


@dataclass(frozen=True, slots=True)
class Ready:
    """A file for the worker.  ``reason`` is set when the file never completed: record it as failed."""

    path: Path
    rel: str                   # relative to the watched folder, '/'-separated: the session's key for the file
    reason: str | None = None


# ------------------------------------------------------------------ completeness from the file's own layout

def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is visibly not complete yet (e.g. "FITS data 4000 of 172800 bytes"), or None when it looks
    complete or its layout cannot tell (the engine then reads it and reports any real problem)."""
    return layout(path)[1]


def layout(path: Path) -> tuple[bool, str | None]:
    """(complete, why not): ``complete`` when the file's own layout shows a whole image — a FITS HDU with image
    data of the length its header states, every strip of a TIFF-based RAW (DNG, CR2, NEF, ARW …) inside the
    file — so it need not wait the full settle time; ``why not`` as incomplete_reason().  (False, None): the
    layout cannot tell (CR3, RAF, a FITS with no image yet): the settle time decides."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False, "empty file (0 bytes)"
        if suffix_of(path) in FITS_SUFFIXES:
            return _fits_layout(path, size)
        with open(path, "rb") as f:
            head = f.read(4)
        if head in (b"II*\0", b"MM\0*"):
            why = _tiff_incomplete(path, size)
            return why is None, why
    except OSError as err:
        return False, f"not readable yet ({err.strerror or err})"
    return False, None


def _fits_layout(path: Path, size: int) -> tuple[bool, str | None]:
    """Walk the HDUs: each header (2880-byte blocks up to END) then its data, of a length the header states.
    Complete when it ends cleanly after whole HDUs of which one holds data (an image, a compressed image)."""
    pos, image = 0, False
    with open(path, "rb") as f:
        while True:
            block = f.read(2880)
            if not block and pos > 0:
                return image, None                 # ends cleanly after a complete HDU
            if pos == 0 and not block.startswith(b"SIMPLE  ="[: len(block)]):
                return False, None                 # not FITS-looking: let the reader say what it is
            if pos > 0 and not block.startswith(b"XTENSION"[: len(block)]):
                return image, None                 # trailing bytes that are not an HDU: not our concern
            head = fits_header_numbers(f, block)
            if head is None:
                return False, f"FITS header incomplete ({size} bytes so far)"
            hdr_len, keys = head
            data = fits_data_bytes(keys)
            if data is None:                  # NAXIS over the standard's limit (a garbled card): after the settle
                return False, None            # time the reader says what it is
            if pos + hdr_len + data > size:
                return False, f"FITS data {max(size - pos - hdr_len, 0)} of {data} bytes"
            image = image or data > 0
            pos += hdr_len + -(-data // 2880) * 2880
            f.seek(pos)


def _tiff_incomplete(path: Path, size: int) -> str | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            end = 0
            for page in tf.pages:
                for off, n in zip(page.dataoffsets, page.databytecounts):
                    end = max(end, off + n)
    except Exception as err:  # tifffile raises many types on a cut-off file; all mean "not complete yet"
        return f"TIFF structure incomplete ({type(err).__name__}: {err})"
    if end > size:
        return f"image data {size} of {end} bytes"
    return None


# ------------------------------------------------------------------ the watcher

@dataclass(slots=True)
class _Pending:
    size: int
    mtime_ns: int
    changed: float       # monotonic time of the last size/mtime change (or probe)
    first: float         # monotonic time the file was first seen
    reason: str | None = None
    renamed: bool = False   # moved into the folder (a writer's temporary renamed into place), not yet judged


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self.w.note(Path(os.fsdecode(path)), renamed=event.event_type == "moved",
                    created=event.event_type in ("created", "moved"))


def _quiet_stop(record: logging.LogRecord) -> bool:
    """watchdog 7 logs an ERROR when its emitter is stopped while events still arrive ("queue_events() called
    when the thread is inactive"): every stop of the daemon amid file activity put it in the journal, where it
    reads like a fault.  Nothing is lost by it (the watcher is being stopped); other records pass."""
    return "called when the thread is inactive" not in str(record.msg)


# A file a rescan finds first, written at least this long before, was announced by no file event (one reaches the
# watcher within milliseconds of the write where the kernel sends them at all).
NO_EVENT_AGE_S = 2.0


class Watcher:
    """Watches ``root`` (watchdog + a scan at start and every ``rescan_s``) and puts a Ready for each complete
    new file on ``out``.  ``known``: paths (relative, '/') already in the session or to be ignored.
    ``on_change``: called when a file starts to be tracked or is gone before it settled (the page's "queued"
    count counts the files settling too)."""

    def __init__(self, root: Path, p: WatchParams, out: "queue.Queue[Ready]", *, known: set[str] = frozenset(),
                 exclude: list[Path] = (), on_change=None):
        self.root = Path(root).resolve()
        self.p = p
        self.out = out
        self._on_change = on_change or (lambda: None)
        self._known = set(known)
        # when each known file became known (the session's own: this start): a file made under a known name with
        # an older modification time is that frame put back (moved aside to free a card, a disk plugged back in)
        self._known_at: dict[str, float] = {}
        self._started_at = time.time()
        self._exclude = [Path(e).resolve() for e in exclude]
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livestack-watch", daemon=True)
        self._observer = None
        self._scanned_once = False
        self._said_no_events = False
        self._unannounced = 0
        self._same_name = 0             # new files under the name of a frame the session has (_same_name_file)
        self._root_id: tuple[int, int] | None = None   # (st_dev, st_ino) of the folder the file events watch
        self._gone: dict | None = None  # {"error", "since"} while the capture folder is not there (problem())
        self._unreadable: dict | None = None   # … while a scan cannot read it (_unreadable_folder)

    # -- public
    def start(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: watch folder does not exist")
        # watchdog 7's inotify thread may add a watch twice for folders made at once (`mkdir -p date/target/L`)
        # and warn that it overwrites the first: harmless, but a line on the journal that reads like a fault, and
        # under `-W error` the exception that ends the thread (no file event afterwards, only the rescans).
        # Added here, not at import: a filter added later goes first, ahead of any "error" set before.
        warnings.filterwarnings("ignore", r"Callback with id .* already exists", RuntimeWarning, r"watchdog\.")
        logging.getLogger("watchdog.observers.inotify").addFilter(_quiet_stop)    # (once: addFilter checks)
        st = os.stat(self.root)
        self._root_id = (st.st_dev, st.st_ino)
        self._observer = Observer()
        self._observer.schedule(_Handler(self), str(self.root), recursive=self.p.recursive)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def seen(self) -> set[str]:
        """Every file this watcher knows: done, queued, or still settling."""
        with self._lock:
            return self._known | set(self._pending)

    def settle_none(self) -> set[str]:
        """Every file this watcher knows, as seen(); those still settling are given up: never handed on (a "new
        stack" leaves them to the old session, whose ignore list names them)."""
        with self._lock:
            now = time.time()
            self._known_at.update((rel, now) for rel in self._pending)
            self._known |= set(self._pending)
            self._pending.clear()
            return set(self._known)

    def problem(self) -> dict | None:
        """{"error", "since"} while the capture folder is gone (its USB disk unplugged) or cannot be read, else None."""
        gone = self._gone or self._unreadable
        return None if gone is None else dict(gone)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def note(self, path: Path, *, renamed: bool = False, scanned: bool = False, created: bool = False) -> None:
        """A file event (or a scan: ``scanned``) saw ``path``: start tracking it if it may be a new frame.
        ``renamed``: it was moved into place — written under another name first, as capture programs do to be
        atomic —, so a whole layout needs no settle time.  ``created``: the event made the file (created, or
        moved in), not only wrote to it."""
        rel = self._rel(path)
        if rel is None:
            return
        with self._lock:
            if rel in self._known:
                if created and not self._put_back(path, rel):
                    self._same_name_file(rel)
                return
            if rel in self._pending:
                self._pending[rel].renamed |= renamed
                return
            now = time.monotonic()
            self._pending[rel] = _Pending(-1, -1, now, now, renamed=renamed)
        if scanned and self._scanned_once:
            self._no_events(path, rel)
        self._on_change()
        if renamed:
            self._wake.set()

    def _put_back(self, path: Path, rel: str) -> bool:
        """Whether the file made under a known name is that frame itself, put back (moved aside to free a full
        card, or its USB disk plugged back in; `mv` keeps the modification time): last modified before its name
        became known — a new frame under the name was written after.  The exclusions refused while stacked frames
        were gone ask for the files back: each was then warned as a new file not stacked, to give each night its
        own folder."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if mtime > self._known_at.get(rel, self._started_at):
            return False
        log.info("%s is back in the capture folder", rel)
        return True

    def _same_name_file(self, rel: str) -> None:
        """A file was made under the name of one the session has stacked (or ignores): frames are known by their
        path, so it is not stacked — a night whose capture numbered its files from light_0000 again, in a folder
        emptied of the last night's, was lost whole and nothing said so.  Said as a warning the first time, with
        what to do, then a line for each file."""
        self._same_name += 1
        if self._same_name == 1:
            log.warning("%s is a new file under the name of a frame this session already has: it is not stacked "
                        "(frames are known by their path). Give each night its own folder (`--recursive` watches "
                        "them all), or have the capture program number its files on from the last night's", rel)
        else:
            log.info("%s: a new file under a name the session already has: not stacked (%d such files)",
                     rel, self._same_name)

    def _no_events(self, path: Path, rel: str) -> None:
        """A rescan found a new file that no file event announced, seconds after it was written: events do not
        reach this folder (a network mount: NFS, SMB; some FUSE and USB setups), and every frame waits for the next
        rescan — said once, at the second such file, so that the user knows why frames come up to rescan_s late."""
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return
        if age < NO_EVENT_AGE_S or self._said_no_events:
            return                  # (an event on its way: the rescan only came first)
        self._unannounced += 1
        if self._unannounced < 2:   # (one could be an event the rescan overtook by chance: a second confirms)
            return
        self._said_no_events = True
        log.warning("livestack: watch %s: %s was found by the periodic rescan, not by a file event (written %.0f s "
                    "before): file events do not reach this folder (a network mount?); new frames are seen within "
                    "[watch] rescan_s = %g s", self.root, rel, age, self.p.rescan_s)

    # -- internals
    def _rel(self, path: Path) -> str | None:
        if not is_candidate(path.name):
            return None
        try:
            path = path.absolute()
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if len(rel.parts) > 1 and not self.p.recursive:
            return None
        if any(part.startswith(".") or calibration_folder(part) for part in rel.parts[:-1]):
            return None
        if any(path.is_relative_to(e) for e in self._exclude):
            return None
        return rel.as_posix()

    def _link_out(self, path: Path) -> str | None:
        """Why ``path`` must not be read because a symbolic link on it leads out of the watched folder (or into
        the session folder, whatever the setting), or None."""
        try:
            real = path.resolve()
        except (OSError, RuntimeError):     # a link loop
            return "a symbolic link that cannot be resolved; not read"
        if real == path:
            return None
        if any(real.is_relative_to(e) for e in self._exclude):
            return "a symbolic link into the session folder; not read"
        if real.is_relative_to(self.root) and (twin := self._rel(real)) is not None:
            # the file it leads to is watched itself, under its own name: read through the link too, that frame
            # would be stacked twice (a capture script's "latest.fits" link to the last frame)
            return f"a symbolic link to {twin}, which is stacked under its own name; not read"
        if not self.p.follow_symlinks and not real.is_relative_to(self.root):
            return "a symbolic link out of the watch folder; not read ([watch] follow_symlinks = false)"
        return None

    def _scan(self) -> None:
        errors: list[OSError] = []
        if self.p.recursive:
            for d, dirs, files in os.walk(self.root, onerror=errors.append):
                dirs[:] = [x for x in dirs if not x.startswith(".") and not calibration_folder(x)
                           and not any((Path(d) / x).resolve() == e for e in self._exclude)]
                for name in files:
                    self.note(Path(d) / name, scanned=True)
        else:
            try:
                with os.scandir(self.root) as it:
                    for e in it:
                        if e.is_file():
                            self.note(Path(e.path), scanned=True)
            except OSError as err:
                errors.append(err)
        self._unreadable_folder(errors[0] if errors else None)

    @staticmethod
    def _problem(error: str) -> dict:
        """A problem() of the capture folder, said as it begins (one warning): {"error", "since"}.  (The caller
        keeps it, then tells the page: on_change.)"""
        log.warning("livestack: %s", error)
        return {"error": error, "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def _unreadable_folder(self, err: OSError | None) -> None:
        """A folder the scan cannot read (no permission for livestack's user: the capture program made it): said
        once and in problem() until a scan reads it — the page said idle all night, no frame taken, and the log
        one line every rescan_s (with --recursive not even that: os.walk passes over what it cannot read)."""
        if err is None:
            if self._unreadable is not None:
                log.log(NOTICE, "livestack: the capture folder %s is readable again", self.root)
                self._unreadable = None
                self._on_change()
            return
        if self._unreadable is None:
            where = err.filename or self.root
            self._unreadable = self._problem(f"cannot read the capture folder {where} ({err.strerror or err}): its "
                                             "frames are not seen — the user livestack runs as needs to read it "
                                             "(README: Raspberry Pi, setfacl)")
            self._on_change()

    def _run(self) -> None:
        poll = max(0.02, min(0.25, min(self.p.settle_s, self.p.settle_complete_s) / 4))
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            here = self._root_here()
            if here:                            # back, or another folder now: its files at once
                next_scan = 0.0
            if here is not None and now >= next_scan:
                self._scan()
                self._scanned_once = True       # (what the first scan finds was there before the start)
                next_scan = now + self.p.rescan_s
            self._wake.clear()
            self._check()
            self._wake.wait(poll)         # a file renamed into place wakes the check at once

    def _root_here(self) -> bool | None:
        """Whether the capture folder is there (a stat at each look: cheap): None while it is gone, True when it has
        just come back or is another folder now, and is watched anew, else False.  A USB capture disk unplugged
        made the page say nothing (idle all the while) and the log one line every rescan_s; plugged back, the
        file events still watched the folder gone — frames came only with the rescan, up to rescan_s late, and a
        warning blamed a network mount."""
        try:
            st = os.stat(self.root)
            why = None if stat.S_ISDIR(st.st_mode) else "not a folder"
        except OSError as err:
            st, why = None, err.strerror or str(err)
        if why is not None:
            if self._gone is None:
                self._gone = self._problem(f"the capture folder {self.root} is gone ({why}; its disk unplugged?): "
                                           "new frames are taken once it is back")
                self._on_change()
            return None
        ident = (st.st_dev, st.st_ino)
        if self._gone is None and ident == self._root_id:
            return False
        try:                          # the file events of the folder there now (the old watch is on the one gone)
            if self._observer is not None:
                self._observer.unschedule_all()
                self._observer.schedule(_Handler(self), str(self.root), recursive=self.p.recursive)
        except OSError as err:        # gone again meanwhile: tried at the next look
            log.debug("watch %s: %s", self.root, err)
            self._root_id = None
            return None
        if self._gone is not None:
            log.log(NOTICE, "livestack: the capture folder %s is back (gone since %s); watching it again", self.root,
                    self._gone["since"])
        else:
            log.warning("livestack: the capture folder %s is another folder now (its disk mounted or unmounted?); "
                        "watching it anew", self.root)
        self._root_id, self._gone = ident, None
        self._scanned_once = False    # (what is there now was written while nothing watched: no event was missed)
        self._on_change()
        return True

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self._pending.items())
        ready: list[Ready] = []
        for rel, st in items:
            path = self.root / rel
            try:
                s = path.stat()
            except FileNotFoundError:       # renamed away or deleted before it settled
                with self._lock:
                    self._pending.pop(rel, None)
                self._on_change()
                continue
            except OSError as err:          # a symbolic link loop (ELOOP), permissions: failed in the end
                if now - st.first >= self.p.timeout_s:
                    ready.append(Ready(path, rel, f"unreadable after {self.p.timeout_s:g} s: "
                                                  f"{err.strerror or err}"))
                continue
            escape = self._link_out(path)
            if escape is not None:
                ready.append(Ready(path, rel, escape))
                continue
            if not stat.S_ISREG(s.st_mode) and not stat.S_ISDIR(s.st_mode):   # a named pipe, a device: never
                ready.append(Ready(path, rel, "not a regular file (a named pipe or a device); not read"))
                continue                                                       # a frame, and opening one blocks
            if st.renamed:                   # moved into place: whole at once when its layout says so
                st.renamed = False           # (judged once: else the settle times decide, as for any file)
                complete, st.reason = layout(path)
                if complete and st.reason is None:
                    ready.append(Ready(path, rel))
                    continue
            if (s.st_size, s.st_mtime_ns) != (st.size, st.mtime_ns):
                growing = st.size >= 0
                st.size, st.mtime_ns, st.changed = s.st_size, s.st_mtime_ns, now
                if growing and now - st.first >= self.p.timeout_s:    # a writer that never stops
                    ready.append(Ready(path, rel, f"still incomplete after {self.p.timeout_s:g} s: still being "
                                                  f"written ({s.st_size} bytes so far)"))
                continue
            quiet = now - st.changed
            if quiet < min(self.p.settle_s, self.p.settle_complete_s):
                continue
            complete, st.reason = layout(path)
            if quiet < self.p.settle_s and not complete:
                continue                     # the layout cannot vouch for it: the full settle time
            if st.reason is None:
                ready.append(Ready(path, rel))
            elif now - st.first >= self.p.timeout_s:
                ready.append(Ready(path, rel, f"still incomplete after {self.p.timeout_s:g} s: {st.reason}"))
            else:
                st.changed = now             # look again after another settle time
        if not ready:
            return
        by_path = {r.path: r for r in ready}
        order = capture_order(list(by_path))
        with self._lock:
            # handed on only if still tracked, and under the lock settle_none() takes: a "new stack" between the
            # checks above and here gave these files up (the old session's ignore list names them) and emptied the
            # queue — put on it afterwards, one was stacked as the new session's frame all the same
            for path in order:
                r = by_path[path]
                if self._pending.pop(r.rel, None) is None:
                    continue
                self._known.add(r.rel)
                self._known_at[r.rel] = time.time()
                self.out.put(r)
