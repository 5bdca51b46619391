"""The engine's settings: one frozen dataclass per stage, gathered in Config.  Plain values — the engine never
reads a file; ``livestack/config.py`` builds a Config from livestack.toml and the command line."""
from __future__ import annotations

from dataclasses import dataclass, field

from .calibrate import CosmeticParams
from .compose import ComposeParams
from .drizzle import DrizzleParams
from .register import RegisterParams
from .reject import RejectParams
from .stack import StackParams
from .stars import StarParams
from .stretch import StretchParams


INTERPOLATION_NAMES = ("bilinear", "compensated", "bicubic", "lanczos")   # the warps a user can choose


@dataclass(frozen=True, slots=True)
class EngineParams:
    debayer: str = "mhc"             # "mhc" | "bilinear" (full resolution; mhc: Malvar-He-Cutler, stars ~13 %
                                     #     tighter, README debayer step) | "superpixel" (2×2 -> half, for a Pi)
    # warp: "compensated" | "bilinear" | "bicubic" | "lanczos".  Compensated: bilinear after a 3-tap sharpening
    # that cancels its blur (Keys' cubic for a shift, warp.py): stars 3–6 % tighter than bilinear, within 1–2 %
    # of bicubic, for ~0.05 CPU s per 24 MP frame (bicubic: +0.26–0.33 s) (README, warp step)
    interpolation: str = "compensated"
    smooth_background: bool = True  # sharpen (mhc, compensated) only where the frame has signal: the background
                                     #     keeps the plain path's noise, stars the sharp path's width
                                     #     (render.signal_cells; README, warp step)
    sharpness_weight: float = 0.0    # weight × (reference FWHM / frame FWHM) ** this (0 = noise only)
    seed: int = 0                    # RANSAC random generator
    read_ahead: bool = True          # read, calibrate and find the stars of the next file (when the caller knows
                                     #     it: a folder, a backlog) while this one is stacked: ~10 % faster on 2
                                     #     cores, one more mosaic in memory (+~150 MB at 24 MP)
    max_megapixels: float | None = None  # larger frames are refused from their header, before reading (None:
                                     #     from the machine's memory, read.default_max_megapixels())

    def __post_init__(self):
        if self.debayer not in ("bilinear", "mhc", "superpixel"):
            raise ValueError(f"engine.debayer = {self.debayer!r}: must be 'bilinear', 'mhc' or 'superpixel'")
        if self.interpolation not in INTERPOLATION_NAMES:
            raise ValueError(f"engine.interpolation = {self.interpolation!r}: must be one of "
                             f"{', '.join(INTERPOLATION_NAMES)}")
        if not 0 <= self.sharpness_weight <= 4:
            raise ValueError(f"engine.sharpness_weight = {self.sharpness_weight}: must be in [0, 4]")
        if self.max_megapixels is not None and not self.max_megapixels > 0:
            raise ValueError(f"engine.max_megapixels = {self.max_megapixels}: must be positive")


@dataclass(frozen=True, slots=True)
class Config:
    engine: EngineParams = field(default_factory=EngineParams)
    stars: StarParams = field(default_factory=StarParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    reject: RejectParams = field(default_factory=RejectParams)
    stack: StackParams = field(default_factory=StackParams)
    stretch: StretchParams = field(default_factory=StretchParams)
    cosmetic: CosmeticParams = field(default_factory=CosmeticParams)
    compose: ComposeParams = field(default_factory=ComposeParams)
    drizzle: DrizzleParams = field(default_factory=DrizzleParams)
    extra: dict = field(default_factory=dict)   # sections owned by the shells (daemon, web, capture)
