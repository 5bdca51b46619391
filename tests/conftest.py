"""Shared fixtures: simulated nights with known truth, and the real files of ../shared/data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drivers.simulator import SimConfig, render_night

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real camera files not found at {SHARED_DATA}")
    return SHARED_DATA


def make_night(root: Path, **kw) -> tuple[list[Path], dict]:
    """Render a simulated night into ``root`` and return (files in capture order, truth)."""
    cfg = SimConfig(**{"width": 640, "height": 480, "n_stars": 600, **kw})
    truth = render_night(root, cfg)
    return [root / f["file"] for f in truth["frames"]], truth


@pytest.fixture
def night(tmp_path):
    """night(name, **SimConfig fields) -> (files, truth), rendered under tmp_path/name."""
    def _night(name: str = "lights", **kw):
        return make_night(tmp_path / name, **kw)
    return _night


def truth_matrix(truth: dict, i: int, ref: int = 0) -> np.ndarray:
    """Expected frame i -> reference frame transform: inverse(ref frame_to_sky) ∘ frame_to_sky(i)."""
    from livestack.engine import geometry

    m_i = np.array(truth["frames"][i]["frame_to_sky"])
    m_r = np.array(truth["frames"][ref]["frame_to_sky"])
    return geometry.compose(geometry.invert(m_r), m_i)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
