"""TIFF stacks (``ZYX``, also ``YX``/``TYX``) read lazily and written with physical units.

Volumes can be larger than memory, so :class:`TiffStack` memory-maps uncompressed contiguous
files and otherwise decodes only the pages a caller asks for. Writers put the voxel size into
ImageJ hyperstack metadata (``spacing``/``unit`` + resolution tags) so Fiji shows micrometres,
or into OME-XML for dtypes ImageJ cannot hold (uint32 label images).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: images (uint8/uint16), probability maps (float32), large instance label images (uint32)
SUPPORTED_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "uint32", "float32")
)
#: what the ImageJ TIFF flavour can hold; others are written as OME-TIFF
IMAGEJ_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(t) for t in ("uint8", "uint16", "float32"))
COMPRESSIONS = (None, "zlib", "zstd")

#: length unit -> nanometres (ImageJ writes "micron" or "\\u00B5m", OME "µm")
_UNIT_NM = {
    "nm": 1.0,
    "nanometer": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "\\u00b5m": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "m": 1e9,
    "meter": 1e9,
}

Key = Any  # int | slice | tuple of those (numpy basic indexing)


class _LogCapture(logging.Handler):
    """Collects tifffile's ERROR records: it logs corruption instead of raising."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors(path: Path, what: str) -> Iterator[None]:
    """Turn tifffile exceptions *and* logged errors into :class:`DataFormatError`."""
    logger = logging.getLogger("tifffile")
    capture = _LogCapture()
    logger.addHandler(capture)
    try:
        yield
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(
            f"expected a readable TIFF while {what}, found a corrupt or truncated file "
            f"({type(exc).__name__}: {exc})",
            path,
        ) from exc
    finally:
        logger.removeHandler(capture)
    if capture.messages:
        raise DataFormatError(
            f"expected a readable TIFF while {what}, found a corrupt or truncated file "
            f"(tifffile: {'; '.join(capture.messages[:3])})",
            path,
        )


def _unit_to_nm(unit: str | None) -> float | None:
    if not unit:
        return None
    return _UNIT_NM.get(str(unit).strip().lower())


def _resolution_size(page: tifffile.TiffPage, tag: str) -> float | None:
    """Pixel size in the file's unit from an X/YResolution tag (pixels per unit)."""
    value = page.tags.get(tag)
    if value is None:
        return None
    num, den = value.value if isinstance(value.value, tuple) else (value.value, 1)
    if not num or not den:
        return None
    return den / num


def _imagej_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    meta = tif.imagej_metadata or {}
    scale = _unit_to_nm(meta.get("unit"))
    if scale is None:
        return None
    page = tif.pages.first
    y = _resolution_size(page, "YResolution")
    x = _resolution_size(page, "XResolution")
    z = meta.get("spacing")
    return (
        float(z) * scale if z else math.nan,
        y * scale if y else math.nan,
        x * scale if x else math.nan,
    )


def _ome_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    try:
        root = ET.fromstring(tif.ome_metadata or "")
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes = []
    for ax in "ZYX":
        value = pixels.get(f"PhysicalSize{ax}")
        scale = _unit_to_nm(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        sizes.append(float(value) * scale if value and scale else math.nan)
    return tuple(sizes)  # type: ignore[return-value]


def _plain_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Resolution tags with a metric unit. Inch (DPI) is display metadata, not optics: ignored."""
    page = tif.pages.first
    unit = page.tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != 3:  # 3 = centimetre
        return None
    y = _resolution_size(page, "YResolution")
    x = _resolution_size(page, "XResolution")
    return (math.nan, y * 1e7 if y else math.nan, x * 1e7 if x else math.nan)


def _voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    for reader, applies in (
        (_imagej_voxel_size, tif.is_imagej),
        (_ome_voxel_size, tif.is_ome),
        (_plain_voxel_size, True),
    ):
        if applies:
            size = reader(tif)
            if size is not None and not all(math.isnan(v) for v in size):
                return size
    return None


class TiffStack:
    """A lazily read TIFF image: index it like an array, one plane costs one plane of memory.

    Axis 0 enumerates pages (planes) for 3D data. ``voxel_size_nm`` is ``(z, y, x)`` in
    nanometres from ImageJ, OME or metric resolution metadata, with NaN for unknown axes, or
    ``None`` when the file says nothing.
    """

    def __init__(self, path: str | Path, expect_ndim: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError("expected a TIFF file, found nothing", self.path)
        self._file_size = self.path.stat().st_size
        self._tif: tifffile.TiffFile | None = None
        self._memmap: np.memmap | None = None
        try:
            with _tifffile_errors(self.path, "opening"):
                self._tif = tifffile.TiffFile(self.path)
                self._open()
        except BaseException:
            self.close()
            raise
        if expect_ndim is not None and self.ndim != expect_ndim:
            shape = self.shape
            self.close()
            raise ShapeMismatchError(
                f"expected a {expect_ndim}D image, found shape {shape} ({len(shape)}D)",
                self.path,
            )

    def _open(self) -> None:
        assert self._tif is not None
        if not self._tif.series:
            raise DataFormatError("expected at least one image series, found none", self.path)
        series = self._tif.series[0]
        self._series = series
        self.shape: tuple[int, ...] = tuple(int(s) for s in series.shape)
        self.dtype = np.dtype(series.dtype)
        if self.dtype not in SUPPORTED_DTYPES:
            raise DataFormatError(
                f"expected dtype in {[d.name for d in SUPPORTED_DTYPES]}, found {self.dtype}",
                self.path,
            )
        check_declared_size(self.shape, self.dtype, self._file_size, self.path)
        meta = self._tif.imagej_metadata or {}
        n_images = int(meta.get("images", 0) or 0)
        if n_images > 1 and math.prod(self.shape) < n_images * math.prod(self.shape[-2:]):
            raise DataFormatError(
                f"ImageJ header promises {n_images} planes, found shape {self.shape} "
                "(truncated or corrupt file)",
                self.path,
            )
        self._page_shape = tuple(int(s) for s in series.keyframe.shape)
        self._lead_shape = self.shape[: len(self.shape) - len(self._page_shape)]
        if self.shape[len(self._lead_shape) :] != self._page_shape:
            raise DataFormatError(
                f"expected planes of shape {self.shape[len(self._lead_shape) :]}, "
                f"found pages of shape {self._page_shape}",
                self.path,
            )
        if series.dataoffset is not None and series.keyframe.is_memmappable:
            end = series.dataoffset + math.prod(self.shape) * self.dtype.itemsize
            if end > self._file_size:
                raise DataFormatError(
                    f"truncated: image data needs {end} bytes, found a file of "
                    f"{self._file_size} bytes",
                    self.path,
                )
            self._memmap = tifffile.memmap(self.path, series=0, mode="r")
        elif len(series.pages) != max(1, math.prod(self._lead_shape)):
            raise DataFormatError(
                f"expected {math.prod(self._lead_shape)} pages for shape {self.shape}, "
                f"found {len(series.pages)} (truncated or corrupt file)",
                self.path,
            )
        self.voxel_size_nm = _voxel_size(self._tif)

    # -- array protocol -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_memmap(self) -> bool:
        """True when reads go through ``numpy.memmap`` (uncompressed, contiguous file)."""
        return self._memmap is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        mode = "memmap" if self.is_memmap else "pages"
        return f"TiffStack({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, {mode})"

    def _check_open(self) -> tifffile.TiffFile:
        if self._tif is None:
            raise ValueError(f"{self.path}: TiffStack is closed")
        return self._tif

    def _read_page(self, index: int) -> np.ndarray:
        page = self._series.pages[index]
        if page is None:
            raise DataFormatError(f"page {index} is missing", self.path)
        end = max(
            (o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)),
            default=0,
        )
        if end > self._file_size:
            raise DataFormatError(
                f"truncated: page {index} needs {end} bytes, found a file of "
                f"{self._file_size} bytes",
                self.path,
            )
        with _tifffile_errors(self.path, f"reading page {index}"):
            return page.asarray().reshape(self._page_shape)

    def __getitem__(self, key: Key) -> np.ndarray:
        """Basic numpy indexing; returns a copy, so it stays valid after :meth:`close`."""
        self._check_open()
        if self._memmap is not None:
            return np.array(self._memmap[key])
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key):
            raise TypeError("TiffStack supports int and slice indices only")
        n_lead = len(self._lead_shape)
        grid = np.arange(max(1, math.prod(self._lead_shape))).reshape(self._lead_shape)
        pages = grid[key[:n_lead]]
        planes = [self._read_page(int(i)) for i in np.ravel(pages)]
        out = (
            np.stack(planes) if planes else np.empty((0, *self._page_shape), dtype=self.dtype)
        ).reshape(np.shape(pages) + self._page_shape)
        return out[(slice(None),) * np.ndim(pages) + key[n_lead:]]

    def plane(self, z: int) -> np.ndarray:
        """One plane (2D array) along axis 0."""
        if not -len(self) <= z < len(self):
            raise IndexError(f"{self.path}: plane {z} outside 0..{len(self) - 1}")
        return self[z]

    def iter_planes(self) -> Iterator[np.ndarray]:
        for z in range(len(self)):
            yield self[z]

    def asarray(self) -> np.ndarray:
        """The whole image in memory."""
        if self._memmap is not None:
            return np.array(self._memmap)
        if self.ndim == len(self._page_shape):
            return self._read_page(0)
        return self[:]

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if self._memmap is not None:
            mm = getattr(self._memmap, "_mmap", None)
            self._memmap = None
            if mm is not None:
                with contextlib.suppress(Exception):
                    mm.close()
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> TiffStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


#: a file may declare this many times its own size (deflate tops out near 1030:1)
MAX_INFLATION = 2000
#: below this the ratio is not checked (small images of constant value compress very well)
_INFLATION_FLOOR = 256 * 2**20


def check_declared_size(shape: tuple[int, ...], dtype: np.dtype, size: int, path: Path) -> None:
    """Refuse a header that declares far more data than the file could hold before anything
    is allocated (issue 18: a 139-byte TIFF declaring 60000x60000 asked for 3.6 GB).
    ``MICROSEG_ALLOW_LARGE=1`` reads it anyway."""
    declared = math.prod(shape) * dtype.itemsize
    if declared <= _INFLATION_FLOOR or declared <= MAX_INFLATION * max(size, 1):
        return
    if os.environ.get("MICROSEG_ALLOW_LARGE", "") not in ("", "0"):
        return
    raise DataFormatError(
        f"declares {declared / 2**30:.1f} GiB of {dtype} {shape} in a file of {size} bytes "
        f"(more than {MAX_INFLATION}x): corrupt, or a decompression bomb; set "
        "MICROSEG_ALLOW_LARGE=1 to read it anyway",
        path,
    )


def open_stack(path: str | Path, expect_ndim: int | None = None) -> TiffStack:
    """Open a TIFF lazily (use as a context manager)."""
    return TiffStack(path, expect_ndim=expect_ndim)


def read_stack(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read a whole TIFF image into memory, with the same checks as :class:`TiffStack`."""
    with open_stack(path, expect_ndim=expect_ndim) as stack:
        return stack.asarray()


def check_finite(array: np.ndarray, path: str | Path | None = None) -> None:
    """Raise :class:`DataFormatError` when a float image holds NaN or inf."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    if n_nan or n_inf:
        raise DataFormatError(
            f"expected finite values, found {n_nan + n_inf} non-finite "
            f"({n_nan} NaN, {n_inf} inf) of {array.size}",
            path,
        )


def _default_axes(ndim: int) -> str:
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "ZYX"
    raise ValueError(f"expected a 2D or 3D array, found {ndim}D")


def write_stack(
    path: str | Path,
    array: np.ndarray,
    voxel_size_nm: tuple[float, float, float] | None = None,
    compression: str | None = None,
    imagej: bool = True,
    axes: str | None = None,
) -> Path:
    """Write ``array`` atomically as a TIFF that Fiji opens with the right voxel size.

    ``voxel_size_nm`` is ``(z, y, x)``; z is ignored for 2D and for ``TYX`` data. ImageJ
    hyperstack metadata is used for uint8/uint16/float32, OME-XML otherwise (or when
    ``imagej=False``). ``"zstd"`` needs Bio-Formats in Fiji; ``"zlib"`` opens natively.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype not in SUPPORTED_DTYPES:
        raise DataFormatError(
            f"cannot write dtype {array.dtype}; expected one of "
            f"{[d.name for d in SUPPORTED_DTYPES]}",
            path,
        )
    if array.ndim not in (2, 3):
        raise ShapeMismatchError(
            f"expected a 2D (YX) or 3D (ZYX/TYX) array, found shape {array.shape}", path
        )
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    axes = (axes or _default_axes(array.ndim)).upper()
    if len(axes) != array.ndim:
        raise ValueError(f"axes {axes!r} do not match array shape {array.shape}")

    kwargs: dict[str, Any] = {"compression": compression}
    use_imagej = imagej and array.dtype in IMAGEJ_DTYPES
    z_nm = y_nm = x_nm = None
    if voxel_size_nm is not None:
        if len(voxel_size_nm) != 3:
            raise ValueError(f"voxel_size_nm must be (z, y, x), got {voxel_size_nm!r}")
        z_nm, y_nm, x_nm = (float(v) if v and not math.isnan(v) else None for v in voxel_size_nm)
        if "Z" not in axes:
            z_nm = None
    if use_imagej:
        meta: dict[str, Any] = {"axes": axes}
        if x_nm and y_nm:
            kwargs["resolution"] = (1e3 / x_nm, 1e3 / y_nm)  # pixels per micrometre
            meta["unit"] = "um"
        if z_nm:
            meta["spacing"] = z_nm / 1e3
            meta["unit"] = "um"
        kwargs.update(imagej=True, metadata=meta)
    else:
        meta = {"axes": axes}
        for ax, value in (("X", x_nm), ("Y", y_nm), ("Z", z_nm)):
            if value:
                meta[f"PhysicalSize{ax}"] = value / 1e3
                meta[f"PhysicalSize{ax}Unit"] = "µm"
        kwargs.update(ome=True, metadata=meta)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, **kwargs)
    log.debug("wrote %s %s %s to %s", array.shape, array.dtype, axes, path)
    return path
