"""Tiled 2D detection: a tile grid over a plane, and fusion of tile boxes in plane coordinates.

Grid: tiles of ``tile`` pixels start every ``tile - overlap`` pixels; the last tile of a row
or column is shifted inside the image (it starts at ``size - tile``) rather than padded, so
every tile is full-sized and every pixel is covered. A plane no larger than a tile is one tile.

Fusion of the boxes of overlapping tiles (class-agnostic, boxes ``x1, y1, x2, y2, score``):

* ``"nms"`` -- greedy non-maximum suppression (``torchvision.ops.nms``): the best box of a
  group survives unchanged.
* ``"wbf"`` -- Weighted Box Fusion (``ensemble_boxes.weighted_boxes_fusion``): a group of
  boxes with IoU above ``iou_thr`` becomes one box at their score-weighted mean. All tiles are
  passed as *one* model: with one model per tile, WBF scales a fused box's score by (boxes in
  its group) / (number of tiles), so a box seen by one of nine tiles would lose 8/9 of its
  score and scores would depend on the grid.

Measured (``benchmarks/bench_tiled_fusion.py``; YOLOv8n-P2 after 40 CPU epochs on the
synthetic training stacks; benchmark stack 48 x 384 x 384; 256 px tiles, 64 px overlap;
point F1 at the best confidence): whole planes 0.743, tiles + NMS 0.746, tiles + WBF 0.742,
tiles costing 1.45-1.55x the time of whole planes. Whole planes are the default (same F1,
less time); where a plane must be tiled (larger than the training scale allows), NMS is the
default fusion: WBF's averaged boxes gained no F1 in either of two runs.

``edge_px``: a box ending within this many pixels of a tile border that lies inside the image
is dropped before fusion: it is an object cut by the tile, whose full view lies in a
neighbouring tile whenever ``overlap`` exceeds the object size. Without this, a cut box (with
a shifted centre) competes with the full one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from microseg.errors import ConfigError

log = logging.getLogger(__name__)

Fusion = Literal["wbf", "nms"]
Tile = tuple[int, int, int, int]  # y0, x0, y1, x1
PredictFn = Callable[[list[np.ndarray]], list[np.ndarray]]


def overlap_px(tile: int, overlap: float) -> int:
    """Overlap in pixels: ``overlap`` pixels (>= 1) or a fraction of the tile (0 <= f < 1)."""
    if overlap < 0:
        raise ConfigError(f"tile overlap must be >= 0; found {overlap}")
    px = round(overlap * tile) if overlap < 1 else int(overlap)
    if px >= tile:
        raise ConfigError(f"tile overlap ({px} px) must be smaller than the tile ({tile} px)")
    return px


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: float = 0) -> list[Tile]:
    """Tiles ``(y0, x0, y1, x1)`` covering an ``height x width`` plane, row by row."""
    if tile < 1:
        raise ConfigError(f"tile size must be >= 1; found {tile}")
    if height < 1 or width < 1:
        raise ConfigError(f"plane must be non-empty; found {height}x{width}")
    step = tile - overlap_px(tile, overlap)
    return [
        (y, x, min(y + tile, height), min(x + tile, width))
        for y in _starts(height, tile, step)
        for x in _starts(width, tile, step)
    ]


def _empty() -> np.ndarray:
    return np.zeros((0, 5), np.float32)


def to_plane(
    boxes: np.ndarray, tile: Tile, image_hw: tuple[int, int], edge_px: float
) -> np.ndarray:
    """Tile boxes ``(N, 5)`` -> plane coordinates, without boxes cut by interior tile borders."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    if not len(boxes):
        return _empty()
    y0, x0, y1, x1 = tile
    height, width = image_hw
    out = boxes.copy()
    out[:, [0, 2]] += x0
    out[:, [1, 3]] += y0
    if edge_px is not None and edge_px >= 0:
        cut = np.zeros(len(out), bool)
        if x0 > 0:
            cut |= out[:, 0] <= x0 + edge_px
        if y0 > 0:
            cut |= out[:, 1] <= y0 + edge_px
        if x1 < width:
            cut |= out[:, 2] >= x1 - edge_px
        if y1 < height:
            cut |= out[:, 3] >= y1 - edge_px
        out = out[~cut]
    return out


def nms_boxes(boxes: np.ndarray, iou_thr: float) -> np.ndarray:
    """Class-agnostic greedy NMS of ``(N, 5)`` boxes; kept rows sorted by decreasing score."""
    import torch
    from torchvision.ops import nms

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    if len(boxes) == 0:
        return _empty()
    t = torch.from_numpy(boxes)
    keep = nms(t[:, :4], t[:, 4], float(iou_thr)).numpy()
    return boxes[keep]


def wbf_boxes(
    boxes: np.ndarray, image_hw: tuple[int, int], iou_thr: float, skip_box_thr: float = 0.0
) -> np.ndarray:
    """Weighted Box Fusion of ``(N, 5)`` plane boxes (one model; see module notes)."""
    from ensemble_boxes import weighted_boxes_fusion

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    if len(boxes) == 0:
        return _empty()
    height, width = image_hw
    scale = np.array([width, height, width, height], dtype=np.float64)
    norm = np.clip(boxes[:, :4] / scale, 0.0, 1.0)
    fused, scores, _ = weighted_boxes_fusion(
        [norm.tolist()],
        [boxes[:, 4].tolist()],
        [[0] * len(boxes)],
        iou_thr=float(iou_thr),
        skip_box_thr=float(skip_box_thr),
        conf_type="avg",
    )
    if len(fused) == 0:
        return _empty()
    out = np.column_stack([np.asarray(fused) * scale, np.asarray(scores)])
    return out.astype(np.float32)


def fuse_boxes(
    tile_boxes: Sequence[np.ndarray],
    image_hw: tuple[int, int],
    method: Fusion = "nms",
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
) -> np.ndarray:
    """Merge boxes of overlapping tiles (already in plane coordinates) into ``(M, 5)``."""
    parts = [np.asarray(b, np.float32).reshape(-1, 5) for b in tile_boxes]
    boxes = np.concatenate(parts) if parts else _empty()
    boxes = boxes[boxes[:, 4] >= skip_box_thr]
    if method == "nms":
        return nms_boxes(boxes, iou_thr)
    if method == "wbf":
        return wbf_boxes(boxes, image_hw, iou_thr, skip_box_thr)
    raise ConfigError(f"tile fusion must be 'wbf' or 'nms'; found {method!r}")


def predict_tiled(
    predict: PredictFn,
    images: Sequence[np.ndarray],
    tile: int,
    overlap: float = 0,
    fusion: Fusion = "nms",
    iou_thr: float = 0.55,
    edge_px: float | None = 2.0,
    skip_box_thr: float = 0.0,
) -> list[np.ndarray]:
    """Detect on every tile of every image with one ``predict`` call, fuse per image.

    ``predict`` maps a list of image crops to one ``(N, 5)`` box array per crop (tile
    coordinates), e.g. ``functools.partial(detector.predict, conf=..., imgsz=tile)``.
    """
    crops: list[np.ndarray] = []
    owners: list[tuple[int, Tile]] = []
    for i, image in enumerate(images):
        height, width = image.shape[:2]
        for t in tile_grid(height, width, tile, overlap):
            crops.append(np.ascontiguousarray(image[t[0] : t[2], t[1] : t[3]]))
            owners.append((i, t))
    results = predict(crops) if crops else []
    per_image: list[list[np.ndarray]] = [[] for _ in images]
    for (i, t), boxes in zip(owners, results, strict=True):
        per_image[i].append(to_plane(boxes, t, images[i].shape[:2], edge_px))
    return [
        fuse_boxes(parts, images[i].shape[:2], fusion, iou_thr, skip_box_thr)
        for i, parts in enumerate(per_image)
    ]
