"""The command line is a public contract: names, exit codes, outputs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from livestack.cli import main

from conftest import read_log, sky_frames

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "livestack.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300, env=env)


def test_demo_fast_runs_and_prints_outputs(tmp_path):
    r = cli("demo", "--fast", "--out", tmp_path, "-q")
    assert r.returncode == 0, r.stderr
    for name in ("stack.fits", "preview.jpg", "frames.jsonl"):
        assert str(tmp_path / "out" / name) in r.stdout
        assert (tmp_path / "out" / name).stat().st_size > 0
    recs = read_log(tmp_path / "out" / "frames.jsonl")
    assert recs[0]["status"] == "reference"
    assert any(r["status"] == "rejected" for r in recs)   # the demo's cloudy frame
    # a good night ends without a WARNING: the daemon's milestones (NOTICE) are `livestack run`'s, and the
    # demo prints its own summary
    assert "WARNING" not in r.stderr and "stopped;" not in r.stderr, r.stderr


def test_stack_folder_with_a_corrupt_file(night, tmp_path):
    files, _ = night(n_frames=4, seed=3)
    (files[0].parent / "light_0001_60s_broken.fits").write_bytes(b"SIMPLE  =  T" + b"\0" * 100)
    (files[0].parent / "notes.txt").write_text("not an image: ignored by the folder scan")
    out = tmp_path / "out"
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q"]) == 0
    recs = read_log(out / "frames.jsonl")
    assert len(recs) == 5
    broken = [r for r in recs if r["file"] == "light_0001_60s_broken.fits"][0]
    assert broken["status"] == "failed" and "light_0001_60s_broken.fits" not in broken["reason"]
    assert sum(r["status"] in ("reference", "stacked") for r in recs) == 4
    # the contract's field names
    for k in ("file", "status", "reason", "time", "exptime", "matrix", "stars", "fwhm", "eccentricity",
              "background", "noise", "weight", "seconds"):
        assert all(k in r for r in recs), k
    hdr = fits.getheader(out / "stack.fits")
    assert hdr["NCOMBINE"] == 4
    # how it was made: the defaults (README, warp step)
    assert (hdr["DEBAYER"], hdr["INTERP"], hdr["SMOOTHBG"]) == ("mhc", "compensated", True)


def test_stack_into_a_running_daemons_session_folder_is_refused(night, tmp_path, capsys):
    """`livestack stack … -o ~/night` while `livestack run` stacks into ~/night wrote its stack.fits and
    frames.jsonl over the running night's (the daemon then wrote over them again, its frames.jsonl another's).
    The daemon holds its folder (session.hold_folder): the batch is refused, nothing written."""
    import os

    from livestack.session import hold_folder

    files, _ = night(n_frames=2, seed=3)
    out = tmp_path / "night"
    out.mkdir()
    (out / "frames.jsonl").write_text('{"file": "m31_001.fits", "status": "reference"}\n')
    fd = hold_folder(out, make=False)           # as `livestack run` does
    try:
        assert main(["stack", str(files[0].parent), "-o", str(out), "-q"]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err == (f"livestack stack: {out} is the session folder of a running `livestack run`: its stack.fits "
                   "and frames.jsonl would be written over — give -o another folder\n"), err
    assert sorted(p.name for p in out.iterdir()) == ["frames.jsonl"]
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q"]) == 0     # the daemon stopped: as before


def test_stack_command_prints_and_writes_everything_before_it_exits(night, tmp_path):
    # `livestack stack` leaves the process without Python's teardown (cli._exit_now): what it printed into a pipe
    # (block-buffered) and every output must be complete
    files, _ = night(n_frames=3, seed=5)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}     # buffered, as a user's pipe is
    r = cli("-v", "stack", files[0].parent, "-o", out, "--no-solve", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 stacked, 0 rejected, 0 failed of 3 frames")
    assert r.stdout.endswith(f"{out / 'frames.jsonl'}\n")
    assert "3/3 light_0002_60s.fits stacked" in r.stderr        # the progress too
    assert [rec["status"] for rec in read_log(out / "frames.jsonl")] == ["reference", "stacked", "stacked"]
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == 3
    assert (out / "preview.jpg").read_bytes()[-2:] == b"\xff\xd9"     # a whole JPEG


def test_verbose_stack_logs_each_frame(night, tmp_path):
    """`livestack -v stack` ("log each frame's details", README Commands) logged only the rejected frames: under
    -q (no progress bar) a stacked frame left no line at all.  Now one INFO line per frame, as the daemon's."""
    files, _ = night(n_frames=3, seed=5)
    r = cli("-v", "stack", files[0].parent, "-o", tmp_path / "out", "--no-solve", "-q")
    assert r.returncode == 0, r.stderr
    assert "INFO reference light_0000_60s.fits fwhm " in r.stderr, r.stderr
    assert "INFO stacked light_0002_60s.fits fwhm " in r.stderr, r.stderr
    r = cli("stack", files[0].parent, "-o", tmp_path / "out2", "--no-solve", "-q")     # without -v: none
    assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr


def test_verbose_no_solve_names_the_flag_not_a_config_key(night, tmp_path):
    """`livestack -v stack … --no-solve` said "plate solving is off ([solve] enabled = false)": a setting the user
    had not made, in a line with parentheses inside parentheses.  Now it names the flag given."""
    files, _ = night(n_frames=2, seed=5)
    r = cli("-v", "stack", files[0].parent, "-o", tmp_path / "out", "--no-solve", "-q")
    assert r.returncode == 0, r.stderr
    assert "not plate solved: plate solving is off (--no-solve)" in r.stderr, r.stderr
    assert "enabled = false" not in r.stderr, r.stderr


def test_stack_into_a_closed_pipe_ends_without_a_traceback(night, tmp_path):
    """`livestack stack … | head -1`: the reader gone, the summary's print raised BrokenPipeError — a traceback
    after the outputs were written.  Now the outputs, no traceback, and 141 (what a shell says of a command
    SIGPIPE ended)."""
    files, _ = night(n_frames=3, seed=5)
    out = tmp_path / "out"
    r_fd, w_fd = os.pipe()
    os.close(r_fd)                      # nobody reads
    try:
        p = subprocess.run([sys.executable, "-m", "livestack.cli", "stack", files[0].parent, "-o", out, "-q",
                            "--no-solve"], stdout=w_fd, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    finally:
        os.close(w_fd)
    assert "Traceback" not in p.stderr and p.returncode == 141, p.stderr
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == 3


def test_stack_of_only_bad_files_exits_1(tmp_path):
    bad = tmp_path / "x.fits"
    bad.write_text("nope")
    r = cli("stack", bad, "-o", tmp_path / "out", "-q")
    assert r.returncode == 1
    assert "nothing stacked" in r.stdout
    assert read_log(tmp_path / "out" / "frames.jsonl")[0]["status"] == "failed"


def test_usage_and_config_errors_exit_2(tmp_path):
    assert cli("stack").returncode == 2
    cfg = tmp_path / "livestack.toml"
    cfg.write_text("[stars]\nsigmma = 4\n")
    r = cli("stack", tmp_path, "-o", tmp_path / "o", "--config", cfg)
    assert r.returncode == 2 and "unknown key sigmma" in r.stderr and "sigma" in r.stderr
    cfg.write_text("[stack]\nkappa = 0.5\n")
    r = cli("stack", tmp_path, "-o", tmp_path / "o", "--config", cfg)
    assert r.returncode == 2 and "kappa" in r.stderr
    for text in ("watch = 3\n", "stack = 3\n"):          # a daemon section or an engine one that is no table
        cfg.write_text(text)
        r = cli("stack", tmp_path, "-o", tmp_path / "o", "--config", cfg)
        assert r.returncode == 2 and "must be a table" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_bad_flag_value_is_said_as_the_flag(tmp_path):
    """`livestack stack … --kappa 0` said "stack.kappa = 0.0: must be in [1.5, 20]": a config key the user had not
    written.  Now the flag as given, and still exit 2 before anything is read or made."""
    for flags, said in ((["--kappa", "0"], "--kappa 0: must be in [1.5, 20]"),
                        (["--drizzle", "5"], "--drizzle 5: must be 0 (off) or in [1, 4]"),
                        (["--pixfrac", "0.1"], "--pixfrac 0.1: must be in [0.3, 1]")):
        r = cli("stack", tmp_path, "-o", tmp_path / "o", *flags)
        assert r.returncode == 2 and said in r.stderr, r.stderr
        assert "stack." not in r.stderr and "drizzle." not in r.stderr, r.stderr
    r = cli("run", "--watch", tmp_path, "--out", tmp_path / "o", "--kappa", "99", "--no-web")
    assert r.returncode == 2 and "--kappa 99: must be in [1.5, 20]" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    for flags, said in ((["--token", "abc"], "--token: use at least 8 characters"),
                        (["--port", "99999"], "--port 99999: must be in [0, 65535]")):     # run's own flags too
        r = cli("run", "--watch", tmp_path, "--out", tmp_path / "o", *flags)
        assert r.returncode == 2 and said in r.stderr and "web." not in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    r = cli("masters", tmp_path, "-o", tmp_path / "o", "--kappa", "0")                  # and masters' own --kappa
    assert r.returncode == 2 and "--kappa 0: must be in (0, 100]" in r.stderr and "calibration." not in r.stderr, \
        r.stderr


def test_a_bad_config_value_names_its_section_once(tmp_path):
    """A value refused by its section's own check read "livestack.toml: engine: engine.debayer = 'mhcx': …" — the
    section twice; now "livestack.toml: engine.debayer = 'mhcx': …"."""
    cfg = tmp_path / "livestack.toml"
    for text, said in (("[engine]\ndebayer = 'mhcx'\n", "livestack.toml: engine.debayer = 'mhcx': must be"),
                       ("[web]\nport = 99999\n", "livestack.toml: web.port = 99999: must be")):
        cfg.write_text(text)
        r = cli("stack", tmp_path, "-o", tmp_path / "o", "--config", cfg)
        assert r.returncode == 2 and said in r.stderr, r.stderr
        assert ": engine: " not in r.stderr and ": web: " not in r.stderr, r.stderr


def test_an_unknown_key_of_a_daemon_or_solver_section_is_a_usage_error_in_every_command(night, tmp_path):
    """[solve], [session], [calibration] … are read by `stack` and `demo` too: an unknown key is the one-line exit 2
    the README promises ("unknown keys are refused with the list of known ones"), not a traceback after the
    reference frame nor a key silently ignored."""
    files, _ = night(n_frames=2, seed=1)
    cfg = tmp_path / "livestack.toml"
    for section, known in (("solve", "timeout_s"), ("session", "slew_deg"), ("calibration", "hot_sigma"),
                           ("capture", "its options")):       # [capture]: a section nothing reads
        cfg.write_text(f"[{section}]\nbogus = 1\n")
        r = cli("stack", files[0].parent, "-o", tmp_path / "o", "-q", "--config", cfg)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "livestack.toml: " + section in r.stderr, r.stderr
        assert "unknown key bogus" in r.stderr and known in r.stderr, r.stderr
        assert not (tmp_path / "o" / "stack.fits").exists()
    r = cli("demo", "--fast", "--no-web", "-q", "--out", tmp_path / "demo", "--config", cfg)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown key bogus" in r.stderr, r.stderr


def test_capture_order_not_name_order(night, tmp_path):
    files, truth = night(n_frames=3, seed=1)
    # rename so that name order is the reverse of capture order
    renamed = []
    for i, f in enumerate(files):
        g = f.with_name(f"z{9 - i}_{f.name}")
        f.rename(g)
        renamed.append(g)
    out = tmp_path / "out"
    assert main(["stack", *map(str, reversed(renamed)), "-o", str(out), "-q"]) == 0
    recs = read_log(out / "frames.jsonl")
    assert [r["time"] for r in recs] == [f["time"] for f in truth["frames"]]


def test_file_names_beyond_ascii_reach_the_fits_header_escaped(night, tmp_path):
    """A reference named Andromède_… (or with an undecodable byte, as a FAT card's Latin-1 name reads) is the
    REFFRAME card: FITS holds printable ASCII only, and the card used to stop the stack.fits write."""
    files, _ = night(n_frames=2, seed=1)
    names = ["Andromède_0000.fits", os.fsdecode(b"M31_\xe9t\xe9_0001.fits")]
    for f, name in zip(files, names):
        f.rename(f.with_name(name))
    out = tmp_path / "out"
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q"]) == 0
    hdr = fits.getheader(out / "stack.fits")
    assert hdr["REFFRAME"] == "Androm\\xe8de_0000.fits" and hdr["NCOMBINE"] == 2
    assert [r["file"] for r in read_log(out / "frames.jsonl")] == names


def _garble(path: Path, key: bytes) -> None:
    """Make ``key``'s card one astropy cannot parse (asking for its value raises VerifyError)."""
    b = bytearray(path.read_bytes())
    i = b[:2880 * 4].index(key.ljust(8) + b"= ")
    b[i:i + 80] = (key.ljust(8) + b"= 1 0").ljust(80)
    path.write_bytes(bytes(b))


def test_what_a_file_or_a_folder_can_do_wrong_fails_a_frame_or_says_one_line(night, tmp_path):
    """A review's finds, each a traceback that ended the command (and lost what was stacked): a header card
    astropy cannot parse, a master damaged since masters.json, an output path that cannot be a folder; and a
    restack into the folder of the first stacked its own stack.fits (and stack_<F>.fits) as lights."""
    files, _ = night(n_frames=4, seed=2)
    _garble(files[3], b"GAIN")
    out = tmp_path / "out"
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q"]) == 0
    assert [r["status"] for r in read_log(out / "frames.jsonl")] == ["reference", "stacked", "stacked", "stacked"]
    assert read_log(out / "frames.jsonl")[3]["gain"] is None              # the garbled card: its value unknown
    # stacked again into its own folder: the same four frames, not the stack on top
    again = files[0].parent
    assert main(["stack", str(again), "-o", str(again), "-q"]) == 0
    assert main(["stack", str(again), "-o", str(again), "-q"]) == 0
    assert fits.getheader(again / "stack.fits")["NCOMBINE"] == 4
    # an output path through a file
    (tmp_path / "afile").write_text("")
    r = cli("stack", again, "-o", tmp_path / "afile" / "out")
    assert r.returncode == 2 and "cannot make the output folder" in r.stderr and "Traceback" not in r.stderr


def test_a_damaged_master_fails_the_frames_it_would_calibrate(tmp_path):
    from drivers.simulator import SimConfig, render_calibration

    calib = tmp_path / "calib"
    render_calibration(calib, SimConfig(width=320, height=240, seed=5), n_bias=2, n_dark=2, n_flat=0, n_darkflat=0)
    lib = tmp_path / "lib"
    assert main(["masters", str(calib), "-o", str(lib), "-q"]) == 0
    _garble(next(calib.rglob("*.fits")), b"EXPTIME")      # a garbled card in a calibration frame: read as well
    dark = next(lib.glob("dark_*.fits"))
    dark.write_bytes(dark.read_bytes()[: dark.stat().st_size // 2])
    from conftest import make_night

    files, _ = make_night(tmp_path / "lights", width=320, height=240, n_frames=2, seed=5)
    r = cli("stack", files[0].parent, "-o", tmp_path / "out", "--masters", lib, "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    recs = read_log(tmp_path / "out" / "frames.jsonl")
    assert [d["status"] for d in recs] == ["failed", "failed"]
    # in words (astropy's own "cannot reshape array of size … into shape …" said nothing of a file cut short),
    # and no astropy WARNING line on stderr beside the frames' own
    assert recs[0]["reason"].startswith(f"calibration master unusable: {dark.name}: FITS file cut short: "
                                        f"{dark.stat().st_size:,} bytes where its header declares "), recs[0]["reason"]
    assert "truncated" not in r.stderr, r.stderr
    assert main(["masters", str(calib), "-o", str(tmp_path / "lib2"), "-q"]) == 0


def test_example_config_loads():
    """systemd/livestack.toml.example is what Pi users copy: every key in it must be known and valid."""
    from livestack.config import load_config
    from livestack.daemon.config import shell_sections

    cfg = load_config(ROOT / "systemd" / "livestack.toml.example")
    watch, daemon, web = shell_sections(cfg)
    assert watch.dir and daemon.out and web.port == 8080
    from livestack.config import make_section
    from livestack.daemon.config import session_section
    from livestack.engine.solve import SolveParams

    assert session_section(cfg).new_target_after == 3
    assert make_section(SolveParams, cfg.extra["solve"], "solve").timeout_s == 60


def test_ctrl_c_finishes_the_frame_and_writes_what_is_stacked(night, tmp_path, monkeypatch, capsys):
    # a user stopping a long restack keeps what is stacked: the frame in hand is finished (not half added),
    # stack.fits, preview.jpg and frames.jsonl are written, exit 130
    import os
    import signal

    from livestack.engine.pipeline import Engine

    files, _ = night(n_frames=8, seed=9)
    real, calls = Engine.process, []

    def process(self, *a, **k):
        rec = real(self, *a, **k)
        calls.append(rec.file)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C while the fourth frame is in hand
        return rec

    monkeypatch.setattr(Engine, "process", process)
    out = tmp_path / "out"
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q", "--no-solve"]) == 130
    recs = read_log(out / "frames.jsonl")
    assert [r["file"] for r in recs] == calls and len(calls) == 4
    stacked = sum(r["status"] in ("reference", "stacked") for r in recs)
    assert stacked == 4 and fits.getheader(out / "stack.fits")["NCOMBINE"] == stacked
    assert (out / "preview.jpg").exists()
    assert "(stopped by Ctrl-C: 4 not read)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # Python's own handler is back


def test_ctrl_c_gives_up_a_plate_solve_still_running():
    # after the last frame `livestack stack` waits for the reference's solve (up to its timeout, 60 s): a Ctrl-C
    # cancels it and the stack is written without a WCS
    import threading
    import time

    from livestack.engine.solve import SolveParams
    from livestack.sky import BatchSolve, SkySolver

    batch = BatchSolve.__new__(BatchSolve)
    batch.hints, batch.own, batch.obj, batch.why = None, None, None, None
    batch.solver = SkySolver(SolveParams())
    batch.solver._thread = threading.Thread(target=batch.solver._cancel.wait, args=(30,), daemon=True)
    batch.solver._thread.start()              # a solve that would run for 30 s unless cancelled
    stop, said = threading.Event(), []
    threading.Timer(0.3, stop.set).start()
    t = time.monotonic()
    assert batch.finish(None, stop=stop, say=said.append) is None
    assert time.monotonic() - t < 5 and not batch.solver.running
    assert batch.why == "skipped (Ctrl-C)" and "Ctrl-C skips it" in said[0]


def test_a_capture_time_at_the_end_of_time_is_counted_not_raised():
    import datetime as dt

    from livestack.engine.filterstack import Counters
    from livestack.engine.frame import FrameMeta

    c = Counters().stacked_frame(FrameMeta(kind="fits", time=dt.datetime(9999, 12, 31, 23, 59, 30), exptime=60.0))
    assert c.stacked == 1 and c.first_time.startswith("9999-12-31") and c.last_end is None


def test_a_trailed_first_frame_is_rejected_in_frames_jsonl(night, tmp_path):
    """The first frame, trailed, is stacked as the reference and rejected once the frames after it show it is:
    frames.jsonl is rewritten with its verdict (still one line a frame), the progress says so, stack.fits
    counts the frames left."""
    files, _ = night(n_frames=6, seed=5, defects={0: "wind"})
    out = tmp_path / "out"
    r = cli("stack", files[0].parent, "-o", out, "--no-solve")
    assert r.returncode == 0, r.stderr
    recs = read_log(out / "frames.jsonl")
    assert [x["file"] for x in recs] == [f.name for f in files]
    assert recs[0]["status"] == "rejected" and "left out of the stack" in recs[0]["reason"]
    assert recs[0]["weight"] is None
    assert [x["status"] for x in recs[1:]] == ["stacked"] * 5
    assert f"{files[0].name} rejected: " in r.stderr
    hdr = fits.getheader(out / "stack.fits")
    assert (hdr["NCOMBINE"], hdr["NREJECT"], hdr["EXPTIME"]) == (5, 1, 300)
    assert "5 stacked, 1 rejected" in r.stdout


def test_run_help_says_what_quiet_does():
    """`livestack run` has no progress bar: its -q leaves out the INFO lines (README, The live daemon)."""
    r = cli("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "-q, --quiet leave out the INFO lines" in text and "progress bar" not in text, r.stdout
    assert "no progress bar" in " ".join(cli("stack", "--help").stdout.split())


def test_demo_help_gives_the_defaults_the_readme_shows():
    """README Commands shows `demo [--frames 20 --interval 3 --port 8080 …]`; --help said the frames' default only."""
    text = " ".join(cli("demo", "--help").stdout.split())
    assert "(default 20)" in text and "(default 3)" in text and "(default 8080;" in text, text


def test_a_second_stack_into_the_same_folder_leaves_no_stack_of_the_first(night, tmp_path):
    """`livestack stack` into the folder of an earlier run with other filters: the earlier stack_<F>.fits went
    on lying beside the new frames.jsonl and stack.fits."""
    first, _ = night("first", mono=True, n_frames=6, seed=4, filters=("L", "Ha"))
    second, _ = night("second", mono=True, n_frames=4, seed=4, filters=("L", "OIII"))
    out = tmp_path / "out"
    assert main(["stack", str(first[0].parent), "-o", str(out), "-q", "--no-solve"]) == 0
    assert {p.name for p in out.glob("stack*.fits")} == {"stack.fits", "stack_L.fits", "stack_Ha.fits"}
    assert main(["stack", str(second[0].parent), "-o", str(out), "-q", "--no-solve"]) == 0
    assert {p.name for p in out.glob("stack*.fits")} == {"stack.fits", "stack_L.fits", "stack_OIII.fits"}
    assert fits.getheader(out / "stack_L.fits")["NCOMBINE"] == 2


def test_a_summary_says_a_short_integration_as_it_is():
    """A one-frame stack of a 1/640 s exposure said "0 s integration" (a review of the real files)."""
    from livestack.cli import _seconds

    assert [_seconds(t) for t in (480.0, 0.0, 0.0015625, 1.5, 12.3)] == ["480 s", "0 s", "0.0016 s", "1.5 s",
                                                                       "12 s"]


def test_no_solve_of_raw_frames_imports_no_solver(tmp_path):
    """`stack --no-solve` looks for the reference's own WCS in a FITS header; a RAW file has none, and importing
    the solver's modules for it (astropy.wcs and astropy.table) cost ~20 MB and 0.2 s of a 3 s 24 MP stack."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "drivers.simulator", str(tmp_path / "dng"), "--frames", "3", "--width",
                    "320", "--height", "240", "--format", "dng"], check=True, env=env, capture_output=True,
                   timeout=120)
    probe = ("import sys; from livestack.cli import main\n"
             "code = main(sys.argv[1:])\n"
             "print(code, 'livestack.engine.solve' in sys.modules, 'astropy.wcs' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe, "stack", str(tmp_path / "dng"), "-o", str(tmp_path / "o"), "-q",
                        "--no-solve"], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip().split("\n")[-1] == "0 False False", (r.stdout, r.stderr)


def test_a_stack_imports_no_capture_driver_and_capture_still_has_every_argument(tmp_path):
    """Building the command line imported the three capture drivers for every command (~20 ms of a 3 s
    `livestack stack`): now only for `capture` (and the top level's --help).  Nor the daemon's and the masters'
    command lines (20-35 ms more): `stack` and `demo` add only their own module's commands; the others and the
    top level's help still have theirs."""
    probe = ("import sys; from livestack.cli import main\n"
             "code = main(sys.argv[1:])\n"
             "print(code, sorted(m for m in sys.modules if m.startswith('drivers.')\n"
             "                   or m in ('livestack.run_cli', 'livestack.masters_cli', 'livestack.masters')))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", probe, "stack", str(tmp_path / "none"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip().split("\n")[-1] == "1 []", (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "-v", "capture", "sim", "--help"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "--interval" in r.stdout and "--format" in r.stdout, r.stdout + r.stderr
    for command, flag in (("masters", "--method"), ("run", "--watch")):
        r = subprocess.run([sys.executable, "-m", "livestack.cli", command, "--help"], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0 and flag in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "livestack.cli", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ("stack", "demo", "masters", "run", "capture")), r.stdout


def test_demo_fast_does_not_invite_to_a_page_it_closes_at_once(tmp_path):
    """`demo --fast` printed "live page: … (open it in a browser and watch the stack grow)" and exited within a
    second: the page it invited the user to was gone.  --fast exits when done (README): it says the page closes,
    and the normal demo still invites."""
    r = cli("demo", "--fast", "--port", "0", "--out", tmp_path, "-q")
    assert r.returncode == 0, r.stderr
    page = [line for line in r.stdout.splitlines() if "http://127.0.0.1:" in line]
    assert len(page) == 1, r.stdout
    assert "watch the stack grow" not in page[0].split("leave out --fast")[0], page[0]
    assert "closes" in page[0] and "--fast" in page[0], page[0]


def _demo_until_stacking(tmp_path, *extra):
    """A `livestack demo` subprocess, returned once its first frame is in frames.jsonl."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "livestack.cli", "demo", "--frames", "40", "--interval", "0.3",
                          "--no-web", "-q", *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    flog = tmp_path / "out" / "frames.jsonl"
    deadline = time.monotonic() + 60
    while not (flog.exists() and flog.read_text().strip()) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None and flog.exists(), p.communicate(timeout=30)
    return p


def test_demo_stopped_by_sigterm_ends_as_ctrl_c_does(tmp_path):
    """A demo under a process manager or `timeout` is stopped by SIGTERM: it died at once, without its summary
    and without stopping the daemon.  Now SIGTERM (and SIGHUP), as `livestack run`, stop it as Ctrl-C does."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        out = tmp_path / sig.name
        p = _demo_until_stacking(out, "--out", out)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, (sig.name, p.returncode, stdout, stderr)
        assert " stacked, " in stdout and str(out / "out" / "stack.fits") in stdout, (sig.name, stdout, stderr)
        assert (out / "out" / "stack.fits").stat().st_size > 0
        assert "Traceback" not in stderr, stderr


def test_demo_in_a_temp_folder_removes_its_frames_and_says_where_the_outputs_are(tmp_path):
    """`demo` without --out left livestack-demo-XXXX (tens of MB of simulated frames) in /tmp at every run.  The
    frames and the checkpoint are removed at the end; the outputs it lists stay, and the last line says so.
    With --out nothing is removed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = cli("demo", "--fast", "--no-web", "-q", env=env)
    assert r.returncode == 0, r.stderr
    (base,) = tmp_path.glob("livestack-demo-*")
    assert not (base / "lights").exists() and not (base / "out" / "session").exists()
    for name in ("stack.fits", "preview.jpg", "frames.jsonl"):
        assert str(base / "out" / name) in r.stdout and (base / "out" / name).is_file()
    assert "removed" in r.stdout.splitlines()[-1] and "--out" in r.stdout.splitlines()[-1], r.stdout
    kept = tmp_path / "kept"
    r = cli("demo", "--fast", "--no-web", "-q", "--out", kept)
    assert r.returncode == 0, r.stderr
    assert len(list((kept / "lights").glob("*.dng"))) == 6 and (kept / "out" / "session").is_dir()
    assert "removed" not in r.stdout, r.stdout


def test_a_quiet_stack_still_says_it_waits_for_a_plate_solve(night, tmp_path, monkeypatch, capsys):
    """`stack -q` waited silently through a failing blind solve (~46 s on simulator frames): -q leaves out the
    progress bar (README), not the one line saying what the stack waits for."""
    import threading

    from livestack import sky
    from livestack.engine.solve import SolveError

    files, _ = night(n_frames=3, seed=2)

    def start(self, xy, flux, shape, hints, workdir=None):   # a solve that is still running after the last frame
        def run():
            self._cancel.wait(1.0)
            with self._lock:
                self._answer = SolveError("no solution: a test's sky")
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return True

    monkeypatch.setattr(sky.SkySolver, "available", lambda self: None)
    monkeypatch.setattr(sky.SkySolver, "start", start)
    assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "plate solving the reference frame" in err, err
    assert "[█" not in err and "[·" not in err, err        # still no progress bar


def test_a_folder_of_two_targets_says_which_frames_point_elsewhere(tmp_path):
    """An outreach night's folder given to `stack`: M 13, then M 57 (RA/DEC headers 27° apart).  M 57's frames
    were rejected "registration failed: no hypothesis held: …" and nothing said that their own headers put them
    on another target; the summary now does, and says what to do."""
    a = sky_frames(tmp_path, "a", 4, sky_seed=11, pointing=(250.42, 36.46), object="M 13")
    b = sky_frames(tmp_path, "b", 3, sky_seed=22, start="2026-11-25T21:00:00", pointing=(283.40, 33.03),
                   object="M 57")
    r = cli("stack", a[0].parent, "-o", tmp_path / "o", "-q", "--no-solve")
    assert r.returncode == 0, r.stderr
    recs = read_log(tmp_path / "o" / "frames.jsonl")
    assert [d["status"] for d in recs] == ["reference"] + ["stacked"] * 3 + ["rejected"] * 3
    assert "3 frames did not register and point 27.2° from the reference frame: another target — stack each " \
           "target's files apart (`livestack run` makes one stack per target)" in r.stdout, r.stdout
    assert len(b) == 3
    # another field whose headers point within [session] slew_deg (0.5°) of the reference: two galaxies of one
    # group, a mosaic's panel — the headers cannot tell, nothing is said
    near = sky_frames(tmp_path / "near", "n", 2, sky_seed=22, start="2026-11-25T21:00:00",
                      pointing=(250.62, 36.46), object="M 13")
    r = cli("stack", *a, *near, "-o", tmp_path / "o2", "-q", "--no-solve")
    assert [d["status"] for d in read_log(tmp_path / "o2" / "frames.jsonl")][-2:] == ["rejected"] * 2
    assert "another target" not in r.stdout, r.stdout


def test_the_last_frame_writes_stack_fits_as_it_is_stacked_byte_for_byte_as_after_it(night, tmp_path, monkeypatch):
    # `livestack stack` writes stack.fits from the last frame's rows as each block is stacked (the disk works
    # while the frame is added, not after it): the same bytes as the file written after the frame, and no
    # temporary left; where the stream cannot finish (a write error, a header of another length) stack.fits is
    # written as always
    from livestack.engine import outputs, write

    files, _ = night(n_frames=5, seed=21)
    committed = []
    real_commit = write.StreamedFits.commit

    def commit(self, header):
        committed.append(real_commit(self, header))
        return committed[-1]

    monkeypatch.setattr(write.StreamedFits, "commit", commit)
    args = ["-q", "--no-solve"]
    assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "streamed"), *args]) == 0
    assert committed == [True]
    streamed = (tmp_path / "streamed" / "stack.fits").read_bytes()
    committed.clear()

    with monkeypatch.context() as m:
        m.setattr(outputs.FinalStream, "start", classmethod(lambda cls, *a: None))
        assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "after"), *args]) == 0
    assert (tmp_path / "after" / "stack.fits").read_bytes() == streamed
    assert committed == []                       # (no stream this time)

    def failing_put(self, r0, block, weights):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(write.StreamedFits, "put", failing_put)
        assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "failed"), *args]) == 0
    assert committed == []                       # dropped: its rows could not be written
    assert (tmp_path / "failed" / "stack.fits").read_bytes() == streamed

    real_header, real_init, started = outputs.filter_header, outputs.FinalStream.__init__, []

    def longer(engine, fs):             # the final header a 2880-byte block longer than the one kept
        h = real_header(engine, fs)
        if started:
            h.update({f"EXTRA{i}": (i, "") for i in range(36)})
        return h

    def init(self, *a):
        real_init(self, *a)
        started.append(True)

    with monkeypatch.context() as m:
        m.setattr(outputs, "filter_header", longer)
        m.setattr(outputs.FinalStream, "__init__", init)
        assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "longer"), *args]) == 0
    assert committed == [False]
    with fits.open(tmp_path / "longer" / "stack.fits") as f:
        assert "EXTRA35" in f[0].header          # written as always, after the stream was dropped
        np.testing.assert_array_equal(f[0].data, fits.getdata(tmp_path / "streamed" / "stack.fits"))
    for d in ("streamed", "after", "failed", "longer"):
        assert not list((tmp_path / d).glob(".*.tmp")), d


def test_a_final_stream_whose_frame_is_not_the_last_is_dropped(night, tmp_path):
    # Engine.process(final_into=…) on a frame that turns out not to be the last (another frame follows before
    # the snapshot): its stream is dropped, no temporary left, and the snapshot writes every frame
    from livestack.config import Config
    from livestack.engine.pipeline import Engine

    files, _ = night(n_frames=5, seed=22)
    out = tmp_path / "out"
    out.mkdir()
    eng = Engine(Config())
    for f in files[:4]:
        eng.process(f)
    eng.process(files[3], final_into=out)        # (the same file again: a fifth frame)
    assert eng.final_stream is not None and list(out.glob(".stack.fits.*.tmp"))
    eng.process(files[4])
    assert eng.final_stream is None and not list(out.glob(".*.tmp"))
    assert eng.snapshot(out)
    assert fits.getheader(out / "stack.fits")["NCOMBINE"] == 6
    eng.close()


def test_a_plate_solve_ended_before_the_last_frame_still_lets_it_write_stack_fits(night, tmp_path, monkeypatch):
    # `livestack stack` with a solver (the default where astrometry.net is installed): a solve that has ended
    # by the last frame puts its WCS on the grid first, so the last frame writes stack.fits as it is stacked,
    # the WCS in its header — the same bytes as the file written after the frame
    import threading

    from astropy.wcs import WCS

    from livestack import sky
    from livestack.engine import outputs, write
    from livestack.engine.solve import Solution

    files, _ = night(n_frames=5, seed=23)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix, w.wcs.cdelt = [150.0, 20.0], [240.0, 180.0], [-0.0005, 0.0005]

    def start(self, xy, flux, shape, hints, workdir=None):   # a solve that ends at once
        with self._lock:
            self._answer = Solution(w, 0.1, 30, 0.2, 1.8)
        self._thread = threading.Thread(target=lambda: None, daemon=True)
        self._thread.start()
        self._thread.join()
        return True

    monkeypatch.setattr(sky.SkySolver, "available", lambda self: None)
    monkeypatch.setattr(sky.SkySolver, "start", start)
    committed = []
    real_commit = write.StreamedFits.commit
    monkeypatch.setattr(write.StreamedFits, "commit", lambda self, h: committed.append(real_commit(self, h))
                        or committed[-1])
    assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "streamed"), "-q"]) == 0
    assert committed == [True]
    hdr = fits.getheader(tmp_path / "streamed" / "stack.fits")
    assert hdr["CTYPE1"] == "RA---TAN" and hdr["NCOMBINE"] == 5
    with monkeypatch.context() as m:
        m.setattr(outputs.FinalStream, "start", classmethod(lambda cls, *a: None))
        assert main(["stack", str(files[0].parent), "-o", str(tmp_path / "after"), "-q"]) == 0
    assert (tmp_path / "after" / "stack.fits").read_bytes() == (tmp_path / "streamed" / "stack.fits").read_bytes()


def test_the_last_frames_line_is_fsynced_with_the_snapshot_not_before_it(night, tmp_path, monkeypatch):
    # the last frame of `livestack stack` streams stack.fits; its frames.jsonl line is made durable after the
    # snapshot (whose preview is drawn while the disk takes the stream), never left unsynced — a failed
    # snapshot too, whose error is the one said.  The other frames' lines too: one fsync of the whole log, not
    # one a frame on the main thread (a batch cut short by a power loss keeps nothing but its log)
    from livestack.engine import pipeline

    files, _ = night(n_frames=4, seed=24)
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((Path(path).name, os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert main(["stack", str(files[0].parent), "-o", str(out), "-q", "--no-solve"]) == 0
    size = (out / "frames.jsonl").stat().st_size
    assert len(read_log(out / "frames.jsonl")) == 4
    names = [n for n, _ in synced]
    last_log = max(i for i, (n, s) in enumerate(synced) if n == "frames.jsonl" and s == size)
    # (stack.fits is fsynced under its temporary name, before its rename)
    assert any(n.startswith(".stack.fits.") for n in names[:last_log]) and names.count("frames.jsonl") == 1

    def failing(self, out_dir, **kw):
        raise OSError(5, "Input/output error")

    synced.clear()
    monkeypatch.setattr(pipeline.Engine, "snapshot", failing)
    failed = tmp_path / "failed"
    try:
        main(["stack", str(files[0].parent), "-o", str(failed), "-q", "--no-solve"])
    except OSError as err:
        assert err.errno == 5
    size = (failed / "frames.jsonl").stat().st_size
    assert ("frames.jsonl", size) in synced and len(read_log(failed / "frames.jsonl")) == 4
