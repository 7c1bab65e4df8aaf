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
    check_paths(df, path)
    return df


#: a sample id names output files (reports/<stage>/<id>...) and MLflow metric keys
SAMPLE_ID = r"[^./\\\x00-\x1f][^/\\\x00-\x1f]*"  # no separator, no leading dot
PATH_COLUMNS = ("image_path", "label_path", "points_path")


def check_paths(df: pd.DataFrame, source: Path) -> None:
    """Refuse a manifest whose ids or file paths could leave its folder: ``sample_id`` becomes
    file names and MLflow keys, the paths are read relative to the manifest (issue 18: an id
    ``../../x`` made ``evaluate`` write outside ``reports/``)."""
    import re

    ids = df["sample_id"].astype(str)
    bad = ids[~ids.str.fullmatch(SAMPLE_ID) | ids.str.contains("..", regex=False)]
    if len(bad):
        raise DataFormatError(
            f"sample_id {bad.iloc[0]!r} (and {len(bad) - 1} more) is not a plain file name (no "
            "'/', '\\', '..', leading '.' or control characters): it names output files",
            source,
        )
    for col in PATH_COLUMNS:
        values = df[col].fillna("").astype(str)
        for value in values[values != ""]:
            parts = Path(value).parts
            if Path(value).is_absolute() or ".." in parts or re.match(r"^[A-Za-z]:", value):
                raise DataFormatError(
                    f"{col} {value!r} leaves the dataset folder; paths are relative to it",
                    source,
                )


def shape_str(shape: tuple[int, ...]) -> str:
    return ",".join(str(int(s)) for s in shape)
