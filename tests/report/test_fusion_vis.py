"""Fusion PNGs (``microseg fuse --save-vis``): which marks, which colours, which planes."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microseg.errors import ConfigError, MissingFileError
from microseg.infer.fusion import FusionParams, fuse_with_probabilities, write_fusion_outputs
from microseg.io.tiff import write_stack
from microseg.report.fusion_vis import (
    COLORS,
    MAX_PROJECTION,
    VIS_DIR,
    render_fusion_vis,
    vis_is_current,
)

VS = (500.0, 94.0, 94.0)
GREEN, ORANGE, MAGENTA = COLORS["high"], COLORS["validated"], COLORS["fused"]


@pytest.fixture()
def fused(tmp_path):
    """A 5x32x48 stack and a fusion result: a YOLO-confident box on plane 0, a validated one
    and a rejected one on plane 2 (boxes 12 px, so outlines and circles do not touch)."""
    rng = np.random.default_rng(0)
    stack = rng.integers(100, 200, (5, 32, 48)).astype(np.uint16)
    write_stack(tmp_path / "s.tif", stack, VS)
    det = pd.DataFrame(
        {
            "z": [0, 2, 2],
            "x1": [4.0, 30.0, 4.0],
            "y1": [4.0, 14.0, 18.0],
            "x2": [16.0, 42.0, 16.0],
            "y2": [16.0, 26.0, 30.0],
            "score": [0.9, 0.3, 0.01],
        }
    )
    res = fuse_with_probabilities(det, np.array([0.1, 0.8, 0.9]), FusionParams(), VS)
    assert list(res.raw["status"]) == ["high", "validated", "rejected_low_yolo"]
    assert len(res.dedup) == 2
    write_fusion_outputs(tmp_path / "r", res)
    return tmp_path / "s.tif", tmp_path / "r", stack


def _png(path) -> np.ndarray:
    img = np.asarray(Image.open(path))
    assert img.dtype == np.uint8
    return img


def _is_grey(pixel: np.ndarray) -> bool:
    return pixel[0] == pixel[1] == pixel[2]


def test_planes_and_projection_show_boxes_by_status_and_fused_circles(fused):
    stack_path, rdir, stack = fused
    pngs = render_fusion_vis(stack_path, rdir, interval=2)
    vis = rdir / VIS_DIR
    assert [p.name for p in pngs] == ["z000.png", "z002.png", "z004.png", MAX_PROJECTION]
    assert all(p.parent == vis and p.is_file() for p in pngs)
    z0, z2, z4, mip = (_png(p) for p in pngs)
    assert z0.shape == z2.shape == mip.shape == (32, 48, 3)
    # plane 0: the YOLO-confident box outlined green (pixel range rows/cols 4..15), its fused
    # detection marked magenta at the centre pixel (9.5 -> 10) and on a circle of radius 4
    for r, c in ((4, 4), (4, 15), (15, 4), (15, 15), (4, 9), (9, 4)):
        assert tuple(z0[r, c]) == GREEN, (r, c)
    assert tuple(z0[10, 10]) == MAGENTA and tuple(z0[6, 10]) == MAGENTA
    assert _is_grey(z0[14, 30]) and _is_grey(z0[19, 35])  # plane 2's marks are not on plane 0
    # plane 2: the Prob-UNet-validated box orange, the rejected box not drawn
    assert tuple(z2[14, 30]) == ORANGE and tuple(z2[25, 41]) == ORANGE
    assert tuple(z2[20, 36]) == MAGENTA
    assert all(_is_grey(z2[r, c]) for r, c in ((18, 4), (29, 15), (18, 10)))
    assert all(_is_grey(z4[r, c]) for r in range(32) for c in range(48))  # nothing on plane 4
    # the grey is the plane itself (brighter voxel, brighter pixel)
    plane = stack[4].astype(float)
    hi, lo = (
        np.unravel_index(plane.argmax(), plane.shape),
        np.unravel_index(plane.argmin(), plane.shape),
    )
    assert z4[hi][0] > z4[lo][0]
    # the projection holds every kept box and fused detection
    assert tuple(mip[4, 4]) == GREEN and tuple(mip[14, 30]) == ORANGE
    assert tuple(mip[10, 10]) == MAGENTA and tuple(mip[20, 36]) == MAGENTA
    assert _is_grey(mip[18, 4])
    assert not [p for p in os.listdir(rdir) if "tmp" in p]  # built aside, renamed in


def test_vis_is_current_until_the_result_or_the_interval_changes(fused):
    stack_path, rdir, _ = fused
    assert not vis_is_current(rdir, 2)
    render_fusion_vis(stack_path, rdir, interval=2)
    assert json.loads((rdir / VIS_DIR / "vis.json").read_text())["interval"] == 2
    assert vis_is_current(rdir, 2) and not vis_is_current(rdir, 3)
    results = rdir / "results.json"
    later = (rdir / VIS_DIR / "vis.json").stat().st_mtime_ns + 10**9
    os.utime(results, ns=(later, later))  # a newer result: the drawing is stale
    assert not vis_is_current(rdir, 2)


def test_bad_interval_and_missing_outputs_are_clear_errors(fused, tmp_path):
    stack_path, rdir, _ = fused
    with pytest.raises(ConfigError, match="interval"):
        render_fusion_vis(stack_path, rdir, interval=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match=r"predictions_raw\.csv"):
        render_fusion_vis(stack_path, tmp_path / "empty")
