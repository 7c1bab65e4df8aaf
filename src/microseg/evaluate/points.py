"""Point-detection metrics in physical units: one-to-one optimal matching within a distance.

Spine detections are judged against annotated spine points by distance in nanometres, not
voxels, because voxels are anisotropic (about 94 nm in XY but 500 nm in Z): one plane apart
is farther than five pixels apart.

Matching is *optimal* and one-to-one: among all pairings where every pair lies within
``max_dist_nm``, take one with the most pairs and, among those, the smallest total distance.
Greedy nearest-neighbour matching can lose true positives in crowded regions; the optimum
cannot. It is solved without a dense ``N x M`` matrix: candidate pairs come from a KD-tree,
the candidate graph splits into connected components, and each is solved exactly: a star
(one point on either side) by its shortest edge, vectorised; a small component by the
Hungarian algorithm on a dense block; a large one by sparse LAPJV on its candidate edges.
Components are usually a few points, but in a crowded stack (about one spine per µm^3 at a
1 µm reach) the graph percolates into one giant component of thousands, hence the sparse
path. 100k vs 100k sparse points match in well under a second.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import (
    connected_components,
    maximum_bipartite_matching,
    min_weight_full_bipartite_matching,
)
from scipy.spatial import cKDTree

from microseg.errors import AnnotationError, MicrosegError
from microseg.evaluate.rates import prf
from microseg.utils.units import VoxelSize, to_nm  # re-exported: they lived here

logger = logging.getLogger(__name__)

#: Components with more points than this on both sides are solved by sparse LAPJV
#: (:func:`_solve_sparse`) instead of a dense Hungarian block. Crowded stacks make the candidate
#: graph percolate into one giant component, where a dense block would cost O(n^2) memory.
DENSE_MAX = 100

#: Score thresholds in :func:`pr_curve` default to every distinct score up to this many;
#: beyond it, this many quantiles of the scores (each threshold costs one full re-matching).
MAX_DEFAULT_THRESHOLDS = 256


@dataclass(frozen=True, eq=False)
class Matching:
    """A one-to-one matching of predicted to ground-truth points.

    ``pred_idx[k]`` is matched to ``gt_idx[k]`` at ``distances_nm[k]`` (indices into the inputs).

    Empty sets, so that every number is defined and a metric never turns NaN:
    no predictions and no ground truth is a perfect answer (P = R = F1 = 1). Precision with no
    predictions is 1 only when there is nothing to find, else 0; recall with no ground truth is
    1 only when nothing was predicted, else 0. F1 is ``2TP / (2TP + FP + FN)``, which agrees with
    the harmonic mean of P and R in every case.
    """

    pred_idx: np.ndarray
    gt_idx: np.ndarray
    distances_nm: np.ndarray
    n_pred: int
    n_gt: int
    tp: int = field(init=False)
    fp: int = field(init=False)
    fn: int = field(init=False)
    precision: float = field(init=False)
    recall: float = field(init=False)
    f1: float = field(init=False)

    def __post_init__(self) -> None:
        tp = len(self.pred_idx)
        p, r, f = prf(tp, self.n_pred - tp, self.n_gt - tp, empty=1.0)
        for name, value in (
            ("tp", tp),
            ("fp", self.n_pred - tp),
            ("fn", self.n_gt - tp),
            ("precision", p),
            ("recall", r),
            ("f1", f),
        ):
            object.__setattr__(self, name, value)

    @property
    def total_distance_nm(self) -> float:
        """Sum of matched distances: what the optimal matching minimises at maximum ``tp``."""
        return float(np.sum(self.distances_nm))

    @property
    def mean_distance_nm(self) -> float:
        """Mean matched distance; NaN when nothing matched."""
        return float(np.mean(self.distances_nm)) if len(self.distances_nm) else float("nan")


def _candidate_pairs(
    pred_nm: np.ndarray, gt_nm: np.ndarray, max_dist_nm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (pred, gt, distance) with distance <= max_dist_nm, from KD-trees, never dense.

    The tree is asked for a hair more than the threshold and distances are recomputed here, so
    that the inclusive cut-off is decided by one formula (the same a brute-force check uses).
    """
    empty = (np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0, float))
    if len(pred_nm) == 0 or len(gt_nm) == 0:
        return empty
    slack = max_dist_nm * (1 + 1e-9) + 1e-9
    sdm = cKDTree(pred_nm).sparse_distance_matrix(cKDTree(gt_nm), slack, output_type="ndarray")
    i = sdm["i"].astype(np.intp)
    j = sdm["j"].astype(np.intp)
    d = np.sqrt(((pred_nm[i] - gt_nm[j]) ** 2).sum(axis=1))
    keep = d <= max_dist_nm
    return i[keep], j[keep], d[keep]


def _solve_pairs(
    n_pred: int, n_gt: int, pi: np.ndarray, gj: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-cardinality, min-total-distance matching over candidate edges, per component.

    Nodes are ``0..n_pred-1`` (pred) and ``n_pred..n_pred+n_gt-1`` (gt); only nodes that
    appear in an edge matter. A component with one node on either side is solved by taking its
    shortest edge, vectorised; the rest by :func:`_solve_dense`, or :func:`_solve_sparse` when
    both sides exceed ``DENSE_MAX``.
    """
    if len(pi) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0, float)
    n = n_pred + n_gt
    graph = coo_matrix((np.ones(len(pi)), (pi, gj + n_pred)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    comp = labels[pi]
    # Size of each side per component (only nodes that have edges).
    used_p = np.unique(pi)
    used_g = np.unique(gj)
    n_comp = labels.max() + 1
    size_p = np.bincount(labels[used_p], minlength=n_comp)
    size_g = np.bincount(labels[used_g + n_pred], minlength=n_comp)
    trivial = (size_p[comp] == 1) | (size_g[comp] == 1)

    out_p, out_g, out_d = [], [], []
    # Trivial components: a star around one point; the shortest edge is optimal (1 match).
    if trivial.any():
        e = np.flatnonzero(trivial)
        order = np.lexsort((gj[e], pi[e], d[e], comp[e]))
        e = e[order]
        first = np.r_[True, comp[e][1:] != comp[e][:-1]]
        e = e[first]
        out_p.append(pi[e])
        out_g.append(gj[e])
        out_d.append(d[e])
    # Contested components: exact solve each (dense Hungarian, or sparse LAPJV if large).
    e = np.flatnonzero(~trivial)
    if len(e):
        e = e[np.argsort(comp[e], kind="stable")]
        bounds = np.flatnonzero(np.r_[True, comp[e][1:] != comp[e][:-1], True])
        for a, b in itertools.pairwise(bounds):
            sel = e[a:b]
            cid = comp[sel[0]]
            solve = _solve_sparse if min(size_p[cid], size_g[cid]) > DENSE_MAX else _solve_dense
            rp, rg, rd = solve(pi[sel], gj[sel], d[sel])
            out_p.append(rp)
            out_g.append(rg)
            out_d.append(rd)
    p = np.concatenate(out_p)
    g = np.concatenate(out_g)
    dist = np.concatenate(out_d)
    order = np.argsort(p, kind="stable")
    return p[order], g[order], dist[order]


def _solve_dense(
    pi: np.ndarray, gj: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact matching of one component with the Hungarian algorithm.

    Forbidden pairs get cost ``big = k * max_cost + 1`` with ``k = min(#pred, #gt)``.
    ``linear_sum_assignment`` assigns exactly ``k`` pairs, so a solution with ``m`` allowed pairs
    costs ``(k - m) * big + (sum of m allowed distances)``. Since any ``m + 1`` allowed distances
    sum to at most ``k * max_cost < big``, one more allowed pair always beats any saving in
    distance: the optimum has maximum cardinality first and minimum total distance second.
    Assignments to forbidden pairs are then dropped.
    """
    up, local_p = np.unique(pi, return_inverse=True)
    ug, local_g = np.unique(gj, return_inverse=True)
    k = min(len(up), len(ug))
    big = k * float(d.max(initial=0.0)) + 1.0
    cost = np.full((len(up), len(ug)), big)
    allowed = np.zeros(cost.shape, dtype=bool)
    cost[local_p, local_g] = d
    allowed[local_p, local_g] = True
    rows, cols = linear_sum_assignment(cost)
    ok = allowed[rows, cols]
    rows, cols = rows[ok], cols[ok]
    return up[rows], ug[cols], cost[rows, cols]


def _solve_sparse(
    pi: np.ndarray, gj: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact matching over the candidate edges only, by sparse LAPJV (no dense block).

    ``min_weight_full_bipartite_matching`` needs a full matching to exist, so each side gets
    one dummy per node of the other side: rows are P preds + G dummies, columns G gts + P
    dummies. Edges: pred i - gt j at ``d`` (the candidates), pred i - its own dummy and gt j -
    its own dummy at ``big`` (left unmatched), and dummy(gt j) - dummy(pred i) at 0 for every
    candidate (i, j) (absorbs the dummies of a matched pair). A perfect matching always exists
    and costs ``sum(d over M) + big * (P + G - 2 |M|)`` (+ a constant: every weight is shifted
    by 1 because the solver reads zero weights as missing edges).

    ``big = k * max(d) + 1`` (as in :func:`_solve_dense`) guarantees maximum ``|M|`` first, but
    LAPJVsp slows down steeply with such costs (100x on a 5k-point component). So ``big``
    starts small and grows until ``|M|`` equals the maximum cardinality from Hopcroft-Karp:
    a matching of maximum cardinality that minimises the cost above also minimises
    ``sum(d)`` among all maximum matchings, because their ``big`` terms are equal.
    """
    up, local_p = np.unique(pi, return_inverse=True)
    ug, local_g = np.unique(gj, return_inverse=True)
    n_p, n_g = len(up), len(ug)
    pattern = coo_matrix((np.ones(len(d)), (local_p, local_g)), shape=(n_p, n_g)).tocsr()
    target = int((maximum_bipartite_matching(pattern, perm_type="column") >= 0).sum())
    max_d = float(d.max(initial=0.0))
    bound = min(n_p, n_g) * max_d + 1.0
    ar_p, ar_g = np.arange(n_p), np.arange(n_g)
    rows = np.concatenate([local_p, ar_p, n_p + ar_g, n_p + local_g])
    cols = np.concatenate([local_g, n_g + ar_p, ar_g, n_g + local_p])
    big = 4.0 * max_d + 1.0
    while True:
        big = min(big, bound)
        w = np.concatenate([d, np.full(n_p + n_g, big), np.zeros(len(d))]) + 1.0
        graph = coo_matrix((w, (rows, cols)), shape=(n_p + n_g, n_g + n_p)).tocsr()
        r, c = min_weight_full_bipartite_matching(graph)
        real = (r < n_p) & (c < n_g)
        if real.sum() == target or big >= bound:
            break
        big *= 16.0
    r, c = r[real], c[real]
    # distances of the chosen edges, looked up by edge key
    keys = local_p.astype(np.int64) * n_g + local_g
    order = np.argsort(keys)
    pos = order[np.searchsorted(keys, r.astype(np.int64) * n_g + c, sorter=order)]
    return up[r], ug[c], d[pos]


def match_points(
    pred_zyx: np.ndarray,
    gt_zyx: np.ndarray,
    voxel_size_nm: VoxelSize,
    max_dist_nm: float = 1000.0,
) -> Matching:
    """Optimal one-to-one matching of predicted to true points within ``max_dist_nm``.

    Points are ``(N, 3)`` z, y, x in voxels (floats allowed); distances are Euclidean in nm
    after scaling by ``voxel_size_nm`` (z, y, x). A pair at exactly ``max_dist_nm`` counts.
    Maximises the number of matches, then minimises their total distance (see module notes).
    """
    if not np.isfinite(max_dist_nm) or max_dist_nm < 0:
        raise MicrosegError(f"max_dist_nm must be a finite number >= 0; found {max_dist_nm!r}")
    pred_nm = to_nm(pred_zyx, voxel_size_nm)
    gt_nm = to_nm(gt_zyx, voxel_size_nm)
    pi, gj, d = _candidate_pairs(pred_nm, gt_nm, float(max_dist_nm))
    p, g, dist = _solve_pairs(len(pred_nm), len(gt_nm), pi, gj, d)
    return Matching(p, g, dist, len(pred_nm), len(gt_nm))


def _points_from_df(df: pd.DataFrame, what: str) -> np.ndarray:
    """z, y, x voxel coordinates from a frame with columns x, y, z (clear error otherwise)."""
    missing = [c for c in ("x", "y", "z") if c not in df.columns]
    if missing:
        raise AnnotationError(
            f"{what} points need columns x, y, z (voxels); missing {missing}, "
            f"found columns {list(df.columns)}"
        )
    try:
        pts = df[["z", "y", "x"]].to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(f"{what} columns x, y, z must be numeric: {exc}") from exc
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        rows = list(df.index[bad][:5])
        raise AnnotationError(
            f"{what} points must have finite x, y, z; found {int(bad.sum())} row(s) with "
            f"NaN/inf (first index labels: {rows})"
        )
    return pts


def _scores_from_df(df: pd.DataFrame, score_col: str) -> np.ndarray:
    if score_col not in df.columns:
        raise AnnotationError(
            f"predictions need a score column {score_col!r}; found columns {list(df.columns)}"
        )
    scores = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(scores).all():
        raise AnnotationError(
            f"score column {score_col!r} must be finite numbers; found "
            f"{int((~np.isfinite(scores)).sum())} missing or non-numeric value(s)"
        )
    return scores


def evaluate_points(
    pred_df: pd.DataFrame,
    gt_df: pd.DataFrame,
    voxel_size_nm: VoxelSize,
    max_dist_nm: float = 1000.0,
    score_col: str | None = None,
) -> dict[str, float | int]:
    """Detection metrics of predicted vs annotated points (frames with x, y, z in voxels).

    Returns precision, recall, f1, tp, fp, fn, n_pred, n_gt and ``mean_distance_nm`` (NaN when
    nothing matched). With ``score_col``, every prediction is still counted (threshold first if
    you want a cut) and ``average_precision`` is added: the area under :func:`pr_curve`'s
    precision-recall steps (all-point interpolation, as in PASCAL VOC 2010+).
    """
    pred = _points_from_df(pred_df, "predicted")
    gt = _points_from_df(gt_df, "ground-truth")
    m = match_points(pred, gt, voxel_size_nm, max_dist_nm)
    out: dict[str, float | int] = {
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "tp": m.tp,
        "fp": m.fp,
        "fn": m.fn,
        "n_pred": m.n_pred,
        "n_gt": m.n_gt,
        "mean_distance_nm": m.mean_distance_nm,
    }
    if score_col is not None:
        if m.n_pred == 0:  # no curve to integrate: the empty-set convention of precision
            out["average_precision"] = 1.0 if m.n_gt == 0 else 0.0
        else:
            curve = pr_curve(pred_df, gt_df, voxel_size_nm, max_dist_nm, score_col=score_col)
            out["average_precision"] = average_precision(curve)
    return out


def _default_thresholds(scores: np.ndarray) -> np.ndarray:
    uniq = np.unique(scores)
    if len(uniq) <= MAX_DEFAULT_THRESHOLDS:
        return uniq
    return np.unique(np.quantile(scores, np.linspace(0.0, 1.0, MAX_DEFAULT_THRESHOLDS)))


def pr_curve(
    pred_df: pd.DataFrame,
    gt_df: pd.DataFrame,
    voxel_size_nm: VoxelSize,
    max_dist_nm: float = 1000.0,
    score_col: str = "score",
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Precision/recall/F1 when keeping predictions with ``score >= threshold``, per threshold.

    The matching is re-solved at every threshold (optimal matching is not nested in the
    threshold), reusing one KD-tree candidate search. Default thresholds: every distinct score,
    or ``MAX_DEFAULT_THRESHOLDS`` quantiles when there are more. Rows sorted by threshold.
    """
    pred = _points_from_df(pred_df, "predicted")
    gt = _points_from_df(gt_df, "ground-truth")
    scores = _scores_from_df(pred_df, score_col)
    if not np.isfinite(max_dist_nm) or max_dist_nm < 0:
        raise MicrosegError(f"max_dist_nm must be a finite number >= 0; found {max_dist_nm!r}")
    th = _default_thresholds(scores) if thresholds is None else np.asarray(thresholds, float)
    th = np.sort(np.atleast_1d(th))
    pi, gj, d = _candidate_pairs(
        to_nm(pred, voxel_size_nm), to_nm(gt, voxel_size_nm), float(max_dist_nm)
    )
    rows = []
    for t in th:
        kept = scores >= t
        e = kept[pi]
        p, _, _ = _solve_pairs(len(pred), len(gt), pi[e], gj[e], d[e])
        n_pred = int(kept.sum())
        tp = len(p)
        prec, rec, f1 = prf(tp, n_pred - tp, len(gt) - tp, empty=1.0)
        rows.append((float(t), prec, rec, f1, tp, n_pred - tp, len(gt) - tp))
    return pd.DataFrame(
        rows, columns=["threshold", "precision", "recall", "f1", "tp", "fp", "fn"]
    ).astype({"tp": int, "fp": int, "fn": int})


def average_precision(curve: pd.DataFrame) -> float:
    """Area under a :func:`pr_curve` table: all-point interpolated precision over recall.

    Precision at recall r is the best precision at any recall >= r; the curve starts at
    recall 0. An empty table has no area: NaN. With predictions but no ground truth every
    recall is 0, so AP is 0.
    """
    if curve.empty:
        return float("nan")
    rec = curve["recall"].to_numpy(float)
    prec = curve["precision"].to_numpy(float)
    order = np.argsort(rec, kind="stable")
    rec, prec = rec[order], prec[order]
    # best precision at recall >= r, evaluated right to left
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    widths = np.diff(np.r_[0.0, rec])
    return float(np.sum(widths * envelope))
