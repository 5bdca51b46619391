"""FITS written without astropy (write.py formats the plain cards itself): the bytes astropy writes, read back by
astropy, and astropy still formats what needs more than one card."""
import os

import numpy as np
import pytest
from astropy.io import fits

from livestack.engine.write import header_bytes, write_fits, write_fits_blocks

CARDS = [("NCOMBINE", 12, "frames combined"), ("EXPTIME", 720.125, "[s] total exposure of combined frames"),
         ("DATE-OBS", "2026-11-28T21:03:04.500", "start of the first combined frame"),
         ("BAYERPAT", "RGGB", "CFA pattern of the source (stack is RGB)"), ("KAPPA", 3.0, ""),
         ("SOFTWARE", "livestack 0.9", ""), ("FLAG", False, ""), ("NEG", -7, "a negative"),
         ("CRVAL1", 189.99763298743, "[deg] RA"), ("CDELT2", 1.234567890123e-05, ""), ("BIG", 6.02214076e+23, ""),
         ("TINY", -1e-300, ""), ("QUOTE", "it's", ""), ("EMPTY", "", ""), ("LONGNUM", 0.1 + 0.2, ""),
         ("FILTREF", "x" * 60, ""), ("COMMENT", "sum of frame weights per pixel (reference frame = 1)", ""),
         ("NCOUNT", np.int64(5), ""), ("NPFLOAT", np.float32(0.1), "numpy float"), ("NPBOOL", np.bool_(True), ""),
         ("EXP5", 1e-05, ""), ("E16", 1e16, ""), ("CUT", 1.2345678901234567e-100, "mantissa cut"),
         ("BIGINT", 2 ** 62, "")]


def test_plain_cards_are_the_bytes_astropy_writes():
    assert header_bytes(CARDS) == fits.Header(CARDS).tostring().encode("ascii")
    long_comment = [("LONGCOM", 1.5, "c" * 75)]          # cut at the card's end, as astropy does (it warns)
    with pytest.warns(fits.verify.VerifyWarning, match="comment will be truncated"):
        want = fits.Header(long_comment).tostring().encode("ascii")
    assert header_bytes(long_comment) == want


@pytest.mark.parametrize("card", [("LONGSTR", "y" * 90, "a value of two cards"), ("HIERARCH ESO DET", 1, ""),
                                  ("NAN", float("nan"), "")])
def test_what_needs_more_than_a_card_is_astropys(card):
    if card[0] == "NAN":
        with pytest.raises(ValueError):     # astropy refuses NaN: so does the writer
            header_bytes([card])
        return
    got = header_bytes([("A", 1, "")] + [card])
    assert got == fits.Header([("A", 1, "")] + [card]).tostring().encode("ascii")


def test_a_stack_file_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (3, 37, 51)).astype(np.float32)
    weight = rng.uniform(0, 9, (37, 51)).astype(np.float32)
    hdr = {k: (v, c) for k, v, c in CARDS if k != "COMMENT"}
    write_fits(tmp_path / "s.fits", img, hdr, weight=weight)
    with fits.open(tmp_path / "s.fits") as f:
        f.verify("exception")
        np.testing.assert_array_equal(f[0].data, img)
        np.testing.assert_array_equal(f["WEIGHT"].data, weight)
        assert f[0].header["NCOMBINE"] == 12 and f[0].header["QUOTE"] == "it's"
        assert f[0].header["CDELT2"] == 1.234567890123e-05 and f[0].header["FLAG"] is False
    write_fits(tmp_path / "m.fits", img[:1], {"A": (1, "")})
    with fits.open(tmp_path / "m.fits") as f:
        assert f[0].data.shape == (37, 51) and len(f) == 1


def test_a_short_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image of 10 values, expected 20"):
        write_fits_blocks(tmp_path / "s.fits", (4, 5), [np.zeros((2, 5), np.float32)], {})
    assert not list(tmp_path.iterdir())


def test_an_atomic_write_makes_its_temporary_afresh(tmp_path):
    """The writer is handed a name that does not exist yet, beside the file, so it creates the temporary rather
    than truncating one: on ext4 a file truncated to 0 is flushed when closed (auto_da_alloc), which made a
    checkpoint that gave way to a landing frame take 0.2–0.5 s to do so (bench_daemon's live frames).  The
    result is readable by others (0644) and replaces the old file in one rename; a writer that fails leaves
    the old file and no temporary."""
    import os
    import stat

    from livestack.engine.write import atomic_write_with

    dst = tmp_path / "stack.fits"
    dst.write_bytes(b"old")
    seen = []

    def writer(tmp):
        seen.append((tmp.parent == tmp_path, tmp.name.startswith(".stack.fits."), tmp.exists()))
        with open(tmp, "xb") as f:          # exclusive creation: fails if the name already exists
            f.write(b"new")

    atomic_write_with(dst, writer)
    assert seen == [(True, True, False)]
    assert dst.read_bytes() == b"new" and stat.S_IMODE(os.stat(dst).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        atomic_write_with(dst, failing)
    assert dst.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]


def test_long_writes_ask_the_disk_to_start_as_they_go(tmp_path, monkeypatch, night):
    """A stack file or a checkpoint of hundreds of MB is fsynced before its rename: the writers ask the kernel
    to start writing every WRITEBACK_BYTES (sync_file_range), so the fsync waits only for the tail.  Checked
    with the threshold lowered: each writer asks at least once per threshold, on its own open temporary, and
    the files read back intact; a deferrable write (the daemon's idle ones) does not ask."""
    import os

    from livestack import session
    from livestack.config import Config
    from livestack.engine import write
    from livestack.engine.pipeline import Engine
    from livestack.engine.write import write_fits_rows

    if write._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range in this C library")
    real, asked = write._SYNC_FILE_RANGE, []

    def counting(fd, offset, nbytes, flags):
        asked.append((os.readlink(f"/proc/self/fd/{fd}"), flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(write, "_SYNC_FILE_RANGE", counting)
    monkeypatch.setattr(write, "WRITEBACK_BYTES", 64 * 1024)
    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, (3, 1000, 200)).astype(np.float32)         # 2.4 MB of image, written 200 kB at a time
    weight = rng.uniform(0, 9, (1000, 200)).astype(np.float32)
    write_fits(tmp_path / "s.fits", img, {"A": (1, "")}, weight=weight)
    assert len(asked) >= 12 and all(".s.fits." in p and p.endswith(".tmp") and f == 2 for p, f in asked)
    with fits.open(tmp_path / "s.fits") as f:
        np.testing.assert_array_equal(f[0].data, img)
        np.testing.assert_array_equal(f["WEIGHT"].data, weight)
    asked.clear()
    write_fits_rows(tmp_path / "r.fits", img.shape, [(r, img[:, r:r + 10], weight[r:r + 10])
                                                     for r in range(0, 1000, 10)], {}, weighted=True)
    assert len(asked) >= 30 and all(".r.fits." in p for p, _ in asked)
    with fits.open(tmp_path / "r.fits") as f:
        np.testing.assert_array_equal(f[0].data, img)
        np.testing.assert_array_equal(f["WEIGHT"].data, weight)
    asked.clear()
    with write.deferrable(lambda: False):       # the daemon's idle writes: a give-way must not wait for the disk
        write_fits(tmp_path / "d.fits", img, {"A": (1, "")}, weight=weight)
    assert asked == []
    files, _ = night(n_frames=2)
    eng = Engine(Config())
    for p in files:
        eng.process(p)
    asked.clear()
    monkeypatch.setattr(session, "CHUNK_BYTES", 16 * 1024)
    session.save_engine(eng, tmp_path / "ckpt.npz")
    assert len(asked) >= 4 and all(".ckpt.npz." in p for p, _ in asked)
    back, _ = session.load_engine(tmp_path / "ckpt.npz", Config())
    (a, wa), (b, wb) = eng.result(), back.result()
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(wa, wb)


def test_long_writes_flush_the_disk_as_they_go_and_say_its_error(tmp_path, monkeypatch, night):
    """Every FLUSH_BYTES a long write also has the disk flush its cache (an fdatasync in a thread of its own), so
    the fsync before the rename waits only for the tail — each writer, on its own temporary, the files intact,
    none for a deferrable write.  A flush that fails fails the write: the error is said, the old file kept and
    no temporary left (the commit's fsync, on a descriptor opened after the flush saw it, would not be told)."""
    import errno
    import os

    from livestack import session
    from livestack.config import Config
    from livestack.engine import write
    from livestack.engine.pipeline import Engine
    from livestack.engine.write import StreamedFits, write_fits_rows

    if write._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range in this C library")
    flushed, failing = [], []

    def fdatasync(fd):
        # (recorded, not done: a real one waits for the disk — up to a second on a busy one, while the writer,
        # whose next flush starts only once this one has ended, ran to its file's end: one flush in all)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if failing:
            raise OSError(errno.EIO, "Input/output error")
        flushed.append(name)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(write, "WRITEBACK_BYTES", 64 * 1024)
    monkeypatch.setattr(write, "FLUSH_BYTES", 256 * 1024)
    rng = np.random.default_rng(2)
    img = rng.normal(100, 5, (3, 1000, 200)).astype(np.float32)         # 2.4 MB of image
    weight = rng.uniform(0, 9, (1000, 200)).astype(np.float32)
    rows = [(r, img[:, r:r + 10], weight[r:r + 10]) for r in range(0, 1000, 10)]

    def streamed(name):
        f = StreamedFits(tmp_path / name, img.shape, {"A": (1, "")})
        for r in rows:
            f.put(*r)
        return f.commit({"A": (2, "")})

    write_fits(tmp_path / "s.fits", img, {"A": (1, "")}, weight=weight)
    write_fits_rows(tmp_path / "r.fits", img.shape, rows, {}, weighted=True)
    assert streamed("t.fits")
    for name in ("s.fits", "r.fits", "t.fits"):
        assert sum(f".{name}." in p and p.endswith(".tmp") for p in flushed) >= 2, (name, flushed)
        with fits.open(tmp_path / name) as f:
            np.testing.assert_array_equal(f[0].data, img)
            np.testing.assert_array_equal(f["WEIGHT"].data, weight)
    files, _ = night(n_frames=2)
    eng = Engine(Config())
    for p in files:
        eng.process(p)
    monkeypatch.setattr(session, "CHUNK_BYTES", 16 * 1024)
    session.save_engine(eng, tmp_path / "ckpt.npz")
    assert any(".ckpt.npz." in p for p in flushed)
    flushed.clear()
    with write.deferrable(lambda: False):
        write_fits(tmp_path / "d.fits", img, {"A": (1, "")}, weight=weight)
    assert flushed == []

    failing.append(True)
    kept = {name: (tmp_path / name).read_bytes() for name in ("s.fits", "r.fits", "t.fits")}
    with pytest.raises(OSError, match="s.fits: input/output error"):
        write_fits(tmp_path / "s.fits", img * 2, {"A": (1, "")}, weight=weight)
    with pytest.raises(OSError, match="r.fits: input/output error"):
        write_fits_rows(tmp_path / "r.fits", img.shape, rows, {"B": (1, "")}, weighted=True)
    with pytest.raises(OSError, match="t.fits: input/output error"):
        streamed("t.fits")
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _direct_small(monkeypatch, chunk=8192):
    """The direct path for small files, with chunks small enough that blocks and headers straddle them."""
    from livestack.engine import write

    monkeypatch.setattr(write, "DIRECT_MIN", 0)
    monkeypatch.setattr(write, "DIRECT_CHUNK", chunk)
    return write


@pytest.mark.parametrize("shape", [(3, 37, 51), (40, 1000), (2, 3)])
def test_a_stack_written_past_the_page_cache_is_the_same_file(tmp_path, monkeypatch, shape):
    """A large stack.fits goes to the disk with O_DIRECT (write._DirectFile): byte for byte the file the page
    cache path writes, whatever the size against the chunks and the 4096-byte alignment (a tail cut to size)."""
    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, shape).astype(np.float32)
    weight = rng.uniform(0, 9, shape[-2:]).astype(np.float32)
    hdr = {"NCOMBINE": (12, "frames combined")}
    write_fits(tmp_path / "cached.fits", img, hdr, weight=weight)
    write = _direct_small(monkeypatch)
    opened = []
    real_open = write._DirectFile.open
    monkeypatch.setattr(write._DirectFile, "open", classmethod(lambda cls, p: opened.append(p) or real_open(p)))
    # blocks of uneven rows, as a stack's mean_blocks gives them
    blocks = [img.reshape(-1, shape[-1])[r:r + 7] for r in range(0, img.reshape(-1, shape[-1]).shape[0], 7)]
    write_fits_blocks(tmp_path / "direct.fits", img.shape, blocks, hdr, weight=weight)
    assert opened, "the direct path was not taken"
    assert (tmp_path / "direct.fits").read_bytes() == (tmp_path / "cached.fits").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached.fits", "direct.fits"]


def test_a_filesystem_without_direct_io_gets_the_page_cache_path(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 and some FUSE filesystems refuse O_DIRECT (EINVAL), at open or at the first write:
    the file is written through the page cache instead, the same bytes."""
    import errno

    img = np.arange(3 * 20 * 30, dtype=np.float32).reshape(3, 20, 30)
    write_fits(tmp_path / "want.fits", img, {})
    write = _direct_small(monkeypatch)

    def refuse(fd, data, offset):        # (the page cache path does not call pwrite)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(write.os, "pwrite", refuse)
    write_fits(tmp_path / "got.fits", img, {})
    assert (tmp_path / "got.fits").read_bytes() == (tmp_path / "want.fits").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got.fits", "want.fits"]


def test_a_full_disk_during_a_direct_write_keeps_the_old_file(tmp_path, monkeypatch):
    """ENOSPC from a chunk written by the second thread: DiskFull naming the file, the old file kept, no
    temporary left."""
    import errno
    import os

    from livestack.engine.write import DiskFull

    write = _direct_small(monkeypatch)
    real_pwrite = os.pwrite
    calls = []

    def fill(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(write.os, "pwrite", fill)
    (tmp_path / "s.fits").write_bytes(b"old")
    with pytest.raises(DiskFull, match="disk full: .*s.fits"):
        write_fits(tmp_path / "s.fits", np.ones((3, 40, 100), np.float32), {})
    assert (tmp_path / "s.fits").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.fits"]


def _rows_direct(monkeypatch, tmp_path, buffer=4096, buffers=2):
    """FitsRows' direct path (write._Ranges) for small files, with buffers so small and few that pieces are
    split over them and their putters wait for the writers; skipped where tmp_path takes no O_DIRECT."""
    from livestack.engine import write

    fd = write._open_direct(tmp_path / "probe")
    if fd is None:
        pytest.skip("no direct I/O on this filesystem")
    os.close(fd)
    os.unlink(tmp_path / "probe")
    monkeypatch.setattr(write, "DIRECT_MIN", 0)
    monkeypatch.setattr(write, "ROWS_BUFFER", buffer)
    monkeypatch.setattr(write, "ROWS_BUFFERS", buffers)
    return write


@pytest.mark.parametrize("direct", [False, True])
def test_rows_put_from_two_threads_in_any_order_make_the_same_file(tmp_path, monkeypatch, direct):
    # FitsRows (the last frame's stack.fits, outputs.FinalStream): blocks of rows put from two threads in a
    # shuffled order, the header last: the same bytes as write_fits_rows; a row missing is said, naming the file.
    # direct: past the page cache — every write whole 4096-byte pages at their offsets (the kernel refuses any
    # other), the pieces' partial pages gathered, the last page cut back to the file's size
    import fcntl
    from concurrent.futures import ThreadPoolExecutor

    from livestack.engine.write import FitsRows, _primary_header, write_fits_rows

    writes = []
    if direct:
        write = _rows_direct(monkeypatch, tmp_path)
        real_pwrite = os.pwrite
        monkeypatch.setattr(write.os, "pwrite", lambda fd, d, o: writes.append((o, len(d))) or real_pwrite(fd, d, o))
    rng = np.random.default_rng(5)
    img = rng.normal(100, 5, (3, 301, 123)).astype(np.float32)
    weight = rng.uniform(0, 9, (301, 123)).astype(np.float32)
    hdr = {"NCOMBINE": (7, "")}
    blocks = [(r, img[:, r:r + 16], weight[r:r + 16]) for r in range(0, 301, 16)]
    write_fits_rows(tmp_path / "in_order.fits", img.shape, blocks, hdr, weighted=True)
    head = _primary_header(img.shape, hdr, extend=True)
    writes.clear()
    f = FitsRows(tmp_path / "shuffled.fits", img.shape, len(head), weighted=True)
    try:
        assert bool(fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_DIRECT) == direct
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda i: f.put(*blocks[i]), rng.permutation(len(blocks))))
        f.finish(head, "shuffled.fits")
    finally:
        f.close()
    assert (tmp_path / "shuffled.fits").read_bytes() == (tmp_path / "in_order.fits").read_bytes()
    if direct:
        size = (tmp_path / "in_order.fits").stat().st_size
        assert size % 4096 and all(o % 4096 == 0 and n % 4096 == 0 for o, n in writes)
        assert sum(n for o, n in writes) == 4096 + -(-size // 4096) * 4096     # the probe's page, then each once
    g = FitsRows(tmp_path / "short.fits", img.shape, len(head), weighted=True)
    try:
        g.put(*blocks[0])
        with pytest.raises(ValueError, match="short.fits: 16 rows written, expected 301"):
            g.finish(head, "short.fits")
    finally:
        g.close()


def test_a_full_disk_under_the_rows_writers_keeps_the_old_file(tmp_path, monkeypatch):
    """ENOSPC from one of _Ranges' writer threads while two threads put rows (and wait for its few buffers): no
    putter hangs, each later put raises the error (FinalStream.rows keeps it; stack.fits is then written after
    the frame, where the error comes again), a commit then writes nothing; the error at the header's page, the
    last write, makes the commit raise DiskFull naming the file.  The old file kept, no temporary left."""
    import errno
    from concurrent.futures import ThreadPoolExecutor

    from livestack.engine.write import DiskFull, StreamedFits

    write = _rows_direct(monkeypatch, tmp_path)
    real_pwrite, calls = os.pwrite, []
    img = np.ones((3, 200, 1000), np.float32)
    (tmp_path / "s.fits").write_bytes(b"old")

    def put_all(fail):
        calls.clear()

        def pwrite(fd, data, offset):
            calls.append(offset)
            if fail(offset):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(write.os, "pwrite", pwrite)
        f = StreamedFits(tmp_path / "s.fits", img.shape, {"A": (1, "")})
        refused = []

        def put(r):
            try:
                f.put(r, img[:, r:r + 8], img[0, r:r + 8])
            except OSError as err:
                refused.append(err.errno)

        with ThreadPoolExecutor(2) as ex:
            list(ex.map(put, range(0, 200, 8)))
        return f, refused

    f, refused = put_all(lambda offset: len(calls) > 5)
    assert refused and set(refused) == {errno.ENOSPC}
    assert f.commit({"A": (2, "")}) is False
    assert [p.name for p in tmp_path.iterdir()] == ["s.fits"]
    f, refused = put_all(lambda offset: offset == 0 and len(calls) > 1)     # (the first: O_DIRECT's probe)
    assert refused == []
    with pytest.raises(DiskFull, match="disk full: .*s.fits"):
        f.commit({"A": (2, "")})
    assert (tmp_path / "s.fits").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.fits"]
