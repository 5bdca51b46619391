"""Damaged input files found by fuzzing the readers: each one is failed with one line naming the file and the
reason (FrameError), never a traceback, and the good frames beside it are still used."""
from __future__ import annotations

import json
import random
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
