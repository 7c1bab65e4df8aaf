"""Fusion overlays for ``microseg fuse --save-vis``: YOLO, Prob-UNet and fused marks on a stack.

DeepD3.V2's ``yolo_prob_fusion.py --save_vis`` writes ``vis/z{z:03d}.png`` for every
``vis_interval``-th plane (``z % interval == 0``): the plane, min-max scaled to grey, with the
kept boxes outlined green when YOLO was confident (``high``) and orange when the Prob-UNet
validated them (``validated``). :func:`render_fusion_vis` writes the same planes from a fusion
result folder (:func:`microseg.infer.fusion.write_fusion_outputs`) and adds what the seed leaves
out: the fused detections (``predictions_dedup.csv``, after 3D de-duplication) as magenta
circles around their centre pixel (which is marked too), and ``max_projection.png``, the
stack's maximum-intensity projection with every kept box and fused detection. Rejected boxes
are not drawn (as the seed). No text is drawn, so no font is needed.

Geometry follows :mod:`microseg.report.overlays`: a box outlines its pixel range (the fusion's
rule, :func:`~microseg.report.overlays.box_pixel_ranges`); a fused detection's point is its
box centre ``(x1 + x2)/2 - 0.5`` in voxel-centre coordinates on plane ``round(z)``. Grey levels
map the stack's 1st..99.8th percentiles (the projection's own for the projection) to 0..255.

The folder ``<result_dir>/vis`` is built aside and renamed into place (atomic).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.draw import circle_perimeter

from microseg.data.transforms import sample_percentiles, to_uint8
from microseg.errors import AnnotationError, ConfigError, DataFormatError, MissingFileError
from microseg.infer.fusion import KEPT_STATUSES
from microseg.io.tiff import open_stack
from microseg.report.overlays import PNG_COMPRESS_LEVEL, box_pixel_ranges
from microseg.utils.atomic import atomic_path

RGB = tuple[int, int, int]

VIS_DIR = "vis"
MAX_PROJECTION = "max_projection.png"
#: what a vis folder was drawn with; a later ``--save-vis`` with the same is not redrawn
VIS_META = "vis.json"
#: the seed's colours for kept boxes, plus ours for the fused detections
COLORS: dict[str, RGB] = {"high": (0, 255, 0), "validated": (255, 165, 0), "fused": (255, 0, 255)}
FUSED_RADIUS = 4
DEFAULT_INTERVAL = 10  # the seed's --vis_interval


def plane_name(z: int) -> str:
    return f"z{z:03d}.png"


def vis_planes(depth: int, interval: int) -> list[int]:
    """Planes ``0, interval, 2 interval, ...`` of a stack (the seed's ``z % interval == 0``)."""
    if not (isinstance(interval, int) and interval >= 1):
        raise ConfigError(f"vis interval must be an integer >= 1; found {interval!r}")
    return list(range(0, depth, interval))


def _read_boxes(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise MissingFileError("expected a fusion output CSV (run `microseg fuse` first)", path)
    table = pd.read_csv(path)
    missing = [c for c in ("z", "x1", "y1", "x2", "y2", "status") if c not in table.columns]
    if missing:
        raise AnnotationError(f"expected columns z,x1,y1,x2,y2,status; missing {missing}", path)
    return table


def _outline(img: np.ndarray, box: Sequence[float], rgb: RGB) -> None:
    """One-pixel outline on the box's outermost pixel rows and columns, clipped to ``img``."""
    h, w = img.shape[:2]
    r0, r1, c0, c1 = box_pixel_ranges(*(float(v) for v in box))
    ra, rb, ca, cb = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if ra >= rb or ca >= cb:
        return
    for r in {r0, r1 - 1} & set(range(h)):
        img[r, ca:cb] = rgb
    for c in {c0, c1 - 1} & set(range(w)):
        img[ra:rb, c] = rgb


def _circle(img: np.ndarray, y: float, x: float, radius: int, rgb: RGB) -> None:
    """A circle of ``radius`` around the pixel nearest ``(y, x)``, and that pixel itself."""
    cy, cx = math.floor(y + 0.5), math.floor(x + 0.5)
    rr, cc = circle_perimeter(cy, cx, radius, shape=img.shape[:2])
    img[rr, cc] = rgb
    if 0 <= cy < img.shape[0] and 0 <= cx < img.shape[1]:
        img[cy, cx] = rgb


def draw_fusion(
    plane_u8: np.ndarray, kept: pd.DataFrame, fused: pd.DataFrame, radius: int = FUSED_RADIUS
) -> np.ndarray:
    """``(H, W, 3)`` uint8: ``plane_u8`` in grey, kept boxes by status, fused circles on top."""
    img = np.repeat(np.asarray(plane_u8, dtype=np.uint8)[..., None], 3, axis=2)
    for status in ("validated", "high"):  # YOLO-confident boxes drawn over validated ones
        rows = kept.loc[kept["status"] == status, ["x1", "y1", "x2", "y2"]].to_numpy(float)
        for box in rows:
            _outline(img, box, COLORS[status])
    boxes = fused[["x1", "y1", "x2", "y2"]].to_numpy(float)
    for x1, y1, x2, y2 in boxes:
        _circle(img, (y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5, radius, COLORS["fused"])
    return img


def _save_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, compress_level=PNG_COMPRESS_LEVEL)


def vis_is_current(result_dir: str | Path, interval: int) -> bool:
    """``vis/`` was drawn with ``interval`` after the last ``results.json`` was written."""
    vis, results = Path(result_dir) / VIS_DIR, Path(result_dir) / "results.json"
    meta = vis / VIS_META
    if not (meta.is_file() and results.is_file()):
        return False
    try:
        drawn = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return (
        drawn.get("interval") == interval and meta.stat().st_mtime_ns > results.stat().st_mtime_ns
    )


def render_fusion_vis(
    stack_path: str | Path,
    result_dir: str | Path,
    interval: int = DEFAULT_INTERVAL,
    radius: int = FUSED_RADIUS,
    percentiles: tuple[float, float] = (1.0, 99.8),
) -> list[Path]:
    """Write ``<result_dir>/vis/`` (see the module notes) for ``stack_path``; the PNG paths."""
    result_dir = Path(result_dir)
    raw = _read_boxes(result_dir / "predictions_raw.csv")
    fused = _read_boxes(result_dir / "predictions_dedup.csv")
    kept = raw.loc[raw["status"].isin(KEPT_STATUSES)]
    kept_z = kept["z"].to_numpy(float).round().astype(np.int64)
    fused_z = fused["z"].to_numpy(float).round().astype(np.int64)
    out = result_dir / VIS_DIR
    with open_stack(stack_path, expect_ndim=3) as stack:
        depth = int(stack.shape[0])
        planes = set(vis_planes(depth, interval))
        lo, hi = sample_percentiles(stack, percentiles)
        names: list[str] = []
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            mip: np.ndarray | None = None
            for z in range(depth):
                plane = np.asarray(stack.plane(z))
                mip = plane.copy() if mip is None else np.maximum(mip, plane)
                if z in planes:
                    rgb = draw_fusion(
                        to_uint8(plane, lo, hi), kept[kept_z == z], fused[fused_z == z], radius
                    )
                    _save_png(tmp / plane_name(z), rgb)
                    names.append(plane_name(z))
            if mip is None:
                raise DataFormatError("expected a stack with at least one plane", stack_path)
            mlo, mhi = sample_percentiles(mip[None], percentiles)
            _save_png(
                tmp / MAX_PROJECTION, draw_fusion(to_uint8(mip, mlo, mhi), kept, fused, radius)
            )
            names.append(MAX_PROJECTION)
            (tmp / VIS_META).write_text(json.dumps({"interval": interval, "pngs": names}) + "\n")
    return [out / n for n in names]


__all__ = [
    "COLORS",
    "MAX_PROJECTION",
    "VIS_DIR",
    "draw_fusion",
    "plane_name",
    "render_fusion_vis",
    "vis_is_current",
    "vis_planes",
]
