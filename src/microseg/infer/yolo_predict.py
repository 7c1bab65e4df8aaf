"""Spine detection on a 3D stack with a 2D box detector: plane boxes -> 3D points -> sweep.

:func:`predict_stack` streams a ``ZYX`` stack plane by plane: it reads only the planes of the
current batch (plus one neighbour on each side for 2.5D input), scales intensities with
percentiles taken once from a strided subsample of the stack (as the training images were
scaled per stack), and predicts on whole planes or tiles (:mod:`microseg.infer.tiling`).
Memory therefore depends on the plane size and ``batch_planes``, not on the stack depth.

Boxes are pixel-edge coordinates (``x1..x2`` covers columns ``x1 <= c < x2``); the centre in
voxel-centre coordinates -- the convention of point annotations -- is ``(x1 + x2)/2 - 0.5``.

:func:`detections_to_points` merges one spine's boxes across planes in nanometres
(:func:`microseg.infer.dedup.dedup_3d`). :func:`sweep` scores a grid of confidence and NMS
IoU thresholds from *one* network pass: predict with the lowest confidence and ``iou=1.0``
(no suppression), and the sweep applies per-plane NMS and the confidence cut itself. Greedy NMS
keeps a box only against higher-scoring boxes, so NMS at the lowest confidence followed by a
higher cut equals the cut followed by NMS: one NMS per IoU value serves every confidence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from microseg.data.transforms import sample_percentiles, to_uint8
from microseg.errors import ConfigError, ShapeMismatchError
from microseg.evaluate.points import evaluate_points
from microseg.infer.dedup import dedup_3d
from microseg.infer.tiling import Fusion, overlap_px, predict_tiled
from microseg.io.tiff import TiffStack, open_stack
from microseg.utils.atomic import atomic_path
from microseg.utils.progress import bar_disabled

log = logging.getLogger(__name__)

DET_COLS = ["z", "x1", "y1", "x2", "y2", "score", "x", "y"]
SUMMARY_COLS = ["conf", "iou", "precision", "recall", "f1", "tp", "fp", "fn", "n_points", "n_boxes"]
Channels = Literal["single", "25d"]


class Detector(Protocol):
    def predict(self, images: list[np.ndarray], **kwargs: Any) -> list[np.ndarray]: ...


def _empty_detections() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=float) for c in DET_COLS})
    return df.astype({"z": np.int64})


class _PlaneCache:
    """uint8 planes of a stack, read on demand and forgotten once the stream has passed them."""

    def __init__(self, stack: TiffStack | np.ndarray, lo: float, hi: float) -> None:
        self.stack, self.lo, self.hi = stack, lo, hi
        self.depth = int(stack.shape[0])
        self.planes: dict[int, np.ndarray] = {}

    def get(self, z: int) -> np.ndarray:
        z = min(max(z, 0), self.depth - 1)
        if z not in self.planes:
            self.planes[z] = to_uint8(np.asarray(self.stack[z]), self.lo, self.hi)
        return self.planes[z]

    def image(self, z: int, channels: Channels) -> np.ndarray:
        if channels == "single":
            return self.get(z)
        return np.stack([self.get(z - 1), self.get(z), self.get(z + 1)], axis=-1)

    def forget_below(self, z: int) -> None:
        for k in [k for k in self.planes if k < z]:
            del self.planes[k]


def _boxes_frame(z_of: Sequence[int], boxes: Sequence[np.ndarray]) -> pd.DataFrame:
    parts = [
        np.column_stack([np.full(len(b), z, dtype=float), b])
        for z, b in zip(z_of, boxes, strict=True)
        if len(b)
    ]
    if not parts:
        return _empty_detections()
    arr = np.concatenate(parts)
    df = pd.DataFrame(arr, columns=DET_COLS[:6])
    df["z"] = df["z"].astype(np.int64)
    df["x"] = (df["x1"] + df["x2"]) / 2 - 0.5
    df["y"] = (df["y1"] + df["y2"]) / 2 - 0.5
    return df


def predict_stack(
    detector: Detector,
    stack: str | Path | TiffStack | np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    tile: tuple[int, float] | None = None,
    fusion: Fusion = "nms",
    fusion_iou: float = 0.55,
    edge_px: float | None = 2.0,
    batch_planes: int = 8,
    channels: Channels = "single",
    norm_percentiles: Sequence[float] = (1.0, 99.8),
    imgsz: int | None = None,
    max_det: int = 300,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-plane boxes of a ``ZYX`` stack: frame ``z, x1, y1, x2, y2, score, x, y``.

    ``tile=(size, overlap)`` predicts on tiles (overlap in pixels, or a fraction of the tile
    when below 1) fused with ``fusion`` at ``fusion_iou``; ``None`` predicts whole planes.
    ``imgsz=None`` keeps pixels at native scale (the plane or tile size, up to the stride).
    ``iou`` is the detector's own NMS threshold (1.0 keeps every raw box, for :func:`sweep`).
    """
    if channels not in ("single", "25d"):
        raise ConfigError(f"channels must be 'single' or '25d'; found {channels!r}")
    if batch_planes < 1:
        raise ConfigError(f"batch_planes must be >= 1; found {batch_planes}")
    opened = None
    if isinstance(stack, str | Path):
        stack = opened = open_stack(stack)
    try:
        if len(stack.shape) != 3:
            raise ShapeMismatchError(f"expected a ZYX stack, found shape {tuple(stack.shape)}")
        depth, height, width = (int(s) for s in stack.shape)
        lo, hi = sample_percentiles(stack, norm_percentiles)
        cache = _PlaneCache(stack, lo, hi)
        predict_kw = {"conf": conf, "iou": iou, "max_det": max_det}
        if tile is not None:
            size, overlap = int(tile[0]), float(tile[1])
            overlap_px(size, overlap)  # validates
            predict_kw["imgsz"] = imgsz or _stride_up(min(size, max(height, width)))
            run = partial(
                predict_tiled,
                partial(detector.predict, **predict_kw),
                tile=size,
                overlap=overlap,
                fusion=fusion,
                iou_thr=fusion_iou,
                edge_px=edge_px if overlap_px(size, overlap) > 0 else None,
            )
        else:
            predict_kw["imgsz"] = imgsz or _stride_up(max(height, width))
            run = partial(detector.predict, **predict_kw)
        frames = []
        starts = range(0, depth, batch_planes)
        for z0 in tqdm(starts, desc="predict planes", disable=bar_disabled(progress), unit="batch"):
            zs = list(range(z0, min(z0 + batch_planes, depth)))
            images = [cache.image(z, channels) for z in zs]
            frames.append(_boxes_frame(zs, run(images)))
            cache.forget_below(zs[-1])  # keeps the last plane: z-1 of the next batch
        frames = [f for f in frames if len(f)]
        out = pd.concat(frames, ignore_index=True) if frames else _empty_detections()
        log.info("predicted %d boxes on %d planes", len(out), depth)
        return out
    finally:
        if opened is not None:
            opened.close()


def _stride_up(size: int, stride: int = 32) -> int:
    return int(np.ceil(size / stride) * stride)


def detections_to_points(
    df: pd.DataFrame,
    voxel_size_nm: Sequence[float],
    dedup_radius_nm: float = 1500.0,
    mode: Literal["nms", "cluster"] = "nms",
) -> pd.DataFrame:
    """One point per spine: plane boxes merged in 3D within ``dedup_radius_nm``.

    Box centres (voxel-centre convention) give ``x, y``; the plane gives ``z``. Returns the
    kept rows with ``x, y, z, score`` and the box, plus ``n_merged, z_min, z_max``.
    """
    need = {"z", "x1", "y1", "x2", "y2", "score"}
    if missing := need - set(df.columns):
        raise ConfigError(f"detections need columns {sorted(need)}; missing {sorted(missing)}")
    df = df[[c for c in DET_COLS if c in df.columns]].copy()
    df["x"] = (df["x1"] + df["x2"]) / 2 - 0.5
    df["y"] = (df["y1"] + df["y2"]) / 2 - 0.5
    return dedup_3d(df, voxel_size_nm, dedup_radius_nm, score_col="score", mode=mode)


def nms_per_plane(df: pd.DataFrame, iou: float, conf: float = 0.0) -> pd.DataFrame:
    """Boxes with ``score >= conf`` after class-agnostic NMS at ``iou`` within each plane."""
    import torch
    from torchvision.ops import batched_nms

    df = df[df["score"] >= conf]
    if len(df) == 0 or iou >= 1.0:
        return df.reset_index(drop=True)
    boxes = torch.from_numpy(df[["x1", "y1", "x2", "y2"]].to_numpy(np.float32))
    scores = torch.from_numpy(df["score"].to_numpy(np.float32))
    planes = torch.from_numpy(df["z"].to_numpy(np.int64))
    keep = batched_nms(boxes, scores, planes, float(iou)).numpy()
    return df.iloc[np.sort(keep)].reset_index(drop=True)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def sweep(
    detections: pd.DataFrame,
    gt_points: pd.DataFrame,
    voxel_size_nm: Sequence[float],
    confs: Sequence[float],
    ious: Sequence[float],
    out_dir: str | Path | None = None,
    *,
    dedup_radius_nm: float = 1500.0,
    dedup_mode: Literal["nms", "cluster"] = "nms",
    max_dist_nm: float = 1000.0,
) -> pd.DataFrame:
    """Point precision/recall/F1 for every (confidence, NMS IoU) pair, without re-predicting.

    ``detections``: raw per-plane boxes, e.g. ``predict_stack(..., conf=min(confs), iou=1.0,
    max_det=3000)`` (no NMS, and room for every raw box: ``max_det`` caps boxes per image).
    With ``out_dir``, writes ``predictions_conf{c:.2f}_iou{i:.2f}.csv`` (the plane boxes kept
    at that setting) per pair and ``metrics_summary.csv``, each atomically. Returns the summary
    (columns ``conf, iou, precision, recall, f1, tp, fp, fn, n_points, n_boxes``).
    """
    if not len(confs) or not len(ious):
        raise ConfigError("sweep needs at least one confidence and one IoU threshold")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    base = detections[detections["score"] >= min(confs)]
    rows = []
    for iou in sorted(ious):
        kept = nms_per_plane(base, iou)
        for conf in sorted(confs):
            boxes = kept[kept["score"] >= conf].reset_index(drop=True)
            if out is not None:
                _write_csv(out / f"predictions_conf{conf:.2f}_iou{iou:.2f}.csv", boxes)
            points = detections_to_points(boxes, voxel_size_nm, dedup_radius_nm, dedup_mode)
            m = evaluate_points(points, gt_points, voxel_size_nm, max_dist_nm)
            rows.append(
                (conf, iou, m["precision"], m["recall"], m["f1"], m["tp"], m["fp"], m["fn"],
                 len(points), len(boxes))
            )  # fmt: skip
    summary = pd.DataFrame(rows, columns=SUMMARY_COLS)
    if out is not None:
        _write_csv(out / "metrics_summary.csv", summary)
    best = summary.loc[summary["f1"].idxmax()]
    log.info("sweep best: conf=%.2f iou=%.2f F1=%.3f", best["conf"], best["iou"], best["f1"])
    return summary
