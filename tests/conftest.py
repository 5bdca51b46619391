"""Shared fixtures: simulated nights with known truth, and the real files of ../shared/data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from drivers.simulator import SimConfig, render_night

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_plate_solving(request, monkeypatch):
    """Simulated skies are no real sky: a blind solve of one costs ~20 s of a core before it fails.  Tests
    not marked `solver` run without the solver (its subprocess daemons get [solve] enabled = false, and
    `livestack stack` --no-solve, from the helpers below)."""
    if request.node.get_closest_marker("solver") is None:
        from livestack.sky import SkySolver

        monkeypatch.setattr(SkySolver, "available", lambda self: "plate solving is off in this test")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real camera files not found at {SHARED_DATA}")
    return SHARED_DATA


def make_night(root: Path, **kw) -> tuple[list[Path], dict]:
    """Render a simulated night into ``root`` and return (files in capture order, truth)."""
    cfg = SimConfig(**{"width": 640, "height": 480, "n_stars": 600, **kw})
    truth = render_night(root, cfg)
    return [root / f["file"] for f in truth["frames"]], truth


def sky_frames(root: Path, key: str, n: int, *, sky_seed: int, start: str = "2026-11-25T20:00:00",
               **kw) -> list[Path]:
    """n mono frames of one field of the sky (``sky_seed``: another seed is another field) from one camera,
    named <key>_NN.fits in root/frames (several fields' frames side by side, as a night of several targets
    leaves them); ``kw``: more SimConfig fields (pointing, object, flip_at …)."""
    import shutil

    cfg = SimConfig(**{"width": 400, "height": 300, "n_frames": n, "mono": True, "seed": 3, "sky_seed": sky_seed,
                       "n_stars": 300, "start": start, **kw})
    src = root / f"src-{key}"
    truth = render_night(src, cfg)
    out = []
    for i, f in enumerate(truth["frames"]):
        dst = root / "frames" / f"{key}_{i:02d}.fits"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src / f["file"], dst)
        out.append(dst)
    return out


@pytest.fixture
def night(tmp_path):
    """night(name, **SimConfig fields) -> (files, truth), rendered under tmp_path/name."""
    def _night(name: str = "lights", **kw):
        return make_night(tmp_path / name, **kw)
    return _night


def truth_matrix(truth: dict, i: int, ref: int = 0) -> np.ndarray:
    """Expected frame i -> reference frame transform: inverse(ref frame_to_sky) ∘ frame_to_sky(i)."""
    from livestack.engine import geometry

    m_i = np.array(truth["frames"][i]["frame_to_sky"])
    m_r = np.array(truth["frames"][ref]["frame_to_sky"])
    return geometry.compose(geometry.invert(m_r), m_i)


def record(engine, files, log=None) -> None:
    """Process ``files`` with ``engine`` and append each record, with its "path" as the daemon writes it, to
    ``log`` (a FramesLog) when given."""
    for f in files:
        rec = engine.process(f)
        if log is not None:
            d = rec.to_dict()
            d["path"] = f.name
            log.append(d)


def through_checkpoints(files, cuts, folder: Path, cfg=None):
    """An Engine that processed ``files`` with a checkpoint written and read back (session.save_engine /
    load_engine) before each index in ``cuts``, as a daemon stopped and restarted there would."""
    from livestack.config import Config
    from livestack.engine.pipeline import Engine
    from livestack.session import load_engine, save_engine

    cfg = cfg or Config()
    eng, start = Engine(cfg), 0
    for k, cut in enumerate([*cuts, len(files)]):
        if k:
            save_engine(eng, folder / f"ckpt{k}.npz")
            eng, _ = load_engine(folder / f"ckpt{k}.npz", cfg)
        for f in files[start:cut]:
            eng.process(f)
        start = cut
    return eng


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def stack_with_cli(folder: Path, out: Path) -> list[dict]:
    """`livestack stack FOLDER -o OUT` as a user runs it; asserts exit 0 and returns frames.jsonl's records."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "livestack.cli", "stack", str(folder), "-o", str(out), "-q",
                        "--no-solve"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return read_log(out / "frames.jsonl")


# ---------------------------------------------------------------- the daemon as a subprocess (test_daemon, test_web)

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAEMON_TOML = """\
[watch]
settle_s = 0.2
timeout_s = {timeout_s}
rescan_s = 1.0
[daemon]
checkpoint_every = {checkpoint_every}
[solve]
enabled = {solve}
"""


class Daemon:
    """`python -m livestack.cli run` on (watch, out); stderr goes to a log file; the page's URL is read from it."""

    def __init__(self, tmp: Path, watch: Path, out: Path, *extra: str, checkpoint_every: int = 3,
                 timeout_s: float = 3.0, solve: bool = False):
        self.tmp, self.watch, self.out, self.extra = Path(tmp), Path(watch), Path(out), extra
        self.config = self.tmp / "livestack.toml"
        self.config.write_text(DAEMON_TOML.format(checkpoint_every=checkpoint_every, timeout_s=timeout_s,
                                                  solve=str(solve).lower()))
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.runs = 0

    def start(self, *more: str, wait_url: bool = True) -> "Daemon":
        self.runs += 1
        self.log = self.tmp / f"daemon-{self.runs}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "livestack.cli", "run", "--watch", str(self.watch), "--out", str(self.out),
                 "--port", "0", "--config", str(self.config), *self.extra, *more],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if wait_url:
            self.url = self._wait_url()
        return self

    def _wait_url(self, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.log.read_text(errors="replace").splitlines():
                if "page at " in line:
                    return line.split("page at ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"daemon printed no URL in {timeout} s:\n{self.log.read_text()}")

    def lines(self) -> list[dict]:
        from livestack.session import read_frames_log

        return read_frames_log(self.out / "frames.jsonl")

    def wait_lines(self, n: int, timeout: float = 30.0) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            recs = self.lines()
            if len(recs) >= n:
                return recs
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"{len(self.lines())} of {n} frames after {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop in {timeout} s:\n{self.log.read_text()}")
        self.proc = None
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def run_through(self, files) -> "Daemon":
        """All ``files`` in the watch folder before the start; run until each is recorded; stop (exit 0)."""
        import shutil

        for f in files:
            shutil.copy(f, self.watch / f.name)
        self.start()
        self.wait_lines(len(files))
        assert self.stop() == 0
        return self

    def feeder(self, files):
        """feed(n, pause=0) copies the next n of ``files`` into the watch folder, as a camera would."""
        import shutil

        it = iter(files)

        def feed(n: int, pause: float = 0.0) -> None:
            for _ in range(n):
                f = next(it)
                shutil.copy(f, self.watch / f.name)
                time.sleep(pause)
        return feed


def capture_folder(root: Path, files: list[Path], n: int = 4) -> Path:
    """root/watch with the first ``n`` of ``files`` copied in: the capture folder a daemon test starts on."""
    watch = root / "watch"
    watch.mkdir(exist_ok=True)
    for f in files[:n]:
        shutil.copy(f, watch / f.name)
    return watch


@pytest.fixture(scope="session")
def daemon_night(tmp_path_factory) -> tuple[list[Path], dict]:
    """16 small DNG frames (480×360, field rotation, frame 5 cloudy) rendered once for the daemon tests."""
    root = tmp_path_factory.mktemp("daemon-night")
    cfg = SimConfig(width=480, height=360, n_frames=16, fmt="dng", seed=5, rotation_deg=0.05, defects={5: "cloudy"})
    truth = render_night(root, cfg)
    return [root / f["file"] for f in truth["frames"]], truth


@pytest.fixture
def make_daemon(tmp_path):
    """make_daemon(*flags, name=, **Daemon kwargs) -> Daemon on tmp_path/name/watch -> …/out; killed at teardown."""
    made: list[Daemon] = []

    def _make(*extra: str, name: str = "run", **kw) -> Daemon:
        root = tmp_path / name
        (root / "watch").mkdir(parents=True, exist_ok=True)
        d = Daemon(root, root / "watch", root / "out", *extra, **kw)
        made.append(d)
        return d

    yield _make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
