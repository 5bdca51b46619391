"""A stand-in for python-gphoto2 (the parts drivers.capture.gphoto uses): a Canon-like camera whose longest
shutter speed is 1/10 s, so that longer exposures are bulb (eosremoterelease), set to RAW+JPEG: each bulb
frame adds two files, IMG_n.CR2 then IMG_n.JPG, each announced by its own FILE_ADDED event as real cameras do
(a timed capture() makes its RAW only).
Install it with monkeypatch.setitem(sys.modules, "gphoto2", fake_gphoto2); Camera.last is the camera."""
from __future__ import annotations

import collections
import time

__version__ = "fake"
GP_EVENT_UNKNOWN, GP_EVENT_TIMEOUT, GP_EVENT_FILE_ADDED = 0, 1, 2
GP_ERROR_TIMEOUT = -10
GP_ERROR_MODEL_NOT_FOUND = -105     # what init() says when no camera is found ('Unknown model')
GP_ERROR_CAMERA_BUSY = -110
GP_CAPTURE_IMAGE = 0
GP_FILE_TYPE_NORMAL = 1


class GPhoto2Error(Exception):
    def __init__(self, code):
        super().__init__(f"[{code}] fake error")
        self.code = code


class Widget:
    def __init__(self, name, value, choices=()):
        self.name, self.value, self.choices = name, value, list(choices)

    def get_value(self):
        return self.value

    def set_value(self, v):
        self.value = v

    def count_choices(self):
        return len(self.choices)

    def get_choice(self, i):
        return self.choices[i]


class Config:
    def __init__(self, state):
        self.w = {k: Widget(k, v, c) for k, (v, c) in state.items()}

    def get_child_by_name(self, n):
        if n not in self.w:
            raise GPhoto2Error(-2)
        return self.w[n]


class CameraFilePath:
    def __init__(self, folder, name):
        self.folder, self.name = folder, name


class CameraFile:
    def __init__(self, data):
        self.data = data

    def get_data_and_size(self):
        return self.data


class Abilities:
    model = "Fake Canon EOS"


class Camera:
    last: "Camera | None" = None
    file_delay = 0.0     # s between the release and the files' events (long-exposure noise reduction: a dark)
    config_failures = 0  # the next get_config() calls that fail (a USB glitch during the set-up)
    press_failures: list = []  # error codes of the next bulb presses that fail (-110: the camera is busy)
    download_failures: list = []  # error codes of the next file_get() calls that fail (-7: a USB error)
    init_failures: list = []   # error codes of the next init() calls that fail (-105: no camera on USB)

    def __init__(self):
        self.state = {"iso": ("800", ["100", "800"]), "shutterspeed": ("1/10", ["1/100", "1/10", "bulb"]),
                      "eosremoterelease": ("None", ["None", "Press Full", "Release Full"])}
        self.events = collections.deque()
        self.n = 0
        self.card: dict[str, bytes] = {}
        self.log: list[str] = []           # config changes, downloads, deletions, in order
        if Camera.last is not None:        # the same camera opened again (after a USB error): its card, its log
            self.state, self.n, self.card, self.log = Camera.last.state, Camera.last.n, Camera.last.card, Camera.last.log
        Camera.last = self

    def init(self):
        if Camera.init_failures:
            raise GPhoto2Error(Camera.init_failures.pop(0))
        self.log.append("init")

    def exit(self):
        self.log.append("exit")

    def get_abilities(self):
        return Abilities()

    def get_config(self):
        if Camera.config_failures:
            Camera.config_failures -= 1
            raise GPhoto2Error(-7)      # GP_ERROR_IO
        return Config(self.state)

    def set_config(self, config):
        if Camera.press_failures and config.w["eosremoterelease"].value == "Press Full":
            raise GPhoto2Error(Camera.press_failures.pop(0))
        for k, w in config.w.items():
            if self.state[k][0] != w.value:
                self.log.append(f"set {k}={w.value}")
                self.state[k] = (w.value, self.state[k][1])
                if k == "eosremoterelease" and w.value == "Release Full":
                    self.n += 1
                    cr2, jpg = f"IMG_{self.n:04d}.CR2", f"IMG_{self.n:04d}.JPG"
                    self.card[cr2] = b"II*\x00\x10\x00\x00\x00CR\x02\x00" + f"raw frame {self.n}".encode()
                    self.card[jpg] = b"\xff\xd8\xff\xe0" + f"jpeg frame {self.n}".encode()
                    ready = time.monotonic() + self.file_delay
                    self.events.append((ready, GP_EVENT_FILE_ADDED, CameraFilePath("/store/DCIM", cr2)))
                    self.events.append((ready, GP_EVENT_FILE_ADDED, CameraFilePath("/store/DCIM", jpg)))

    def wait_for_event(self, ms):
        end = time.monotonic() + ms / 1000
        while self.events and self.events[0][0] > time.monotonic():   # announced only once the file is made
            if time.monotonic() >= end:
                return GP_EVENT_TIMEOUT, None
            time.sleep(min(0.01, ms / 1000))
        if self.events:
            return self.events.popleft()[1:]
        return GP_EVENT_TIMEOUT, None

    def capture(self, kind):
        """A timed exposure at the shutter speed set (bulb: the camera cannot), RAW only."""
        speed = self.state["shutterspeed"][0]
        self.log.append(f"capture at {speed}")
        if speed == "bulb":
            raise GPhoto2Error(-6)
        self.n += 1
        name = f"IMG_{self.n:04d}.CR2"
        self.card[name] = b"II*\x00\x10\x00\x00\x00CR\x02\x00" + f"raw frame {self.n} at {speed}".encode()
        return CameraFilePath("/store/DCIM", name)

    def file_get(self, folder, name, kind):
        if Camera.download_failures:
            self.log.append(f"failed download {name}")
            raise GPhoto2Error(Camera.download_failures.pop(0))
        self.log.append(f"download {name}")
        return CameraFile(self.card[name])

    def file_delete(self, folder, name):
        self.log.append(f"delete {name}")
        self.card.pop(name, None)
