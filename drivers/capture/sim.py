"""A capture driver without a camera: frames rendered by drivers.simulator, one at a time, into the folder.

    python -m drivers.capture.sim 60 --interval 3 -o /tmp/watch            # a frame every 3 s until Ctrl-C
    python -m drivers.capture.sim 60 --count 12 --format dng --rotation-deg 0.05 -o /tmp/watch

The live demo runs this next to the daemon. The simulator does not wait out the exposure: `--interval` sets
the pace. Frames carry the simulator's truth in their headers (stars, drift, defects) exactly as
`python -m drivers.simulator` would write them, named and placed like every other driver's frames.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..simargs import add_sky_arguments, sky_fields
from .common import (CapturePlan, Stop, add_plan_arguments, frame_name, module_main, run_capture, run_plan,
                     start_capture, write_frame)

# drivers.simulator (numpy, scipy, astropy: ~0.7 s) is imported when frames are made, not when `livestack`
# builds its command line (every command does, and this module gives `capture sim` its arguments)
if TYPE_CHECKING:
    from drivers.simulator import SimConfig


def sim_config(plan: CapturePlan, base: SimConfig | None = None) -> SimConfig:
    """`base` (default SimConfig()) with the plan's exposure and gain, starting now (UTC)."""
    from drivers.simulator import SimConfig

    base = base or SimConfig()
    changes: dict = {"start": datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0).isoformat()}
    if plan.exposure > 0:
        changes["exptime"] = plan.exposure
    if plan.gain is not None:
        changes["gain_setting"] = int(round(plan.gain))
    return replace(base, **changes)


def capture(plan: CapturePlan, base: SimConfig | None = None, stop: Stop | None = None, *,
            on_frame=None, retry_for: float | None = 600.0) -> list[Path]:
    """Render and write frames of plan.kind, plan.count of them (or until `stop`), plan.interval s apart.
    The frame index (and so the simulated drift and rotation) continues after the highest one used in the folder.
    Returns the written paths in order. Usable from a thread: pass a Stop and call stop.stop()."""
    from drivers.simulator import render_frame, write_dng, write_fits

    cfg = sim_config(plan, base)
    stop = stop or Stop()
    ext = ".dng" if cfg.fmt == "dng" else ".fits"

    def take(index: int) -> Path:
        # a filter wheel: the frame's filter, and the narrowband ones 3× longer unless --filter-exptime says
        wheel = plan.kind in ("light", "flat") and bool(cfg.filters)
        t = cfg.filter_exptime_of(cfg.filter_at(index)) if wheel and plan.kind == "light" else plan.exposure
        raw, meta = render_frame(cfg, index, kind=plan.kind, exptime=t)
        name = cfg.filter_at(index) if wheel else cfg.filter_name
        if wheel:
            meta["filter"] = name    # flats through the wheel too (FILTER: the masters library groups by it)
        path = plan.folder / frame_name(plan.kind, index, t, ext, filter=name)
        write = write_dng if cfg.fmt == "dng" else write_fits     # atomic: temp + fsync + rename
        # a full disk waits for space, an unwritable folder stops the run: one line, not a traceback
        return write_frame(path, lambda: write(path, raw, meta, cfg), stop=stop, give_up=retry_for)

    return run_plan(plan, take, stop, on_frame=on_frame)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_arguments(p, gain_help="gain written to the header (GAIN)")
    p.add_argument("--width", type=int, default=800, help="frame width, px (default 800)")
    p.add_argument("--height", type=int, default=600, help="frame height, px (default 600)")
    p.add_argument("--format", choices=("fits", "dng"), default="fits",
                   help="file format (default fits; dng: Bayer only)")
    p.add_argument("--mono", action="store_true", help="mono sensor (FITS, FILTER L) instead of Bayer RGGB")
    p.add_argument("--seed", type=int, default=1, help="simulator seed: the same seed, the same frames (default 1)")
    p.add_argument("--rotation-deg", type=float, default=0.0, help="field rotation per frame (alt-az)")
    p.add_argument("--dither-px", type=float, default=0.0,
                   help="random shift per frame, up to ± this many px on each axis (default 0)")
    p.add_argument("--defects", default="", help="NAME:FRAME,… (cloudy, wind, satellite, cosmic)")
    p.add_argument("--filters", default="", help="a filter wheel cycled frame by frame, e.g. L,R,G,B or "
                                                  "Ha,OIII,SII (narrowband exposures 3× EXPOSURE)")
    add_sky_arguments(p)


def run(args) -> int:
    plan = start_capture("sim", args, no_binning="the simulator does not bin")
    if plan is None:
        return 2
    from drivers.simulator import SimConfig
    from drivers.simulator.camera import parse_defects

    try:
        base = SimConfig(width=args.width, height=args.height, fmt=args.format, mono=args.mono, seed=args.seed,
                         rotation_deg=args.rotation_deg, dither_px=args.dither_px,
                         defects=parse_defects(args.defects),
                         filters=tuple(f.strip() for f in args.filters.split(",") if f.strip()),
                         **sky_fields(args))
    except ValueError as err:
        print(f"capture sim: {err}", file=sys.stderr)
        return 2
    return run_capture("sim", plan, lambda stop: capture(plan, base, stop, retry_for=args.retry_for))


def main(argv: list[str] | None = None) -> int:
    return module_main("drivers.capture.sim", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
