"""python -m drivers.simulator OUT_DIR [--frames 10 --width 800 --height 600 --format fits|dng --mono
    --seed 1 --rotation-deg 0.5 --defects cloudy:3,trail:5,satellite:6,cosmic:7 --calib
    --filters L,R,G,B,Ha,OIII,SII --filter-exptime Ha:300,OIII:300 --dither-px 3 --fwhm 3
    --pointing RA DEC --object NAME --sky-seed N]

Writes the lights and truth.json (and with --calib bias/, darks/, flats/, darkflats/) and prints OUT_DIR.
Exit 0 ok, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..simargs import add_sky_arguments, sky_fields
from .camera import SimConfig, parse_defects, parse_filter_exptime
from .write import render_calibration, render_night, write_truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drivers.simulator", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--format", choices=["fits", "dng"], default="fits")
    p.add_argument("--mono", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--exptime", type=float, default=60.0)
    p.add_argument("--rotation-deg", type=float, default=0.0)
    p.add_argument("--flip-at", type=int, default=None)
    p.add_argument("--dither-px", type=float, default=0.0)
    p.add_argument("--n-stars", type=int, default=400)
    p.add_argument("--defects", default="", help="NAME:FRAME,... NAME: cloudy, wind (or trail), satellite, cosmic")
    p.add_argument("--filters", default="", help="filter wheel, cycled frame by frame: NAME,... e.g. "
                   "L,R,G,B,Ha,OIII,SII (mono) or HaOIII (colour, dual band)")
    p.add_argument("--filter-exptime", default="", help="NAME:SECONDS,... exposure per filter "
                   "(default: 3 × --exptime narrowband, --exptime broadband)")
    add_sky_arguments(p)
    p.add_argument("--calib", action="store_true", help="also write bias/, darks/, flats/, darkflats/ (10 each; "
                   "flats: 10 per filter)")
    args = p.parse_args(argv)
    try:
        cfg = SimConfig(width=args.width, height=args.height, n_frames=args.frames, mono=args.mono,
                        fmt=args.format, seed=args.seed, exptime=args.exptime, rotation_deg=args.rotation_deg,
                        flip_at=args.flip_at, dither_px=args.dither_px, n_stars=args.n_stars,
                        defects=parse_defects(args.defects),
                        filters=tuple(f.strip() for f in args.filters.split(",") if f.strip()),
                        filter_exptime=parse_filter_exptime(args.filter_exptime), **sky_fields(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    truth = render_night(args.out_dir, cfg)
    if args.calib:
        files = render_calibration(args.out_dir, cfg)
        truth["calibration"] = {k: [str(f.relative_to(args.out_dir)) for f in v] for k, v in files.items()}
        write_truth(args.out_dir, truth)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
