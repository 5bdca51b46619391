"""The daemon's page and JSON API: what a browser and a script see, what the server refuses."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from conftest import REPO, Daemon, capture_folder

TOKEN = "test-token-0123"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def web(tmp_path_factory, daemon_night):
    files, _ = daemon_night
    root = tmp_path_factory.mktemp("web")
    d = Daemon(root, capture_folder(root, files), root / "out", "--token", TOKEN)
    d.start()
    d.wait_lines(4)
    wait_status(d, lambda s: s["frames"] == 4 and s["state"] == "idle")
    d.files = files
    yield d
    assert d.stop() == 0


def req(d: Daemon, method: str, path: str, body=None, headers=None, timeout: float = 30) -> tuple[int, bytes, dict]:
    """A raw request: the path is sent exactly as given (no client-side '..' normalisation)."""
    u = urlsplit(d.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers={**h, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        conn.close()


def wait_status(d: Daemon, pred, timeout: float = 15.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = json.loads(req(d, "GET", "/api/status")[1])
        if pred(s):
            return s
        time.sleep(0.05)
    raise AssertionError(f"status never matched: {s}")


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_status_frames_preview(web):
    st, body, _ = req(web, "GET", "/api/status")
    s = json.loads(body)
    assert st == 200 and s["stacked"] == 4 and s["frames"] == 4 and s["has_stack"] and s["integration_s"] == 240
    assert s["current"]["fwhm"] > 1 and s["reference"] == web.files[0].name
    st, body, _ = req(web, "GET", "/api/frames?since=2")
    f = json.loads(body)
    assert st == 200 and f["total"] == 4 and [r["file"] for r in f["frames"]] == [p.name for p in web.files[2:4]]
    st, body, h = req(web, "GET", "/api/preview.jpg")
    assert st == 200 and body[:2] == b"\xff\xd8" and h["Content-Type"] == "image/jpeg"
    st, body, _ = req(web, "GET", "/api/nope")
    assert st == 404 and "no such page" in json.loads(body)["error"]


@pytest.mark.parametrize("path", [
    "/api/files/../../../../etc/passwd",
    "/api/files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/files/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/api/files//etc/passwd",
    "/api/files/%2Fetc%2Fpasswd",
    "/api/files/session/../../../../../etc/passwd",
    "/api/files/..%5c..%5c..%5cetc%5cpasswd",
    "/api/files/link/passwd",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/app.py",
    "/../../../../etc/passwd",
])
def test_no_path_outside_the_session_folder(web, path):
    link = web.out / "link"
    if not link.exists():
        link.symlink_to("/etc")
    st, body, _ = req(web, "GET", path)
    assert st in (403, 404), (path, st)
    assert b"root:" not in body and b"import" not in body
    assert "error" in json.loads(body)


def test_files_inside_the_session_folder_are_served(web):
    st, body, _ = req(web, "GET", "/api/files/frames.jsonl")
    assert st == 200 and len(body.splitlines()) >= 4
    st, body, h = req(web, "GET", "/api/stack.fits")
    assert st == 200 and body.startswith(b"SIMPLE  =") and "attachment" in h["Content-Disposition"]


def test_changes_need_the_token(web):
    st, body, h = req(web, "POST", "/api/pause")
    assert st == 401 and "token" in json.loads(body)["error"] and "Bearer" in h["WWW-Authenticate"]
    st, _, _ = req(web, "POST", "/api/pause", headers={"Authorization": "Bearer wrong-token-xx"})
    assert st == 403
    st, _, _ = req(web, "POST", "/api/exclude", {"file": web.files[1].name})
    assert st == 401
    st, _, _ = req(web, "POST", "/api/new-session")
    assert st == 401
    st, _, _ = req(web, "POST", "/api/pause", headers={**AUTH, "Origin": "http://evil.example"})
    assert st == 403                                   # another site driving the user's browser
    assert json.loads(req(web, "GET", "/api/status")[1])["paused"] is False   # nothing changed

    st, body, _ = req(web, "POST", "/api/pause", headers=AUTH)
    assert st == 200 and json.loads(body)["paused"] is True and json.loads(body)["state"] == "paused"
    st, body, _ = req(web, "POST", "/api/pause", headers=AUTH)
    assert st == 409 and "POST /api/resume" in json.loads(body)["error"]
    st, body, _ = req(web, "POST", "/api/resume", headers={"X-Livestack-Token": TOKEN})
    assert st == 200 and json.loads(body)["paused"] is False
    st, _, _ = req(web, "GET", "/api/pause")
    assert st == 405


def test_stretch_rerenders_the_preview(web):
    import cv2

    def sky(jpg: bytes) -> float:
        return float(np.median(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)))

    auto = sky(req(web, "GET", "/api/preview.jpg")[1])
    st, body, _ = req(web, "POST", "/api/stretch", {"black": 0.001, "midtones": 0.5, "white": 0.6}, AUTH)
    assert st == 200 and json.loads(body)["stretch"] == {"black": 0.001, "midtones": 0.5, "white": 0.6,
                                                         "auto": False}
    dark = sky(req(web, "GET", "/api/preview.jpg")[1])
    st, _, _ = req(web, "POST", "/api/stretch", {"midtones": 0.002}, AUTH)
    bright = sky(req(web, "GET", "/api/preview.jpg")[1])
    # auto puts the sky at 20 % grey (~51); midtones 0.5 leaves it near black, a tiny midtones lifts it
    assert 40 < auto < 65 and dark < auto - 30 and bright > auto + 30, (auto, dark, bright)
    for bad in ({"black": 2}, {"black": 0.5, "white": 0.4}, {"midtones": 0}, {"gamma": 1}):
        st, body, _ = req(web, "POST", "/api/stretch", bad, AUTH)
        assert st == 400 and json.loads(body)["error"], bad
    st, body, _ = req(web, "POST", "/api/stretch", {"auto": True}, AUTH)
    assert st == 200 and json.loads(body)["stretch"]["auto"] is True


def test_exports_are_full_resolution_16_bit(web):
    import cv2
    import tifffile

    st, body, h = req(web, "GET", "/api/export?format=png&mode=stretched")
    assert st == 200 and h["Content-Type"] == "image/png"
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint16 and img.shape == (360, 480, 3) and img.max() > 60000
    st, body, h = req(web, "GET", "/api/export?format=tiff&mode=linear")
    t = tifffile.imread(io.BytesIO(body))
    assert st == 200 and t.dtype == np.uint16 and t.shape == (360, 480, 3) and t.max() == 65535
    assert len(np.unique(t)) > 1000                     # real 16-bit levels, not 8-bit steps
    st, body, _ = req(web, "GET", "/api/export?format=bmp")
    assert st == 400 and "png or tiff" in json.loads(body)["error"]


def test_a_head_of_an_export_makes_no_export(web):
    # HEAD /api/export (a link checker, a download manager asking first): GET's status and headers — the type,
    # the file's name — without the export itself, which costs the worker seconds and ~100 MB at 24 MP (the
    # log says each export made)
    def made() -> int:
        return web.log.read_text(errors="replace").count("livestack: export (")

    before = made()
    st, body, h = req(web, "HEAD", "/api/export?format=tiff&mode=linear")
    assert st == 200 and body == b"" and h["Content-Type"] == "image/tiff"
    assert h["Content-Disposition"] == 'attachment; filename="stack-linear-16bit.tif"'
    assert req(web, "HEAD", "/api/export?format=bmp")[0] == 400
    assert req(web, "GET", "/api/export?format=png&mode=stretched")[0] == 200
    deadline = time.monotonic() + 10
    while made() == before and time.monotonic() < deadline:       # (the log line: after the response)
        time.sleep(0.05)
    assert made() == before + 1


def test_each_filters_file_is_there_to_download(web):
    """Frames without a FILTER: the one stack's file is stack.fits (status said stack_nofilter.fits: a 404)."""
    st, body, _ = req(web, "GET", "/api/status")
    files = [f["file"] for f in json.loads(body)["filters"]]
    assert files == ["stack.fits"]
    st, body, _ = req(web, "GET", f"/api/files/{files[0]}")
    assert st == 200 and body[:6] == b"SIMPLE"


def test_sse_sends_status_on_each_frame(web):
    u = urlsplit(web.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
    try:
        conn.request("GET", "/api/events")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"

        def next_status():
            data = None
            while True:
                line = r.fp.readline().decode()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "\n" and data is not None:
                    return data

        first = next_status()
        n = first["frames"]
        f = web.files[6]
        shutil.copy(f, web.watch / f.name)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            s = next_status()
            if s["frames"] == n + 1 and s["preview_id"] != first["preview_id"]:
                break
        assert s["frames"] == n + 1 and s["current"]["file"] == f.name
    finally:
        conn.close()


def _chromium_or_skip():
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[browser]')")


@contextlib.contextmanager
def chromium_page(url: str, token: str = TOKEN, **page_kw):
    """(page, console errors) of Debian's chromium, driven by Playwright, on ``url`` with ``token`` in its hash."""
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(**page_kw)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "#token=" + token)
            yield page, errors
        finally:
            browser.close()


@pytest.mark.browser
def test_page_in_headless_chromium(web):
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        preview = page.get_by_test_id("preview")
        expect(preview).to_be_visible(timeout=30_000)
        first_id = preview.get_attribute("data-preview-id")
        n = len(web.lines())

        # a frame lands -> the preview changes, pushed by server-sent events
        f = web.files[7]
        shutil.copy(f, web.watch / f.name)
        expect(preview).not_to_have_attribute("data-preview-id", first_id, timeout=30_000)
        expect(page.locator("#frames tbody tr")).to_have_count(n + 1, timeout=30_000)
        assert page.evaluate("document.getElementById('preview').naturalWidth") == 480

        # the plots draw: some pixels of each canvas are painted
        for name in ("fwhm", "stars", "background", "weight", "drift"):
            painted = page.evaluate("""(id) => { const c = document.getElementById(id);
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""", f"plot-{name}")
            assert painted > 500, name

        # controls: pause -> the page says paused; resume
        page.get_by_test_id("pause").click()
        expect(page.get_by_test_id("state")).to_have_text("paused", timeout=5_000)
        assert json.loads(req(web, "GET", "/api/status")[1])["paused"] is True
        page.get_by_test_id("pause").click()
        expect(page.get_by_test_id("state")).not_to_have_text("paused", timeout=5_000)

        # exclude a frame: restacked without it, then re-include it
        row = page.locator(f'#frames tr[data-file="{web.files[2].name}"]')
        stacked = json.loads(req(web, "GET", "/api/status")[1])["stacked"]
        row.get_by_test_id("exclude").click()
        expect(row).to_have_class("excluded", timeout=30_000)
        expect(page.locator("#s-stacked")).to_have_text(str(stacked - 1), timeout=30_000)
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "web-desktop.png"), full_page=True)
        row.get_by_test_id("include").click()
        expect(row).to_have_class("stacked", timeout=30_000)
        expect(page.locator("#s-stacked")).to_have_text(str(stacked), timeout=30_000)

        phone = page.context.browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                              is_mobile=True, has_touch=True)
        phone.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        phone.goto(web.url)
        expect(phone.get_by_test_id("preview")).to_be_visible(timeout=30_000)
        phone.wait_for_timeout(500)
        phone.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=False)
        phone.screenshot(path=str(ARTIFACTS / "web-phone-full.png"), full_page=True)
    assert errors == []


def _frames_in_table(page) -> list[tuple[str, str]]:
    """(file, status) of the rows of the page's frames table, first frame first (the table shows the last on top)."""
    rows = page.evaluate("""() => [...document.querySelectorAll('#frames tbody tr')]
        .map((tr) => [tr.dataset.file, tr.className])""")
    return [tuple(r) for r in reversed(rows)]


@pytest.mark.browser
def test_frames_table_survives_a_restack_during_its_fetch(web):
    """A restack (exclude) lands between the page's `/api/frames?since=k` request and its answer: the answer
    carries the new generation and its records k onward only.  The page must drop it and read the log again from
    0 — not keep those records as the whole list and append records 1… to it later (the first frames missing,
    the last ones twice, for good: the counts match the status so nothing ever fetches again)."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        n = len(web.lines())
        expect(page.locator("#frames tbody tr")).to_have_count(n, timeout=30_000)
        gen = json.loads(req(web, "GET", "/api/status")[1])["generation"]
        # the page's next incremental read of the frames reaches the daemon only when the test lets it go
        page.evaluate("""() => { const real = window.fetch;
            window.fetch = (url, opts) => {
              if (!window.releaseFrames && /\\/api\\/frames\\?since=[1-9]/.test(String(url)))
                return new Promise((resolve) => { window.releaseFrames = () => resolve(real(url, opts)); });
              return real(url, opts);
            }; }""")
        f = web.files[8]
        shutil.copy(f, web.watch / f.name)                 # a frame lands: the page asks for records n onward
        page.wait_for_function("() => !!window.releaseFrames", timeout=30_000)
        st, _, _ = req(web, "POST", "/api/exclude", {"file": web.files[1].name}, AUTH)
        assert st in (200, 202)
        wait_status(web, lambda s: s["generation"] != gen and s["restack"] is None and s["frames"] == n + 1, 30)
        page.evaluate("window.releaseFrames()")          # answered now: generation gen+1, records n onward
        want = [(r.get("path") or r["file"], r["status"])
                for r in json.loads(req(web, "GET", "/api/frames?since=0")[1])["frames"]]
        assert len(want) == n + 1 and want[1] == (web.files[1].name, "excluded")
        end = time.monotonic() + 10
        while _frames_in_table(page) != want and time.monotonic() < end:
            time.sleep(0.1)
        got = _frames_in_table(page)
        assert got == want, f"table {[f for f, _ in got]} != log {[f for f, _ in want]}"
        assert page.locator("#frames-count").text_content() == f"({n + 1})"

        st, _, _ = req(web, "POST", "/api/include", {"file": web.files[1].name}, AUTH)
        assert st in (200, 202)
        wait_status(web, lambda s: s["restack"] is None and s["excluded"] == 0, 30)
    assert errors == []


@pytest.mark.browser
def test_sliders_follow_the_daemon_after_a_failed_stretch_post(web):
    """A stretch POST that fails at the network level (Wi-Fi drop, daemon restarting) must not leave the page
    thinking the user is still on a slider: the sliders follow the daemon's stretch again afterwards, and the
    failure is said on the page rather than thrown into nowhere."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        expect(page.locator("#o-black")).to_have_text("auto")
        # the next POST /api/stretch is refused by the network, as fetch does when the daemon is not there
        page.evaluate("""() => { const real = window.fetch;
            window.fetch = (url, opts) => {
              if (!window.stretchFailed && String(url) === '/api/stretch') {
                window.stretchFailed = true;
                return Promise.reject(new TypeError('Failed to fetch'));
              }
              return real(url, opts);
            }; }""")
        page.eval_on_selector("#st-black", "el => { el.value = '0.04'; el.dispatchEvent(new Event('input')); }")
        expect(page.locator("#o-black")).to_have_text("0.04")
        page.wait_for_function("() => window.stretchFailed", timeout=5_000)
        page.wait_for_timeout(200)
        # another phone (or curl) sets the stretch: the status pushed to the page must move the slider
        st, _, _ = req(web, "POST", "/api/stretch", {"black": 0.01}, AUTH)
        assert st == 200
        expect(page.locator("#o-black")).to_have_text("0.01", timeout=10_000)
        assert page.eval_on_selector("#st-black", "el => Number(el.value)") == 0.01
        expect(page.locator("#s-message")).to_contain_text("Failed to fetch")
        expect(page.locator("#s-message")).to_have_class("note error")

        # and the page's own next drag goes through
        page.eval_on_selector("#st-black", "el => { el.value = '0.02'; el.dispatchEvent(new Event('input')); }")
        wait_status(web, lambda s: s["stretch"]["black"] == 0.02)
        st, _, _ = req(web, "POST", "/api/stretch", {"auto": True}, AUTH)
        assert st == 200
        expect(page.locator("#o-black")).to_have_text("auto", timeout=10_000)
    assert errors == []


def _refuse_excludes(page) -> None:
    """The page's POST /api/exclude answered 409, as while a new stack is made."""
    page.evaluate("""() => { const real = window.fetch;
        window.fetch = (url, opts) => String(url) === '/api/exclude'
          ? Promise.resolve(new Response(JSON.stringify({error: 'a new stack is being made; try again'}),
                                         {status: 409, headers: {'Content-Type': 'application/json'}}))
          : real(url, opts); }""")


def test_a_refused_exclude_leaves_its_button_usable(web):
    """An exclude the daemon refuses (409, 503) or that gets no answer said why, but its button stayed disabled
    until the frames list was redrawn."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        _refuse_excludes(page)
        button = page.get_by_test_id("exclude").first
        button.click()
        expect(page.locator("#s-message")).to_contain_text("a new stack is being made")
        expect(button).to_be_enabled()
    assert errors == []


@pytest.mark.browser
def test_an_exclude_refused_after_its_202_is_said_on_the_page(web):
    """An exclude answered 202 "restacking" (the worker busy past 2 s) and refused after, by the worker: the page
    said "restacking", then nothing — the refusal was in the daemon's log only — and the button stayed disabled.
    The status's `refused` is said where the answer to a tap is, once, and the button is usable again; one from
    before the page was opened is not said."""
    from playwright.sync_api import expect

    refused = {"id": 41, "request": "exclude light_0002_60s.dng", "time": "2026-11-25T21:03:12+00:00",
               "error": "1 frame of the stack is no longer in the capture folder /w (light_0001_60s.dng): restacked, "
                        "it would be lost; the stack is kept as it is — put the files back, then exclude or include"}
    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        page.evaluate("""() => { const real = window.fetch;
            window.fetch = (url, opts) => String(url) === '/api/exclude'
              ? Promise.resolve(new Response(JSON.stringify({accepted: true,
                    message: 'restacking; progress in /api/status (restack)'}),
                    {status: 202, headers: {'Content-Type': 'application/json'}}))
              : real(url, opts); }""")
        button = page.get_by_test_id("exclude").first
        button.click()
        note = page.locator("#s-message")
        expect(note).to_have_text("restacking; progress in /api/status (restack)")
        expect(button).to_be_disabled()                 # accepted: the restack's new list redraws it

        page.evaluate("(r) => showStatus({...state.status, refused: r})", refused)
        expect(note).to_have_text(f"exclude light_0002_60s.dng refused: {refused['error']}")
        expect(note).to_have_class("note error")
        expect(page.get_by_test_id("exclude").first).to_be_enabled()
        note.click()
        expect(note).to_be_empty()
        page.evaluate("(r) => showStatus({...state.status, refused: r})", refused)      # the same one again
        page.wait_for_timeout(300)
        expect(note).to_be_empty()
        page.evaluate("(r) => showStatus({...state.status, refused: r})", {**refused, "id": 42})
        expect(note).to_contain_text("exclude light_0002_60s.dng refused: ")

        page.reload()                                   # opened after it: an old refusal is not news
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        page.evaluate("(r) => { state.refusedId = undefined; showStatus({...state.status, refused: r}); }",
                      {**refused, "id": 43})
        page.wait_for_timeout(300)
        expect(note).to_be_empty()
    assert errors == []


@pytest.mark.browser
def test_a_change_answered_202_is_said_on_the_page(web):
    """A stretch, a palette, a new stack the worker began late (busy with a restack) are answered 202 with what goes
    on, not the status: the page took that answer for the status and drew it (a page error, the sliders and the
    caption emptied).  It says the message where the answer to a tap is, and keeps showing the daemon's status;
    a refusal that comes later is said as an exclude's is (the status's `refused`)."""
    from playwright.sync_api import expect

    accepted = {"accepted": True, "message": "the stretch is under way (the worker, busy, began it late) and takes "
                                             "effect when it is done"}
    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        page.evaluate("""(body) => { const real = window.fetch;
            window.fetch = (url, opts) => ['/api/stretch', '/api/palette', '/api/new-session'].includes(String(url))
              ? Promise.resolve(new Response(JSON.stringify(body),
                    {status: 202, headers: {'Content-Type': 'application/json'}}))
              : real(url, opts); }""", accepted)
        caption = page.get_by_test_id("caption").inner_text()
        note = page.locator("#s-message")
        page.click("#st-auto")
        expect(note).to_have_text(accepted["message"])
        page.eval_on_selector("#st-black", "el => { el.value = '0.04'; el.dispatchEvent(new Event('input')); }")
        page.wait_for_timeout(600)                      # (the slider's POST is sent 250 ms after the last move)
        expect(note).to_have_text(accepted["message"])
        page.evaluate("() => choosePalette('SHO')")      # (one filter in this night: no palette to choose on the page)
        page.wait_for_timeout(300)
        expect(note).to_have_text(accepted["message"])
        page.get_by_test_id("new-session").click()
        page.get_by_test_id("ask-ok").click()
        expect(note).to_have_text(accepted["message"])  # not "new stack started": it is not, yet
        expect(page.get_by_test_id("caption")).to_have_text(caption)
        expect(page.get_by_test_id("state")).not_to_have_text("")
        page.evaluate("(r) => showStatus({...state.status, refused: r})",
                      {"id": 7, "request": "new session", "time": "2026-11-25T21:03:12+00:00",
                       "error": "disk full: stack.fits, 12 MB needed: the current stack is not saved yet"})
        expect(note).to_have_text("new session refused: disk full: stack.fits, 12 MB needed: the current stack is "
                                  "not saved yet")
    assert errors == []


@pytest.mark.browser
def test_a_refused_exclude_says_why_where_the_finger_is(web):
    """On a phone the answer to a tap — a refused exclude (409 while a new stack is made, 503 while stopping) —
    was written in the status panel, far above the frames' buttons: the user tapped, the button came back, and
    nothing said why.  The answer shows at the foot of the screen, and goes away (by itself or when tapped)."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        expect(page.get_by_test_id("state")).not_to_have_text("connecting…", timeout=30_000)
        _refuse_excludes(page)
        button = page.get_by_test_id("exclude").first
        button.scroll_into_view_if_needed()
        button.tap()
        note = page.locator("#s-message")
        expect(note).to_contain_text("a new stack is being made")
        expect(note).to_be_in_viewport()
        n = note.bounding_box()
        assert n["y"] + n["height"] <= 844 and n["x"] >= 0 and n["x"] + n["width"] <= 390, n
        note.tap()
        expect(note).to_be_empty()
    assert [e for e in errors if "409" not in e] == []


ODD_TOKEN = "50%sure&more-token"


@pytest.mark.browser
@pytest.mark.parametrize("in_hash", [
    ODD_TOKEN,                                   # as typed: a raw '%' (not an escape) and a raw '&'
    quote(ODD_TOKEN, safe=""),                   # URL-encoded: 50%25sure%26more-token
    "50%25sure&more-token",                      # '%' encoded, '&' raw
])
def test_a_token_with_percent_and_ampersand_in_the_hash(make_daemon, in_hash):
    """`/#token=<token>` takes the rest of the hash, URL-decoded when it decodes: a '%' that is no escape
    stopped the whole script (decodeURIComponent: URI malformed), and an '&' cut the token short."""
    from playwright.sync_api import expect

    d = make_daemon("--token", ODD_TOKEN, name="odd-token").start()
    with chromium_page(d.url, token=in_hash) as (page, errors):
        sent: list[str | None] = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if r.method == "POST" else None)
        expect(page.locator("#conn")).to_have_class("dot on", timeout=15_000)     # the script ran and connected
        expect(page.get_by_test_id("state")).to_have_text("idle")
        assert page.evaluate("localStorage.getItem('livestack-token')") == ODD_TOKEN
        assert page.evaluate("location.hash") == ""                                  # not left in the address bar
        page.get_by_test_id("pause").click()
        expect(page.get_by_test_id("state")).to_have_text("paused", timeout=5_000)
        assert sent == [f"Bearer {ODD_TOKEN}"]
    assert errors == []
    assert d.stop() == 0


def _stream_then(web, then):
    """A route for /api/events: the first request gets one status event and the stream ends (retry in 0.3 s),
    every later one ``then(route)``."""
    status = req(web, "GET", "/api/status")[1].decode()
    calls = []

    def events(route):
        calls.append(1)
        if len(calls) == 1:
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                          body=f"retry: 300\n\nevent: status\ndata: {status}\n\n")
        else:
            then(route)
    return events


@pytest.mark.browser
def test_the_page_comes_back_after_its_event_stream_got_an_http_error(web):
    """An EventSource that gets an HTTP error (a reverse proxy's 502 while the daemon restarts, the 503 of too
    many connections) is closed for good: the browser retries network errors only.  The page said "offline"
    until the visitor reloaded it, however long the daemon had been back.  Now it connects again."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.locator("#conn")).to_have_class("dot on", timeout=15_000)
        # a stream that ends (a proxy's timeout, a restart): the browser reconnects, and meets the proxy's 502
        # while the daemon is not back yet
        page.route("**/api/events", _stream_then(web, lambda route: route.fulfill(
            status=502, headers={"Content-Type": "text/html"}, body="<h1>502 Bad Gateway</h1>")))
        page.reload()                # the page's stream, now through the route
        page.wait_for_function("() => typeof state === 'object' && state.es && state.es.readyState === 2",
                               timeout=10_000)
        expect(page.get_by_test_id("state")).to_have_text("offline")
        page.unroute("**/api/events")                  # the daemon is back
        expect(page.locator("#conn")).to_have_class("dot on", timeout=15_000)
        st, _, _ = req(web, "POST", "/api/pause", None, AUTH)
        assert st == 200
        try:
            expect(page.get_by_test_id("state")).to_have_text("paused", timeout=10_000)
        finally:
            assert req(web, "POST", "/api/resume", None, AUTH)[0] == 200
    assert [e for e in errors if "502" not in e] == []


def test_a_restarted_daemon_does_not_reuse_the_preview_ids_of_its_last_run(make_daemon, daemon_night):
    """The page loads the preview when `preview_id` differs from the one it shows.  Counted from 0 at each start,
    a restarted daemon gave its previews the ids of the last run's: a page open across the restart (frames
    captured meanwhile, stacked at the start) saw the id it had, and kept the old run's image — 4 frames on
    screen under a caption of 7, until the next frame."""
    files, _ = daemon_night
    d = make_daemon(name="preview-ids")
    for f in files[:4]:
        shutil.copy(f, d.watch / f.name)
    d.start()
    d.wait_lines(4)
    before = wait_status(d, lambda s: s["frames"] == 4 and s["state"] == "idle" and s["has_stack"])["preview_id"]
    assert d.stop() == 0
    time.sleep(0.01)
    d.start()
    after = wait_status(d, lambda s: s["state"] == "idle" and s["has_stack"])["preview_id"]
    assert after > before
    assert d.stop() == 0


@pytest.mark.browser
def test_the_page_says_offline_while_the_daemon_is_down(web):
    """A stream lost to a network error (the daemon restarting: connection refused) is retried by the browser
    itself, its EventSource 'connecting', never closed: the page said offline only for a closed one, and went on
    showing the last state ("processing", "idle") and its numbers as live for as long as the daemon was down."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        expect(page.locator("#conn")).to_have_class("dot on", timeout=15_000)
        # the stream of the daemon that is about to stop, then nobody listens on the port
        page.route("**/api/events", _stream_then(web, lambda route: route.abort("connectionrefused")))
        page.reload()
        page.wait_for_function("() => state.es && state.es.readyState === 0 && !$('conn').classList.contains('on')",
                               timeout=10_000)
        expect(page.get_by_test_id("state")).to_have_text("offline", timeout=5_000)
        page.unroute("**/api/events")                  # the daemon is back
        expect(page.locator("#conn")).to_have_class("dot on", timeout=15_000)
        expect(page.get_by_test_id("state")).not_to_have_text("offline")
    assert [e for e in errors if "ERR_CONNECTION_REFUSED" not in e and "ERR_FAILED" not in e] == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 360, 900, 1024, 1400, 1920])
def test_the_status_numbers_are_whole_on_a_phone(web, width):
    """The status tiles cut what does not fit with an ellipsis: on a 390 px phone the integration of most of a
    night's first hour ("16 m 00 s") read "16 m 0…", on a 360 px one even "2 h 15 m" was cut; and on a laptop,
    where the tiles sit in the column beside the preview, "23 m 00 s" read "23 m 0…" at 1400 px and 1920 px."""
    phone = width < 520
    with chromium_page(web.url, viewport={"width": width, "height": 844 if phone else 900},
                       device_scale_factor=2 if phone else 1, is_mobile=phone, has_touch=phone) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        for s in (959, 3599, 8100, 36300):          # 15 m 59 s, 59 m 59 s, 2 h 15 m, 10 h 05 m
            cut = page.evaluate("""(s) => { showStatus({...state.status, integration_s: s, last_frame_time:
                    "2026-11-25T23:59:58"});
                return [...document.querySelectorAll('.stat b')].filter((b) => b.scrollWidth > b.clientWidth)
                    .map((b) => b.textContent); }""", s)
            assert cut == [], (s, cut)
    assert errors == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [360, 390, 660, 768])
def test_a_phone_sees_why_a_frame_was_rejected_and_reaches_exclude(web, width):
    """On a phone the Frames table was wider than its panel: the `reason` column and the *exclude* buttons were
    off the right edge, reached only by scrolling the table sideways (which nothing tells), while the hint above
    it says "Tap exclude …".  Each frame is a card there: the reason under the file name, the button beside it,
    nothing to scroll sideways; a wide screen keeps the table with its column heads."""
    from playwright.sync_api import expect

    reason = "stars 10 < 0.5 × running median 42 (clouds?)"
    inject = """(reason) => { state.frames.push({file: "2026-11-25_21-03-12_L_-10.00_120.00s_0042.fits",
        path: "rejected-by-the-test.fits", status: "rejected", filter: "L", fwhm: 3.52, stars: 10, weight: null,
        reason}); renderTable(); }"""
    with chromium_page(web.url, viewport={"width": width, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        expect(page.locator("#frames tbody tr")).to_have_count(len(web.lines()), timeout=30_000)
        page.evaluate(inject, reason)
        wrap = page.locator("#frames").locator("xpath=..")          # the panel's scroll box
        box = wrap.bounding_box()
        assert page.evaluate("(w) => w.scrollWidth <= w.clientWidth", wrap.element_handle()), "scrolls sideways"
        row = page.locator('#frames tr[data-file="rejected-by-the-test.fits"]')
        cell = row.locator("td.reason")
        expect(cell).to_have_text(reason)
        expect(cell).to_be_visible()
        c = cell.bounding_box()
        assert box["x"] <= c["x"] and c["x"] + c["width"] <= box["x"] + box["width"] + 0.5, (c, box)
        assert page.evaluate("(td) => td.scrollWidth <= td.clientWidth", cell.element_handle()), "reason cut"
        expect(row.get_by_test_id("exclude")).to_have_count(0)      # not in the stack: nothing to exclude
        b = page.locator(f'#frames tr[data-file="{web.files[1].name}"]').get_by_test_id("exclude").bounding_box()
        assert box["x"] <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"] + 0.5, (b, box)
        assert b["height"] >= 40, b                    # a fingertip's target
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(ARTIFACTS / f"web-frames-phone-{width}.png"), full_page=True)

        for wide in (960, 1280):                       # a wide screen: the table, as it was
            page.set_viewport_size({"width": wide, "height": 900})
            expect(page.locator("#frames thead")).to_be_visible()
            assert page.evaluate("getComputedStyle(document.querySelector('#frames td.reason')).display") \
                == "table-cell"
            # each file name on one line (the cards' break points are not the table's)
            lines = page.evaluate("""() => [...document.querySelectorAll('#frames td.file')].map((td) => {
                const r = document.createRange(); r.selectNodeContents(td);
                const tops = [...r.getClientRects()].filter((q) => q.width).map((q) => Math.round(q.top));
                return new Set(tops).size; })""")
            assert max(lines) == 1, (wide, lines)
            assert page.evaluate("(w) => w.scrollWidth <= w.clientWidth", wrap.element_handle())
    assert errors == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [360, 412, 430, 480, 560, 1280])
def test_the_page_does_not_jump_when_the_state_changes(web, width):
    """The bar wrapped its buttons to a second row when the state's word did not leave them room: on 412 and
    430 px phones (410–530 px) "idle" fitted and "processing" did not, so each frame pushed the whole page 32 px
    down and pulled it back up under the user's finger.  Whatever the state says, the page stays put."""
    from playwright.sync_api import expect

    phone = width < 900
    with chromium_page(web.url, viewport={"width": width, "height": 844}, device_scale_factor=2 if phone else 1,
                       is_mobile=phone, has_touch=phone) as (page, errors):
        expect(page.get_by_test_id("preview")).to_be_visible(timeout=30_000)
        tops = page.evaluate("""() => [
              {state: "idle"}, {state: "processing", processing: "IMG_0042.dng"}, {state: "paused", paused: true},
              {state: "restacking", restack: {done: 118, total: 240}},
              {state: "restacking", restack: {done: 1180, total: 2400}}, {state: "stopping"}, {state: "idle"},
            ].map((change) => {
              showStatus({...state.status, paused: false, restack: null, processing: null, ...change});
              const y = (sel) => document.querySelector(sel).getBoundingClientRect().top + window.scrollY;
              return [document.querySelector("header.bar").offsetHeight, y(".status"), y("#frames")];
            })""")
        assert all(t == tops[0] for t in tops), tops
        # the bar's buttons and state whole, inside the screen
        for sel in ("#pause", "#newstack", "#night", "#state"):
            b = page.locator(sel).bounding_box()
            assert b["x"] >= 0 and b["x"] + b["width"] <= width, (sel, b)
    assert errors == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1280])
def test_the_frame_row_under_the_finger_stays_put_when_a_frame_lands(web, width):
    """The Frames table shows the newest frame on top and was rebuilt with each frame: scrolled down to a frame
    to read its reason or exclude it, the user saw the rows move down one row (88 px on a phone) when the next
    frame landed — the *exclude* under the finger became another frame's.  Scrolled into the table, the rows in
    sight stay put; at its top the newest row still appears there."""
    from playwright.sync_api import expect

    phone = width < 900
    with chromium_page(web.url, viewport={"width": width, "height": 844}, device_scale_factor=2 if phone else 1,
                       is_mobile=phone, has_touch=phone) as (page, errors):
        expect(page.locator("#frames tbody tr")).to_have_count(len(web.lines()), timeout=30_000)
        add = """(n) => { const last = state.frames[state.frames.length - 1];
            for (let i = 0; i < n; i++) {
              const k = state.frames.length;
              state.frames.push({...last, file: `landed_${k}.fits`, path: `landed_${k}.fits`});
            }
            renderTable(); }"""
        page.evaluate(add, 20)                         # a table long enough to scroll inside its panel
        where = """(file) => document.querySelector(`#frames tr[data-file="${file}"]`).getBoundingClientRect().top"""
        page.evaluate("""() => { const wrap = document.getElementById('frames').parentElement;
            wrap.scrollIntoView(); wrap.scrollTop = document.querySelector('#frames tbody tr:nth-child(8)').offsetTop
              - document.querySelector('#frames tbody tr:nth-child(1)').offsetTop; }""")
        target = page.evaluate("() => document.querySelector('#frames tbody tr:nth-child(8)').dataset.file")
        before = page.evaluate(where, target)
        page.evaluate(add, 1)                          # a frame lands
        assert abs(page.evaluate(where, target) - before) <= 1, (before, page.evaluate(where, target))

        page.evaluate("() => { document.getElementById('frames').parentElement.scrollTop = 0; }")
        page.evaluate(add, 1)                          # at the top: the newest on top, in sight
        newest = page.evaluate("() => state.frames[state.frames.length - 1].path")
        assert page.evaluate("() => document.querySelector('#frames tbody tr').dataset.file") == newest
        assert page.evaluate("() => document.getElementById('frames').parentElement.scrollTop") == 0
    assert errors == []


def _not_red(png: bytes) -> int:
    """Pixels of a screenshot that are not a shade of red: green or blue above 40 and above 0.45 × red (the
    Night palette's dimmest and brightest reds pass; grey, white, blue do not)."""
    import cv2

    im = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(int)
    gb = np.maximum(im[..., 0], im[..., 1])
    return int(((gb > 40) & (gb > 0.45 * im[..., 2])).sum())


@pytest.mark.browser
def test_night_mode_sliders_are_red(web):
    """Night mode keeps the user's dark adaptation: everything red.  The stretch (and weight) sliders kept the
    browser's own track, a grey bar with a light grey rim (accent-color tints only the part left of the thumb):
    three grey-white bars on the red page."""
    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.click("#night")
        page.wait_for_timeout(200)
        for sid in ("st-black", "st-mid", "st-white"):
            assert _not_red(page.locator(f"#{sid}").screenshot()) == 0, sid
    assert errors == []


@pytest.mark.browser
def test_night_mode_selected_text_is_red(web):
    """A long press on a file name or a reason (to copy it) selected it in the browser's colours: white text on
    a blue band, on the red page at night."""
    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.click("#night")
        page.evaluate("""() => { const r = document.createRange();
            r.selectNodeContents(document.querySelector('.status'));
            getSelection().removeAllRanges(); getSelection().addRange(r); }""")
        page.wait_for_timeout(100)
        assert _not_red(page.locator(".status").screenshot()) == 0
    assert errors == []


@pytest.mark.browser
def test_night_mode_shows_the_preview_in_red_light_only(web):
    """Night mode's tint of the preview (grayscale, sepia, saturate, hue-rotate) left its stars and bright
    nebula a pale beige, (178, 161, 135): the brightest and least red light on the screen.  The preview's
    luminance now goes to the red channel alone."""
    from playwright.sync_api import expect

    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        preview = page.get_by_test_id("preview")
        expect(preview).to_be_visible(timeout=30_000)
        page.click("#night")
        page.wait_for_timeout(200)
        assert _not_red(preview.screenshot()) == 0
    assert errors == []


@pytest.mark.browser
def test_night_mode_from_the_first_paint(web):
    """Night mode is remembered (localStorage) and was applied by app.js, the page's last element: a reload at
    the telescope drew the page in its day colours (near-white text, blue sliders) until app.js arrived — on a
    Pi's weak Wi-Fi, seconds of it."""
    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.click("#night")
        held = []
        page.route("**/static/app.js", lambda route: held.append(route))   # app.js on its way, slowly
        page.goto(web.url, wait_until="commit")
        page.wait_for_function("() => !!document.getElementById('paths')", timeout=10_000)
        page.wait_for_timeout(300)
        assert held and _not_red(page.screenshot()) == 0
        for r in held:
            r.continue_()
        page.wait_for_selector("#conn.on", timeout=15_000)
        assert page.evaluate("document.body.classList.contains('night')")
    assert errors == []


@pytest.mark.browser
def test_night_mode_darkens_the_browsers_own_toolbar(web):
    """A phone browser draws its toolbar (and the status bar above it) in the page's theme-color, else in its
    own white or grey: a bright band above the red page at night.  The page names its colour, black at night."""
    theme = "() => document.querySelector('meta[name=\"theme-color\"]')?.content ?? null"
    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        assert page.evaluate(theme) == "#0b0e13"        # the page's --bg
        page.click("#night")
        assert page.evaluate(theme) == "#000"
        page.reload()
        page.wait_for_selector("#conn.on", timeout=15_000)
        assert page.evaluate(theme) == "#000"
        page.click("#night")
        assert page.evaluate(theme) == "#0b0e13"
    assert errors == []


@pytest.mark.browser
def test_the_pages_questions_are_its_own_and_red_at_night(web):
    """*New stack* asked with the browser's confirm() and the token with prompt(): boxes in the browser's own
    white or grey, whatever Night mode says — a bright box in the dark at the moment the user acts.  The page asks
    in its own dialog now, red at night; Cancel does nothing, the token typed there is used."""
    from playwright.sync_api import expect

    native: list[str] = []
    with chromium_page(web.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True) as (page, errors):
        page.on("dialog", lambda d: (native.append(d.message), d.dismiss()))
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.click("#night")
        before = json.loads(req(web, "GET", "/api/status")[1])
        page.get_by_test_id("new-session").tap()
        ask = page.get_by_test_id("ask")
        expect(ask).to_be_visible()
        expect(ask).to_contain_text("Archive this stack and start a new one?")
        assert _not_red(ask.screenshot()) == 0
        ask.get_by_role("button", name="Cancel").tap()
        expect(ask).to_be_hidden()
        after = json.loads(req(web, "GET", "/api/status")[1])
        assert (after["session_started"], after["stacked"]) == (before["session_started"], before["stacked"])

        page.evaluate("localStorage.removeItem('livestack-token')")      # a phone that never had the token
        page.get_by_test_id("pause").tap()
        expect(ask).to_be_visible()
        expect(ask).to_contain_text("needs its token")
        assert _not_red(ask.screenshot()) == 0
        page.locator("#ask-input").fill(TOKEN)
        page.get_by_test_id("ask-ok").tap()
        expect(page.get_by_test_id("state")).to_have_text("paused", timeout=5_000)
        page.get_by_test_id("pause").tap()                              # the token kept: no question
        expect(page.get_by_test_id("state")).not_to_have_text("paused", timeout=5_000)
        expect(ask).to_be_hidden()
    assert native == []
    assert [e for e in errors if "401 (Unauthorized)" not in e] == []   # the POST without the token, logged


@pytest.mark.browser
@pytest.mark.parametrize("size", [(844, 390), (780, 360), (390, 844), (1280, 800)])
def test_the_whole_preview_fits_the_screen(web, size):
    """*fit* fitted the width only: a phone turned sideways (844×390) showed the top half of the stack, its
    lower half and the caption a scroll away.  The whole preview is in sight under the bar, with its caption."""
    from playwright.sync_api import expect

    w, h = size
    phone = w < 900
    with chromium_page(web.url, viewport={"width": w, "height": h}, device_scale_factor=2 if phone else 1,
                       is_mobile=phone, has_touch=phone) as (page, errors):
        preview = page.get_by_test_id("preview")
        expect(preview).to_be_visible(timeout=30_000)
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
        under = page.evaluate("document.querySelector('header.bar').getBoundingClientRect().bottom")
        img = preview.bounding_box()
        caption = page.locator(".viewer-bar").bounding_box()
        assert img["y"] >= under - 1 and caption["y"] + caption["height"] <= h + 1, (img, caption, under)
        if w == 390:                                 # a phone upright: the image as wide as the page lets it
            assert img["width"] >= page.locator(".viewer").bounding_box()["width"] - 1
    assert errors == []


@pytest.mark.browser
def test_the_pages_own_export_link_still_downloads(web):
    """Exports are refused to another site's page (Sec-Fetch-Site): the page's own links are same-origin."""
    with chromium_page(web.url, viewport={"width": 1280, "height": 900}) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        with page.expect_download(timeout=30_000) as dl:
            page.eval_on_selector('a[href="/api/export?format=png&mode=stretched"]', "a => a.click()")
        path = dl.value.path()
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []


# a daemon whose start() takes as long as the test likes: its session's resume (the checkpoint's load — ~0.5 GB
# for a 24 MP colour stack: 0.7 s from the page cache, ~10 s cold from a Pi's SD card) waits for a file
HELD_START = """\
import pathlib, sys, time
from livestack import session

entered, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
resume = session.SessionFolder.resume

def held_resume(self, *args, **kw):
    entered.touch()
    end = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < end:
        time.sleep(0.02)
    return resume(self, *args, **kw)

session.SessionFolder.resume = held_resume
from livestack.cli import main
sys.exit(main(sys.argv[3:]))
"""


def start_held(d: Daemon, *more: str, held: str = HELD_START, entered: bool = True) -> Path:
    """Start `d` with its resume held until the returned file exists; return once start() is in it.  The port is
    chosen here: the page's address is logged once the start is done.  (``held``: another script of that kind,
    holding something else; ``entered=False``: return at once, not waiting for it to be held.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    held_now, gate = d.tmp / "entered", d.tmp / "gate"
    held_now.unlink(missing_ok=True)
    gate.unlink(missing_ok=True)
    script = d.tmp / "held_start.py"
    script.write_text(held)
    d.runs += 1
    d.log = d.tmp / f"daemon-{d.runs}.log"
    with open(d.log, "wb") as err:
        d.proc = subprocess.Popen(
            [sys.executable, str(script), str(held_now), str(gate), "run", "--watch", str(d.watch), "--out",
             str(d.out), "--port", str(port), "--config", str(d.config), *d.extra, *more],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=err)
    d.url = f"http://127.0.0.1:{port}/"
    if entered:
        wait_held(d)
    return gate


def wait_held(d: Daemon) -> None:
    """Until what start_held's script holds is held."""
    end = time.monotonic() + 30
    while not (d.tmp / "entered").exists():
        assert d.proc.poll() is None and time.monotonic() < end, d.log.read_text()
        time.sleep(0.02)


def test_the_page_answers_while_the_daemon_loads_its_stack(make_daemon, daemon_night):
    """The page was served only once start() had returned — after the checkpoint's load (~10 s for a 24 MP
    colour stack read cold from a Pi's SD card), the rescans and the target book: a user who reloaded the page
    after a restart (a crash under systemd, the Pi rebooted) met a page that hung.  It answers at once now: the
    page, and a status that says the stack is being loaded; what needs the session answers 503 with the sentence,
    until the start is done — then everything as before."""
    files, _ = daemon_night
    d = make_daemon(name="slow-start")
    d.run_through(files[:3])                       # a checkpoint (every 3 frames) to resume from
    gate = start_held(d)
    try:
        st, body, h = req(d, "GET", "/api/status", timeout=5)
        s = json.loads(body)
        assert st == 200 and s["state"] == "starting" and s["paused"] is None
        assert "loading the stack" in s["starting"] and "checkpoint.npz" in s["starting"]
        assert s["stacked"] is None and s["frames"] is None and not s["has_stack"]   # not known yet: not 0
        assert s["watch"] == str(d.watch.resolve()) and s["out"] == str(d.out.resolve())
        st, body, h = req(d, "GET", "/", timeout=5)
        assert st == 200 and h["Content-Type"].startswith("text/html")
        for method, path in (("GET", "/api/frames"), ("GET", "/api/preview.jpg"), ("GET", "/api/targets"),
                             ("POST", "/api/pause"), ("POST", "/api/stretch"), ("POST", "/api/new-session")):
            st, body, h = req(d, method, path, {} if method == "POST" else None, timeout=5)
            assert st == 503 and h.get("Retry-After"), (path, st, body)
            assert json.loads(body)["error"].startswith("livestack is starting: "), (path, body)
        assert not (d.out / "paused.json").exists()
        started = set(s)
    finally:
        gate.touch()
    s = wait_status(d, lambda s: s["state"] == "idle")
    assert s["stacked"] == 3 and s["frames"] == 3 and s["has_stack"] and s["starting"] is None
    assert set(s) == started                        # the same fields, before and after
    assert req(d, "GET", "/api/frames")[0] == 200 and req(d, "GET", "/api/preview.jpg")[0] == 200
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text(), d.log.read_text()


@pytest.mark.browser
def test_the_page_says_the_stack_is_being_loaded(make_daemon, daemon_night):
    """Opened while the daemon starts, the page says so (state "starting", the caption: what is being loaded),
    then shows the stack once it is loaded, without a reload."""
    from playwright.sync_api import expect

    files, _ = daemon_night
    d = make_daemon(name="slow-start-page")
    d.run_through(files[:3])
    gate = start_held(d)
    try:
        with chromium_page(d.url, viewport={"width": 1280, "height": 900}) as (page, errors):
            expect(page.get_by_test_id("state")).to_have_text("starting", timeout=10_000)
            expect(page.get_by_test_id("caption")).to_contain_text("loading the stack", timeout=5_000)
            expect(page.locator("#nopreview")).to_contain_text("loading the stack")
            page.screenshot(path=str(ARTIFACTS / "web-starting.png"))
            gate.touch()
            expect(page.get_by_test_id("preview")).to_be_visible(timeout=30_000)
            expect(page.get_by_test_id("state")).to_have_text("idle", timeout=10_000)
            expect(page.locator("#frames tbody tr")).to_have_count(3, timeout=10_000)
            expect(page.get_by_test_id("caption")).to_contain_text("3 frames")
        assert errors == []
    finally:
        gate.touch()
    assert d.stop() == 0


def test_a_stop_asked_for_while_the_daemon_starts_is_clean(make_daemon, daemon_night):
    """The page answers before the start is done, and says "idle" the moment it is: a SIGTERM then (systemctl
    stop, a script that saw the status) killed the process, its handler not set yet.  It is caught from before the
    start now: the start ends, then the daemon stops as after any SIGTERM (exit 0)."""
    files, _ = daemon_night
    d = make_daemon(name="stop-in-start")
    d.run_through(files[:3])
    gate = start_held(d)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    gate.touch()
    assert d.stop() == 0
    log = d.log.read_text()
    assert "SIGTERM received" in log and "Traceback" not in log, log
    assert len(d.lines()) == 3


# a daemon whose worker, on a frame named held-…, waits for a file: busy for as long as the test likes (as with a
# 24 MP frame on a Pi, or a write to a slow card), while the web thread answers
HELD_FRAME = """\
import pathlib, sys, time
from livestack.daemon import service

entered, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
frame = service.Service._frame

def held_frame(self, item):
    if item.rel.startswith("held-"):
        entered.touch()
        end = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < end:
            time.sleep(0.02)
    return frame(self, item)

service.Service._frame = held_frame
from livestack.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _statuses(d: Daemon):
    """The statuses /api/events sends, as they come (a generator; its connection closes with it)."""
    u = urlsplit(d.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", "/api/events")
        r = conn.getresponse()
        assert r.status == 200
        data = None
        while line := r.fp.readline().decode():
            if line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "\n" and data is not None:
                yield data
                data = None
    finally:
        conn.close()


def test_an_exclude_refused_after_its_202_is_in_the_status(make_daemon, daemon_night):
    """The worker busy past the page's 2 s (a frame, a write), an exclude was answered 202 "restacking"; when the
    worker came to it and refused it — a frame of the stack gone from the capture folder meanwhile, the frame an
    archived target's since — the refusal reached the daemon's log only: the user who tapped "exclude" at the
    telescope never learnt that nothing was excluded.  The status says it now (`refused`), on /api/events too."""
    files, _ = daemon_night
    d = make_daemon("--token", TOKEN, name="refused-late")
    for f in files[:4]:
        shutil.copy(f, d.watch / f.name)
    gate = start_held(d, held=HELD_FRAME, entered=False)
    aside = d.tmp / "aside"
    aside.mkdir()
    try:
        d._wait_url()
        s = wait_status(d, lambda s: s["frames"] == 4 and s["state"] == "idle", timeout=30)
        assert s.get("refused", "missing") is None
        n = s["stacked"]
        stacked = [f["path"] for f in json.loads(req(d, "GET", "/api/frames")[1])["frames"]
                   if f["status"] in ("reference", "stacked")]
        shutil.copy(files[4], d.watch / f"held-{files[4].name}")
        wait_held(d)
        events = _statuses(d)
        next(events)
        st, body, _ = req(d, "POST", "/api/exclude", {"file": stacked[2]}, AUTH)
        assert st == 202, body
        shutil.move(d.watch / stacked[1], aside / stacked[1])       # gone after the request was taken
        gate.touch()
        end = time.monotonic() + 30
        for sent in events:             # until the refusal is sent, or the frame held is done without it
            if sent.get("refused") or (sent["frames"] == 5 and sent["state"] == "idle") or time.monotonic() > end:
                break
        events.close()
        s = wait_status(d, lambda s: s["frames"] == 5 and s["state"] == "idle", timeout=30)
        assert s["excluded"] == 0 and s["stacked"] == n + 1         # nothing excluded: the frame held stacked
        assert "exclude/include refused" in d.log.read_text()       # the log said it …
        r = s.get("refused")                                        # … and the status says it now
        assert r is not None and r == sent.get("refused"), (r, sent.get("refused"))
        assert set(r) == {"id", "request", "error", "time"}, r
        assert r["request"] == f"exclude {stacked[2]}"
        assert r["error"].startswith("1 frame of the stack is no longer in the capture folder") and \
            stacked[1] in r["error"], r
        assert isinstance(r["id"], int) and r["time"].endswith("+00:00"), r
    finally:
        gate.touch()
        assert d.stop() == 0
def test_the_page_and_the_log_say_the_masters_and_the_last_failed_frame(tmp_path, daemon_night):
    """A night calibrated by a master library: the daemon's log did not say which library it used, and the page
    said nothing of calibration — the status's frame had no `calibration`, and a light failed for want of a fitting
    master showed as a count alone.  The log names the library as it starts; the status's `current` carries the
    frame's calibration and the page shows it, and the last failed frame with its reason."""
    from playwright.sync_api import expect

    from drivers.simulator import SimConfig, render_calibration
    from livestack.masters import build_library

    _chromium_or_skip()
    files, _ = daemon_night
    cam = SimConfig(width=480, height=360, fmt="dng", seed=5)
    render_calibration(tmp_path / "calib", cam, n_bias=0, n_dark=3, n_flat=3, n_darkflat=0)
    lib = build_library(tmp_path / "calib", tmp_path / "M")
    dark = next(e.name for e in lib.entries if e.kind == "dark")
    (tmp_path / "watch").mkdir()
    for f in files[:2]:
        shutil.copy(f, tmp_path / "watch" / f.name)
    (tmp_path / "watch" / "light_9999_60s.dng").write_bytes(b"II*\0" + bytes(100))     # a damaged frame: failed
    d = Daemon(tmp_path, tmp_path / "watch", tmp_path / "out", "--token", TOKEN)
    d.config.write_text(d.config.read_text().replace("[daemon]\n", f'[daemon]\nmasters = "{tmp_path / "M"}"\n'))
    d.start()
    try:
        s = wait_status(d, lambda s: s["frames"] == 3 and s["state"] == "idle", timeout=30)
        assert s["current"]["calibration"]["dark"] == dark, s["current"]
        assert f"calibration masters from {tmp_path / 'M'}: 1 dark, 1 flat (on_mismatch = fail)" in d.log.read_text()
        with chromium_page(d.url) as (page, errors):
            expect(page.get_by_test_id("calibration")).to_contain_text(f"Calibration: dark {dark}, flat ",
                                                                       timeout=15_000)
            expect(page.get_by_test_id("last-failed")).to_contain_text("Last failed: light_9999_60s.dng — ")
            assert not errors, errors
    finally:
        assert d.stop() == 0
