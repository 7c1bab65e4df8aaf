"""The canonical dataset manifest: one row per sample, written by ``ingest``.

Every later stage finds its inputs through this table instead of globbing folders, and the
Great Expectations suite (``data/validate.py``) checks it. Paths are relative to the prepared
dataset folder (``data/prepared/<dataset>/``) so the folder can move.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from microseg.errors import DataFormatError, MissingFileError
from microseg.utils.atomic import atomic_path

MANIFEST_NAME = "manifest.parquet"

#: column -> pandas dtype. ``shape``/``label_shape`` are comma-joined ints ("24,256,256")
#: so that GE can compare them as plain strings.
COLUMNS: dict[str, str] = {
    "sample_id": "string",
    "dataset": "string",
    "task": "string",  # spines | nuclei | tracking
    "split": "string",  # train | val | test
    "image_path": "string",
    "label_path": "string",  # "" when the sample has no label image
    "label_kind": "string",  # semantic | instance | none
    # how instance labels were read from a mask: instance (ids kept) | binary (4-connected
    # components); "" where the source format carries instances by construction (DSB, COCO)
    "mask_kind": "string",
    "points_path": "string",  # "" when the sample has no point annotations
    "axes": "string",  # YX, YXC, ZYX, TYX
    "shape": "string",  # spatial(+T) shape of the image without channels, e.g. "24,256,256"
    "label_shape": "string",  # "" when no label
    "dtype": "string",
    "label_dtype": "string",
    "channels": "int64",
    "voxel_size_z_nm": "float64",  # NaN where the source gives no physical size
    "voxel_size_y_nm": "float64",
    "voxel_size_x_nm": "float64",
    "intensity_min": "float64",
    "intensity_p1": "float64",
    "intensity_p50": "float64",
    "intensity_p99": "float64",
    "intensity_max": "float64",
    "n_nonfinite": "int64",
    "label_min": "int64",
    "label_max": "int64",
    "n_instances": "int64",  # instances (nuclei/cells), spine points (spines)
    "source_path": "string",
    "source_md5": "string",
    "modality": "string",  # e.g. fluorescence, tissue, brightfield, two-photon
}
#: columns added after manifests were first written: filled with "" when an older one is read
ADDED_COLUMNS: tuple[str, ...] = ("mask_kind",)


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def normalise(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Order and type the columns; missing optional columns are filled with neutral values."""
    df = pd.DataFrame(rows)
    for col, dtype in COLUMNS.items():
        if col not in df:
            df[col] = "" if dtype == "string" else (float("nan") if dtype == "float64" else 0)
    return df[list(COLUMNS)].astype(COLUMNS).reset_index(drop=True)


def write_manifest(df: pd.DataFrame, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        normalise(df).to_parquet(tmp, index=False)
    return path


def read_manifest(folder_or_file: str | Path) -> pd.DataFrame:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise MissingFileError("manifest not found; run `microseg ingest` first", path)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataFormatError(f"not a readable parquet manifest ({exc})", path) from exc
    for col in ADDED_COLUMNS:
        if col not in df:
            df[col] = pd.Series([""] * len(df), dtype=COLUMNS[col], index=df.index)
    missing = [c for c in COLUMNS if c not in df]
    if missing:
        raise DataFormatError(f"manifest lacks columns {missing}", path)
    return df


def shape_str(shape: tuple[int, ...]) -> str:
    return ",".join(str(int(s)) for s in shape)
