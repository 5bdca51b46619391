"""A DNG stored plainly (uncompressed 16-bit CFA samples in strips) is read from its file without LibRaw's
unpacking — the same mosaic, pattern and levels as LibRaw's reading, which is checked on the first file of each
layout (read.py: _plain_dng, _check_plain)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from livestack.engine import read
from livestack.engine.frame import FrameError
from livestack.engine.read import read_frame

H, W = 60, 80
PATTERN_CODES = {"RGGB": (0, 1, 1, 2), "BGGR": (2, 1, 1, 0), "GRBG": (1, 0, 2, 1), "GBRG": (1, 2, 0, 1)}


def write_dng(path: Path, raw: np.ndarray, *, pattern="RGGB", black=(512,), black_dims=(1, 1), white=16383,
              byteorder="<", rowsperstrip=None, active_area=None, subifd=False, rational_black=False,
              extra=(), model="PLAIN 1") -> Path:
    """A CFA DNG of ``raw`` (uint16) as cameras write one: in IFD0, or in a SubIFD behind a thumbnail."""
    black_tag = (50714, 5, len(black), tuple(v for b in black for v in (int(b * 2), 2)), True) if rational_black \
        else (50714, 4, len(black), tuple(int(b) for b in black), True)
    cfa_tags = [(33421, 3, 2, (2, 2), True), (33422, 1, 4, PATTERN_CODES[pattern], True),
                (50710, 1, 3, (0, 1, 2), True), (50711, 3, 1, 1, True),
                (50713, 3, 2, black_dims, True), black_tag, (50717, 4, 1, white, True), *extra]
    if active_area is not None:
        cfa_tags.append((50829, 4, 4, active_area, True))
    dng_tags = [(50706, 1, 4, (1, 4, 0, 0), True), (271, 2, 0, "PLAIN", True), (272, 2, 0, model, True),
                (50708, 2, 0, f"PLAIN {model}", True),
                (50721, 10, 9, (10000, 10000, 0, 1, 0, 1, 0, 1, 10000, 10000, 0, 1, 0, 1, 0, 1, 10000, 10000), True)]
    strip = {} if rowsperstrip is None else {"rowsperstrip": rowsperstrip}
    with tifffile.TiffWriter(path, byteorder=byteorder) as tw:
        if subifd:
            tw.write(np.zeros((8, 10, 3), np.uint8), photometric="rgb", subfiletype=1, subifds=1,
                     extratags=dng_tags, metadata=None)
            tw.write(raw, photometric=32803, subfiletype=0, extratags=cfa_tags, metadata=None, **strip)
        else:
            tw.write(raw, photometric=32803, subfiletype=0, extratags=dng_tags + cfa_tags, metadata=None, **strip)
    return path


def mosaic(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 16384, size=(h, w), dtype=np.uint16)


@pytest.fixture(autouse=True)
def fresh_layouts(monkeypatch):
    monkeypatch.setattr(read, "_PLAIN_CHECKED", {})
    monkeypatch.setattr(read, "_PLAIN_CHECKING", {})


def _calls(monkeypatch, name: str) -> list[str]:
    """The files read.<name> is called with from now on, by name (each call made as ever)."""
    names: list[str] = []
    real = getattr(read, name)

    def spy(path, *args):
        names.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(read, name, spy)
    return names


@pytest.fixture
def taken(monkeypatch):
    """The files whose pixels came from the file itself (the plain path), by name."""
    return _calls(monkeypatch, "_plain_pixels")


def libraw_reading(path: Path, monkeypatch):
    """read_frame with the plain path off: LibRaw's own reading of the file."""
    with monkeypatch.context() as m:
        m.setattr(read, "_plain_dng", lambda *a: None)
        return read_frame(path)


VARIANTS = {
    "ifd0, one strip": {},
    "big-endian, strips of 7 rows, BGGR": {"byteorder": ">", "rowsperstrip": 7, "pattern": "BGGR"},
    "subifd behind a thumbnail, GRBG, white 4095": {"subifd": True, "pattern": "GRBG", "white": 4095},
    "active area at odd margins": {"active_area": (3, 5, H - 1, W - 2), "pattern": "GBRG"},
    "rational black level": {"rational_black": True, "black": (256,)},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_plain_dng_reads_as_libraw_reads_it_without_unpacking(tmp_path, monkeypatch, taken, variant):
    kw = VARIANTS[variant]
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i), **{**kw, "black": kw.get("black", (500 + 10 * i,))})
             for i in range(3)]
    for f in files:
        got, want = read_frame(f), libraw_reading(f, monkeypatch)
        assert np.array_equal(got.data, want.data) and got.data.dtype == np.float32
        assert got.pattern == want.pattern and np.array_equal(got.black, want.black) and got.white == want.white
    # the first file of the layout is LibRaw's (and checked); the others skip LibRaw's unpacking
    assert taken == [f.name for f in files[1:]]
    assert list(read._PLAIN_CHECKED.values()) == [True]
    if "active_area" in kw:
        # LibRaw starts the visible area at the even row and column inside the active area, (4, 6); the CFA
        # pattern starts at the area's corner (3, 5) — GBRG there, GRBG at (4, 6)
        assert got.data.shape == (H - 1 - 4, W - 2 - 6) and got.pattern == "GRBG"
        assert np.array_equal(got.data, mosaic(2)[4:H - 1, 6:W - 2])


def test_a_black_level_repeating_every_two_pixels_is_read_as_libraw_reads_it(tmp_path, monkeypatch, taken):
    """Four black levels, one for each position of the 2×2 pattern (from the active area's corner, as LibRaw
    reads them), the first differing from file to file as a camera that measures its black level writes it."""
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i), black=(500 + i, 510, 520, 530), black_dims=(2, 2))
             for i in range(3)]
    for f in files:
        got, want = read_frame(f), libraw_reading(f, monkeypatch)
        assert np.array_equal(got.data, want.data)
        assert np.array_equal(got.black, want.black) and got.pattern == want.pattern and got.white == want.white
        assert got.black.tolist() == [[500 + int(f.stem[-1]), 510], [520, 530]]
    assert taken == [f.name for f in files[1:]] and list(read._PLAIN_CHECKED.values()) == [True]


def test_files_not_stored_plainly_are_libraws(tmp_path, monkeypatch, taken):
    """A linearization table (LibRaw maps each sample through it), a second CFA image, strips out of order:
    LibRaw reads them, as ever."""
    table = tuple(min(65535, 2 * v) for v in range(16384))
    curved = [write_dng(tmp_path / f"curve_{i}.dng", mosaic(i), extra=[(50712, 3, len(table), table, True)],
                        model="CURVE") for i in range(2)]
    for f in curved:
        got = read_frame(f)
        assert np.array_equal(got.data, libraw_reading(f, monkeypatch).data)
        assert np.array_equal(got.data, np.minimum(65535, 2 * mosaic(int(f.stem[-1]))))   # LibRaw's curve
    assert taken == [] and read._PLAIN_CHECKED == {}


def _black_misread(monkeypatch) -> None:
    """_plain_dng reads the black level 1 ADU off what the tags say: a layout LibRaw reads otherwise."""
    real = read._plain_levels

    def misread(*args):
        levels = real(*args)
        return levels and (levels[0], levels[1] + 1, levels[2])

    monkeypatch.setattr(read, "_plain_levels", misread)


def test_a_layout_libraw_reads_otherwise_stays_libraws(tmp_path, monkeypatch, taken):
    """When the tags are not read as LibRaw reads them (here: a black level misread on purpose), the first
    file's check finds it and the layout's later files are LibRaw's too."""
    _black_misread(monkeypatch)
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i)) for i in range(3)]
    for f in files:
        assert np.array_equal(read_frame(f).black, libraw_reading(f, monkeypatch).black)
    assert taken == [] and list(read._PLAIN_CHECKED.values()) == [False]


def test_a_plain_dng_cut_while_it_is_read_fails_the_frame(tmp_path, monkeypatch):
    """The file shorter than its strips say by the time its rows are read (rewritten meanwhile): the frame
    fails with one line naming the file; nothing is mapped that could kill the process."""
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i)) for i in range(2)]
    read_frame(files[0])
    real = read._plain_dng

    def then_cut(path, raw):
        plain = real(path, raw)
        Path(path).write_bytes(Path(path).read_bytes()[:plain.offset + 2 * W * (H // 2)])
        return plain

    monkeypatch.setattr(read, "_plain_dng", then_cut)
    with pytest.raises(FrameError) as e:
        read_frame(files[1])
    assert "light_1.dng" in str(e.value) and "ends inside its image data" in e.value.reason
    assert "\n" not in str(e.value)


def _first_check_held(monkeypatch):
    """_check_plain made to wait: -> (set when the first check has begun, set to let it go on)."""
    begun, go = threading.Event(), threading.Event()
    real = read._check_plain

    def held(*args):
        begun.set()
        assert go.wait(10)
        return real(*args)

    monkeypatch.setattr(read, "_check_plain", held)
    return begun, go


def test_a_file_read_beside_its_layouts_first_check_waits_for_it(tmp_path, monkeypatch, taken):
    """The read-ahead thread's second file of a run is read while the first file's reading checks the layout:
    it waits for the verdict and skips LibRaw's unpack, instead of unpacking and checking a second time."""
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i)) for i in range(2)]
    unpacked = _calls(monkeypatch, "_libraw_pixels")      # LibRaw unpacks
    begun, go = _first_check_held(monkeypatch)
    got = {}
    first = threading.Thread(target=lambda: got.setdefault(0, read_frame(files[0])))
    first.start()
    assert begun.wait(10)
    second = threading.Thread(target=lambda: got.setdefault(1, read_frame(files[1])))
    second.start()
    time.sleep(0.3)                 # the second reader reaches the layout's verdict and waits there
    assert 1 not in got
    go.set()
    first.join(10), second.join(10)
    assert unpacked == ["light_0.dng"] and taken == ["light_1.dng"]
    for i, f in enumerate(files):
        assert np.array_equal(got[i].data, libraw_reading(f, monkeypatch).data)


def test_a_check_that_ends_without_a_verdict_hands_it_to_a_reader_waiting(tmp_path, monkeypatch, taken):
    """The first file's check gives no verdict (the file fails after the layout's check was taken): the reader
    waiting for it checks the layout on its own file, and the next file takes the plain path."""
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i)) for i in range(3)]
    real = read._libraw_pixels
    entered, go = threading.Event(), threading.Event()

    def first_fails(path, *args):
        if Path(path).name == "light_0.dng":
            entered.set()
            assert go.wait(10)
            raise FrameError(Path(path), "damaged on purpose")
        return real(path, *args)

    monkeypatch.setattr(read, "_libraw_pixels", first_fails)
    errors, got = [], {}

    def read_first():
        try:
            read_frame(files[0])
        except FrameError as err:
            errors.append(err)

    first = threading.Thread(target=read_first)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: got.setdefault(1, read_frame(files[1])))
    second.start()
    time.sleep(0.3)
    assert 1 not in got             # waiting for the first file's check
    go.set()
    first.join(10), second.join(10)
    assert len(errors) == 1 and "damaged on purpose" in str(errors[0])
    assert taken == [] and list(read._PLAIN_CHECKED.values()) == [True]      # the second file was LibRaw's, checked
    assert np.array_equal(got[1].data, libraw_reading(files[1], monkeypatch).data)
    read_frame(files[2])
    assert taken == ["light_2.dng"] and read._PLAIN_CHECKING == {}


def test_a_speculative_first_read_takes_the_plain_path_while_libraw_checks_it_beside(tmp_path, monkeypatch, taken):
    """read_frame(speculate=True) of a layout's first file: its pixels from the file at once, LibRaw's reading
    checked in a thread beside (not the caller's), verify() True once it agrees; a second speculative reader
    during that check reads plainly too and waits on the same check (one unpack in all)."""
    files = [write_dng(tmp_path / f"light_{i}.dng", mosaic(i)) for i in range(2)]
    unpacked = _calls(monkeypatch, "_libraw_pixels")      # LibRaw unpacks
    begun, go = _first_check_held(monkeypatch)
    threads: list[str] = []
    real_levels = read._libraw_levels

    def levels(path, raw):
        threads.append(threading.current_thread().name)
        return real_levels(path, raw)

    monkeypatch.setattr(read, "_libraw_levels", levels)
    first = read_frame(files[0], speculate=True)
    assert begun.wait(10)               # the check is under way, held: the frame is read already
    second = read_frame(files[1], speculate=True)
    assert taken == ["light_0.dng", "light_1.dng"] and unpacked == []
    assert threads == ["dng-check"]
    go.set()
    assert first.verify() is True and second.verify() is True
    for got, f in ((first, files[0]), (second, files[1])):
        want = libraw_reading(f, monkeypatch)
        assert np.array_equal(got.data, want.data) and np.array_equal(got.black, want.black)
    assert list(read._PLAIN_CHECKED.values()) == [True] and read._PLAIN_CHECKING == {}
    assert read_frame(files[1]).verify is None          # checked: no verify from then on


def test_a_speculative_read_of_a_layout_libraw_reads_otherwise_is_read_again_by_the_pipeline(tmp_path, monkeypatch,
                                                                                           taken):
    """The check beside finds the tags misread (a black level, on purpose): verify() is False, and the engine's
    first stages read the file again — as LibRaw reads it — before anything of the frame counts."""
    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    _black_misread(monkeypatch)
    f = write_dng(tmp_path / "light_0.dng", mosaic(0))
    frame = read_frame(f, speculate=True)
    assert frame.verify() is False and list(read._PLAIN_CHECKED.values()) == [False]
    monkeypatch.setattr(read, "_PLAIN_CHECKED", {})
    taken.clear()
    engine = Engine(Config())
    try:
        front = engine._front(f, 0)
    finally:
        engine.close()
    want = libraw_reading(f, monkeypatch)
    assert front.frame.verify is None       # the reading kept is LibRaw's (the layout now known to be)
    assert np.array_equal(front.frame.black, want.black)     # (its data calibrated in place since)
    assert taken == ["light_0.dng"]          # the speculative read only; the one kept is LibRaw's


def test_a_file_libraw_cannot_read_fails_as_ever_after_a_speculative_read(tmp_path, monkeypatch, taken):
    """The check beside cannot read the file (LibRaw refuses it): no verdict, verify() False, and the engine's
    first stages read it again the old way — where LibRaw's refusal fails the frame with one line naming it."""
    import rawpy

    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    def refuses(path, raw):
        raise rawpy.LibRawDataError("data corrupted")

    monkeypatch.setattr(read, "_libraw_levels", refuses)
    f = write_dng(tmp_path / "light_0.dng", mosaic(0))
    engine = Engine(Config())
    try:
        front = engine._front(f, 0)
    finally:
        engine.close()
    assert taken == ["light_0.dng"]                 # the speculative read only
    assert isinstance(front.error, FrameError) and "light_0.dng" in str(front.error)
    assert "unreadable RAW" in front.error.reason and "\n" not in str(front.error)
    assert read._PLAIN_CHECKED == {} and read._PLAIN_CHECKING == {}
