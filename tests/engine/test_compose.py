"""compose.py: palettes from filter names, a linear mapping per source, blocked = whole, on sources with a known
structure (random blobs: nebulae and stars) on a tilted sky plane with noise."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livestack.engine.compose import (
    HEADER_MAX, ComposeParams, canonical_filter, composite, composite_rows, plan_composite, plan_from_images,
    single_stack_palette)
from livestack.engine.filtername import is_dual_band
from livestack.engine.stretch import reduce

H, W = 120, 160
SMALL = 80            # reduced copies at half size: the background is fitted there, evaluated at full size
FILTERS = ("Ha", "OIII", "SII", "L", "R", "G", "B")
PALETTE_FILTERS = {"RGB": ("R", "G", "B"), "LRGB": ("L", "R", "G", "B"), "SHO": ("SII", "Ha", "OIII"),
                   "HOO": ("Ha", "OIII"), "HUES": FILTERS}


def blobs(rng: np.random.Generator, n: int = 14) -> np.ndarray:
    """(H, W) float32 ≥ 0, peaks ≤ 1: Gaussian blobs of σ 1.5–5 px at random places (~1/5 of the pixels above
    1 %: some sky is left between the blobs of three filters)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    s = np.zeros((H, W), np.float32)
    for _ in range(n):
        x, y, sg, a = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(1.5, 5), rng.uniform(0.3, 1.0)
        s += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sg * sg))
    return s


def plane(c0: float, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (c0 + cx * xx + cy * yy).astype(np.float32)


@lru_cache(maxsize=None)
def truth(seed: int = 0):
    """Per filter: the structure (H, W) and a mono stack (1, H, W) = 100·structure + tilted sky + noise σ 1."""
    rng = np.random.default_rng(seed)
    structure = {f: blobs(rng) for f in FILTERS}
    images = {}
    for f in FILTERS:
        sky = plane(rng.uniform(200, 1000), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
        images[f] = (100 * structure[f] + sky + rng.normal(0, 1, (H, W)))[None].astype(np.float32)
    return structure, images


def pick(images, names):
    return {n: images[n] for n in names}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok].ravel(), b[ok].ravel())[0, 1])


def plan_of(images, **kw):
    return plan_from_images(images, ComposeParams(**kw), max_size=SMALL)


def mapped(name, image):
    """One stack alone: a grey composite whose channels are its mapped image (x − bg) / white."""
    plan = plan_of({name: image})
    assert plan.palette == "HUES" and plan.sources[0].mix == (1.0, 1.0, 1.0)
    return composite(plan, {name: image})[0]


# ------------------------------------------------------------------ names and palettes

@pytest.mark.parametrize("name, canon", [
    ("Ha", "Ha"), ("HA", "Ha"), ("h-alpha", "Ha"), ("H_Alpha", "Ha"), ("Halpha", "Ha"), ("H alpha", "Ha"),
    ("Ha 7nm", "Ha"), ("Hα", "Ha"), ("OIII", "OIII"), ("o3", "OIII"), ("O-III", "OIII"), ("[OIII] 6.5nm", "OIII"),
    ("SII", "SII"), ("s2", "SII"), ("S-II", "SII"), ("L", "L"), ("lum", "L"), ("Luminance", "L"),
    ("R", "R"), ("red", "R"), ("G", "G"), ("GREEN", "G"), ("b", "B"), ("Blue", "B"),
    ("UV/IR", None), ("", None), ("Hb", None), ("L-eXtreme", None), ("dark", None)])
def test_canonical_filter_spellings(name, canon):
    assert canonical_filter(name) == canon


@pytest.mark.parametrize("names, palette, header", [
    (("Red", "green", "BLUE"), "RGB", "RGB: R=R G=G B=B"),
    (("lum", "R", "G", "B"), "LRGB", "LRGB: L=L R=R G=G B=B"),
    (("Luminance", "red", "Green", "b"), "LRGB", "LRGB: L=L R=R G=G B=B"),
    (("h-Alpha", "o3", "S-II"), "SHO", "SHO: R=SII G=Ha B=OIII"),
    (("SII", "Ha", "OIII"), "SHO", "SHO: R=SII G=Ha B=OIII"),
    (("HALPHA", "OIII"), "HOO", "HOO: R=Ha G=OIII B=OIII"),
    (("Ha", "OIII", "SII", "L"), "HUES", "HUES: "),
    (("Ha", "OIII", "SII", "L", "R", "G", "B"), "HUES", "HUES: "),
    (("R", "G"), "HUES", "HUES (RGB lacks B): "),
    (("Ha",), "HUES", "HUES: Ha=(1,1,1)"),
    (("Ha", "UV/IR"), "HUES", "HUES: "),
    (("Ha", "H-alpha", "OIII"), "HUES", "HUES: "),       # two Ha stacks: not the HOO set
])
def test_automatic_palette_from_names(names, palette, header):
    _, images = truth()
    stacks = {n: images[canonical_filter(n) or "L"] for n in names}
    plan = plan_from_images(stacks, ComposeParams(), max_size=40)
    assert plan.palette == palette and plan.requested == "auto" and not plan.fallback
    assert plan.header.startswith(header)
    assert plan.header.isascii() and len(plan.header) <= HEADER_MAX


def test_explicit_palette_with_missing_filters_falls_back_to_hues():
    _, images = truth()
    plan = plan_of(pick(images, ("Ha", "OIII")), palette="sho")     # a night that has not reached SII yet
    assert plan.palette == "HUES" and plan.requested == "SHO" and plan.fallback
    assert plan.header.startswith("HUES (SHO lacks SII): ")
    assert "SHO lacks SII" in plan.description
    # two filters: the shorter cyan, the longer red — the HOO look
    assert plan.header == "HUES (SHO lacks SII): Ha=(1,0,0) OIII=(0,1,1)"


def test_explicit_palette_uses_only_its_filters():
    _, images = truth()
    plan = plan_of(images, palette="SHO")
    assert plan.palette == "SHO" and not plan.fallback
    assert set(plan.stacks) == {"SII", "Ha", "OIII"} and set(plan.ignored) == {"L", "R", "G", "B"}
    assert "ignored L, R, G, B (not in SHO)" in plan.description
    out = composite(plan, pick(images, ("SII", "Ha", "OIII")))     # the ignored stacks are not needed
    assert out.shape == (3, H, W)


def test_params_are_checked():
    with pytest.raises(ValueError, match=r"compose.palette = 'XYZ': unknown \(known: auto, RGB, LRGB, SHO, HOO"):
        ComposeParams(palette="XYZ")
    with pytest.raises(ValueError, match=r"compose.hues\['Ha'\]"):
        ComposeParams(hues={"Ha": [1, 0]})
    with pytest.raises(ValueError, match=r"compose.hues\['Ha'\]"):
        ComposeParams(hues={"Ha": [1, 0, 1.5]})
    with pytest.raises(ValueError, match=r"compose.weights\['OIII'\] = 11: must be a number in \[0, 10\]"):
        ComposeParams(weights={"OIII": 11})
    with pytest.raises(ValueError, match="compose.weights"):
        ComposeParams(weights={"OIII": "lots"})
    # what float() takes but is no number: text, a switch (a request's JSON, a hand-edited TOML file)
    for bad in ("1", True, None, [1]):
        with pytest.raises(ValueError, match=r"compose.weights\['OIII'\] = .*: must be a number in \[0, 10\]"):
            ComposeParams(weights={"OIII": bad})
    for bad in ("101", [True, 0, 0], ["1", 0, 0], {"r": 1, "g": 0, "b": 0}):
        with pytest.raises(ValueError, match=r"compose.hues\['Ha'\] = .*: must be 3 numbers in \[0, 1\]"):
            ComposeParams(hues={"Ha": bad})
    assert ComposeParams(weights={"OIII": 2, "Ha": np.float32(1.5)}, hues={"Ha": (1, 0, 0.5)}).weights == \
        {"OIII": 2.0, "Ha": 1.5}
    p = ComposeParams(palette="hoo", hues={"Ha": [1, 0, 0.2]})
    assert p.palette == "HOO" and p.hues == {"Ha": (1.0, 0.0, 0.2)}
    with pytest.raises(AttributeError):
        p.palette = "SHO"


# ------------------------------------------------------------------ each channel shows its filters

@pytest.mark.parametrize("palette, channels", [
    ("SHO", (("SII",), ("Ha",), ("OIII",))),
    ("HOO", (("Ha",), ("OIII",), ("OIII",))),
    ("RGB", (("R",), ("G",), ("B",))),
])
def test_each_channel_is_its_filter_without_background(palette, channels):
    structure, images = truth()
    used = PALETTE_FILTERS[palette]
    plan = plan_of(pick(images, used))
    assert plan.palette == palette
    out = composite(plan, pick(images, used))
    assert out.dtype == np.float32 and out.shape == (3, H, W)
    sky = sum(structure[f] for f in used) < 0.01
    for c, mine in enumerate(channels):
        for f in used:
            r = corr(out[c], structure[f])
            assert (r > 0.95) if f in mine else (r < 0.3), (c, f, r)
        # the tilted sky plane is gone: ≈ 0 in every quadrant (the white point maps ~100 units to ~1)
        for qy in (slice(0, H // 2), slice(H // 2, H)):
            for qx in (slice(0, W // 2), slice(W // 2, W)):
                assert abs(float(np.median(out[c][qy, qx][sky[qy, qx]]))) < 0.01
        # a bright structure lands near 1, not 100 or 0.01
        assert 0.3 < float(np.percentile(out[c], 99.5)) < 3


def test_hoo_from_a_single_colour_stack():
    """A colour camera behind a dual-band filter: Ha in its R channel, OIII in G and B."""
    structure, images = truth()
    rng = np.random.default_rng(5)
    ha, o3 = structure["Ha"], structure["OIII"]
    osc = np.stack([100 * ha + plane(300, 0.2, -0.1), 80 * o3 + plane(500, -0.3, 0.1),
                    120 * o3 + plane(400, 0.1, 0.3)]) + rng.normal(0, 1, (3, H, W))
    osc = osc.astype(np.float32)
    plan = plan_of({"Duo": osc}, palette="HOO")
    assert plan.palette == "HOO" and not plan.fallback
    assert [(s.label, s.channels) for s in plan.sources] == [("Ha", (0,)), ("OIII", (1, 2))]
    assert plan.header == "HOO: R=Ha G=OIII B=OIII (Ha=R OIII=(G+B)/2 of colour Duo)"
    out = composite(plan, {"Duo": osc})
    assert corr(out[0], ha) > 0.95 and corr(out[1], o3) > 0.95
    assert corr(out[0], o3) < 0.3 and corr(out[1], ha) < 0.3
    np.testing.assert_array_equal(out[1], out[2])
    # automatic: the same colour stack is plain RGB from its channels
    auto = plan_of({"Duo": osc})
    assert auto.palette == "RGB" and auto.header == "RGB: R=R G=G B=B (channels of colour Duo)"
    rgb = composite(auto, {"Duo": osc})
    for c in range(3):
        np.testing.assert_allclose(rgb[c], mapped("x", osc[c:c + 1]), atol=1e-5)


def test_colour_stack_among_others_gives_its_luminance():
    structure, images = truth()
    osc = np.concatenate([images["R"], images["G"], images["B"]])
    plan = plan_of({"OSC": osc, "Ha": images["Ha"]})
    assert plan.palette == "HUES" and plan.header == "HUES: OSC=(1,1,1) Ha=(1,0,0)"
    assert plan.sources[0].channels == (0, 1, 2)
    out = composite(plan, {"OSC": osc, "Ha": images["Ha"]})
    lum = mapped("OSC", osc.mean(axis=0, keepdims=True))
    # red sums two white points: every hue halved so that no channel exceeds 1 where all are at white
    assert "hues scaled by 0.5" in plan.description
    np.testing.assert_allclose(out[1], 0.5 * lum, atol=1e-5)
    np.testing.assert_allclose(out[0] - out[1], 0.5 * mapped("Ha", images["Ha"]), atol=1e-5)


@pytest.mark.parametrize("names, note", [(("L", "R", "G"), "LRGB lacks B"), (("R", "G"), "RGB lacks B"),
                                         (("Ha", "SII"), "SHO lacks OIII"), (("L", "Ha"), None)])
def test_auto_says_which_filter_its_palette_lacks(names, note):
    """An LRGB night whose B frames were all rejected (or B still to come) is drawn in HUES — G cyan — and
    nothing said why it was not LRGB: the description now names the palette and the filter it lacks."""
    _, images = truth()
    plan = plan_of(pick(images, names))
    assert plan.palette == "HUES" and not plan.fallback
    if note is None:
        assert "lacks" not in plan.description
    else:           # in the PALETTE card too: a batch stack's only word on it
        assert plan.header.startswith(f"HUES ({note}): ") and plan.description.startswith(plan.header[:-3])


@pytest.mark.parametrize("name, dual", [
    ("L-eXtreme", True), ("HaOIII", True), ("Ha/OIII", True), ("Dual Band", True), ("L-eNhance 7nm", True),
    ("Optolong L-eXtreme 7nm", True), ("Antlia ALP-T 5nm", True), ("IDAS NBZ", True),   # the maker's name first
    ("IRCUT", False), ("UV/IR cut", False), ("LPR", False), ("L-Pro", False), ("CLS", False), ("L", False),
    (None, False)])
def test_a_dual_band_filter_is_known_also_after_its_makers_name(name, dual):
    """A colour camera's FILTER 'Optolong L-eXtreme' (the wheel's name for it) was not taken for a dual-band
    filter: palette auto showed the stack as plain RGB, not HOO as for 'L-eXtreme'."""
    assert is_dual_band(name) is dual


@pytest.mark.parametrize("name", ["none", "None", "No filter", "Clear"])
def test_unfiltered_light_is_white_in_hues(name):
    """An LRGB night with a frame whose FILTER card was lost: its stack ('none') took a hue of its own from the
    middle of the spectrum, yellow-green (0.67, 1, 0), and pushed G to teal (0, 1, 0.67).  Unfiltered light is
    white, as L; R, G, B keep their colours."""
    _, images = truth()
    stacks = {"L": images["L"], "R": images["R"], "G": images["G"], "B": images["B"], name: images["Ha"]}
    plan = plan_of(stacks)
    assert plan.palette == "HUES"
    hues = {s.label: tuple(round(v / max(s.mix), 3) for v in s.mix) for s in plan.sources}
    assert hues == {"L": (1, 1, 1), "R": (1, 0, 0), "G": (0, 1, 0), "B": (0, 0, 1), name: (1, 1, 1)}, hues


def test_two_stacks_of_one_filter_are_told_apart_in_the_mapping():
    """'Ha 7nm' and 'Ha 3nm' are two stacks (two filters), both Ha: the mapping said 'Ha=(1,0,0) Ha=(0,1,0)',
    and which one was drawn red could not be told.  Each is now named as its stack."""
    _, images = truth()
    plan = plan_of({"Ha 7nm": images["Ha"], "Ha 3nm": images["SII"], "Luminance": images["L"]})
    assert plan.header == "HUES: Ha 7nm=(1,0,0) Ha 3nm=(0,1,1) L=(1,1,1)", plan.header
    assert [s.label for s in plan.sources] == ["Ha 7nm", "Ha 3nm", "L"]


def test_colour_stacks_alone_give_their_channels_in_their_colours():
    """One colour camera behind a UV/IR cut and a dual-band filter: every stack is colour, and as luminances both
    were white — a grey composite.  Each now gives its channels (HOO from the dual-band's), in their colours."""
    structure, images = truth()
    osc = np.concatenate([images["R"], images["G"], images["B"]])
    duo = np.concatenate([images["Ha"], images["OIII"], images["OIII"]])
    stacks = {"UVIR": osc, "L-eXtreme": duo}
    plan = plan_of(stacks)
    assert plan.palette == "HUES" and plan.header == "HUES: UVIR=RGB L-eXtreme=HOO", plan.header
    assert [(s.stack, s.channels) for s in plan.sources] == [
        ("UVIR", (0,)), ("UVIR", (1,)), ("UVIR", (2,)), ("L-eXtreme", (0,)), ("L-eXtreme", (1, 2))]
    out = composite(plan, stacks)
    half = {k: 0.5 * mapped("x", v) for k, v in (("R", images["R"]), ("G", images["G"]), ("B", images["B"]),
                                                    ("Ha", images["Ha"]), ("OIII", images["OIII"]))}
    np.testing.assert_allclose(out[0], half["R"] + half["Ha"], atol=1e-5)
    np.testing.assert_allclose(out[1], half["G"] + half["OIII"], atol=1e-5)
    np.testing.assert_allclose(out[2], half["B"] + half["OIII"], atol=1e-5)
    # a hue configured for a colour stack: its luminance, in that hue, as before
    hued = plan_of(stacks, hues={"UVIR": [1, 1, 1]})
    assert [s.channels for s in hued.sources if s.stack == "UVIR"] == [(0, 1, 2)]


def test_lrgb_is_the_rgb_colour_with_the_luminance_of_l():
    structure, images = truth()
    lrgb = composite(plan_of(pick(images, ("L", "R", "G", "B"))), images)
    rgb = composite(plan_of(pick(images, ("R", "G", "B"))), images)
    lum = mapped("L", images["L"])
    np.testing.assert_allclose(lrgb.mean(axis=0), lum, atol=1e-5)                  # luminance from L
    np.testing.assert_allclose(lrgb, rgb - rgb.mean(axis=0) + lum, atol=1e-5)      # colour from R, G, B
    np.testing.assert_allclose(lrgb[0] - lrgb[2], rgb[0] - rgb[2], atol=1e-5)
    assert corr(lrgb.mean(axis=0), structure["L"]) > 0.95


def test_hues_follow_wavelength_order_and_config():
    structure, images = truth()
    used = ("Ha", "OIII", "SII", "L")
    plan = plan_of(pick(images, used))
    # OIII (501 nm) blue, Ha (656) green, SII (672) red, L white; channel sums 2 -> halved
    assert plan.header == "HUES: Ha=(0,1,0) OIII=(0,0,1) SII=(1,0,0) L=(1,1,1)"
    assert "hues scaled by 0.5" in plan.description
    out = composite(plan, images)
    m = {f: mapped(f, images[f]) for f in used}
    np.testing.assert_allclose(out, 0.5 * np.stack([m["SII"] + m["L"], m["Ha"] + m["L"], m["OIII"] + m["L"]]),
                               atol=1e-5)
    mine = plan_of(pick(images, ("Ha", "OIII")), palette="HUES", hues={"H-alpha": [1, 0, 0.2]})
    # OIII, the only filter left without a hue, gets its own colour (cyan); blue sums 1.2 -> all / 1.2
    assert mine.header == "HUES: Ha=(1,0,0.2) OIII=(0,1,1)" and "hues scaled by 0.83" in mine.description
    out = composite(mine, images)
    np.testing.assert_allclose(out[2], (0.2 * m["Ha"] + m["OIII"]) / 1.2, atol=1e-5)
    np.testing.assert_allclose(out[0], m["Ha"] / 1.2, atol=1e-5)
    # unknown names sort between G and R, by name: Bar blue, Foo green, Ha red
    odd = plan_of({"Foo": images["G"], "Bar": images["B"], "Ha": images["Ha"]})
    assert odd.header == "HUES: Foo=(0,1,0) Bar=(0,0,1) Ha=(1,0,0)"
    # all seven: L white, the six others spread from blue (B) to red (SII)
    seven = plan_of(images)
    # B 240°, OIII 192°, G 144°, R 96°, Ha 48°, SII 0°
    assert seven.palette == "HUES" and seven.description.startswith(
        "HUES: Ha=(1,0.8,0) OIII=(0,0.8,1) SII=(1,0,0) L=(1,1,1) R=(0.4,1,0) G=(0,1,0.4) B=(0,0,1); ")
    assert len(seven.header) == HEADER_MAX and seven.header.endswith("...")


def test_a_reduced_copy_composes_like_the_reduced_composite():
    """The preview: the plan applied to reduced copies (backgrounds at the reduced pixels' centres) equals the
    full-resolution composite reduced, the composite being linear."""
    _, images = truth()
    sho = pick(images, ("SII", "Ha", "OIII"))
    plan = plan_of(sho)
    small = {k: reduce(v, SMALL) for k, v in sho.items()}
    out = composite(plan, small)
    assert out.shape == (3, 60, 80) and out.dtype == np.float32
    np.testing.assert_allclose(out, reduce(composite(plan, sho), SMALL), atol=1e-4)


def test_one_stack_needs_a_composite_only_behind_a_dual_band_filter():
    assert single_stack_palette(3, ComposeParams(palette="HOO"))
    assert not single_stack_palette(3, ComposeParams())
    assert not single_stack_palette(1, ComposeParams(palette="HOO"))


# ------------------------------------------------------------------ weights, NaN, dtype

def test_weights_scale_and_remove_filters():
    structure, images = truth()
    sho = pick(images, ("SII", "Ha", "OIII"))
    base = composite(plan_of(sho), sho)
    double = composite(plan_of(sho, weights={"h-alpha": 2}), sho)
    np.testing.assert_array_equal(double[1], 2 * base[1])
    np.testing.assert_array_equal(double[[0, 2]], base[[0, 2]])
    spelt = {"S2": sho["SII"], "H-alpha": sho["Ha"], "O3": sho["OIII"]}       # one weight, not Ha's twice
    np.testing.assert_array_equal(composite(plan_of(spelt, weights={"Ha": 2}), spelt), double)
    # LRGB: each weight multiplies its own term, so the composite is affine in it
    lrgb = pick(images, ("L", "R", "G", "B"))
    o = {w: composite(plan_of(lrgb, weights={"R": w}), lrgb) for w in (0.5, 1.0, 2.0)}
    np.testing.assert_allclose(o[2.0] - o[1.0], 2 * (o[1.0] - o[0.5]), atol=1e-5)
    # a weight of 0 removes a filter, its missing data too
    extra = dict(sho, X=images["L"].copy())
    extra["X"][:, :20] = np.nan
    plan = plan_of(extra, weights={"x": 0})
    assert plan.palette == "SHO" and "X" in plan.ignored and "dropped (weight 0): X" in plan.description
    np.testing.assert_array_equal(composite(plan, extra), base)


def test_nan_where_a_source_has_no_data_dtype_and_inputs_unchanged():
    _, images = truth()
    stacks = {k: v.copy() for k, v in pick(images, ("SII", "Ha", "OIII")).items()}
    stacks["Ha"][:, 30:50, 60:100] = np.nan
    before = {k: v.copy() for k, v in stacks.items()}
    plan = plan_of(stacks)
    out = composite(plan, stacks)
    assert out.dtype == np.float32
    hole = np.zeros((H, W), bool)
    hole[30:50, 60:100] = True
    assert np.isnan(out[:, hole]).all() and np.isfinite(out[:, ~hole]).all()   # all channels, SII's red too
    for k in stacks:
        np.testing.assert_array_equal(stacks[k], before[k])
    small = {k: v[:, ::2, ::2].copy() for k, v in stacks.items()}
    small_before = {k: v.copy() for k, v in small.items()}
    plan_composite(small, ComposeParams(), full_shape=(H, W))
    for k in small:
        np.testing.assert_array_equal(small[k], small_before[k])


@pytest.mark.parametrize("names, weights", [
    (("Ha", "OIII"), {"Ha": 0, "oiii": 0}),           # the page's sliders all at 0
    (("Ha",), {"Ha": 0}),
    (("Duo",), {"Ha": 0, "OIII": 0}),                 # a dual-band colour stack's two channels (palette HOO)
])
def test_every_weight_0_makes_a_black_composite_not_an_error(names, weights):
    """Weights all 0 raised ValueError: the page's POST got a 500, and the daemon, whose palette.json kept the
    weights, stopped at its next frame and at every start after.  Nothing is added: the composite is black."""
    _, images = truth()
    stacks = ({"Duo": np.concatenate([images["Ha"], images["OIII"], images["OIII"]])} if names == ("Duo",)
              else pick(images, names))
    plan = plan_of(stacks, weights=weights, palette="HOO" if names == ("Duo",) else "auto")
    assert "every weight is 0: the composite is black" in plan.description
    assert all(s.mix == (0.0, 0.0, 0.0) for s in plan.sources) and plan.sources
    out = composite(plan, stacks)
    assert out.shape == (3, H, W) and np.all(out == 0)


def test_errors_are_one_sentence():
    _, images = truth()
    with pytest.raises(ValueError, match="no stack to compose"):
        plan_composite({}, ComposeParams())
    with pytest.raises(ValueError, match=r"stack 'Ha' has shape \(120, 160\)"):
        plan_composite({"Ha": images["Ha"][0]}, ComposeParams())
    plan = plan_of(pick(images, ("Ha", "OIII")))
    with pytest.raises(ValueError, match="stack 'OIII' is missing: the plan needs Ha, OIII"):
        composite_rows(plan, {"Ha": images["Ha"][:, :10]}, 0, 10)
    with pytest.raises(ValueError, match=r"rows have shape \(1, 10, 160\), not \(1, 5, 160\)"):
        composite_rows(plan, {k: v[:, :10] for k, v in pick(images, ("Ha", "OIII")).items()}, 0, 5)
    with pytest.raises(ValueError, match=r"rows 0:200 are not within the grid's 120 rows"):
        composite_rows(plan, pick(images, ("Ha", "OIII")), 0, 200)


# ------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(palette=st.sampled_from(sorted(PALETTE_FILTERS)),
       coeffs=st.lists(st.tuples(st.floats(0.05, 20), st.floats(-1000, 1000), st.floats(-1, 1), st.floats(-1, 1)),
                       min_size=7, max_size=7))
def test_invariant_to_a_positive_scale_and_a_plane_per_filter(palette, coeffs):
    """The mapping divides out a·x + plane: per-filter transparency and sky changes do not change the colour."""
    _, images = truth()
    used = pick(images, PALETTE_FILTERS[palette])
    changed = {f: (a * x + plane(c0, cx, cy)).astype(np.float32)
               for (f, x), (a, c0, cx, cy) in zip(used.items(), coeffs)}
    p1, p2 = plan_of(used, palette=palette), plan_of(changed, palette=palette)
    assert p1.palette == p2.palette == palette and p1.header == p2.header
    np.testing.assert_allclose(composite(p2, changed), composite(p1, used), atol=1e-4)


@lru_cache(maxsize=None)
def patchy():
    """A colour stack and two mono stacks with holes (no data) in different places, and its plan."""
    _, images = truth()
    stacks = {"OSC": np.concatenate([images["R"], images["G"], images["B"]]), "Ha": images["Ha"].copy(),
              "OIII": images["OIII"].copy()}
    stacks["Ha"][:, :15] = np.nan
    stacks["OIII"][:, 40:60, 100:] = np.nan
    stacks["OSC"][1, 100:, :30] = np.nan
    return stacks, plan_of(stacks, background_degree=2)


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, H - 1), max_size=6, unique=True).map(sorted))
def test_blocks_equal_the_whole_exactly(cuts):
    stacks, plan = patchy()
    whole = composite(plan, stacks)
    edges = [0, *cuts, H]
    parts = [composite_rows(plan, {k: v[:, a:b] for k, v in stacks.items()}, a, b) for a, b in zip(edges[:-1],
                                                                                                edges[1:])]
    joined = np.concatenate(parts, axis=1)
    assert joined.dtype == np.float32
    np.testing.assert_array_equal(joined, whole)
    assert np.isnan(whole[:, :15]).all() and np.isnan(whole[:, 40:60, 100:]).all()


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=8, unique=True),
       palette=st.sampled_from(["auto", "RGB", "LRGB", "SHO", "HOO", "HUES"]))
def test_header_is_short_ascii_and_names_the_palette(names, palette):
    rng = np.random.default_rng(len(names))
    stacks = {n: rng.normal(100, 1, (1, 16, 16)).astype(np.float32) for n in names}
    plan = plan_composite(stacks, ComposeParams(palette=palette))
    assert plan.header.isascii() and len(plan.header) <= HEADER_MAX
    assert plan.header.startswith(plan.palette)
    long = plan.description.encode("ascii", "replace").decode()      # the card: non-ASCII as "?"
    assert long.startswith(plan.header[:-3] if plan.header.endswith("...") else plan.header)
    assert plan.fallback == (palette not in ("auto", "HUES") and plan.palette == "HUES")
