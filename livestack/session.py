"""The files of a session folder: frames.jsonl (one record per frame, appended as each frame is processed), and
for the daemon the checkpoint, exclusions and archived sessions (layout below)."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine.frame import FrameRecord
from .engine.write import (Writeback, atomic_write_bytes, atomic_write_with, bytes_view, disk_full, fsync_dir,
                           give_way)
from .text import some

CHUNK_BYTES = 8 * 2 ** 20     # a checkpoint's arrays are written this much at a time (see save_engine)

FRAMES_LOG = "frames.jsonl"

log = logging.getLogger("livestack")


class FramesLog:
    """Append-only frames.jsonl.  Each record is one line, flushed and fsynced: a crash loses at most the line
    being written, and a torn last line is ignored (and repaired) when the log is read back."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.torn = False       # a torn last line not cut yet (the disk took no writes): cut before an append
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()
        except OSError as err:  # a read-only or full disk at start: the daemon runs on, the cut waits
            if disk_full(err, self.path) is None:
                raise
            self.torn = True

    def _repair(self) -> None:
        """Cut a torn last line (power lost mid-append) so the next record starts on a line of its own.  The
        file is opened for writing only when there is a line to cut: a start on a read-only disk reads it."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def cut(self) -> None:
        """Make the cut of a torn last line that a read-only or full disk put off at start (``torn``)."""
        if self.torn:
            self._repair()
            self.torn = False

    def append(self, rec: FrameRecord | dict, *, sync: bool = True) -> None:
        """One record, fsynced — or, ``sync=False``, left for sync() to make durable (a crash before it loses
        that line, as one during an append would)."""
        self.cut()
        d = rec.to_dict() if isinstance(rec, FrameRecord) else rec
        line = json_utf8(d, allow_nan=False) + b"\n"
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def sync(self) -> None:
        """fsync what append(sync=False) wrote."""
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_frames_log(self.path)


def read_frames_log(path: Path | str) -> list[dict]:
    """All complete records of a frames.jsonl (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out



# ---------------------------------------------------------------------------------------------------------------
# The daemon's session folder.
#
#   out/stack.fits, out/preview.jpg   outputs (atomic writes, engine/write.py)
#   out/frames.jsonl                  one record per frame, processing order (the daemon adds "path": the file
#                                     relative to the watched folder)
#   out/session/checkpoint.npz        Engine.state() (save_engine) plus a member "daemon" (JSON: how many frames.jsonl
#                                     lines the state covers and their sha256, the exclusions it was built with).
#                                     One file, renamed into place: the state and its lines can never disagree,
#                                     and a line changed since (a bad sector) is seen, not miscounted.
#   out/session/excluded.json         files the user excluded (user intent; survives restarts)
#   out/session/ignore.json           files already present when "new stack" was pressed (not this session)
#   out/session/palette.json          the palette, weights and hues chosen on the page (user intent; survives
#                                     restarts, applied over the config's [compose])
#   out/session/stretch.json          the black, midtones and white points chosen on the page (user intent;
#                                     survives restarts, applied over the config's [stretch])
#   out/paused.json                   the page's pause, {"paused", "since"} (user intent; survives restarts and the
#                                     page's "new stack", ended by resume or --new-session; the output folder's, not
#                                     one target's: a switch of targets leaves it)
#   out/archive/<UTC time>/           earlier sessions (--new-session, the page's "new stack")
# ---------------------------------------------------------------------------------------------------------------


SESSION_DIR = "session"
CHECKPOINT = "checkpoint.npz"
ARCHIVE_DIR = "archive"
STAGING_DIR = ".new-session"     # a "new stack" being set up; promoted by recover()
TARGETS_FILE = "targets.json"    # the targets of an output folder (targets.py): not part of any one session
SWITCH_FILE = ".switch.json"     # a switch of targets under way (targets.py)
PALETTE_FILE = "palette.json"    # the page's palette choice (session/, per target)
PAGE_COMPOSE = ("palette", "weights", "hues")    # the [compose] keys the page sets (POST /api/palette)
STRETCH_FILE = "stretch.json"    # the page's stretch (session/, per target)
PAGE_STRETCH = ("black", "midtones", "white")    # the [stretch] keys the page sets (POST /api/stretch)
PAUSE_FILE = "paused.json"       # the page's pause (POST /api/pause): the output folder's, not any one session's


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _move_aside(path: Path) -> tuple[Path | None, str]:
    """Move ``path`` to <name>.corrupt-<UTC time>: (where it went, "; moved aside to <name>") — or, when it cannot
    be (a disk that takes no writes: ext4 remounts a failing SD card read-only, and the start goes on, stacking
    in memory), (None, "; not moved aside: <why>"), and it stays."""
    dest = path.with_name(f"{path.name}.corrupt-{_utc_stamp()}")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"{path.name}.corrupt-{_utc_stamp()}-{n}"), n + 1
    try:
        os.replace(path, dest)
    except OSError as err:
        return None, f"; not moved aside: {err.strerror or err}"
    return dest, f"; moved aside to {dest.name}"


def set_aside(path: Path, why: str, then: str = "") -> Path | None:
    """Move an unusable session file (or directory) out of the way as <name>.corrupt-<UTC time>, kept for a
    look, with one log line (``why``; ``then``: what was done instead): a start must not fail on it in a systemd
    restart loop — nor on a disk that refuses the move (read-only): the file then stays, the line says it was
    not moved aside and why, and None is returned: the caller must not read it as valid again.  Returns where
    it went."""
    dest, moved = _move_aside(path)
    log.warning("livestack: %s: %s%s%s", path.name, why, moved, f"; {then}" if then else "")
    return dest


def _aside(path: Path) -> str:
    """_move_aside() for a caller that says it in its own line: "; moved aside to <name>", or "; not moved aside:
    <why>" (it stays: a start must not fail on it — under systemd, a restart loop)."""
    return _move_aside(path)[1]


def _unusable(err: Exception) -> str:
    """Why a small JSON file of the page's choices cannot be used: "unreadable (…)" when its bytes are not JSON
    (or cannot be read), else the check's own sentence."""
    return f"unreadable ({err})" if isinstance(err, (OSError, json.JSONDecodeError, UnicodeError)) else str(err)


def _complete_lines(path: Path) -> list[bytes]:
    """frames.jsonl's complete lines, as bytes (a torn last line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line + b"\n" for line in data.split(b"\n")[:-1]]     # by b"\n" alone: a garbled \r splits nothing


def _digest(lines: list[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line)
    return h.hexdigest()


def _parse(line: bytes) -> dict | None:
    """One frames.jsonl record, None when the line is not one (garbled)."""
    try:
        d = json.loads(line.decode("utf-8"))
    except ValueError:            # JSONDecodeError and UnicodeDecodeError
        return None
    return d if isinstance(d, dict) and isinstance(d.get("file"), str) else None


def json_utf8(obj, **kw) -> bytes:
    """``obj`` as UTF-8 JSON, readable as written (Andromède, not Androm\\u00e8de) — but a file name with a byte
    that is not UTF-8 (a FAT card's Latin-1 é: Python names it with a lone surrogate, \\udce9) has no UTF-8
    form: that line is written with JSON's escapes, which read back as the same name."""
    try:
        return json.dumps(obj, ensure_ascii=False, **kw).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kw).encode()


def write_json_atomic(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), json_utf8(obj, indent=1) + b"\n")


def rewrite_frames_log(path: Path | str, records: list[dict]) -> None:
    """Replace frames.jsonl by ``records`` in one rename (a crash leaves the old or the new log, never half)."""
    atomic_write_bytes(Path(path), b"".join(json_utf8(r, allow_nan=False) + b"\n" for r in records))


def apply_amended(records: list[dict], amended: list[dict]) -> bool:
    """Engine.amended's later verdicts on earlier frames, applied to their records (the latest with the same
    file and index); True when a record changed (frames.jsonl must then be rewritten)."""
    changed = False
    for a in amended:
        for d in reversed(records):
            if d.get("file") == a["file"] and d.get("index") == a["index"]:
                d.update({k: v for k, v in a.items() if k not in ("file", "index")})
                changed = True
                break
    return changed


# What a frame's contribution to the stacks depends on: the sections of these names, but for the keys that only
# change how fast or in how much memory it is made, or only the output files (drizzle's compensation is applied
# as a stack file is written, with today's setting).
STACK_SECTIONS = ("engine", "stars", "register", "reject", "stack", "cosmetic", "drizzle")
NOT_STACK_KEYS = {"engine": ("read_ahead", "max_megapixels"), "stack": ("threads", "memory_mb", "chunk_rows"),
                  "drizzle": ("max_memory_mb", "compensate")}


def stack_settings(cfg, grid=None) -> dict:
    """{section: {key: value}} of the settings that shape the stacks, as JSON gives them back (a checkpoint keeps
    them: a stack continued under other ones would be a silent mix of two).  ``grid``: the stack's (engine.grid),
    whose GRID_KEYS are recorded as it was made — a checkpoint kept under other values keeps its grid, and the
    next start must compare with that grid, not with the config it went on under."""
    out = {}
    for name in STACK_SECTIONS:
        d = dataclasses.asdict(getattr(cfg, name))
        for k in NOT_STACK_KEYS.get(name, ()):
            d.pop(k, None)
        out[name] = d
    if grid is not None:
        _grid_settings(out, grid)
    # a setting the others leave without effect (each warned about at the start: pixfrac without a drizzle, the
    # demosaic of a drizzle, whose samples are never demosaiced) is no change: --pixfrac 0.7 on an ordinary
    # night restacked it all, for the same stack
    if not out["drizzle"]["scale"]:
        out["drizzle"].pop("pixfrac", None)
    else:
        out["engine"].pop("debayer", None)
    return json.loads(json.dumps(out))


# The limits a frame is refused under: they shape no stack, but a frame they refused is `failed`, and a night
# restarted with one raised — as the refusal says to ("… or raise max_memory_mb") — must try it again.
LIMIT_KEYS = {"engine": ("max_megapixels",), "drizzle": ("max_memory_mb",)}


# Chosen once, at a target's reference frame (its grid: engine/grid.py): a checkpoint kept under new values keeps
# its grid, and they come with the next target.
GRID_KEYS = (("engine", "debayer"), ("drizzle", "scale"), ("drizzle", "pixfrac"))


def _grid_settings(out: dict, grid) -> None:
    """GRID_KEYS in ``out`` (stack_settings()) set to what ``grid`` was made with; a value equal to the config's
    stays as the config gives it, and a whole one is written whole ("scale = 2, now 1", as --drizzle 2 says it)."""
    drizzle, engine = out["drizzle"], out["engine"]
    if grid.drizzled:
        for k, v in (("scale", grid.scale), ("pixfrac", grid.pixfrac)):
            if drizzle.get(k) != v:
                drizzle[k] = int(v) if float(v).is_integer() else v
    elif drizzle["scale"]:
        drizzle["scale"] = 0.0
    if grid.debayer is None:        # a mono grid: no demosaicing, whatever [engine] debayer says
        engine.pop("debayer", None)
    elif not grid.drizzled and engine.get("debayer") != grid.debayer:
        engine["debayer"] = grid.debayer


def grid_config(cfg, engine):
    """``cfg`` with GRID_KEYS as ``engine``'s stacks have them: its grid's, or before it has one (every frame
    excluded) the ones it was made with.  A stack rebuilt for the same target (an exclusion's restack) must stay on
    the grid a checkpoint kept under other values — they come with the next target, as resume()'s note says."""
    grid, drizzle, eng = engine.grid, cfg.drizzle, cfg.engine
    if grid is None:
        made = engine.cfg
        drizzle = dataclasses.replace(drizzle, scale=made.drizzle.scale, pixfrac=made.drizzle.pixfrac)
        eng = dataclasses.replace(eng, debayer=made.engine.debayer)
    elif grid.drizzled:
        drizzle = dataclasses.replace(drizzle, scale=grid.scale, pixfrac=grid.pixfrac)
    else:
        drizzle = dataclasses.replace(drizzle, scale=0.0)
        if grid.debayer is not None:     # (a mono grid has no demosaicing to keep)
            eng = dataclasses.replace(eng, debayer=grid.debayer)
    return dataclasses.replace(cfg, drizzle=drizzle, engine=eng)


def restack_loses(records: list[dict], excluded: set[str], was: set[str], present) -> list[str]:
    """The files of ``records`` (a stack's, built leaving out ``was``) that a restack leaving out ``excluded`` must
    read and cannot (``present(record)``: its file is there; None: nothing known gone): a frame in the stack, or
    coming back into it.  Restacked without them they would be recorded failed and leave the stack for good: the
    daemon's live restack refuses such an exclusion (Service._gone_files), and one made again at the start, after a
    kill between excluded.json and the restack's checkpoint, keeps the checkpoint's stack."""
    if present is None:
        return []
    return [rel for d in records if (rel := d.get("path") or d["file"]) not in excluded
            and (d.get("status") in ("reference", "stacked") or rel in was) and not present(d)]


def limit_settings(cfg) -> dict:
    """{section: {key: value}} of LIMIT_KEYS in ``cfg`` (a checkpoint keeps them), as they apply: an unset
    max_megapixels is this machine's default (a frame refused under it, then max_megapixels set above it)."""
    from .engine.read import default_max_megapixels

    out = {name: {k: getattr(getattr(cfg, name), k) for k in keys} for name, keys in LIMIT_KEYS.items()}
    if out["engine"]["max_megapixels"] is None:
        out["engine"]["max_megapixels"] = default_max_megapixels()
    return out


def limits_raised(saved, cfg) -> list[str]:
    """The limits of ``cfg`` above a checkpoint's ``saved`` limit_settings(), as settings_changed() words them."""
    if not isinstance(saved, dict):
        return []
    out = []
    for name, values in limit_settings(cfg).items():
        old = saved.get(name)
        if not isinstance(old, dict):
            continue
        out += [f"[{name}] {k} = {json.dumps(old[k])}, now {json.dumps(v)}" for k, v in values.items()
                if isinstance(old.get(k), (int, float)) and v > old[k]]
    return out


def settings_changed(saved, cfg) -> list[str]:
    """What differs between a checkpoint's ``saved`` stack_settings() and ``cfg``'s, as "[stack] kappa = 3.0, now
    1.5" — only keys both know: a setting added by a later livestack is no change (the default keeps the old
    behaviour), and a checkpoint from before they were kept is trusted as it always was."""
    if not isinstance(saved, dict):
        return []
    now, out = stack_settings(cfg), []
    for name, values in now.items():
        old = saved.get(name)
        if not isinstance(old, dict):
            continue
        out += [f"[{name}] {k} = {json.dumps(old[k])}, now {json.dumps(v)}" for k, v in values.items()
                if k in old and old[k] != v]
    return out


def save_engine(engine, path: Path | str, info: dict | None = None) -> None:
    """The checkpoint: Engine.state() — its meta (JSON), small arrays and every filter's stack arrays — and the
    caller's ``info`` (JSON, member "daemon") as one uncompressed .npz, written to a temporary name, fsynced
    and renamed onto ``path``.  Written array by array, and a spilled stack's pages are given back after its
    arrays are written, so a checkpoint of seven filter stacks does not bring them all into memory at once."""
    meta, arrays, stacks = engine.state()

    def writer(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            wb = Writeback(z.fp)        # the disk starts on the arrays as they go: the fsync waits less

            def put(name: str, a) -> None:
                give_way()          # (inside write.deferrable: a frame waiting stops the checkpoint here)
                a = np.asanyarray(a)
                with z.open(name + ".npy", "w", force_zip64=True) as f:
                    if a.nbytes <= CHUNK_BYTES or not a.flags.c_contiguous or a.dtype.hasobject:
                        np.lib.format.write_array(f, a, allow_pickle=False)
                        return
                    # what write_array writes (its header, then the data in order), a few MB at a time
                    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(a))
                    flat = a.reshape(-1)
                    step = CHUNK_BYTES // a.itemsize
                    for i in range(0, flat.size, step):
                        give_way()
                        f.write(bytes_view(flat[i:i + step]))
                        wb.wrote(min(step, flat.size - i) * a.itemsize)

            put("meta", np.frombuffer(json.dumps(meta).encode(), np.uint8))
            if info is not None:
                put("daemon", np.frombuffer(json.dumps(info).encode(), np.uint8))
            for k, a in arrays.items():
                put(k, a)
            for prefix, stack in stacks:
                for k, a in stack.state().items():
                    put(prefix + k, a)
                    stack.release()     # a spilled stack: one array paged in at a time
            wb.settle()

    atomic_write_with(Path(path), writer)


def load_engine(path: Path | str, cfg, *, masters=None, spill_dir: Path | None = None):
    """-> (Engine, info dict) from a checkpoint save_engine() wrote.  Raises SessionError naming the file when
    it cannot be used (unreadable, truncated, empty, of another format)."""
    from .engine.pipeline import Engine

    path = Path(path)
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            info = json.loads(bytes(z["daemon"]).decode()) if "daemon" in z.files else {}
            if not isinstance(info, dict):
                raise ValueError("member 'daemon' is not a JSON object")
            engine = Engine.from_state(meta, z, cfg, masters=masters, spill_dir=spill_dir)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError, IndexError,
            AttributeError) as err:   # bytes from disk: whatever they break, restacking is the safe answer
        raise SessionError(f"{path.name}: unusable checkpoint ({type(err).__name__}: {err})") from err
    return engine, info


def load_checkpoint(path: Path | str, cfg, *, masters=None, spill_dir: Path | None = None):
    """-> (Engine, info dict).  Raises SessionError naming the file when it cannot be used."""
    return load_engine(path, cfg, masters=masters, spill_dir=spill_dir)


class Refused(Exception):
    """A request the session cannot do now (the daemon's service raises it, the web server shows it): the
    message is the sentence to show (HTTP 409 unless ``status``)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class SessionError(Exception):
    """A session folder problem, as one line naming the file and the reason."""


class FolderError(SessionError):
    """The session folder cannot be one at all (a file in the way, no permission to make it or write in it):
    a configuration error, which no restart mends — unlike a full or read-only disk, which the daemon waits out."""


class FolderInUse(SessionError):
    """Another process holds the session folder: a second `livestack run` on it (started by hand beside the
    systemd unit's, or with another --port) — not a configuration error: the folder is free once that one stops."""


def hold_folder(out: Path | str, *, make: bool) -> int | None:
    """Take the session folder ``out`` for this process: an exclusive flock on the folder itself, opened read-only
    (no write needed: a full or read-only disk is held too).  Two daemons on one folder would each append to
    frames.jsonl and checkpoint its own stack over the other's — every frame counted twice, or lost at the next
    start.  ``make``: make the folder first (as the start would: only once the capture folder is there, so that a
    session folder on an unplugged disk is not made on the empty mount point).  Returns the descriptor to keep
    open while the daemon runs (closing it lets go); None when the folder is not there or cannot be opened (the
    start says why).  Raises FolderInUse when another process holds it."""
    out = Path(out).expanduser()
    try:
        if make:
            out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(f"{out}: another livestack run is using this session folder (two would stack each frame "
                          "twice and write over each other's checkpoint): stop it first (systemctl stop livestack), "
                          "or give --out another folder") from None
    except OSError:      # a filesystem without locks: run unguarded, as before
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def held_folder(out: Path | str, *, make: bool):
    """hold_folder() for the length of a with block (`livestack run`, `livestack stack -o`): let go at its end.
    Raises FolderInUse as it enters."""
    fd = hold_folder(out, make=make)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@dataclass
class Resumed:
    engine: object            # livestack.engine.pipeline.Engine
    records: list[dict]       # frames.jsonl lines the engine state includes
    dropped: list[dict]       # lines after the checkpoint: removed from frames.jsonl, their files are queued again
    note: str                 # one line for the log: what was resumed
    log_stale: bool = False   # frames.jsonl could not be rewritten (disk full): the caller rewrites it later
    checkpointed: int | None = None   # frames.jsonl lines the checkpoint resumed from covers (None: none used)
    excluded: set[str] | None = None  # the exclusions the stack keeps, when not excluded.json's: the caller saves them


class SessionFolder:
    """The paths of one output folder and the operations on them that must survive a crash."""

    def __init__(self, out: Path | str):
        self.out = Path(out).expanduser()
        self.frames = self.out / FRAMES_LOG
        self.dir = self.out / SESSION_DIR
        self.checkpoint = self.dir / CHECKPOINT
        self.excluded_file = self.dir / "excluded.json"
        self.ignore_file = self.dir / "ignore.json"
        self.inflight_file = self.dir / "inflight.json"
        self.palette_file = self.dir / PALETTE_FILE
        self.stretch_file = self.dir / STRETCH_FILE
        self.pause_file = self.out / PAUSE_FILE
        # what is read instead of a list that could not be read nor moved aside at start (a read-only disk):
        # the file stays, unreadable, until it is written (see _repair)
        self._stand_in: dict[Path, list[str]] = {}

    # ---- small persistent lists
    def _read_list(self, path: Path) -> list[str]:
        if path in self._stand_in:
            return list(self._stand_in[path])
        data, why = self.load_list(path)
        if why is not None:
            raise SessionError(f"{path}: {why}")
        return data

    @staticmethod
    def load_list(path: Path) -> tuple[list[str], str | None]:
        """(names, None), or ([], why it cannot be used)."""
        if not path.exists():
            return [], None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return [], f"unreadable ({err})"
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            return [], "expected a JSON list of file names"
        return data, None

    def _repair(self, records: list[dict]) -> None:
        """At start: an excluded.json, ignore.json or inflight.json that cannot be read (a power cut on a
        filesystem without ordered writes, an edit by hand) is moved aside instead of stopping every start.
        The exclusions come back from frames.jsonl (its frames recorded "excluded"), so the checkpoint built
        with them stays valid; lost "new stack" ignores cannot be known, and a lost in-flight count costs at
        most a few more attempts on a file that crashes the worker.
        On a disk that takes no writes (read-only, full) a file that cannot be moved aside stays: it is not read
        again — the exclusions recovered, or no ignores, stand in for it in memory — and excluded.json is written
        by the next set_excluded() (the daemon's catch-up, once the disk takes writes: ``excluded_owed``)."""
        self._stand_in = {}
        _, why = self.load_list(self.excluded_file)
        if why is not None:
            back = {d.get("path") or d["file"] for d in records if d.get("status") == "excluded"}
            self._stand_in[self.excluded_file] = sorted(back)
            if set_aside(self.excluded_file, why, f"{len(back)} exclusion{'s' * (len(back) != 1)} recovered "
                                                  f"from {FRAMES_LOG}") is not None:
                try:
                    self.set_excluded(back)
                except OSError as err:     # a full disk: they are written with the owed writes
                    if disk_full(err, self.excluded_file) is None:
                        raise
        _, why = self.load_list(self.ignore_file)
        if why is not None:
            if set_aside(self.ignore_file, why, "files from before the last new stack may be stacked again") is None:
                self._stand_in[self.ignore_file] = []
        if (self.inflight_file.exists() or self.inflight_file.is_symlink()) and self._read_inflight() is None:
            set_aside(self.inflight_file, "unreadable")

    def excluded(self) -> set[str]:
        return set(self._read_list(self.excluded_file))

    @property
    def excluded_owed(self) -> bool:
        """excluded.json does not hold excluded() yet: it was unreadable at start and could not be replaced."""
        return self.excluded_file in self._stand_in

    def set_excluded(self, paths: set[str]) -> None:
        if self.excluded_owed and os.path.lexists(self.excluded_file):
            # the unreadable one a read-only disk kept at start: aside now, for a look, not overwritten
            dest, moved = _move_aside(self.excluded_file)
            if dest is not None:
                log.warning("livestack: %s: unreadable since the start%s; replaced by the exclusions in use",
                            self.excluded_file.name, moved)
        write_json_atomic(self.excluded_file, sorted(paths))
        self._stand_in.pop(self.excluded_file, None)

    def ignored(self) -> set[str]:
        return set(self._read_list(self.ignore_file))

    # ---- the palette and the stretch chosen on the page
    def set_palette(self, choice: dict) -> None:
        """Keep the page's choice (``{"palette", "weights", "hues"}``, the keys it has set): a restart of this
        session — a power blip, systemctl restart — must not give the colours tuned at the telescope back to
        the config's."""
        write_json_atomic(self.palette_file, choice)

    def palette(self, base) -> tuple[dict, object]:
        """(the page's choice, ``base`` — the config's ComposeParams — with it applied), or ({}, ``base``) when
        there is none (see _page_choice)."""
        def check(data: dict) -> dict:
            for k in ("weights", "hues"):
                if k in data and not isinstance(data[k], dict):
                    raise ValueError(f"{k} must be an object, e.g. {{\"Ha\": 1.5}}")
            return data                    # ComposeParams checks each value (ValueError)

        return self._page_choice(self.palette_file, PAGE_COMPOSE, check, base, "the palette of the config's [compose]")

    def set_stretch(self, choice: dict) -> None:
        """Keep the page's stretch (``{"black", "midtones", "white"}``, null = auto): a restart of this session
        must not give the preview tuned at the telescope back to the config's [stretch]."""
        write_json_atomic(self.stretch_file, choice)

    def stretch(self, base) -> tuple[dict, object]:
        """(the page's stretch, ``base`` — the config's StretchParams — with it applied), or ({}, ``base``) when
        there is none (see _page_choice; StretchParams does not check the points, the page does: so here)."""
        def check(data: dict) -> dict:
            for k, v in data.items():      # the page's own bounds (web/app.py Api.stretch)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                    raise ValueError(f"stretch {k} = {v!r}: must be a number in 0..1 or null (auto)")
            data = {k: None if v is None else float(v) for k, v in data.items()}
            if data.get("midtones") is not None and not 0 < data["midtones"] < 1:
                raise ValueError(f"stretch midtones = {data['midtones']}: must be strictly between 0 and 1")
            black, white = data.get("black", base.black), data.get("white", base.white)
            if black is not None and white is not None and black >= white:
                raise ValueError(f"stretch black {black} must be below white {white}")
            return data

        return self._page_choice(self.stretch_file, PAGE_STRETCH, check, base, "the stretch of the config's [stretch]")

    def _page_choice(self, path: Path, keys: tuple[str, ...], check, base, fallback: str) -> tuple[dict, object]:
        """A choice the page keeps in ``path`` (a JSON object of some of ``keys``, checked by ``check``, which
        returns it as it applies) and ``base`` with it applied; ({}, ``base``) without one.  A file that cannot
        be used (torn by a power cut, edited by hand into something the page would refuse) is moved aside with
        one log line naming it and why, and ``fallback`` is used: a preview's look is never a reason to refuse
        a start (under systemd, a restart loop)."""
        if not path.exists() and not path.is_symlink():
            return {}, base
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object {" + ", ".join(f'"{k}"' for k in keys) + "}")
            unknown = sorted(set(data) - set(keys))
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(keys)}")
            data = check(data)
            return data, dataclasses.replace(base, **data)
        except (OSError, ValueError, TypeError) as err:     # bytes from disk: whatever they break, the config
            why = _unusable(err)
            # (on a read-only disk it stays, and is read — and refused — again at the next start)
            log.warning("livestack: %s: %s%s; %s is used", path.relative_to(self.out), why, _aside(path), fallback)
            return {}, base

    # ---- the pause (POST /api/pause, the page's Pause)
    def set_paused(self, since: str | None) -> None:
        """Keep the pause (``since``: when it began, ISO UTC; None: not paused): a restart in the night — a crash
        and systemd's Restart=, an out-of-memory kill, a power blip, `systemctl restart` — must not stack the
        frames the user paused for (a slew, focusing, a meridian flip, clouds)."""
        write_json_atomic(self.pause_file, {"paused": since is not None, "since": since})

    def paused(self) -> str | None:
        """When the pause kept in paused.json began ("" when the file does not say), or None: not paused.  A file
        that cannot be used (torn by a power cut, edited by hand) is moved aside with one log line and counts as
        not paused: a start must not fail on it (under systemd, a restart loop)."""
        path = self.pause_file
        if not path.exists() and not path.is_symlink():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("paused"), bool) \
                    or not isinstance(data.get("since"), (str, type(None))):
                raise ValueError('expected a JSON object {"paused": true or false, "since": a time or null}')
        except (OSError, ValueError) as err:
            why = _unusable(err)
            # (on a read-only disk it stays, and is read — and refused — again at the next start)
            log.warning("livestack: %s: %s%s; not paused", path.name, why, _aside(path))
            return None
        return (data["since"] or "") if data["paused"] else None

    # ---- the frame being processed: a file that crashes the engine must not crash-loop the service
    def mark_inflight(self, rel: str) -> int:
        """Record that ``rel`` is being processed; returns how many times it has been started without
        finishing (1 normally; more when earlier runs died on it).

        The file keeps {"path": the frame in hand or null, "starts": {frame: starts not yet finished}}: after a
        crash the frames since the last checkpoint are processed again before the one that killed the worker
        is reached, and its count must survive them (a counter of the latest frame only was reset by them, so
        a crashing file could loop forever whenever checkpoint_every > 1)."""
        starts = dict((self._read_inflight() or {"starts": {}})["starts"])
        starts[rel] = starts.get(rel, 0) + 1
        write_json_atomic(self.inflight_file, {"path": rel, "starts": starts})
        return starts[rel]

    def _read_inflight(self) -> dict | None:
        try:
            data = json.loads(self.inflight_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None   # torn by a power cut: at worst one more attempt
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("attempts"), int) and isinstance(data.get("path"), str):   # format of 0.1
            return {"path": data["path"], "starts": {data["path"]: data["attempts"]}}
        starts = data.get("starts")
        if not isinstance(starts, dict) or not all(isinstance(v, int) for v in starts.values()):
            return None
        return {"path": data.get("path") if isinstance(data.get("path"), str) else None, "starts": starts}

    def inflight(self) -> dict | None:
        """{"path", "attempts"} of the frame a previous run was processing when it died (attempts: how many
        runs have started it without finishing), or None."""
        data = self._read_inflight()
        if not data or data["path"] is None:
            return None
        return {"path": data["path"], "attempts": data["starts"].get(data["path"], 1)}

    def clear_inflight(self) -> None:
        """The frame in hand is done (recorded, whatever its status): forget it and its starts."""
        data = self._read_inflight() or {"path": None, "starts": {}}
        starts = dict(data["starts"])
        starts.pop(data["path"], None)
        if starts:
            write_json_atomic(self.inflight_file, {"path": None, "starts": starts})
            return
        try:
            self.inflight_file.unlink()
        except FileNotFoundError:
            pass

    # ---- checkpoint / resume
    def save_checkpoint(self, engine, lines: int, excluded: set[str]) -> None:
        """Checkpoint ``engine``, whose state includes the first ``lines`` lines of frames.jsonl: their sha256 is
        stored too, so that resume() matches the lines themselves, not their count — a line garbled later (it
        would be skipped, shifting the count) cannot make a frame count twice and another never."""
        info = {"version": 2, "lines": lines, "excluded": sorted(excluded),
                "settings": stack_settings(engine.cfg, engine.grid), "limits": limit_settings(engine.cfg),
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        covered = _complete_lines(self.frames)[:lines]
        if len(covered) == lines:
            info["sha256"] = _digest(covered)
        save_engine(engine, self.checkpoint, info)

    def new_engine(self, cfg, *, masters=None):
        """A fresh engine for this session (its spilled stacks, if any, go to the session folder)."""
        from .engine.pipeline import Engine

        return Engine(cfg, masters=masters, spill_dir=self.dir)

    def resume(self, cfg, *, masters=None, present=None) -> Resumed:
        """Open (or create) the session: the checkpoint is the truth for the stack; frames.jsonl lines after it
        are dropped (atomically) so that their files are processed again — nothing counted twice or skipped.
        The checkpoint is used only when the lines it covers are still there, unchanged and readable; else
        (and when it is unusable) everything is restacked from the capture folder.  A garbled line after it is
        dropped: its file, no longer in the session, is found and stacked again.

        ``present``: whether a record's file can still be read (the daemon: in its capture folder).  A checkpoint
        stacked under other settings is restacked only when every frame it covers is: else it is kept, and the
        new settings apply to the frames to come (the note says so) — a night whose files were moved away is not
        given up for a setting."""
        self.recover()
        self.out.mkdir(parents=True, exist_ok=True)
        FramesLog(self.frames)  # repairs a torn last line
        lines = _complete_lines(self.frames)
        parsed = [_parse(x) for x in lines]
        records = [d for d in parsed if d is not None]
        garbled = [i + 1 for i, d in enumerate(parsed) if d is None]      # line numbers, from 1
        self._repair(records)
        excluded = self.excluded()
        engine, covered, note, checkpointed = None, 0, "new session", None
        remake, lost, kept_excluded = cfg, [], None
        if self.checkpoint.exists() and not self.checkpoint.is_file():
            aside = _aside(self.checkpoint)     # a directory: the next one could not replace it
            note = (f"{self.checkpoint.name}: unusable checkpoint (not a file{aside}); "
                    f"restacking all {len(records)} frames")
        elif self.checkpoint.exists():
            try:
                engine, info = load_checkpoint(self.checkpoint, cfg, masters=masters, spill_dir=self.dir)
            except SessionError as err:
                # kept for a look (another livestack's format, a damaged file): the next checkpoint must not
                # overwrite what may be the only copy of a night whose files are gone
                kept = "" if self.checkpoint.stat().st_size == 0 else f" ({_aside(self.checkpoint)[2:]})"
                note = f"{err}{kept}; restacking all {len(records)} frames"
            else:
                n = info.get("lines")
                bad = [i for i in garbled if i <= (n if isinstance(n, int) else 0)]
                unreadable = f" (line {', '.join(map(str, bad))} unreadable)" if bad else ""
                if not isinstance(n, int) or n < 0:
                    engine, note = None, (f"{self.checkpoint.name}: unusable checkpoint (no line count"
                                          f"{_aside(self.checkpoint)}); restacking")
                elif (changed := settings_changed(info.get("settings"), cfg) + (
                        limits_raised(info.get("limits"), cfg)
                        if any(d.get("status") == "failed" for d in records[:n]) else [])) and \
                        not (gone := sum(1 for d in records[:n] if present is not None and not present(d))):
                    # frames stacked under the old settings and the next under the new would be neither night's
                    # stack (kappa 3 then 1.5: 1131 ADU off the one, 1275 off the other): all under the new ones
                    # (the exclusions too, if the last one came after the checkpoint)
                    engine = None
                    note = (f"{self.checkpoint.name}: stacked with other settings ({'; '.join(changed)}); "
                            f"restacking all {len(records)} frames with the new ones")
                elif (was := set(info.get("excluded", []))) != excluded and \
                        not (lost := restack_loses(records[:n], excluded, was, present)):
                    # the exclusion's restack, killed before its checkpoint, made again — on the session's grid,
                    # as the restack it redoes was (a grid kept under other settings stays until the next target)
                    remake = grid_config(cfg, engine)
                    engine, note = None, f"{self.checkpoint.name}: built before the last exclusion; restacking"
                elif n > len(lines):
                    engine = None
                    note = (f"{self.checkpoint.name}: covers {n} frames but {self.frames.name} has "
                            f"{len(lines)}; restacking")
                elif ("sha256" in info and _digest(lines[:n]) != info["sha256"]) or bad:
                    engine = None
                    note = (f"{self.frames.name}: the {n} lines {self.checkpoint.name} covers are not as it saw "
                            f"them{unreadable}; restacking all {len(records)} frames")
                else:
                    covered = checkpointed = n
                    note = f"resumed {covered} frames from {self.checkpoint.name}"
                    if lost:
                        # restacked now, the frames whose files are gone would be recorded failed and leave the
                        # stack for good (the live restack refuses such an exclusion: _gone_files): the stack is
                        # kept as the checkpoint has it, the exclusions back to its own (the caller saves them)
                        kept_excluded = was
                        log.warning("livestack: %s: built before the last exclusion, but %d frame%s of its stack "
                                    "%s no longer in the capture folder (%s): the exclusion is not applied, the "
                                    "stack is kept as it is — put the files back, then exclude or include",
                                    self.checkpoint.name, len(lost), "s" * (len(lost) != 1),
                                    "are" if len(lost) != 1 else "is", some(lost))
                        note += f", the last exclusion not applied ({len(lost)} of its files gone)"
                    if changed:
                        note += (f", stacked with other settings ({'; '.join(changed)}): {gone} of their files "
                                 f"are gone, so the new settings apply to the frames to come only")
                        fixed = [f"[{s}] {k}" for s, k in GRID_KEYS if any(c.startswith(f"[{s}] {k} =")
                                                                           for c in changed)]
                        g = engine.grid
                        if fixed and g is not None:
                            # "--drizzle 1 applies to the frames to come" while they went on at ×2: said so now
                            kept = f"drizzle ×{g.scale:g}, pixfrac {g.pixfrac:g}" if g.drizzled else g.mode
                            note += f" ({', '.join(fixed)}: from the next target on; this one keeps its {kept} grid)"
        elif records:
            note = f"no checkpoint; restacking {len(records)} frames of {self.frames.name}"
        if engine is None:
            covered = 0
            engine = self.new_engine(remake, masters=masters)
        kept = parsed[:covered]
        dropped = [d for d in parsed[covered:] if d is not None]
        later = [i for i in garbled if i > covered]
        log_stale = False
        if dropped or later:
            try:
                rewrite_frames_log(self.frames, kept)
            except OSError as err:          # a full disk must not stop the start (systemd would loop)
                if disk_full(err, self.frames) is None:
                    raise
                log_stale = True
                note += f"; {self.frames.name} not rewritten yet (disk full)"
        if later and covered:
            note += (f"; {self.frames.name} line {', '.join(map(str, later))} unreadable: dropped "
                     f"(its file is stacked again)")
        if dropped:
            note += f"; {len(dropped)} frames after the checkpoint queued again"
        return Resumed(engine, kept, dropped, note, log_stale, checkpointed, kept_excluded)

    # ---- new session / archive
    def new_session(self, ignore: set[str] = frozenset()) -> Path | None:
        """Archive the current contents into archive/<UTC time>/ and start empty, ignoring ``ignore`` (paths
        relative to the watched folder).  Crash-safe: the new session is staged, then recover() archives and
        promotes it; a restart finishes an interrupted switch.  Returns the archive folder (None if empty)."""
        self.out.mkdir(parents=True, exist_ok=True)
        staging = self.out / STAGING_DIR
        build = self.out / (STAGING_DIR + ".tmp")
        shutil.rmtree(build, ignore_errors=True)
        (build / SESSION_DIR).mkdir(parents=True)
        write_json_atomic(build / SESSION_DIR / "ignore.json", sorted(ignore))
        os.replace(build, staging)
        return self.recover()

    def _holds_nothing(self, entries: list[Path]) -> bool:
        """True when ``entries`` (the session folder's own) are only what an empty session has: an empty
        frames.jsonl, and in session/ the ignore list of the "new stack" that started it and an empty
        exclusion list (and a palette or stretch chosen on the page: the new session starts with the config's
        anyway).
        Anything else — a frame's line, a stack, a checkpoint, the crash guard's
        inflight.json, a file of the user's — is archived."""
        for p in entries:
            if p.is_symlink():
                return False
            if p.name == FRAMES_LOG and p.is_file():
                if p.stat().st_size:
                    return False
            elif p.name == SESSION_DIR and p.is_dir():
                for q in p.iterdir():
                    if q.is_symlink() or not q.is_file():
                        return False
                    if q.name == self.excluded_file.name:
                        if self.load_list(q) != ([], None):
                            return False
                    elif q.name not in (self.ignore_file.name, self.palette_file.name,   # a look is no frame
                                        self.stretch_file.name):
                        return False
            else:
                return False
        return True

    def recover(self) -> Path | None:
        """Finish a "new stack" interrupted by a crash (or just requested): archive, then promote the staging."""
        shutil.rmtree(self.out / (STAGING_DIR + ".tmp"), ignore_errors=True)
        staging = self.out / STAGING_DIR
        if not staging.is_dir():
            return None
        old = [p for p in self.out.iterdir()       # (the pause is the folder's: a new stack keeps it)
               if p.name not in (ARCHIVE_DIR, STAGING_DIR, TARGETS_FILE, SWITCH_FILE, PAUSE_FILE)]
        dest = None
        if old and self._holds_nothing(old):
            # an empty session (new stack pressed again before a frame came): nothing to archive — an archive
            # folder and a closed target per press grew the folder and every status with the requests.  Its
            # ignore list is within the new one (the daemon's) or deliberately dropped (run --new-session).
            for p in old:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            old = []
        if old:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            dest = self.out / ARCHIVE_DIR / stamp
            n = 1
            while dest.exists():
                dest, n = self.out / ARCHIVE_DIR / f"{stamp}-{n}", n + 1
            dest.mkdir(parents=True)
            for p in old:
                os.replace(p, dest / p.name)
        for p in staging.iterdir():
            os.replace(p, self.out / p.name)
        self._stand_in = {}      # the lists they stood in for are archived
        staging.rmdir()
        fsync_dir(self.out)
        return dest
