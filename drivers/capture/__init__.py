"""Capture drivers: programs that put frames into the daemon's watched folder.

    indi     astro cameras and filter wheels through an INDI server (XML protocol, standard library)
    gphoto   DSLR / mirrorless cameras over USB through python-gphoto2 (`pip install gphoto2`)
    sim      frames rendered by drivers.simulator, one at a time (the live demo)

Each runs stand-alone (`python -m drivers.capture.indi …`) or as `livestack capture indi …`.
Drivers never import livestack. Shared rules (names, folders, atomic writes, retry, stop): common.py.
"""
