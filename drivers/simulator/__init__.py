"""A seeded simulator of an astrophotography night with known truth (frames + truth.json).

Used by the tests, `livestack demo` and the benchmarks. Drivers never import livestack.

    from drivers.simulator import SimConfig, render_night, true_signal
    truth = render_night(tmp_path, SimConfig(n_frames=5, rotation_deg=0.5, defects={3: "cloudy"}))
    night = SimConfig(mono=True, filters=("L", "R", "G", "B", "Ha", "OIII", "SII"), dither_px=3)
    ha = true_signal(night, "Ha")   # noise-free stars + nebula through Hα on frame 0's grid, e-
"""
from .camera import (DEFECTS, SimConfig, frame_to_sky, hot_pixels, invert_affine, nebula_knots, nebula_truth,
                     render_frame, sky_field, true_flat, true_signal)
from .filters import LINES, Passband, canonical_filter
from .sky import SkyField
from .write import frame_name, render_calibration, render_night, write_dng, write_fits, write_frame

__all__ = ["DEFECTS", "LINES", "Passband", "SimConfig", "SkyField", "canonical_filter", "frame_name",
           "frame_to_sky", "hot_pixels", "invert_affine", "nebula_knots", "nebula_truth", "render_calibration",
           "render_frame", "render_night", "sky_field", "true_flat", "true_signal", "write_dng", "write_fits",
           "write_frame"]
