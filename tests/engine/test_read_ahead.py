"""Reading the next file ahead (process(next_path=…)) changes when the work is done, never its result."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from livestack.config import Config
from livestack.engine.pipeline import Engine


def _records(engine, files, ahead: bool, order=None, *, last_ahead: bool = False):
    """Each file's record (without its seconds), read ahead or not; ``last_ahead``: the last file's star search
    in the read-ahead too (process's next_last)."""
    out = []
    order = list(range(len(files))) if order is None else order
    for k, i in enumerate(order):
        nxt = files[order[k + 1]] if ahead and k + 1 < len(order) else None
        d = engine.process(files[i], next_path=nxt, next_last=last_ahead and k + 2 == len(order)).to_dict()
        d.pop("seconds")
        out.append(d)
    return out


@pytest.mark.parametrize("mono", [False, True])
def test_read_ahead_gives_the_same_records_and_stack(night, mono):
    files, _ = night(n_frames=9, mono=mono, defects={3: "cloudy", 5: "satellite"},
                     **({} if mono else {"fmt": "dng"}))
    plain, ahead = Engine(Config()), Engine(Config())
    assert _records(plain, files, False) == _records(ahead, files, True)
    (a, wa), (b, wb) = plain.result(), ahead.result()
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(wa, wb)
    assert ahead._ahead is None and "cfa0" not in ahead._ws or "cfa1" not in ahead._ws   # one mosaic kept
    ahead.close()


def test_a_file_read_ahead_but_not_handed_in_next_is_dropped(night, tmp_path):
    """The caller changed its mind (the daemon switched targets, a file was excluded): the frame read ahead is
    dropped, the one handed in is processed as usual, and the dropped one can still be processed later."""
    files, _ = night(n_frames=5)
    plain, ahead = Engine(Config()), Engine(Config())
    want = _records(plain, files, False, order=[0, 1, 3, 2, 4])
    got = []
    for i, nxt in ((0, 1), (1, 2), (3, 4), (2, 4), (4, None)):   # 2 read ahead, then 3 handed in instead
        d = ahead.process(files[i], next_path=None if nxt is None else files[nxt]).to_dict()
        d.pop("seconds")
        got.append(d)
    assert got == want
    ahead.close()


def test_a_bad_file_read_ahead_fails_when_its_turn_comes(night, tmp_path):
    files, _ = night(n_frames=3)
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    seq = [files[0], bad, files[1], files[2]]
    eng = Engine(Config())
    recs = [eng.process(f, next_path=seq[i + 1] if i + 1 < len(seq) else None) for i, f in enumerate(seq)]
    assert [r.status for r in recs] == ["reference", "failed", "stacked", "stacked"]
    assert recs[1].reason and eng.n_failed == 1
    eng.close()


def test_a_frame_of_another_size_read_ahead_before_the_reference_is_set_is_refused(night, tmp_path):
    """The grid is chosen at the reference: a frame read ahead while the reference was being processed is
    checked against it when its turn comes."""
    files, _ = night(n_frames=2)
    small, _ = night("small", n_frames=1, width=320, height=240)
    eng = Engine(Config())
    r0 = eng.process(files[0], next_path=small[0])
    r1 = eng.process(small[0], next_path=files[1])
    r2 = eng.process(files[1])
    assert (r0.status, r1.status, r2.status) == ("reference", "failed", "stacked")
    assert "differs from the session's" in r1.reason
    eng.close()


def test_a_frame_without_noise_fails_for_the_same_reason_on_either_path(night, tmp_path):
    """A processed image (a float frame whose sky has no scatter) fails with the sky model's reason whether
    its first stages ran on the worker threads (a live frame: the star finder beside the sky model) or in the
    read-ahead thread (serially) — the star finder's own trouble with it does not come first."""
    from astropy.io import fits

    files, _ = night(n_frames=3, mono=True)
    flat = np.zeros((480, 640), np.float32)
    flat[::7, ::5] = 5000.0                     # sparse spikes on a sky of exactly 0
    bad = tmp_path / "processed.fits"
    fits.writeto(bad, flat)
    for ahead in (False, True):
        eng = Engine(Config())
        eng.process(files[0], next_path=bad if ahead else None)
        rec = eng.process(bad, next_path=files[1] if ahead else None)
        assert rec.status == "failed" and "no measurable noise in the sky" in rec.reason, rec.reason
        assert eng.process(files[1]).status == "stacked"         # and the run carries on
        eng.close()


def _star_searches(monkeypatch) -> list[str]:
    """The names of the threads the star searches run in, in order, from now on."""
    from livestack.engine.grid import Grid

    where = []
    real = Grid.find_stars

    def find_stars(self, *args, **kwargs):
        where.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Grid, "find_stars", find_stars)
    return where


def test_a_read_ahead_leaves_the_star_search_to_the_frames_own_turn(night, monkeypatch):
    """sep holds the GIL while it searches for stars, which in the read-ahead thread stopped the worker threads
    stacking the frame before: a frame read ahead has its stars searched in the caller's thread, after the
    next file's reading has started — and with the same records and stack (the test above)."""
    files, _ = night(n_frames=5, fmt="dng")
    where = _star_searches(monkeypatch)
    eng = Engine(Config())
    recs = [eng.process(f, next_path=files[i + 1] if i + 1 < len(files) else None) for i, f in enumerate(files)]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 4
    assert len(where) == len(files) and set(where) == {threading.current_thread().name}, where
    assert "stars" in eng.timings
    eng.close()


@pytest.mark.parametrize("n", [5, 2])
def test_a_batchs_last_file_has_its_stars_searched_ahead_with_the_same_result(night, monkeypatch, tmp_path, n):
    """process(next_last=True): the last file's star search runs in the read-ahead thread, beside the frame
    before — so that the last frame (whose stack file streams as it is stacked) starts sooner; every other
    file's still in the caller's thread.  Records and stack as without it; `livestack stack` asks for it.
    Two files: the second's search starts before the first has set the grid (it finds its stars on a grid of
    its own, equal to the reference's, as at its turn)."""
    from livestack import cli

    files, _ = night(n_frames=n, fmt="dng")
    where = _star_searches(monkeypatch)
    plain, eng = Engine(Config()), Engine(Config())
    want = _records(plain, files, True)
    where.clear()
    assert _records(eng, files, True, last_ahead=True) == want
    me = threading.current_thread().name
    assert where[:-1] == [me] * (n - 1) and where[-1].startswith("read-ahead"), where
    (a, wa), (b, wb) = plain.result(), eng.result()
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(wa, wb)
    plain.close()
    eng.close()

    where.clear()
    assert cli.main(["stack", *map(str, files), "-o", str(tmp_path / "out"), "-q", "--no-solve"]) == 0
    assert where[:-1] == [me] * (n - 1) and where[-1].startswith("read-ahead"), where


def test_the_next_file_starts_beside_a_frame_nothing_was_read_ahead_for(night, monkeypatch):
    """The first file of a folder has nobody reading it ahead: the next file's first stages are started before
    its own (LibRaw's decoding leaves a core idle otherwise), into the other mosaic buffer — same results."""
    files, _ = night(n_frames=4, fmt="dng")
    eng = Engine(Config())
    order = []
    start, front = Engine._start_front, Engine._front

    def started(self, path, stars=False):
        order.append(("ahead", path.name)) if self._ahead is None else None
        return start(self, path, stars)

    def own(self, path, slot, **kw):
        if kw.get("threads"):
            order.append(("here", path.name))
        return front(self, path, slot, **kw)

    monkeypatch.setattr(Engine, "_start_front", started)
    monkeypatch.setattr(Engine, "_front", own)
    recs = [eng.process(f, next_path=files[i + 1] if i + 1 < len(files) else None) for i, f in enumerate(files)]
    assert order[:2] == [("ahead", files[1].name), ("here", files[0].name)]
    assert [r.status for r in recs] == ["reference", "stacked", "stacked", "stacked"]
    eng.close()


@pytest.mark.parametrize("drizzle", [False, True])
def test_the_read_ahead_goes_on_beside_the_bootstrap_unless_its_combination_is_the_memory_peak(night, monkeypatch,
                                                                                               drizzle):
    """A colour stack of three bootstrap frames holds less in its combination than in the frames after it (the
    buffer's rows go as the accumulators' fill): the file after the frame that fills the buffer is read ahead as
    any other, and the heap keeps its free memory for it.  A drizzled stack's buffer (coverage planes too)
    outweighs its accumulators: nothing is read beside its combination, and the work memory goes first."""
    import dataclasses

    from livestack.engine.drizzle import DrizzleParams

    files, _ = night(n_frames=5, fmt="dng")
    cfg = dataclasses.replace(Config(), drizzle=DrizzleParams(scale=1.0)) if drizzle else Config()
    eng = Engine(cfg)
    here, dropped = [], []
    front = Engine._front

    def own(self, path, slot, **kw):
        if kw.get("threads"):
            here.append(path.name)
        return front(self, path, slot, **kw)

    from livestack.engine import pipeline

    monkeypatch.setattr(Engine, "_front", own)
    monkeypatch.setattr(pipeline, "release_free_memory", lambda: dropped.append("heap"))
    recs = [eng.process(f, next_path=files[i + 1] if i + 1 < len(files) else None) for i, f in enumerate(files)]
    assert [r.status for r in recs] == ["reference"] + ["stacked"] * 4
    assert eng._combination_peaks(eng.main) == drizzle
    assert here == ([files[0].name, files[3].name] if drizzle else [files[0].name])
    assert dropped == (["heap"] if drizzle else [])
    eng.close()
