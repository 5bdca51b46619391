"""A seeded simulator of an astrophotography night with known truth (frames + truth.json).

Used by the tests, `livestack demo` and the benchmarks. Drivers never import livestack.

    from drivers.simulator import SimConfig, render_night
    truth = render_night(tmp_path, SimConfig(n_frames=5, rotation_deg=0.5, defects={3: "cloudy"}))
"""
from .camera import (DEFECTS, SimConfig, frame_to_sky, hot_pixels, invert_affine, render_frame, sky_field,
                     true_flat)
from .sky import SkyField
from .write import frame_name, render_calibration, render_night, write_dng, write_fits, write_frame

__all__ = ["DEFECTS", "SimConfig", "SkyField", "frame_name", "frame_to_sky", "hot_pixels", "invert_affine",
           "render_calibration", "render_frame", "render_night", "sky_field", "true_flat", "write_dng",
           "write_fits", "write_frame"]
