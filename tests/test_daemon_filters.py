"""`livestack run` while the filter wheel turns: a stack per filter, the composite, and kill -9 in between."""
from __future__ import annotations

import errno
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from drivers.simulator import SimConfig, render_night
from livestack.session import read_frames_log


@pytest.fixture(scope="module")
def wheel_night(tmp_path_factory) -> list[Path]:
    """16 mono frames: 5 × L, 5 × Ha, 3 × L, 3 × OIII (a wheel turned by hand twice, then a third filter)."""
    root = tmp_path_factory.mktemp("wheel")
    seq = ("L",) * 5 + ("Ha",) * 5 + ("L",) * 3 + ("OIII",) * 3
    cfg = SimConfig(width=400, height=300, n_stars=900, n_frames=len(seq), mono=True, seed=7, filters=seq,
                    dither_px=2.0, filter_exptime={"L": 30, "Ha": 60, "OIII": 60})
    truth = render_night(root, cfg)
    return [root / f["file"] for f in truth["frames"]]


def read(out: Path, name: str):
    with fits.open(out / name) as h:
        return np.array(h[0].data), dict(h[0].header)


def test_filter_changes_and_kill9_give_the_uninterrupted_stacks(make_daemon, wheel_night):
    files = wheel_night
    ref = make_daemon(name="uninterrupted").run_through(files)
    ref_recs = {r["file"]: (r["status"], r["filter"]) for r in read_frames_log(ref.out / "frames.jsonl")}
    assert all(s in ("reference", "stacked") for s, _ in ref_recs.values()), ref_recs

    d = make_daemon(name="killed")
    copy = d.feeder(files)
    copy(4)
    d.start()
    d.wait_lines(3)
    # a checkpoint to resume from before the kills: its schedule depends on how long frames and stack.fits take
    # (a loaded machine: none before either kill, and no restart said "resumed"); the one of the idle moment
    # after the backlog comes within 5 s
    deadline = time.monotonic() + 30
    while not (d.out / "session" / "checkpoint.npz").exists():
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log.read_text()
        time.sleep(0.05)
    copy(4, pause=0.1)                  # the wheel turns to Ha while the daemon runs
    d.wait_lines(6)
    d.kill9()
    copy(4)                             # Ha and back to L while it is down
    d.start()
    d.wait_lines(11)
    d.kill9()
    copy(4)                             # the last L frames and a third filter
    d.start()
    d.wait_lines(len(files))
    time.sleep(0.5)
    assert d.stop() == 0

    recs = read_frames_log(d.out / "frames.jsonl")
    assert sorted(r["file"] for r in recs) == sorted(f.name for f in files)    # none twice, none skipped
    assert {r["file"]: (r["status"], r["filter"]) for r in recs} == ref_recs
    for name, n, t in (("stack_L.fits", 8, 240.0), ("stack_Ha.fits", 5, 300.0), ("stack_OIII.fits", 3, 180.0)):
        a, ha = read(ref.out, name)
        b, hb = read(d.out, name)
        assert ha["NCOMBINE"] == hb["NCOMBINE"] == n and hb["EXPTIME"] == pytest.approx(t), name
        assert a.shape == (300, 400) and np.allclose(a, b, rtol=1e-5, atol=1e-3), (name, np.abs(a - b).max())
    a, ha = read(ref.out, "stack.fits")
    b, hb = read(d.out, "stack.fits")
    assert a.shape == (3, 300, 400) and hb["PALETTE"] == ha["PALETTE"] and hb["NCOMBINE"] == 16
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert "resumed" in "".join(p.read_text() for p in sorted(d.tmp.glob("daemon-*.log")))


def test_exclude_leaves_no_stack_file_of_a_filter_without_frames(tmp_path):
    """After a restack a filter with no frame left has no stack_<F>.fits — as `livestack stack` of the
    included files gives — and a filter whose name clash is gone gets back its plain file name: no stale
    file keeps the excluded frame."""
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    night = tmp_path / "night"
    truth = render_night(night, SimConfig(width=320, height=240, n_stars=600, n_frames=4, mono=True,
                                          seed=11, filters=("L", "Ha", "L", "OIII"), dither_px=2.0))
    files = [night / f["file"] for f in truth["frames"]]
    for f, name in ((files[1], "C a"), (files[3], "C_a")):     # two filters both come out as stack_C_a…
        with fits.open(f, mode="update") as hd:
            hd[0].header["FILTER"] = name
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in files:
        (watch / f.name).write_bytes(f.read_bytes())
    svc = Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                  DaemonParams(out=str(out)))
    svc.start()
    try:
        deadline = time.monotonic() + 60
        while not ((s := svc.status())["frames"] >= 4 and s["state"] == "idle") and time.monotonic() < deadline:
            time.sleep(0.05)
        stacks = lambda: sorted(p.name for p in out.glob("stack*.fits"))
        while len(stacks()) < 4 and time.monotonic() < deadline:     # written once idle
            time.sleep(0.05)
        assert stacks() == ["stack.fits", "stack_C_a-2.fits", "stack_C_a.fits", "stack_L.fits"], \
            [(r["file"], r["status"], r["reason"]) for r in read_frames_log(out / "frames.jsonl")]
        svc.exclude(files[1].name).result(timeout=60)       # "C a": its only frame
        assert stacks() == ["stack.fits", "stack_C_a.fits", "stack_L.fits"]
        assert fits.getheader(out / "stack_C_a.fits")["FILTER"] == "C_a"
        svc.exclude(files[3].name).result(timeout=60)       # "C_a" too: L alone
        assert stacks() == ["stack.fits", "stack_L.fits"]
        assert fits.getheader(out / "stack.fits")["FILTER"] == "L"
        svc.exclude(files[3].name, False).result(timeout=60)
        assert stacks() == ["stack.fits", "stack_C_a.fits", "stack_L.fits"]
        for f in (files[0], files[2], files[3]):               # every frame out: no stack at all
            svc.exclude(f.name).result(timeout=60)
        assert stacks() == [] and not (out / "preview.jpg").exists()
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def _service(watch: Path, out: Path):
    from livestack.config import Config
    from livestack.daemon.config import DaemonParams, WatchParams
    from livestack.daemon.service import Service

    return Service(Config(), watch, out, WatchParams(dir=str(watch), settle_s=0.05, timeout_s=5.0, rescan_s=0.5),
                   DaemonParams(out=str(out)))


def _wait_idle(svc, frames: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not ((s := svc.status())["frames"] >= frames and s["state"] == "idle") and time.monotonic() < deadline:
        time.sleep(0.05)
    return s


@contextlib.contextmanager
def _running(watch: Path, out: Path, frames: int):
    """(a service on ``watch`` → ``out``, its status once idle with ``frames`` records); stopped afterwards, and
    it ended without an error."""
    svc = _service(watch, out)
    svc.start()
    try:
        yield svc, _wait_idle(svc, frames)
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


@pytest.fixture
def two_filters(tmp_path) -> tuple[Path, Path]:
    """A capture folder of 2 Ha and 2 OIII frames (auto: HOO) and the session folder to stack them into."""
    night = tmp_path / "night"
    truth = render_night(night, SimConfig(width=320, height=240, n_stars=600, n_frames=4, mono=True, seed=3,
                                          filters=("Ha", "OIII", "Ha", "OIII"), dither_px=2.0))
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for f in truth["frames"]:
        (watch / f["file"]).write_bytes((night / f["file"]).read_bytes())
    return watch, out


def test_the_status_names_each_filters_spellings(two_filters):
    """'Ha' and 'H-alpha' frames make one stack: the status's filter names both, for the page to colour the
    H-alpha frames as that stack's (it drew them as another filter's)."""
    watch, out = two_filters
    ha = sorted(watch.glob("*_Ha.fits"))[1]
    with fits.open(ha, mode="update") as h:
        h[0].header["FILTER"] = "H-alpha"
    with _running(watch, out, 4) as (_, s):
        assert [(f["filter"], f["names"], f["frames"]) for f in s["filters"]] == [
            ("Ha", ["H-alpha", "Ha"], 2), ("OIII", ["OIII"], 2)], s["filters"]


def test_weights_and_a_palette_posted_back_to_back_are_both_applied(two_filters):
    """The page posts a slider's weights and a palette as two requests; the second was built from the palette the
    caller saw — before the worker had applied the first, still queued — and undid its weights in memory, while
    palette.json kept them: the status and the composite lost the weights (10 times in 10), a restart brought
    them back."""
    watch, out = two_filters
    svc = _service(watch, out)
    svc.start()
    try:
        _wait_idle(svc, 4)
        for i, palette in enumerate(("HUES", "SHO", "HUES")):
            weights = {"Ha": 1.5 + i / 10}
            first = svc.set_palette(weights=weights)
            svc.set_palette(palette).result(timeout=60)
            first.result(timeout=60)
            p = svc.status()["palette"]
            assert (p["requested"], p["weights"]) == (palette, weights), p
            kept = json.loads((out / "session" / "palette.json").read_text())
            assert kept == {"weights": weights, "palette": palette}, kept
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_every_weight_0_on_the_page_neither_fails_nor_stops_the_daemon(two_filters):
    """Every slider at 0: the POST got a 500 ('ValueError: no stack to compose'), palette.json kept the weights,
    and the daemon stopped with that error at its next frame — and at every start after, a restart loop under
    systemd.  Now the composite is black, the frames go on stacking and a restart starts."""
    watch, out = two_filters
    zero = {"Ha": 0.0, "OIII": 0.0}
    with _running(watch, out, 4) as (svc, s):
        p = svc.set_palette(weights=zero).result(timeout=60)["palette"]
        assert p["weights"] == zero and "the composite is black" in p["mapping"], p
        extra = sorted(watch.glob("*"))[0]
        (watch / f"again_{extra.name}").write_bytes(extra.read_bytes())
        assert _wait_idle(svc, 5)["stacked"] == 5
    with fits.open(out / "stack.fits") as h:
        assert np.nanmax(np.abs(h[0].data)) == 0
    with _running(watch, out, 5) as (_, s):
        assert s["palette"]["weights"] == zero


def test_the_page_palette_survives_a_restart(two_filters):
    """A palette, weights and hues chosen on the page are the session's: a restart (a power blip, systemctl
    restart) finds them as they were left, in the status, stack.fits and the preview — not the config's."""
    watch, out = two_filters
    with _running(watch, out, 4) as (svc, s):
        assert s["palette"]["name"] == "HOO"
        svc.set_palette("HUES", {"Ha": 2.5}, {"OIII": [0, 1, 0]}).result(timeout=60)
    assert fits.getheader(out / "stack.fits")["PALETTE"].startswith("HUES")

    with _running(watch, out, 4) as (again, s):
        p = s["palette"]
        assert (p["requested"], p["name"], p["weights"], p["hues"]) == ("HUES", "HUES", {"Ha": 2.5},
                                                                        {"OIII": [0.0, 1.0, 0.0]}), p
        again.set_palette(weights={"OIII": 0.5}).result(timeout=60)     # weights alone: the palette stays
    assert fits.getheader(out / "stack.fits")["PALETTE"].startswith("HUES")

    with _running(watch, out, 4) as (_, s):
        p = s["palette"]
        assert (p["requested"], p["weights"], p["hues"]) == ("HUES", {"OIII": 0.5}, {"OIII": [0.0, 1.0, 0.0]}), p
    assert fits.getheader(out / "stack.fits")["PALETTE"].startswith("HUES")


def _start_on_damaged(tmp_path, caplog, kind: str, text: str, why: str):
    """A service started on a session/<kind>.json holding ``text``: it starts, one log line names the file and
    ``why`` and says the config's section is used, and the file is moved aside for a look.  (service, out,
    status)."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    (out / "session").mkdir(parents=True)
    (out / "session" / f"{kind}.json").write_text(text)
    svc = _service(watch, out)
    with caplog.at_level(logging.WARNING, logger="livestack"):
        svc.start()
    try:
        status = _wait_idle(svc, 0)
        lines = [r.getMessage() for r in caplog.records if f"{kind}.json" in r.getMessage()]
        assert len(lines) == 1 and f"session/{kind}.json" in lines[0] and why in lines[0], lines
        assert "\n" not in lines[0] and "moved aside" in lines[0] and "of the config's" in lines[0]
        assert not (out / "session" / f"{kind}.json").exists()
        assert [q.read_text() for q in (out / "session").glob(f"{kind}.json.corrupt-*")] == [text]
    except BaseException:
        svc.stop(timeout=10)
        raise
    return svc, out, status


@pytest.mark.parametrize("text, why", [
    ('{"palette": "SHO", "weig', "unreadable"),                     # torn by a power cut
    ('{"palette": "Rainbow"}', "Rainbow"),                          # edited by hand: what the page refuses
    ('{"weights": {"Ha": 11}}', "Ha"),
    ('{"weights": [1, 2]}', "weights must be an object"),
    ('{"pallete": "SHO"}', "'pallete'"),
    ('["SHO"]', "JSON object"),
])
def test_a_damaged_palette_file_gives_the_config_one_line(tmp_path, caplog, text, why):
    """A session/palette.json that cannot be used never stops a start (under systemd, a restart loop): one
    log line names it and why, it is moved aside for a look, and the config's [compose] is used."""
    svc, out, status = _start_on_damaged(tmp_path, caplog, "palette", text, why)
    try:
        p = status["palette"]
        assert (p["requested"], p["weights"], p["hues"]) == ("auto", {}, {}), p
        svc.set_palette("SHO").result(timeout=30)        # the page's next choice is kept again
        assert json.loads((out / "session" / "palette.json").read_text()) == {"palette": "SHO"}
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_a_new_session_starts_with_the_config_palette(two_filters):
    """*New stack* (and --new-session) start fresh: the choice goes to the archive with its session, and the
    new session, restarted or not, has the config's [compose]."""
    watch, out = two_filters
    with _running(watch, out, 4) as (svc, _):
        svc.set_palette("HUES", {"Ha": 2.5}).result(timeout=60)
        s = svc.new_session().result(timeout=60)
        assert (s["palette"]["requested"], s["palette"]["weights"]) == ("auto", {}), s["palette"]
        assert not (out / "session" / "palette.json").exists()
        assert json.loads((out / s["archived"] / "session" / "palette.json").read_text())["palette"] == "HUES"
        svc.set_palette("SHO").result(timeout=60)        # a choice in a session without a frame yet …
        s = svc.new_session().result(timeout=60)
        assert s["archived"] is None and s["palette"]["requested"] == "auto"     # … makes no archive
        assert not (out / "session" / "palette.json").exists()
    with _running(watch, out, 0) as (_, s):
        assert s["palette"]["requested"] == "auto"


def _sky_grey(svc) -> float:
    import cv2

    jpg = svc.snapshot.preview
    return float(np.median(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)))


def test_the_page_stretch_survives_a_restart(two_filters):
    """The black, midtones and white points set on the page are the session's, like its palette: a restart (a
    power blip, systemctl restart) finds them in the status — the page's sliders — and the preview, not the
    config's [stretch]."""
    watch, out = two_filters
    with _running(watch, out, 4) as (svc, _):
        auto = _sky_grey(svc)
        s = svc.set_stretch(0.001, 0.5, 0.6).result(timeout=60)
        assert s["stretch"] == {"black": 0.001, "midtones": 0.5, "white": 0.6, "auto": False}
        dark = _sky_grey(svc)
        assert dark < auto - 30, (auto, dark)

    with _running(watch, out, 4) as (again, s):
        assert s["stretch"] == {"black": 0.001, "midtones": 0.5, "white": 0.6, "auto": False}, s["stretch"]
        assert abs(_sky_grey(again) - dark) < 3, (dark, _sky_grey(again))
        again.set_stretch().result(timeout=60)           # Auto stretch: kept too (null = auto)

    with _running(watch, out, 4) as (third, s):
        assert s["stretch"]["auto"] is True
        assert abs(_sky_grey(third) - auto) < 3, (auto, _sky_grey(third))


@pytest.mark.parametrize("text, why", [
    ('{"black": 0.001, "midt', "unreadable"),                      # torn by a power cut
    ('{"black": 2, "midtones": null, "white": null}', "black = 2"),  # edited by hand: what the page refuses
    ('{"black": null, "midtones": 1, "white": null}', "midtones"),
    ('{"black": 0.5, "midtones": null, "white": 0.4}', "below white"),
    ('{"black": "0.1"}', "black = '0.1'"),
    ('{"gamma": 1}', "'gamma'"),
    ('[0.001, 0.5, 0.6]', "JSON object"),
])
def test_a_damaged_stretch_file_gives_the_config_one_line(tmp_path, caplog, text, why):
    """A session/stretch.json that cannot be used never stops a start: one log line names it and why, it is
    moved aside for a look, and the config's [stretch] is used."""
    svc, out, status = _start_on_damaged(tmp_path, caplog, "stretch", text, why)
    try:
        assert status["stretch"]["auto"] is True
        svc.set_stretch(midtones=0.3).result(timeout=30)      # the page's next choice is kept again
        assert json.loads((out / "session" / "stretch.json").read_text()) == {"black": None, "midtones": 0.3,
                                                                              "white": None}
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


@pytest.mark.parametrize("kind, choose, applied, kept", [
    ("palette", lambda svc: svc.set_palette("HUES", {"Ha": 2}),
     lambda s: s["palette"]["requested"] == "HUES" and s["palette"]["weights"] == {"Ha": 2.0},
     {"palette": "HUES", "weights": {"Ha": 2.0}}),
    ("stretch", lambda svc: svc.set_stretch(0.01, 0.2, None),
     lambda s: s["stretch"] == {"black": 0.01, "midtones": 0.2, "white": None, "auto": False},
     {"black": 0.01, "midtones": 0.2, "white": None}),
])
def test_a_full_disk_does_not_stop_the_pages_choice(tmp_path, monkeypatch, kind, choose, applied, kept):
    """The page's palette or stretch applies at once on a full or read-only disk (like the stack, kept in
    memory): its file is owed, the status says so, and it is written when the disk takes it again."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    svc = _service(watch, out)
    svc.start()
    try:
        _wait_idle(svc, 0)
        setter = f"set_{kind}"
        write = getattr(svc.folder, setter)

        def full(choice):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(svc.folder, setter, full)
        s = choose(svc).result(timeout=30)
        assert applied(s), s
        assert f"{kind}.json" in s["disk"]["error"] and not (out / "session" / f"{kind}.json").exists()
        monkeypatch.setattr(svc.folder, setter, write)
        deadline = time.monotonic() + 10                 # caught up while idle (every second)
        while svc.status()["disk"] is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.status()["disk"] is None
        assert json.loads((out / "session" / f"{kind}.json").read_text()) == kept
    finally:
        svc.stop(timeout=10)
    assert svc.error is None


def test_a_new_session_starts_with_the_config_stretch(two_filters):
    """*New stack* starts fresh: the stretch goes to the archive with its session, and the new session,
    restarted or not, has the config's [stretch] — and a stretch alone makes no archive."""
    watch, out = two_filters
    svc = _service(watch, out)
    svc.start()
    try:
        _wait_idle(svc, 4)
        svc.set_stretch(0.001, 0.5, 0.6).result(timeout=60)
        s = svc.new_session().result(timeout=60)
        assert s["stretch"]["auto"] is True, s["stretch"]
        assert not (out / "session" / "stretch.json").exists()
        assert json.loads((out / s["archived"] / "session" / "stretch.json").read_text())["midtones"] == 0.5
        svc.set_stretch(midtones=0.3).result(timeout=60)   # a stretch in a session without a frame yet …
        s = svc.new_session().result(timeout=60)
        assert s["archived"] is None and s["stretch"]["auto"] is True     # … makes no archive
        assert not (out / "session" / "stretch.json").exists()
    finally:
        svc.stop(timeout=10)
    assert svc.error is None
    again = _service(watch, out)
    again.start()
    try:
        assert _wait_idle(again, 0)["stretch"]["auto"] is True
    finally:
        again.stop(timeout=10)
