"""A result folder as napari layer data: ``(data, kwargs, layer_type)`` tuples.

The tuples follow napari's reader-plugin convention but are built without importing napari,
so which file becomes which layer is tested where no viewer exists
(:mod:`microseg.report.napari_viewer` hands them to napari).

Coordinates: layer data are voxel indices (points at voxel centres, as ``io/points.py``
reads them); ``scale`` is the folder's voxel size in nm when one is known, so the world is in
nm (``units="nm"``) and a point sits on the voxel it names. Without a voxel size every scale
is 1 and the world is in pixels. One voxel size serves every layer of a folder, never a mix
(first found: ``punet_prediction.json``, the image's metadata, a TIFF of the folder).
Time (tracking) keeps scale 1: one step per frame.

Recognised in the folder itself, by the names their writers use:

- ``res_track.txt`` + ``mask###.tif`` (CTC result; also ``<stem>_RES/`` subfolders, as
  ``microseg predict --task tracking`` writes them) or ``man_track.txt`` +
  ``man_track###.tif`` (CTC ground truth): the masks as ``TYX`` labels and a tracks layer
  (label centroids per frame; ``graph`` ``{daughter: [parent]}`` from ``P``);
- spine points ``spines.csv``, ``benchmark_points.csv``, ``*points.csv`` (``x, y, z`` voxels)
  and ``predictions_dedup.csv`` (box centres): points whose other columns are features;
- ``<stem>_objects.csv`` (nuclei; centroids ``y_px, x_px``): points, columns as features;
- ``prob_<head>.tif``, ``<stem>_probability.tif``: probability; ``mask_<head>_*.tif``,
  ``*labels*.tif``, ``<stem>_labels.ome.zarr``: labels;
- ``sum_p/sum_p2/sum_entropy_<head>.tif`` + ``punet_prediction.json``: the uncertainty maps
  computed from the sums; ``<head>_<map>.tif`` (``microseg uncertainty``),
  ``disagreement_<head>.tif``, ``<stem>_uncertainty.tif``: uncertainty, hidden until shown;
- any other TIFF: an image.

With an image, per-image results of *other* images (``<other>_labels.tif``, ``<other>_RES``,
...) are left out. Points also get the value of each uncertainty map at their voxel.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import DataFormatError, MissingFileError
from microseg.evaluate.uncertainty import MAP_NAMES, UncertaintySums, uncertainty_maps
from microseg.io.ctc import check_tracks, read_track_file
from microseg.io.points import read_points
from microseg.io.tiff import read_stack
from microseg.report.napari_image import (
    TIFF_SUFFIXES,
    LayerData,
    Voxel,
    axes_of,
    image_layers,
    image_stem,
    layer,
    read_frames,
    tiff_voxel,
    valid_voxel,
)

log = logging.getLogger(__name__)

POINT_TABLES = ("spines.csv", "benchmark_points.csv")
FUSED_TABLE = "predictions_dedup.csv"
PUNET_META = "punet_prediction.json"
CTC_TRACKS = {"res_track.txt": "mask", "man_track.txt": "man_track"}
BOX_COLS = ("x1", "y1", "x2", "y2")
#: centroid columns of an objects table, tried in order (io.exports, then scikit-image's)
CENTROIDS = (
    ("z_px", "y_px", "x_px"),
    ("y_px", "x_px"),
    ("centroid-0", "centroid-1", "centroid-2"),
    ("centroid-0", "centroid-1"),
)
SUMS = ("sum_p", "sum_p2", "sum_entropy")
_UNC_MAP = re.compile(rf"^(?P<head>[a-z]+)_(?P<map>{'|'.join(MAP_NAMES)})$")
#: results named after their image (``microseg predict``): ``<stem>_<kind>``
_PER_IMAGE = re.compile(
    r"^(?P<stem>.+)_(labels|objects|probability|uncertainty|tracks|rois|RES)"
    r"(\.ome\.zarr|\.tiff?|\.csv|\.zip)?$"
)


# -- tracking ----------------------------------------------------------------------------------
def ctc_tracks(masks: np.ndarray, table: pd.DataFrame) -> tuple[np.ndarray, dict[int, list[int]]]:
    """napari tracks ``(track_id, t, y, x)`` at each label's centroid per frame, sorted by id
    then time, and the division graph ``{daughter: [parent]}`` from the ``P`` column."""
    from scipy import ndimage

    rows = []
    for t, frame in enumerate(np.asarray(masks)):
        ids = np.unique(frame)
        ids = ids[ids > 0]
        if ids.size:
            centres = ndimage.center_of_mass(np.ones(frame.shape, np.float32), frame, ids)
            rows += [(int(i), t, cy, cx) for i, (cy, cx) in zip(ids, centres, strict=True)]
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    data = data[np.lexsort((data[:, 1], data[:, 0]))]
    graph = {int(r.L): [int(r.P)] for r in table.itertuples(index=False) if r.P != 0}
    return data, graph


def ctc_layers(folder: Path, track_file: str, prefix: str = "") -> list[LayerData]:
    """Masks (``TYX`` labels) and tracks of a CTC result or TRA ground-truth folder."""
    path = folder / track_file
    masks = read_frames(folder, CTC_TRACKS[track_file])
    table = read_track_file(path)
    check_tracks(masks, table, path)
    data, graph = ctc_tracks(masks, table)
    axes = ("t", "y", "x")
    layers = [layer(masks, "labels", f"{prefix}masks", axes, folder, opacity=0.5)]
    if len(data):
        kw = {"graph": graph, "tail_length": 10}
        layers.append(layer(data, "tracks", f"{prefix}tracks", axes, path, **kw))
    return layers


# -- points ------------------------------------------------------------------------------------
def _features(df: pd.DataFrame, coords: Sequence[str]) -> pd.DataFrame:
    drop = {*coords, *BOX_COLS}
    return df[[c for c in df.columns if c not in drop]].reset_index(drop=True)


def _points(coords: np.ndarray, features: pd.DataFrame, name: str, path: Path) -> LayerData:
    kw: dict[str, Any] = {"features": features, "size": 5, "border_width": 0}
    score = features.get("score")
    numeric = score is not None and len(score) and pd.api.types.is_numeric_dtype(score)
    if numeric and np.isfinite(score.to_numpy(dtype=float)).all():
        kw |= {"face_color": "score", "face_colormap": "viridis"}
    axes = ("z", "y", "x")[-coords.shape[1] :]
    return layer(coords.astype(np.float64), "points", name, axes, path, **kw)


def spine_points_layer(path: Path) -> LayerData:
    """Spine points (``x, y, z`` voxels) or fused boxes (``z`` plane + box): voxel-centre
    coordinates ``(z, y, x)``; every other column (score, uncertainty, ...) is a feature."""
    if path.name != FUSED_TABLE:
        df = read_points(path, allow_empty=True)
        return _points(df[["z", "y", "x"]].to_numpy(), _features(df, "zyx"), "spines", path)
    df = pd.read_csv(path)
    missing = [c for c in ("z", *BOX_COLS) if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"expected fused boxes with z, x1, y1, x2, y2; missing {missing}", path
        )
    # box centres as microseg.infer.fusion computes them (voxel-centre convention)
    x = (df["x1"].to_numpy(float) + df["x2"].to_numpy(float)) / 2 - 0.5
    y = (df["y1"].to_numpy(float) + df["y2"].to_numpy(float)) / 2 - 0.5
    coords = np.column_stack([df["z"].to_numpy(float), y, x])
    return _points(coords, _features(df, ("z", "y", "x")), "fused spines", path)


def objects_layer(path: Path) -> LayerData | None:
    """Object centroids (pixels) of a ``<stem>_objects.csv`` table, its columns as features."""
    df = pd.read_csv(path)
    cols = next((c for c in CENTROIDS if all(k in df.columns for k in c)), None)
    if cols is None:
        log.warning("%s: no centroid columns (y_px, x_px or centroid-0, centroid-1); skipped", path)
        return None
    coords = df[list(cols)].to_numpy(dtype=float)
    return _points(coords, _features(df, cols), path.stem, path)


# -- maps and label images ---------------------------------------------------------------------
def _uncertainty(data: np.ndarray, name: str, path: Path, time: bool = False) -> LayerData:
    meta = {"source": str(path), "uncertainty": True}
    kw = {"colormap": "inferno", "blending": "additive", "visible": False, "metadata": meta}
    return layer(data, "image", name, axes_of(data.ndim, time, path), path, **kw)


def punet_sum_layers(folder: Path) -> list[LayerData]:
    """Uncertainty maps of each head whose sums were written by ``microseg predict -m punet``."""
    heads = sorted(p.stem.removeprefix("sum_p2_") for p in folder.glob("sum_p2_*.tif"))
    if not heads:
        return []
    meta_path = folder / PUNET_META
    if not meta_path.is_file():
        log.warning("%s: Prob-UNet sums without %s; maps skipped", folder, PUNET_META)
        return []
    n = int(_json(meta_path).get("n_samples") or 0)
    layers = []
    for head in heads:
        arrays = [read_stack(folder / f"{s}_{head}.tif").astype(np.float64) for s in SUMS]
        maps = uncertainty_maps(UncertaintySums(*arrays, n=n))
        layers += [_uncertainty(m, f"{head} {k}", folder) for k, m in maps.items() if k != "mean"]
    return layers


def tiff_layers(path: Path, time: bool) -> list[LayerData]:
    """One TIFF by its name: probability, mask or labels, uncertainty map, or plain image."""
    stem, low = image_stem(path), path.name.lower()
    if stem.startswith(("sum_p_", "sum_p2_", "sum_entropy_")):
        return []  # shown as the maps computed from them
    data = read_stack(path)
    axes = axes_of(data.ndim, time, path)
    if stem.startswith("prob_") or stem.endswith("_probability"):
        name = f"{stem[5:]} probability" if stem.startswith("prob_") else stem
        kw = {"colormap": "magma", "contrast_limits": (0.0, 1.0), "blending": "additive"}
        return [layer(data, "image", name, axes, path, **kw)]
    if (stem.startswith("mask_") or "labels" in low) and np.issubdtype(data.dtype, np.integer):
        name = f"{stem.split('_')[1]} mask" if stem.startswith("mask_") else stem
        return [layer(data, "labels", name, axes, path, opacity=0.5)]
    if (m := _UNC_MAP.match(stem)) or stem.startswith("disagreement_"):
        return [_uncertainty(data, f"{m['head']} {m['map']}" if m else stem, path, time)]
    if stem.endswith("_uncertainty"):
        return [_uncertainty(data, stem, path, time)]
    return [layer(data, "image", stem, axes, path, colormap="gray")]


def zarr_labels_layer(path: Path) -> tuple[LayerData, Voxel | None]:
    """``<stem>_labels.ome.zarr`` (NGFF) through bioio: labels and their pixel size."""
    from microseg.io.bioformats import pixel_size_nm, read_image

    img = read_image(path)
    axes = tuple(img.dims.lower())
    voxel = valid_voxel(([math.nan] * 3 + list(pixel_size_nm(img) or ()))[-3:])
    return layer(img.array, "labels", image_stem(path), axes, path, opacity=0.5), voxel


# -- voxel size and scale ----------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"expected JSON, could not parse it ({exc})", path) from exc
    if not isinstance(data, dict):
        raise DataFormatError(f"expected a JSON object, found {type(data).__name__}", path)
    return data


def find_voxel_size(folder: Path, files: Sequence[Path], *known: Voxel | None) -> Voxel | None:
    """``(z, y, x)`` nm (z NaN when only the plane is known), first found: the Prob-UNet
    prediction record, ``known`` (the image's, ...), the folder's TIFFs in name order."""
    meta = folder / PUNET_META
    if meta.is_file() and (v := valid_voxel(_json(meta).get("voxel_size_nm") or ())):
        return v
    if found := next((v for v in known if v is not None), None):
        return found
    tiffs = (p for p in files if p.suffix.lower() in TIFF_SUFFIXES)
    return next((v for p in tiffs if (v := tiff_voxel(p))), None)


def apply_scale(layers: list[LayerData], voxel: Voxel | None) -> list[LayerData]:
    """Give every layer ``scale`` (and ``units``) from one voxel size, or none to any: a layer
    with a z axis when z is unknown leaves the whole folder in pixels."""
    spatial = {a for _, kw, _ in layers for a in kw["axis_labels"] if a != "t"}
    sizes = dict(zip("zyx", voxel, strict=True)) if voxel else {}
    if not all(math.isfinite(sizes.get(a, math.nan)) for a in spatial):
        if voxel:
            log.warning("voxel size %s lacks an axis of %s: layers in pixels", voxel, spatial)
        sizes = {}
    for _, kw, _ in layers:
        axes = kw["axis_labels"]
        kw["scale"] = tuple(1.0 if a == "t" or not sizes else sizes[a] for a in axes)
        if sizes:
            kw["units"] = tuple("pixel" if a == "t" else "nm" for a in axes)
    return layers


def sample_uncertainty(layers: list[LayerData]) -> list[LayerData]:
    """Add each uncertainty map's value at every point (nearest voxel) as a point feature;
    NaN for a point outside the map."""
    maps = [
        (data, kw["name"])
        for data, kw, kind in layers
        if kind == "image" and kw["metadata"].get("uncertainty")
    ]
    for data, kw, kind in layers:
        if kind != "points" or not len(data):
            continue
        idx = np.rint(np.asarray(data)).astype(np.int64)
        for array, name in maps:
            if array.ndim != idx.shape[1]:
                continue
            inside = ((idx >= 0) & (idx < np.asarray(array.shape))).all(axis=1)
            values = np.full(len(idx), np.nan)
            values[inside] = np.asarray(array)[tuple(idx[inside].T)]
            kw["features"][name.replace(" ", "_")] = values
    return layers


# -- the folder --------------------------------------------------------------------------------
def _entries(folder: Path, image: Path | None) -> list[Path]:
    """The folder's visible entries, less the image itself and other images' results."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if image is None:
        return entries
    own = image_stem(image)

    def keep(p: Path) -> bool:
        m = _PER_IMAGE.match(p.name)
        return p.resolve() != image.resolve() and (m is None or m["stem"] == own)

    return [p for p in entries if keep(p)]


def _folder_layers(folder: Path, entries: list[Path]) -> tuple[list[LayerData], list[Voxel]]:
    files = [p for p in entries if p.is_file()]
    names = {p.name for p in files}
    layers: list[LayerData] = []
    voxels: list[Voxel] = []
    track_file = next((t for t in CTC_TRACKS if t in names), None)
    if track_file:
        layers += ctc_layers(folder, track_file)
    for sub in (p for p in entries if p.is_dir() and (p / "res_track.txt").is_file()):
        layers += ctc_layers(sub, "res_track.txt", prefix=f"{sub.name} ")
    time = any(kw["axis_labels"][0] == "t" for _, kw, _ in layers)
    for sub in (p for p in entries if p.is_dir() and p.name.endswith("_labels.ome.zarr")):
        zarr_layer, voxel = zarr_labels_layer(sub)
        layers.append(zarr_layer)
        voxels += [voxel] if voxel else []
    layers += punet_sum_layers(folder)
    frames = re.compile(rf"^{CTC_TRACKS[track_file]}\d+\.") if track_file else None
    for path in files:
        if path.suffix.lower() in TIFF_SUFFIXES and not (frames and frames.match(path.name)):
            layers += tiff_layers(path, time)
    for path in files:
        low = path.name.lower()
        if low in POINT_TABLES or low == FUSED_TABLE or low.endswith("points.csv"):
            layers.append(spine_points_layer(path))
        elif low.endswith("_objects.csv") and (points := objects_layer(path)) is not None:
            layers.append(points)
    order = {"image": 0, "labels": 1, "points": 2, "tracks": 3}
    return sorted(layers, key=lambda item: order[item[2]]), voxels  # stable: images lowest


def _subfolder_hint(folder: Path) -> str:
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return f"; view one of its subfolders: {', '.join(subs[:10])}" if subs else ""


def result_layers(result_dir: str | Path, image: str | Path | None = None) -> list[LayerData]:
    """Layer data tuples of one result folder (see the module notes), ``image`` underneath."""
    folder = Path(result_dir)
    if not folder.is_dir():
        raise MissingFileError("expected a result folder, found no folder", folder)
    image_path = Path(image) if image is not None else None
    if image_path is not None and not image_path.exists():
        raise MissingFileError("expected the image (a file or a folder of t###.tif)", image_path)
    entries = _entries(folder, image_path)
    layers, voxels = _folder_layers(folder, entries)
    if not layers:
        raise MissingFileError(
            "found no results to show (spine points, labels, maps, CTC tracks)"
            + _subfolder_hint(folder),
            folder,
        )
    image_voxel = None
    if image_path is not None:
        time = any(kw["axis_labels"][0] == "t" for _, kw, _ in layers)
        underlay, image_voxel = image_layers(image_path, time)
        layers = underlay + layers
    sample_uncertainty(layers)
    files = [p for p in entries if p.is_file()]
    return apply_scale(layers, find_voxel_size(folder, files, image_voxel, *voxels))
