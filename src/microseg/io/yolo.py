"""YOLO detection labels: one ``cls cx cy w h`` line per box, normalised to [0, 1].

Ultralytics trains from these files; we convert from and to pixel ``x1 y1 x2 y2`` boxes so the
rest of the project never handles normalised coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.atomic import write_text


def _check_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_hw must be positive, got {image_hw}")
    return height, width


def write_yolo_labels(
    path: str | Path,
    boxes_xyxy: np.ndarray,
    classes: np.ndarray | list[int],
    image_hw: tuple[int, int],
) -> Path:
    """Write pixel boxes ``(N, 4)`` as normalised YOLO lines (6 decimals); empty file for N=0."""
    path = Path(path)
    height, width = _check_hw(image_hw)
    boxes = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    if len(classes) != len(boxes):
        raise ShapeMismatchError(
            f"expected one class per box ({len(boxes)} boxes), found {len(classes)} classes", path
        )
    if classes.size and not np.issubdtype(classes.dtype, np.integer):
        numeric = np.issubdtype(classes.dtype, np.floating)
        if not numeric or not np.all(classes == np.round(classes)):
            raise DataFormatError(f"expected integer classes, found {classes[:5]}", path)
    bad = (
        ~np.isfinite(boxes).all(axis=1)
        | (boxes[:, 0] < 0)
        | (boxes[:, 1] < 0)
        | (boxes[:, 2] > width)
        | (boxes[:, 3] > height)
        | (boxes[:, 2] <= boxes[:, 0])
        | (boxes[:, 3] <= boxes[:, 1])
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"expected boxes with 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}, "
            f"found {bad.sum()} invalid, e.g. box {i} = {boxes[i].tolist()}",
            path,
        )
    if len(classes) and classes.min() < 0:
        raise DataFormatError(f"expected class ids >= 0, found {classes.min()}", path)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height
    bw = (boxes[:, 2] - boxes[:, 0]) / width
    bh = (boxes[:, 3] - boxes[:, 1]) / height
    lines = [
        f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"
        for c, x, y, w, h in zip(classes, cx, cy, bw, bh, strict=True)
    ]
    write_text(path, "".join(lines))
    return path


def read_yolo_labels(path: str | Path, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read a YOLO label file into pixel boxes ``(N, 4)`` float64 and classes ``(N,)`` int64."""
    path = Path(path)
    height, width = _check_hw(image_hw)
    if not path.is_file():
        raise MissingFileError("expected a YOLO label file, found nothing", path)
    classes: list[int] = []
    rows: list[list[float]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise DataFormatError(
                f"line {number}: expected 5 columns 'cls cx cy w h', found {len(parts)}: "
                f"{line.strip()!r}",
                path,
            )
        try:
            cls = int(parts[0])
            values = [float(p) for p in parts[1:]]
        except ValueError as exc:
            raise DataFormatError(
                f"line {number}: expected an integer class and 4 numbers, found {line.strip()!r}",
                path,
            ) from exc
        if cls < 0:
            raise DataFormatError(f"line {number}: expected class >= 0, found {cls}", path)
        if not all(0.0 <= v <= 1.0 for v in values):
            raise DataFormatError(
                f"line {number}: expected normalised coordinates in [0, 1], found {values}",
                path,
            )
        if values[2] <= 0 or values[3] <= 0:
            raise DataFormatError(
                f"line {number}: expected positive width and height, found {values[2:]}", path
            )
        classes.append(cls)
        rows.append(values)
    xywh = np.asarray(rows, dtype=float).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=float)
    boxes = (
        np.column_stack(
            [
                xywh[:, 0] - xywh[:, 2] / 2,
                xywh[:, 1] - xywh[:, 3] / 2,
                xywh[:, 0] + xywh[:, 2] / 2,
                xywh[:, 1] + xywh[:, 3] / 2,
            ]
        ).reshape(-1, 4)
        * scale
    )
    return boxes, np.asarray(classes, dtype=np.int64)
