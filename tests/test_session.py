"""The session folder: checkpoint + frames.jsonl agree after any crash; new stack archives; nothing is lost."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from livestack.config import Config
from livestack.engine.pipeline import Engine
from livestack.session import (STAGING_DIR, FramesLog, SessionFolder, load_checkpoint, read_frames_log,
                               write_json_atomic)


@pytest.fixture(scope="module")
def six(daemon_night):
    return daemon_night[0][:6]


def run(engine, files, log=None):
    for f in files:
        rec = engine.process(f)
        if log is not None:
            d = rec.to_dict()
            d["path"] = f.name
            log.append(d)


def test_checkpoint_resumes_exactly(tmp_path, six):
    cfg = Config()
    a = Engine(cfg)
    run(a, six[:3])
    folder = SessionFolder(tmp_path)
    folder.save_checkpoint(a, lines=3, excluded=set())
    b, info = load_checkpoint(folder.checkpoint, cfg)
    assert info["lines"] == 3 and info["excluded"] == []
    run(a, six[3:])
    run(b, six[3:])
    (ia, wa), (ib, wb) = a.result(), b.result()
    assert np.array_equal(ia, ib) and np.array_equal(wa, wb)
    assert (a.n_stacked, a.n_rejected, a.index) == (b.n_stacked, b.n_rejected, b.index)
    assert not [p for p in folder.dir.iterdir() if p.name != "checkpoint.npz"]   # no temporary left behind


def test_resume_drops_the_lines_after_the_checkpoint(tmp_path, six):
    folder = SessionFolder(tmp_path)
    eng, log = Engine(Config()), FramesLog(folder.frames)
    run(eng, six[:3], log)
    folder.save_checkpoint(eng, lines=3, excluded=set())
    run(eng, six[3:5], log)                 # stacked, logged, but the process dies before the next checkpoint
    with open(folder.frames, "a") as f:     # and a line torn by the power cut
        f.write('{"file": "light_0005')
    r = folder.resume(Config())
    assert [d["file"] for d in r.records] == [f.name for f in six[:3]]
    assert [d["file"] for d in r.dropped] == [f.name for f in six[3:5]]
    assert [d["file"] for d in read_frames_log(folder.frames)] == [f.name for f in six[:3]]
    assert r.engine.n_stacked == 3 and "2 frames after the checkpoint queued again" in r.note


def test_checkpoint_from_before_an_exclusion_is_not_trusted(tmp_path, six):
    folder = SessionFolder(tmp_path)
    eng, log = Engine(Config()), FramesLog(folder.frames)
    run(eng, six[:3], log)
    folder.save_checkpoint(eng, lines=3, excluded=set())
    folder.set_excluded({six[1].name})      # crash right after the user's exclusion was saved
    r = folder.resume(Config())
    assert r.engine.n_stacked == 0 and r.records == [] and len(r.dropped) == 3
    assert "restacking" in r.note


def test_no_checkpoint_restacks_everything(tmp_path, six):
    folder = SessionFolder(tmp_path)
    log = FramesLog(folder.frames)
    run(Engine(Config()), six[:2], log)
    r = folder.resume(Config())
    assert r.engine.ref is None and len(r.dropped) == 2 and read_frames_log(folder.frames) == []


def test_new_session_archives_and_ignores(tmp_path, six):
    folder = SessionFolder(tmp_path)
    eng, log = Engine(Config()), FramesLog(folder.frames)
    run(eng, six[:2], log)
    folder.save_checkpoint(eng, lines=2, excluded=set())
    eng.snapshot(tmp_path)
    dest = folder.new_session({"a.dng", "b.dng"})
    assert sorted(p.name for p in dest.iterdir()) == ["frames.jsonl", "preview.jpg", "session", "stack.fits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "session"]
    assert folder.ignored() == {"a.dng", "b.dng"}
    r = folder.resume(Config())
    assert r.records == [] and r.engine.ref is None


def test_an_interrupted_new_session_is_finished_at_start(tmp_path, six):
    folder = SessionFolder(tmp_path)
    log = FramesLog(folder.frames)
    run(Engine(Config()), six[:1], log)
    (tmp_path / "stack.fits").write_bytes(b"old")
    staging = tmp_path / STAGING_DIR / "session"         # staged, then the power went
    staging.mkdir(parents=True)
    write_json_atomic(staging / "ignore.json", ["x.dng"])
    (tmp_path / "archive" / "20260101T000000Z").mkdir(parents=True)
    os.replace(tmp_path / "stack.fits", tmp_path / "archive" / "20260101T000000Z" / "stack.fits")  # half moved
    folder.resume(Config())
    assert folder.ignored() == {"x.dng"} and not (tmp_path / STAGING_DIR).exists()
    assert not folder.frames.exists() or read_frames_log(folder.frames) == []
    archived = sorted(p.name for d in (tmp_path / "archive").iterdir() for p in d.iterdir())
    assert "frames.jsonl" in archived and "stack.fits" in archived


def test_bad_excluded_list_is_one_line(tmp_path):
    folder = SessionFolder(tmp_path)
    folder.dir.mkdir(parents=True)
    folder.excluded_file.write_text(json.dumps({"a": 1}))
    with pytest.raises(Exception, match="excluded.json: expected a JSON list"):
        folder.excluded()
