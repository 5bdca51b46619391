"""Filter names: the spellings cameras, filter wheels and users write for one filter, and a filter's identity.

compose picks palettes by the canonical names; the engine keeps one stack per filter_key, and the master library
matches flats to frames by it."""
from __future__ import annotations

import re

# Spellings (case-folded, without spaces, '-', '_', '.', brackets and a trailing bandwidth such as "7nm").
_SPELLINGS = {
    "ha": "Ha", "halpha": "Ha", "hα": "Ha",
    "oiii": "OIII", "o3": "OIII",
    "sii": "SII", "s2": "SII",
    "l": "L", "lum": "L", "luminance": "L",
    "r": "R", "red": "R",
    "g": "G", "green": "G",
    "b": "B", "blue": "B",
}
# Dual-band filters for colour cameras (letters and digits only, any case): with palette "auto" a colour stack
# behind one of them is shown as HOO.
DUAL_BAND = ("haoiii", "dualband", "duoband", "lextreme", "lenhance", "lultimate", "alpt", "nbz", "cbp")
_SEPARATORS = re.compile(r"[\s\-_.\[\]()/]+")
_BANDWIDTH = re.compile(r"(\d+(?:[.,]\d+)?)\s*nm$")


def canonical_filter(name: str) -> str | None:
    """A filter name as written by a camera, a filter wheel or a user -> "Ha", "OIII", "SII", "L", "R", "G" or
    "B", or None when unknown.  Case-insensitive; "H-alpha", "H_alpha", "Ha 7nm", "O-III", "[SII]", "S2",
    "Lum", "Red" and the like are recognised."""
    s = _BANDWIDTH.sub("", name.strip().casefold()).strip()
    return _SPELLINGS.get(_SEPARATORS.sub("", s))


def filter_key(name: str | None) -> str:
    """The identity of a filter: its FITS value without case or surrounding blanks ('' = no FILTER card), and for
    a filter known by name (canonical_filter) its one spelling — 'H-alpha', 'Halpha' and 'HA' are 'Ha' (two capture
    programs naming one wheel's filter differently make one stack, as for the flats) — with the bandwidth the
    name gives, if any ('Ha 7nm' and 'Ha 3nm' stay two)."""
    folded = (name or "").strip().casefold()
    canon = canonical_filter(folded)
    if canon is None:
        return folded
    bw = _BANDWIDTH.search(folded)
    return canon.casefold() + (f" {float(bw.group(1).replace(',', '.')):g}nm" if bw else "")


def folded(name: str | None) -> str:
    """A filter name in letters and digits only, without case: "L-eXtreme 7nm" -> "lextreme7nm", "No Filter" ->
    "nofilter"."""
    return "".join(ch for ch in (name or "").casefold() if ch.isalnum())


def is_dual_band(name: str | None) -> bool:
    """Whether a FILTER value names a dual-band filter (Ha and OIII) for colour cameras: "L-eXtreme 7nm", "HaOIII",
    also after its maker's name, as filter wheels are often named ("Optolong L-eXtreme", "IDAS NBZ")."""
    key = folded(name)
    return any(k in key for k in DUAL_BAND)
