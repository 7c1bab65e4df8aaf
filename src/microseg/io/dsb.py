"""Kaggle Data Science Bowl 2018 folders: ``<root>/<id>/images/<id>.png`` + one PNG per nucleus.

Instance masks are merged into one uint16 label image (1..N in sorted mask-file order). A few
published masks overlap; the earlier mask keeps the contested pixels, so every instance keeps
the pixels it owns alone, and the overlap is counted and logged rather than silently lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.png import read_image, read_png
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

MODALITIES = ("fluorescence", "brightfield", "tissue")


@dataclass
class DsbSample:
    image: np.ndarray  # (H, W) uint8 greyscale or (H, W, 3) uint8 colour
    labels: np.ndarray  # (H, W) uint16, 0 = background
    modality: str  # fluorescence | brightfield | tissue
    sample_id: str = ""
    n_overlap_pixels: int = 0


def modality_of(image: np.ndarray) -> str:
    """Colour = H&E-like tissue; grey on a bright background = brightfield; else fluorescence."""
    if image.ndim == 3:
        return "tissue"
    return "brightfield" if float(np.median(image)) > 0.5 * float(image.max()) else "fluorescence"


def list_dsb_samples(root: str | Path) -> list[str]:
    """Sorted sample ids under ``root`` (folders holding ``images/<id>.png``)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError("expected a DSB 2018 folder of samples, found nothing", root)
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


def read_dsb_sample(root: str | Path, sample_id: str) -> DsbSample:
    """Image, merged instance labels and modality of one DSB sample."""
    folder = Path(root) / sample_id
    image_path = folder / "images" / f"{sample_id}.png"
    if not image_path.is_file():
        raise MissingFileError("expected the sample image, found nothing", image_path)
    image = read_image(image_path)
    if image.dtype != np.uint8:
        raise DataFormatError(f"expected an 8-bit image, found {image.dtype}", image_path)
    mask_paths = sorted((folder / "masks").glob("*.png"))
    if not mask_paths:
        raise AnnotationError("expected at least one mask in masks/, found none", folder)
    height, width = image.shape[:2]
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
            raise AnnotationError("more than 65535 instances do not fit uint16", folder)
        taken = labels[idx] != 0
        n_taken = int(taken.sum())
        overlap += n_taken
        labels[idx[~taken] if n_taken else idx] = label
    if label == 0:
        raise AnnotationError("expected at least one non-empty mask, found none", folder)
    if overlap:
        log.warning("%s: %d pixels claimed by more than one mask kept the first", folder, overlap)
    return DsbSample(
        image=image,
        labels=labels.reshape(height, width),
        modality=modality_of(image),
        sample_id=sample_id,
        n_overlap_pixels=overlap,
    )


def iter_dsb_samples(root: str | Path, workers: int = 2) -> Iterator[DsbSample]:
    """All samples in sorted order, decoded by ``workers`` threads (PNG decoding drops the GIL)."""
    ids = list_dsb_samples(root)
    if workers <= 1:
        for sample_id in ids:
            yield read_dsb_sample(root, sample_id)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda i: read_dsb_sample(root, i), ids)


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
