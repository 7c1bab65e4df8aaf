"""COCO instance-segmentation JSON both ways, encoded and decoded by pycocotools.

Ground truth and predictions leave the project as COCO so that pycocotools' ``COCOeval`` and
other tools can score them; label images come back from polygons or (un)compressed RLE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.atomic import write_text

log = logging.getLogger(__name__)

MODES = ("rle", "polygon")


def _instances(labels: np.ndarray) -> Iterable[tuple[int, tuple[slice, slice]]]:
    """(label value, bounding slices) of every instance, in increasing label order."""
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is not None:
            yield index, slices


def _polygons(mask: np.ndarray, offset: tuple[int, int]) -> list[list[float]]:
    """Outer contours of ``mask`` as COCO polygons (pixel centres at +0.5), holes filled."""
    filled = np.pad(ndimage.binary_fill_holes(mask), 1)
    polys = []
    for contour in measure.find_contours(filled.astype(np.float32), 0.5):
        if len(contour) < 3:
            continue
        rows = contour[:, 0] - 1 + offset[0] + 0.5
        cols = contour[:, 1] - 1 + offset[1] + 0.5
        polys.append([round(float(v), 2) for v in np.column_stack([cols, rows]).ravel()])
    return polys


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ShapeMismatchError(
            f"expected a 2D integer label image, found {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise AnnotationError("expected non-negative labels, found negatives")
    return labels


def _annotations(labels: np.ndarray, mode: str) -> Iterable[dict[str, Any]]:
    """Segmentation, bbox and area per instance (without ids)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    labels = _check_labels(labels)
    buffer = np.zeros(labels.shape, dtype=np.uint8, order="F")
    for value, slices in _instances(labels):
        local = labels[slices] == value
        buffer[slices] = local
        rle = mask_utils.encode(buffer)
        buffer[slices] = 0
        if mode == "rle":
            segmentation: Any = {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
        else:
            segmentation = _polygons(local, (slices[0].start, slices[1].start))
            if not segmentation:
                log.warning("instance %d has no polygon (too small); skipped", value)
                continue
        yield {
            "label": int(value),
            "segmentation": segmentation,
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        }


def labels_to_coco(
    samples: Iterable[tuple[int, str, np.ndarray]],
    category_name: str = "nucleus",
    mode: str = "rle",
) -> dict[str, Any]:
    """A COCO ground-truth dict from ``(image_id, file_name, label image)`` triples."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, file_name, labels in samples:
        height, width = np.shape(labels)[:2]
        images.append(
            {"id": int(image_id), "file_name": str(file_name), "height": height, "width": width}
        )
        for ann in _annotations(labels, mode):
            ann.pop("label")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": 1,
                    "iscrowd": 0,
                    **ann,
                }
            )
    return {
        "info": {"description": "microseg export", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category_name, "supercategory": category_name}],
    }


def labels_to_coco_results(
    image_id: int,
    labels: np.ndarray,
    scores: Mapping[int, float] | Sequence[float] | np.ndarray,
    category_id: int = 1,
) -> list[dict[str, Any]]:
    """Predictions in COCO results format (RLE + score), for ``COCO.loadRes``/``COCOeval``.

    ``scores`` maps label value -> score, or lists one score per instance in increasing label
    order.
    """
    anns = list(_annotations(labels, "rle"))
    if not isinstance(scores, Mapping):
        values = np.asarray(scores, dtype=float).ravel()
        if values.size != len(anns):
            raise ShapeMismatchError(
                f"expected one score per instance ({len(anns)}), found {values.size}"
            )
        scores = {ann["label"]: float(v) for ann, v in zip(anns, values, strict=True)}
    missing = [ann["label"] for ann in anns if ann["label"] not in scores]
    if missing:
        raise AnnotationError(f"no score for labels {missing[:10]}")
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "segmentation": ann["segmentation"],
            "bbox": ann["bbox"],
            "area": ann["area"],
            "score": float(scores[ann["label"]]),
        }
        for ann in anns
    ]


def _decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Binary mask from a polygon list, uncompressed RLE (counts list) or compressed RLE."""
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        if list(rle["size"]) != [height, width]:
            raise ShapeMismatchError(
                f"RLE size {rle['size']} differs from the image size {[height, width]}"
            )
    else:
        raise AnnotationError(f"unknown segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def coco_to_labels(coco: Mapping[str, Any], image_id: int) -> np.ndarray:
    """Paint the annotations of one image into a uint16 label image (1..N in file order).

    Where annotations overlap, the earlier one keeps the pixels (as in :mod:`dsb`).
    """
    image = next((im for im in coco["images"] if im["id"] == image_id), None)
    if image is None:
        raise AnnotationError(f"image id {image_id} not in the COCO images")
    height, width = int(image["height"]), int(image["width"])
    labels = np.zeros((height, width), dtype=np.uint16)
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
    if len(anns) > np.iinfo(np.uint16).max:
        raise AnnotationError(f"image {image_id}: {len(anns)} instances do not fit uint16")
    for value, ann in enumerate(anns, start=1):
        mask = _decode(ann["segmentation"], height, width)
        labels[mask & (labels == 0)] = value
    return labels


_REQUIRED = {
    "images": ("id", "height", "width"),
    "annotations": ("id", "image_id", "category_id"),
    "categories": ("id", "name"),
}


def _duplicates(values: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    return sorted({v for v in values if v in seen or seen.add(v)})  # type: ignore[func-returns-value]


def validate_coco(coco: Any, path: str | Path | None = None) -> None:
    """Check keys and cross-references; raise :class:`AnnotationError` naming bad ids."""
    if not isinstance(coco, dict):
        raise AnnotationError(f"expected a JSON object, found {type(coco).__name__}", path)
    missing = [k for k in _REQUIRED if k not in coco]
    if missing:
        raise AnnotationError(f"missing top-level keys {missing} (found {sorted(coco)})", path)
    for section, keys in _REQUIRED.items():
        if not isinstance(coco[section], list):
            raise AnnotationError(f"expected '{section}' to be a list", path)
        for i, entry in enumerate(coco[section]):
            absent = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if absent:
                raise AnnotationError(f"{section}[{i}] lacks keys {absent}", path)
        dupes = _duplicates([e["id"] for e in coco[section]])
        if dupes:
            raise AnnotationError(f"duplicate {section} ids {dupes[:10]}", path)
    image_ids = {im["id"] for im in coco["images"]}
    category_ids = {c["id"] for c in coco["categories"]}
    bad_images = sorted({a["image_id"] for a in coco["annotations"]} - image_ids)
    if bad_images:
        bad_anns = [a["id"] for a in coco["annotations"] if a["image_id"] in bad_images]
        raise AnnotationError(
            f"annotations {bad_anns[:10]} refer to unknown image ids {bad_images[:10]}", path
        )
    bad_cats = sorted({a["category_id"] for a in coco["annotations"]} - category_ids)
    if bad_cats:
        bad_anns = [a["id"] for a in coco["annotations"] if a["category_id"] in bad_cats]
        raise AnnotationError(
            f"annotations {bad_anns[:10]} refer to unknown category ids {bad_cats[:10]}", path
        )
    sizes = {}
    for im in coco["images"]:
        problem = _image_problem(im)
        if problem:
            raise AnnotationError(f"images id {im['id']}: {problem}", path)
        sizes[im["id"]] = (int(im["height"]), int(im["width"]))
    for ann in coco["annotations"]:
        if "segmentation" not in ann:
            continue  # box-only annotations: callers that paint masks say so
        problem = segmentation_problem(ann["segmentation"], *sizes[ann["image_id"]])
        if problem:
            raise AnnotationError(f"annotation id {ann['id']}: {problem}", path)


#: pixels a polygon vertex may lie outside its image (annotation tools round outwards)
OUTSIDE_TOLERANCE = 2.0
MAX_SIDE = 100_000  # px: a declared image larger than this is an error, not an allocation


def _image_problem(im: Mapping[str, Any]) -> str | None:
    for key in ("height", "width"):
        v = im[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIDE:
            return f"{key} must be a whole number in 1..{MAX_SIDE}, found {v!r}"
    name = im.get("file_name")
    if name is not None:
        if not isinstance(name, str) or not name:
            return f"file_name must be a non-empty string, found {name!r}"
        parts = Path(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            return f"file_name {name!r} leaves the dataset folder; use a path relative to it"
    return None


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why a segmentation cannot be painted safely (None when it can): pycocotools trusts
    its input, and a NaN or huge coordinate made it allocate 22 GB or crash (issue 18)."""
    if isinstance(seg, list):
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in poly
            ):
                return f"polygon {i} must be a list of numbers, found {type(poly).__name__}"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {i} has {len(poly)} coordinates; need an even number >= 6"
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            if not np.isfinite(xy).all():
                return f"polygon {i} has NaN or infinite coordinates"
            t = OUTSIDE_TOLERANCE
            if (xy < -t).any() or (xy[:, 0] > width + t).any() or (xy[:, 1] > height + t).any():
                return f"polygon {i} lies outside the {width}x{height} image"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if list(size or []) != [height, width]:
            return f"RLE size {size} differs from the image size {[height, width]}"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "RLE counts must be non-negative whole numbers"
            if sum(counts) != height * width:
                return f"RLE counts sum to {sum(counts)}, not {height * width} pixels"
            return None
        if isinstance(counts, str | bytes):
            raw = counts if isinstance(counts, bytes) else counts.encode("ascii", "replace")
            try:
                area = mask_utils.area({"size": [height, width], "counts": raw})
            except Exception as exc:  # pycocotools' own decode error
                return f"compressed RLE cannot be decoded ({exc})"
            if not 0 <= int(area) <= height * width:
                return "compressed RLE does not fit its image"
            return None
        return "RLE 'counts' must be a list or a compressed string"
    return f"segmentation must be polygons or RLE, found {type(seg).__name__}"


def read_coco(path: str | Path) -> dict[str, Any]:
    """Load and validate a COCO instance JSON file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a COCO JSON file, found nothing", path)
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"expected JSON, could not parse it ({exc})", path) from exc
    validate_coco(coco, path)
    return coco


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("ascii")
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def write_coco(path: str | Path, coco: Mapping[str, Any] | list[dict[str, Any]]) -> Path:
    """Write a COCO dict (or a results list) atomically; dicts are validated first."""
    path = Path(path)
    if isinstance(coco, Mapping):
        validate_coco(dict(coco), path)
    write_text(path, json.dumps(coco, default=_json_default))
    return path
