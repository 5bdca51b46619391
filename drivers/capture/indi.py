"""Capture from an INDI server (ZWO, QHY, Atik, … cameras, filter wheels) into the watched folder.

    python -m drivers.capture.indi 60 --count 30 --gain 120 --temperature -10 --filter-slot 1 -o ~/lights

The client speaks the INDI XML protocol over TCP with the standard library: no dependency to build on a Pi,
and the few messages a capture needs (getProperties, new*Vector, enableBLOB, set*Vector/def*Vector in) are
simple. A frame arrives as a base64 BLOB (".fits", or ".fits.z" when the driver compresses with zlib); the
FITS header is completed with what we know and the file written atomically before the next exposure starts,
so a frame once downloaded is never lost. When the server goes away the driver logs one line, reconnects
with back-off, sets the camera up again and repeats the exposure it did not receive.
"""
from __future__ import annotations

import argparse
import base64
import logging
import math
import re
import select
import socket
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write
from .common import (Backoff, CaptureError, CapturePlan, IMAGETYP, Stop, StopRequested, add_plan_arguments,
                     check_seconds, frame_name, module_main, retry, run_capture, run_plan, start_capture, write_frame)

log = logging.getLogger("drivers.capture.indi")

CCD_INTERFACE, FILTER_INTERFACE = 1 << 1, 1 << 4   # bits of DRIVER_INFO.DRIVER_INTERFACE
MAIN_CHIP = "CCD1"                                  # the BLOB of the main chip's frames (CCD2: a guide head)
FRAME_TYPE = {"light": "FRAME_LIGHT", "bias": "FRAME_BIAS", "dark": "FRAME_DARK", "flat": "FRAME_FLAT",
              "darkflat": "FRAME_DARK"}


class IndiLost(ConnectionError):
    """The server closed the connection, or sent something that is not INDI XML."""


class DeviceLost(IndiLost):
    """The camera device went away while the server stayed (its driver restarted, its USB link dropped):
    retried like a lost server."""


class ExposureFailed(OSError):
    """The camera's driver answered our exposure with Alert (a camera error, USB trouble): retried like a lost
    camera, and said as what it is — it was a TimeoutError, logged 'TimeoutError: CCD: exposure failed'."""


class ForeignFrame(ConnectionError):
    """Another program on the camera changed what our frame is: it started its own exposure (an INDI camera
    restarts with the newest request and sends the frame to every client), or turned the filter wheel. Retried
    like a lost camera: set up again (the wheel turned back, frame type and binning set again) and exposed again."""


@dataclass
class Vector:
    """One INDI property as last defined/set by the server. values: element name -> float (Number),
    bool (Switch), str (Text, Light); BLOBs are not kept here (see IndiClient.blobs)."""
    device: str
    name: str
    kind: str                      # Number | Switch | Text | Light | BLOB
    state: str = "Idle"            # Idle | Ok | Busy | Alert
    perm: str = "ro"
    values: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)   # Number element -> (min, max)


@dataclass(frozen=True, slots=True)
class Blob:
    device: str
    name: str
    element: str
    format: str                    # ".fits", ".fits.z", …
    data: bytes


def _number(text: str) -> float:
    """INDI numbers may be sexagesimal ('-10:30:00')."""
    text = text.strip()
    if ":" in text:
        parts = [float(p) for p in text.split(":")]
        sign = -1.0 if text.startswith("-") else 1.0
        return sign * sum(abs(p) / 60 ** i for i, p in enumerate(parts))
    return float(text)


class IndiClient:
    """A minimal INDI client over one TCP connection, single-threaded: every wait reads the socket.

    Raises IndiLost (a ConnectionError) when the server goes away, TimeoutError when a wait runs out."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.props: dict[tuple[str, str], Vector] = {}
        self.blobs: list[Blob] = []
        self.messages: list[str] = []
        self.received = 0              # top-level messages handled (quiet() watches it)
        self._sock: socket.socket | None = None
        self._parser: ET.XMLPullParser | None = None
        self._root = None
        self._depth = 0

    @property
    def where(self) -> str:
        return f"INDI {self.host}:{self.port}"

    def connect(self) -> None:
        self.close()
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(b"<indi>")   # the stream is a sequence of top-level elements: give them a root
        self._depth = 0
        self.props.clear()
        self.blobs.clear()
        self.send('<getProperties version="1.7"/>')

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None

    # ------------------------------------------------------------ sending

    def send(self, xml: str) -> None:
        if self._sock is None:
            raise IndiLost("not connected")
        try:
            self._sock.sendall(xml.encode())
        except OSError as err:
            raise IndiLost(f"connection lost ({err.strerror or err})") from err

    def set_values(self, device: str, name: str, values: dict) -> None:
        """Send new values for some elements of a known property (kind taken from its definition)."""
        vec = self.props.get((device, name))
        if vec is None:
            raise KeyError(f"{device}.{name}")
        kind = vec.kind
        parts = []
        for el, v in values.items():
            if kind == "Switch":
                v = "On" if v else "Off"
            parts.append(f'<one{kind} name="{_esc(el)}">{_esc(str(v))}</one{kind}>')
        vec.state = "Busy"   # until the server answers with set*Vector; waits check for Ok/Alert
        self.send(f'<new{kind}Vector device="{_esc(device)}" name="{_esc(name)}">{"".join(parts)}'
                  f'</new{kind}Vector>')

    def enable_blobs(self, device: str, mode: str = "Also", *, name: str | None = None) -> None:
        """Ask for the BLOBs of `device` (only those of its property `name`, if given)."""
        prop = f' name="{_esc(name)}"' if name else ""
        self.send(f'<enableBLOB device="{_esc(device)}"{prop}>{mode}</enableBLOB>')

    # ------------------------------------------------------------ receiving

    def pump(self, timeout: float) -> None:
        """Read and apply whatever arrives within `timeout` s (at least one recv if data is waiting)."""
        if self._sock is None:
            raise IndiLost("not connected")
        try:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
            if not ready:
                return
            data = self._sock.recv(1 << 20)
        except OSError as err:
            raise IndiLost(f"connection lost ({err.strerror or err})") from err
        if not data:
            raise IndiLost("the server closed the connection")
        try:
            self._parser.feed(data)
            for event, elem in self._parser.read_events():
                if event == "start":
                    self._depth += 1
                    if self._depth == 1:
                        self._root = elem          # the synthetic <indi> root
                    continue
                self._depth -= 1
                if self._depth == 1:               # a complete top-level INDI message
                    self._handle(elem)
                    # drop it from the root, or a night's stream would pile up in memory
                    self._root.remove(elem)
        except ET.ParseError as err:
            raise IndiLost(f"not INDI XML ({err})") from err

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Read until done() is true; TimeoutError naming `what` after `timeout` s."""
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            self.pump(min(left, 0.5))

    def quiet(self, gap: float, timeout: float) -> None:
        """Read until the server has sent nothing for ``gap`` s (a driver's burst of definitions is over), or for
        ``timeout`` s at most."""
        end = time.monotonic() + timeout
        while True:
            seen = self.received
            left = end - time.monotonic()
            if left <= 0:
                return
            until = time.monotonic() + min(gap, left)
            while self.received == seen and time.monotonic() < until:
                self.pump(until - time.monotonic())
            if self.received == seen:
                return

    def _handle(self, elem) -> None:
        self.received += 1
        tag = elem.tag
        device, name = elem.get("device", ""), elem.get("name", "")
        if tag.startswith("def") and tag.endswith("Vector"):
            kind = tag[3:-6]
            vec = Vector(device, name, kind, elem.get("state", "Idle"), elem.get("perm", "ro"))
            for child in elem:
                el = child.get("name", "")
                vec.labels[el] = child.get("label", el)
                if kind == "Number":
                    vec.limits[el] = (_number(child.get("min", "0")), _number(child.get("max", "0")))
                if kind != "BLOB":
                    vec.values[el] = self._value(kind, child.text or "")
            self.props[(device, name)] = vec
        elif tag.startswith("set") and tag.endswith("Vector"):
            kind = tag[3:-6]
            vec = self.props.get((device, name))
            if vec is None:  # a set before its def: keep it anyway
                vec = self.props[(device, name)] = Vector(device, name, kind)
            vec.state = elem.get("state", vec.state)
            for child in elem:
                el = child.get("name", "")
                if kind == "BLOB":
                    size = int(float(child.get("size", "0") or 0))
                    if size > 0 and child.text:
                        self.blobs.append(Blob(device, name, el, child.get("format", ""),
                                               base64.b64decode(child.text)))
                else:
                    vec.values[el] = self._value(kind, child.text or "")
                    if kind == "Number" and child.get("min") is not None and child.get("max") is not None:
                        # IUUpdateMinMax: a driver's new range (the sensor size in the simulator's directory mode)
                        vec.limits[el] = (_number(child.get("min")), _number(child.get("max")))
        elif tag == "delProperty":
            if name:
                self.props.pop((device, name), None)
            else:
                for key in [k for k in self.props if k[0] == device]:
                    del self.props[key]
        if elem.get("message"):
            text = f"{device}: {elem.get('message')}" if device else elem.get("message")
            self.messages.append(text)
            log.debug("%s says: %s", self.where, text)

    @staticmethod
    def _value(kind: str, text: str):
        text = text.strip()
        if kind == "Number":
            return _number(text)
        if kind == "Switch":
            return text == "On"
        return text

    # ------------------------------------------------------------ queries

    def get(self, device: str, name: str) -> Vector | None:
        return self.props.get((device, name))

    def devices(self) -> list[str]:
        return list(dict.fromkeys(d for d, _ in self.props))


def _esc(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


# one filter's spellings on wheels and in sequences (case, punctuation and a bandwidth aside); livestack's
# engine keeps one stack for each (livestack.engine.filtername), which the drivers do not import
_SPELLINGS = {"l": "L", "lum": "L", "luminance": "L", "r": "R", "red": "R", "g": "G", "green": "G",
              "b": "B", "blue": "B", "ha": "Ha", "halpha": "Ha", "hα": "Ha", "oiii": "OIII", "o3": "OIII",
              "sii": "SII", "s2": "SII"}


def filter_spelling(name: str) -> str | None:
    """'Luminance', 'lum', 'L' -> 'L'; 'H_Alpha', 'H-alpha 7nm' -> 'Ha'; None for a name not known."""
    key = "".join(ch for ch in name.casefold() if ch.isalnum())
    return _SPELLINGS.get(re.sub(r"\d+(\.\d+)?nm$", "", key))


# ---------------------------------------------------------------- FITS header cards, without a FITS library

def _card(key: str, value, comment: str = "") -> bytes:
    if isinstance(value, bool):
        v = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        v = f"{value:>20d}"
    elif isinstance(value, float):
        v = f"{value:>20.10G}"
    else:
        s = str(value).replace("'", "''")
        v = f"'{s:<8}'"
    text = f"{key:<8}= {v}"
    if comment:
        text += f" / {comment}"
    return text[:80].ljust(80).encode("ascii", "replace")


def _card_text(card: bytes) -> str:
    """The value of a string card ("OBJECT  = 'M 31    '" -> 'M 31'); the raw value text for other cards."""
    text = card[10:].decode("ascii", "replace").strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        while end != -1 and text[end + 1:end + 2] == "'":     # '' is a quote inside the string
            end = text.find("'", end + 2)
        return text[1:end if end != -1 else None].replace("''", "'").rstrip()
    return text.split("/", 1)[0].strip()


def fits_header_value(data: bytes, key: str) -> str | None:
    """The value text of `key` in the primary header of the FITS file `data` (a string card's text without its
    quotes); None when the key is missing or `data` is not FITS."""
    if not data.startswith(b"SIMPLE  ="):
        return None
    want = key.encode("ascii").ljust(8)
    for pos in range(0, len(data) - 79, 80):
        card = data[pos:pos + 80]
        if card[:8] == b"END     ":
            return None
        if card[:8] == want:
            return _card_text(card)
    return None


def fits_size(data: bytes) -> tuple[int, str] | None:
    """(bytes the primary HDU needs: its header blocks + its data, without the final padding; what the header
    says, '64×48 × 16 bits'), from the FITS file `data`'s own header; None when it cannot tell (not FITS, no END
    card in the data, a header without BITPIX/NAXISn)."""
    if not data.startswith(b"SIMPLE  ="):
        return None
    values: dict[str, str] = {}
    for pos in range(0, len(data) - 79, 80):
        key = data[pos:pos + 8].decode("ascii", "replace").strip()
        if key == "END":
            header_len = -(-(pos + 80) // 2880) * 2880
            break
        values.setdefault(key, _card_text(data[pos:pos + 80]))
    else:
        return None
    try:
        bits, axes = abs(int(values["BITPIX"])), [int(values[f"NAXIS{i + 1}"]) for i in range(int(values["NAXIS"]))]
    except (KeyError, ValueError):
        return None
    n = 1
    for a in axes:
        n *= a
    return header_len + (n * bits // 8 if axes else 0), f"{'×'.join(map(str, axes))} × {bits} bits"


def fits_header_update(data: bytes, set_cards: dict, add_cards: dict, *, drop_if: dict | None = None) -> bytes:
    """Return the FITS file `data` with its primary header changed: cards in `set_cards` replaced or added,
    cards in `add_cards` added only if the header lacks them, cards whose key is in `drop_if` removed when
    their value is that text (case-insensitive: a placeholder). Each value is `value` or (value, comment).
    The data unit is kept byte for byte. Raises ValueError if `data` is not a FITS file."""
    if not data.startswith(b"SIMPLE  ="):
        raise ValueError("not a FITS file (no SIMPLE card)")
    cards, pos = [], 0
    while True:
        if pos + 80 > len(data):
            raise ValueError("FITS header has no END card")
        card = data[pos:pos + 80]
        pos += 80
        if card[:8] == b"END     ":
            break
        cards.append(card)
    header_len = -(-pos // 2880) * 2880
    drop = {k: v.lower() for k, v in (drop_if or {}).items()}
    cards = [c for c in cards if drop.get(c[:8].decode("ascii", "replace").strip()) != _card_text(c).lower()]
    keys = [c[:8].decode("ascii", "replace").strip() for c in cards]
    for key, val in {**{k: v for k, v in add_cards.items() if k not in keys}, **set_cards}.items():
        value, comment = val if isinstance(val, tuple) else (val, "")
        new = _card(key, value, comment)
        if key in keys:
            cards[keys.index(key)] = new
        else:
            cards.append(new)
            keys.append(key)
    head = b"".join(cards) + b"END".ljust(80)
    head += b" " * (-len(head) % 2880)
    return head + data[header_len:]


# ---------------------------------------------------------------- the camera

@dataclass(frozen=True, slots=True)
class IndiOptions:
    host: str = "localhost"
    port: int = 7624
    device: str | None = None           # None: the first device with CCD_EXPOSURE / the CCD interface
    filter_slot: int | None = None
    filter: str | None = None           # a filter by its name in the wheel's FILTER_NAME (instead of filter_slot)
    temperature: float | None = None    # °C cooler set point; None: leave the cooler alone
    offset: float | None = None         # camera offset (CCD_OFFSET, CCD_CONTROLS Offset); None: leave it
    temp_timeout: float = 600.0         # s to wait for the set point (±0.5 °C) before capturing anyway
    download_timeout: float = 60.0      # s beyond the exposure for the frame to arrive

    def __post_init__(self):
        check_seconds(self.temp_timeout, "--temp-timeout")
        check_seconds(self.download_timeout, "--download-timeout")
        if self.filter is not None and self.filter_slot is not None:
            raise ValueError(f"--filter {self.filter} and --filter-slot {self.filter_slot}: give one of them")
        if self.filter is not None and not self.filter.strip():
            raise ValueError("--filter '': give a filter's name, e.g. --filter L")
        if self.offset is not None and not math.isfinite(self.offset):
            raise ValueError(f"--offset {self.offset:g}: must be a finite number")
        if self.temperature is not None and not math.isfinite(self.temperature):
            raise ValueError(f"--temperature {self.temperature:g} °C: must be a finite number")


class IndiCamera:
    """Set up one INDI CCD per connection and take frames; see capture()."""

    def __init__(self, opts: IndiOptions, plan: CapturePlan, stop: Stop, *, retry_for: float | None = 600.0):
        self.opts, self.plan, self.stop = opts, plan, stop
        self.retry_for = retry_for          # s a frame in hand waits for disk space (write_frame)
        self.client: IndiClient | None = None
        self.device = ""
        self.seen: str | None = None        # the camera found on a first open(): after it, its absence is a loss
        self.filter_name: str | None = None
        self.wheel: str | None = None        # the device with our FILTER_SLOT (with --filter-slot)
        self.slot: int | None = None         # our slot: --filter-slot, or the slot of --filter's name
        self.gain: float | None = None
        self.offset: float | None = None

    # ------------------------------------------------------------ set-up

    def open(self) -> None:
        c = IndiClient(self.opts.host, self.opts.port)
        c.connect()
        self.client = c
        self.device = self._find_ccd(c)
        self.seen = dev = self.device
        # the main chip's frames only: a camera with a guide head (the simulator, SX, some QHY) sends the guide
        # chip's frames as CCD2 while a guiding program uses it
        c.enable_blobs(dev, name=MAIN_CHIP)
        self._connect(dev, "CCD_EXPOSURE", "camera")
        # the rest of the properties follow CCD_EXPOSURE in the same burst: read until it is over (a fixed 0.3 s
        # was too short on a loaded machine: CCD_GAIN came later, and --gain was ignored as unsupported)
        c.quiet(0.5, 10.0)
        self._exposure_range()
        self._switch(dev, "UPLOAD_MODE", "UPLOAD_CLIENT")
        self._switch(dev, "CCD_TRANSFER_FORMAT", "FORMAT_FITS")
        # compression on sends tile-compressed .fits.fz, which we would write without our header keys
        self._switch(dev, "CCD_COMPRESSION", "INDI_DISABLED")
        self._full_frame()
        self._binning()
        self._gain()
        self._offset()
        self._filter()
        self._switch(dev, "CCD_FRAME_TYPE", FRAME_TYPE[self.plan.kind])
        self._cool()
        log.info("%s: %s ready", c.where, dev)

    def _connect(self, dev: str, needed: str, what: str) -> None:
        """Switch `dev`'s CONNECTION on if it is off and wait for its property `needed` (defined once connected).
        DeviceLost at once, with the driver's reason, when the driver answers Alert (no camera or wheel found:
        unplugged, off, held by another program): retried like a lost camera, found on a later try once plugged
        in — not 30 s of waiting, then 'timed out', on every try of the night."""
        c = self.client
        if not c.get(dev, "CONNECTION").values.get("CONNECT"):
            log.info("connecting %s", dev)
            c.set_values(dev, "CONNECTION", {"CONNECT": True})

        def refused() -> bool:
            vec = c.get(dev, "CONNECTION")
            return vec is not None and vec.state == "Alert" and not vec.values.get("CONNECT")
        c.wait(lambda: c.get(dev, needed) is not None or refused(), 30, f"{dev} to connect ({needed})")
        if c.get(dev, needed) is None:
            said = next((m[len(dev) + 2:] for m in reversed(c.messages) if m.startswith(f"{dev}: ")), "no message")
            raise DeviceLost(f"{dev}: the {what}'s driver could not connect it ({said})")

    def _exposure_range(self) -> None:
        """CaptureError for an exposure outside CCD_EXPOSURE's range: the driver would refuse each one (an Alert,
        which is retried as a failed exposure), so say it once, before cooling and exposing. A bias is the
        camera's shortest exposure whatever its minimum."""
        dev, t = self.device, self.plan.exposure
        lo, hi = self.client.get(dev, "CCD_EXPOSURE").limits.get("CCD_EXPOSURE_VALUE", (0.0, 0.0))
        if self.plan.kind != "bias" and hi > lo and not lo <= t <= hi:
            raise CaptureError(f"{dev}: exposure {t:g} s: the camera takes {lo:g} to {hi:g} s")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def _find_ccd(self, c: IndiClient) -> str:
        want = self.opts.device or self.seen     # on reconnect the camera of the run, not any other CCD there

        def is_ccd(dev: str) -> bool:
            if c.get(dev, "CONNECTION") is None:
                return False
            if c.get(dev, "CCD_EXPOSURE") is not None:
                return True
            info = c.get(dev, "DRIVER_INFO")
            try:
                return bool(int(float(info.values.get("DRIVER_INTERFACE", "0"))) & CCD_INTERFACE)
            except (AttributeError, ValueError):
                return False

        def found() -> bool:
            return (c.get(want, "CONNECTION") is not None) if want else any(map(is_ccd, c.devices()))

        # Wait for the definitions; give up early once the server has been quiet for 2 s with devices
        # defined but not ours (a wrong --device should fail in seconds, a slow driver start still work).
        end = time.monotonic() + 15
        seen, quiet_since = -1, time.monotonic()
        while not found():
            now = time.monotonic()
            if len(c.props) != seen:
                seen, quiet_since = len(c.props), now
            if now > end or (c.devices() and now - quiet_since > 2.0):
                break
            c.pump(0.2)
        if not found():
            if self.seen is not None:
                # the camera was there before: its driver restarting, not a wrong --device; try again
                raise DeviceLost(f"{self.seen} is not on the server (devices: {', '.join(c.devices()) or 'none'})")
            if c.devices():
                raise CaptureError(f"{c.where}: no {'device ' + repr(want) if want else 'CCD device'} "
                                   f"(devices: {', '.join(c.devices())})")
            raise TimeoutError("no devices defined in 15 s")
        return want or next(d for d in c.devices() if is_ccd(d))

    def _switch(self, dev: str, name: str, element: str, *, wait: bool = True) -> bool:
        c = self.client
        vec = c.get(dev, name)
        if vec is None or element not in vec.values:
            return False
        if not vec.values[element]:
            c.set_values(dev, name, {element: True})
            if wait:
                self._settle(dev, name)
        return True

    def _set_numbers(self, dev: str, name: str, values: dict, what: str) -> None:
        self.client.set_values(dev, name, values)
        self._settle(dev, name, what=what)

    def _settle(self, dev: str, name: str, *, what: str | None = None, timeout: float = 30.0) -> None:
        """Wait for the server's answer to a new*Vector (state Ok or Idle); CaptureError on Alert."""
        c = self.client
        c.wait(lambda: c.get(dev, name) is None or c.get(dev, name).state != "Busy", timeout,
               f"{dev}.{name}")
        vec = c.get(dev, name)
        if vec is not None and vec.state == "Alert":
            last = c.messages[-1] if c.messages else "no message"
            raise CaptureError(f"{dev}: {what or name} refused ({last})")

    def _full(self) -> dict | None:
        """CCD_FRAME of the whole sensor ({X: 0, Y: 0, WIDTH, HEIGHT} at their maxima), None without one."""
        vec = self.client.get(self.device, "CCD_FRAME")
        w, h = (vec.limits.get(k, (0.0, 0.0))[1] for k in ("WIDTH", "HEIGHT")) if vec else (0.0, 0.0)
        return {"X": 0.0, "Y": 0.0, "WIDTH": w, "HEIGHT": h} if w > 0 and h > 0 else None

    def _full_frame(self) -> None:
        """The whole sensor: a subframe left by a focusing tool (or a plate-solving run) would make every light a
        small crop of the field."""
        full, vec = self._full(), self.client.get(self.device, "CCD_FRAME")
        if full is not None and any(vec.values.get(k) != v for k, v in full.items()):
            log.info("%s: subframe %s: setting the full frame", self.device, self._frame_text(vec.values))
            self._set_numbers(self.device, "CCD_FRAME", full, "the full frame")

    def _subframe(self) -> str | None:
        """'CCD: subframe 200×100 at (100, 50), not the full 1280×1024' when CCD_FRAME is not the whole sensor."""
        full, vec = self._full(), self.client.get(self.device, "CCD_FRAME")
        if full is None or all(vec.values.get(k) == v for k, v in full.items()):
            return None
        return (f"{self.device}: subframe {self._frame_text(vec.values)}, "
                f"not the full {full['WIDTH']:g}×{full['HEIGHT']:g}")

    @staticmethod
    def _frame_text(v: dict) -> str:
        return f"{v.get('WIDTH', 0):g}×{v.get('HEIGHT', 0):g} at ({v.get('X', 0):g}, {v.get('Y', 0):g})"

    def _binning(self) -> None:
        dev, b = self.device, self.plan.binning
        vec = self.client.get(dev, "CCD_BINNING")
        if vec is None:
            if b != 1:
                raise CaptureError(f"{dev}: no CCD_BINNING property; cannot bin {b}×{b}")
            return
        hi = vec.limits.get("HOR_BIN", (1, b))[1]
        if b > hi:
            raise CaptureError(f"{dev}: --binning {b}: the camera bins up to {hi:g}×{hi:g}")
        if vec.values.get("HOR_BIN") != b or vec.values.get("VER_BIN") != b:
            self._set_numbers(dev, "CCD_BINNING", {"HOR_BIN": b, "VER_BIN": b}, f"binning {b}×{b}")

    def _gain(self) -> None:
        """CCD_GAIN.GAIN (INDI standard) or the 'Gain' element of CCD_CONTROLS (ZWO, some QHY drivers)."""
        self.gain = self._control("gain", self.plan.gain, "CCD_GAIN", "GAIN")

    def _offset(self) -> None:
        """CCD_OFFSET.OFFSET or the 'Offset' element of CCD_CONTROLS: set with --offset, recorded (OFFSET) either
        way, for `livestack masters` refuses a bias or dark of another offset only when the frames say theirs."""
        self.offset = self._control("offset", self.opts.offset, "CCD_OFFSET", "OFFSET")

    def _control(self, what: str, want: float | None, prop: str, element: str) -> float | None:
        """Set the camera's `what` (gain, offset) to `want` (None: leave it) through `prop`.`element` (INDI
        standard) or the element of CCD_CONTROLS named `what` (ZWO, some QHY drivers); its value, None when the
        camera has no such control."""
        c, dev = self.client, self.device
        target = None
        if want is not None:     # asked for: a slow driver may still be defining it
            try:
                c.wait(lambda: c.get(dev, prop) is not None or c.get(dev, "CCD_CONTROLS") is not None, 5.0,
                       f"{dev} to define its {what} control")
            except TimeoutError:
                pass
        vec = c.get(dev, prop)
        if vec is not None and element in vec.values:
            target = (prop, element)
        else:
            vec = c.get(dev, "CCD_CONTROLS")
            el = next((e for e in (vec.values if vec else {}) if e.lower() == what), None)
            if el is not None:
                target = ("CCD_CONTROLS", el)
        if target is None:
            if want is not None:
                log.warning("%s has no %s control (%s, CCD_CONTROLS %s); ignoring --%s %g",
                            dev, what, prop, what.capitalize(), what, want)
            return None
        lo, hi = c.get(dev, target[0]).limits.get(target[1], (0.0, 0.0))
        if want is not None and hi > lo and not lo <= want <= hi:
            # the driver would keep its own setting without a word (the simulator does), and the night with it
            raise CaptureError(f"{dev}: --{what} {want:g}: the camera takes {lo:g} to {hi:g}")
        if want is not None and c.get(dev, target[0]).values[target[1]] != want:
            self._set_numbers(dev, target[0], {target[1]: want}, f"{what} {want:g}")
        return c.get(dev, target[0]).values[target[1]]

    def _filter(self) -> None:
        """FILTER_SLOT on the CCD itself (built-in wheels) or on a filter wheel device (connected if needed);
        the name from its FILTER_NAME. Only with --filter-slot: without it the filter is not recorded."""
        c, slot = self.client, self.opts.filter_slot
        self.filter_name = self.wheel = None
        self.slot = slot
        if slot is None and self.opts.filter is None:
            return
        asked = f"--filter-slot {slot}" if slot is not None else f"--filter {self.opts.filter}"
        wheel = next((d for d in [self.device] + c.devices() if c.get(d, "FILTER_SLOT") is not None), None)
        if wheel is None:
            for d in c.devices():
                info = c.get(d, "DRIVER_INFO")
                try:
                    is_wheel = int(float(info.values.get("DRIVER_INTERFACE", "0"))) & FILTER_INTERFACE
                except (AttributeError, ValueError):
                    is_wheel = False
                if is_wheel and d != self.device and c.get(d, "CONNECTION") is not None:
                    self._connect(d, "FILTER_SLOT", "filter wheel")
                    wheel = d
                    break
        if wheel is None:
            raise CaptureError(f"{asked}: no filter wheel on {c.where} "
                               f"(no FILTER_SLOT on {', '.join(c.devices())})")
        lo, hi = c.get(wheel, "FILTER_SLOT").limits.get("FILTER_SLOT_VALUE", (1, slot or 1))
        if slot is None:
            slot = self.slot = self._slot_of(wheel, self.opts.filter, lo, hi)
        if not lo <= slot <= hi:
            raise CaptureError(f"--filter-slot {slot}: {wheel} has slots {lo:g}..{hi:g}")
        if c.get(wheel, "FILTER_SLOT").values.get("FILTER_SLOT_VALUE") != slot:
            log.info("%s: moving to slot %d", wheel, slot)
            self._set_numbers(wheel, "FILTER_SLOT", {"FILTER_SLOT_VALUE": slot}, f"filter slot {slot}")
        self.wheel, self.filter_name = wheel, self._slot_name(wheel, slot)
        if (why := self._wheel_off()) is not None:      # a wheel that answers Ok where it stopped: stuck
            raise CaptureError(f"{asked}: {why} after the move")

    def _slot_of(self, wheel: str, name: str, lo: float, hi: float) -> int:
        """The slot of the filter `name` in `wheel`'s FILTER_NAME: the one of that name whatever its case ('l' for
        'L'), else the one that is the same filter by another spelling ('L' for 'Luminance', 'Ha' for 'H_Alpha');
        CaptureError naming the wheel's filters when none is, or several are."""
        c = self.client
        try:   # a wheel just connected defines FILTER_NAME after FILTER_SLOT
            c.wait(lambda: c.get(wheel, "FILTER_NAME") is not None, 5.0, f"{wheel} to name its filters")
        except TimeoutError:
            pass
        slots = list(range(int(lo), int(hi) + 1))
        names = {s: self._slot_name(wheel, s) for s in slots}
        for same in (lambda a, b: a.strip().casefold() == b.strip().casefold(),
                     lambda a, b: (k := filter_spelling(a)) is not None and k == filter_spelling(b)):
            found = [s for s in slots if same(names[s], name)]
            if len(found) == 1:
                if names[found[0]] != name:
                    log.info("--filter %s: %s slot %d, %s", name, wheel, found[0], names[found[0]])
                return found[0]
            if found:
                raise CaptureError(f"--filter {name}: {wheel} has it in slots "
                                   f"{', '.join(f'{s} ({names[s]})' for s in found)}: give --filter-slot")
        raise CaptureError(f"--filter {name}: {wheel} has no such filter "
                           f"({', '.join(f'{s} {names[s]}' for s in slots)})")

    def _slot_name(self, wheel: str, slot: float) -> str:
        names = self.client.get(wheel, "FILTER_NAME")
        return (names.values.get(f"FILTER_SLOT_NAME_{slot:g}") if names else None) or f"slot{slot:g}"

    def _wheel_off(self) -> str | None:
        """Why the wheel is not at our slot ('Wheel: filter wheel at slot 1 (Red), not 3 (Blue)'), None when it
        is. Its FILTER_SLOT is kept current by the server's messages to every client: no request is sent."""
        if self.wheel is None:
            return None
        vec, slot = self.client.get(self.wheel, "FILTER_SLOT"), self.slot
        if vec is None:
            raise DeviceLost(f"{self.wheel} (the filter wheel) went away")
        at = vec.values.get("FILTER_SLOT_VALUE")
        if at == slot and vec.state != "Busy":
            return None
        where = "moving" if vec.state == "Busy" else f"at slot {at:g} ({self._slot_name(self.wheel, at)})"
        return f"{self.wheel}: filter wheel {where}, not {slot} ({self.filter_name})"

    def _cool(self) -> None:
        c, dev, target = self.client, self.device, self.opts.temperature
        if target is None:
            return
        vec = c.get(dev, "CCD_TEMPERATURE")
        if vec is None:
            log.warning("%s has no cooler (CCD_TEMPERATURE); ignoring --temperature %g", dev, target)
            return
        lo, hi = vec.limits.get("CCD_TEMPERATURE_VALUE", (0.0, 0.0))
        if hi > lo and not lo <= target <= hi:
            # refused by the driver, the wait would last all of --temp-timeout before capturing anyway
            raise CaptureError(f"{dev}: --temperature {target:g} °C: the cooler takes {lo:g} to {hi:g} °C")
        self._switch(dev, "CCD_COOLER", "COOLER_ON", wait=False)
        c.set_values(dev, "CCD_TEMPERATURE", {"CCD_TEMPERATURE_VALUE": target})
        t0 = time.monotonic()

        def temp() -> float:
            vec = c.get(dev, "CCD_TEMPERATURE")
            if vec is None:                   # deleted: the camera's driver died or was restarted meanwhile
                raise DeviceLost(f"{dev} went away while cooling")
            return vec.values.get("CCD_TEMPERATURE_VALUE")
        log.info("%s: cooling to %g °C (now %.1f °C, waiting up to %g s)", dev, target, temp(),
                 self.opts.temp_timeout)
        try:
            c.wait(lambda: abs(temp() - target) <= 0.5 or self.stop.requested, self.opts.temp_timeout,
                   f"{dev} to reach {target:g} °C")
        except TimeoutError:
            # darks at a slightly warmer temperature are still useful, and the header says what it was
            log.warning("%s: cooler did not reach %g °C in %g s (at %.1f °C); capturing anyway",
                        dev, target, self.opts.temp_timeout, temp())
            return
        if self.stop.requested:   # not a frame at the wrong temperature: the run ends here
            raise StopRequested(f"{dev}: stopped while cooling (at {temp():.1f} °C)")
        log.info("%s: at %.1f °C after %.0f s", dev, temp(), time.monotonic() - t0)

    # ------------------------------------------------------------ exposures

    def take(self, index: int) -> Path:
        """Expose, receive and write frame `index` (reconnecting first if needed). Returns the path."""
        try:
            if self.client is None:
                self.open()
                if self.stop.requested:   # during the set-up (a reconnect, the cooler): start no exposure
                    raise StopRequested(f"{self.device}: stopped before frame {index}")
            blob, start, ccd_temp = self._expose(index)
        except (OSError, TimeoutError):
            self.close()  # the next try starts from a fresh connection and a fresh set-up (a failed one too)
            raise
        except KeyboardInterrupt:   # a second Ctrl-C / SIGTERM: the camera stops too, not only this program
            self._abort()
            raise
        # outside the camera's errors: a full disk or an unwritable folder is not a lost camera, and the frame
        # in hand is kept (write_frame), not thrown away for a new exposure
        return self._write(index, blob, start, ccd_temp)

    def _abort(self) -> None:
        """Send CCD_ABORT_EXPOSURE, best effort: the camera would otherwise go on exposing and downloading for
        nobody, and might still be busy for the next run."""
        c, dev = self.client, self.device
        if c is None or c.get(dev, "CCD_ABORT_EXPOSURE") is None:
            return
        try:
            c.set_values(dev, "CCD_ABORT_EXPOSURE", {"ABORT": True})
            log.warning("%s: exposure aborted", dev)
        except OSError:
            pass

    def _expose(self, index: int) -> tuple[Blob, datetime, float | None]:
        """Expose and receive frame `index`: (the BLOB, the UTC start, the sensor temperature at the start)."""
        c, dev, t = self.client, self.device, self.plan.exposure
        c.blobs.clear()
        if (why := self._wheel_off()) is not None:   # turned by another program since our set-up
            raise ForeignFrame(f"{why}: turned by another program; setting up again")
        # another program (a focusing tool) may have set a subframe, binning or frame type of its own since the
        # last frame: ours again — nothing is sent when they are unchanged
        self._full_frame()
        self._binning()
        self._switch(dev, "CCD_FRAME_TYPE", FRAME_TYPE[self.plan.kind])
        temp_vec = c.get(dev, "CCD_TEMPERATURE")
        ccd_temp = temp_vec.values.get("CCD_TEMPERATURE_VALUE") if temp_vec else None
        start = datetime.now(timezone.utc)
        c.set_values(dev, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": t})
        exp = c.get(dev, "CCD_EXPOSURE")

        def arrived() -> bool:
            if c.get(dev, "CCD_EXPOSURE") is None:
                raise DeviceLost(f"{dev} went away during frame {index}")
            if exp.state == "Alert":
                last = c.messages[-1] if c.messages else "no message"
                raise ExposureFailed(f"{dev}: exposure failed ({last})")
            return any(self._ours(b) for b in c.blobs)

        c.wait(arrived, t + self.opts.download_timeout, f"frame {index} from {dev}")
        blob = next(b for b in c.blobs if self._ours(b))
        c.blobs.clear()
        if blob.format.lower().endswith(".z"):
            blob = replace(blob, data=zlib.decompress(blob.data), format=blob.format[:-2])
        size = fits_size(blob.data) if blob.format.lower() in (".fits", ".fit", ".fts") else None
        if size is not None and len(blob.data) < size[0]:
            # not written: the daemon would wait for the rest of the file, then record it failed; taken again
            raise IndiLost(f"{dev}: frame {index} is truncated: {len(blob.data)} of {size[0]} bytes (its header "
                           f"says {size[1]})")
        self._check_exposure(blob, exp)
        if (why := self._wheel_off()) is not None:   # turned during the exposure: a frame through two filters
            raise ForeignFrame(f"{why} at the end of frame {index}: turned by another program; not written")
        if (why := self._subframe()) is not None:    # set during the exposure: the frame is a crop of the field
            raise ForeignFrame(f"{why} at the end of frame {index}: set by another program; not written")
        return blob, start, ccd_temp

    def _check_exposure(self, blob: Blob, exp: Vector) -> None:
        """ForeignFrame when the frame's own EXPTIME (written by the INDI driver) is not the exposure we asked
        for: another program's exposure on this camera, which would otherwise be written under our name and
        our EXPTIME. 30 % (a third of a stop, a DSLR's nearest speed) + 10 ms of slack for drivers that round;
        a bias may be any exposure from the camera's shortest (what INDI's CCD takes for FRAME_BIAS) to ours."""
        text = fits_header_value(blob.data, "EXPTIME")
        try:
            got = float(text) if text is not None else None
        except ValueError:
            got = None
        if got is None:
            return
        shortest = exp.limits.get("CCD_EXPOSURE_VALUE", (0.0, 0.0))[0]
        want = max(self.plan.exposure, shortest)
        if self.plan.kind == "bias" and shortest - 0.01 <= got <= want:
            return
        if abs(got - want) > 0.3 * want + 0.01:
            raise ForeignFrame(f"{self.device}: the frame received is a {got:g} s exposure, not our "
                               f"{self.plan.exposure:g} s: another program is using the camera; not written")

    def _ours(self, blob: Blob) -> bool:
        """A frame of our exposure: the main chip's, not a guide head's (CCD2) taken by a guiding program."""
        return blob.device == self.device and blob.name == MAIN_CHIP

    def _write(self, index: int, blob: Blob, start: datetime, ccd_temp: float | None) -> Path:
        data, fmt = blob.data, blob.format.lower() or ".fits"     # decompressed by _expose
        ext = fmt if fmt.startswith(".") else "." + fmt
        if ext in (".fits", ".fit", ".fts"):
            data = self._enrich(data, start, ccd_temp)
            ext = ".fits"
        else:
            log.warning("%s sent %s, not FITS: written as is, without our header keys", self.device, ext)
        path = self.plan.folder / frame_name(self.plan.kind, index, self.plan.exposure, ext,
                                             filter=self.filter_name)
        return write_frame(path, lambda: atomic_write(path, data), stop=self.stop, give_up=self.retry_for)

    def _enrich(self, data: bytes, start: datetime, ccd_temp: float | None) -> bytes:
        """What we asked for replaces the device's cards (IMAGETYP, EXPTIME, GAIN, FILTER); what the camera
        measures is added only when missing (DATE-OBS, CCD-TEMP, INSTRUME, BAYERPAT)."""
        c, dev, plan = self.client, self.device, self.plan
        put: dict = {"IMAGETYP": IMAGETYP[plan.kind], "EXPTIME": (float(plan.exposure), "[s] exposure time")}
        if self.gain is not None:
            put["GAIN"] = (float(self.gain), "camera gain setting")
        if self.offset is not None:
            put["OFFSET"] = (float(self.offset), "camera offset setting")
        if self.filter_name:
            put["FILTER"] = self.filter_name
        add: dict = {"DATE-OBS": (start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "UTC start of exposure"),
                     "INSTRUME": dev, "XBINNING": plan.binning, "YBINNING": plan.binning}
        if ccd_temp is not None:
            add["CCD-TEMP"] = (float(ccd_temp), "[C] sensor temperature")
        cfa = c.get(dev, "CCD_CFA")
        if cfa is not None and str(cfa.values.get("CFA_TYPE", "")).strip():
            add["BAYERPAT"] = str(cfa.values["CFA_TYPE"]).strip()
            for key, el in (("XBAYROFF", "CFA_OFFSET_X"), ("YBAYROFF", "CFA_OFFSET_Y")):
                try:
                    add[key] = int(float(cfa.values.get(el, 0)))
                except ValueError:
                    pass
        try:
            # OBJECT 'Unknown' is INDI's FITS_HEADER default, no target: livestack would take it for a name
            return fits_header_update(data, put, add, drop_if={"OBJECT": "Unknown"})
        except ValueError as err:
            log.warning("%s: frame header not updated (%s); written as received", dev, err)
            return data


def capture(plan: CapturePlan, opts: IndiOptions, stop: Stop | None = None, *, retry_for: float = 600.0,
            on_frame=None) -> list[Path]:
    """Take plan.count frames (or until stopped) through INDI; returns the written paths in order.
    Raises CaptureError when the camera cannot do what was asked, or the last connection error once the
    server has been unreachable for `retry_for` s."""
    stop = stop or Stop()
    cam = IndiCamera(opts, plan, stop, retry_for=retry_for)
    backoff = Backoff(first=1.0, cap=30.0, give_up=retry_for)
    where = f"INDI {opts.host}:{opts.port}"

    def take(index: int) -> Path:
        return retry(lambda: cam.take(index), what=f"{where} (frame {index})", backoff=backoff,
                     retry_on=(OSError, TimeoutError), stop=stop)
    try:
        return run_plan(plan, take, stop, on_frame=on_frame)
    finally:
        cam.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_arguments(p, gain_help="camera gain (CCD_GAIN, or the Gain of CCD_CONTROLS)")
    p.add_argument("--host", default="localhost", help="INDI server (default localhost)")
    p.add_argument("--port", type=int, default=7624, help="INDI port (default 7624)")
    p.add_argument("--device", help="CCD device name (default: the first camera the server has)")
    p.add_argument("--filter-slot", type=int, help="filter wheel slot (1-based); records FILTER")
    p.add_argument("--filter", help="filter wheel slot by its name in the wheel (L, Red, Ha, …: case and the "
                                    "usual spellings aside); instead of --filter-slot")
    p.add_argument("--offset", type=float,
                   help="camera offset (CCD_OFFSET, or the Offset of CCD_CONTROLS); recorded as OFFSET either way")
    p.add_argument("--temperature", type=float, help="cooler set point, °C; waits until within 0.5 °C")
    p.add_argument("--temp-timeout", type=float, default=600.0,
                   help="longest wait for the set point, s (then captures anyway; default 600)")
    p.add_argument("--download-timeout", type=float, default=60.0,
                   help="time allowed beyond the exposure for the frame to arrive, s (default 60)")


def run(args) -> int:
    """Run from parsed arguments; 0 ok (count done or stopped), 1 failed, 2 usage."""
    plan = start_capture("indi", args)
    if plan is None:
        return 2
    try:
        opts = IndiOptions(host=args.host, port=args.port, device=args.device, filter_slot=args.filter_slot,
                           filter=args.filter,
                           temperature=args.temperature, offset=args.offset, temp_timeout=args.temp_timeout,
                           download_timeout=args.download_timeout)
    except ValueError as err:
        print(f"capture indi: {err}", file=sys.stderr)
        return 2
    return run_capture("indi", plan, lambda stop: capture(plan, opts, stop, retry_for=args.retry_for),
                       gave_up=lambda err: isinstance(err, (OSError, TimeoutError)))


def main(argv: list[str] | None = None) -> int:
    return module_main("drivers.capture.indi", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
