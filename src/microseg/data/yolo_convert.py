"""DeepD3 ``.d3set`` files -> an Ultralytics detection dataset (one image per z-plane).

Layout written (the whole folder atomically: built in a temporary sibling, then renamed)::

    <out_dir>/images/{train,val}/<stack>_z<zzz>.png   uint8, per-stack percentile normalised
    <out_dir>/labels/{train,val}/<stack>_z<zzz>.txt   one "0 cx cy w h" line per spine box
    <out_dir>/spine_detection.yaml                    train/val, names (root: its folder)
    <out_dir>/convert_summary.json                    options and per-split statistics

``<stack>`` is the d3set key (``x0``, ``x1``, ...). ``channels="single"`` writes greyscale
planes; ``"25d"`` writes RGB PNGs whose channels are planes ``z-1, z, z+1`` (edge planes
repeat the edge), so a 2D detector sees a little depth.

Boxes come from the spine mask of each plane: 8-connected components, kept when their pixel
count lies in ``[min_box_px, max_box_px]`` (the DeepD3-V2 converter counted component pixels
the same way). ``box="component"`` boxes the whole component (head and neck, as that converter
did); ``box="head"`` boxes only the thick part: the component is opened with a disk of half
its largest inscribed radius (necks are thinner than that and vanish) and the opened piece
holding the inscribed-circle centre is boxed. Point ground truth marks head centres.

``box="head"`` is the default, chosen by an oracle (``benchmarks/bench_tiled_fusion.py
--oracle``): ground-truth boxes of all synthetic stacks fed through 3D de-duplication and
point matching at 1000 nm. At each definition's best dedup radius the two tie (pooled F1
0.898 head vs 0.900 component with the box area as score; 0.868 vs 0.854 with a random
score), but the head wins in 20 of 22 dedup settings and its points lie ~100 nm nearer the
annotation (benchmark mean distance 415 vs 502 nm at 1500 nm), margin a learned detector's
own localisation error will use up.

``channels="25d"`` measured against ``"single"`` (``benchmarks/bench_yolo_25d.py``, YOLOv8n-P2,
40 CPU epochs, one seed): point F1 0.772 vs 0.685 on the validation stacks and 0.782 vs 0.743
on the benchmark stack; after 15 epochs 2.5D was still behind (0.467 vs 0.573, 0.470 vs
0.579): it learns slower and ends better.

Box coordinates are pixel edges: a component spanning columns ``i..j`` gives ``x1=i, x2=j+1``
(Ultralytics' convention), so a box centre in voxel-centre coordinates is ``(x1+x2)/2 - 0.5``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage as ndi
from tqdm import tqdm

from microseg.data.transforms import percentile_range, to_uint8
from microseg.errors import ConfigError, ShapeMismatchError
from microseg.io.d3set import read_d3set
from microseg.io.yolo import write_yolo_labels
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

Channels = Literal["single", "25d"]
BoxMode = Literal["component", "head"]
SPLITS = ("train", "val")
DATA_YAML = "spine_detection.yaml"
SUMMARY_JSON = "convert_summary.json"
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class SplitStats:
    """What the conversion kept and dropped in one split."""

    stacks: int = 0
    planes: int = 0
    images: int = 0
    boxes: int = 0
    empty_images: int = 0
    empty_planes_skipped: int = 0
    components: int = 0
    dropped_small: int = 0
    dropped_large: int = 0
    box_width_px: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float | int]:
        widths = np.asarray(self.box_width_px, dtype=float)
        out: dict[str, float | int] = {k: v for k, v in vars(self).items() if k != "box_width_px"}
        if len(widths):
            out["box_size_px_median"] = float(np.median(widths))
            out["box_size_px_p95"] = float(np.percentile(widths, 95))
        return out


def plane_image(stack: np.ndarray, z: int, lo: float, hi: float, channels: Channels) -> np.ndarray:
    """The uint8 image of plane ``z``: ``HxW`` (single) or ``HxWx3`` = planes z-1, z, z+1."""
    if channels == "single":
        return to_uint8(stack[z], lo, hi)
    if channels == "25d":
        last = stack.shape[0] - 1
        idx = (max(z - 1, 0), z, min(z + 1, last))
        return np.stack([to_uint8(stack[i], lo, hi) for i in idx], axis=-1)
    raise ConfigError(f"channels must be 'single' or '25d'; found {channels!r}")


def _head_slices(comp: np.ndarray) -> tuple[slice, slice]:
    """Bounding slices (in ``comp``'s frame) of the thick part of one component mask.

    Opening with a disk of radius ``rho = r/2`` (``r`` the largest inscribed radius) keeps the
    pixels covered by disks of radius ``rho`` that fit inside: a neck narrower than ``2 rho``
    disappears, a head does not. The opened piece that holds the deepest pixel is the head.
    """
    padded = np.pad(comp, 1)
    edt = ndi.distance_transform_edt(padded)
    r = float(edt.max())
    rho = 0.5 * r
    core = edt > rho
    # dilate the core back by rho: every pixel within rho of a core pixel (and in the mask)
    opened = (ndi.distance_transform_edt(~core) <= rho) & padded
    pieces, _ = ndi.label(opened, structure=_EIGHT)
    deepest = np.unravel_index(int(np.argmax(edt)), edt.shape)
    head = pieces == pieces[deepest]
    ys, xs = np.nonzero(head)
    return slice(ys.min() - 1, ys.max()), slice(xs.min() - 1, xs.max())


def mask_boxes(
    mask: np.ndarray,
    *,
    min_box_px: int = 10,
    max_box_px: int = 5000,
    box: BoxMode = "component",
    pad_px: float = 0.0,
    stats: SplitStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(N, 4)`` x1, y1, x2, y2 (pixel edges) of the spines in one plane's mask.

    Also returns each box's component pixel count ``(N,)``. Components outside
    ``[min_box_px, max_box_px]`` pixels are dropped (counted in ``stats``). ``pad_px`` grows
    each box on every side, clipped to the image.
    """
    if box not in ("component", "head"):
        raise ConfigError(f"box must be 'component' or 'head'; found {box!r}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ShapeMismatchError(f"expected a 2D plane mask, found shape {mask.shape}")
    height, width = mask.shape
    labels, n = ndi.label(mask, structure=_EIGHT)
    out, areas = [], []
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            area = int(sizes[k])
            if stats is not None:
                stats.components += 1
            if area < min_box_px:
                if stats is not None:
                    stats.dropped_small += 1
                continue
            if area > max_box_px:
                if stats is not None:
                    stats.dropped_large += 1
                continue
            ys, xs = sl
            if box == "head":
                hy, hx = _head_slices(labels[sl] == k)
                ys = slice(ys.start + hy.start, ys.start + hy.stop)
                xs = slice(xs.start + hx.start, xs.start + hx.stop)
            out.append((xs.start, ys.start, xs.stop, ys.stop))
            areas.append(area)
    boxes = np.asarray(out, dtype=float).reshape(-1, 4)
    if pad_px and len(boxes):
        boxes += np.array([-pad_px, -pad_px, pad_px, pad_px])
        boxes = np.clip(boxes, 0, [width, height, width, height])
    return boxes, np.asarray(areas, dtype=np.int64)


def stack_boxes(
    mask: np.ndarray,
    *,
    min_box_px: int = 10,
    max_box_px: int = 5000,
    box: BoxMode = "component",
    pad_px: float = 0.0,
) -> pd.DataFrame:
    """All plane boxes of a ZYX spine mask as a frame ``z, x1, y1, x2, y2, area, x, y``.

    ``x, y`` are box centres in voxel-centre coordinates (what point annotations use).
    """
    rows = []
    for z in range(mask.shape[0]):
        boxes, areas = mask_boxes(
            mask[z], min_box_px=min_box_px, max_box_px=max_box_px, box=box, pad_px=pad_px
        )
        for b, a in zip(boxes, areas, strict=True):
            rows.append((z, *b, a))
    df = pd.DataFrame(rows, columns=["z", "x1", "y1", "x2", "y2", "area"])
    df = df.astype({"z": np.int64, "area": np.int64})
    df["x"] = (df["x1"] + df["x2"]) / 2 - 0.5
    df["y"] = (df["y1"] + df["y2"]) / 2 - 0.5
    return df


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, compress_level=1)


def _keep_empty(include_empty: bool | float, rng: np.random.Generator) -> bool:
    if include_empty is True:
        return True
    if include_empty is False:
        return False
    return bool(rng.random() < float(include_empty))


def _convert_split(
    d3set_path: Path,
    root: Path,
    split: str,
    *,
    stats: SplitStats,
    min_box_px: int,
    max_box_px: int,
    channels: Channels,
    norm_percentiles: Sequence[float],
    include_empty: bool | float,
    pad_px: float,
    box: BoxMode,
    rng: np.random.Generator,
) -> None:
    d3 = read_d3set(d3set_path)
    img_dir, lab_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for key in tqdm(d3.stack_keys(), desc=f"yolo {split}"):
        stack, spines = d3.stacks[key], d3.spines[key]
        lo, hi = percentile_range(stack, norm_percentiles)
        stats.stacks += 1
        for z in range(stack.shape[0]):
            stats.planes += 1
            boxes, _ = mask_boxes(
                spines[z],
                min_box_px=min_box_px,
                max_box_px=max_box_px,
                box=box,
                pad_px=pad_px,
                stats=stats,
            )
            if not len(boxes):
                # validation keeps every plane: its precision must see the empty ones too
                if split == "train" and not _keep_empty(include_empty, rng):
                    stats.empty_planes_skipped += 1
                    continue
                stats.empty_images += 1
            name = f"{key}_z{z:03d}"
            _write_png(img_dir / f"{name}.png", plane_image(stack, z, lo, hi, channels))
            write_yolo_labels(
                lab_dir / f"{name}.txt", boxes, np.zeros(len(boxes), int), spines[z].shape
            )
            stats.images += 1
            stats.boxes += len(boxes)
            stats.box_width_px.extend(
                np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            )


def data_yaml_text() -> str:
    """The Ultralytics dataset file for a converted folder at ``root``.

    No ``path:`` key: Ultralytics then takes the folder of the yaml (given as an absolute
    path) as the root, so the file's bytes -- a DVC output -- are the same on every machine.
    """
    return (
        "# Ultralytics detection dataset written by microseg.data.yolo_convert\n"
        "# root: the folder of this file (pass its absolute path to Ultralytics)\n"
        "train: images/train\n"
        "val: images/val\n"
        "nc: 1\n"
        "names:\n"
        "  0: spine\n"
    )


def convert_d3set_to_yolo(
    train_d3set: str | Path,
    val_d3set: str | Path,
    out_dir: str | Path,
    *,
    min_box_px: int = 10,
    max_box_px: int = 5000,
    channels: Channels = "single",
    norm_percentiles: Sequence[float] = (1.0, 99.8),
    include_empty: bool | float = True,
    pad_px: float = 0.0,
    box: BoxMode = "head",
    seed: int = 0,
) -> Path:
    """Write the Ultralytics dataset for a train and a val ``.d3set``; returns the data yaml.

    ``include_empty``: ``True`` keeps every training plane without spines, ``False`` none,
    a float in [0, 1] keeps that random fraction (seeded); validation keeps every plane.
    Statistics (images, boxes, components dropped as too small / too large per split) go to
    ``convert_summary.json`` next to the yaml.
    """
    if channels not in ("single", "25d"):
        raise ConfigError(f"channels must be 'single' or '25d'; found {channels!r}")
    if box not in ("component", "head"):
        raise ConfigError(f"box must be 'component' or 'head'; found {box!r}")
    if not 0 <= min_box_px <= max_box_px:
        raise ConfigError(
            f"need 0 <= min_box_px <= max_box_px; found {min_box_px} and {max_box_px}"
        )
    if not isinstance(include_empty, bool) and not 0.0 <= float(include_empty) <= 1.0:
        raise ConfigError(
            f"include_empty must be a bool or a fraction in [0, 1]; found {include_empty!r}"
        )
    lo_p, hi_p = (float(p) for p in norm_percentiles)
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ConfigError(
            f"norm_percentiles must satisfy 0 <= low < high <= 100; found {norm_percentiles}"
        )
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    stats = {s: SplitStats() for s in SPLITS}
    with atomic_path(out_dir) as tmp:
        for split, src in zip(SPLITS, (train_d3set, val_d3set), strict=True):
            _convert_split(
                Path(src),
                tmp,
                split,
                stats=stats[split],
                min_box_px=min_box_px,
                max_box_px=max_box_px,
                channels=channels,
                norm_percentiles=(lo_p, hi_p),
                include_empty=include_empty,
                pad_px=pad_px,
                box=box,
                rng=rng,
            )
        (tmp / DATA_YAML).write_text(data_yaml_text())
        summary = {
            # as given (relative in the pipeline): an absolute path put the clone's location
            # into the bytes DVC hashes, so every clone "changed" data/yolo/spines
            "train_d3set": Path(train_d3set).as_posix(),
            "val_d3set": Path(val_d3set).as_posix(),
            "options": {
                "min_box_px": min_box_px,
                "max_box_px": max_box_px,
                "channels": channels,
                "norm_percentiles": [lo_p, hi_p],
                "include_empty": include_empty,
                "pad_px": pad_px,
                "box": box,
                "seed": seed,
            },
            "splits": {s: st.as_dict() for s, st in stats.items()},
        }
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    for split, st in stats.items():
        log.info(
            "yolo %s: %d images, %d boxes, dropped %d small / %d large components",
            split,
            st.images,
            st.boxes,
            st.dropped_small,
            st.dropped_large,
        )
    return out_dir / DATA_YAML


def read_summary(out_dir: str | Path) -> dict:
    """The ``convert_summary.json`` of a converted dataset."""
    return json.loads((Path(out_dir) / SUMMARY_JSON).read_text())
