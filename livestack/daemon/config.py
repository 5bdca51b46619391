"""Typed [watch], [daemon], [session] and [web] sections of livestack.toml (Config.extra passes them through raw)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, ConfigError, make_section


@dataclass(frozen=True, slots=True)
class WatchParams:
    dir: str | None = None          # the capture folder (`--watch` overrides)
    recursive: bool = False         # also watch subfolders
    settle_s: float = 1.0           # a file's size must stay unchanged this long before it is read …
    settle_complete_s: float = 0.25  # … or this long when its own layout shows a whole image (FITS, DNG and
                                    #     other TIFF-based RAW): the page shows a frame ~0.75 s sooner
    timeout_s: float = 120.0        # a file still incomplete this long after it appeared is marked failed
    rescan_s: float = 10.0          # full rescan of the folder (catches events a USB/network mount never sends)
    follow_symlinks: bool = False   # read files through symbolic links that lead out of the folder (links that
                                    #     stay inside are always followed — but for one to a file watched itself,
                                    #     the same frame twice: recorded failed); false: recorded failed, not read

    def __post_init__(self):
        if not 0 <= self.settle_s <= 600:
            raise ConfigError(f"watch.settle_s = {self.settle_s}: must be in [0, 600]")
        if not 0 <= self.settle_complete_s <= 600:
            raise ConfigError(f"watch.settle_complete_s = {self.settle_complete_s}: must be in [0, 600]")
        if not self.settle_s < self.timeout_s <= 86400:
            raise ConfigError(f"watch.timeout_s = {self.timeout_s}: must be above settle_s and at most a day")
        if not 0.5 <= self.rescan_s <= 3600:
            raise ConfigError(f"watch.rescan_s = {self.rescan_s}: must be in [0.5, 3600]")


@dataclass(frozen=True, slots=True)
class DaemonParams:
    out: str | None = None          # the session folder (`--out` overrides)
    masters: str | None = None      # master library folder (from `livestack masters`), optional
    outputs_every: int = 1          # write stack.fits every this many stacked frames …
    outputs_s: float = 30.0         # … and at most this often, s, while frames keep coming (at once when idle).
                                    #     A 24 MP stack.fits takes ~1.5 s to write: 60 suits a Pi; the
                                    #     checkpoint keeps every frame safe meanwhile
    preview_s: float = 2.0          # preview.jpg after every stacked frame, but at most this often, s, while
                                    #     files wait in the queue (a backlog: 0.2 s per 24 MP preview)
    backlog_share: float = 0.1      # while files wait (a backlog), the outputs take at most about this share of
                                    #     the time: half for preview.jpg, a quarter each for stack.fits and the
                                    #     checkpoint — each waits until its last duration is that share of the
                                    #     time since it was last made (24 MP: a preview every ~4 s, stack.fits
                                    #     and a checkpoint every ~45 s, instead of 22 % of a backlog's time).
                                    #     0: no share (preview_s, outputs_s, checkpoint_every alone)
    checkpoint_every: int = 10      # checkpoint every this many frames …
    checkpoint_s: float = 300.0     # … or this many seconds, whichever comes first
    max_attempts: int = 3           # a file that stopped the worker this many times in a row is skipped (failed)
    checkpoint_max_mb: float = 0.0  # cap on session/checkpoint.npz, MB (0: none); above it none is written (one
                                    #     warning) and a crash restacks frames.jsonl. A 24 MP colour stack's is
                                    #     ~470 MB, each further filter's as much again

    def __post_init__(self):
        if self.outputs_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("daemon.outputs_every and daemon.checkpoint_every must be at least 1")
        if self.checkpoint_max_mb < 0:
            raise ConfigError(f"daemon.checkpoint_max_mb = {self.checkpoint_max_mb}: must be ≥ 0 (0: no cap)")
        if self.max_attempts < 1:
            raise ConfigError(f"daemon.max_attempts = {self.max_attempts}: must be at least 1")
        if self.outputs_s < 0 or self.preview_s < 0:
            raise ConfigError(f"daemon.outputs_s = {self.outputs_s}, preview_s = {self.preview_s}: must be ≥ 0")
        if not 0 <= self.backlog_share <= 1:
            raise ConfigError(f"daemon.backlog_share = {self.backlog_share}: must be in [0, 1] (0: no share)")
        if self.checkpoint_s <= 0:
            raise ConfigError(f"daemon.checkpoint_s = {self.checkpoint_s}: must be positive")


@dataclass(frozen=True, slots=True)
class SessionParams:
    new_target_after: int = 3       # this many good frames in a row that do not register: a new target (0: never)
    slew_deg: float = 0.5           # a frame whose header pointing is this far from the target's: another target

    def __post_init__(self):
        if self.new_target_after < 0:
            raise ConfigError(f"session.new_target_after = {self.new_target_after}: must be ≥ 0 (0: never)")
        if not 0 < self.slew_deg <= 180:
            raise ConfigError(f"session.slew_deg = {self.slew_deg}: must be in (0, 180]")


def session_section(cfg: Config, source: str = "config") -> SessionParams:
    return make_section(SessionParams, cfg.extra.get("session", {}), f"{source}: session")


@dataclass(frozen=True, slots=True)
class WebParams:
    enabled: bool = True
    host: str = "127.0.0.1"         # "0.0.0.0" to reach the page from a phone: then set a token
    port: int = 8080
    token: str | None = None        # required on every state-changing call when set
    allowed_hosts: tuple[str, ...] = ()   # extra Host names the page answers to (a reverse proxy's name); "*": any
    idle_timeout_s: float = 30.0    # an idle or trickling connection is closed after this long
    max_per_client: int = 32        # open connections from one address (IPv6: a /64); 0: no cap (loopback has none)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"web.port = {self.port}: must be in [0, 65535]")
        if not 0 < self.idle_timeout_s <= 3600:
            raise ConfigError(f"web.idle_timeout_s = {self.idle_timeout_s}: must be in (0, 3600]")
        if isinstance(self.max_per_client, bool) or not 0 <= self.max_per_client <= 100_000:
            raise ConfigError(f"web.max_per_client = {self.max_per_client}: must be 0 (no cap) or a number of "
                              "connections")
        if isinstance(self.allowed_hosts, str) or not all(isinstance(h, str) for h in self.allowed_hosts):
            raise ConfigError(f"web.allowed_hosts = {self.allowed_hosts!r}: must be a list of host names")
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("web.token: use at least 8 characters")


def shell_sections(cfg: Config, source: str = "config") -> tuple[WatchParams, DaemonParams, WebParams]:
    """The three sections from ``cfg.extra``; unknown keys or bad values raise ConfigError naming the key."""
    return (make_section(WatchParams, cfg.extra.get("watch", {}), f"{source}: watch"),
            make_section(DaemonParams, cfg.extra.get("daemon", {}), f"{source}: daemon"),
            make_section(WebParams, cfg.extra.get("web", {}), f"{source}: web"))
