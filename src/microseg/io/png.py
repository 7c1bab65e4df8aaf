"""2D image/mask pairs as PNG files in ``images/`` and ``masks/`` folders matched by stem.

PNG keeps 8- and 16-bit integers losslessly, which is what exchange with 2D tools (and
Ultralytics' segmentation datasets) needs; uint16 masks hold up to 65535 instances.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.atomic import atomic_path

_MASK_DTYPES = (np.dtype("uint8"), np.dtype("uint16"))


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _pil_open():
    """Pillow's own ``Image.open``. Ultralytics replaces it once imported with a version that,
    on a file Pillow cannot identify, tries to pip-install a HEIF plugin (network at run time)
    and raises ``ModuleNotFoundError`` instead of Pillow's error; a corrupt PNG must give our
    clear error whatever was imported before."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None) if patches is not None else None
    return original if callable(original) else Image.open


def read_png(path: str | Path) -> np.ndarray:
    """Any image Pillow reads (PNG, TIFF, JPEG), as stored; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a PNG file, found nothing", path)
    try:
        with _pil_open()(path) as im:
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(
            f"expected a readable PNG, found a corrupt file ({exc})", path
        ) from exc
    if array.dtype == np.int32:  # Pillow's 32-bit mode for some 16-bit greyscale PNGs
        array = array.astype(np.uint16)
    return array


def to_image(array: np.ndarray) -> np.ndarray:
    """Drop alpha; greyscale stored as R=G=B (as in DSB's RGBA PNGs) becomes 2D."""
    if array.ndim == 2:
        return array
    if array.shape[-1] in (1, 2):  # L or LA
        return array[..., 0]
    rgb = array[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return np.ascontiguousarray(rgb)


def read_image(path: str | Path) -> np.ndarray:
    """An image for analysis: 2D greyscale or HxWx3 colour, never alpha."""
    return to_image(read_png(path))


def write_png_pair(
    image_path: str | Path, mask_path: str | Path, image: np.ndarray, mask: np.ndarray
) -> tuple[Path, Path]:
    """Write a uint8/uint16 image (2D or RGB) and a uint8/uint16 2D mask, each atomically."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    image, mask = np.asarray(image), np.asarray(mask)
    if image.dtype == np.uint16 and image.ndim != 2:
        raise DataFormatError(f"16-bit images must be 2D, found shape {image.shape}", image_path)
    if image.dtype not in _MASK_DTYPES or image.ndim not in (2, 3):
        raise DataFormatError(
            f"expected a uint8/uint16 (H, W) or uint8 (H, W, 3|4) image, found "
            f"{image.dtype} {image.shape}",
            image_path,
        )
    if mask.dtype not in _MASK_DTYPES or mask.ndim != 2:
        raise DataFormatError(
            f"expected a uint8 or uint16 (H, W) mask, found {mask.dtype} {mask.shape}", mask_path
        )
    if mask.shape != image.shape[:2]:
        raise ShapeMismatchError(
            f"mask shape {mask.shape} differs from image shape {image.shape[:2]}", mask_path
        )
    _write_png(image_path, image)
    _write_png(mask_path, mask)
    return image_path, mask_path


def read_png_pair(image_path: str | Path, mask_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask; their height and width must agree."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    image, mask = read_png(image_path), read_png(mask_path)
    if mask.ndim != 2:
        raise DataFormatError(
            f"expected a single-channel mask, found shape {mask.shape}", mask_path
        )
    if mask.shape != image.shape[:2]:
        raise ShapeMismatchError(
            f"mask shape {mask.shape} differs from image {image_path.name} shape {image.shape[:2]}",
            mask_path,
        )
    return image, mask


def _stems(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MissingFileError("expected a folder of PNG files, found nothing", folder)
    return {p.stem: p for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}


def _listing(stems: list[str], limit: int = 10) -> str:
    return str(stems[:limit]) + (f" ... ({len(stems)} in all)" if len(stems) > limit else "")


def list_png_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths from ``<folder>/images`` and ``<folder>/masks``, sorted by stem."""
    folder = Path(folder)
    images, masks = _stems(folder / "images"), _stems(folder / "masks")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise AnnotationError(
            f"expected images/ and masks/ to hold the same stems; images without a mask: "
            f"{_listing(no_mask)}; masks without an image: {_listing(no_image)}",
            folder,
        )
    if not images:
        raise AnnotationError("expected PNG image/mask pairs, found none", folder)
    return [(images[s], masks[s]) for s in sorted(images)]
