"""Damaged input files found by fuzzing the readers: each one is failed with one line naming the file and the
reason (FrameError), never a traceback, and the good frames beside it are still used."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from drivers.simulator import SimConfig, render_calibration
from livestack.engine.frame import FrameError
from livestack.engine.read import read_frame
from livestack.masters import build_library

SIM = SimConfig(width=96, height=64, seed=5)


def _damaged_fz(path: Path, seed: int = 3) -> Path:
    """A RICE tile-compressed FITS whose compressed bytes were overwritten here and there (a bad card, a
    bad sector): its header reads, its tiles do not decompress."""
    rng = np.random.default_rng(seed)
    data = rng.integers(500, 3000, size=(480, 640), dtype=np.uint16)
    hdr = fits.Header({"IMAGETYP": "Dark Frame", "EXPTIME": 60.0, "DATE-OBS": "2026-11-26T01:00:00"})
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr, compression_type="RICE_1")]) \
        .writeto(path)
    b = bytearray(path.read_bytes())
    r = random.Random(seed)
    for _ in range(50):
        b[r.randrange(8640, len(b))] = r.randrange(256)
    path.write_bytes(bytes(b))
    return path


def test_a_damaged_compressed_fits_is_a_frame_error(tmp_path):
    path = _damaged_fz(tmp_path / "light_1.fits.fz")
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert "light_1.fits.fz" in str(e.value) and "\n" not in str(e.value)
    assert "decompress" in e.value.reason


def test_a_file_that_looks_like_a_zip_is_a_frame_error(tmp_path):
    path = tmp_path / "light_2.fits"       # astropy opens a name starting with PK\3\4 as a zip archive
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 20)
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert "light_2.fits" in str(e.value) and "\n" not in str(e.value)


def test_masters_skip_a_damaged_compressed_dark_and_build_the_rest(tmp_path):
    render_calibration(tmp_path / "calib", SIM, n_bias=0, n_dark=4, n_flat=0, n_darkflat=0, dark_exptime=60.0)
    src = next((tmp_path / "calib" / "darks").glob("*.fits"))
    data, hdr = fits.getdata(src, header=True)
    fz = tmp_path / "calib" / "darks" / "dark_9999_60s.fits.fz"
    h = fits.Header({k: hdr[k] for k in ("IMAGETYP", "EXPTIME", "DATE-OBS", "BAYERPAT") if k in hdr})
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=h, compression_type="RICE_1")]).writeto(fz)
    b = bytearray(fz.read_bytes())
    r = random.Random(3)
    for _ in range(40):
        b[r.randrange(8640, len(b))] = r.randrange(256)
    fz.write_bytes(bytes(b))
    (tmp_path / "calib" / "darks" / "dark_9998_60s.fits").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 20)
    (tmp_path / "calib" / "x.fits").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 20)   # kind from its header
    lib = build_library(tmp_path / "calib", tmp_path / "masters")
    assert lib.entries
    skipped = json.loads((tmp_path / "masters" / "masters.json").read_text()).get("skipped", [])
    assert any(s["file"].endswith("dark_9999_60s.fits.fz") for s in skipped), skipped
    assert any(s["file"].endswith("dark_9998_60s.fits") for s in skipped), skipped
    assert any(s["file"] == "x.fits" for s in skipped), skipped


def _set_fits_card(path: Path, key: str, value) -> None:
    with fits.open(path, mode="update") as hdul:
        hdul[0].header[key] = value


def test_a_damaged_black_or_white_level_fails_the_frame_and_the_stack_is_not_its_own(tmp_path):
    """One byte of a DNG's BlackLevel overwritten (what a flipped byte on a card did in fuzzing: 655360000) was
    used as it said: the frame's calibrated values, around −6.5e8, keep only float32's steps of 64 ADU, its
    background looked noiseless and its weight (~5000 against 1) made the stack that frame.  A FITS SATURATE
    of 0 flagged every pixel saturated: "stacked", adding nothing."""
    import struct

    import tifffile

    from conftest import make_night, stack_with_cli

    files, _ = make_night(tmp_path / "in", n_frames=5, fmt="dng", seed=4)
    bad = files[2]
    with tifffile.TiffFile(bad) as tif:
        off = tif.pages[0].tags[50714].valueoffset          # BlackLevel, LONG, inline
    b = bytearray(bad.read_bytes())
    struct.pack_into("<I", b, off, 655360000)
    bad.write_bytes(bytes(b))
    with pytest.raises(FrameError, match="black level 6.5536e\\+08 is not below the white level"):
        read_frame(bad)
    recs = {r["file"]: r for r in stack_with_cli(tmp_path / "in", tmp_path / "out")}
    assert recs[bad.name]["status"] == "failed" and "black level" in recs[bad.name]["reason"]
    assert sum(r["status"] in ("reference", "stacked") for r in recs.values()) == 4
    assert max(r["weight"] for r in recs.values() if r["weight"] is not None) < 3

    night, _ = make_night(tmp_path / "fits", n_frames=2, seed=4)
    _set_fits_card(night[1], "SATURATE", 0)
    with pytest.raises(FrameError, match="black level 512 is not below the white level 0"):
        read_frame(night[1])
    _set_fits_card(night[1], "SATURATE", 16383)
    _set_fits_card(night[1], "BLKLEVEL", 1e9)
    with pytest.raises(FrameError, match="black level 1e\\+09 is not below"):
        read_frame(night[1])
    assert read_frame(night[0]).white == 16383


def _frame_fits(path: Path, shape=(480, 640), bitpix_override=None) -> Path:
    data = np.random.default_rng(1).integers(500, 3000, size=shape, dtype=np.uint16)
    fits.PrimaryHDU(data, header=fits.Header({"EXPTIME": 60.0, "IMAGETYP": "Light Frame"})).writeto(path)
    return path


@pytest.mark.parametrize("cut", [80, 2879, 2880, 5760, 100_000, 614_399])
def test_a_fits_file_cut_short_says_so(tmp_path, cut):
    """A capture or a copy interrupted leaves the first bytes of a frame: said as such, not as astropy's "cannot
    reshape array of size 48560 into shape (480,640)" nor "Empty or corrupt FITS file"."""
    whole = _frame_fits(tmp_path / "whole.fits").read_bytes()
    path = tmp_path / "light_7.fits"
    path.write_bytes(whole[:cut])
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert str(e.value).startswith(f"light_7.fits: FITS file cut short: {cut:,} bytes"), str(e.value)
    assert "\n" not in str(e.value) and "reshape" not in str(e.value)


def test_a_header_declaring_more_than_any_file_holds_says_so(tmp_path):
    """A damaged NAXIS1 (10^15) made astropy fail to seek past the data it declares: the frame failed with
    "unreadable FITS ([Errno 22] Invalid argument)", which says nothing of the file."""
    path = _frame_fits(tmp_path / "light_3.fits")
    raw = bytearray(path.read_bytes())        # (astropy would write the header its data has)
    at = raw.index(b"NAXIS1  =")
    raw[at:at + 80] = f"NAXIS1  = {10 ** 15:20d}".ljust(80).encode("ascii")
    path.write_bytes(raw)
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert str(e.value) == ("light_3.fits: damaged FITS header: it declares 1,000,000,000,000,000×480 pixels "
                            f"(960,000,000,000,000,000 bytes) in a file of {path.stat().st_size:,}"), str(e.value)


def test_a_compressed_fits_cut_short_says_so(tmp_path):
    data = np.random.default_rng(1).integers(500, 3000, size=(480, 640), dtype=np.uint16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]).writeto(tmp_path / "w.fz")
    whole = (tmp_path / "w.fz").read_bytes()
    path = tmp_path / "light_8.fits.fz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FrameError, match=r"^light_8.fits.fz: FITS file cut short: "):
        read_frame(path)


def test_a_file_without_padding_is_still_read(tmp_path):
    whole = _frame_fits(tmp_path / "whole.fits").read_bytes()
    path = tmp_path / "light_9.fits"
    path.write_bytes(whole[: 2880 + 480 * 640 * 2])          # the pixels whole, the last block's padding gone
    assert read_frame(path).shape == (480, 640)


def test_not_a_fits_file_and_a_bitpix_fits_does_not_define_are_said_in_words(tmp_path):
    path = tmp_path / "light_10.fits"
    path.write_text("hello\n" * 1000)
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert e.value.reason == "not a FITS file (it does not start with a SIMPLE card)"
    from drivers.simulator.write import write_fits

    write_fits(tmp_path / "whole.fits", np.full((64, 96), 900, np.uint16),
               {"imagetyp": "Light Frame", "exptime": 60.0, "time": "2026-11-26T01:00:00"}, SIM)
    raw = bytearray((tmp_path / "whole.fits").read_bytes())
    i = raw.index(b"BITPIX  =")
    raw[i:i + 80] = f"{'BITPIX':<8}= {12:>20}".ljust(80).encode()
    path = tmp_path / "light_11.fits"
    path.write_bytes(bytes(raw))
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert "header card is missing or has a value FITS does not define: 12" in e.value.reason


def test_a_named_pipe_named_like_a_frame_never_blocks_the_watcher(tmp_path):
    """A FIFO called light_x.fits in the watch folder: the watcher handed it on after timeout_s, then opened it
    to read its capture time (capture_order) — and waited for a writer for ever: no later frame was ever stacked,
    the page said "idle".  Now it is failed at once, named, and the good frame after it is handed on."""
    import os
    import queue

    from livestack.daemon.config import WatchParams
    from livestack.daemon.watch import Watcher
    from livestack.engine.read import capture_order

    os.mkfifo(tmp_path / "light_x.fits")
    with pytest.raises(FrameError, match=r"^light_x.fits: not a regular file \(a named pipe \(FIFO\)\)$"):
        read_frame(tmp_path / "light_x.fits")
    import threading

    done: list = []
    t = threading.Thread(target=lambda: done.append(capture_order([tmp_path / "light_x.fits"])), daemon=True)
    t.start()
    t.join(5)
    assert done == [[tmp_path / "light_x.fits"]], "capture_order blocked on a named pipe"

    root = tmp_path / "watch"
    root.mkdir()
    q: queue.Queue = queue.Queue()
    w = Watcher(root, WatchParams(settle_s=0.5, settle_complete_s=0.1, timeout_s=1.0, rescan_s=0.5), q)
    w.start()
    try:
        os.mkfifo(root / "light_x.fits")                 # made while watched (a scan lists regular files only)
        first = q.get(timeout=10)
        assert first.path.name == "light_x.fits" and "not a regular file" in first.reason
        time.sleep(1.5)                                  # past timeout_s: where the watcher used to block
        _frame_fits(root / "light_y.fits", shape=(64, 96))
        second = q.get(timeout=10)
        assert second.path.name == "light_y.fits" and second.reason is None
    finally:
        w.stop()


@pytest.mark.parametrize("cut", [8, 1000, 300_000])
def test_a_dng_cut_short_says_so_not_only_input_output_error(tmp_path, cut):
    """LibRaw reports a DNG cut short (a copy interrupted) as "Input/output error", which reads as a failing
    disk; the line now says what it means for the file."""
    from conftest import make_night

    files, _ = make_night(tmp_path / "in", n_frames=1, fmt="dng", seed=4, n_stars=50)
    path = tmp_path / "light_5.dng"
    path.write_bytes(files[0].read_bytes()[:cut])
    with pytest.raises(FrameError) as e:
        read_frame(path)
    assert "LibRawIOError" in e.value.reason and "cut short" in e.value.reason and "\n" not in str(e.value)
