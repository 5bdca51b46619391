"""Targets: one session folder per field of the sky, the current one in OUT/ itself, the others archived.

At an outreach night the telescope goes from M13 to M57 and back.  Each target keeps its own session — its
frames.jsonl, checkpoint, stack files and preview — so that a return resumes it on its own grid.  The current
target's session is OUT/ itself (what the page, the API and other programs read); the others live in
OUT/archive/<name>/.  ``targets.json`` lists them all:

    {"targets": [{"id": 1, "name": "M 13", "folder": "archive/M_13", "frames": 42, "pointing": [250.42, 36.46],
                  "current": false, ...}, ...]}

A switch moves the current session's files into its archive folder and the next target's files (if it had
any) into OUT/.  It is journaled (``.switch.json``): a crash at any point is finished by ``recover()`` at the
next start, so a target's files are never half here and half there.  What a target looks like to matching — its
reference stars, the grid they lie on, its pointing — is kept small in ``session/reference.json`` of its folder,
so deciding whether a frame belongs to an archived target never loads its stacks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine.register import RegisterParams, RegistrationError, register
from .engine.solve import separation_deg
from .engine.write import disk_full, fsync_dir
from .session import (ARCHIVE_DIR, FRAMES_LOG, PAUSE_FILE, SESSION_DIR, STAGING_DIR, SWITCH_FILE, TARGETS_FILE,
                      SessionFolder, read_frames_log, set_aside, write_json_atomic)

log = logging.getLogger("livestack")

REFERENCE_FILE = "reference.json"
# Entries of OUT/ that belong to no target's session (everything else moves with the current target).
SHARED = frozenset({ARCHIVE_DIR, STAGING_DIR, STAGING_DIR + ".tmp", TARGETS_FILE, SWITCH_FILE,
                    TARGETS_FILE + ".tmp", PAUSE_FILE})     # (the pause: the folder's, not a target's)


@dataclass
class Target:
    """One field of the sky and its session folder (relative to OUT: "." for the current target)."""

    id: int
    name: str
    folder: str
    frames: int = 0                                # stacked
    pointing: list[float] | None = None            # [RA, Dec] degrees: the solved centre, else the mount's
    named: str = "order"                           # where the name came from: "object" | "catalogue" | "order"
    closed: bool = False                           # archived by "new stack": listed, never resumed
    reference: str | None = None                   # its reference frame's file
    sky: dict | None = None                        # its plate solution as the page shows it (sky.sky_status)
    updated: str | None = None

    @property
    def current(self) -> bool:
        return self.folder == "."

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["current"] = self.current
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        names = {f.name for f in dataclasses.fields(cls)}
        t = cls(**{k: v for k, v in d.items() if k in names})
        if not isinstance(t.id, int) or not isinstance(t.name, str) or not isinstance(t.folder, str):
            raise ValueError(f"target entry {d!r}: needs an integer id, a name and a folder")
        if t.pointing is not None:
            t.pointing = [float(t.pointing[0]), float(t.pointing[1])]
        return t


def separation(a, b) -> float:
    """Angle between two (RA, Dec) positions in degrees."""
    return separation_deg(float(a[0]), float(a[1]), float(b[0]), float(b[1]))


def folder_name(name: str) -> str:
    """A target's name as an archive folder name: 'M 13' -> 'M_13'."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name.strip()).strip("._") or "target"


@dataclass
class Book:
    """targets.json of one output folder, and the switch between targets."""

    out: Path
    targets: list[Target] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.out / TARGETS_FILE

    # ------------------------------------------------------------------ reading and writing the list

    @classmethod
    def open(cls, out: Path) -> "Book":
        """The book of ``out``, after finishing a switch a crash interrupted.  A missing or unreadable
        targets.json is rebuilt from the folders: the current session, and every archived session."""
        out = Path(out)
        recover(out)
        book = cls(out)
        why = None
        if book.path.exists():
            try:
                data = json.loads(book.path.read_text(encoding="utf-8"))
                items = data["targets"] if isinstance(data, dict) else data
                book.targets = [Target.from_dict(d) for d in items]
                if sum(t.current for t in book.targets) != 1:
                    raise ValueError("expected exactly one target with folder '.'")
            except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
                why, book.targets = f"unreadable ({err})", []
        if not book.targets:
            try:
                if why is not None:
                    set_aside(book.path, why, "rebuilt from the session folders")
                book._rebuild()
            except OSError as err:
                # a start on a full or read-only disk: the list is kept in memory and saved with the stack files
                if disk_full(err, book.path) is None:
                    raise
                if not book.targets:
                    book._rebuild(save=False)
        return book

    def _rebuild(self, *, save: bool = True) -> None:
        """One target for the current session; the archived sessions found on disk follow (archives of a "new
        stack" and of older versions are listed closed: their reference is not known to be comparable)."""
        self.targets = [Target(1, "target 1", ".")]
        arch = self.out / ARCHIVE_DIR
        if arch.is_dir():
            for p in sorted(arch.iterdir()):
                if (p / FRAMES_LOG).exists():
                    ref = load_reference(p)
                    self.targets.append(Target(len(self.targets) + 1, p.name, f"{ARCHIVE_DIR}/{p.name}",
                                               closed=ref is None))
        if save:
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"targets": [t.to_dict() for t in self.targets]})

    @property
    def current(self) -> Target:
        return next(t for t in self.targets if t.current)

    def archived(self) -> list[Target]:
        """The targets a frame may return to."""
        return [t for t in self.targets if not t.current and not t.closed]

    def get(self, target_id: int) -> Target | None:
        return next((t for t in self.targets if t.id == target_id), None)

    def next_name(self) -> str:
        return f"target {max((t.id for t in self.targets), default=0) + 1}"

    def folder_of(self, t: Target) -> Path:
        return self.out if t.current else self.out / t.folder

    def known_files(self) -> set[str]:
        """The files a restart must not stack into the current target: those of the targets a frame may return
        to (their frames.jsonl), and every archived session's "new stack" ignore list.  (The files of a
        session closed by "new stack" are in the new session's ignore list — or, after `run --new-session`,
        deliberately in none: that flag restacks the folder.)"""
        known: set[str] = set()
        for t in self.targets:
            if t.current:
                continue
            session = SessionFolder(self.out / t.folder)
            if not t.closed:
                try:
                    records = read_frames_log(session.frames)
                except OSError:          # an unreadable archive must not stop the start
                    records = []
                known.update(d.get("path") or d["file"] for d in records
                             if isinstance(d, dict) and isinstance(d.get("path") or d.get("file"), str))
            known.update(session.load_list(session.ignore_file)[0])      # unreadable: none
        return known

    # ------------------------------------------------------------------ the switch

    def switch(self, to: Target | None) -> Target:
        """Archive the current target and make ``to`` (an archived target) current — or, when ``to`` is None,
        a new empty target ("target N" until its reference names it).  Returns the new current target.
        Crash-safe (see recover)."""
        cur = self.current
        base = folder_name(cur.name)
        dest, n = f"{ARCHIVE_DIR}/{base}", 2
        while (self.out / dest).exists():       # even the returning target's own: it is emptied only after
            dest, n = f"{ARCHIVE_DIR}/{base}-{n}", n + 1
        targets = [dataclasses.replace(t) for t in self.targets]
        for t in targets:
            if t.id == cur.id:
                t.folder = dest
        if to is None:
            new = Target(max(t.id for t in targets) + 1, self.next_name(), ".")
            targets.append(new)
            bring = None
        else:
            new = next(t for t in targets if t.id == to.id)
            bring, new.folder = to.folder, "."
        journal = {"phase": "archive", "archive_as": dest, "bring": bring,
                   "targets": [t.to_dict() for t in targets]}
        write_json_atomic(self.out / SWITCH_FILE, journal)
        _carry_out(self.out, journal)
        self.targets = targets
        return new

    def close_current(self, archived_as: Path | None) -> Target:
        """After a "new stack" (session.new_session moved the current session to ``archived_as``): the old
        target is listed closed, and a new current one starts."""
        cur = self.current
        if archived_as is not None:
            cur.folder, cur.closed = str(archived_as.relative_to(self.out)), True
        else:
            self.targets.remove(cur)
        new = Target(max((t.id for t in self.targets), default=0) + 1, self.next_name(), ".")
        self.targets.append(new)
        self.save()
        return new


def _carry_out(out: Path, j: dict) -> None:
    """Do (or finish) the switch journal ``j`` describes; each step can be repeated after a crash."""
    if j["phase"] == "archive":
        dest = out / j["archive_as"]
        dest.mkdir(parents=True, exist_ok=True)
        for p in list(out.iterdir()):
            if p.name not in SHARED:
                os.replace(p, dest / p.name)
        fsync_dir(dest)
        fsync_dir(out)
        j = {**j, "phase": "bring"}
        write_json_atomic(out / SWITCH_FILE, j)
    if j["phase"] == "bring":
        if j["bring"]:
            src = out / j["bring"]
            if src.is_dir():
                for p in list(src.iterdir()):
                    os.replace(p, out / p.name)
                shutil.rmtree(src, ignore_errors=True)
            fsync_dir(out)
        write_json_atomic(out / TARGETS_FILE, {"targets": j["targets"]})
        (out / SWITCH_FILE).unlink()
        fsync_dir(out)


def recover(out: Path) -> bool:
    """Finish a switch a crash interrupted.  True when there was one."""
    path = Path(out) / SWITCH_FILE
    if not path.exists():
        return False
    try:
        j = json.loads(path.read_text(encoding="utf-8"))
        if j.get("phase") not in ("archive", "bring") or not isinstance(j.get("targets"), list):
            raise ValueError("not a switch journal")
    except (OSError, ValueError) as err:
        # write_json_atomic never leaves a torn journal: this is a hand-made file; the folders are as they are
        set_aside(path, f"unreadable ({err})")
        return False
    log.warning("livestack: finishing a switch of targets interrupted by a crash (%s)", j["phase"])
    _carry_out(Path(out), j)
    return True


# ---------------------------------------------------------------------- what matching needs of a target

def save_reference(folder: Path, engine) -> None:
    """The engine's reference (stars on its grid, the grid, pointing, object) as ``session/reference.json``."""
    ref, grid = engine.ref, engine.grid
    d = {"file": ref.file, "grid": grid.state(), "object": ref.object,
         "pointing": None if ref.pointing is None else list(ref.pointing),
         "xy": np.round(ref.stars.xy, 3).tolist(), "flux": np.round(ref.stars.flux, 3).tolist()}
    (folder / SESSION_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SESSION_DIR / REFERENCE_FILE, d)


def load_reference(folder: Path) -> dict | None:
    """What save_reference wrote (``xy``, ``flux`` as arrays), or None when absent or unreadable."""
    try:
        d = json.loads((Path(folder) / SESSION_DIR / REFERENCE_FILE).read_text(encoding="utf-8"))
        d["xy"] = np.asarray(d["xy"], np.float64).reshape(-1, 2)
        d["flux"] = np.asarray(d["flux"], np.float64).reshape(-1)
        if len(d["flux"]) != len(d["xy"]) or not isinstance(d.get("grid"), dict):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return d


def _geometry(grid_state: dict) -> dict:
    """What makes star positions on two grids comparable: the sensor, its pattern and the grid's scale — not
    the demosaic (a bilinear target of last month and an MHC session today have the same full-resolution grid),
    nor a drizzle's pixfrac (the stars are measured on the sensor and placed by the scale alone)."""
    mode = grid_state.get("mode")
    return {**{k: v for k, v in grid_state.items() if k != "pixfrac"},
            "mode": "full" if mode in ("bayer", "bayer-mhc") else mode}


def match_target(stars, grid_state: dict, pointing, candidates: list[tuple[Target, dict]], p: RegisterParams, *,
                 slew_deg: float, rng: np.random.Generator, here=None) -> Target | None:
    """The archived target a frame belongs to: its stars register onto the target's reference stars (same grid),
    or its pointing is within ``slew_deg`` of the target's and farther than that from ``here``, the current
    target's pointing (when it is known).  Nearest pointing first.

    The daemon asks only about a frame that did not register onto the current target, and — when both pointings
    are known — pointed within ``slew_deg`` of it (a farther one has switched already): a pointing that is also
    within ``slew_deg`` of an archived target (mosaic panels, two galaxies of one group, one field taken with two
    cameras) cannot tell the two apart; trusting it sent a stray frame from one to the other and back without
    end."""
    def distance(item):
        t, ref = item
        tp = ref.get("pointing") or t.pointing      # the mount's idea, like the frame's header: compare like with like
        return separation(pointing, tp) if pointing is not None and tp is not None else math.inf

    ambiguous = pointing is not None and here is not None and separation(pointing, here) <= slew_deg
    for t, ref in sorted(candidates, key=distance):
        d = distance((t, ref))
        if d <= slew_deg and not ambiguous:
            return t
        if math.isfinite(d) and d > 5 * slew_deg:
            continue         # the mount was far from it: not worth a pattern match
        if _geometry(ref["grid"]) != _geometry(grid_state) or stars is None or len(stars.xy) < p.min_matches:
            continue
        try:
            register(stars.xy, ref["xy"], p, rng=rng, src_flux=stars.flux, ref_flux=ref["flux"])
        except (RegistrationError, ValueError):
            continue
        return t
    return None
