"""The DeepD3 dataset's own files (``deepd3.forschung.fau.de``, Zenodo 7590773), as published.

Layout of one folder::

    DeepD3_Training.d3set, DeepD3_Validation.d3set   flammkuchen d3sets (see io/d3set.py)
    DeepD3_Benchmark.tif                             the benchmark stack (ZYX, uint16)
    Annotations_and_Clusters.csv                     raters' spine clicks, grouped by spine
    Spine_<R>.tif, Dendrite_<R>.tif                  rater R's masks of the benchmark stack
                                                     (R = U, V, W; DeepD3.V2 names the
                                                     dendrite files Dendrite_<R>_dendrite.tif)

The CSV as DeepD3's benchmark code reads it (ankilab/DeepD3 ``core/distance.py``,
munnasingh99/DeepD3_V2 ``yolo_inference.py``): a pandas index column, then ``Rater`` (one
letter per rater), ``X``, ``Y`` (pixels), ``Pos`` (the plane, a z index) and ``label`` (the
cluster: every rater's click on one spine shares it). Distances are pixels times the pitch
(94 nm in xy). ``x, y, z, cluster_id`` (any case) are read too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io import tiff

TRAINING = "DeepD3_Training.d3set"
VALIDATION = "DeepD3_Validation.d3set"
BENCHMARK = "DeepD3_Benchmark.tif"
ANNOTATIONS = "Annotations_and_Clusters.csv"
#: rater mask kinds -> the file name patterns DeepD3 releases use for rater ``R``
MASK_NAMES = {
    "spine": ("Spine_{r}.tif",),
    "dendrite": ("Dendrite_{r}.tif", "Dendrite_{r}_dendrite.tif"),
}
#: our column <- the spellings accepted (lower-cased); DeepD3's own first
COLUMN_ALIASES = {
    "x": ("x",),
    "y": ("y",),
    "z": ("pos", "z"),
    "cluster_id": ("label", "cluster_id", "cluster"),
    "rater": ("rater",),
}
REQUIRED_COLUMNS = ("x", "y", "z", "cluster_id")


@dataclass(frozen=True)
class DeepD3Files:
    """Paths of one DeepD3 folder; ``raters`` maps a rater's name to its (spine, dendrite)."""

    training: Path
    validation: Path
    benchmark: Path
    annotations: Path
    raters: dict[str, tuple[Path, Path]]


def _required(path: Path) -> Path:
    if not path.is_file():
        raise MissingFileError(f"the DeepD3 layout needs {path.name}, found nothing", path)
    return path


def _dendrite_mask(root: Path, rater: str) -> Path:
    names = [n.format(r=rater) for n in MASK_NAMES["dendrite"]]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise MissingFileError(
        f"rater {rater} has a spine mask but no dendrite mask ({' or '.join(names)})",
        root / names[0],
    )


def find_files(root: str | Path) -> DeepD3Files:
    """Check that ``root`` holds the whole layout; name the first file that is missing."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError("expected a folder with the DeepD3 dataset files", root)
    spines = sorted(root.glob("Spine_*.tif"))
    if not spines:
        raise MissingFileError(
            "the DeepD3 layout needs the raters' spine masks Spine_<rater>.tif "
            "(Spine_U.tif, Spine_V.tif, Spine_W.tif), found none",
            root / "Spine_U.tif",
        )
    raters = {p.stem.removeprefix("Spine_"): p for p in spines}
    dendrite_names = {f.format(r=r) for r in raters for f in MASK_NAMES["dendrite"]}
    orphans = sorted(p.name for p in root.glob("Dendrite_*.tif") if p.name not in dendrite_names)
    if orphans:
        raise MissingFileError(
            f"dendrite mask {orphans[0]} has no spine mask of its rater beside it",
            root / orphans[0],
        )
    return DeepD3Files(
        training=_required(root / TRAINING),
        validation=_required(root / VALIDATION),
        benchmark=_required(root / BENCHMARK),
        annotations=_required(root / ANNOTATIONS),
        raters={r: (p, _dendrite_mask(root, r)) for r, p in raters.items()},
    )


def _rename_columns(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    first = str(df.columns[0]) if len(df.columns) else ""
    if first == "" or first.startswith("Unnamed:"):  # the index column pandas wrote
        df = df.drop(columns=df.columns[0])
    lower = {str(c).strip().lower(): c for c in df.columns}
    rename = {}
    for ours, spellings in COLUMN_ALIASES.items():
        found = [lower[s] for s in spellings if s in lower]
        if len(found) > 1:
            raise DataFormatError(
                f"columns {found} both mean {ours!r}; keep one (found {list(df.columns)})", path
            )
        if found:
            rename[found[0]] = ours
    missing = [c for c in REQUIRED_COLUMNS if c not in rename.values()]
    if missing:
        raise DataFormatError(
            f"expected DeepD3's columns X, Y, Pos, label (or x, y, z, cluster_id), missing "
            f"{missing}; found {list(df.columns)}",
            path,
        )
    return df.rename(columns=rename)


def read_annotations(path: str | Path, shape: tuple[int, int, int]) -> pd.DataFrame:
    """Every click: ``x, y, z`` (pixels, float), ``cluster_id``, ``rater`` ("" if absent).

    Clicks must be finite and lie in the stack (voxel-centre convention, as io/points.py).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"expected a CSV file, could not parse it ({exc})", path) from exc
    df = _rename_columns(df, path)
    if df.empty:
        raise AnnotationError("expected spine clicks, found a header without rows", path)
    clicks = pd.DataFrame(
        {c: pd.to_numeric(df[c], errors="coerce") for c in ("x", "y", "z", "cluster_id")}
    )
    bad = ~np.isfinite(clicks.to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        lines = ", ".join(str(i + 2) for i in np.flatnonzero(bad)[:10])
        raise AnnotationError(
            f"expected numbers in x, y, z and the cluster id, found others on lines {lines}",
            path,
        )
    zyx = clicks[["z", "y", "x"]].to_numpy(dtype=float)
    outside = ((zyx < 0) | (zyx >= np.asarray(shape, float) - 0.5)).any(axis=1)
    if outside.any():
        lines = ", ".join(str(i + 2) for i in np.flatnonzero(outside)[:10])
        raise AnnotationError(
            f"expected clicks inside the benchmark stack (Z, Y, X)={tuple(shape)} in pixels, "
            f"found {int(outside.sum())} outside (lines {lines})",
            path,
        )
    clicks["rater"] = df["rater"].astype(str) if "rater" in df else ""
    return clicks.astype({"x": float, "y": float, "z": float})


def collapse_clusters(
    clicks: pd.DataFrame, voxel_size_nm: tuple[float, float, float]
) -> pd.DataFrame:
    """One point per spine: the centroid of its cluster's clicks, in pixels and nanometres.

    ``n_raters`` counts distinct raters (clicks when the CSV names none); sorted by cluster.
    """
    groups = clicks.groupby("cluster_id", sort=True)
    out = groups[["x", "y", "z"]].mean()
    out["spine_id"] = out.index.to_numpy()
    out["n_clicks"] = groups.size().astype("int64")
    has_rater = (clicks["rater"] != "").all()
    out["n_raters"] = (groups["rater"].nunique() if has_rater else out["n_clicks"]).astype("int64")
    z_nm, y_nm, x_nm = voxel_size_nm
    out["x_nm"], out["y_nm"], out["z_nm"] = out.x * x_nm, out.y * y_nm, out.z * z_nm
    return out.reset_index(drop=True)


def points_from_mask(
    spine: np.ndarray, voxel_size_nm: tuple[float, float, float], min_voxels: int = 1
) -> pd.DataFrame:
    """One point per spine of a d3set stack: the centroid of each 3D connected component of
    its spine mask (DeepD3's d3sets annotate spines as masks, not clicks), in pixels and nm.

    Validation (detection thresholds, the LoG grid) matches points; a real DeepD3 download has
    none for its training/validation stacks, so their masks' components stand in for them."""
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(spine) != 0)
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones(lab.shape, np.int64), lab, ids) if n else np.zeros(0)
    keep = ids[np.asarray(sizes) >= min_voxels]
    cents = np.array(ndimage.center_of_mass(lab > 0, lab, keep)).reshape(-1, 3)
    out = pd.DataFrame({"x": cents[:, 2], "y": cents[:, 1], "z": cents[:, 0]})
    out["spine_id"] = np.arange(1, len(out) + 1, dtype=np.int64)
    z_nm, y_nm, x_nm = voxel_size_nm
    out["x_nm"], out["y_nm"], out["z_nm"] = out.x * x_nm, out.y * y_nm, out.z * z_nm
    return out


def read_rater_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A rater's mask as bool: it must match the benchmark stack and hold one foreground value
    (0/1, 0/255 or bool), else it is a probability or label image, not a rater's mask."""
    mask = tiff.read_stack(path)
    if mask.shape != tuple(shape):
        raise ShapeMismatchError(
            f"rater mask has shape {mask.shape}, expected the benchmark stack's {tuple(shape)}",
            path,
        )
    values = np.unique(mask)
    if len(values[values != 0]) > 1:
        raise DataFormatError(
            f"expected a binary mask (0 and one foreground value), found values "
            f"{values[:8].tolist()}{' ...' if len(values) > 8 else ''}",
            path,
        )
    return mask != 0


def majority(masks: list[np.ndarray]) -> np.ndarray:
    """Voxels marked by more than half of the raters (2 of 3)."""
    votes = np.sum(np.stack(masks), axis=0, dtype=np.int64)
    return votes * 2 > len(masks)
