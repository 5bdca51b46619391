"""Outputs, each written atomically (temporary file in the same folder, fsync, rename), so that a crash or a
power cut leaves the previous complete file, never a torn one."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np


def atomic_write_with(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` to write a temporary file, then fsync and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        writer(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_fits(path: Path, image: np.ndarray, header: dict, *, weight: np.ndarray | None = None) -> None:
    """Write a float32 stack: (3, H, W) colour or (H, W) mono in the primary HDU, the weight map (effective
    number of reference-quality frames per pixel) in an image extension named WEIGHT."""
    from astropy.io import fits

    hdr = fits.Header()
    for k, v in header.items():
        if v is None:
            continue
        if isinstance(v, tuple) and len(str(v[0])) + len(v[1]) > 60:
            v = v[0]  # a long value keeps priority over its comment (astropy would warn and truncate)
        hdr[k] = v  # a value or a (value, comment) pair
    data = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=hdr)]
    if weight is not None:
        whdr = fits.Header()
        whdr["EXTNAME"] = "WEIGHT"
        whdr["COMMENT"] = "sum of frame weights per pixel (reference frame = 1)"
        hdus.append(fits.ImageHDU(np.ascontiguousarray(weight, dtype=np.float32), header=whdr))
    # Straight to the temporary file: a BytesIO would hold a second copy of a stack that is ~1 GB at 24 MP.
    atomic_write_with(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, output_verify="silentfix",
                                                                    overwrite=True))


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """(h, w, 3) uint8 RGB -> JPEG."""
    ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"{Path(path).name}: JPEG encoding failed")
    atomic_write_bytes(path, enc.tobytes())


def encode_png16(rgb16: np.ndarray) -> bytes:
    """(h, w, 3) or (h, w) uint16 -> PNG bytes (full-resolution 16-bit export)."""
    img = rgb16[:, :, ::-1] if rgb16.ndim == 3 else rgb16
    ok, enc = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise OSError("PNG encoding failed")
    return enc.tobytes()


def encode_tiff16(rgb16: np.ndarray) -> bytes:
    """(h, w, 3) or (h, w) uint16 -> TIFF bytes (tifffile, lossless)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb16, photometric="rgb" if rgb16.ndim == 3 else "minisblack")
    return buf.getvalue()
