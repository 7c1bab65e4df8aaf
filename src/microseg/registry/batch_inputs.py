"""The inputs of a batch evaluation, described and judged before the model sees them.

One row per file (readable, ndim, shape, dtype, non-finite count, intensity range, voxel size),
read plane by plane so a large stack costs one plane of memory; the suite that judges the
table skips nulls, so an unreadable file fails ``readable`` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import tifffile

from microseg.data.expectations import import_gx
from microseg.errors import MicrosegError, MissingFileError
from microseg.io.png import read_image
from microseg.io.tiff import SUPPORTED_DTYPES, TiffStack

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

TASKS = ("spines", "nuclei")
SUFFIXES = {"spines": (".tif", ".tiff"), "nuclei": (".png", ".tif", ".tiff")}
ALLOWED_NDIM = {"spines": [3], "nuclei": [2, 3]}
#: files whose stem ends so are annotations (nuclei ground truth), never inputs
LABEL_SUFFIX = "_labels"


def list_inputs(input_dir: Path, task: str) -> list[Path]:
    """Images of ``task`` directly in ``input_dir`` (sorted), ground-truth label files excluded."""
    if not input_dir.is_dir():
        raise MissingFileError("expected a folder of input images, found nothing", input_dir)
    paths = sorted(
        p
        for p in input_dir.iterdir()
        if p.is_file()
        and p.suffix.lower() in SUFFIXES[task]
        and not p.stem.endswith(LABEL_SUFFIX)
        and not p.name.startswith(".")
    )
    if not paths:
        raise MissingFileError(
            f"expected {task} images ({', '.join(SUFFIXES[task])}), found none", input_dir
        )
    return paths


def _plane_stats(planes: Iterable[np.ndarray]) -> dict[str, Any]:
    """Non-finite count and finite min/max over planes, one plane in memory at a time."""
    n_bad, lo, hi = 0, math.inf, -math.inf
    for plane in planes:
        if np.issubdtype(plane.dtype, np.floating):
            finite = np.isfinite(plane)
            n_bad += int(plane.size - finite.sum())
            plane = plane[finite]
        if plane.size:
            lo, hi = min(lo, float(plane.min())), max(hi, float(plane.max()))
    return {
        "n_nonfinite": n_bad,
        "intensity_min": lo if math.isfinite(lo) else None,
        "intensity_max": hi if math.isfinite(hi) else None,
    }


def _tiff_row(path: Path) -> dict[str, Any]:
    # the header alone first: a dtype we cannot decode is a dtype failure, not "unreadable"
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, dtype = tuple(int(s) for s in series.shape), np.dtype(series.dtype)
    row: dict[str, Any] = {"ndim": len(shape), "shape": shape_text(shape), "dtype": dtype.name}
    if dtype not in SUPPORTED_DTYPES:
        return row
    with TiffStack(path) as stack:
        planes = [stack.asarray()] if stack.ndim <= 2 else (stack[i] for i in range(len(stack)))
        row.update(_plane_stats(planes))
        z, y, x = stack.voxel_size_nm or (math.nan,) * 3
    row.update(voxel_size_z_nm=z, voxel_size_y_nm=y, voxel_size_x_nm=x)
    return row


def _png_row(path: Path) -> dict[str, Any]:
    array = read_image(path)
    return {
        "ndim": array.ndim,
        "shape": shape_text(array.shape),
        "dtype": array.dtype.name,
        **_plane_stats([array]),
    }


def input_table(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per file: what GE judges (``readable``, ``ndim``, ``dtype``, ``n_nonfinite``)."""
    rows = []
    for path in paths:
        row: dict[str, Any] = {
            "sample_id": path.stem,
            "image_path": str(path),
            "file": path.name,
            "size_bytes": path.stat().st_size,
            "readable": True,
            "error": "",
        }
        try:
            reader = _tiff_row if path.suffix.lower() in (".tif", ".tiff") else _png_row
            row.update(reader(path))
        except Exception as exc:  # any failure to read is a finding about the file
            row["readable"] = False
            row["error"] = (
                str(exc) if isinstance(exc, MicrosegError) else f"{type(exc).__name__}: {exc}"
            )
        rows.append(row)
    columns = [
        "sample_id",
        "image_path",
        "file",
        "size_bytes",
        "readable",
        "error",
        "ndim",
        "shape",
        "dtype",
        "n_nonfinite",
        "intensity_min",
        "intensity_max",
        "voxel_size_z_nm",
        "voxel_size_y_nm",
        "voxel_size_x_nm",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns)
    table["readable"] = table["readable"].astype(bool)
    return table


def input_expectations(task: str, allowed_dtypes: Sequence[str]) -> list[Expectation]:
    """Per-file checks; value checks skip nulls, so an unreadable file fails ``readable`` only."""
    import_gx()
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),  # one output folder per stem
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="ndim", value_set=ALLOWED_NDIM[task]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=list(allowed_dtypes)),
        gxe.ExpectColumnValuesToBeBetween(column="n_nonfinite", max_value=0),
    ]


def shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(int(s)) for s in shape)
