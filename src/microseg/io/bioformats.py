"""Any microscopy image (OME-TIFF, OME-Zarr, CZI, ND2, LIF, plain TIFF/PNG) as one 2D-4D array.

Users bring what their microscope wrote; models want one channel of one scene. :func:`read_image`
asks bioio for exactly that selection (lazily, so a 40 GB multi-scene CZI costs one channel of
one scene), squeezes it to ``[T][Z]YX`` and returns the pixel size in micrometres from the
file's metadata. Ambiguity is an error, not a guess: a multichannel file without ``channel=``
names its channels. bioio's exceptions and log noise never reach the user; each becomes a
:class:`~microseg.errors.DataFormatError` that names the file and the reason.

Pixel sizes follow :mod:`microseg.io.tiff` where bioio is lax: plain TIFF resolution in inches
(DPI) or without a unit is display metadata, not optics, and an OME-Zarr axis without a unit
says nothing physical; both give ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from microseg.errors import ConfigError, DataFormatError, MicrosegError, MissingFileError

log = logging.getLogger(__name__)

#: formats bioio has no plugin for here; read with Pillow (one scene, no metadata)
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: names for colour samples (RGB TIFF/PNG) when they stand in for channels
_SAMPLE_NAMES = {2: ("gray", "alpha"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}


@dataclass(frozen=True, eq=False)
class ImageData:
    """One scene and channel of an image file, as stored (native dtype)."""

    array: np.ndarray
    #: axes of ``array``: ``YX``, ``ZYX``, ``TYX`` or ``TZYX``
    dims: str
    #: one per spatial axis of ``dims`` (Z?, Y, X) in micrometres; NaN for an axis the file
    #: leaves unknown, ``None`` when it gives none
    pixel_size_um: tuple[float, ...] | None
    path: Path
    #: every channel of the file (for messages), not only the one read
    channel_names: tuple[str, ...]


def pixel_size_nm(data: ImageData) -> tuple[float, ...] | None:
    """``data.pixel_size_um`` in nanometres, the unit of the rest of the package."""
    if data.pixel_size_um is None:
        return None
    return tuple(v * 1e3 for v in data.pixel_size_um)


# -- errors ---------------------------------------------------------------------------------
class _Records(logging.Filter):
    """Keeps (and drops) log records of a third-party logger while we read one file."""

    def __init__(self, min_level: int) -> None:
        super().__init__()
        self.min_level = min_level
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.min_level:
            self.messages.append(record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _captured(name: str, min_level: int) -> Iterator[_Records]:
    logger = logging.getLogger(name)
    records = _Records(min_level)
    logger.addFilter(records)
    try:
        yield records
    finally:
        logger.removeFilter(records)


_TRIED = re.compile(
    r"reader: <class '(?P<reader>\w+)[.\w]*'> failed with error: (?P<error>.*)", re.S
)
_NOT_SUPPORTED = re.compile(r"^[\w-]+ does not support the image: '[^']*'\.\s*")


def _short(messages: Sequence[str], limit: int = 3) -> str:
    """The gist of log messages: bioio's "Attempted file ... with reader" as ``reader: why``."""
    out = []
    for message in messages[:limit]:
        match = _TRIED.search(message)
        if match:
            error = _NOT_SUPPORTED.sub("", match["error"])
            message = f"{match['reader']}: {error}"
        out.append(" ".join(message.split())[:200])
    return "; ".join(out)


@contextlib.contextmanager
def _errors(path: Path, what: str) -> Iterator[None]:
    """bioio/reader exceptions and tifffile's logged corruption -> :class:`DataFormatError`."""
    from bioio_base.exceptions import UnsupportedFileFormatError

    with (
        _captured("bioio.bio_image", logging.WARNING) as tried,
        _captured("tifffile", logging.ERROR) as corrupt,
    ):
        try:
            yield
        except MicrosegError:
            raise
        except UnsupportedFileFormatError as exc:
            reasons = f" ({_short(tried.messages)})" if tried.messages else ""
            raise DataFormatError(
                f"no installed reader (bioio: OME-TIFF, OME-Zarr, CZI, ND2, LIF, TIFF) can "
                f"open this file while {what}{reasons}; is it a supported, intact image?",
                path,
            ) from exc
        except Exception as exc:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if corrupt.messages:
                detail += f"; {_short(corrupt.messages)}"
            raise DataFormatError(
                f"expected a readable image while {what}, found a corrupt, truncated or "
                f"unsupported file ({detail})",
                path,
            ) from exc
    if corrupt.messages:
        raise DataFormatError(
            f"expected a readable image while {what}, found a corrupt or truncated file "
            f"(tifffile: {_short(corrupt.messages)})",
            path,
        )


# -- selection ------------------------------------------------------------------------------
def _pick(value: int | str, names: Sequence[str], what: str, path: Path) -> int:
    """Index of ``value`` (an index or a name) among ``names``; ConfigError lists the choices."""
    listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    if what == "timepoint":  # indices only: no names to list
        listing = f"{len(names)} in all"
    if isinstance(value, str):
        if value in names:
            return list(names).index(value)
        folded = [n.casefold() for n in names]
        if folded.count(value.casefold()) == 1:
            return folded.index(value.casefold())
        raise ConfigError(f"no {what} named {value!r}; the file has {listing}", path)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{what} must be an index or a name, got {value!r}", path)
    if not 0 <= int(value) < len(names):
        raise ConfigError(
            f"{what} {value} is out of range: valid {what}s are 0..{len(names) - 1} ({listing})",
            path,
        )
    return int(value)


def _time_index(timepoint: int | None, n_t: int, keep_time: bool, path: Path) -> int | None:
    """The timepoint to read, or ``None`` to keep the T axis."""
    if timepoint is not None:
        return _pick(timepoint, [str(t) for t in range(n_t)], "timepoint", path)
    if n_t == 1:
        return 0
    if not keep_time:
        raise ConfigError(
            f"the file has {n_t} timepoints and keep_time=False; choose one with "
            f"timepoint=0..{n_t - 1}",
            path,
        )
    return None


def _scene_index(img: Any, scene: int | str, path: Path) -> int:
    """A scene by index, bioio id (``Image:0``) or, for OME files, the image's name."""
    ids = [str(s) for s in img.scenes]
    names = _ome_image_names(img)
    if isinstance(scene, str) and scene not in ids and len(names) == len(ids):
        folded = [n.casefold() for n in names]
        if folded.count(scene.casefold()) == 1:
            return folded.index(scene.casefold())
        ids = [f"{i} ({n})" if n else i for i, n in zip(ids, names, strict=True)]
    return _pick(scene, ids, "scene", path)


def _ome_image_names(img: Any) -> list[str]:
    metadata = getattr(img.reader, "metadata", None)
    images = getattr(metadata, "images", None)
    if not isinstance(images, list):
        return []
    return [str(getattr(image, "name", "") or "") for image in images]


def _channel_index(channel: int | str | None, names: Sequence[str], path: Path) -> int:
    if channel is None:
        if len(names) > 1:
            listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
            raise ConfigError(
                f"the file has {len(names)} channels ({listing}); choose one with "
                "channel=<index or name>",
                path,
            )
        return 0
    return _pick(channel, names, "channel", path)


# -- pixel sizes ----------------------------------------------------------------------------
def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _to_um(value: float | None, unit: Any) -> float | None:
    """``value`` in ``unit`` (pint unit or name; ``None`` means micrometres) -> micrometres."""
    if value is None or unit is None:
        return value
    from bioio_base.types import ureg

    try:
        return _positive(ureg.Quantity(value, str(unit)).to("micrometer").magnitude)
    except Exception:  # a unit that is not a length (pixel, reference frame): unknown size
        log.warning("ignoring a pixel size in unit %r (not a length)", unit)
        return None


def _tiff_sizes_um(path: Path) -> dict[str, float | None]:
    """Plain TIFF: the same rules as :mod:`microseg.io.tiff` (ImageJ, OME, metric tags only)."""
    import tifffile

    from microseg.io import tiff as tiff_io

    with tifffile.TiffFile(path) as tif:
        nm = tiff_io._voxel_size(tif)
    if nm is None:
        return dict.fromkeys("ZYX")
    return {ax: _positive(v / 1e3) for ax, v in zip("ZYX", nm, strict=True)}


def _ome_units(img: Any) -> dict[str, Any]:
    """Units of an OME-TIFF's PhysicalSize attributes (bioio drops them)."""
    pixels = img.reader.metadata.images[img.current_scene_index].pixels
    return {
        ax: getattr(getattr(pixels, f"physical_size_{ax.lower()}_unit", None), "value", None)
        for ax in "ZYX"
    }


def _sizes_um(img: Any, path: Path) -> dict[str, float | None]:
    """Z, Y, X pixel sizes in micrometres from a bioio image (``None`` when unknown)."""
    module = type(img.reader).__module__
    if module.startswith("bioio_tifffile"):
        return _tiff_sizes_um(path)
    pps = img.physical_pixel_sizes
    sizes = {ax: _positive(getattr(pps, ax)) for ax in "ZYX"}
    if module.startswith("bioio_ome_tiff"):
        units = _ome_units(img)
        return {ax: _to_um(sizes[ax], units[ax]) for ax in "ZYX"}
    props = img.dimension_properties
    units = {ax: getattr(props, ax).unit for ax in "ZYX"}
    if module.startswith("bioio_ome_zarr"):  # NGFF scale without a unit: pixels, not microns
        return {ax: _to_um(sizes[ax], units[ax]) if units[ax] else None for ax in "ZYX"}
    return {ax: _to_um(sizes[ax], units[ax]) for ax in "ZYX"}


def _spatial_sizes(sizes: dict[str, float | None], dims: str) -> tuple[float, ...] | None:
    axes = [ax for ax in dims if ax in "ZYX"]
    values = [sizes.get(ax) for ax in axes]
    if all(v is None for v in values):
        return None
    return tuple(math.nan if v is None else float(v) for v in values)


# -- readers --------------------------------------------------------------------------------
def _open(path: Path) -> Any:
    """A bioio image, or ``None`` for raster formats bioio has no plugin for."""
    from bioio import BioImage
    from bioio_base.exceptions import UnsupportedFileFormatError

    try:
        return BioImage(path)
    except UnsupportedFileFormatError:
        if path.suffix.lower() in RASTER_SUFFIXES:
            return None
        if path.is_dir() and any((path / f).is_file() for f in ("zarr.json", ".zattrs")):
            import bioio_ome_zarr  # a group inside an OME-Zarr (e.g. labels/<name>)

            return BioImage(path, reader=bioio_ome_zarr.Reader)
        raise


def _read_raster(
    path: Path, channel: int | str | None, scene: int | str | None, timepoint: int | None
) -> ImageData:
    """PNG/JPEG through Pillow: one scene, one timepoint, colour samples as channels."""
    from microseg.io.png import read_png, to_image

    if scene is not None:
        _pick(scene, ["Image:0"], "scene", path)
    if timepoint is not None:
        _pick(timepoint, ["0"], "timepoint", path)
    array = to_image(read_png(path))  # greyscale stored as RGB(A) -> 2D, alpha dropped
    if array.ndim == 2:
        names: tuple[str, ...] = ("gray",)
        if channel is not None:
            _pick(channel, names, "channel", path)
        return ImageData(array, "YX", None, path, names)
    names = _SAMPLE_NAMES[array.shape[-1]]
    c = _channel_index(channel, names, path)
    return ImageData(np.ascontiguousarray(array[..., c]), "YX", None, path, names)


def read_image(
    path: str | Path,
    *,
    channel: int | str | None = None,
    scene: int | str | None = None,
    timepoint: int | None = None,
    keep_time: bool = True,
) -> ImageData:
    """One channel of one scene of any image bioio reads, squeezed to ``[T][Z]YX``.

    ``channel`` and ``scene`` are an index or a name (names match case-insensitively when that
    is unambiguous); a file with several channels needs ``channel``. ``timepoint=None`` keeps
    the T axis when there are several timepoints (``keep_time=False`` makes that an error
    instead). Only the selected data is read. Colour samples (RGB TIFF/PNG) count as channels.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError("expected an image file or OME-Zarr folder, found nothing", path)
    with _errors(path, "opening"):
        img = _open(path)
    if img is None:
        return _read_raster(path, channel, scene, timepoint)

    with _errors(path, "reading its metadata"):
        if scene is not None:
            img.set_scene(_scene_index(img, scene, path))
        order = str(img.dims.order)
        n = dict(zip(order, img.dims.shape, strict=True))
        names = tuple(str(c) for c in img.channel_names)
        if len(names) != n.get("C", 1):  # e.g. OME-Zarr without omero metadata
            names = tuple(f"Channel:{i}" for i in range(n.get("C", 1)))
        sizes = _sizes_um(img, path)

    channel_axis = "C"
    if n.get("C", 1) == 1 and n.get("S", 1) > 1:  # RGB samples stand in for channels
        channel_axis, names = "S", _SAMPLE_NAMES.get(n["S"], tuple(map(str, range(n["S"]))))
    c = _channel_index(channel, names, path)
    t = _time_index(timepoint, n.get("T", 1), keep_time, path)

    out = ("T" if t is None else "") + ("Z" if n.get("Z", 1) > 1 else "") + "YX"
    selection = {ax: 0 for ax in order if ax not in out}
    selection[channel_axis] = c
    if t is not None and "T" in order:
        selection["T"] = t
    selection = {ax: i for ax, i in selection.items() if ax in order}
    if path.is_file():  # before any allocation: a header may declare gigabytes (issue 18)
        from microseg.io.tiff import check_declared_size

        shape = tuple(int(v) for v in img.dims.shape)
        check_declared_size(shape, np.dtype(img.dtype), path.stat().st_size, path)
    with _errors(path, "reading its pixels"):
        array = np.asarray(img.get_image_dask_data(out, **selection).compute())
    log.debug("read %s %s %s from %s (%s)", out, array.shape, array.dtype, path, selection)
    return ImageData(array, out, _spatial_sizes(sizes, out), path, names)
