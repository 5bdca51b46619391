"""A CCD frame's overscan and prescan (outside TRIMSEC / DATASEC) are cut at read time, keeping the Bayer phase,
the WCS and the pipeline's buffer right; a card that cannot be one is ignored with a warning naming the file."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits

from livestack.engine.read import _shift_pattern, data_section, image_header, read_frame
from livestack.engine.solve import header_wcs

# colour-coded CFA values: each pixel says which filter it sits under
CODE = {"R": 1000, "G": 2000, "B": 3000}


def mosaic(h: int, w: int, pattern: str) -> np.ndarray:
    """(h, w) uint16 mosaic whose pixel (0, 0) has pattern ``pattern``, every value the code of its colour plus a
    small per-pixel ramp (so that a wrong cut is seen too)."""
    img = np.empty((h, w), np.uint16)
    for i in range(2):
        for j in range(2):
            img[i::2, j::2] = CODE[pattern[2 * i + j]]
    return img + (np.arange(h * w) % 7).reshape(h, w).astype(np.uint16)


def colours(data: np.ndarray) -> str:
    """The CFA pattern the colour codes of a read frame's first 2×2 pixels say."""
    back = {v: k for k, v in CODE.items()}
    return "".join(back[int(v) // 1000 * 1000] for v in data[:2, :2].ravel())


def write(path, data, **cards):
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    fits.PrimaryHDU(data, header=h).writeto(path)
    return path


def test_trimsec_cuts_the_overscan_of_a_mono_ccd(tmp_path):
    data = np.full((40, 56), 214, np.uint16)           # overscan at the bias level …
    data[:, 16:48] = np.arange(40 * 32).reshape(40, 32) + 300     # … around the sky
    p = write(tmp_path / "ccd.fits", data, TRIMSEC="[  17: 48,   1: 40]", BIASSEC="[   4:  13,   1: 40]",
              EXPTIME=150.0)
    f = read_frame(p)
    assert f.data.dtype == np.float32 and f.data.shape == (40, 32)
    np.testing.assert_array_equal(f.data, data[:, 16:48].astype(np.float32))
    assert f.pattern is None and f.meta.exptime == 150.0


@pytest.mark.parametrize("float_data", [False, True])
def test_datasec_when_no_trimsec_and_trimsec_preferred(tmp_path, float_data):
    """Both the camera-integer path and astropy's scaled path (floats) are cut."""
    data = np.arange(40 * 50, dtype=np.float32 if float_data else np.uint16).reshape(40, 50)
    f = read_frame(write(tmp_path / "d.fits", data, DATASEC="[3:42,5:36]"))
    np.testing.assert_array_equal(f.data, data[4:36, 2:42].astype(np.float32))
    g = read_frame(write(tmp_path / "t.fits", data, DATASEC="[3:42,5:36]", TRIMSEC="[5:40,7:30]"))
    np.testing.assert_array_equal(g.data, data[6:30, 4:40].astype(np.float32))


def test_a_section_of_the_whole_frame_changes_nothing(tmp_path):
    data = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40)
    for i, sec in enumerate(["[1:40,1:30]", "[*,*]", "[*,1:30]"]):
        f = read_frame(write(tmp_path / f"w{i}.fits", data, TRIMSEC=sec))
        np.testing.assert_array_equal(f.data, data.astype(np.float32))
        assert data_section({"TRIMSEC": sec}, (30, 40)) == (None, [])
    assert image_header(tmp_path / "w0.fits")["NAXIS1"] == 40


@pytest.mark.parametrize("roworder", ["TOP-DOWN", "BOTTOM-UP"])
@pytest.mark.parametrize("height", [40, 41])
@pytest.mark.parametrize("x1, y1", [(1, 1), (2, 1), (1, 2), (2, 2), (5, 8)])
@pytest.mark.parametrize("offsets", [(0, 0), (1, 0), (1, 1)])
def test_the_bayer_phase_follows_a_cut_at_an_odd_column_or_row(tmp_path, roworder, height, x1, y1, offsets):
    """A cut starting at an odd column or row (1-based even) shifts the pattern of pixel (0, 0).  The trimmed
    frame is the whole frame (read as before, whatever its ROWORDER and Bayer offsets) cut in the orientation it
    is delivered in, and its pattern that of the whole frame at the cut's corner."""
    w = 36
    x2, y2 = w - 3, height - 4                      # (1-based, included)
    xoff, yoff = offsets
    cards = dict(BAYERPAT="RGGB", XBAYROFF=xoff, YBAYROFF=yoff, ROWORDER=roworder)
    stored = mosaic(height, w, _shift_pattern("RGGB", xoff, yoff))
    whole = read_frame(write(tmp_path / "whole.fits", stored, **cards))
    cut = read_frame(write(tmp_path / "cut.fits", stored, TRIMSEC=f"[{x1}:{x2},{y1}:{y2}]", **cards))
    # rows y1-1 … y2-1 as stored are rows H-y2 … H-y1 of a BOTTOM-UP frame as delivered (row 0 at the top)
    top = y1 - 1 if roworder == "TOP-DOWN" else height - y2
    np.testing.assert_array_equal(cut.data, whole.data[top:top + y2 - y1 + 1, x1 - 1:x2])
    assert cut.pattern == _shift_pattern(whole.pattern, x1 - 1, top)
    if roworder == "TOP-DOWN":                       # (BAYERPAT counts the rows as stored)
        assert colours(cut.data) == cut.pattern


@pytest.mark.parametrize("value, why", [
    ("[17:528 1:520]", "not a section"),
    ("17:48,1:40", "not a section"),
    ("[1:48:2,1:40]", "not a section"),
    (42, "not a section"),
    ("[0:48,1:40]", "columns 0:48 are outside the image's 1:56"),
    ("[17:57,1:40]", "columns 17:57 are outside the image's 1:56"),
    ("[17:48,1:41]", "rows 1:41 are outside the image's 1:40"),
    ("[48:17,1:40]", "columns 48:17 are reversed"),
])
def test_a_section_that_cannot_be_one_is_ignored_with_a_warning(tmp_path, caplog, value, why):
    """Its pixels are good, only the card is wrong: the frame is read whole, as before, and one line says so."""
    data = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    p = write(tmp_path / "bad.fits", data, TRIMSEC=value)
    with caplog.at_level(logging.WARNING, logger="livestack"):
        f = read_frame(p)
    np.testing.assert_array_equal(f.data, data.astype(np.float32))
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "livestack"]
    assert msg.startswith("bad.fits: TRIMSEC ") and why in msg and msg.endswith("the frame is read whole")
    assert "\n" not in msg


def test_a_bad_trimsec_falls_back_to_datasec(tmp_path, caplog):
    data = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    p = write(tmp_path / "b.fits", data, TRIMSEC="[17:99,1:40]", DATASEC="[17:48,1:40]")
    with caplog.at_level(logging.WARNING, logger="livestack"):
        f = read_frame(p)
    np.testing.assert_array_equal(f.data, data[:, 16:48].astype(np.float32))
    assert any("TRIMSEC '[17:99,1:40]' ignored" in r.getMessage() for r in caplog.records)


def test_a_cut_too_small_to_stack_fails_naming_the_section(tmp_path):
    from livestack.engine.frame import FrameError

    p = write(tmp_path / "s.fits", np.zeros((40, 56), np.uint16), TRIMSEC="[1:10,1:40]")
    with pytest.raises(FrameError, match=r"^s\.fits: FITS image too small \(40, 10\) \(its TRIMSEC \[1:10,1:40\]\)$"):
        read_frame(p)


def _tan_header(h: int, w: int) -> fits.Header:
    hdr = fits.Header()
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    hdr["CRVAL1"], hdr["CRVAL2"] = 150.0, 30.0
    hdr["CRPIX1"], hdr["CRPIX2"] = w / 2 + 3.5, h / 2 - 2.25
    hdr["CD1_1"], hdr["CD1_2"], hdr["CD2_1"], hdr["CD2_2"] = -2.0e-4, 1.0e-5, 1.2e-5, 2.0e-4
    return hdr


@pytest.mark.parametrize("roworder", ["TOP-DOWN", "BOTTOM-UP"])
def test_the_wcs_of_a_trimmed_frame_points_its_pixels_where_they_were(tmp_path, roworder):
    """CRPIX counts the stored pixels: after the cut, pixel (x, y) is the one the whole frame had at its corner +
    (x, y); read_frame's WCS and image_header's (which the plate solver's hints use) both say so."""
    h, w = 60, 80
    hdr = _tan_header(h, w)
    hdr["ROWORDER"], hdr["TRIMSEC"] = roworder, "[11:70,4:53]"
    fits.PrimaryHDU(np.full((h, w), 500, np.uint16), header=hdr).writeto(tmp_path / "a.fits")
    f = read_frame(tmp_path / "a.fits")
    assert f.data.shape == (50, 60) and f.meta.wcs is not None
    whole = header_wcs({**{k: hdr[k] for k in hdr if k != "TRIMSEC"}, "NAXIS1": w, "NAXIS2": h}, (h, w))
    xy = np.array([[0.0, 0.0], [59.0, 49.0], [12.5, 30.25]])
    top = 3 if roworder == "TOP-DOWN" else h - 53      # the cut's first row as delivered (row 0 at the top)
    np.testing.assert_allclose(f.meta.wcs.all_pix2world(xy, 0),
                               whole.all_pix2world(xy + [10, top], 0), rtol=0, atol=1e-9)
    header = image_header(tmp_path / "a.fits")
    assert (header["NAXIS1"], header["NAXIS2"]) == (60, 50) and "TRIMSEC" not in header
    np.testing.assert_allclose(header_wcs(header, f.data.shape).all_pix2world(xy, 0),
                               f.meta.wcs.all_pix2world(xy, 0), rtol=0, atol=1e-12)


def test_a_trimmed_frame_is_read_into_the_reused_buffer(tmp_path):
    """The pipeline keeps the last frame's array and reads the next frame into it: that is the trimmed shape."""
    data = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    p = write(tmp_path / "a.fits", data, TRIMSEC="[17:48,1:40]")
    first = read_frame(p)
    again = read_frame(p, out=first.data)
    assert again.data is first.data
    np.testing.assert_array_equal(again.data, data[:, 16:48].astype(np.float32))


def test_a_tile_compressed_frame_is_cut_too(tmp_path):
    """A .fits.fz (fpack) carries TRIMSEC in its compressed image header: read through astropy's scaled path."""
    data = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    hdu = fits.CompImageHDU(data, compression_type="RICE_1")
    hdu.header["TRIMSEC"] = "[17:48,2:40]"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp_path / "a.fits.fz")
    f = read_frame(tmp_path / "a.fits.fz")
    np.testing.assert_array_equal(f.data, data[1:40, 16:48].astype(np.float32))
    assert image_header(tmp_path / "a.fits.fz")["NAXIS2"] == 39
