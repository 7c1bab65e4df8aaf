"""2D image/mask pairs as PNG files in ``images/`` and ``masks/`` folders matched by stem.

PNG keeps 8- and 16-bit integers losslessly, which is what exchange with 2D tools (and
Ultralytics' segmentation datasets) needs; uint16 masks hold up to 65535 instances.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from microseg.errors import (
    AnnotationError,
    ConfigError,
    DataFormatError,
    MissingFileError,
    ShapeMismatchError,
)
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

_MASK_DTYPES = (np.dtype("uint8"), np.dtype("uint16"))

MaskKind = Literal["instance", "binary", "auto"]


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
    except Image.DecompressionBombError as exc:  # Pillow's guard: more pixels than it allows
        raise DataFormatError(
            f"refused: {exc} (a decompression bomb, or raise PIL.Image.MAX_IMAGE_PIXELS)", path
        ) from None
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


def list_png_pairs(folder: str | Path, mask_dir: str = "masks") -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths from ``<folder>/images`` and ``<folder>/<mask_dir>``, by stem."""
    folder = Path(folder)
    images, masks = _stems(folder / "images"), _stems(folder / mask_dir)
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise AnnotationError(
            f"expected images/ and {mask_dir}/ to hold the same stems; images without a mask: "
            f"{_listing(no_mask)}; masks without an image: {_listing(no_image)}",
            folder,
        )
    if not images:
        raise AnnotationError("expected PNG image/mask pairs, found none", folder)
    return [(images[s], masks[s]) for s in sorted(images)]


def is_binary_mask(mask: np.ndarray) -> bool:
    """True when every nonzero pixel holds the same value (0/1, 0/255, ...): such a mask
    says where objects are but not which pixel belongs to which. An empty mask is not binary."""
    values = np.unique(mask)
    return values.size == 2 and values[0] == 0


def instance_labels(
    mask: np.ndarray, mask_kind: MaskKind = "auto", source: str | Path | None = None
) -> tuple[np.ndarray, Literal["instance", "binary"]]:
    """A 2D mask as uint16 instance labels, and how it was read (``instance`` | ``binary``).

    ``instance``: the values are instance ids and are kept. ``binary``: every nonzero pixel is
    foreground and objects are its 4-connected components, numbered 1..N in raster order;
    objects touching only at a corner stay separate, but objects that share an edge become one
    (a binary mask cannot tell them apart). ``auto``: binary when all nonzero pixels share one
    value (:func:`is_binary_mask`), instance otherwise, so a mask with a single object read as
    binary gives the same labels unless that object has disconnected parts.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.view(np.uint8)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataFormatError(
            f"expected a 2D integer mask, found {mask.dtype} {mask.shape}", source
        )
    if mask_kind not in ("instance", "binary", "auto"):
        raise ConfigError(f"mask_kind must be instance, binary or auto, found {mask_kind!r}")
    kind = mask_kind if mask_kind != "auto" else "binary" if is_binary_mask(mask) else "instance"
    if kind == "instance":
        if mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max:
            raise AnnotationError(
                f"instance ids must lie in 0..65535, found {mask.min()}..{mask.max()}",
                source,
            )
        return mask.astype(np.uint16), "instance"
    labels, n = ndimage.label(mask != 0, structure=ndimage.generate_binary_structure(2, 1))
    if n > np.iinfo(np.uint16).max:
        raise AnnotationError(f"{n} connected components do not fit uint16", source)
    log.debug("%s: binary mask -> %d connected components", source or "mask", n)
    return labels.astype(np.uint16), "binary"
