"""Sky offset and transparency: bring each frame to the reference's photometric scale before combining.

    normalised_c = (x_c - sky_c) * scale + sky_ref_c

``sky_c`` is the frame's sky level per colour channel (additive: moon, light pollution, twilight) and ``scale``
the transparency factor (multiplicative and grey: thin cloud, haze, altitude), from matched star fluxes.
"""
from __future__ import annotations

import numpy as np

from .debayer import colour_offsets


def sky_and_noise(cfa: np.ndarray, pattern: str | None, *, step: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and per-pixel background noise of each channel of a calibrated mosaic.

    Returns two (C,) float64 arrays (C = 3 for R, G, B; 1 for mono), in ADU.  The sky is the median of the
    channel's pixels (stars cover a negligible fraction); the noise is from differences of horizontally adjacent
    same-colour pixels (1.4826 · MAD / √2), so a sky gradient or nebula does not count as noise.  Works on every
    ``step``-th row: a few ms at 24 MP.
    """
    if pattern is None:
        planes = [[cfa[::step]]]
    else:
        offs = colour_offsets(pattern)
        planes = [[cfa[i::2 * step, j::2] for (i, j) in offs[ch]] for ch in "RGB"]
    sky, noise = [], []
    for group in planes:
        vals = np.concatenate([p.ravel() for p in group])
        sky.append(float(np.median(vals)))
        d = np.concatenate([np.diff(p, axis=1).ravel() for p in group])
        noise.append(1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0))
    return np.array(sky), np.array(noise)


def transparency_scale(ref_flux: np.ndarray, flux: np.ndarray, *, min_pairs: int = 3) -> float:
    """Median ratio ref_flux / flux over matched star pairs: the factor that brings the frame's stars to the
    reference's brightness (> 1 for a frame dimmed by cloud).  1.0 when fewer than ``min_pairs`` usable pairs."""
    ok = np.isfinite(ref_flux) & np.isfinite(flux) & (ref_flux > 0) & (flux > 0)
    if ok.sum() < min_pairs:
        return 1.0
    r = ref_flux[ok] / flux[ok]
    # Bright stars carry the information; the faintest third is noise-dominated.
    keep = max(min_pairs, int(np.ceil(ok.sum() * 2 / 3)))
    order = np.argsort(-ref_flux[ok])[:keep]
    return float(np.median(r[order]))


def normalize_inplace(img: np.ndarray, sky: np.ndarray, scale: float, ref_sky: np.ndarray) -> None:
    """Apply (x_c - sky_c) * scale + ref_sky_c to a (C, H, W) float32 image, in place (NaN stays NaN)."""
    for c in range(img.shape[0]):
        img[c] -= np.float32(sky[c])
        if scale != 1.0:
            img[c] *= np.float32(scale)
        img[c] += np.float32(ref_sky[c])
