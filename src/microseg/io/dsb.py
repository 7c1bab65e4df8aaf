"""Kaggle Data Science Bowl 2018 folders, in two layouts that the readers tell apart by themselves.

* **published**: ``<root>/<id>/images/<id>.png`` (RGBA) + ``<root>/<id>/masks/*.png``, one binary
  PNG per nucleus, byte for byte as Kaggle/BBBC038 ship it;
* **compact** (what the repository bundles, written by :func:`pack_dsb`):
  ``<root>/images/<id>.png`` (8-bit greyscale, or RGB for colour images) +
  ``<root>/labels/<id>.png`` (one uint16 label image). The same pixels in a quarter of the space:
  the published RGBA repeats every grey value three times plus an opaque alpha, and each nucleus
  costs a full-size PNG.

Instance masks are merged into one uint16 label image (1..N in sorted mask-file order). A few
published masks overlap; the earlier mask keeps the contested pixels, so every instance keeps
the pixels it owns alone, and the overlap is counted and logged rather than silently lost. The
compact layout stores the result of exactly that merge, so both layouts read the same arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.png import list_png_pairs, read_image, read_png, to_image
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

MODALITIES = ("fluorescence", "brightfield", "tissue")

Layout = Literal["published", "compact"]
#: sub-folders of the compact layout
COMPACT_IMAGES, COMPACT_LABELS = "images", "labels"


@dataclass
class DsbSample:
    image: np.ndarray  # (H, W) uint8 greyscale or (H, W, 3) uint8 colour
    labels: np.ndarray  # (H, W) uint16, 0 = background
    modality: str  # fluorescence | brightfield | tissue
    sample_id: str = ""
    n_overlap_pixels: int = 0  # compact samples: resolved when packed, so 0 here
    image_path: Path | None = None  # the file the image was read from


def modality_of(image: np.ndarray) -> str:
    """Colour = H&E-like tissue; grey on a bright background = brightfield; else fluorescence."""
    if image.ndim == 3:
        return "tissue"
    return "brightfield" if float(np.median(image)) > 0.5 * float(image.max()) else "fluorescence"


def dsb_layout(root: str | Path) -> Layout:
    """Which layout ``root`` holds: ``compact`` (``images/`` + ``labels/``) or ``published``
    (one folder per sample); a folder that is neither raises, naming it."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError("expected a DSB 2018 folder of samples, found nothing", root)
    has_images = (root / COMPACT_IMAGES).is_dir()
    has_labels = (root / COMPACT_LABELS).is_dir()
    if has_images and has_labels:
        return "compact"
    if has_images or has_labels:  # a published sample id is a 64-hex hash, never these names
        missing = COMPACT_LABELS if has_images else COMPACT_IMAGES
        raise DataFormatError(
            f"expected the compact DSB layout (images/<id>.png + labels/<id>.png), "
            f"found no {missing}/ folder",
            root,
        )
    if any(c.is_dir() and not c.name.startswith(".") for c in root.iterdir()):
        return "published"
    raise DataFormatError(
        "expected a DSB 2018 folder in the published layout (<id>/images/<id>.png + "
        "<id>/masks/*.png) or the compact one (images/<id>.png + labels/<id>.png), found neither",
        root,
    )


def list_dsb_samples(root: str | Path) -> list[str]:
    """Sorted sample ids under ``root``, in either layout."""
    root = Path(root)
    if dsb_layout(root) == "compact":
        return [image.stem for image, _ in list_png_pairs(root, mask_dir=COMPACT_LABELS)]
    ids = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if not (child / "images" / f"{child.name}.png").is_file():
            raise DataFormatError(
                f"expected images/{child.name}.png in every sample folder, found "
                f"{sorted(p.name for p in (child / 'images').glob('*'))}",
                child,
            )
        ids.append(child.name)
    if not ids:
        raise AnnotationError("expected DSB sample folders, found none", root)
    return ids


def merge_masks(
    mask_paths: list[Path], shape: tuple[int, int], where: Path
) -> tuple[np.ndarray, int]:
    """One uint16 label image from per-instance masks, in the given order; the earlier mask
    keeps contested pixels. Returns the labels and the number of contested pixels."""
    height, width = shape
    labels = np.zeros(height * width, dtype=np.uint16)
    overlap = 0
    label = 0
    for mask_path in mask_paths:
        mask = read_png(mask_path)
        if mask.ndim == 3:
            mask = mask[..., :3].max(axis=-1) if mask.shape[-1] >= 3 else mask[..., 0]
        if mask.shape != (height, width):
            raise ShapeMismatchError(
                f"mask shape {mask.shape} differs from image shape {(height, width)}", mask_path
            )
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            log.warning("%s: empty mask skipped", mask_path)
            continue
        label += 1
        if label > np.iinfo(np.uint16).max:
            raise AnnotationError("more than 65535 instances do not fit uint16", where)
        taken = labels[idx] != 0
        n_taken = int(taken.sum())
        overlap += n_taken
        labels[idx[~taken] if n_taken else idx] = label
    if label == 0:
        raise AnnotationError("expected at least one non-empty mask, found none", where)
    if overlap:
        log.warning("%s: %d pixels claimed by more than one mask kept the first", where, overlap)
    return labels.reshape(height, width), overlap


def _check_opaque(raw: np.ndarray, path: Path) -> None:
    """The compact layout keeps no alpha: refuse to drop one that carries information."""
    if raw.ndim == 3 and raw.shape[-1] in (2, 4):
        n = int(np.count_nonzero(raw[..., -1] != np.iinfo(raw.dtype).max))
        if n:
            raise DataFormatError(
                f"expected an opaque alpha channel, found {n} non-opaque pixels; the compact "
                "layout stores no alpha, so this image cannot be packed losslessly",
                path,
            )


def _read_published(root: Path, sample_id: str, check_alpha: bool = False) -> DsbSample:
    folder = root / sample_id
    image_path = folder / "images" / f"{sample_id}.png"
    if not image_path.is_file():
        raise MissingFileError("expected the sample image, found nothing", image_path)
    raw = read_png(image_path)
    if raw.dtype != np.uint8:
        raise DataFormatError(f"expected an 8-bit image, found {raw.dtype}", image_path)
    if check_alpha:
        _check_opaque(raw, image_path)
    image = to_image(raw)
    mask_paths = sorted((folder / "masks").glob("*.png"))
    if not mask_paths:
        raise AnnotationError("expected at least one mask in masks/, found none", folder)
    labels, overlap = merge_masks(mask_paths, image.shape[:2], folder)
    return DsbSample(
        image=image,
        labels=labels,
        modality=modality_of(image),
        sample_id=sample_id,
        n_overlap_pixels=overlap,
        image_path=image_path,
    )


def _read_compact(root: Path, sample_id: str) -> DsbSample:
    image_path = root / COMPACT_IMAGES / f"{sample_id}.png"
    label_path = root / COMPACT_LABELS / f"{sample_id}.png"
    image = read_image(image_path)
    if image.dtype != np.uint8:
        raise DataFormatError(f"expected an 8-bit image, found {image.dtype}", image_path)
    labels = read_png(label_path)
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise DataFormatError(
            f"expected a uint16 (H, W) label image, found {labels.dtype} {labels.shape}",
            label_path,
        )
    if labels.shape != image.shape[:2]:
        raise ShapeMismatchError(
            f"labels shape {labels.shape} differs from image shape {image.shape[:2]}", label_path
        )
    if not labels.any():
        raise AnnotationError("expected at least one instance, found none", label_path)
    return DsbSample(
        image=image,
        labels=labels.astype(np.uint16, copy=False),
        modality=modality_of(image),
        sample_id=sample_id,
        image_path=image_path,
    )


def read_dsb_sample(root: str | Path, sample_id: str) -> DsbSample:
    """Image, merged instance labels and modality of one DSB sample, in either layout."""
    root = Path(root)
    if dsb_layout(root) == "compact":
        return _read_compact(root, sample_id)
    return _read_published(root, sample_id)


def iter_dsb_samples(root: str | Path, workers: int = 2) -> Iterator[DsbSample]:
    """All samples in sorted order, decoded by ``workers`` threads (PNG decoding drops the GIL)."""
    ids = list_dsb_samples(root)
    if workers <= 1:
        for sample_id in ids:
            yield read_dsb_sample(root, sample_id)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda i: read_dsb_sample(root, i), ids)


# ------------------------------------------------------------------------ compact packing
@dataclass(frozen=True)
class PackReport:
    """What :func:`pack_dsb` wrote: counts that a reader can check against the source."""

    out: Path
    n_samples: int
    n_greyscale: int
    n_colour: int
    n_instances: int
    n_overlap_pixels: int
    n_bytes: int


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=True)


def _pack_one(src: Path, dst: Path, sample_id: str) -> tuple[int, int, int]:
    """Pack one sample, read it back and compare: the conversion is checked as it is made."""
    sample = _read_published(src, sample_id, check_alpha=True)
    image_path = dst / COMPACT_IMAGES / f"{sample_id}.png"
    label_path = dst / COMPACT_LABELS / f"{sample_id}.png"
    _save_png(image_path, sample.image)  # 2D -> 'L', (H, W, 3) -> 'RGB'
    _save_png(label_path, sample.labels.astype(np.uint16))  # 'I;16'
    back = _read_compact(dst, sample_id)
    if not (
        np.array_equal(back.image, sample.image) and np.array_equal(back.labels, sample.labels)
    ):
        raise DataFormatError("packed sample does not read back identical", src / sample_id)
    n_instances = len(np.unique(sample.labels)) - 1
    return int(sample.image.ndim == 3), n_instances, sample.n_overlap_pixels


def pack_dsb(
    src_root: str | Path, dst_root: str | Path, workers: int = 2, overwrite: bool = False
) -> PackReport:
    """Published DSB folders -> the compact layout, losslessly and atomically.

    Images whose colour channels are equal become 8-bit greyscale PNGs, the others RGB; an alpha
    channel must be opaque (it is dropped, so a non-opaque one raises). The masks become one
    uint16 label PNG merged as :func:`read_dsb_sample` merges them. Every written sample is read
    back and compared; ``dst_root`` appears only when all samples have been packed.
    """
    src, dst = Path(src_root).resolve(), Path(dst_root).resolve()
    if dsb_layout(src) != "published":
        raise DataFormatError("expected the published DSB layout to pack, found compact", src)
    if dst == src or src in dst.parents or dst in src.parents:
        raise DataFormatError(f"destination {dst} overlaps the source", src)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise DataFormatError("destination exists and is not empty (pass overwrite)", dst)
    ids = list_dsb_samples(src)
    with atomic_path(dst) as tmp:
        (tmp / COMPACT_IMAGES).mkdir(parents=True)
        (tmp / COMPACT_LABELS).mkdir()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            done = list(pool.map(lambda i: _pack_one(src, tmp, i), ids))
        n_bytes = sum(p.stat().st_size for p in tmp.rglob("*.png"))
    n_colour = sum(d[0] for d in done)
    report = PackReport(
        out=dst,
        n_samples=len(ids),
        n_greyscale=len(ids) - n_colour,
        n_colour=n_colour,
        n_instances=sum(d[1] for d in done),
        n_overlap_pixels=sum(d[2] for d in done),
        n_bytes=n_bytes,
    )
    log.info("packed %d DSB samples into %s (%d bytes)", report.n_samples, dst, n_bytes)
    return report


def write_dsb_sample(
    root: str | Path, sample_id: str, image: np.ndarray, labels: np.ndarray
) -> Path:
    """Write one sample in the published layout (RGBA image, one 0/255 PNG per instance)."""
    folder = Path(root) / sample_id
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise DataFormatError(
            f"expected a uint8 (H, W) or (H, W, 3) image, found {image.dtype} {image.shape}",
            folder,
        )
    if labels.shape != image.shape[:2]:
        raise ShapeMismatchError(
            f"labels shape {labels.shape} differs from image shape {image.shape[:2]}", folder
        )
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        raise AnnotationError("expected at least one instance in labels, found none", folder)
    with atomic_path(folder) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        Image.fromarray(rgba, mode="RGBA").save(tmp / "images" / f"{sample_id}.png")
        for k, value in enumerate(ids):
            mask = (labels == value).astype(np.uint8) * 255
            Image.fromarray(mask).save(tmp / "masks" / f"{k:04d}.png")
    return folder
