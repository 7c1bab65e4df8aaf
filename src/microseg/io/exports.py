"""Segmentation results in the formats microscopists exchange: CSV, OME-TIFF, OME-Zarr, Fiji
ROI sets and QuPath GeoJSON.

A label image is our result; Fiji, QuPath and napari each want it their way. Outlines are in
*pixel* coordinates with x first and the origin at the top-left corner of the top-left pixel
(pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``), which is what ImageJ and QuPath both use:
so a skimage contour (pixel centres at integers, rows first) is flipped to ``(x, y)`` and moved
by half a pixel. Physical sizes go where each format keeps them (OME ``PhysicalSize*``, NGFF
``scale`` transforms, table columns in micrometres). Every writer is atomic.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import DataFormatError, ShapeMismatchError
from microseg.utils.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

_LABEL_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "uint32"))
#: NGFF pyramids: halve Y/X while the smallest level keeps at least this many pixels
_PYRAMID_MIN = 256


# -- checks ---------------------------------------------------------------------------------
def _labels(labels: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """A 2D/3D non-negative integer label image (bool counts as one object)."""
    lab = np.asarray(labels)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise DataFormatError(f"expected an integer label image, found dtype {lab.dtype}", path)
    if lab.ndim not in (2, 3):
        raise ShapeMismatchError(
            f"expected a 2D (YX) or 3D (ZYX) label image, found shape {lab.shape}", path
        )
    if lab.size and lab.min() < 0:
        raise DataFormatError(f"expected labels >= 0, found {lab.min()}", path)
    return lab


def _sizes(
    pixel_size_um: Sequence[float] | None, ndim: int, path: str | Path | None = None
) -> tuple[float, ...] | None:
    """``pixel_size_um`` as ``ndim`` positive floats (``(z,) y, x``), or ``None``."""
    if pixel_size_um is None:
        return None
    sizes = tuple(float(v) for v in pixel_size_um)
    if len(sizes) != ndim or not all(math.isfinite(v) and v > 0 for v in sizes):
        axes = "(z, y, x)" if ndim == 3 else "(y, x)"
        raise ShapeMismatchError(
            f"pixel_size_um must be {ndim} positive numbers {axes} in micrometres for a "
            f"{ndim}D label image, found {pixel_size_um!r}",
            path,
        )
    return sizes


def _compact(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..n (skimage walks one slot per label value) and the original ids."""
    from skimage.segmentation import relabel_sequential

    compact, _, inverse = relabel_sequential(lab)
    # by new label, not by position: a label image without background has no 0 slot
    new = np.arange(1, int(compact.max(initial=0)) + 1)
    return compact, np.asarray(inverse[new], dtype=np.int64)


# -- table ----------------------------------------------------------------------------------
def object_table(
    labels: np.ndarray,
    pixel_size_um: Sequence[float] | None = None,
    *,
    intensity: np.ndarray | None = None,
    scores: Mapping[int, float] | None = None,
    uncertainty: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per object (sorted by id): position, size and the optional per-object values.

    Columns: ``id``; centroid ``[z_px,] y_px, x_px`` and, with a pixel size, ``[z_um,] y_um,
    x_um``; ``area_px`` (2D) or ``volume_px`` (3D) and ``area_um2``/``volume_um3``;
    ``mean_intensity`` (of ``intensity``), ``score`` (from ``scores``; NaN for ids it lacks)
    and ``mean_uncertainty`` (mean of the ``uncertainty`` map over the object) when given.
    """
    from skimage.measure import regionprops_table

    lab = _labels(labels)
    sizes = _sizes(pixel_size_um, lab.ndim)
    maps = {"mean_intensity": intensity, "mean_uncertainty": uncertainty}
    maps = {k: np.asarray(v, dtype=np.float64) for k, v in maps.items() if v is not None}
    for name, image in maps.items():
        if image.shape != lab.shape:
            raise ShapeMismatchError(
                f"{name.removeprefix('mean_')} map of shape {image.shape} differs from the "
                f"label image's {lab.shape}"
            )
    compact, ids = _compact(lab)
    properties = ["label", "area", "centroid"] + (["intensity_mean"] if maps else [])
    stacked = np.stack(list(maps.values()), axis=-1) if maps else None
    props = regionprops_table(compact, intensity_image=stacked, properties=properties)

    axes = "zyx"[-lab.ndim :]
    table: dict[str, Any] = {"id": ids[props["label"] - 1]}
    for i, ax in enumerate(axes):
        table[f"{ax}_px"] = props[f"centroid-{i}"]
    if sizes is not None:
        for i, ax in enumerate(axes):
            table[f"{ax}_um"] = props[f"centroid-{i}"] * sizes[i]
    what, unit = ("area", "um2") if lab.ndim == 2 else ("volume", "um3")
    table[f"{what}_px"] = props["area"].astype(np.int64)
    if sizes is not None:
        table[f"{what}_{unit}"] = props["area"] * math.prod(sizes)
    means = {name: props[f"intensity_mean-{i}"] for i, name in enumerate(maps)}
    if "mean_intensity" in means:
        table["mean_intensity"] = means["mean_intensity"]
    if scores is not None:
        table["score"] = np.array([scores.get(int(i), np.nan) for i in table["id"]], dtype=float)
    if "mean_uncertainty" in means:
        table["mean_uncertainty"] = means["mean_uncertainty"]
    return pd.DataFrame(table)


def write_object_csv(path: str | Path, table: pd.DataFrame) -> Path:
    """Write an :func:`object_table` (or any table) as CSV, atomically, without the index."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


# -- rasters --------------------------------------------------------------------------------
def _label_dtype(lab: np.ndarray, path: Path) -> np.ndarray:
    """Labels in the smallest unsigned type OME and Fiji hold (uint8/16/32)."""
    if lab.dtype in _LABEL_DTYPES:
        return lab
    top = int(lab.max()) if lab.size else 0
    for dtype in _LABEL_DTYPES:
        if top <= np.iinfo(dtype).max:
            return lab.astype(dtype)
    raise DataFormatError(f"label ids up to {top} do not fit in uint32", path)


def write_labels_ome_tiff(
    path: str | Path,
    labels: np.ndarray,
    pixel_size_um: Sequence[float] | None = None,
    dims: str | None = None,
) -> Path:
    """Labels as an OME-TIFF with ``PhysicalSize*`` in µm (``dims`` ``YX``/``ZYX``, from ndim)."""
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    path = Path(path)
    lab = _label_dtype(_labels(labels, path), path)
    dims = (dims or ("YX" if lab.ndim == 2 else "ZYX")).upper()
    if dims not in ("YX", "ZYX") or len(dims) != lab.ndim:
        raise ShapeMismatchError(
            f"dims must be 'YX' or 'ZYX' matching labels of shape {lab.shape}, found {dims!r}",
            path,
        )
    sizes = _sizes(pixel_size_um, lab.ndim, path)
    pps = None
    if sizes is not None:
        z, y, x = sizes if len(sizes) == 3 else (None, *sizes)
        pps = PhysicalPixelSizes(Z=z, Y=y, X=x)
    with atomic_path(path) as tmp:
        OmeTiffWriter.save(
            lab, tmp, dim_order=dims, physical_pixel_sizes=pps, channel_names=["labels"]
        )
    return path


def _pyramid(shape_yx: Sequence[int]) -> list[int]:
    """Downsampling factors (2, 4, ...) while the smallest level keeps ``_PYRAMID_MIN`` px."""
    factors, f = [], 2
    while f <= 16 and min(shape_yx) // f >= _PYRAMID_MIN:
        factors.append(f)
        f *= 2
    return factors


def write_labels_ome_zarr(
    path: str | Path,
    labels: np.ndarray,
    pixel_size_um: Sequence[float] | None = None,
    *,
    image: np.ndarray | None = None,
    name: str = "labels",
) -> Path:
    """An OME-Zarr (NGFF) whose ``scale`` transforms carry the pixel size in micrometres.

    With ``image`` (same shape as ``labels``, or a channel axis first) the image is the
    multiscale and the labels go under ``labels/<name>`` with ``image-label`` metadata, as
    the NGFF labels spec has it (napari and Fiji's MoBIE overlay them); without it the labels
    are the image. Large images get a pyramid (nearest neighbour for labels).
    """
    import zarr
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image, write_labels

    path = Path(path)
    lab = _labels(labels, path)
    sizes = _sizes(pixel_size_um, lab.ndim, path)
    axes = "zyx"[-lab.ndim :]
    scale = dict(zip(axes, sizes or (1.0,) * lab.ndim, strict=True))
    units = dict.fromkeys(axes, "micrometer") if sizes is not None else None
    factors = _pyramid(lab.shape[-2:])
    if image is not None:
        image = np.asarray(image)
        if image.shape not in (lab.shape, image.shape[:1] + lab.shape):
            raise ShapeMismatchError(
                f"image shape {image.shape} must equal the labels' {lab.shape} (or add a "
                "channel axis first)",
                path,
            )
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        if image is None:
            write_image(
                lab,
                group,
                scale_factors=factors,
                method=Methods.NEAREST,
                axes=list(axes),
                scale=scale,
                axes_units=units,
                name=name,
            )
        else:
            img_axes = ("c" + axes) if image.ndim > lab.ndim else axes
            write_image(
                image,
                group,
                scale_factors=factors,
                axes=list(img_axes),
                scale={"c": 1.0, **scale} if image.ndim > lab.ndim else scale,
                axes_units=units,
                name="image",
            )
            write_labels(
                lab,
                group,
                name=name,
                scaler=None,
                scale_factors=factors,
                method=Methods.NEAREST,
                axes=list(axes),
                scale=scale,
                axes_units=units,
                **{"image-label": {"source": {"image": "../../"}}},
            )
    return path


# -- outlines -------------------------------------------------------------------------------
def _ring_area(rc: np.ndarray) -> float:
    y, x = rc[:, 0], rc[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _plane_outlines(plane: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(id, xy)`` per object of a 2D label image: the closed outer ring in ImageJ/QuPath
    pixel coordinates (first point repeated last). An object in several pieces gives the
    outline of its largest piece; holes are not traced."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    compact, ids = _compact(plane)
    for index, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        mask = np.pad(compact[box] == index, 1).astype(np.uint8)
        rings = find_contours(mask, 0.5, fully_connected="high")
        # vertices lie on a half-pixel grid: 1e-6 px drops the collinear ones and no others
        ring = approximate_polygon(max(rings, key=_ring_area), tolerance=1e-6)
        rc = ring + np.array([box[0].start - 1, box[1].start - 1])
        yield int(ids[index - 1]), rc[:, ::-1] + 0.5


def object_outlines(labels: np.ndarray) -> Iterator[tuple[int, int | None, np.ndarray]]:
    """``(id, z, xy)`` for every object (and every plane of it in 3D; ``z`` is ``None`` in 2D),
    ``xy`` a closed ``(N, 2)`` float ring in pixel coordinates, x first."""
    lab = _labels(labels)
    if lab.ndim == 2:
        for label, xy in _plane_outlines(lab):
            yield label, None, xy
        return
    for z, plane in enumerate(lab):
        if plane.any():
            for label, xy in _plane_outlines(plane):
                yield label, z, xy


def write_imagej_rois(path: str | Path, labels: np.ndarray) -> Path:
    """A Fiji ROI set (``.zip``, open with the ROI Manager): one polygon per object, per plane
    in 3D with its z position (stack position and hyperstack Z) set."""
    from roifile import ROI_TYPE, ImagejRoi, roiwrite

    path = Path(path)
    _labels(labels, path)
    rois = []
    for label, z, xy in object_outlines(labels):
        name = f"{label}" if z is None else f"{label}-z{z}"
        roi = ImagejRoi.frompoints(xy[:-1], name=name, position=z, z=z)
        roi.roitype = ROI_TYPE.POLYGON
        rois.append(roi)
    with atomic_path(path) as tmp:
        roiwrite(tmp, rois, mode="w")
    log.debug("wrote %d ROIs to %s", len(rois), path)
    return path


def _measurements(row: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only: JSON has no NaN and QuPath reads a missing key as missing."""
    out = {}
    for key, value in row.items():
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def write_qupath_geojson(
    path: str | Path,
    labels: np.ndarray,
    pixel_size_um: Sequence[float] | None = None,
    *,
    classification: str | None = "Nucleus",
) -> Path:
    """A GeoJSON FeatureCollection QuPath imports (File > Import objects): one ``detection``
    Polygon per object (per plane in 3D, with QuPath's ``plane``) in pixel coordinates, with
    the :func:`object_table` columns as measurements."""
    path = Path(path)
    lab = _labels(labels, path)
    rows = object_table(lab, pixel_size_um).set_index("id", drop=False)
    features = []
    for label, z, xy in object_outlines(lab):
        geometry: dict[str, Any] = {"type": "Polygon", "coordinates": [xy.tolist()]}
        if z is not None:
            geometry["plane"] = {"c": -1, "z": z, "t": 0}
        properties: dict[str, Any] = {"objectType": "detection", "name": str(label)}
        if classification:
            properties["classification"] = {"name": classification}
        properties["measurements"] = _measurements(rows.loc[label])
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)
    write_text(path, text)
    return path
