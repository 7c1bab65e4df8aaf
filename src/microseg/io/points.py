"""Spine point annotations as CSV: ``x,y,z`` in voxels plus any extra columns.

Annotation tools write ``X,Y,Z`` or add a pandas index column; both are accepted. Points use
the voxel-centre convention (voxel ``i`` is centred on coordinate ``i``), so a point lies
inside a ``(Z, Y, X)`` stack when ``0 <= c`` and ``round(c) <= size - 1``, i.e.
``c < size - 0.5``: rounding any accepted point gives a valid index.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.errors import AnnotationError, DataFormatError, MissingFileError
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

AXES = ("z", "y", "x")


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in AXES})


def _lines(mask: np.ndarray | pd.Series, limit: int = 10) -> str:
    """File line numbers (header is line 1) of the rows flagged in ``mask``."""
    rows = np.flatnonzero(np.asarray(mask)) + 2
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" ... ({len(rows)} rows)" if len(rows) > limit else "")


def _normalise_columns(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    first = str(df.columns[0]) if len(df.columns) else ""
    if first == "" or first.startswith("Unnamed:"):
        df = df.drop(columns=df.columns[0])
    rename: dict[str, str] = {}
    for col in df.columns:
        low = str(col).strip().lower()
        if low in AXES:
            if low in rename.values():
                raise DataFormatError(
                    f"column '{low}' appears twice (case-insensitive): {list(df.columns)}", path
                )
            rename[col] = low
    df = df.rename(columns=rename)
    missing = [c for c in ("x", "y", "z") if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"expected columns x, y, z (any case), missing {missing}; found {list(df.columns)}",
            path,
        )
    extras = [c for c in df.columns if c not in AXES]
    return df[[*AXES, *extras]]


def read_points(
    path: str | Path,
    shape: tuple[int, int, int] | None = None,
    allow_empty: bool = False,
) -> pd.DataFrame:
    """Read a point CSV into columns ``z, y, x`` (float64) followed by any extra columns."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a point annotation CSV, found nothing", path)
    if not path.read_bytes().strip():
        if allow_empty:
            return _empty()
        raise AnnotationError("expected spine points, found an empty file", path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(f"expected a CSV file, could not parse it ({exc})", path) from exc
    df = _normalise_columns(df, path)
    if df.empty:
        if allow_empty:
            return df.astype(dict.fromkeys(AXES, "float64"))
        raise AnnotationError("expected spine points, found a header without rows", path)
    for axis in AXES:
        values = pd.to_numeric(df[axis], errors="coerce")
        bad = values.isna() & df[axis].notna()
        if bad.any():
            raise AnnotationError(
                f"column {axis} must be numeric, found {df[axis][bad].iloc[0]!r} "
                f"on lines {_lines(bad)}",
                path,
            )
        df[axis] = values.astype("float64")
    coords = df[list(AXES)].to_numpy()
    nonfinite = ~np.isfinite(coords).all(axis=1)
    if nonfinite.any():
        raise AnnotationError(
            f"expected finite coordinates, found NaN/inf/empty on lines {_lines(nonfinite)}", path
        )
    negative = (coords < 0).any(axis=1)
    if negative.any():
        raise AnnotationError(
            f"expected non-negative voxel coordinates, found negatives on lines {_lines(negative)}",
            path,
        )
    if shape is not None:
        limits = np.asarray(shape, dtype=float) - 0.5
        outside = (coords >= limits).any(axis=1)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise AnnotationError(
                f"expected points inside the stack of shape (Z, Y, X)={tuple(shape)}, found "
                f"{outside.sum()} outside, e.g. (z, y, x)={tuple(coords[first])} on lines "
                f"{_lines(outside)}",
                path,
            )
    return df.reset_index(drop=True)


#: CSV precision of floats: a millionth of a voxel is far below any annotation's accuracy,
#: and the last digits of a full repr differ between CPUs (OpenBLAS picks its kernels by CPU:
#: the synthetic spines' coordinates changed in the 16th digit on Haswell against SkylakeX
#: kernels), so full precision would make the same seed write other bytes on another machine
FLOAT_FORMAT = "%.6f"


def write_points(path: str | Path, df: pd.DataFrame) -> Path:
    """Write points atomically as CSV with ``x, y, z`` first, extra columns after, no index;
    floats with :data:`FLOAT_FORMAT`."""
    path = Path(path)
    missing = [c for c in ("x", "y", "z") if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"cannot write points: missing columns {missing} in {list(df.columns)}", path
        )
    extras = [c for c in df.columns if c not in AXES]
    with atomic_path(path) as tmp:
        df[["x", "y", "z", *extras]].to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
    return path
