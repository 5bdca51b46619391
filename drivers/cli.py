"""`livestack capture indi|gphoto2|sim …`: the capture drivers as sub-commands of livestack.

livestack/cli.py imports this module if it exists and calls register_commands(); nothing here imports
livestack. Each driver module is imported only when its sub-command runs, so `livestack --help` works
without python-gphoto2.
"""
from __future__ import annotations

import argparse
import importlib

DRIVERS = {
    "indi": ("drivers.capture.indi", "astro camera (and filter wheel) through an INDI server"),
    "gphoto2": ("drivers.capture.gphoto", "DSLR / mirrorless over USB through python-gphoto2"),
    "sim": ("drivers.capture.sim", "simulated frames, one at a time (demo, tests)"),
}


def _add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    # argument definitions live with each driver; importing indi/sim is cheap, gphoto2 is imported lazily
    importlib.import_module(DRIVERS[name][0]).add_arguments(p)


def register_commands(subparsers, engine_opts, *, arguments: bool = True) -> None:
    """Add `capture` with one sub-command per driver. engine_opts is unused: capture does not stack.
    ``arguments`` False (another command is running): the drivers' sub-commands without their own arguments,
    whose modules are not imported then (~20 ms of every `livestack stack` here)."""
    p = subparsers.add_parser("capture", help="take frames into a folder (INDI, gphoto2, simulator)",
                              description="Take frames into the watched folder, atomically, named in "
                                          "capture order; Ctrl-C / SIGTERM stops after the current exposure.")
    sub = p.add_subparsers(dest="driver", required=True, metavar="DRIVER")
    for name, (module, help_text) in DRIVERS.items():
        dp = sub.add_parser(name, help=help_text, description=help_text)
        if arguments:
            _add_arguments(name, dp)
        dp.set_defaults(func=lambda args, cfg, module=module: importlib.import_module(module).run(args))
