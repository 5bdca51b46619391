"""The worker: queue of complete files -> Engine.process -> frames.jsonl, outputs, checkpoint, published snapshot.

One worker thread owns the Engine; nothing else touches it.  The web server reads the immutable Snapshot the
worker publishes by swapping one reference, and asks for anything else (stretch, export, exclude, new stack) by
submitting a command that the worker runs between two frames.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..engine import outputs
from ..engine.compose import ComposeParams
from ..engine.frame import FrameRecord
from ..engine.pipeline import Engine
from ..engine.write import atomic_write_bytes, encode_png16, encode_tiff16
from ..session import FramesLog, Refused, SessionFolder, rewrite_frames_log
from .config import DaemonParams, WatchParams
from .watch import Ready, Watcher

log = logging.getLogger("livestack")

STACKED = ("reference", "stacked")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the web thread may read: built by the worker, never modified after."""

    status: dict                  # JSON-ready counts and the latest frame (see Service._status)
    frames: tuple[dict, ...]      # frames.jsonl records, processing order
    preview: bytes | None         # JPEG of the stretched stack
    generation: int               # changes when frames.jsonl is rewritten (restack, new stack)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Service:
    """Watch ``watch_dir``, stack into ``out_dir``.  start(); …; stop() finishes the frame in hand, writes the
    outputs and a checkpoint, and returns."""

    def __init__(self, cfg, watch_dir: Path | str, out_dir: Path | str, wp: WatchParams, dp: DaemonParams, *,
                 masters=None):
        self.cfg, self.wp, self.dp, self.masters = cfg, wp, dp, masters
        self.watch_dir = Path(watch_dir).expanduser().resolve()
        self.folder = SessionFolder(Path(out_dir).expanduser().resolve())
        self.out = self.folder.out
        self.stretch = cfg.stretch
        self.compose = cfg.compose      # the page may change palette and weights without restacking
        self.files: queue.Queue[Ready] = queue.Queue()
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._stopping = threading.Event()
        self._paused = False
        self._cond = threading.Condition()
        self._changes = 0
        self._closing = False
        self._snap = Snapshot({"state": "starting"}, (), None, 0)
        self._thread = threading.Thread(target=self._run, name="livestack-worker", daemon=True)
        self.error: BaseException | None = None
        self.watcher: Watcher | None = None
        # worker-owned state
        self.engine: Engine | None = None
        self.records: list[dict] = []
        self.excluded: set[str] = set()
        self._engine_excluded: set[str] = set()   # the exclusions the engine's stack was built with
        self._generation = 0
        self._preview: bytes | None = None
        self._preview_id = 0
        self._state = "starting"
        self._restack: dict | None = None
        self._since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._ckpt_cost = 0.0           # seconds the last checkpoint took
        self._preview_dirty = False     # frames stacked since preview.jpg was drawn
        self._last_preview = 0.0
        self._fits_dirty = 0
        self._last_fits = 0.0
        self.started = _now()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> str:
        """Resume the session and start the worker and the watcher.  Returns the one-line resume note.
        Raises SessionError / FileNotFoundError with one line naming the folder."""
        if not self.watch_dir.is_dir():
            raise FileNotFoundError(f"{self.watch_dir}: watch folder does not exist")
        r = self.folder.resume(self.cfg, masters=self.masters)
        self.engine, self.records = r.engine, list(r.records)
        self.excluded = self.folder.excluded()
        self._engine_excluded = set(self.excluded)
        self.flog = FramesLog(self.folder.frames)
        known = {d.get("path") or d["file"] for d in self.records} | self.folder.ignored()
        poison = self.folder.inflight()
        if poison and poison["attempts"] >= self.dp.max_attempts and poison["path"] not in known:
            # Earlier runs died on this file (an engine bug, not a bad file — those are recorded as failed):
            # record it instead of crash-looping under systemd, and carry on with the night.
            rel = poison["path"]
            self._append(FrameRecord(file=Path(rel).name, status="failed",
                                     reason=f"processing it stopped livestack {poison['attempts']} times in a "
                                            f"row; skipped (see the journal for the error)"), rel)
            self.engine.count_failed()
            known.add(rel)
            log.error("livestack: %s stopped the worker %d times in a row; recorded as failed and skipped",
                      rel, poison["attempts"])
            self.folder.clear_inflight()
        if self.engine.has_stack:
            self._render_preview()
        self._state = "idle"
        self._publish()
        self.watcher = Watcher(self.watch_dir, self.wp, self.files, known=known, exclude=[self.out])
        self._thread.start()
        self.watcher.start()
        log.warning("livestack: %s; watching %s, session %s", r.note, self.watch_dir, self.out)
        return r.note

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

    def status(self) -> dict:
        s = dict(self._snap.status)
        s["paused"] = self._paused
        if self._paused and s.get("state") == "idle":
            s["state"] = "paused"
        s["queued"] = self.files.qsize() + (self.watcher.pending() if self.watcher else 0)
        s["changes"] = self._changes
        return s

    def wait_change(self, seen: int, timeout: float) -> int | None:
        """Block until something changed since ``seen`` (returns the new counter), None when closing."""
        with self._cond:
            self._cond.wait_for(lambda: self._changes != seen or self._closing, timeout)
            return None if self._closing else self._changes

    def pause(self) -> dict:
        if self._paused:
            raise Refused("already paused; did you mean POST /api/resume?")
        self._paused = True
        self._notify()
        return self.status()

    def resume(self) -> dict:
        if not self._paused:
            raise Refused("not paused; did you mean POST /api/pause?")
        self._paused = False
        self._notify()
        return self.status()

    def exclude(self, name: str, exclude: bool = True) -> Future:
        rel = self._find(name)
        if exclude == (rel in self.excluded):
            raise Refused(f"{name} is {'already' if exclude else 'not'} excluded")
        return self._submit(self._cmd_exclude, rel, exclude)

    def set_stretch(self, black=None, midtones=None, white=None) -> Future:
        return self._submit(self._cmd_stretch, black, midtones, white)

    def set_palette(self, palette: str | None = None, weights: dict | None = None,
                    hues: dict | None = None) -> Future:
        """Change the composite's palette, per-filter weights or hues (ValueError: one sentence) and redraw."""
        changes = {k: v for k, v in {"palette": palette, "weights": weights, "hues": hues}.items() if v is not None}
        new = dataclasses.replace(self.compose, **changes)     # validated here, in the caller's thread
        return self._submit(self._cmd_palette, new)

    def export(self, fmt: str, mode: str) -> Future:
        return self._submit(self._cmd_export, fmt, mode)

    def new_session(self) -> Future:
        return self._submit(self._cmd_new_session)

    def _find(self, name: str) -> str:
        for d in self._snap.frames:
            if name in (d.get("path"), d["file"]):
                return d.get("path") or d["file"]
        raise Refused(f"no frame named {name!r} in this session; see GET /api/frames", 404)

    def _submit(self, fn, *args) -> Future:
        if self._stopping.is_set() or not self._thread.is_alive():
            raise Refused("the daemon is stopping", 503)
        fut: Future = Future()
        self._commands.put((fut, fn, args))
        return fut

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._do_commands()
                if self._paused:
                    self._stopping.wait(0.1)
                    continue
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
            while not self._commands.empty():
                fut, _, _ = self._commands.get()
                fut.set_exception(Refused("the daemon is stopping", 503))
            with self._cond:
                self._changes += 1
                self._cond.notify_all()

    def _do_commands(self) -> None:
        while True:
            try:
                fut, fn, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except Refused as err:
                fut.set_exception(err)

    def _frame(self, item: Ready) -> None:
        self._state = "processing"
        if item.rel in self.excluded:
            rec = FrameRecord(file=item.path.name, status="excluded", reason="excluded by the user")
        elif item.reason is not None:
            rec = FrameRecord(file=item.path.name, status="failed", reason=item.reason)
            self.engine.count_failed()   # counted like the engine's own failures (NFAILED in the header)
            log.warning("failed %s: %s", item.rel, item.reason)
        else:
            self.folder.mark_inflight(item.rel)
            rec = self.engine.process(item.path)
        self._append(rec, item.rel)
        self.folder.clear_inflight()
        self._since_ckpt += 1
        log.info("%s %s%s", rec.status, item.rel, f": {rec.reason}" if rec.reason else
                 f" fwhm {rec.fwhm} px, {rec.stars} stars ({rec.seconds} s)")
        if self.engine.has_stack:
            self._fits_dirty += 1        # counts and header change with every record, pixels with stacked ones
        if rec.status in STACKED:
            self._preview_dirty = True
            # one frame at a time (live): draw now; a backlog: at most every preview_s (a 24 MP preview takes
            # 0.2 s, a third of a frame), and at once when the queue runs dry (_idle)
            if self.files.empty() or time.monotonic() - self._last_preview >= self.dp.preview_s:
                self._render_preview()
            if (self._fits_dirty >= self.dp.outputs_every
                    and time.monotonic() - self._last_fits >= self.dp.outputs_s):
                self._write_fits()
        if self._checkpoint_due():
            self._checkpoint()
        self._state = "idle" if self.files.empty() else "processing"
        self._publish()

    def _append(self, rec: FrameRecord, rel: str) -> None:
        d = rec.to_dict()
        d["path"], d["processed"] = rel, _now()
        self.flog.append(d)
        self.records.append(d)

    def _idle(self) -> None:
        if self._preview_dirty:
            self._render_preview()
        if self._fits_dirty:
            self._write_fits()
        if self._since_ckpt and time.monotonic() - self._last_ckpt >= min(self.dp.checkpoint_s, 5.0):
            self._checkpoint()
        if self._state != "idle":
            self._state = "idle"
            self._publish()

    def _finish(self) -> None:
        self._state = "stopping"
        if self._preview_dirty:
            self._render_preview()
        if self._fits_dirty:
            self._write_fits()
        if self._since_ckpt:
            self._checkpoint()
        self._publish()
        log.warning("livestack: stopped; %d stacked, %d rejected, %d failed; outputs in %s",
                    self.engine.n_stacked, self.engine.n_rejected, self.engine.n_failed, self.out)

    # ------------------------------------------------------------------ outputs

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` frames or ``checkpoint_s`` seconds — but frames alone do not make one due
        before 9× the last one's duration has passed, so checkpoints take at most ~10 % of the time: at 24 MP
        one is ~470 MB (1.5 s on this SSD, tens of seconds on an SD card) while a backlog goes by at a second
        a frame.  Frames after the last checkpoint are not lost by a crash, only stacked again."""
        since = time.monotonic() - self._last_ckpt
        if since >= self.dp.checkpoint_s:
            return True
        return self._since_ckpt >= self.dp.checkpoint_every and since >= 9.0 * self._ckpt_cost

    def _checkpoint(self) -> None:
        t0 = time.monotonic()
        self.folder.save_checkpoint(self.engine, len(self.records), self._engine_excluded)
        self._last_ckpt = time.monotonic()
        self._since_ckpt, self._ckpt_cost = 0, self._last_ckpt - t0
        log.info("checkpoint of %d frames: %.0f MB in %.1f s", len(self.records),
                 self.folder.checkpoint.stat().st_size / 2 ** 20, self._ckpt_cost)

    def _write_fits(self) -> None:
        t0 = time.monotonic()
        self.engine.write_stack(self.out / "stack.fits", compose=self.compose)
        log.info("stack files written in %.1f s", time.monotonic() - t0)
        self._fits_dirty = 0
        self._last_fits = time.monotonic()

    def _render_preview(self) -> None:
        self._preview_dirty, self._last_preview = False, time.monotonic()
        t0 = self._last_preview
        if not self.engine.has_stack:
            self._preview = None
            return
        rgb = self.engine.preview(stretch=self.stretch, compose=self.compose)   # reduced copies: 0.2 s at 24 MP
        ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(self.stretch.jpeg_quality)])
        if not ok:
            raise OSError("preview.jpg: JPEG encoding failed")
        self._preview = enc.tobytes()
        self._preview_id += 1
        atomic_write_bytes(self.out / "preview.jpg", self._preview)
        log.debug("preview drawn in %.2f s", time.monotonic() - t0)

    # ------------------------------------------------------------------ commands (run by the worker)

    def _cmd_stretch(self, black, midtones, white) -> dict:
        self.stretch = dataclasses.replace(self.stretch, black=black, midtones=midtones, white=white)
        if self.engine.has_stack:
            self._render_preview()
        self._publish()
        return self.status()

    def _cmd_palette(self, new: ComposeParams) -> dict:
        self.compose = new
        if self.engine.has_stack:
            self._render_preview()
            self._fits_dirty += 1      # stack.fits holds the composite: rewritten when next due
        self._publish()
        return self.status()

    def _cmd_export(self, fmt: str, mode: str) -> bytes:
        res = outputs.full_image(self.engine, self.compose)
        if res is None:
            raise Refused("nothing stacked yet; the export needs at least one stacked frame")
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
        return encode_png16(out16) if fmt == "png" else encode_tiff16(out16)

    def _cmd_exclude(self, rel: str, exclude: bool) -> dict:
        self.excluded = (self.excluded | {rel}) if exclude else (self.excluded - {rel})
        self.folder.set_excluded(self.excluded)        # user intent first: a crash now restacks on restart
        self._restack_all()
        return self.status()

    def _restack_all(self) -> None:
        """Exclusion cannot be undone in a running mean with outlier rejection: stack the included files again,
        in their original order, through a fresh Engine — the simple correct way."""
        want = set(self.excluded)
        eng = self.folder.new_engine(self.cfg, masters=self.masters)
        new: list[dict] = []
        total = len(self.records)
        self._state = "restacking"
        for i, old in enumerate(self.records):
            if self._stopping.is_set():
                log.warning("restack interrupted by stop; it is redone at the next start")
                self._restack = None
                return
            rel = old.get("path") or old["file"]
            if rel in want:   # keep its measurements: the plots still show why it was excluded
                d = {**old, "status": "excluded", "reason": "excluded by the user", "weight": None,
                     "processed": _now()}
            else:
                d = eng.process(self.watch_dir / rel).to_dict()
                d["path"], d["processed"] = rel, _now()
            new.append(d)
            self._restack = {"done": i + 1, "total": total}
            if i % 5 == 4:
                self._publish()
        self.engine, self.records, self._engine_excluded = eng, new, want
        rewrite_frames_log(self.folder.frames, new)
        self._generation += 1
        self._restack = None
        self._checkpoint()
        self._write_fits()
        self._render_preview()
        self._state = "idle"
        self._publish()

    def _cmd_new_session(self) -> dict:
        if self._fits_dirty:
            self._write_fits()
        if self._since_ckpt:
            self._checkpoint()
        ignore = self.watcher.seen() if self.watcher else set()
        while True:             # files queued before "new stack" belong to the old target
            try:
                self.files.get_nowait()
            except queue.Empty:
                break
        dest = self.folder.new_session(ignore)
        self.engine = self.folder.new_engine(self.cfg, masters=self.masters)
        self.records, self.excluded, self._engine_excluded = [], set(), set()
        self.flog = FramesLog(self.folder.frames)
        self._preview, self._generation = None, self._generation + 1
        self.started = _now()
        self._since_ckpt, self._fits_dirty = 0, 0
        self._state = "idle"
        self._publish()
        log.warning("livestack: new session; previous one archived in %s", dest)
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
        return {
            "state": self._state,
            "stacked": e.n_stacked, "rejected": e.n_rejected, "failed": e.n_failed,
            "excluded": sum(1 for d in self.records if d["status"] == "excluded"),
            "frames": len(self.records),
            "integration_s": round(e.exptime_total, 3),
            "first_frame_time": e.counts.first_time, "last_frame_time": last_time,
            "last_processed": last.get("processed") if last else None,
            "current": None if measured is None else {k: measured.get(k) for k in (
                "file", "path", "status", "reason", "fwhm", "stars", "background", "eccentricity", "weight",
                "time")},
            "last_rejected": None if last_rej is None else {k: last_rej.get(k) for k in ("file", "reason", "time")},
            "last": None if last is None else {k: last.get(k) for k in ("file", "status", "reason")},
            "last_failed": None if last_fail is None else {k: last_fail.get(k) for k in ("file", "reason")},
            "reference": e.ref.file if e.ref else None,
            "filters": [fs.summary() for fs in e.filters.values()],
            "palette": self._palette(),
            "restack": self._restack,
            "stretch": {"black": s.black, "midtones": s.midtones, "white": s.white,
                        "auto": s.black is None and s.midtones is None and s.white is None},
            "has_stack": self._preview is not None,
            "preview_id": self._preview_id if self._preview is not None else None,
            "generation": self._generation,
            "session_started": self.started,
            "watch": str(self.watch_dir), "out": str(self.out),
            "updated": _now(),
        }

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
