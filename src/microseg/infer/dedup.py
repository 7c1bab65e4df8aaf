"""3D de-duplication of per-plane detections in physical space.

A 2D detector run plane by plane sees one spine in every plane its blurred image reaches
(the axial PSF spans 1.5-2.5 µm, i.e. 3-5 planes at 500 nm). Those detections must become one
before they are counted, or every spine is a true positive once and false positives the rest.
Distances are Euclidean in nanometres with the anisotropic voxel size, so "nearby" means the
same thing laterally and axially.

Two modes:

* ``"nms"`` (default) — greedy non-maximum suppression: in order of decreasing score, a
  surviving detection suppresses every not-yet-suppressed detection within ``radius_nm``.
  Survivors are real detections (their own coordinates and box); suppression never chains,
  so two spines further apart than ``radius_nm`` always both survive.
* ``"cluster"`` — single-linkage clustering: detections within ``radius_nm`` of one another
  are joined transitively (connected components) and each cluster becomes one row at the
  score-weighted centroid. Better for a spine seen in a long run of planes (the centre is
  averaged, not the brightest plane's), but chains: a string of detections each within reach
  of the next merges even when its ends lie far apart, so crowded spines can fuse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from microseg.errors import AnnotationError, MicrosegError
from microseg.utils.units import to_nm

logger = logging.getLogger(__name__)

BOX_COLS = ("x1", "y1", "x2", "y2")
EXTRA_COLS = ("n_merged", "z_min", "z_max")


def _centres(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with x, y present: taken as given, else the centre of the x1, y1, x2, y2 box."""
    if "z" not in df.columns:
        raise AnnotationError(
            f"detections need a plane column 'z'; found columns {list(df.columns)}"
        )
    if "x" in df.columns and "y" in df.columns:
        return df
    if all(c in df.columns for c in BOX_COLS):
        df = df.copy()
        df["x"] = (df["x1"] + df["x2"]) / 2.0
        df["y"] = (df["y1"] + df["y2"]) / 2.0
        return df
    raise AnnotationError(
        "detections need centre columns x, y (voxels) or a box x1, y1, x2, y2; "
        f"found columns {list(df.columns)}"
    )


def _neighbour_pairs(coords_nm: np.ndarray, radius_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j within ``radius_nm`` (inclusive), from a KD-tree.

    The tree is asked for a hair more than the radius and distances are recomputed here, so
    the inclusive cut-off is decided by one formula (the same a brute-force check uses).
    """
    slack = radius_nm * (1 + 1e-9) + 1e-9
    pairs = cKDTree(coords_nm).query_pairs(slack, output_type="ndarray")
    if len(pairs) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    i, j = pairs[:, 0].astype(np.intp), pairs[:, 1].astype(np.intp)
    d = np.sqrt(((coords_nm[i] - coords_nm[j]) ** 2).sum(axis=1))
    keep = d <= radius_nm
    return i[keep], j[keep]


def _rank_order(scores: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """Indices by decreasing score; ties broken by z, y, x so input order never matters."""
    return np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0], -scores))


def _empty_result(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[0:0].copy().reset_index(drop=True)
    for c in ("x", "y"):
        if c not in out.columns:
            out[c] = pd.Series(dtype=float)
    out["n_merged"] = pd.Series(dtype=np.int64)
    out["z_min"] = pd.Series(dtype=float)
    out["z_max"] = pd.Series(dtype=float)
    return out


def dedup_3d(
    df: pd.DataFrame,
    voxel_size_nm: Sequence[float] | np.ndarray,
    radius_nm: float,
    score_col: str | None = "score",
    mode: Literal["nms", "cluster"] = "nms",
) -> pd.DataFrame:
    """Merge detections of one object across nearby planes (see module notes for the modes).

    ``df`` holds one row per detection with plane ``z`` and centre ``x``, ``y`` in voxels (or a
    box ``x1, y1, x2, y2`` to take the centre from); other columns ride along. ``score_col=None``
    treats all detections as equally good (ties then go to the lowest z, y, x).

    Returns one row per kept object: its original columns (in ``"cluster"`` mode, x, y, z are the
    score-weighted centroid, the box is the best member's box moved onto it, and the score is the
    best member's), plus ``n_merged`` (detections it stands for, itself included) and ``z_min``,
    ``z_max`` (plane extent of those detections). Rows are sorted by decreasing score, ties by
    z, y, x, with a fresh index, so shuffled input gives identical output.
    """
    if mode not in ("nms", "cluster"):
        raise MicrosegError(f"dedup mode must be 'nms' or 'cluster'; found {mode!r}")
    if not np.isfinite(radius_nm) or radius_nm < 0:
        raise MicrosegError(f"radius_nm must be a finite number >= 0; found {radius_nm!r}")
    df = _centres(df)
    if score_col is not None and score_col not in df.columns:
        raise AnnotationError(
            f"detections need a score column {score_col!r} (or pass score_col=None); "
            f"found columns {list(df.columns)}"
        )
    for c in EXTRA_COLS:
        if c in df.columns:
            raise AnnotationError(
                f"column {c!r} is written by dedup_3d and must not be in its input; "
                f"found columns {list(df.columns)}"
            )
    if len(df) == 0:
        return _empty_result(df)

    zyx = df[["z", "y", "x"]].to_numpy(dtype=float)
    if score_col is None:
        scores = np.ones(len(df))
    else:
        scores = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(scores).all():
            raise AnnotationError(
                f"score column {score_col!r} must be finite numbers; found "
                f"{int((~np.isfinite(scores)).sum())} missing or non-numeric value(s)"
            )
    coords = to_nm(zyx, voxel_size_nm)
    i, j = _neighbour_pairs(coords, float(radius_nm))
    order = _rank_order(scores, zyx)
    if mode == "nms":
        rep, owner = _greedy_nms(len(df), order, i, j)
    else:
        rep, owner = _single_linkage(len(df), order, i, j)

    # owner[k] = position (in rep) of the kept row that absorbed detection k
    n_merged = np.bincount(owner, minlength=len(rep))
    z_min = np.full(len(rep), np.inf)
    z_max = np.full(len(rep), -np.inf)
    np.minimum.at(z_min, owner, zyx[:, 0])
    np.maximum.at(z_max, owner, zyx[:, 0])

    out = df.iloc[rep].copy()
    if mode == "cluster":
        w = np.clip(scores, 0.0, None)
        wsum = np.bincount(owner, weights=w, minlength=len(rep))
        uniform = wsum <= 0  # all-zero (or negative) scores: plain mean
        w = np.where(uniform[owner], 1.0, w)
        wsum = np.bincount(owner, weights=w, minlength=len(rep))
        centroid = (
            np.stack(
                [np.bincount(owner, weights=w * zyx[:, a], minlength=len(rep)) for a in range(3)],
                axis=1,
            )
            / wsum[:, None]
        )
        shift = centroid - zyx[rep]
        for a, col in enumerate(("z", "y", "x")):
            out[col] = centroid[:, a]
        if all(c in out.columns for c in BOX_COLS):
            for c, a in (("x1", 2), ("x2", 2), ("y1", 1), ("y2", 1)):
                out[c] = out[c].to_numpy(dtype=float) + shift[:, a]
    out["n_merged"] = n_merged.astype(np.int64)
    out["z_min"] = z_min
    out["z_max"] = z_max
    logger.debug("dedup_3d(%s, r=%.0f nm): %d detections -> %d", mode, radius_nm, len(df), len(out))
    return out.reset_index(drop=True)


def _greedy_nms(
    n: int, order: np.ndarray, i: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy suppression over precomputed neighbour lists (CSR), best first.

    Returns the kept rows in rank order and, for every detection, the index into that list of
    the kept row that absorbed it. A suppressed detection suppresses nothing.
    """
    rank = np.empty(n, np.intp)
    rank[order] = np.arange(n)
    # Symmetric neighbour lists in CSR form.
    src = np.concatenate([i, j])
    dst = np.concatenate([j, i])
    srt = np.argsort(src, kind="stable")
    src, dst = src[srt], dst[srt]
    indptr = np.searchsorted(src, np.arange(n + 1))
    owner = np.full(n, -1, np.intp)
    kept: list[int] = []
    for k in order:
        if owner[k] >= 0:
            continue
        slot = len(kept)
        kept.append(k)
        owner[k] = slot
        nb = dst[indptr[k] : indptr[k + 1]]
        if len(nb):
            # Every free neighbour of an unsuppressed detection ranks below it: a better one
            # would have been kept and suppressed it. The rank test keeps that explicit.
            nb = nb[(owner[nb] < 0) & (rank[nb] > rank[k])]
            owner[nb] = slot
    return np.asarray(kept, dtype=np.intp), owner


def _single_linkage(
    n: int, order: np.ndarray, i: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the radius graph; each represented by its best-ranked member."""
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # First occurrence of each label in rank order is the component's representative.
    lab_in_order = labels[order]
    _, first = np.unique(lab_in_order, return_index=True)
    rep = order[np.sort(first)]  # representatives in rank order
    slot_of_label = np.empty(labels.max() + 1, np.intp)
    slot_of_label[labels[rep]] = np.arange(len(rep))
    return rep, slot_of_label[labels]
