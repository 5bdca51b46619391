"""The simulated sky's command-line arguments, shared by `python -m drivers.simulator` and `livestack capture sim`:
the seeing, where the mount points, the object, the field of stars.  Light on purpose (argparse only): the
capture command builds its command line without importing the simulator (numpy, scipy, astropy: ~0.7 s)."""
from __future__ import annotations

import argparse


def add_sky_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fwhm", type=float, default=3.0, help="seeing: the stars' median FWHM in px, each frame "
                   "±10 %% (default 3; 1.2–1.6 for the undersampled stars a drizzle is for)")
    p.add_argument("--pointing", type=float, nargs=2, metavar=("RA", "DEC"), default=None,
                   help="degrees, written into the lights' FITS headers (RA, DEC): where the mount points")
    p.add_argument("--object", default=None, help="the lights' OBJECT (FITS)")
    p.add_argument("--sky-seed", type=int, default=None,
                   help="another field of stars: another target (the camera, --seed, stays)")


def sky_fields(args: argparse.Namespace) -> dict:
    """SimConfig's fields from add_sky_arguments' arguments."""
    return {"fwhm_px": args.fwhm, "pointing": tuple(args.pointing) if args.pointing else None,
            "object": args.object, "sky_seed": args.sky_seed}
