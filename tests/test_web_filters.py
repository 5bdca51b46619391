"""The page and API of a session through a filter wheel: per-filter stacks, the palette and the weights."""
from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import Daemon
from test_web import ARTIFACTS, TOKEN, _not_red, chromium_page, req, wait_status

from drivers.simulator import SimConfig, render_night

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WHEEL = ("Ha", "OIII", "SII")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A mono camera behind Ha, OIII, SII in turn, 2 frames each (one star field: one grid), on a daemon."""
    night = tmp_path_factory.mktemp("wheel-night")
    # 900 stars: a 180 s narrowband frame of 400×300 still shows the 15 a reference frame needs
    truth = render_night(night, SimConfig(width=400, height=300, n_frames=6, mono=True, seed=5, n_stars=900,
                                          filters=WHEEL))
    root = tmp_path_factory.mktemp("web-wheel")
    (root / "watch").mkdir()
    d = Daemon(root, root / "watch", root / "out", "--token", TOKEN)
    d.start()
    for f in truth["frames"]:
        shutil.copy(night / f["file"], root / "watch" / f["file"])
    d.wait_lines(6)
    wait_status(d, lambda s: s["frames"] == 6 and s["state"] == "idle", timeout=30)
    outputs = [d.out / "stack.fits", *(d.out / f"stack_{n}.fits" for n in WHEEL)]
    end = time.monotonic() + 15       # written when the worker goes idle, just after the status says so
    while not all(f.exists() for f in outputs) and time.monotonic() < end:
        time.sleep(0.05)
    yield d
    assert d.stop() == 0


def status(d: Daemon) -> dict:
    return json.loads(req(d, "GET", "/api/status")[1])


def test_status_lists_each_filter_and_the_palette(wheel):
    s = status(wheel)
    assert s["stacked"] == 6, s
    assert [(f["filter"], f["key"], f["file"], f["frames"], f["integration_s"]) for f in s["filters"]] == [
        (n, n.lower(), f"stack_{n}.fits", 2, 360.0) for n in WHEEL]
    assert all(f["reference"] and f["last_frame_time"] and f["fwhm"] > 1 for f in s["filters"])
    p = s["palette"]
    assert p["requested"] == "auto" and p["name"] == "SHO" and "R=SII G=Ha B=OIII" in p["mapping"]
    assert p["choices"] == ["auto", "RGB", "LRGB", "SHO", "HOO", "HUES"]
    frames = json.loads(req(wheel, "GET", "/api/frames")[1])["frames"]
    assert [r["filter"] for r in frames] == list(WHEEL) * 2
    for n in WHEEL:
        st, body, _ = req(wheel, "GET", f"/api/files/stack_{n}.fits")
        assert st == 200 and body.startswith(b"SIMPLE  ="), n


def test_palette_refuses_bad_values_and_sets_weights(wheel):
    st, _, _ = req(wheel, "POST", "/api/palette", {"palette": "HUES"})
    assert st == 401                                     # a change: needs the token
    st, body, _ = req(wheel, "POST", "/api/palette", {"palette": "Rainbow"}, AUTH)
    err = json.loads(body)["error"]
    assert st == 400 and "Rainbow" in err and "SHO" in err and "\n" not in err, err
    st, body, _ = req(wheel, "POST", "/api/palette", {"weights": {"Ha": 11}}, AUTH)
    assert st == 400 and "Ha" in json.loads(body)["error"]
    for bad in ({"weights": {"Ha": "2"}}, {"weights": {"Ha": True}}, {"hues": {"Ha": [True, False, False]}}):
        st, body, _ = req(wheel, "POST", "/api/palette", bad, AUTH)        # text or switches: not numbers
        assert st == 400 and "Ha" in json.loads(body)["error"], (bad, body)
    before = status(wheel)["preview_id"]
    st, body, _ = req(wheel, "POST", "/api/palette", {"weights": {"Ha": 2}}, AUTH)
    s = json.loads(body)
    assert st == 200 and s["palette"]["weights"] == {"Ha": 2.0} and s["palette"]["name"] == "SHO"
    assert s["preview_id"] != before                     # redrawn without restacking
    assert s["stacked"] == 6 and status(wheel)["palette"]["weights"] == {"Ha": 2.0}
    st, body, _ = req(wheel, "POST", "/api/palette", {"weights": {}}, AUTH)   # back to the defaults
    assert st == 200 and json.loads(body)["palette"]["weights"] == {}


@pytest.mark.browser
def test_filters_panel_on_a_phone(wheel):
    from playwright.sync_api import expect

    errors: list[str] = []
    try:
        with chromium_page(wheel.url, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                           is_mobile=True, has_touch=True) as (page, errors):
            preview = page.get_by_test_id("preview")
            expect(preview).to_be_visible(timeout=30_000)

            # one row (a card at this width) per filter, with its frames and its own stack to download
            panel = page.get_by_test_id("filters")
            expect(panel).to_be_visible(timeout=10_000)
            rows = panel.get_by_test_id("filter-row")
            expect(rows).to_have_count(3)
            for i, n in enumerate(WHEEL):
                expect(rows.nth(i).locator("td.fname")).to_have_text(n)
                expect(rows.nth(i).locator('td[data-label="frames"]')).to_have_text("2")
                expect(rows.nth(i).locator('td[data-label="integration"]')).to_have_text("6 m 00 s")
                expect(rows.nth(i).locator("td.dl a")).to_have_attribute("href", f"/api/files/stack_{n}.fits")
            expect(page.locator("#frames td.flt")).to_have_text(list(WHEEL[::-1]) * 2)

            # the palette: auto chose SHO; choosing HUES redraws the preview with it
            palette = page.get_by_test_id("palette")
            expect(palette).to_have_attribute("data-value", "auto")
            expect(palette.locator("[aria-checked=true]")).to_have_text("Auto (SHO)")
            expect(page.get_by_test_id("palette-mapping")).to_contain_text("R=SII G=Ha B=OIII")
            first_id = preview.get_attribute("data-preview-id")
            palette.get_by_role("radio", name="HUES").click()
            s = wait_status(wheel, lambda s: s["palette"]["name"] == "HUES")
            assert s["palette"]["requested"] == "HUES" and str(s["preview_id"]) != first_id
            expect(preview).to_have_attribute("data-preview-id", str(s["preview_id"]), timeout=10_000)
            expect(page.get_by_test_id("palette-mapping")).to_contain_text("HUES")
            expect(palette.locator("[aria-checked=true]")).to_have_text("HUES")

            # a weight slider: six steps of 0.05 to the right, sent once the finger stops
            ha = page.get_by_test_id("weight-ha")
            expect(ha).to_have_value("1")
            ha.focus()
            for _ in range(6):
                page.keyboard.press("ArrowRight")
            s = wait_status(wheel, lambda s: s["palette"]["weights"] == {"Ha": 1.3})
            expect(preview).to_have_attribute("data-preview-id", str(s["preview_id"]), timeout=10_000)
            expect(ha).to_have_value("1.3")

            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.evaluate("window.scrollTo(0, 0)")    # the sticky bar stays on top of a full-page shot
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / "web-filters-phone.png"), full_page=True)
            page.evaluate("document.getElementById('night').click()")
            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            panel.screenshot(path=str(ARTIFACTS / "web-filters-phone-night.png"))
    finally:
        # the other tests of this module see the defaults again
        req(wheel, "POST", "/api/palette", {"palette": "auto", "weights": {}}, AUTH)
    assert errors == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [360, 390, 768, 1024])
def test_every_control_is_a_fingers_size_on_a_phone(wheel, width):
    """At the telescope the page is used with a finger (often gloved): the header's Pause/New stack/Night, the
    palette, Auto stretch and the downloads were 31–34 px tall, the stretch and weight sliders 19 px, the
    filters' stack_<F>.fits links 15 px, the Frames table's exclude on a tablet (768, 1024 px) 26 px.  Each is at
    least 40 px tall on a touch screen now."""
    with chromium_page(wheel.url, viewport={"width": width, "height": 844}, device_scale_factor=2,
                       is_mobile=True, has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.get_by_test_id("filter-row").first.wait_for(timeout=10_000)
        page.get_by_test_id("weight-ha").wait_for(timeout=10_000)
        small = page.evaluate("""() => [...document.querySelectorAll('button, a[href], select, input')]
            .filter((e) => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden')
            .map((e) => [e.id || e.dataset.testid || e.textContent.trim(), e.getBoundingClientRect().height])
            .filter(([, h]) => h < 40)""")
        assert small == [], small
    assert errors == []


@pytest.mark.browser
def test_the_palettes_are_chosen_on_the_page_not_in_a_browser_list(wheel):
    """The palette was a <select>: its list opens in the browser's own colours — white and grey at night, at the
    telescope, where the rest of the page is red — and takes two taps.  Every palette is a button on the page now
    (red at night: test_night_mode_is_red_everywhere), the one in use marked."""
    from playwright.sync_api import expect

    with chromium_page(wheel.url, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                       is_mobile=True, has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        palette = page.get_by_test_id("palette")
        palette.wait_for(timeout=10_000)
        assert page.locator("select").count() == 0
        want = status(wheel)["palette"]["choices"]
        expect(palette.get_by_role("radio")).to_have_count(len(want))
        assert [b.get_attribute("data-value") for b in palette.get_by_role("radio").all()] == want
        expect(palette.get_by_role("radio", checked=True)).to_have_text("Auto (SHO)")
    assert errors == []


@pytest.mark.browser
def test_night_mode_is_red_everywhere(wheel):
    """Night mode: not one grey, white or pink pixel outside the images (the preview and thumbnails are
    checked on their own in test_web).  The warnings (#ff8080), the second filter's dots and the rotation line
    (#ff9999) were pinks of half white light; the sliders grey."""
    with chromium_page(wheel.url, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                       is_mobile=True, has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.get_by_test_id("weight-ha").wait_for(timeout=10_000)
        page.click("#night")
        page.add_style_tag(content="img { visibility: hidden !important; }")
        page.wait_for_timeout(300)
        assert _not_red(page.screenshot(full_page=True)) == 0
    assert errors == []


@pytest.mark.browser
def test_a_long_filter_name_is_not_drawn_under_its_weight_slider(wheel):
    """The weight sliders' name column was 4rem: "Luminance" (a spelling the palettes accept) ran on under its
    slider's track and thumb on a phone.  Each name stays left of its slider (wrapped, or cut with an ellipsis)."""
    names = ["Luminance", "H-alpha 7nm", "OIII_ultra_narrow_3nm"]
    with chromium_page(wheel.url, viewport={"width": 360, "height": 780}, device_scale_factor=2,
                       is_mobile=True, has_touch=True) as (page, errors):
        page.wait_for_selector("#conn.on", timeout=15_000)
        page.get_by_test_id("weight-ha").wait_for(timeout=10_000)
        page.evaluate("""(names) => { state.es.close(); const s = state.status;
            showStatus({...s, filters: s.filters.map((f, i) => ({...f, filter: names[i], key: `k${i}`}))}); }""",
                      names)
        over = page.evaluate("""() => [...document.querySelectorAll('#weights label')].map((label) => {
            const name = label.firstChild;    // a text node, or an element that clips its text
            const r = document.createRange(); r.selectNodeContents(name);
            const text = name.nodeType === Node.TEXT_NODE ? r.getBoundingClientRect() : name.getBoundingClientRect();
            const input = label.querySelector('input').getBoundingClientRect();
            return [label.textContent, text.right - input.left]; }).filter(([, d]) => d > 0)""")
        assert over == [], over
    assert errors == []


@pytest.mark.browser
def test_no_empty_black_block_under_the_preview_on_a_laptop(wheel):
    """Beside the preview on a laptop sit the status, the targets and the filters: taller than the preview with
    a few filters, they stretched its black frame to their height — an empty black block under the caption, as if
    an image had failed to load.  The preview's frame ends with its last line."""
    from playwright.sync_api import expect

    with chromium_page(wheel.url, viewport={"width": 1280, "height": 800}) as (page, errors):
        expect(page.get_by_test_id("preview")).to_be_visible(timeout=30_000)
        page.get_by_test_id("weight-ha").wait_for(timeout=10_000)
        # a wheel of L, R, G, B, Ha, OIII, SII: seven filters' cards and weights beside the preview
        page.evaluate("""() => { state.es.close(); const s = state.status;
            const more = ["L", "R", "G", "B"].map((n, i) => ({...s.filters[0], filter: n, key: n.toLowerCase()}));
            showStatus({...s, filters: [...more, ...s.filters]}); }""")
        empty = page.evaluate("""() => { const wrap = document.querySelector('.viewer-wrap');
            const last = [...wrap.children].filter((e) => e.getClientRects().length).pop();
            return wrap.getBoundingClientRect().bottom - last.getBoundingClientRect().bottom; }""")
        assert empty < 2, empty
def test_a_filter_last_shot_the_night_before_shows_its_date(wheel):
    """LRGB on night 1, only R on night 2: the filters panel's 'last frame' gave the time alone — B's 21:11:22 of
    the night before read as later tonight than R's 20:39:18.  A time of another day than the session's latest
    frame now has its month and day."""
    with chromium_page(wheel.url) as (page, errors):
        expect_rows = page.get_by_test_id("filter-row")
        page.wait_for_function("document.querySelectorAll('[data-testid=filter-row]').length === 3", timeout=30_000)
        status = {"last_frame_time": "2026-11-26T20:39:18", "palette": None, "filters": [
            {"filter": "R", "key": "r", "file": "stack_R.fits", "frames": 6, "rejected": 0, "integration_s": 360.0,
             "fwhm": 4.2, "last_frame_time": "2026-11-26T20:39:18", "reference": "r.fits"},
            {"filter": "B", "key": "b", "file": "stack_B.fits", "frames": 3, "rejected": 0, "integration_s": 180.0,
             "fwhm": 2.8, "last_frame_time": "2026-11-25T21:11:22", "reference": "b.fits"}]}
        page.evaluate("s => showFilters(s)", status)
        cells = expect_rows.locator('td[data-label="last frame"]')
        assert cells.all_text_contents() == ["20:39:18", "11-25 21:11:22"]
    assert errors == []


@pytest.mark.browser
def test_two_spellings_of_one_filter_are_one_filter_in_the_plots(wheel):
    """Frames of 'Ha' and 'H-alpha' (two capture programs) make one stack, but the plots' legend listed each
    spelling as a filter of its own and coloured the H-alpha frames apart from their stack.  The status names
    each filter's spellings (``names``) and the page colours a frame as its stack."""
    assert [f["names"] for f in status(wheel)["filters"]] == [[n] for n in WHEEL]
    with chromium_page(wheel.url) as (page, errors):
        page.wait_for_function("document.querySelectorAll('[data-testid=filter-row]').length === 3", timeout=30_000)
        page.wait_for_function("state.frames.length === 6", timeout=30_000)
        legend = page.evaluate("""() => {
            state.status = {...state.status, filters: state.status.filters.map(
                (f) => f.filter === 'Ha' ? {...f, names: ['H-alpha', 'Ha']} : f)};
            state.frames = state.frames.map((x, i) => i === 3 ? {...x, filter: 'H-alpha'} : x);
            drawPlots();
            return [...document.getElementById('plot-legend').children].map((i) => i.textContent); }""")
        assert legend == list(WHEEL), legend          # not a fourth filter 'H-alpha', in a colour of its own
    assert errors == []
