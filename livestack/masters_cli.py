"""`livestack masters CALIB -o M`: the command-line shell of masters.py (cli.py imports this module and calls
register_commands).  Exit codes: 0 masters written, 1 nothing could be built, 2 usage/config."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .masters import CalibrationParams, MasterError, MasterLibrary


def calibration_params(cfg, **overrides) -> CalibrationParams:
    """CalibrationParams from the raw ``[calibration]`` section of a Config (cfg.extra), with CLI overrides
    (None = not given).  Raises ConfigError naming the key."""
    from .config import make_section

    values = dict(cfg.extra.get("calibration", {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_section(CalibrationParams, values, "calibration")


def cmd_masters(args, cfg) -> int:
    from .config import ConfigError, flag_error

    try:
        p = calibration_params(cfg, method=args.method)
        if args.masters_kappa is not None:      # said as the flag typed, not as the key it sets
            try:
                p = calibration_params(cfg, method=args.method, kappa=args.masters_kappa)
            except ConfigError as err:
                raise flag_error(err, "calibration.kappa", "--kappa", args.masters_kappa) from err
    except ConfigError as err:
        print(f"livestack masters: {err}", file=sys.stderr)
        return 2
    calib, out = Path(args.calib).expanduser(), Path(args.out).expanduser()
    if not calib.is_dir():
        print(f"livestack masters: {calib}: not a folder", file=sys.stderr)
        return 2
    from .engine.write import output_dir_problem

    problem = output_dir_problem(out)
    if problem:
        print(f"livestack masters: {problem}", file=sys.stderr)
        return 2
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    try:
        lib = MasterLibrary.build(calib, out, p, log=say)
    except MasterError as err:
        print(f"livestack masters: {err}", file=sys.stderr)
        return 1
    print(f"{len(lib.entries)} masters in {out / 'masters.json'} ({time.perf_counter() - t0:.1f} s)"
          + (f"; {len(lib.skipped)} file{'s' * (len(lib.skipped) != 1)} skipped (listed there)" if lib.skipped else ""))
    return 0


def load_masters(path: str | None, cfg=None):
    """The master library at ``path`` (None without one), with the config's [calibration] settings.
    Raises ValueError (MasterError, ConfigError) with one sentence naming the folder or key."""
    if not path:
        return None
    params = calibration_params(cfg) if cfg is not None else None
    return MasterLibrary.load(Path(path).expanduser(), params)


def register_commands(sub, engine_opts) -> None:
    """Add `masters` to cli.py's subparsers.  ``engine_opts`` is not used: its --kappa is the stack's."""
    p = sub.add_parser("masters", help="build master bias/dark/flat/dark-flat frames from a calibration folder")
    p.add_argument("calib", metavar="CALIB", help="folder with bias/, darks/, flats/, darkflats/ (or FITS IMAGETYP)")
    p.add_argument("-o", "--out", required=True, help="master library folder (master FITS + masters.json)")
    p.add_argument("--method", choices=("clipped", "median"), help="combine (default: clipped mean)")
    p.add_argument("--kappa", type=float, dest="masters_kappa", metavar="K",
                   help="clipping threshold in σ (default 3)")
    p.add_argument("--config", help="livestack.toml ([calibration] section)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_masters)
