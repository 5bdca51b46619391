"""Outputs, each written atomically (temporary file in the same folder, fsync, rename), so that a crash or a
power cut leaves the previous complete file, never a torn one."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import mmap
import os
import queue
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np

# The temporary of a write in progress: ".<name>.<8 characters of tempfile's alphabet>.tmp" beside the file.  A
# process killed mid-write leaves it behind (a 24 MP stack's is ~470 MB): remove_orphans() finds exactly these.
_TMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


class WriteDeferred(Exception):
    """A write given up because something more urgent is waiting (deferrable()): the file keeps its old content."""


_defer = threading.local()


@contextlib.contextmanager
def deferrable(more_urgent):
    """Writes in this thread inside the block give up, between blocks of a few MB, with WriteDeferred (their
    temporary removed, the old file kept) as soon as ``more_urgent()`` is true — the daemon's stack.fits and
    checkpoint written while it is idle, when the next frame lands (a 24 MP checkpoint takes ~1–1.5 s: the
    frame would wait for it)."""
    old = getattr(_defer, "check", None)
    _defer.check = more_urgent
    try:
        yield
    finally:
        _defer.check = old


def give_way() -> None:
    """Raise WriteDeferred when inside deferrable() and something more urgent waits."""
    check = getattr(_defer, "check", None)
    if check is not None and check():
        raise WriteDeferred("a frame is waiting")


# Errors that say the filesystem takes no writes now, whatever is written: out of space or quota, or read-only
# (ext4 remounts an SD card read-only after an error), or its device gone (a USB disk pulled out: EIO, ENODEV;
# exFAT through FUSE: ENOTCONN; NFS: ESTALE).  The daemon keeps stacking in memory and writes when it can again.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EROFS, errno.EIO, errno.ENODEV, errno.ENXIO, errno.ENOTCONN, errno.ESTALE)


class DiskFull(OSError):
    """A write that failed for want of space: the file it was for and the bytes it needs (its whole size:
    the temporary is written beside the old file, which stays until the rename) — or, ``space`` False, because
    the filesystem takes no writes at all now (``code``: EROFS, EIO, … see UNWRITABLE)."""

    def __init__(self, path: Path | str, needed: int, code: int = errno.ENOSPC, *, why: str | None = None):
        self.path, self.needed, self.code, self.why = Path(path), int(needed), code, why
        super().__init__(code, str(self))

    @property
    def space(self) -> bool:
        """True when more free space is what the write needs."""
        return self.code in NO_SPACE

    def __str__(self) -> str:
        if self.space:     # (needed 0: not known — a folder's own check, not a file's write)
            return f"disk full: {self.path}" + (f", {mb(self.needed)} needed" if self.needed else "")
        return f"cannot write {self.path}: {self.why or os.strerror(self.code).lower()}"


def mb(n: int) -> str:
    """Bytes as the page says them: "470 MB", "2.8 MB", "0.1 MB"."""
    v = n / 2 ** 20
    return f"{v:.0f} MB" if v >= 10 else f"{max(v, 0.1):.1f} MB"


def read_only_mount(path: Path | str) -> Path | None:
    """The mount point of ``path`` when it is mounted read-only while its filesystem is writable — a read-only
    bind mount, as systemd's ProtectSystem=strict makes of every folder its unit's ReadWritePaths= leaves out —,
    else None (a writable mount; a filesystem itself read-only, as ext4 remounts a failing SD card; no
    /proc/self/mountinfo).  The first no remount mends: a configuration to change, not a disk to wait for."""
    try:
        target = os.path.realpath(path)
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")     # (\040 for a space, as the kernel writes it)
            mount_opts, super_opts = fields[5].split(","), fields[sep + 3].split(",")
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):       # the last of equal ones is on top
            best = (point, mount_opts, super_opts)
    if best is not None and "ro" in best[1] and "rw" in best[2]:
        return Path(best[0])
    return None


def free_bytes(folder: Path | str) -> int:
    """Bytes this process may still write on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def disk_full(err: OSError, path: Path | str, needed: int = 0) -> DiskFull | None:
    """``err`` as a DiskFull naming ``path`` when it was a lack of space, or a filesystem that takes no writes
    now (UNWRITABLE: read-only, its disk gone), else None.  ENOSPC and EDQUOT say so; a short write without an
    errno (numpy's "163840 requested and 152880 written") is one when the filesystem has less than 1 MB left."""
    if isinstance(err, DiskFull):
        return err
    if err.errno in NO_SPACE or err.errno in UNWRITABLE:
        return DiskFull(path, needed, err.errno)
    if err.errno is None:
        try:
            if free_bytes(Path(path).parent) < 2 ** 20:
                return DiskFull(path, needed)
        except OSError:
            pass
    return None


# Bytes a writer lets accumulate in the page cache before it asks the kernel to start writing them (writeback)
WRITEBACK_BYTES = 32 * 2 ** 20
# ... and, every FLUSH_BYTES of them, before it asks the disk to make them durable (a background fdatasync)
FLUSH_BYTES = 128 * 2 ** 20


def _sync_file_range():
    """Linux's sync_file_range(2) through ctypes, or None where the C library has none (macOS) or there is no C
    library to open by that name (Windows: CDLL(None) is a TypeError there)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class Writeback:
    """Has the kernel start writing a file being written to the disk every WRITEBACK_BYTES, without waiting
    (sync_file_range with SYNC_FILE_RANGE_WRITE; nothing where there is none): the fsync that ends every atomic
    write then waits only for the last pieces, while the disk worked as the writer made the others (a 24 MP
    stack.fits, 384 MB: the fsync after the write took 0.25–0.38 s here; on an SD card, at ~20 MB/s, it would be
    most of the write's time).  The writer calls ``wrote(n)`` after each piece of n bytes — from any thread.

    Every FLUSH_BYTES it also starts an fdatasync in a thread of its own (one at a time, on a duplicate of the
    descriptor), and the writer calls ``settle()`` once every piece is written, before the commit: the disk's
    own cache is flushed while the writer works, not all at the fsync.  A disk's write cache — a VM's host, an SD
    card's controller — holds what the kernel has written until that flush: a 24 MP stack.fits streamed during
    the last frame had been written by its end, yet the fsync after it took 0.49–0.55 s.  With these flushes it
    takes 0.06–0.13 s, but the last frame's writes wait while a flush runs: the two together took 1.53–1.78 s
    before, 1.27–1.38 s after (five alternating runs, this VM).  settle() raises the flush's error: the commit's
    fsync, on a descriptor opened after it, would not be told an error the flush has already seen.

    Not inside deferrable(), decided in the thread that makes it (stack.fits is written from a second one): a
    write that gives way removes its temporary, and removing a file waits for the pieces the disk is writing —
    a checkpoint asked to give way stopped 0.13–0.29 s later instead of 0.02–0.03 (bench_daemon.py --give-way),
    and on an SD card each 32 MB in flight would be ~1.5 s.  The daemon's idle writes keep the kernel's pace."""

    def __init__(self, f):
        """``f``: an open file (flushed before each ask) or a descriptor written with os.pwrite."""
        self.f = f
        self.on = _SYNC_FILE_RANGE is not None and getattr(_defer, "check", None) is None
        self.pending = 0
        self.unflushed = 0
        self._flush: threading.Thread | None = None
        self._error: OSError | None = None
        self._lock = threading.Lock()

    def wrote(self, n: int) -> None:
        if not self.on:
            return
        with self._lock:
            self.pending += n
            due = self.pending >= WRITEBACK_BYTES
            if due:
                self.pending = 0
        if due:
            if isinstance(self.f, int):
                fd = self.f
            else:
                self.f.flush()
                fd = self.f.fileno()
            _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)   # the whole file; errors lose the hint
            with self._lock:
                self.unflushed += WRITEBACK_BYTES
                start = self.unflushed >= FLUSH_BYTES and (self._flush is None or not self._flush.is_alive())
                if start:
                    self.unflushed = 0
                    self._flush = threading.Thread(target=self._fdatasync, args=(os.dup(fd),),
                                                   name="flush", daemon=True)
                    self._flush.start()

    def _fdatasync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as err:
            self._error = err
        finally:
            os.close(fd)

    def settle(self) -> None:
        """Wait for the flush under way; its error raised (the commit's fsync, on another descriptor, would not
        see an error the flush has already been told)."""
        if self._flush is not None:
            self._flush.join()
        if self._error is not None:
            raise self._error


def temp_name(path: Path) -> Path:
    """A free name for ``path``'s temporary beside it (``_TMP_NAME``, which remove_orphans finds), not created:
    the writer creates the file.  Opening an existing file for writing truncates it, and on ext4 (auto_da_alloc)
    a file truncated to 0 is flushed when closed — close() waited 0.2–0.3 s for 400 MB, and so did a write given
    up (deferrable) for a frame that landed: the checkpoint gave way 0.4–0.5 s after the frame instead of a few
    ms.  (Only this process writes the folder.)"""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


def atomic_write_with(path: Path, writer, *, size: int | None = None) -> None:
    """Call ``writer(tmp_path)`` to write a temporary file, then fsync and rename it onto ``path``.  On any error
    the temporary is removed and ``path`` keeps its old content; a lack of space raises DiskFull naming ``path``
    and ``size`` (the bytes the file takes; when not given, at least what was written or the old file's size)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        writer(tmp)
        _commit(tmp, path)
    except BaseException as err:
        _give_up(err, tmp, path, size)
    fsync_dir(path.parent)


def _commit(tmp: Path, path: Path) -> None:
    """A written temporary becomes ``path``: its mode set, fsynced, renamed over it (the folder's fsync after)."""
    os.chmod(tmp, 0o644)      # whatever the writer's umask made: outputs are shared (capture, daemon)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _give_up(err: BaseException, tmp: Path | None, path: Path, size: int | None) -> NoReturn:
    """An atomic write failed with ``err``: its temporary removed, and ``err`` raised again — or the DiskFull it
    means, naming ``path`` and ``size``."""
    full = None
    if isinstance(err, OSError):
        # Measured before the temporary goes: a short write leaves the disk full only while it exists.
        full = disk_full(err, path, size or max(_size(tmp), _size(path)))
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:     # gone, or a disk that fails every call now: the first error is the one to tell
            pass
    if full is not None and full is not err:
        raise full from err
    raise err


def _size(path) -> int:
    try:
        return os.stat(path).st_size if path is not None else 0
    except OSError:
        return 0


def remove_orphans(folder: Path | str) -> list[tuple[Path, int]]:
    """Delete the temporaries that atomic_write_with leaves in ``folder`` (not its subfolders) when its process
    is killed mid-write: regular files named ".<name>.XXXXXXXX.tmp".  -> [(path, bytes)] removed.  Only for a
    folder that this process alone writes (never a capture folder: its files belong to the capture program)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for e in entries:
        if _TMP_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
            size = e.stat(follow_symlinks=False).st_size
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                continue
            removed.append((Path(e.path), size))
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def output_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an output folder (it is made when missing), in one sentence; None when it can."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:              # a file on the way, a read-only disk
        return f"{path}: cannot make the output folder ({err.strerror or err})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path}: the output folder is not writable"
    return None


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cards(header: dict) -> list[tuple[str, object, str]]:
    """(keyword, value, comment) of a header dict (value, or (value, comment); None values left out).  A long
    value keeps priority over its comment (a card has 80 characters)."""
    out = []
    for k, v in header.items():
        value, comment = v if isinstance(v, tuple) else (v, "")
        if value is None:
            continue
        if len(str(value)) + len(comment) > 60:
            comment = ""
        out.append((k, value, comment))
    return out


_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")
_PRINTABLE = re.compile(r"[ -~]*")
_NOT_PRINTABLE = re.compile(r"[^ -~]")


def fits_text(s: str) -> str:
    """``s`` with every character outside printable ASCII escaped (\\xe8, \\n, \\udce9 for an undecodable byte of
    a file name): what a FITS header may hold."""
    return _NOT_PRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), s)


def header_bytes(cards: list[tuple[str, object, str]]) -> bytes:
    """A FITS header unit: the cards, END, blank-padded to 2880 bytes.  The plain cards a stack has (short keywords,
    numbers, booleans, strings of one card) are formatted here as the FITS standard's fixed format says (values
    as astropy writes them: the same bytes); any other (a string longer than a card: CONTINUE cards, HIERARCH,
    a long COMMENT) by astropy, which is only imported then — it costs 0.5 s, a sixth of a short `livestack stack`.
    Text outside printable ASCII (a file named Andromède_0001.dng as REFFRAME, a camera's name from EXIF) is
    escaped as Python writes it (Androm\\xe8de): FITS allows nothing else, and astropy would refuse the card."""
    cards = [(k, fits_text(v) if isinstance(v, str) else v, fits_text(c)) for k, v, c in cards]
    lines = [_card(*c) for c in cards]
    if any(line is None for line in lines):
        from astropy.io import fits

        text = fits.Header([(k, v, c) for k, v, c in cards]).tostring()
    else:
        text = "".join(lines) + "END".ljust(80)
        text += " " * (-len(text) % 2880)
    return text.encode("ascii")


def _card(key: str, value, comment: str) -> str | None:
    """One 80-character card in the fixed format, or None when it needs more than this does."""
    if key in ("COMMENT", "HISTORY"):        # commentary: the text from column 9
        ok = isinstance(value, str) and _PRINTABLE.fullmatch(value) and len(value) <= 72 and not comment
        return f"{key:<8}{value}".ljust(80) if ok else None
    if not _KEYWORD.fullmatch(key) or key == "CONTINUE" or not _PRINTABLE.fullmatch(comment):
        return None
    if isinstance(value, (bool, np.bool_)):
        field = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        field = f"{int(value):>20}"
    elif isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return None
        field = f"{_float(value):>20}"
    elif isinstance(value, str):
        if not _PRINTABLE.fullmatch(value):
            return None
        quoted = value.replace("'", "''").ljust(8) if value else ""    # (an empty string is written '')
        field = ("'" + quoted + "'").ljust(20)
    else:
        return None
    card = f"{key:<8}= {field}"
    if len(card) > 80:
        return None
    if comment:
        card = (card + " / " + comment)[:80]
    return card.ljust(80)


def _float(v) -> str:
    """A real value as astropy writes it: its shortest text (a float32's own: 0.1, not 0.10000000149), E for the
    exponent with at least two digits, a decimal point when there is neither, at most 20 characters (the
    mantissa cut, never the exponent)."""
    text = str(v).upper()
    if "E" not in text:
        text = text if "." in text else text + ".0"
        return text[:20]
    mantissa, exponent = text.split("E")
    sign = exponent[0] if exponent[0] in "+-" else ""
    exponent = f"{sign}{int(exponent.lstrip('+-')):02d}"
    return mantissa[:20 - len(exponent) - 1] + "E" + exponent


def _primary_header(shape: tuple[int, ...], header: dict, *, extend: bool) -> bytes:
    """The primary header unit of a float32 image of ``shape`` ((C, H, W) or (H, W)), then ``header``'s cards."""
    cards = [("SIMPLE", True, "conforms to FITS standard"), ("BITPIX", -32, "array data type"),
             ("NAXIS", len(shape), "number of array dimensions")]
    cards += [(f"NAXIS{i + 1}", int(n), "") for i, n in enumerate(reversed(shape))]
    if extend:
        cards.append(("EXTEND", True, ""))
    fixed = {k for k, _, _ in cards}
    return header_bytes(cards + [c for c in _cards(header) if c[0] not in fixed])


def _write_big_endian(f, blocks) -> int:
    """Write float32 blocks big-endian (256 rows at a time: bounded copies), returning the bytes written.  ``f`` is
    an open file or a _DirectFile.  Each piece is written from a second thread while the next is made — the
    caller's blocks (a stack's mean, computed as they are asked for) and their byte-swapped copies: the write
    releases the GIL, and it is the larger part (a 24 MP stack.fits: 384 MB, 0.45 s into the page cache here,
    against 0.23 s of means and copies) —, and the disk asked to start on them as they go (Writeback)."""
    if isinstance(f, _DirectFile):
        written = 0
        for b in blocks:
            f.put_f4(b)
            written += b.size * 4
        return written
    written = 0
    wb = Writeback(f)               # (made here: deferrable() is this thread's)

    def write(data: np.ndarray) -> None:
        f.write(bytes_view(data))
        wb.wrote(data.nbytes)

    with ThreadPoolExecutor(1, thread_name_prefix="write") as ex:
        pending = None
        for b in blocks:
            for r0 in range(0, b.shape[0], 256):
                give_way()
                data = b[r0:r0 + 256].astype(">f4")        # a copy: the caller may reuse ``b``
                if pending is not None:
                    pending.result()
                pending = ex.submit(write, data)
                written += data.nbytes
        if pending is not None:
            pending.result()
    wb.settle()
    return written


# Direct I/O: the unit of a write's offset, length and memory (a disk's logical block is 512 or 4096 bytes)
DIRECT_ALIGN = 4096
DIRECT_CHUNK = 4 * 2 ** 20
DIRECT_MIN = 64 * 2 ** 20          # smaller files: through the page cache (a preview, a small stack)
# The last frame's stack.fits (_Ranges): the buffers its pieces are byte-swapped into, how many, and its writers
ROWS_BUFFER = 2 * 2 ** 20
ROWS_BUFFERS = 8
ROWS_WRITERS = 2


class _DirectFile:
    """A new file written past the page cache (O_DIRECT), from start to end: the bytes are gathered in two
    page-aligned chunks of DIRECT_CHUNK, and each full chunk goes to the disk from a second thread while the
    next one fills.  For a file written once and then left: a 24 MP stack.fits through the page cache is 384 MB
    of cache pages to find first — in a process that has just started, or on a Pi whose memory the cache then
    holds, that is most of the write (measured in the commit that added this) — and its bytes go to the disk
    at the fsync anyway.  The byte-swap to big-endian goes straight into the chunk (one copy, not two).

    ``open`` returns None where the filesystem takes no direct I/O (tmpfs before Linux 6.6, some FUSE ones):
    the caller writes through the page cache then."""

    def __init__(self, fd: int):
        self.fd = fd
        self.chunks = [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(2)]
        self.cur = 0              # the chunk being filled
        self.pos = 0              # bytes in it
        self.offset = 0           # the file's bytes already handed to the disk
        self.ex = ThreadPoolExecutor(1, thread_name_prefix="write")
        self.pending = None

    @classmethod
    def open(cls, path: Path) -> "_DirectFile | None":
        fd = _open_direct(path)
        return None if fd is None else cls(fd)

    def _room(self) -> int:
        return DIRECT_CHUNK - self.pos

    def write(self, data: bytes) -> None:
        """Bytes (a header, padding): as a file's write, which write_fits_blocks calls."""
        view = memoryview(data).cast("B")
        while len(view):
            k = min(len(view), self._room())
            self.chunks[self.cur][self.pos:self.pos + k] = view[:k]
            self._filled(k)
            view = view[k:]

    def put_f4(self, block: np.ndarray) -> None:
        """A float32 array's values, big-endian, C order."""
        flat = block.reshape(-1)
        i = 0
        while i < flat.size:
            give_way()
            k = min(flat.size - i, self._room() // 4)       # (every piece a file holds is a multiple of 4 bytes)
            dst = np.ndarray((k,), ">f4", buffer=self.chunks[self.cur], offset=self.pos)
            np.copyto(dst, flat[i:i + k], casting="unsafe")
            self._filled(4 * k)
            i += k

    def _filled(self, k: int) -> None:
        self.pos += k
        if self.pos == DIRECT_CHUNK:
            self._wait()
            self.pending = self.ex.submit(self._write, self.chunks[self.cur], DIRECT_CHUNK, self.offset)
            self.offset += DIRECT_CHUNK
            self.cur ^= 1
            self.pos = 0

    def _write(self, chunk, n: int, offset: int) -> None:
        _write_at(self.fd, chunk, n, offset, direct=True)

    def _wait(self) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            p.result()

    def close(self) -> None:
        """The last chunk (zero-padded to the alignment, then the file cut to its size) and the descriptor.
        Errors are raised; the descriptor is closed whatever happens."""
        try:
            self._wait()
            if self.pos:
                n = -(-self.pos // DIRECT_ALIGN) * DIRECT_ALIGN
                self.chunks[self.cur][self.pos:n] = bytes(n - self.pos)
                self._write(self.chunks[self.cur], n, self.offset)
                os.ftruncate(self.fd, self.offset + self.pos)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without the tail (an error): waits for a chunk in flight, closes the descriptor."""
        try:
            self._wait()
        except OSError:
            pass
        finally:
            self.ex.shutdown(wait=True)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            for c in self.chunks:
                try:
                    c.close()
                except BufferError:     # a view still held by an error's traceback: unmapped when it goes
                    pass
            self.chunks = []


def _open_direct(path: Path) -> int | None:
    """A new file opened for writing past the page cache (O_DIRECT), or None where the filesystem takes no direct
    I/O (tmpfs before Linux 6.6, some FUSE ones; the file not left behind): the caller writes through the page
    cache then."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return None
        raise
    probe = mmap.mmap(-1, DIRECT_ALIGN)     # a filesystem may take the flag and refuse the writes
    try:
        os.pwrite(fd, probe, 0)
    except OSError as err:
        os.close(fd)
        os.unlink(path)
        if err.errno == errno.EINVAL:
            return None
        raise
    finally:
        probe.close()
    return fd


def _write_at(fd: int, data, n: int, offset: int, *, direct: bool) -> None:
    """``data``'s first n bytes at ``offset`` (short writes resumed; a direct one cannot be: EIO)."""
    done = 0
    with memoryview(data) as raw, raw.cast("B") as view:
        while done < n:
            w = os.pwrite(fd, view[done:n], offset + done)
            if direct and w % DIRECT_ALIGN and done + w < n:
                raise OSError(errno.EIO, f"short direct write ({w} of {n - done} bytes)")
            done += w


class _Ranges:
    """A new file of ``size`` bytes put together from pieces at any offsets, from any threads, each byte once, and
    written by ROWS_WRITERS threads of its own: a piece is byte-swapped (put_f4) into one of ROWS_BUFFERS reused
    buffers and handed over, and the caller goes on — the last frame's stack threads, which wrote their rows
    themselves, waited for each other on the file's lock (a 24 MP stack.fits: 18 % of that frame's CPU in
    ``rwsem_spin_on_owner``, one thread spinning while the other copied).

    ``direct`` (the descriptor opened with O_DIRECT): written past the page cache — 384 MB of new cache pages cost
    0.55–0.83 s of system time to fill here (``copy_folio_from_iter_atomic``: 42 % of the last frame's CPU), the
    same bytes straight to the disk 0.12–0.14 s (1.5 MB writes); on a Pi the cache would hold 384 MB of a file
    nobody reads.  Two writers: one keeps up with a fast disk (two or four direct writes in flight made no
    difference on the sixteenth session's, README), a disk that wants more in flight gets two.  Direct writes
    cover whole DIRECT_ALIGN pages: a piece's whole pages go as they are, its partial pages at either end are
    gathered until the pieces beside it (or the zeros of the file's padding, ``put_bytes``) fill them.  The
    last page runs past ``size``: finish() cuts the file back to it."""

    def __init__(self, fd: int, size: int, *, direct: bool):
        self.fd, self.size, self.direct = fd, size, direct
        self.align = DIRECT_ALIGN if direct else 1
        self.error: BaseException | None = None
        self._dropped = False
        self._bufs = [mmap.mmap(-1, ROWS_BUFFER) for _ in range(ROWS_BUFFERS)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for b in self._bufs:
            self._free.put(b)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._pages: dict[int, list] = {}       # a page partly put: index -> [its bytes (an mmap), how many are in]
        self._lock = threading.Lock()
        self._wb = Writeback(fd)                # (made here: deferrable() is this thread's)
        self._threads = [threading.Thread(target=self._drain, name="rows-writer", daemon=True)
                         for _ in range(ROWS_WRITERS)]
        for t in self._threads:
            t.start()
        end = -(-size // self.align) * self.align
        if end > size:
            self.put_bytes(size, bytes(end - size))

    def put_f4(self, offset: int, values: np.ndarray) -> None:
        """float32 ``values`` (C order), big-endian from byte ``offset`` (a multiple of 4) on."""
        self._check()
        flat = values.reshape(-1)
        a, b = offset, offset + 4 * flat.size
        lo = min(b, -(-a // self.align) * self.align)       # the whole pages: [lo, hi)
        hi = max(lo, b // self.align * self.align)
        if lo > a:
            self._gather(a, flat[:(lo - a) // 4].astype(">f4"))
        if hi < b:
            self._gather(hi, flat[(hi - a) // 4:].astype(">f4"))
        for s in range(lo, hi, ROWS_BUFFER):
            e = min(hi, s + ROWS_BUFFER)
            buf = self._free.get()
            np.copyto(np.ndarray(((e - s) // 4,), ">f4", buffer=buf), flat[(s - a) // 4:(e - a) // 4])
            self._todo.put((buf, e - s, s, True))

    def put_bytes(self, offset: int, data: bytes) -> None:
        """Bytes (a header, padding) at ``offset``."""
        self._check()
        if self.direct:
            self._gather(offset, data)
        elif len(data):
            self._todo.put((bytes(data), len(data), offset, False))

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._dropped:
            raise ValueError("rows put into a file already closed")

    def _gather(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        whole = []
        with self._lock:
            while len(view):
                i, at = divmod(offset, self.align)
                k = min(len(view), self.align - at)
                page = self._pages.get(i)
                if page is None:
                    page = self._pages[i] = [mmap.mmap(-1, self.align), 0]
                page[0][at:at + k] = view[:k]
                page[1] += k
                if page[1] == self.align:
                    del self._pages[i]
                    whole.append((page[0], self.align, i * self.align, False))
                view, offset = view[k:], offset + k
        for item in whole:
            self._todo.put(item)

    def _drain(self) -> None:
        while (item := self._todo.get()) is not None:
            data, n, offset, pooled = item
            try:
                if self.error is None and not self._dropped:
                    _write_at(self.fd, data, n, offset, direct=self.direct)
                    self._wb.wrote(n)
            except BaseException as err:
                if self.error is None:
                    self.error = err
            finally:
                if pooled:
                    self._free.put(data)        # (a waiting put_f4 goes on, whatever the write did)

    def _stop(self) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def finish(self) -> None:
        """Every byte is in: wait for the writes (their first error raised), the file cut to its size."""
        self._stop()
        if self.error is not None:
            raise self.error
        if self._pages:
            raise ValueError(f"{len(self._pages)} pages not whole, the first at byte {min(self._pages) * self.align}")
        if self.direct and self.size % self.align:
            os.ftruncate(self.fd, self.size)
        self._wb.settle()

    def close(self) -> None:
        """The writer threads stopped — the writes still waiting dropped —, the buffers let go (not the
        descriptor: the caller's)."""
        self._dropped = True
        self._stop()
        for m in self._bufs + [p[0] for p in self._pages.values()]:
            with contextlib.suppress(BufferError):
                m.close()
        self._bufs, self._pages = [], {}


def bytes_view(a: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes without a copy (``tobytes`` copies: 47 ms for a 24 MP stack.fits)."""
    return memoryview(a.reshape(-1)).cast("B")


def write_fits_blocks(path: Path, shape: tuple[int, ...], blocks, header: dict, *,
                      weight=None) -> None:
    """Write a float32 image of ``shape`` ((C, H, W) or (H, W)) from ``blocks``, an iterable of float32 arrays
    that together hold the data in FITS order (channel by channel, rows in order), then the weight map (sum of
    frame weights per pixel: an (H, W) array or an iterable of row blocks) as an image extension named
    WEIGHT.  Streaming: each unit is its header, big-endian copies of a block at a time and zero padding, so
    only one block is in memory on top of the caller's data, where writing a (3, H, W) array would first build
    the full-resolution mean and a byte-swapped copy (~600 MB at 24 MP)."""
    head = _primary_header(shape, header, extend=True)
    h, w = (int(v) for v in shape[-2:])
    whead = _weight_header(h, w)

    def unit(f, data, expected: int, what: str) -> None:
        written = _write_big_endian(f, data)
        if written != expected:
            raise ValueError(f"{Path(path).name}: {what} of {written // 4} values, expected {expected // 4}")
        f.write(b"\0" * (-written % 2880))

    def write(f) -> None:
        f.write(head)
        unit(f, blocks, int(np.prod(shape)) * 4, "image")
        if weight is not None:
            f.write(whead)
            unit(f, [weight] if isinstance(weight, np.ndarray) else weight, h * w * 4, "weight map")

    def writer(tmp: Path) -> None:
        # Past the page cache unless inside deferrable(): a write that gives way drops its cached pages with its
        # temporary at no cost, where each direct chunk would first have to reach the disk (an SD card's ~20
        # MB/s: a frame waiting ~0.2 s more).
        direct = _DirectFile.open(tmp) if size >= DIRECT_MIN and getattr(_defer, "check", None) is None else None
        if direct is None:
            with open(tmp, "wb") as f:
                write(f)
            return
        try:
            write(direct)
        except BaseException:
            direct.abandon()
            raise
        direct.close()

    data = int(np.prod(shape)) * 4
    size = len(head) + data + (-data % 2880)
    if weight is not None:
        size += len(whead) + h * w * 4 + (-(h * w * 4) % 2880)
    atomic_write_with(path, writer, size=size)


def write_fits_rows(path: Path, shape: tuple[int, ...], rows, header: dict, *, weighted: bool = False) -> None:
    """Write a (C, H, W) — or (H, W) — float32 image from ``rows``, an iterable of (r0, (C, n, W) float32 block)
    covering every row once, in any order: each block's channels are written at their places in the file (the
    data unit is channel by channel), so a block computed for all channels at once — a composite, a stack in
    its bootstrap — is computed once, not once per channel.  ``weighted``: the items are (r0, block, (n, W)
    weights) and the weights go to a WEIGHT extension, as write_fits_blocks writes it.  Atomic like the other
    writers."""
    head = _primary_header(tuple(int(v) for v in shape), header, extend=weighted)

    def writer(tmp: Path) -> None:
        f = FitsRows(tmp, shape, len(head), weighted=weighted)
        try:
            for item in rows:
                give_way()
                f.put(item[0], item[1], item[2] if weighted else None)
            f.finish(head, Path(path).name)
        finally:
            f.close()

    atomic_write_with(path, writer, size=FitsRows.size(shape, len(head), weighted))


class FitsRows:
    """A new FITS file of a float32 (C, H, W) — or (H, W) — image, and with ``weighted`` its WEIGHT extension,
    written a block of rows at a time at their places in the file, in any order (from several threads at once
    too), the primary header last (``finish``; its length, ``head_len``, is fixed when the file is made).  The
    writes are made by threads of their own (_Ranges), past the page cache (O_DIRECT) for a file of DIRECT_MIN
    or more outside deferrable() where the filesystem takes it, else through the page cache; either way the disk
    is asked to write as they go (Writeback)."""

    def __init__(self, path: Path, shape: tuple[int, ...], head_len: int, *, weighted: bool):
        c, h, w = (1, *shape) if len(shape) == 2 else shape
        self.c, self.h, self.w = int(c), int(h), int(w)
        self.head_len, self.weighted = head_len, weighted
        data = self.c * self.h * self.w * 4
        self.data_end = head_len + data + (-data % 2880)
        self.whead = _weight_header(self.h, self.w) if weighted else b""
        self.rows = 0
        self._lock = threading.Lock()
        size = self.size(shape, head_len, weighted)
        fd = _open_direct(path) if size >= DIRECT_MIN and getattr(_defer, "check", None) is None else None
        direct = fd is not None
        self.fd = fd if direct else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._out: _Ranges | None = None
        try:
            os.ftruncate(self.fd, size)
            self._out = _Ranges(self.fd, size, direct=direct)
            # the bytes no block brings: the padding after the data (and after the weights), the WEIGHT header
            self._out.put_bytes(head_len + data, bytes(self.data_end - head_len - data))
            if weighted:
                self._out.put_bytes(self.data_end, self.whead)
                wend = self.data_end + len(self.whead) + self.h * self.w * 4
                self._out.put_bytes(wend, bytes(size - wend))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def size(shape: tuple[int, ...], head_len: int, weighted: bool) -> int:
        """The file's bytes."""
        h, w = (int(v) for v in shape[-2:])
        data = int(np.prod(shape)) * 4
        total = head_len + data + (-data % 2880)
        if weighted:
            total += len(_weight_header(h, w)) + h * w * 4 + (-(h * w * 4) % 2880)
        return total

    def put(self, r0: int, block: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Rows r0:r0 + n: ``block`` (C, n, W) — or (n, W) — and, with ``weighted``, their (n, W) weights.  The
        arrays may be reused once this returns (their bytes are copied)."""
        block = block.reshape(self.c, -1, self.w)
        n = block.shape[1]
        for ch in range(self.c):
            self._out.put_f4(self.head_len + ((ch * self.h + r0) * self.w) * 4, block[ch])
        if self.weighted:
            self._out.put_f4(self.data_end + len(self.whead) + r0 * self.w * 4, np.asarray(weights))
        with self._lock:
            self.rows += n

    def finish(self, head: bytes, name: str) -> None:
        """The primary header, once every row is in (ValueError naming the file ``name`` otherwise, or for a
        header of another length); every write made (its error raised)."""
        if self.rows != self.h:
            raise ValueError(f"{name}: {self.rows} rows written, expected {self.h}")
        if len(head) != self.head_len:
            raise ValueError(f"{name}: a header of {len(head)} bytes where {self.head_len} were kept")
        self._out.put_bytes(0, head)
        self._out.finish()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamedFits:
    """write_fits_rows' file (weighted) written while its rows are still being made — ``put`` from the threads
    that make them —, then made ``path`` atomically by ``commit(header)`` as atomic_write_with would, or
    dropped by ``abandon()``.  ``header`` at the start is provisional: its length is the space kept for the
    final one, which commit() refuses (False, the file dropped) when it is of another length."""

    def __init__(self, path: Path, shape: tuple[int, ...], header: dict):
        self.path, self.shape = Path(path), tuple(int(v) for v in shape)
        self.tmp = temp_name(self.path)
        self.file = FitsRows(self.tmp, self.shape, len(_primary_header(self.shape, header, extend=True)),
                             weighted=True)

    def put(self, r0: int, block: np.ndarray, weights: np.ndarray) -> None:
        self.file.put(r0, block, weights)

    def commit(self, header: dict) -> bool:
        """Write the final header, fsync, rename onto ``path`` (DiskFull as atomic_write_with raises it); False
        when the header is of another length or a row is missing — nothing written then."""
        head = _primary_header(self.shape, header, extend=True)
        if len(head) != self.file.head_len or self.file.rows != self.file.h:
            self.abandon()
            return False
        try:
            self.file.finish(head, self.path.name)
            self.file.close()
            _commit(self.tmp, self.path)
        except BaseException as err:
            self.file.close()
            _give_up(err, self.tmp, self.path, FitsRows.size(self.shape, len(head), True))
        fsync_dir(self.path.parent)
        return True

    def abandon(self) -> None:
        self.file.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def _weight_header(h: int, w: int) -> bytes:
    """The WEIGHT image extension's header."""
    return header_bytes([("XTENSION", "IMAGE", "image extension"), ("BITPIX", -32, "array data type"),
                         ("NAXIS", 2, "number of array dimensions"), ("NAXIS1", w, ""), ("NAXIS2", h, ""),
                         ("PCOUNT", 0, "number of parameters"), ("GCOUNT", 1, "number of groups"),
                         ("EXTNAME", "WEIGHT", "extension name"),
                         ("COMMENT", "sum of frame weights per pixel (reference frame = 1)", "")])


def write_fits(path: Path, image: np.ndarray, header: dict, *, weight: np.ndarray | None = None) -> None:
    """Write a float32 (3, H, W) colour or (H, W) mono image (a (1, H, W) one is written as (H, W))."""
    data = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
    blocks = (data[c] for c in range(data.shape[0])) if data.ndim == 3 else (data,)
    write_fits_blocks(path, data.shape, blocks, header, weight=weight)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """(h, w, 3) uint8 RGB -> JPEG."""
    ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"{Path(path).name}: JPEG encoding failed")
    atomic_write_bytes(path, enc.tobytes())


def encode_png16(rgb16: np.ndarray) -> bytes:
    """(h, w, 3) or (h, w) uint16 -> PNG bytes (full-resolution 16-bit export)."""
    img = rgb16[:, :, ::-1] if rgb16.ndim == 3 else rgb16
    ok, enc = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise OSError("PNG encoding failed")
    return enc.tobytes()


def encode_tiff16(rgb16: np.ndarray) -> bytes:
    """(h, w, 3) or (h, w) uint16 -> TIFF bytes (tifffile, lossless)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb16, photometric="rgb" if rgb16.ndim == 3 else "minisblack")
    return buf.getvalue()
