"""A command the worker is too busy for (a restack of the night, a long frame): what the page's POST and the export
are answered, and what is done after.

The daemon runs with the web's waits for the worker made 1 s (stretch, palette, new session, export), and a
worker held on request: on a frame named held-…, or in a command, for as long as the test likes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, Daemon, capture_folder
from test_web import AUTH, TOKEN, req, wait_status

WAIT_S = 1.0

# gates/hold-<what> held: the worker waits in <what> (frame: a file named held-…; a command: _cmd_stretch …) until
# the file is removed, having touched gates/in-<what>; gates/refuse-<what>: the command is refused when let go;
# gates/ran: one line for each command the worker carried out
BUSY = """\
import functools, pathlib, sys, time
from livestack.daemon import service
from livestack.session import Refused
from livestack.web import app

gates = pathlib.Path(sys.argv[1])
app.COMMAND_S = app.NEW_SESSION_S = app.EXPORT_S = float(sys.argv[2])


def hold(what):
    if (gates / f"hold-{what}").exists():
        (gates / f"in-{what}").touch()
        end = time.monotonic() + 60
        while (gates / f"hold-{what}").exists() and time.monotonic() < end:
            time.sleep(0.02)


def held(name, fn):
    @functools.wraps(fn)
    def run(self, *args, **kw):
        hold(name)
        if (gates / f"refuse-{name}").exists():
            raise Refused(f"refused by the test ({name})", 409)
        with open(gates / "ran", "a") as f:
            f.write(name + "\\n")
        return fn(self, *args, **kw)
    return run


frame = service.Service._frame


def held_frame(self, item):
    if item.rel.startswith("held-"):
        hold("frame")
    return frame(self, item)


service.Service._frame = held_frame
for name in ("_cmd_stretch", "_cmd_palette", "_cmd_new_session", "_cmd_export"):
    setattr(service.Service, name, held(name, getattr(service.Service, name)))
from livestack.cli import main
sys.exit(main(sys.argv[3:]))
"""


def free_port() -> int:
    """A port of 19100–19199 that nothing listens on now."""
    for port in range(19100, 19200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 19100–19199")


@pytest.fixture(scope="module")
def busy(tmp_path_factory, daemon_night):
    files, _ = daemon_night
    root = tmp_path_factory.mktemp("busy")
    d = Daemon(root, capture_folder(root, files), root / "out", "--token", TOKEN)
    d.gates = root / "gates"
    d.gates.mkdir()
    script = root / "busy.py"
    script.write_text(BUSY)
    port = free_port()
    d.runs += 1
    d.log = root / f"daemon-{d.runs}.log"
    with open(d.log, "wb") as err:
        d.proc = subprocess.Popen(
            [sys.executable, str(script), str(d.gates), str(WAIT_S), "run", "--watch", str(d.watch), "--out",
             str(d.out), "--port", str(port), "--config", str(d.config), *d.extra],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=err)
    d.url = d._wait_url()
    wait_status(d, lambda s: s["frames"] == 4 and s["state"] == "idle", timeout=30)
    d.files = iter(files[4:])
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text(), d.log.read_text()


@contextlib.contextmanager
def held(d: Daemon, what: str):
    """The worker held in `what` ("frame": a new frame named held-…, or a command's method name) while inside."""
    gate = d.gates / f"hold-{what}"
    gate.touch()
    (d.gates / f"in-{what}").unlink(missing_ok=True)
    try:
        if what == "frame":
            f = next(d.files)
            shutil.copy(f, d.watch / f"held-{f.name}")
            entered(d, what)
        yield
    finally:
        gate.unlink(missing_ok=True)


def entered(d: Daemon, what: str) -> None:
    end = time.monotonic() + 30
    while not (d.gates / f"in-{what}").exists():
        assert d.proc.poll() is None and time.monotonic() < end, d.log.read_text()
        time.sleep(0.02)


def ran(d: Daemon) -> list[str]:
    p = d.gates / "ran"
    return p.read_text().split() if p.exists() else []


def idle(d: Daemon, frames: int | None = None) -> dict:
    return wait_status(d, lambda s: s["state"] == "idle" and (frames is None or s["frames"] == frames), timeout=30)


def in_thread(fn, *args):
    """fn(*args) in a thread; returns a function that waits for its result."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()

    def result():
        t.join(30)
        assert out, "no answer in 30 s"
        return out[0]
    return result


def export(d: Daemon, query: str = "format=tiff&mode=stretched") -> tuple[int, bytes, dict]:
    return req(d, "GET", f"/api/export?{query}")


COMMANDS = [("POST", "/api/stretch", {"black": 0.01}), ("POST", "/api/palette", {"palette": "RGB"}),
            ("POST", "/api/new-session", {}), ("GET", "/api/export?format=png&mode=linear", None)]


def test_a_command_the_worker_has_not_begun_is_withdrawn(busy):
    """The worker busy past the wait (a restack of the night, a long frame), a stretch, a palette, a new session,
    an export were answered 503 "still running …; the worker is busy, try again" — and carried out later anyway:
    a user who tried again, as told, got two new sessions back to back.  Not begun, they are withdrawn now: the 503
    says nothing was done, and nothing is done after."""
    s0 = idle(busy)
    before = ran(busy)
    with held(busy, "frame"):
        for method, path, body in COMMANDS:
            t0 = time.monotonic()
            st, data, h = req(busy, method, path, body, AUTH)
            err = json.loads(data)["error"]
            assert st == 503 and h.get("Retry-After"), (path, st, data)
            assert "nothing was done" in err and "try again" in err and "still running" not in err, (path, err)
            assert WAIT_S <= time.monotonic() - t0 < WAIT_S + 5
    s = idle(busy, s0["frames"] + 1)
    time.sleep(0.5)                      # (anything still queued would run now, between frames)
    assert ran(busy) == before
    s = idle(busy)
    assert s["stretch"] == s0["stretch"] and s["palette"]["requested"] == s0["palette"]["requested"]
    assert s["session_started"] == s0["session_started"] and s["frames"] == s0["frames"] + 1
    assert not (busy.out / "archive").exists()
    assert s["refused"] is None


def test_an_export_two_requests_wait_for_is_withdrawn_only_when_both_gave_up(busy):
    """Two requests for the same export share it: the first one's wait ending does not withdraw it from under the
    second (whose wait would have ended in an error); the second one's, the last, does."""
    s0 = idle(busy)
    before = ran(busy)
    with held(busy, "frame"):
        first = in_thread(export, busy)
        time.sleep(WAIT_S / 2)
        second = in_thread(export, busy)
        st, data, h = first()
        assert st == 503 and h.get("Retry-After"), data
        err = json.loads(data)["error"]
        assert "nothing was done" not in err and "still running" not in err, err
        assert "is not begun" in err and "another request" in err and "asking again" in err, err
        st, data, _ = second()            # the last one waiting: withdrawn
        assert st == 503, data
        assert "nothing was done" in json.loads(data)["error"], data
    idle(busy, s0["frames"] + 1)
    time.sleep(0.5)
    assert ran(busy) == before


def test_an_export_being_made_when_the_wait_ends_goes_on_and_is_not_made_twice(busy):
    """The export's answer is the image: a 503 still, but saying the export goes on, and asking again while it is
    made shares it — no second 24 MP export in the Pi's memory."""
    idle(busy)
    before = ran(busy)
    with held(busy, "_cmd_export"):
        first = in_thread(export, busy)
        entered(busy, "_cmd_export")
        st, data, h = first()
        assert st == 503 and h.get("Retry-After"), data
        err = json.loads(data)["error"]
        assert "being made" in err and "asking again" in err and "nothing was done" not in err, err
        again = in_thread(export, busy)
        time.sleep(0.3)
    st, data, h = again()
    assert st == 200 and h["Content-Type"] == "image/tiff" and len(data) > 1000, (st, data[:200])
    assert ran(busy)[len(before):] == ["_cmd_export"]


def test_a_command_begun_when_the_wait_ends_is_accepted_and_not_repeated(busy):
    """A stretch, a palette, a new session the worker has begun when the wait ends are done: answered 202 with what
    goes on (a second one would be carried out after it), and their result shows in the status."""
    s0 = idle(busy)
    before = ran(busy)
    with held(busy, "_cmd_stretch"):
        answer = in_thread(req, busy, "POST", "/api/stretch", {"black": 0.02}, AUTH, 30)
        entered(busy, "_cmd_stretch")
        st, data, _ = answer()
    assert st == 202, data
    body = json.loads(data)
    assert body["accepted"] is True and "stretch" in body["message"] and "again" in body["message"], body
    s = wait_status(busy, lambda s: s["stretch"]["black"] == 0.02)
    assert s["refused"] is None

    with held(busy, "_cmd_new_session"):
        answer = in_thread(req, busy, "POST", "/api/new-session", {}, AUTH, 30)
        entered(busy, "_cmd_new_session")
        st, data, _ = answer()
    assert st == 202, data
    assert json.loads(data)["accepted"] is True
    s = wait_status(busy, lambda s: s["frames"] == 0 and s["state"] == "idle")
    assert s["session_started"] != s0["session_started"] and len(list((busy.out / "archive").iterdir())) == 1
    assert ran(busy)[len(before):] == ["_cmd_stretch", "_cmd_new_session"]
    assert s["refused"] is None


def test_a_command_refused_after_its_202_is_in_the_status(busy):
    """Refused by the worker after the 202 (as a new session is, on a full disk): the status says so (`refused`),
    as it does for an exclude answered 202."""
    idle(busy)
    (busy.gates / "refuse-_cmd_palette").touch()
    try:
        with held(busy, "_cmd_palette"):
            answer = in_thread(req, busy, "POST", "/api/palette", {"palette": "RGB"}, AUTH, 30)
            entered(busy, "_cmd_palette")
            st, data, _ = answer()
        assert st == 202, data
        s = wait_status(busy, lambda s: s["refused"] is not None)
    finally:
        (busy.gates / "refuse-_cmd_palette").unlink()
    r = s["refused"]
    assert r["request"] == "palette" and r["error"] == "refused by the test (_cmd_palette)", r
