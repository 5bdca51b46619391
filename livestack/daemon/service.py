"""The worker: queue of complete files -> Engine.process -> frames.jsonl, outputs, checkpoint, published snapshot.

One worker thread owns the Engine; nothing else touches it.  The web server reads the immutable Snapshot the
worker publishes by swapping one reference, and asks for anything else (stretch, export, exclude, new stack) by
submitting a command that the worker runs between two frames.

A full disk does not stop it: frames are stacked and recorded in memory, every write that failed for want of
space (frames.jsonl lines, stack.fits, preview.jpg, the checkpoint) is owed and retried when the filesystem has
room for it, and the status says `disk: {"error": "disk full: <file>, N MB needed", "since"}` until then.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import NOTICE
from ..engine import outputs
from ..engine.filtername import filter_key
from ..engine.filterstack import integration
from ..engine.frame import FrameRecord
from ..engine.pipeline import Engine
from ..engine.read import read_pointing
from ..engine.write import (DiskFull, WriteDeferred, atomic_write_bytes, deferrable, disk_full, encode_png16,
                            encode_tiff16, free_bytes, mb, read_only_mount, remove_orphans)
from ..config import make_section
from ..engine.solve import Solution, SolveError, SolveParams
from ..session import (FolderError, FramesLog, Refused, SessionFolder, apply_amended, grid_config,
                       restack_loses, rewrite_frames_log)
from ..sky import MAX_ATTEMPTS, SWITCH_WAIT_S, SkySolver, reference_hints, sky_status, star_px, stars_on_grid
from ..targets import REFERENCE_FILE, Book, Target, load_reference, match_target, save_reference, separation
from ..text import some
from .config import DaemonParams, WatchParams, session_section
from .watch import Ready, Watcher

log = logging.getLogger("livestack")

STACKED = ("reference", "stacked")
NOTHING_TO_EXPORT = "nothing stacked yet; the export needs at least one stacked frame"
DISK_RETRY_S = 300.0    # a write that failed for want of space is retried when the filesystem has the room it
                        # needs, or after this long anyway (in case the size was misjudged): a failing 24 MP write
                        # costs ~470 MB of card writes, not to be repeated every frame
CATCH_UP_S = 1.0        # while idle and owing writes, look at the free space this often
STARTING = ("livestack is starting: it is loading the stack of the night so far; try again in a few seconds "
            "(GET /api/status says when it is done)")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the web thread may read: built by the worker, never modified after."""

    status: dict                  # JSON-ready counts and the latest frame (see Service._status)
    frames: tuple[dict, ...]      # frames.jsonl records, processing order
    preview: bytes | None         # JPEG of the stretched stack
    generation: int               # changes when frames.jsonl is rewritten (restack, new stack)


# frames.jsonl's fields that place a frame against the grid and its reference (README, frames.jsonl): an excluded
# frame keeps them while the grid stays; once the grid has moved to another reference they describe a placement
# that is no more, and are null — as a frame rejected after it registered has them
PLACEMENT = ("matrix", "shift_x", "shift_y", "rotation", "scale")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class _FilesGone(Exception):
    """A restack met a frame's file gone from the capture folder after the check made before it (_gone_files):
    it stops with the stack unchanged, and the requests are refused as that check refuses them."""

    def __init__(self, files: list[str]):
        super().__init__(", ".join(files))
        self.files = files


class Service:
    """Watch ``watch_dir``, stack into ``out_dir``.  start(); …; stop() finishes the frame in hand, writes the
    outputs and a checkpoint, and returns."""

    def __init__(self, cfg, watch_dir: Path | str, out_dir: Path | str, wp: WatchParams, dp: DaemonParams, *,
                 masters=None):
        self.cfg, self.wp, self.dp, self.masters = cfg, wp, dp, masters
        self.sp = session_section(cfg)
        self.solve_params = make_section(SolveParams, cfg.extra.get("solve", {}), "config: solve")
        self.watch_dir = Path(watch_dir).expanduser().resolve()
        self.folder = SessionFolder(Path(out_dir).expanduser().resolve())
        self.out = self.folder.out
        self.stretch = cfg.stretch      # the page may change the black, midtones and white points
        self.compose = cfg.compose      # … and palette and weights, without restacking
        # … and its choices are the session's: the [compose] and [stretch] keys the page set, by the file that
        # keeps them (session/palette.json, stretch.json), and what of them is on disk (a full disk: a choice
        # applies at once, its file is written when there is room)
        self._page: dict[str, dict] = {"palette": {}, "stretch": {}}
        self._saved: dict[str, dict] = {"palette": {}, "stretch": {}}
        self.files: queue.Queue[Ready] = queue.Queue()
        self._commands: collections.deque[tuple] = collections.deque()   # (future, method, args), under _cmd_lock
        self._cmd_lock = threading.Lock()
        self._cmd_closed = False         # the worker has ended: no command is taken any more (under _cmd_lock)
        self._export: tuple[tuple[str, str], Future] | None = None    # the export being made (export())
        self._export_lock = threading.Lock()
        # exclude/include: the set the accepted requests lead to, and how many are not answered yet (callers'
        # threads and the worker, under _excl_lock)
        self._excl_lock = threading.Lock()
        self._wanted: set[str] = set()
        self._excl_open = 0
        self._stopping = threading.Event()
        # the pause (pause()/resume(), any thread, under _pause_lock): since when (ISO UTC), and what OUT/paused.json
        # says — written at once by the caller; on a full or read-only disk owed, and written by the worker
        self._pause_lock = threading.Lock()
        self._paused = False
        self._processing: str | None = None     # the file the worker is on (its path in the watch folder)
        self._pause_since: str | None = None
        self._pause_on_disk: str | None = None
        self._cond = threading.Condition()
        self._changes = 0
        # the latest refusal of work answered before it was done (follow()): {id, request, error, time}, under
        # _cond; its id counted from this start's clock, as the preview's: a page open across a restart does not
        # take the first one after it for one it has shown
        self._refused: dict | None = None
        self._refused_id = time.time_ns() // 1_000_000 % 2 ** 31
        self._closing = False
        # frames.jsonl's version for the page (refetched whole when it changes): counted from this start's clock,
        # so that a page open across a restart — whose resume may have rewritten the log — reads it again
        self._generation = time.time_ns() // 1_000_000 % 2 ** 31
        self.started = _now()
        self._snap = Snapshot(self._starting_status(), (), None, self._generation)
        self._thread = threading.Thread(target=self._run, name="livestack-worker", daemon=True)
        self.error: BaseException | None = None
        self.watcher: Watcher | None = None
        # worker-owned state
        self.engine: Engine | None = None
        self.records: list[dict] = []
        self.excluded: set[str] = set()
        self._engine_excluded: set[str] = set()   # the exclusions the engine's stack was built with
        self._preview: bytes | None = None
        # counted from this start's clock too: a page open across a restart that saw the last run's id again kept
        # the last run's image
        self._preview_id = time.time_ns() // 1_000_000 % 2 ** 31
        self._state = "starting"
        self._restack: dict | None = None
        self._since_ckpt = 0
        self._ckpt_stale = False         # frames.jsonl's lines rewritten under the checkpoint: one is due now
        self._last_ckpt = time.monotonic()
        self._ckpt_cost = 0.0           # seconds the last checkpoint took
        self._preview_dirty = False     # frames stacked since preview.jpg was drawn
        self._last_preview = 0.0
        self._preview_cost = 0.0        # seconds the last preview took (drawn, published, saved)
        self._fits_dirty = 0
        self._last_fits = 0.0
        self._fits_cost = 0.0           # seconds the last stack.fits took
        self._fits_rate = 0.0           # … and its bytes a second: a first checkpoint's cost is estimated from it
        self._restacks = 0              # restacks completed since start
        # what is on disk: frames.jsonl holds records[:_logged] (None: to be rewritten whole, after a restack);
        # excluded.json holds _saved_excluded (None: something unreadable); preview.jpg is older than _preview
        # when _preview_unsaved
        self._logged: int | None = 0
        self._saved_excluded: set[str] | None = set()
        self._preview_unsaved = False
        self._blocked: dict[Path, tuple[DiskFull, float]] = {}   # writes owed for want of space, last attempt
        self._disk: dict | None = None  # {"error", "since"} while any write is owed
        self._last_catch_up = 0.0
        self._ckpt_bytes: int | None = None   # what the checkpoint costs (its arrays), last estimate
        self._ckpt_frames: int | None = None  # frames.jsonl lines the last checkpoint written covers
        self._ckpt_capped = False
        self._ckpt_limit: int | None = None   # a checkpoint this large met EFBIG (FAT32: 4 GB at most a file)
        self._out_id: tuple[int, int] | None = None   # the session folder's (st_dev, st_ino) at start
        # targets: the book of OUT/targets.json; frames that did not register onto the current target and wait
        # for the verdict (another target, or rejected); files to process before the queue (after a switch)
        self.book: Book | None = None
        self._held: list[tuple[Ready, FrameRecord, bool]] = []     # (…, good: counts towards a new target)
        self._redo: collections.deque[Ready] = collections.deque()
        self._ref_saved = False          # session/reference.json written (an owed write on a full disk)
        self._ref_named = False          # the target named, and its plate solve begun, from its reference
        self._refs: dict[int, dict | None] = {}       # archived targets' reference.json, read once
        # the current target's plate solve (sky.py) and what the page shows of it
        self._solver: SkySolver | None = None
        self._sky: dict | None = None
        self._sky_hints = None
        self._sky_object: str | None = None

    # ------------------------------------------------------------------ life cycle

    def _starting_status(self) -> dict:
        """The status while start() loads the session (the page is served meanwhile): the fields of _status(), null
        where only the loaded session knows them — the counts too: the night's frames are not known yet, not 0 —,
        and `starting` saying what is being loaded."""
        try:
            ckpt = self.folder.checkpoint
            what = f"loading the stack of the night so far ({ckpt.relative_to(self.out)}, {mb(ckpt.stat().st_size)})"
        except OSError:               # none (a new session), or the folder is not there yet
            what = "loading the session"
        unknown = ("processing", "stacked", "rejected", "failed", "excluded", "frames", "integration_s",
                   "first_frame_time", "last_frame_time", "last_processed", "current", "last_rejected", "last",
                   "last_failed", "reference", "grid", "target", "sky", "palette", "restack", "disk", "stretch",
                   "preview_id")
        return {**dict.fromkeys(unknown), "state": "starting", "starting": what, "targets": [], "held": [],
                "filters": [], "restacks": 0, "has_stack": False, "generation": self._generation,
                "checkpoint": {"bytes": None, "frames": None, "max_mb": self.dp.checkpoint_max_mb or None,
                               "capped": False},
                "session_started": self.started, "watch": str(self.watch_dir), "out": str(self.out),
                "updated": _now()}

    def _written_since(self) -> None:
        """Say (once, at start) which files of the capture folder were written after the frame of their name was
        stacked: frames are known by their path, so a night captured while the daemon was stopped under the names
        of the last night's files (a capture numbering from light_0000 again in the folder emptied of them) was
        never stacked and nothing said so.  The watcher says the same of such files made while it runs."""
        later = []
        for d in self.records:
            rel, when = d.get("path") or d["file"], d.get("processed")
            try:
                t = dt.datetime.fromisoformat(when).timestamp() if when else None
                mtime = (self.watch_dir / rel).stat().st_mtime
            except (OSError, ValueError, TypeError, OverflowError):
                continue
            if t is not None and mtime > t + 2.0:          # (processed: whole seconds)
                later.append(rel)
        if later:
            log.warning("livestack: %d file%s of the capture folder %s written after the frame of %s name was "
                        "processed (%s%s): new frames under names the session already has are not stacked (frames "
                        "are known by their path) — give each night its own folder (`--recursive` watches them "
                        "all), or have the capture number its files on; files only changed in place (a plate "
                        "solver writing its WCS) lose nothing", len(later), "s" * (len(later) != 1),
                        "were" if len(later) != 1 else "was", "their" if len(later) != 1 else "its",
                        ", ".join(later[:3]), ", …" if len(later) > 3 else "")

    @property
    def starting(self) -> bool:
        """start() has not started the worker yet: the session is being loaded, or the start failed."""
        return self._thread.ident is None

    def _refuse_starting(self) -> None:
        if self.starting:
            raise Refused(STARTING, 503)

    def start(self) -> str:
        """Resume the session and start the worker and the watcher.  Returns the one-line resume note.
        Raises SessionError / FileNotFoundError with one line naming the folder; FolderError when the session
        folder cannot be one (a configuration error).  A full or read-only disk is not an error: the writes wait
        for it, as they do mid-night."""
        if not self.watch_dir.is_dir():
            raise FileNotFoundError(f"{self.watch_dir}: watch folder does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise FolderError(f"{self.out}: not a folder; the session folder must be one")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:   # a file on the way, no permission, a read-only or full parent: no folder to wait on
            raise FolderError(f"{self.out}: cannot make the session folder ({err.strerror or err})") from err
        st = os.stat(self.out)
        self._out_id = (st.st_dev, st.st_ino)
        try:
            self._probe()
            unwritable = None
        except DiskFull as full:     # met as mid-night: the page and the status say it, the writes wait
            mount = read_only_mount(self.out) if full.code == errno.EROFS else None
            if mount is not None:    # no remount mends it: the night would be stacked for nothing
                raise FolderError(
                    f"{self.out}: cannot write in the session folder: {mount} is mounted read-only here while its "
                    "filesystem is writable (systemd's ProtectSystem=strict: is the folder in the unit's "
                    "ReadWritePaths=?)") from None
            unwritable = full
        self._remove_orphans()
        self.book = Book.open(self.out)          # finishes a switch of targets a crash interrupted
        r = self._open_current()
        # paused before the restart (a crash, an out-of-memory kill, a power blip): still paused — the frames
        # the user paused for (a slew, focusing, a meridian flip) are not stacked behind their back
        since = self.folder.paused()
        if since is not None:
            self._paused, self._pause_since, self._pause_on_disk = True, since, since
        if unwritable is not None:
            self._block(self._probe_key, unwritable)
        self._save_excluded()                    # owed by _open_current: written now, or when the disk takes it
        # files of every target's session (and of "new stack" ignore lists) are not stacked again
        known = {d.get("path") or d["file"] for d in self.records} | self.folder.ignored() | self.book.known_files()
        known |= self._keep_unread()
        poison = self.folder.inflight()
        # (not a frame whose line was dropped to be stacked again: the engine finished it before — the starts
        # that did not finish it were kills or power cuts, and skipping it would lose a good frame)
        if poison and poison["attempts"] >= self.dp.max_attempts and poison["path"] not in known \
                and self._dropped.get(poison["path"], {}).get("index") is None:
            # Earlier runs died on this file (an engine bug, not a bad file — those are recorded as failed):
            # record it instead of crash-looping under systemd, and carry on with the night.
            rel = poison["path"]
            self._append(FrameRecord(file=Path(rel).name, status="failed",
                                     reason=f"processing it stopped livestack {poison['attempts']} times in a "
                                            f"row; skipped (see the journal for the error)"), rel)
            self.engine.count_failed()
            self._since_ckpt += 1     # a checkpoint must cover its line, or the next start runs the file again
            known.add(rel)
            log.error("livestack: %s stopped the worker %d times in a row; recorded as failed and skipped",
                      rel, poison["attempts"])
            self._best_effort(self.folder.clear_inflight)
        if self.engine.has_stack:
            self._render_preview()
            # the checkpoint may be ahead of the stack files (a crash between a restack's checkpoint and its
            # stack.fits, or during a backlog, where they keep separate schedules): written once, when idle
            self._fits_dirty = max(self._fits_dirty, 1)
        self._sky_begin()
        self._written_since()
        self._state = "idle"
        self._publish()
        self.watcher = Watcher(self.watch_dir, self.wp, self.files, known=known, exclude=[self.out],
                               on_change=self._notify)
        self._thread.start()
        self.watcher.start()
        log.log(NOTICE, "livestack: %s; watching %s, session %s", r.note, self.watch_dir, self.out)
        if self._paused:
            log.log(NOTICE, "livestack: paused before the restart%s: new frames wait, not stacked, until POST "
                            "/api/resume or the page's Resume", f" (since {since})" if since else "")
        return r.note

    def _keep_unread(self) -> set[str]:
        """The lines after the checkpoint (all of them, when the start restacks) whose frames are out of the stack —
        excluded, rejected — and whose files are gone (deleted from the card since): kept as they were, where
        their files, queued again, would never be found and their lines — why they were left out — would be lost.
        A rejection counts as its filter's (Engine.count_unread_rejection).  Returns their paths."""
        kept = set()
        regrid = self._dropped_reference_excluded()
        for rel, d in self._dropped.items():
            if self._present(d):
                continue
            if rel in self.excluded:
                rec = self._excluded_record(rel, d)
            elif d.get("status") == "rejected":
                rec = FrameRecord.from_dict({**d, "index": self.engine.count_unread_rejection(d.get("filter"))})
            else:
                continue        # (a stacked frame's file gone: the start's restack_loses kept the checkpoint)
            if regrid:
                for k in PLACEMENT:   # the grid it was registered to is no more
                    setattr(rec, k, None)
            self._append(rec, rel)
            self._since_ckpt += 1
            kept.add(rel)
        return kept

    def _dropped_reference_excluded(self) -> bool:
        """The reference of the lines after the checkpoint is excluded: the restack's grid is another."""
        return any(d.get("status") == "reference" and rel in self.excluded for rel, d in self._dropped.items())

    def _excluded_record(self, rel: str, old: dict) -> FrameRecord:
        """An excluded frame's record: its measurements (``old``: its line before) kept — the plots still show why
        it was excluded."""
        return FrameRecord.from_dict({**old, "file": old.get("file") or Path(rel).name, "status": "excluded",
                                      "reason": "excluded by the user", "weight": None})

    def _open_current(self):
        """Resume the session in OUT/ (the current target's): the engine, its records and exclusions."""
        r = self.folder.resume(self.cfg, masters=self.masters, present=self._present)
        self.engine, self.records = r.engine, list(r.records)
        # the lines after the checkpoint, by file: an excluded one, queued again, keeps its measurements
        self._dropped = {d.get("path") or d["file"]: d for d in r.dropped}
        self._logged = None if r.log_stale else len(self.records)   # None: frames.jsonl is rewritten whole
        self._ckpt_frames = r.checkpointed     # what a crash now would resume from, as the status says it
        self.excluded = self.folder.excluded() if r.excluded is None else set(r.excluded)
        # excluded.json unreadable and left in place (a read-only disk): what stands in for it is a write owed;
        # so are the checkpoint's exclusions kept over excluded.json's (an exclusion that would lose files gone)
        self._engine_excluded = set(self.excluded)
        self._saved_excluded = None if self.folder.excluded_owed or r.excluded is not None else set(self.excluded)
        with self._excl_lock:
            self._wanted = set(self.excluded)
        self.flog = FramesLog(self.folder.frames)
        # the palette and the stretch chosen on the page for this target's session, over the config's
        self._page["palette"], self.compose = self.folder.palette(self.cfg.compose)
        self._page["stretch"], self.stretch = self.folder.stretch(self.cfg.stretch)
        self._saved = {k: dict(v) for k, v in self._page.items()}
        self._ref_saved = (self.folder.dir / REFERENCE_FILE).exists()
        self._ref_named = self.engine.has_stack
        if r.excluded is not None:
            self._save_excluded()     # now, or when the disk takes it: a restart must not restack without the files
        return r

    @property
    def _probe_key(self) -> Path:
        """The owed "write" that stands for the session folder itself (_probe), among the files' in _blocked."""
        return self.out / ".probe"

    def _probe(self) -> None:
        """Write, fsync and remove a small file in the session folder.  At start it tells a folder that takes no
        writes (read-only, full: DiskFull naming the folder, waited out like a mid-night one) from one that
        never will (no permission: FolderError) — before a frame comes, so that the page says it at once.
        So too for session/ and frames.jsonl, which a frame writes in and appends to: left by another user (a
        `sudo livestack run` once), they stopped the worker at the first frame with a traceback, and systemd
        restarted it into the same stop every 5 s."""
        where = self.out
        try:
            for where in (self.out, self.folder.dir):
                if where == self.out or where.is_dir():
                    fd, tmp = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=where)
                    try:
                        os.write(fd, b"\0" * 4096)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                        os.unlink(tmp)
            where = self.folder.frames
            if where.exists():            # opened for appending, nothing written
                os.close(os.open(where, os.O_WRONLY | os.O_APPEND))
        except OSError as err:
            full = disk_full(err, self.out)
            if full is None:
                why = err.strerror or err
                if where == self.out:
                    raise FolderError(f"{self.out}: cannot write in the session folder ({why})") from err
                rel = where.relative_to(self.out).as_posix() + "/" * where.is_dir()
                raise FolderError(f"{self.out}: cannot write in the session folder: {rel} ({why}); give its files to "
                                  "the user livestack runs as (chown -R)") from err
            raise full from err

    def _remove_orphans(self) -> None:
        """Temporaries of writes killed mid-way (kill -9, power cut) are never renamed into place: at 24 MP each
        is ~470 MB.  Only the session folder and session/ are cleaned, only of atomic_write_with's names — never
        the capture folder, whose files belong to the capture program."""
        removed = []
        for folder in (self.out, self.folder.dir):
            if folder.resolve() != self.watch_dir:
                try:
                    removed += remove_orphans(folder)
                except OSError as err:     # a read-only disk: they are removed at a later start
                    if disk_full(err, folder) is None:
                        raise
        if removed:
            log.warning("livestack: removed %d temporary files of interrupted writes (%s): %s", len(removed),
                        mb(sum(n for _, n in removed)),
                        ", ".join(str(p.relative_to(self.out)) for p, _ in removed[:5])
                        + (", …" if len(removed) > 5 else ""))

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current frame, write outputs and a checkpoint, stop the threads."""
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ for the web thread (no engine access)

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    def loaded(self) -> Snapshot:
        """The snapshot, for what only the loaded session knows (its frames, targets, preview); Refused (503) while
        start() loads it: the starting snapshot's empty lists would say the night has none.  (start() publishes
        loaded ones before it is done — its preview —, state "starting" still, `starting` null.)"""
        snap = self._snap
        if snap.status["starting"] is not None:
            raise Refused(STARTING, 503)
        return snap

    def status(self) -> dict:
        s = dict(self._snap.status)
        # (not known before start() has read paused.json: null, as the counts)
        s["paused"] = self._paused if s["starting"] is None else None
        if self._paused and s.get("state") == "idle":
            s["state"] = "paused"
        if self._excl_open and s.get("state") not in ("stopping", "starting"):
            # exclude/include requests not answered yet: restacking until the last one is done, never idle between
            s["state"] = "restacking"
            s["restack"] = s.get("restack") or {"done": 0, "total": s.get("frames", 0)}
        s["queued"] = self._queued()
        # the capture folder gone (its USB disk unplugged): said by the watcher as it happens, not with a frame
        s["watch_error"] = self.watcher.problem() if self.watcher is not None else None
        s["refused"] = self._refused
        s["changes"] = self._changes
        return s

    def _queued(self) -> int:
        """Files found and not taken yet: queued, to be stacked again after a switch of targets, still settling."""
        return self.files.qsize() + len(self._redo) + (self.watcher.pending() if self.watcher else 0)

    def wait_change(self, seen: int, timeout: float) -> int | None:
        """Block until something changed since ``seen`` (returns the new counter), None when closing."""
        with self._cond:
            self._cond.wait_for(lambda: self._changes != seen or self._closing, timeout)
            return None if self._closing else self._changes

    def pause(self) -> dict:
        """Stop taking new frames (they wait in the queue) — across restarts too: kept in OUT/paused.json."""
        self._refuse_starting()          # (start() reads paused.json)
        with self._pause_lock:
            if self._paused:
                raise Refused("already paused; did you mean POST /api/resume?")
            self._paused, self._pause_since = True, _now()
            self._write_pause_now()
        self._notify()
        return self.status()

    def resume(self) -> dict:
        self._refuse_starting()
        with self._pause_lock:
            if not self._paused:
                raise Refused("not paused; did you mean POST /api/pause?")
            self._paused, self._pause_since = False, None
            self._write_pause_now()
        self._notify()
        return self.status()

    def _write_pause_now(self) -> None:
        """(The caller's thread, under _pause_lock.)  paused.json brought up to the pause before the answer, so that
        a kill right after it keeps it.  A write that fails — a full or read-only disk — fails neither pause nor
        resume: the pause applies in memory and the worker writes the file when it can (_save_pause), saying why
        in the status meanwhile, as for the other owed writes."""
        try:
            self._write_pause()
        except OSError:
            pass

    def _write_pause(self) -> None:
        """(Under _pause_lock.)  Write paused.json when it does not say the pause."""
        if self._pause_since == self._pause_on_disk:
            return
        want = self._pause_since
        self._same_folder(self.folder.pause_file)
        self.folder.set_paused(want)
        self._pause_on_disk = want

    def exclude(self, name: str, exclude: bool = True) -> Future:
        """Exclude (include) a frame: the stack is rebuilt without (with) it.  Requests arriving while others
        wait or restack join them — one restack reaches the final set and every future resolves with the status
        after it.  Refused when it would change nothing and nothing is pending."""
        self._refuse_starting()          # (not "no frame named …": the frames are not loaded yet)
        snap = self._snap                # one snapshot: the frame and its target (a switch may publish meanwhile)
        rel = self._find(name, snap.frames)
        with self._excl_lock:
            if exclude == (rel in self._wanted) and not self._excl_open:
                raise Refused(f"{name} is {'already' if exclude else 'not'} excluded")
            keep = (self._wanted | {rel}) if exclude else (self._wanted - {rel})
        # refused here too, not only by the worker: busy with a frame, it answered after the page's 2 s (202), and
        # the refusal reached the log only (the files are looked at in this thread: the web's I/O pool)
        was = {d.get("path") or d["file"] for d in snap.frames if d["status"] == "excluded"}
        if gone := self._gone_files(snap.frames, keep, was):
            raise Refused(self._gone_sentence(gone))
        with self._excl_lock:
            target = snap.status.get("target")     # the target whose frame it is
            fut = self._submit(self._cmd_exclude, rel, exclude, target and target["id"])
            self._wanted = (self._wanted | {rel}) if exclude else (self._wanted - {rel})
            self._excl_open += 1
        return fut

    def set_stretch(self, black=None, midtones=None, white=None) -> Future:
        return self._submit(self._cmd_stretch, black, midtones, white)

    def set_palette(self, palette: str | None = None, weights: dict | None = None,
                    hues: dict | None = None) -> Future:
        """Change the composite's palette, per-filter weights or hues (ValueError: one sentence) and redraw."""
        changes = {k: v for k, v in {"palette": palette, "weights": weights, "hues": hues}.items() if v is not None}
        dataclasses.replace(self.compose, **changes)     # validated here, in the caller's thread
        return self._submit(self._cmd_palette, changes)

    def export(self, fmt: str, mode: str) -> Future:
        """A full-resolution export, made by the worker between frames — one at a time: a request for the one
        being made shares it (its bytes too), another is refused (503) until it is done.  Anyone who can load
        the page can ask (a GET; an <img> on another site may too), and each export of a 24 MP stack takes
        seconds and ~100 MB: queued without a bound they held the stacking up for as long as they came."""
        with self._export_lock:
            cur = self._export
            if cur is not None and not cur[1].done():
                if cur[0] == (fmt, mode):
                    return cur[1]
                raise Refused(f"an export ({cur[0][0]}, {cur[0][1]}) is being made; ask again when it is done",
                              503)
            fut = self._submit(self._cmd_export, fmt, mode)
            self._export = ((fmt, mode), fut)
        # answered, it is forgotten: its bytes (~144 MB for a 24 MP 16-bit TIFF) stayed held until the next export
        fut.add_done_callback(self._export_done)    # (outside the lock: a future already done calls it at once)
        return fut

    def check_export(self) -> None:
        """Refused as an export would be before it is made (HEAD /api/export answers without making one)."""
        if not self.status()["stacked"]:
            raise Refused(NOTHING_TO_EXPORT)

    def _export_done(self, fut: Future) -> None:
        with self._export_lock:
            if self._export is not None and self._export[1] is fut:
                self._export = None

    def new_session(self) -> Future:
        return self._submit(self._cmd_new_session)

    def follow(self, fut: Future, request: str) -> None:
        """The caller answered before ``fut`` was done (202 Accepted): a refusal that comes after (the worker's:
        a frame of the stack gone from the capture folder, an archived target's frame) is kept for the status as
        ``refused`` — it reached the log only, and the user who tapped "exclude" never learnt it was not done.
        ``request`` names it for the user ("exclude IMG_0042.CR3")."""
        def done(f: Future) -> None:
            err = None if f.cancelled() else f.exception()
            if isinstance(err, Refused):
                with self._cond:
                    self._refused_id += 1
                    self._refused = {"id": self._refused_id, "request": request, "error": str(err), "time": _now()}
                    self._changes += 1
                    self._cond.notify_all()

        fut.add_done_callback(done)      # (a future done already: called at once, here)

    def withdraw(self, fut: Future) -> bool:
        """Take back a command the worker has not begun (its caller gave up waiting: the worker was busy with a
        restack of the night, a long frame): True when it is out of the queue and cancelled, never to be carried
        out; False when the worker has taken it (it is running, or done).  Carried out after the caller had
        answered "try again", a new session was made twice for one user's retry.  Exclude/include requests are
        never withdrawn: each is counted in _excl_open until the worker answers it."""
        with self._cmd_lock:
            # (under the lock the worker takes a command with: found here, the worker has not taken it)
            i = next((i for i, c in enumerate(self._commands) if c[0] is fut), None)
            if i is None or self._commands[i][1] == self._cmd_exclude:
                return False
            del self._commands[i]
        fut.cancel()                     # (its callbacks run: an export withdrawn is forgotten, _export_done)
        return True

    def _find(self, name: str, frames) -> str:
        for d in frames:
            if name in (d.get("path"), d["file"]):
                return d.get("path") or d["file"]
        shown = repr(name) if len(name) <= 120 else repr(name[:100]) + "…"     # (a 64 KiB name: not all of it)
        raise Refused(f"no frame named {shown} in this session; see GET /api/frames", 404)

    def _submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._cmd_lock:
            # checked under the lock the worker's last look at the queue takes too (_run's finally): checked
            # before it, a request whose check passed as the daemon stopped was queued after that last look —
            # its future never answered, its caller (a page's POST during a SIGTERM) waiting out its timeout
            self._refuse_starting()
            if self._cmd_closed or self._stopping.is_set() or not self._thread.is_alive():
                raise Refused("the daemon is stopping", 503)
            self._commands.append((fut, fn, args))
        return fut

    def _next_command(self) -> tuple | None:
        with self._cmd_lock:
            return self._commands.popleft() if self._commands else None

    def _take_excludes(self) -> list[tuple]:
        """Every queued exclude/include request ahead of a "new stack" (which they must not cross), in order;
        the other commands stay queued in theirs."""
        with self._cmd_lock:
            taken, kept, barrier = [], collections.deque(), False
            for c in self._commands:
                if not barrier and c[1] == self._cmd_exclude:
                    taken.append(c)
                else:
                    barrier = barrier or c[1] == self._cmd_new_session
                    kept.append(c)
            self._commands = kept
        return taken

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._do_commands()
                self._save_pause()
                if self._paused:
                    self._idle()         # what the frame before the pause left to write (stack.fits, the checkpoint)
                    self._stopping.wait(0.1)
                    continue
                if self._redo:
                    item = self._redo.popleft()
                else:
                    try:
                        item = self.files.get(timeout=0.1)
                    except queue.Empty:
                        self._idle()
                        continue
                self._frame(item)
            self._finish()
        except BaseException as err:  # a bug: no checkpoint from a half-updated engine; systemd restarts us
            self.error = err
            log.exception("livestack: worker stopped by an error")
        finally:
            with self._cmd_lock:
                self._cmd_closed = True      # no command is queued after this: each queued one is answered below
            while (cmd := self._next_command()) is not None:
                fut, fn, _ = cmd
                if fn == self._cmd_exclude:
                    with self._excl_lock:
                        self._excl_open -= 1
                fut.set_exception(Refused("the daemon is stopping", 503))
            with self._cond:
                self._changes += 1
                self._cond.notify_all()

    def _nothing_waits(self) -> bool:
        """No file queued — nor one to be stacked again after a switch of targets (_redo)."""
        return self.files.empty() and not self._redo

    def _do_commands(self) -> None:
        while (cmd := self._next_command()) is not None:
            fut, fn, args = cmd
            if fn == self._cmd_exclude:
                self._exclusions(cmd)
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except Refused as err:
                fut.set_exception(err)
            except Exception as err:      # noqa: BLE001 — see below
                if fn not in (self._cmd_export, self._cmd_stretch, self._cmd_palette):
                    fut.set_exception(err)
                    raise                 # a half-done change of the session: stop, the restart resumes
                # these only read the stack (an export of 24 MP on a Pi may not find the memory): the request
                # fails, the night goes on
                log.error("livestack: %s failed: %s: %s", fn.__name__.lstrip("_").replace("cmd_", ""),
                          type(err).__name__, err)
                fut.set_exception(Refused(f"failed: {type(err).__name__}: {err}"[:300], 500))

    def _frame(self, item: Ready) -> None:
        """One file from the watcher: the status says so while it is worked on (``processing``: a 24 MP frame takes
        1–2 s on a Pi, and the page said "idle" all the while: its status was published only once it was done)."""
        self._state, self._processing = "processing", item.rel
        self._publish()
        try:
            self._handle(item)
        finally:
            if self._processing is not None:    # a frame held, or handed to another target: said done
                self._processing = None
                self._publish()

    def _handle(self, item: Ready) -> None:
        if self._blocked:
            self._catch_up()         # space may be back: what is owed goes first (frames.jsonl in order)
        if item.rel in self.excluded:
            # measured before a restart that restacks (kill -9 during an exclusion's restack): its measurements
            # kept, as a restack keeps them — the plots still show why it was excluded
            rec = self._excluded_record(item.rel, self._dropped.get(item.rel) or {"file": item.path.name})
            if self._dropped_reference_excluded():
                for k in PLACEMENT:   # its reference excluded too: the grid it was registered to is no more
                    setattr(rec, k, None)
        elif item.reason is not None:
            rec = FrameRecord(file=item.path.name, status="failed", reason=item.reason)
            self.engine.count_failed()   # counted like the engine's own failures (NFAILED in the header)
        else:
            if self._slewed(item):
                return               # another target is current now: the frame is processed there
            self._best_effort(self.folder.mark_inflight, item.rel)
            hold = self.sp.new_target_after > 0 and self.engine.has_stack
            rec = self.engine.process(item.path, hold=hold, next_path=self._next_path())
            if rec.status == "unregistered":
                if self.engine.last_judged is None or self._held:
                    self._hold(item, rec, good=self.engine.last_judged is None)
                    return
                self.engine.count_rejected(rec)    # a bad frame, nothing held: an ordinary rejection
            self._settle_held()
            if self.engine.has_stack and not self._ref_named:
                self._new_reference()
            elif self.engine.has_stack and not self._ref_saved:
                self._save_reference()
        self._append(rec, item.rel)
        self._best_effort(self.folder.clear_inflight)
        self._since_ckpt += 1
        if item.reason is not None:      # the watcher's verdict: the engine never saw the file
            log.warning("failed %s: %s", item.rel, item.reason)
        elif rec.status not in ("failed", "rejected"):   # those the engine has logged, with the reason
            log.info("%s %s%s", rec.status, item.rel, f": {rec.reason}" if rec.reason else
                     f" fwhm {rec.fwhm} px, {rec.stars} stars ({rec.seconds} s)")
        if self.engine.has_stack:
            self._fits_dirty += 1        # counts and header change with every record, pixels with stacked ones
        if rec.status in STACKED:
            self._preview_dirty = True
            # one frame at a time (live): draw now; a backlog: at most every preview_s and within its share of
            # the time (a 24 MP preview takes ~0.2 s, a quarter of a frame), and at once when the queue runs
            # dry (_idle)
            if self._nothing_waits() or self._spaced(self._last_preview, self.dp.preview_s, self._preview_cost, 2):
                self._render_preview()
            if (self._fits_dirty >= self.dp.outputs_every
                    and self._spaced(self._last_fits, self.dp.outputs_s, self._fits_cost, 4)):
                self._write_fits()
        if self._solver is not None and rec.status in STACKED:
            self._solver.frames_since += 1
        self._sky_poll()
        if self._checkpoint_due():
            self._checkpoint()
        self._state = "idle" if self._nothing_waits() else "processing"
        self._processing = None
        self._publish()

    # ------------------------------------------------------------------ targets

    def _slewed(self, item: Ready) -> bool:
        """A frame whose header says the mount points more than slew_deg away from the current target's
        pointing belongs to another target: switch before processing it (to the archived target it points at,
        or a new one).  True when it was switched (the frame is queued first for the new target).  A target with
        nothing stacked yet (every frame rejected: clouds) has the pointing of the frame that slewed to it."""
        cur = self.book.current
        # the mount's pointing, as in the frame's header
        here = (self.engine.ref.pointing or cur.pointing) if self.engine.has_stack else cur.pointing
        if here is None:
            return False
        pointing = read_pointing(item.path)
        if pointing is None or separation(pointing, here) <= self.sp.slew_deg:
            return False
        self._settle_held()
        near = [(t, separation(pointing, ref.get("pointing") or t.pointing)) for t, ref in self._candidates()
                if ref.get("pointing") or t.pointing]
        near = [t for t, d in sorted(near, key=lambda x: x[1]) if d <= self.sp.slew_deg]
        why = f"{item.rel} points {separation(pointing, here):.2f}° from {cur.name}"
        if not self._switch(near[0] if near else None, [item], why):
            return False
        if not near:     # where the new target is, before any frame of it is stacked (clouds: maybe none will be)
            self.book.current.pointing = [round(v, 6) for v in pointing]
            self._best_effort(self.book.save)
        return True

    def _hold(self, item: Ready, rec: FrameRecord, *, good: bool = True) -> None:
        """A frame that does not register: it returns to an archived target, or it is one of the
        ``new_target_after`` good frames in a row that make a new target, or (when a later frame registers) it is
        rejected after all.  A bad frame (clouds, trails: not ``good``) among them is held too — it breaks no row
        (intermittent clouds on the new field would otherwise reject every frame of it into this target) and
        counts for none; it goes where the good ones go.  Held frames are recorded nowhere yet: a crash meanwhile
        finds them again."""
        self._best_effort(self.folder.clear_inflight)
        # It counts for a new target when it could be its reference: a filter's first frames are judged on
        # nothing, and a narrowband block (L × 4, then SII × 4 of 7-9 stars that do not register) made a new
        # target none of whose frames could be its reference — the L frames after it became target 2's, the
        # night's L split in two.  (Such a frame may still return to an archived target, below.)
        few = (rec.stars or 0) < self.cfg.reject.min_ref_stars
        self._held.append((item, rec, good and not few))
        back = None
        if good:
            e = self.engine
            back = match_target(e.last_stars, e.last_grid.state() if e.last_grid else {}, e.last_pointing,
                                self._candidates(), self.cfg.register, slew_deg=self.sp.slew_deg,
                                rng=np.random.default_rng(self.cfg.engine.seed),
                                here=e.ref.pointing or self.book.current.pointing)
        n = sum(g for _, _, g in self._held)
        if back is not None:
            self._switch(back, [i for i, _, _ in self._held], f"{item.rel} registers onto {back.name}")
        elif n >= self.sp.new_target_after:
            self._switch(None, [i for i, _, _ in self._held],
                         f"{n} good frames in a row do not register onto {self.book.current.name}")
        elif n == 0:
            # nothing held could begin a new target: rejected now, not held for as long as the filter's block
            self._settle_held()
            self._fits_dirty += 1
            self._state = "idle" if self._nothing_waits() else "processing"
            self._publish()
        else:
            why = self.engine.last_judged if not good else f"{rec.stars} stars, too few for a reference" if few else ""
            log.info("held %s: %s (%d of %d for a new target%s)", item.rel, rec.reason, n,
                     self.sp.new_target_after, f"; not counted: {why}" if why else "")
            self._state = "idle" if self._nothing_waits() else "processing"
            self._publish()

    def _settle_held(self) -> None:
        """A frame registered after all: the held ones were just bad frames of this target."""
        for item, rec, _ in self._held:
            self.engine.count_rejected(rec)
            self._append(rec, item.rel)
            self._since_ckpt += 1
        self._held = []

    def _candidates(self) -> list[tuple[Target, dict]]:
        out = []
        for t in self.book.archived():
            if t.id not in self._refs:
                self._refs[t.id] = load_reference(self.book.folder_of(t))
            if self._refs[t.id] is not None:
                out.append((t, self._refs[t.id]))
        return out

    def _new_reference(self) -> None:
        """The current target has its reference: keep what matching needs, and name the target."""
        ref, cur = self.engine.ref, self.book.current
        self._save_reference()
        self._ref_named = True           # once: a reference.json owed (disk full) must not restart the solve
        cur.reference = ref.file
        if ref.pointing is not None and cur.pointing is None:
            cur.pointing = [round(v, 6) for v in ref.pointing]
        if ref.object and cur.named == "order":
            cur.name, cur.named = ref.object, "object"
        self._save_book()
        self._sky_begin()

    def _save_reference(self) -> None:
        if self._guarded(self.folder.dir / REFERENCE_FILE, lambda: save_reference(self.out, self.engine)):
            self._ref_saved = True

    def _save_book(self) -> None:
        cur = self.book.current
        cur.frames, cur.updated = self.engine.n_stacked, _now()
        self._best_effort(self.book.save)

    def _switch(self, to: Target | None, redo: list[Ready], why: str) -> bool:
        """Close the current target — everything it has written, checkpointed — archive it, and make ``to``
        current (None: a new target); then ``redo`` is processed first.  False (and the held frames rejected)
        when the current target's files cannot be completed (disk full)."""
        if self._solver is not None:    # the closing target's solve: its answer goes into the files closed below
            self._solver.finish_young(SWITCH_WAIT_S)
            self._sky_poll()
        self._catch_up()
        self._save_log()
        if self.engine.has_stack:
            self._since_ckpt = max(self._since_ckpt, 1)
            self._fits_dirty = max(self._fits_dirty, 1)
            self._write_fits()
            if self._preview_unsaved or self._preview_dirty:
                self._render_preview()
            self._checkpoint(closing=True)
        if self._blocked:
            log.error("livestack: %s, but %s: the current target is not saved yet; staying on it", why,
                      self._disk["error"])
            self._settle_held()
            return False
        self._save_book()
        old = self.book.current
        try:
            new = self.book.switch(to)
        except OSError as err:
            full = disk_full(err, self.out / "targets.json")
            if full is None:
                raise
            log.error("livestack: %s, but %s; staying on %s", why, full, old.name)
            self._settle_held()
            return False
        self._held = []
        self._refs.pop(new.id, None)
        self._refs.pop(old.id, None)
        r = self._open_current()
        self._sky_begin()
        # the returning target's own frames beyond its checkpoint first (in their order: without a checkpoint its
        # first frame is the reference again, the grid as it was), then the frames that brought it back
        again = [Ready(self.watch_dir / (d.get("path") or d["file"]), d.get("path") or d["file"]) for d in r.dropped]
        self._redo.extendleft(reversed(again + list(redo)))
        self._preview, self._preview_unsaved, self._preview_dirty = None, False, False
        if self.engine.has_stack:
            self._render_preview()
        self._generation += 1
        self._since_ckpt, self._fits_dirty, self._ckpt_stale = 0, 0, False
        self.started = _now()
        # a returning target whose checkpoint is not taken as it is (stacked under other settings, unusable) is
        # stacked again from its files: the start says why, and so does a switch now
        again_why = f" ({r.note})" if to is not None and r.dropped and not r.note.startswith("resumed") else ""
        log.log(NOTICE, "livestack: %s: %s archived in %s; %s %s%s", why, old.name, self.book.get(old.id).folder,
                "resumed" if to is not None else "new target", new.name, again_why)
        self._publish()
        return True

    # ------------------------------------------------------------------ sky coordinates

    def _sky_begin(self) -> None:
        """The current target's sky: its saved solution, else its reference frame's own WCS for now, and a
        plate solve in the background (sky.py)."""
        if self._solver is not None:
            self._solver.cancel()          # another target's, or an earlier reference's
        self._solver, self._sky, self._sky_hints, self._sky_object = None, None, None, None
        e, cur = self.engine, self.book.current
        if not e.has_stack:
            return
        if e.grid.wcs is not None and cur.sky and cur.sky.get("state") == "solved":
            self._sky = cur.sky
            return
        rel = next((d.get("path") or d["file"] for d in self.records if d["status"] == "reference"), None) or \
            next((d.get("path") or d["file"] for d in self.records if d["file"] == e.ref.file), e.ref.file)
        hints, own, obj = reference_hints(self.watch_dir / rel, e.grid, self.solve_params)
        self._sky_hints, self._sky_object = hints, obj
        solver = self._solver = SkySolver(self.solve_params, star_px(e.grid))
        why = solver.available()
        if own is not None:
            e.set_wcs(own)
            self._fits_dirty += 1
            self._sky = sky_status(own, e.grid.shape, source="header", obj=obj,
                                   note=why or "the reference frame's own WCS until a plate solve lands")
        if why is not None:
            self._sky = self._sky or {"state": "off", "note": why}
            log.log(NOTICE if not self.solve_params.enabled else logging.WARNING, "livestack: %s", why)   # off: chosen
            return
        solver.start(*e.ref_stars_on_grid(), e.grid.shape, hints, workdir=None)
        self._sky = self._sky or {"state": "solving", "note": "plate solving the reference frame"}

    def _sky_poll(self) -> None:
        s = self._solver
        if s is None:
            return
        ans = s.poll()
        e, cur = self.engine, self.book.current
        if isinstance(ans, Solution):
            e.set_wcs(ans.wcs)
            self._sky = sky_status(ans.wcs, e.grid.shape, source="solve", seconds=ans.seconds, obj=self._sky_object,
                                   note=ans.note)
            if ans.note:
                log.warning("livestack: %s: %s", cur.name, ans.note)
            cur.pointing, cur.sky = [round(self._sky["ra"], 6), round(self._sky["dec"], 6)], self._sky
            if cur.named == "order" and self._sky.get("object"):
                cur.name, cur.named = self._sky["object"], "catalogue"
            self._save_book()
            self._fits_dirty += 1
            self._since_ckpt = max(self._since_ckpt, 1)      # the WCS is kept by the next checkpoint
            log.log(NOTICE, "livestack: %s plate-solved in %.1f s: RA %s Dec %s, %.2f″/px, field %.2f°×%.2f°, "
                            "rotation %.1f° E of N (%d stars matched, rms %.2f px)", cur.name, ans.seconds,
                            self._sky["ra_hms"], self._sky["dec_dms"], self._sky["scale_arcsec"],
                            self._sky["width_deg"], self._sky["height_deg"], self._sky["rotation_deg"], ans.matched,
                            ans.rms_px)
            self._solver = None
            self._publish()
        elif isinstance(ans, SolveError):
            more = s.attempts < MAX_ATTEMPTS
            log.warning("livestack: plate solve of %s failed: %s%s", cur.name, ans.reason,
                        "; tried again on a later frame" if more else "")
            if self._sky and self._sky.get("source") == "header":
                self._sky = {**self._sky, "note": ans.reason}
            else:
                self._sky = {"state": "failed", "note": ans.reason}
            self._publish()
        elif s.retry_due():
            got = stars_on_grid(e)
            if got is not None and s.start(got[0], got[1], e.grid.shape, self._sky_hints):
                if self._sky.get("source") != "header":
                    self._sky = {"state": "solving", "note": f"plate solving again (attempt {s.attempts})"}
                self._publish()

    def _next_path(self) -> Path | None:
        """The file processed after this one, when one waits (a backlog): the engine reads it ahead."""
        if self._redo:
            nxt = self._redo[0]
        else:
            with self.files.mutex:
                nxt = self.files.queue[0] if self.files.queue else None
        if nxt is None or nxt.reason is not None or nxt.rel in self.excluded:
            return None
        return nxt.path

    def _append(self, rec: FrameRecord, rel: str) -> None:
        d = rec.to_dict()
        d["path"], d["processed"] = rel, _now()
        self.records.append(d)
        if self.engine.amended:      # a filter's first frame judged by the frames after it
            if apply_amended(self.records, self.engine.amended):
                self._logged = None  # frames.jsonl is rewritten whole, the page's list fetched anew
                self._generation += 1
                # and the checkpoint no longer matches its lines (a crash would restack the night): one is due
                # now, whatever the schedule (once per filter and session)
                self._since_ckpt, self._ckpt_stale = max(self._since_ckpt, 1), True
            self.engine.amended.clear()
        self._save_log()

    def _idle(self) -> None:
        self._sky_poll()
        if self._blocked and time.monotonic() - self._last_catch_up >= CATCH_UP_S:
            self._catch_up()
        if self._preview_dirty:
            self._render_preview()
        # stack.fits and the checkpoint (1–1.5 s each at 24 MP) give way to a frame that lands meanwhile: it is
        # stacked first, and they are written at the next idle moment (or, frames streaming in, on their
        # outputs_s / checkpoint_every schedule, which nothing interrupts)
        # (paused, the files waiting are not taken: nothing to give way to — a pause right after a frame kept its
        # stack.fits, the file a user then downloads, a frame short for as long as the pause lasted)
        with deferrable(lambda: not self._paused and not self._nothing_waits()):
            if self._fits_dirty:
                self._write_fits()
            if self._since_ckpt and time.monotonic() - self._last_ckpt >= min(self.dp.checkpoint_s, 5.0):
                self._checkpoint()
        if self._state != "idle":
            self._state = "idle"
            self._publish()

    def _finish(self) -> None:
        self._state = "stopping"
        self._save_pause()         # (a pause owed is written before the next start reads it, if the disk lets it)
        if self._solver is not None:
            self._sky_poll()               # a solution that just landed is kept
            if self._solver is not None:
                self._solver.cancel()
        if self._blocked:
            self._catch_up()
        if self._preview_dirty:
            self._render_preview()
        if self._fits_dirty:
            self._write_fits()
        if self._since_ckpt:
            self._checkpoint()
        self._publish()
        if self._blocked:
            unlogged = len(self.records) - (self._logged or 0)
            owed = sorted(p.name for p in self._blocked if p != self._probe_key)   # (the folder's own check: no file)
            log.error("livestack: stopping with %s%s%s", self._disk["error"],
                      f": {', '.join(owed)} not written" if owed else "",
                      f"; {unlogged} frames not in frames.jsonl are stacked again at the next start" if unlogged
                      else "")
        # files found but not stacked (queued behind a backlog or a pause, still being written, held for a verdict,
        # a returning target's to stack again): no list names them, so the next start takes them — said, for the
        # journal's reader who wonders where they went
        waiting = self._queued() + len(self._held)
        log.log(NOTICE, "livestack: stopped; %d stacked, %d rejected, %d failed; outputs in %s%s",
                        self.engine.n_stacked, self.engine.n_rejected, self.engine.n_failed, self.out,
                        f"; {waiting} file{'s' * (waiting != 1)} found but not stacked yet: taken at the next start"
                        if waiting else "")

    # ------------------------------------------------------------------ writes, and a full disk

    def _guarded(self, path: Path, write, needed=0) -> bool:
        """Run ``write()``, which writes ``path`` (atomically, or appends).  False when the disk is full — the
        write is then owed and retried (_catch_up) once the filesystem has the room it needed — or when it is
        owed and the room is not there yet.  ``needed``: bytes, or a function giving them (asked on failure)."""
        if not self._may_write(path):
            return False
        try:
            self._same_folder(path)
            write()
        except WriteDeferred:
            log.debug("%s: deferred (a frame is waiting)", path.name)
            return False
        except OSError as err:
            full = disk_full(err, path, needed() if callable(needed) else needed)
            if full is None:
                raise
            self._block(path, full)
            return False
        if path in self._blocked:
            self._unblock(path)
        return True

    def _same_folder(self, path: Path) -> None:
        """Raise DiskFull (not writable) when the session folder is no longer the one the daemon started with: its
        disk unmounted (pulled out: systemd unmounts it), the folder deleted.  The writes would make a new one —
        on the SD card under the mount point — with a frames.jsonl of the later frames only, beside a checkpoint
        that counts them all; they wait instead until the folder is back."""
        if self._out_id is None:
            return
        try:
            st = os.stat(self.out)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) != self._out_id and self._ours_again():
            log.log(NOTICE, "livestack: the session folder %s is back (its disk mounted again, as another device)",
                    self.out)
            self._out_id = (st.st_dev, st.st_ino)
        if st is None or (st.st_dev, st.st_ino) != self._out_id:
            raise DiskFull(path, 0, errno.ENODEV, why=f"the session folder {self.out} is gone or is another "
                                                      f"folder now (its disk unmounted?)")

    def _ours_again(self) -> bool:
        """The folder now at OUT, another one by its device and inode numbers, is this session's all the same: its
        disk plugged back in and mounted as another device (sdb1 for the sda1 still held by the old mount), or a
        filesystem that numbers its inodes anew at each mount (exFAT, FAT) — the writes waited for it all night, the
        page saying it gone.  Known by its session/ and, once a frame is on disk, frames.jsonl's first frame; an
        empty mount point (the disk still out) has neither.  Before a frame is on disk, a folder whose frames.jsonl
        holds frames is another session's (the disk plugged in after the daemon started in its empty mount
        point): not written in — its frames.jsonl, stack and checkpoint would have been this session's."""
        try:
            if not self.folder.dir.is_dir():
                return False
            try:
                with open(self.folder.frames, "rb") as f:
                    line = f.readline()
            except FileNotFoundError:
                line = b""
            if not self.records or not (self._logged is None or self._logged > 0):
                return not line.strip()
            first = json.loads(line)
            return isinstance(first, dict) and first.get("path", first.get("file")) == \
                self.records[0].get("path", self.records[0]["file"])
        except (OSError, ValueError):
            return False

    def _may_write(self, path: Path) -> bool:
        """False while ``path``'s write is owed and its filesystem has less room than it needs — or, when the
        filesystem took no writes at all (read-only, its disk gone), while its folder still says so."""
        owed = self._blocked.get(path)
        if owed is None or time.monotonic() - owed[1] >= DISK_RETRY_S:
            return True
        if not owed[0].space:     # a try fails at once (EROFS, a device gone): cheap enough for every frame
            return os.access(path.parent, os.W_OK)
        try:
            return free_bytes(path.parent) >= max(owed[0].needed, 4096)
        except OSError:
            return True

    def _block(self, key: Path, full: DiskFull) -> None:
        first = self._disk is None
        self._blocked[key] = (full, time.monotonic())
        self._disk = {"error": self._worst_owed(), "since": self._disk["since"] if self._disk else _now()}
        if first:   # once, not per frame: the status says it until space returns
            log.error("livestack: %s; stacking goes on in memory, the files are written when %s", full,
                      "space returns" if full.space else "the disk takes writes again")
        self._publish()

    def _unblock(self, key: Path) -> None:
        self._blocked.pop(key, None)
        if self._blocked:
            self._disk = {**self._disk, "error": self._worst_owed()}
        elif self._disk is not None:
            log.log(NOTICE, "livestack: disk %s (%s since %s); frames.jsonl and the outputs are up to date",
                            *(("space back", "full") if self._disk["error"].startswith("disk full")
                              else ("writable again", "not writable")), self._disk["since"])
            self._disk = None
        self._publish()

    def _worst_owed(self) -> str:
        """The owed write that needs the most room, as the page says it ("disk full: <path>, N MB needed") — or,
        while the session folder takes no writes at all since the start, the folder ("cannot write <out>: …")."""
        probe = self._blocked.get(self._probe_key)
        if probe is not None and not probe[0].space:
            return str(probe[0])
        return str(max((f for f, _ in self._blocked.values()), key=lambda f: f.needed))

    def _catch_up(self) -> None:
        """Write what a full disk left owed, in the order a restart needs it: the exclusions, frames.jsonl, then
        the outputs and the checkpoint (which must not count frames that frames.jsonl lacks)."""
        self._last_catch_up = time.monotonic()
        if self._probe_key in self._blocked:      # the folder took no writes at start
            self._guarded(self._probe_key, self._probe)
        self._save_excluded()
        self._save_page("palette")
        self._save_page("stretch")
        self._save_pause()
        self._save_log()
        if self.engine.has_stack and not self._ref_saved:
            self._save_reference()
        if self._fits_dirty:
            self._write_fits()
        if self._preview_unsaved:
            self._save_preview()
        if self._since_ckpt:
            self._checkpoint()

    def _best_effort(self, fn, *args) -> None:
        """The crash-loop guard's inflight.json: without space it is skipped (a file that then stopped the
        worker would be retried once more than max_attempts), not a reason to stop."""
        try:
            self._same_folder(self.folder.inflight_file)
            fn(*args)
        except OSError as err:
            if disk_full(err, self.folder.inflight_file) is None:
                raise

    def _save_pause(self) -> bool:
        """(The worker.)  Write paused.json when pause()/resume() could not (a full or read-only disk): the status
        says it owed meanwhile.  Tried every CATCH_UP_S at most — also while paused, when nothing else is tried."""
        if self._pause_since == self._pause_on_disk:
            return True
        owed = self._blocked.get(self.folder.pause_file)
        if owed is not None and time.monotonic() - owed[1] < CATCH_UP_S:
            return False
        with self._pause_lock:
            return self._guarded(self.folder.pause_file, self._write_pause)

    def _save_log(self) -> bool:
        """Bring frames.jsonl up to ``records``: append the lines it lacks, or rewrite it after a restack."""
        if self._logged == len(self.records):
            return True
        return self._guarded(self.folder.frames, self._write_log, lambda: sum(
            len(json.dumps(d)) + 1 for d in self.records[self._logged or 0:]))

    def _write_log(self) -> None:
        if self._logged is None:
            rewrite_frames_log(self.folder.frames, self.records)
            self._logged = len(self.records)
            return
        self.flog.cut()      # first: the size a failed append is cut back to must not hold the torn line
        while self._logged < len(self.records):
            try:
                size = self.folder.frames.stat().st_size
            except FileNotFoundError:
                size = 0
            try:
                self.flog.append(self.records[self._logged])
            except OSError:
                try:        # a torn line would swallow the next one: cut it (needs no space)
                    os.truncate(self.folder.frames, size)
                except OSError:
                    pass
                raise
            self._logged += 1

    def _save_excluded(self) -> bool:
        if self.excluded == self._saved_excluded:
            return True
        want = set(self.excluded)
        if self._guarded(self.folder.excluded_file, lambda: self.folder.set_excluded(want)):
            self._saved_excluded = want
            return True
        return False

    def _save_page(self, kind: str) -> bool:
        """Bring session/<kind>.json ("palette", "stretch") up to the page's choice.  On a full or read-only disk
        the write is owed (the choice already applies in memory) and made by _catch_up when the disk takes it."""
        if self._page[kind] == self._saved[kind]:
            return True
        want = dict(self._page[kind])
        write = getattr(self.folder, f"set_{kind}")
        if self._guarded(getattr(self.folder, f"{kind}_file"), lambda: write(want)):
            self._saved[kind] = want
            return True
        return False

    # ------------------------------------------------------------------ outputs

    def _spaced(self, last: float, floor: float, cost: float, part: int) -> bool:
        """An output last made at ``last`` (monotonic s), taking ``cost`` s, may be made again: ``floor`` s have
        passed and, while files wait, it would take at most 1/``part`` of [daemon] backlog_share of the time
        since — a backlog goes at the engine's own rate, not a fifth slower (at 24 MP the outputs were 22 s of a
        100-frame backlog's 100 s: previews every 2 s, stack.fits every 30 s, a checkpoint every ~11 s)."""
        since = time.monotonic() - last
        if since < floor:
            return False
        share = self.dp.backlog_share
        return self._nothing_waits() or not share or since * share >= cost * part

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` frames or ``checkpoint_s`` seconds — but frames alone do not make one due
        before 9× the last one's duration has passed, so checkpoints take at most ~10 % of the time, and in a
        backlog before its share of the time allows (_spaced): at 24 MP one is ~470 MB (1.3 s on this SSD, tens
        of seconds on an SD card) while a backlog goes by at 0.8 s a frame.  Frames after the last checkpoint
        are not lost by a crash, only stacked again."""
        since = time.monotonic() - self._last_ckpt
        if since >= self.dp.checkpoint_s or self._ckpt_stale:
            return True
        cost = self._ckpt_cost or self._first_ckpt_cost()
        return (self._since_ckpt >= self.dp.checkpoint_every and since >= 9.0 * cost
                and self._spaced(self._last_ckpt - self._ckpt_cost, 0.0, cost, 4))

    def _first_ckpt_cost(self) -> float:
        """What the first checkpoint will take, before one has been timed: its bytes at the rate stack.fits was
        written (both are one long write to the same disk), or 0 when no stack.fits was timed either.  Without
        it the first checkpoint of a backlog came after checkpoint_every frames whatever the share (at 24 MP
        ~1 s of a 100-frame backlog's 29 s); the time since the session started counts as the time since the
        last one."""
        return self._checkpoint_bytes() / self._fits_rate if self._fits_rate > 0 else 0.0

    def _checkpoint_bytes(self) -> int:
        """What a checkpoint costs on disk: the engine's arrays (a 24 MP colour stack ~470 MB, each filter's
        stack as much again); its JSON and zip headers add a few kB."""
        _, arrays, stacks = self.engine.state()
        n = sum(np.asarray(a).nbytes for a in arrays.values())
        return n + sum(np.asarray(a).nbytes for _, st in stacks for a in st.state().values())

    def _checkpoint(self, *, closing: bool = False) -> bool:
        """Write the checkpoint now (False when it cannot be: see the guards).  ``closing``: the target is being
        closed by a switch, and the frames it holds go to another target."""
        ckpt = self.folder.checkpoint
        if self._logged != len(self.records) or self._saved_excluded != self._engine_excluded:
            return False     # its line count and exclusions must match frames.jsonl and excluded.json on disk
        if self._held and not closing:
            # A held frame is in the engine's state (its index, the random draws of its registration, a new
            # filter's entry) but in no frames.jsonl line: a restart finds it again and processes it again, so
            # that every later frame's index came out one higher per held frame (b_00 index 7, not 5, after a
            # stop while two frames were held) and the registrations drew other random numbers.  None while
            # frames are held: a restart resumes from the checkpoint before them.
            return False
        if not self._may_write(ckpt):
            return False     # still no room: not even the estimate
        self._ckpt_bytes = est = self._checkpoint_bytes()
        cap = self.dp.checkpoint_max_mb
        if (cap and est > cap * 2 ** 20) or (self._ckpt_limit is not None and est >= self._ckpt_limit):
            return self._no_checkpoint(est)
        self._ckpt_capped = False
        t0 = time.monotonic()
        try:
            if not self._guarded(ckpt, lambda: self.folder.save_checkpoint(self.engine, len(self.records),
                                                                          self._engine_excluded), est):
                return False
        except OSError as err:
            if err.errno != errno.EFBIG:
                raise
            # larger than the filesystem takes a file (FAT32: 4 GB; or systemd's LimitFSIZE=): it would fail
            # again, after writing gigabytes, every time — none, as above a checkpoint_max_mb
            self._ckpt_limit = est
            return self._no_checkpoint(est)
        self._last_ckpt = time.monotonic()
        self._since_ckpt, self._ckpt_cost, self._ckpt_stale = 0, self._last_ckpt - t0, False
        self._ckpt_frames = len(self.records)
        log.info("checkpoint of %d frames: %.0f MB in %.1f s", len(self.records),
                 ckpt.stat().st_size / 2 ** 20, self._ckpt_cost)
        self._publish()      # the status says what it covers and costs
        return True

    def _no_checkpoint(self, est: int) -> bool:
        """No checkpoint of ``est`` bytes is written (over checkpoint_max_mb, or too large a file for the disk): said
        once; a crash then restacks the frames of frames.jsonl."""
        ckpt, cap = self.folder.checkpoint, self.dp.checkpoint_max_mb
        self._ckpt_stale = False
        if not self._ckpt_capped:
            why = (f"over [daemon] checkpoint_max_mb = {cap:g}" if cap and est > cap * 2 ** 20 else
                   f"more than the filesystem of {ckpt.parent} takes in one file (FAT32: 4 GB)")
            log.warning("livestack: a checkpoint would take %s, %s: none written; after a crash the frames of "
                        "frames.jsonl are stacked again", mb(est), why)
            self._ckpt_capped = True
            self._publish()
        self._since_ckpt, self._last_ckpt = 0, time.monotonic()
        if ckpt in self._blocked:
            self._unblock(ckpt)
        return False

    def _write_fits(self) -> bool:
        path = self.out / "stack.fits"
        t0 = time.monotonic()
        if not self._guarded(path, lambda: self.engine.write_stack(path, compose=self.compose)):
            return False
        self._remove_stale_stacks()
        log.info("stack files written in %.1f s", time.monotonic() - t0)
        self._save_book()
        self._fits_dirty = 0
        self._fits_cost, self._last_fits = time.monotonic() - t0, t0     # outputs_s: start to start
        try:
            self._fits_rate = path.stat().st_size / max(self._fits_cost, 1e-3)
        except OSError:
            pass
        return True

    def _remove_stale_stacks(self) -> None:
        """Remove the stack files no stack of the engine writes any more: after a restack, a filter whose frames
        are all excluded has no stack, and a name clash gone (``H a`` excluded, ``H_a`` now stack_H_a.fits, not
        stack_H_a-2.fits) renames one — the old file would keep excluded frames, beside what `livestack stack`
        of the included files writes."""
        for p in outputs.stale_stacks(self.out, self.engine):
            try:
                p.unlink()
                log.info("%s removed: no stack of its own any more", p.name)
            except OSError as err:
                log.warning("livestack: could not remove %s: %s", p.name, err)

    def _render_preview(self) -> None:
        self._preview_dirty, self._last_preview = False, time.monotonic()
        t0 = self._last_preview
        if not self.engine.has_stack:
            self._preview = None
            try:      # every frame excluded: no preview of them is left behind (as no stack file)
                (self.out / "preview.jpg").unlink(missing_ok=True)
            except OSError as err:
                log.warning("livestack: could not remove preview.jpg: %s", err)
            return
        rgb = self.engine.preview(stretch=self.stretch, compose=self.compose)   # reduced copies: 0.2 s at 24 MP
        ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(self.stretch.jpeg_quality)])
        if not ok:
            raise OSError("preview.jpg: JPEG encoding failed")
        self._preview = enc.tobytes()      # the page shows it from memory, whether or not the file is written
        self._preview_id += 1
        self._preview_unsaved = True
        # the page first: writing preview.jpg, stack.fits (1–1.5 s at 24 MP) or a checkpoint comes after
        self._publish()
        self._save_preview()
        self._preview_cost = time.monotonic() - t0
        log.debug("preview drawn in %.2f s", self._preview_cost)

    def _save_preview(self) -> None:
        path, data = self.out / "preview.jpg", self._preview
        if data is None or self._guarded(path, lambda: atomic_write_bytes(path, data), len(data)):
            self._preview_unsaved = False

    # ------------------------------------------------------------------ commands (run by the worker)

    def _cmd_stretch(self, black, midtones, white) -> dict:
        self.stretch = dataclasses.replace(self.stretch, black=black, midtones=midtones, white=white)
        # all three, null = auto: the page's Auto stretch must also stay auto over a config's own points
        self._page["stretch"] = {"black": black, "midtones": midtones, "white": white}
        self._save_page("stretch")
        if self.engine.has_stack:
            self._render_preview()
        self._publish()
        return self.status()

    def _cmd_palette(self, changes: dict) -> dict:
        # over the palette as it is now, not as the caller saw it: a command still queued (the page's weights,
        # posted just before this palette) or a switch of targets would otherwise be undone in memory while
        # palette.json kept it — the composite and the status lost the weights, a restart brought them back
        new = self.compose = dataclasses.replace(self.compose, **changes)
        # kept as the JSON the request gave once validated (hues as lists): what a restart applies again
        self._page["palette"] = {**self._page["palette"], **json.loads(json.dumps(
            {k: getattr(new, k) for k in changes}))}
        self._save_page("palette")
        if self.engine.has_stack:
            self._render_preview()
            self._fits_dirty += 1      # stack.fits holds the composite: rewritten when next due
        self._publish()
        return self.status()

    def _cmd_export(self, fmt: str, mode: str) -> bytes:
        t0 = time.perf_counter()
        res = outputs.full_image(self.engine, self.compose)
        if res is None:
            raise Refused(NOTHING_TO_EXPORT)
        img, wsum = res
        if mode == "linear":   # the stack's range over covered pixels, mapped linearly onto 0..65535
            cov = wsum > 0
            vals = img[:, cov] if cov.any() else img.reshape(img.shape[0], -1)
            lo, hi = float(vals.min()), float(vals.max())
            x = (img - np.float32(lo)) * np.float32(65535.0 / max(hi - lo, 1e-12))
            out16 = np.rint(np.clip(x, 0, 65535)).astype(np.uint16)
        else:                  # the page's stretch, at full resolution and 16 bits
            p = dataclasses.replace(self.stretch, max_size=max(img.shape[1:]))
            out16 = self.engine.preview(img, wsum, stretch=p, compose=self.compose,
                                        dtype=np.uint16).transpose(2, 0, 1)
        out16 = out16[0] if out16.shape[0] == 1 else np.ascontiguousarray(out16.transpose(1, 2, 0))
        data = encode_png16(out16) if fmt == "png" else encode_tiff16(out16)
        # the worker's time between frames (seconds at 24 MP on a Pi): said, so that a frame that waited says why
        log.info("livestack: export (%s, %s) made: %.1f MB in %.1f s", fmt, mode, len(data) / 1e6,
                 time.perf_counter() - t0)
        return data

    def _cmd_exclude(self, rel: str, exclude: bool, target: int | None = None) -> None:
        """One exclude/include request, applied to the set; _exclusions restacks once for all of them.  Refused
        when a switch of targets came between the request and now: the frame is an archived target's."""
        if target is not None and target != self.book.current.id:
            old = self.book.get(target)
            raise Refused(f"{rel} is a frame of {old.name if old else f'target {target}'}, archived since: "
                          f"it is not excluded or included; see GET /api/targets")
        self.excluded = (self.excluded | {rel}) if exclude else (self.excluded - {rel})

    def _exclusions(self, first: tuple) -> None:
        """``first`` and every exclude/include request queued behind it — and those arriving during the
        restack — merged: one restack to the final set (none when it is the set the stack was built with);
        every request's future resolves with the status after it.  (Five identical requests cost one restack,
        not five; a request toggled back and forth costs at most two.)"""
        running: list[Future] = []
        n = 0

        def absorb(batch: list[tuple]) -> bool:
            nonlocal n
            for fut, fn, args in batch:
                ok = fut.set_running_or_notify_cancel()
                try:
                    fn(*args)
                except Refused as err:       # another target's frame (a switch came between)
                    log.warning("livestack: exclude/include refused: %s", err)
                    if ok:
                        fut.set_exception(err)
                    continue
                if ok:
                    running.append(fut)
            n += len(batch)
            return bool(batch)

        absorb([first] + self._take_excludes())
        if self.excluded != self._engine_excluded and \
                (gone := self._gone_files(self.records, self.excluded, self._engine_excluded)):
            self._refuse_exclusions(running, n, gone)
            return
        t0 = time.monotonic()
        try:
            done = self._restack_all(lambda: absorb(self._take_excludes())) \
                if self.excluded != self._engine_excluded else False
            self._save_excluded()
        except _FilesGone as gone:
            self._refuse_exclusions(running, n, gone.files)
            return
        except BaseException as err:
            with self._excl_lock:
                self._excl_open -= n
            for fut in running:
                fut.set_exception(err)
            raise
        if done:
            log.info("restacked %d frames, %d excluded, in %.1f s (%d exclude/include requests)", len(self.records),
                     len(self._engine_excluded), time.monotonic() - t0, n)
        with self._excl_lock:
            self._excl_open -= n
        self._publish()
        st = self.status()
        for fut in running:
            fut.set_result(st)

    def _gone_files(self, records, keep: set[str], was_excluded: set[str]) -> list[str]:
        """The files a restack that leaves out ``keep`` must read and cannot: frames in the stack now, or coming back
        into it (``was_excluded``), whose file is no longer in the capture folder (its USB disk unplugged, frames
        deleted to make room on a full card).  Restacked without them they were recorded failed ("file not found")
        and left the stack, its checkpoint and frames.jsonl for good: one tap on "exclude" lost the night's frames."""
        return restack_loses(records, keep, was_excluded, self._present)

    def _present(self, d: dict) -> bool:
        """A frames.jsonl record's file is in the capture folder."""
        return (self.watch_dir / (d.get("path") or d["file"])).is_file()

    def _gone_sentence(self, gone: list[str]) -> str:
        many = len(gone) != 1
        named = some(gone)
        return (f"{len(gone)} frame{'s' * many} of the stack {'are' if many else 'is'} no longer in the capture "
                f"folder {self.watch_dir} ({named}): restacked, {'they' if many else 'it'} would be lost; the stack "
                f"is kept as it is — put the files back, then exclude or include")

    def _refuse_exclusions(self, running: list[Future], n: int, gone: list[str]) -> None:
        """No restack, or one stopped (see _gone_files): the exclusions go back to the stack's — excluded.json too,
        which a restack saves first: kept, a restart would restack without the files — and every request is
        refused with the files to put back."""
        msg = self._gone_sentence(gone)
        log.warning("livestack: exclude/include refused: %s", msg)
        self.excluded = set(self._engine_excluded)
        self._save_excluded()
        # refused before the status leaves "restacking": one answered 202 is in `refused` by then (follow()), for
        # whoever waits for the restack to end
        for fut in running:
            fut.set_exception(Refused(msg, 409))
        with self._excl_lock:
            self._excl_open -= n
            if not self._excl_open:
                self._wanted = set(self.excluded)
        self._publish()

    def _restack_all(self, absorb=lambda: False) -> bool:
        """Exclusion cannot be undone in a running mean with outlier rejection: stack the included files again,
        in their original order, through a fresh Engine — the simple correct way.  Requests arriving meanwhile
        (``absorb()`` applies them to ``excluded``) join this pass when they change only frames it has not
        reached; otherwise it starts over, or stops when the set is back to the one the stack was built with.
        True when the stack was rebuilt."""
        rels = [d.get("path") or d["file"] for d in self.records]
        first: dict[str, int] = {}
        for i, rel in enumerate(rels):
            first.setdefault(rel, i)
        total = len(self.records)
        # the session's grid, not the config's: one kept through a restart under other grid settings stays until
        # the next target
        cfg = grid_config(self.cfg, self.engine)
        self._state = "restacking"
        while True:
            want = set(self.excluded)
            self._save_excluded()        # user intent first: a crash now restacks on restart
            eng = self.folder.new_engine(cfg, masters=self.masters)
            new: list[dict] = []
            unread: set[str] = set()         # rejected frames whose files are gone: their records kept
            self._restack = {"done": 0, "total": total}
            self._publish()
            again = False
            for i, old in enumerate(self.records):
                if self._stopping.is_set():
                    log.warning("restack interrupted by stop; it is redone at the next start")
                    self._restack = None
                    return False
                if absorb() and self.excluded != want:
                    if self.excluded == self._engine_excluded:    # back to the stack we have
                        self._restack, self._state = None, "idle"
                        self._publish()
                        return False
                    if min(first.get(r, total) for r in self.excluded ^ want) < i:
                        again = True     # a frame already passed changed: start over
                        break
                    want = set(self.excluded)
                    self._save_excluded()
                rel = rels[i]
                if rel in want:   # keep its measurements: the plots still show why it was excluded
                    d = {**old, "status": "excluded", "reason": "excluded by the user", "weight": None,
                         "processed": _now()}
                elif old["status"] == "rejected" and not self._present(old):
                    # rejected, and its file deleted since (the cloudy frames cleared off the card): read again it
                    # would be recorded failed ("file not found"), its reason and measurements gone — it is out of
                    # the stack either way, so its verdict stands
                    d = {**old, "index": eng.count_unread_rejection(old.get("filter"))}
                    unread.add(rel)
                elif old["status"] == "failed" and old.get("index") is None:
                    # failed without being read (no engine index): the watcher's verdict (a link out of the
                    # folder, still incomplete at timeout) or the crash guard's — read now it would follow the
                    # link, or stop the worker again
                    d = old
                    eng.count_failed()
                else:
                    nxt = next((r for r in rels[i + 1:] if r not in want), None)
                    d = eng.process(self.watch_dir / rel,
                                    next_path=None if nxt is None else self.watch_dir / nxt).to_dict()
                    d["path"], d["processed"] = rel, _now()
                    if d["status"] == "failed" and self._gone_files([old], want, self._engine_excluded):
                        # gone since the check before the restack: "failed" here, the swap below would drop the
                        # frame from the stack, the checkpoint and frames.jsonl for good.  The new engine is
                        # dropped before anything of it is published or written; the caller refuses.
                        eng.close()
                        self._restack, self._state = None, "idle"
                        raise _FilesGone(self._gone_files(self.records, want, self._engine_excluded) or [rel])
                new.append(d)
                apply_amended(new, eng.amended)
                eng.amended.clear()
                self._restack = {"done": i + 1, "total": total}
                if i % 5 == 4:
                    self._publish()
            if not again:
                break
            log.info("restack started over: a request changed a frame it had passed")
        old, self.engine, self.records, self._engine_excluded = self.engine, eng, new, want
        if eng.has_stack and old.ref is not None and eng.ref.file == old.ref.file and old.grid.same_pixels(eng.grid):
            if old.grid.wcs is not None:
                eng.set_wcs(old.grid.wcs)    # the same reference, the same grid: its plate solution holds
        else:
            # the grid moved (another reference: the old one excluded): an excluded frame's matrix, made on the
            # old one, maps onto a grid it is not on — and so does a kept rejection's
            for d in new:
                if d["status"] == "excluded" or (d.get("path") or d["file"]) in unread:
                    d.update(dict.fromkeys(PLACEMENT))
            if eng.has_stack:   # the reference was excluded: another grid, other stars to match a returning
                self._ref_saved = False         # frame against, solved anew — as for a first reference
                self._new_reference()
            else:   # every frame excluded: the next frame stacked is a new reference, named and solved as a first
                self._ref_named = self._ref_saved = False
        self._logged = None              # frames.jsonl is rewritten whole
        self._save_log()
        self._generation += 1
        self._restack = None
        self._restacks += 1
        self._since_ckpt = max(self._since_ckpt, 1)
        self._checkpoint()
        self._fits_dirty += 1
        self._write_fits()
        self._render_preview()
        self._state = "idle"
        self._publish()
        return True

    def _cmd_new_session(self) -> dict:
        self._catch_up()
        if self._blocked:
            # (a read-only or vanished disk wants no space freed: a remount, or the disk back in its socket)
            mend = "free some space" if all(f.space for f, _ in self._blocked.values()) else \
                "make the disk writable again"
            raise Refused(f"{self._disk['error']}: the current stack is not saved yet; {mend}, then start "
                          f"a new one", 507)
        try:
            self._same_folder(self.out)      # (nothing owed yet: no write has met it)
        except DiskFull as full:
            raise Refused(f"{full}; the current stack is kept", 507) from None
        # files seen before "new stack" belong to the old target: queued, to be stacked again after a switch of
        # targets, or still being written (the watcher gives those up: listed as ignored, they are not stacked)
        ignore = self.watcher.settle_none() if self.watcher else set()
        ignore |= {r.rel for r in self._redo}
        self._redo.clear()
        while True:
            try:
                self.files.get_nowait()
            except queue.Empty:
                break
        try:
            dest = self.folder.new_session(ignore)
        except OSError as err:
            full = disk_full(err, self.out / ".new-session")
            if full is None:
                raise
            raise Refused(f"{full}; the current stack is kept", 507) from err
        self.book.close_current(dest)
        self._held, self._ref_saved, self._ref_named = [], False, False
        if self._solver is not None:
            self._solver.cancel()
        self._solver, self._sky = None, None
        self.engine = self.folder.new_engine(self.cfg, masters=self.masters)
        self.records, self.excluded, self._engine_excluded = [], set(), set()
        self._logged, self._saved_excluded = 0, set()
        self.compose, self.stretch = self.cfg.compose, self.cfg.stretch     # the page's: archived with the session
        self._page, self._saved = {"palette": {}, "stretch": {}}, {"palette": {}, "stretch": {}}
        with self._excl_lock:
            self._wanted = set()
        self.flog = FramesLog(self.folder.frames)
        self._preview, self._generation = None, self._generation + 1
        self._preview_unsaved = False
        self.started = _now()
        self._since_ckpt, self._fits_dirty, self._ckpt_stale = 0, 0, False
        self._ckpt_frames = None
        self._state = "idle"
        self._publish()
        log.log(NOTICE, "livestack: new session; previous one archived in %s", dest)
        return {**self.status(), "archived": str(dest.relative_to(self.out)) if dest else None}

    # ------------------------------------------------------------------ publishing

    def _status(self) -> dict:
        e = self.engine
        last = self.records[-1] if self.records else None
        measured = next((d for d in reversed(self.records) if d.get("fwhm") is not None), None)
        last_rej = next((d for d in reversed(self.records) if d["status"] == "rejected"), None)
        last_fail = next((d for d in reversed(self.records) if d["status"] == "failed"), None)
        last_time = next((d["time"] for d in reversed(self.records) if d.get("time")), None)
        s = self.stretch
        # each filter's FITS values among the frames ("Ha", "H-alpha" from two capture programs: one stack), so
        # that the page colours a frame as its filter's stack — it took each spelling for a filter of its own
        spellings: dict[str, list[str]] = {}
        for v in sorted({d.get("filter") for d in self.records} - {None}):
            spellings.setdefault(filter_key(v), []).append(v)
        return {
            "state": self._state, "starting": None, "processing": self._processing,
            "stacked": e.n_stacked, "rejected": e.n_rejected, "failed": e.n_failed,
            "excluded": sum(1 for d in self.records if d["status"] == "excluded"),
            "frames": len(self.records),
            "integration_s": integration(e.exptime_total),
            "first_frame_time": e.counts.first_time, "last_frame_time": last_time,
            "last_processed": last.get("processed") if last else None,
            "current": None if measured is None else {k: measured.get(k) for k in (
                "file", "path", "status", "reason", "fwhm", "stars", "background", "eccentricity", "weight",
                "time", "calibration")},
            "last_rejected": None if last_rej is None else {k: last_rej.get(k) for k in ("file", "reason", "time")},
            "last": None if last is None else {k: last.get(k) for k in ("file", "status", "reason")},
            "last_failed": None if last_fail is None else {k: last_fail.get(k) for k in ("file", "reason")},
            "reference": e.ref.file if e.ref else None,
            "grid": None if e.grid is None else {
                "mode": e.grid.mode, "debayer": e.grid.debayer, "shape": list(e.grid.shape),
                "channels": e.grid.channels, "scale": e.grid.scale if e.grid.drizzled else None,
                "pixfrac": e.grid.pixfrac if e.grid.drizzled else None},
            "target": self._target_dict(self.book.current) if self.book else None,
            "targets": [self._target_dict(t) for t in self.book.targets] if self.book else [],
            "held": [i.rel for i, _, _ in self._held],
            "sky": self._sky,
            "filters": [{**fs.summary(), "file": outputs.filter_file(e, fs), "names": spellings.get(fs.key, [])}
                        for fs in e.filters.values()],
            "palette": self._palette(),
            "restack": self._restack,
            "restacks": self._restacks,
            "disk": None if self._disk is None else dict(self._disk),
            "checkpoint": {"bytes": self._ckpt_bytes, "frames": self._ckpt_frames,
                           "max_mb": self.dp.checkpoint_max_mb or None, "capped": self._ckpt_capped},
            "stretch": {"black": s.black, "midtones": s.midtones, "white": s.white,
                        "auto": s.black is None and s.midtones is None and s.white is None},
            "has_stack": self._preview is not None,
            "preview_id": self._preview_id if self._preview is not None else None,
            "generation": self._generation,
            "session_started": self.started,
            "watch": str(self.watch_dir), "out": str(self.out),
            "updated": _now(),
        }

    def _target_dict(self, t: Target) -> dict:
        d = t.to_dict()
        if t.current:                  # the book is saved with the stack files; the engine is always current
            d["frames"] = self.engine.n_stacked
        return d

    def _palette(self) -> dict:
        """The composite's palette for the page: what was asked, what it became, the weights and choices."""
        from ..engine import compose

        c = self.compose
        p = outputs.plan(self.engine, c, self.stretch.max_size) if self.engine.has_stack else None
        return {"requested": c.palette, "name": p.palette if p is not None else None,
                "mapping": p.description if p is not None else None, "weights": dict(c.weights),
                "hues": {k: list(v) for k, v in c.hues.items()}, "choices": list(compose.PALETTES)}

    def _publish(self) -> None:
        snap = Snapshot(self._status(), tuple(self.records), self._preview, self._generation)
        with self._cond:
            self._snap = snap
            self._changes += 1
            self._cond.notify_all()

    def _notify(self) -> None:
        with self._cond:
            self._changes += 1
            self._cond.notify_all()
