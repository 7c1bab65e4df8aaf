"""The image under a result folder (``microseg view --image``) as a napari layer tuple.

Shared by :mod:`microseg.report.napari_layers`: the tuple maker, axis names and the reader of
numbered frames. The image gives its axes and voxel size where its format says them
(tifffile's series axes, bioio's dims); 3D data that says nothing is ``ZYX``, or ``TYX`` beside
a tracking result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.tiff import open_stack, read_stack

LayerData = tuple[Any, dict[str, Any], str]
Voxel = tuple[float, float, float]

TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def layer(data: Any, kind: str, name: str, axes: Sequence[str], path: Path, **kw: Any) -> LayerData:
    """``(data, kwargs, kind)`` with the axis names and the source file in ``metadata``."""
    kwargs = {"name": name, "axis_labels": tuple(axes), "metadata": {"source": str(path)}, **kw}
    return data, kwargs, kind


def axes_of(ndim: int, time: bool, path: Path) -> tuple[str, ...]:
    if ndim == 2:
        return ("y", "x")
    if ndim == 3:
        return ("t", "y", "x") if time else ("z", "y", "x")
    raise ShapeMismatchError(f"expected a 2D (YX) or 3D (ZYX or TYX) image, found {ndim}D", path)


def _numbered(folder: Path, prefix: str) -> list[Path]:
    """``<prefix>0.tif .. <prefix>N.tif`` in order; gaps are an error naming them."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.tiff?$")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}
    if sorted(found) != list(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        raise DataFormatError(
            f"{prefix}###.tif frames must be numbered 0..N, missing {gaps[:10]}", folder
        )
    return [found[t] for t in range(len(found))]


def read_frames(folder: Path, prefix: str) -> np.ndarray:
    """``<prefix>###.tif`` 2D frames as one ``(T, Y, X)`` array."""
    paths = _numbered(folder, prefix)
    if not paths:
        raise MissingFileError(f"expected {prefix}###.tif frames, found none", folder)
    frames = [read_stack(p, expect_ndim=2) for p in paths]
    shapes = sorted({f.shape for f in frames})
    if len(shapes) != 1:
        raise ShapeMismatchError(f"expected frames of one shape, found {shapes}", folder)
    return np.stack(frames)


def valid_voxel(values: Any) -> Voxel | None:
    """``(z, y, x)`` nm when y and x are positive numbers (z may stay NaN: a plane's size)."""
    try:
        z, y, x = (float(v) if v is not None else math.nan for v in values)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (y, x)):
        return None
    return (z if math.isfinite(z) and z > 0 else math.nan, y, x)


def tiff_voxel(path: Path) -> Voxel | None:
    with open_stack(path) as stack:
        return valid_voxel(stack.voxel_size_nm) if stack.voxel_size_nm else None


def image_stem(path: Path) -> str:
    """The name predictions are called after (``a.ome.tif`` -> ``a``, ``a.ome.zarr`` -> ``a``)."""
    name = path.name
    for ending in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return path.stem if path.suffix else name


def _tiff(path: Path, time: bool) -> tuple[LayerData, Voxel | None]:
    import tifffile

    data = read_stack(path)
    with tifffile.TiffFile(path) as tif:
        axes = tif.series[0].axes.upper() if tif.series else ""
    if data.ndim == 3 and axes.endswith("S") and data.dtype == np.uint8:  # RGB(A) samples
        return layer(data, "image", image_stem(path), ("y", "x"), path, rgb=True), None
    names = axes_of(data.ndim, time or axes.startswith("T"), path)
    return layer(data, "image", image_stem(path), names, path, colormap="gray"), tiff_voxel(path)


def _bioio(path: Path) -> tuple[LayerData, Voxel | None]:
    """CZI, ND2, LIF, OME-Zarr, ...: one channel of one scene through bioio."""
    from microseg.io.bioformats import pixel_size_nm, read_image

    img = read_image(path)
    names = tuple(img.dims.lower())
    sizes = dict(zip([a for a in names if a != "t"], pixel_size_nm(img) or (), strict=False))
    voxel = valid_voxel([sizes.get(a) for a in "zyx"])
    return layer(img.array, "image", image_stem(path), names, path, colormap="gray"), voxel


def image_layers(path: Path, time: bool = False) -> tuple[list[LayerData], Voxel | None]:
    """The image under the results and its voxel size: a TIFF, a PNG/JPEG, a folder of
    ``t###.tif`` frames (CTC), or anything bioio reads (one channel of one scene)."""
    if path.is_dir() and path.suffix.lower() != ".zarr":
        return [layer(read_frames(path, "t"), "image", path.name, ("t", "y", "x"), path)], None
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        image, voxel = _tiff(path, time)
    elif suffix in RASTER_SUFFIXES:
        from microseg.io.png import read_image

        data = read_image(path)
        rgb = data.ndim == 3
        kw = {"rgb": True} if rgb else {"colormap": "gray"}
        image, voxel = layer(data, "image", path.stem, ("y", "x"), path, **kw), None
    else:
        image, voxel = _bioio(path)
    return [image], voxel
