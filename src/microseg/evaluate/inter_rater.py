"""Agreement between raters' binary masks, and how well model uncertainty predicts disagreement.

From ``R >= 3`` raters' masks of one image:

- :func:`disagreement_map`: per-pixel *population* variance of the raters' 0/1 labels,
  ``(k/R)(1 - k/R)`` with ``k`` positive votes: 0 where all agree, ``2/9`` for 2-vs-1 of three,
  at most 1/4 (an even split);
- :func:`majority_vote`, :func:`agreement_fraction` (per pixel);
- :func:`fleiss_kappa` (chance-corrected agreement over pixels; any number of categories via
  :func:`fleiss_kappa_from_counts`) and :func:`pairwise_dice`.

:func:`compare_uncertainty_to_disagreement` then asks, per uncertainty map (entropy, mutual
information, ...), how well it ranks pixels by rater disagreement: Spearman's rho against the
disagreement map and the AUROC for telling pixels where raters disagree (disagreement > 0) from
unanimous ones. Spearman's rho is computed as Pearson's r of the average ranks, which is
what ``scipy.stats.spearmanr`` computes (the tests check that), ranking each map once for
both numbers. Most pixels of a microscopy volume are background that every rater and the
model agree on trivially; over the whole volume both numbers mostly measure "is this near
an object". Pass ``mask`` (e.g. :func:`near_foreground`: the union of rater masks dilated by a
few pixels) to ask the harder question: near structures, does uncertainty find where people
disagree?
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.stats import rankdata

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.segmentation import dice

logger = logging.getLogger(__name__)

#: ROC curves returned for plotting are thinned to at most this many points.
ROC_MAX_POINTS = 1000


def _as_masks(masks: Sequence[np.ndarray], min_raters: int = 3) -> list[np.ndarray]:
    masks = [np.asarray(m) for m in masks]
    if len(masks) < min_raters:
        raise MicrosegError(f"need at least {min_raters} raters' masks; found {len(masks)}")
    ref = masks[0].shape
    for i, m in enumerate(masks[1:], start=1):
        if m.shape != ref:
            raise ShapeMismatchError(
                f"rater {i} mask has shape {m.shape}; rater 0 has {ref} (all raters must match)"
            )
    out = []
    for i, m in enumerate(masks):
        if m.dtype != bool:
            b = m != 0
            if m.size and not np.all(m[b] == 1):
                raise MicrosegError(f"rater {i} mask must be binary (bool or 0/1)")
            m = b
        out.append(m)
    return out


def vote_counts(masks: Sequence[np.ndarray], min_raters: int = 3) -> tuple[np.ndarray, int]:
    """Per-pixel number of positive votes (uint8/uint16) and the number of raters ``R``.

    ``min_raters`` (3 by default: a majority needs an odd count) may be 2 for user files."""
    ms = _as_masks(masks, min_raters)
    dt = np.uint8 if len(ms) < 256 else np.uint16
    k = np.zeros(ms[0].shape, dt)
    for m in ms:
        k += m
    return k, len(ms)


def disagreement_map(masks: Sequence[np.ndarray], min_raters: int = 3) -> np.ndarray:
    """Population variance across raters of the 0/1 labels, ``k (R - k) / R^2`` (float64)."""
    k, r = vote_counts(masks, min_raters)
    k = k.astype(np.int64)
    return (k * (r - k)) / float(r * r)


def majority_vote(
    masks: Sequence[np.ndarray], tie: bool = False, min_raters: int = 3
) -> np.ndarray:
    """Pixels marked by more than half of the raters; an exact tie (even ``R``) gives ``tie``."""
    k, r = vote_counts(masks, min_raters)
    k = k.astype(np.int64)
    out = 2 * k > r
    if tie and r % 2 == 0:
        out |= 2 * k == r
    return out


def agreement_fraction(
    masks: Sequence[np.ndarray], kind: str = "majority", min_raters: int = 3
) -> np.ndarray:
    """Per-pixel agreement in [0, 1], 1 where the raters are unanimous.

    ``"majority"``: the fraction of raters who side with the majority, ``max(k, R - k) / R``
    (2/3 for 2-vs-1); ``"pairwise"``: the fraction of rater pairs that agree,
    ``(k(k-1) + (R-k)(R-k-1)) / (R(R-1))`` (1/3 for 2-vs-1; Fleiss' ``P_i``).
    """
    k, r = vote_counts(masks, min_raters)
    k = k.astype(np.int64)
    if kind == "majority":
        return np.maximum(k, r - k) / float(r)
    if kind == "pairwise":
        return (k * (k - 1) + (r - k) * (r - k - 1)) / float(r * (r - 1))
    raise MicrosegError(f"agreement kind must be 'majority' or 'pairwise'; found {kind!r}")


def fleiss_kappa_from_counts(table: np.ndarray) -> float:
    """Fleiss' kappa from an ``N subjects x K categories`` table of rating counts.

    Every row must sum to the same number of raters ``n >= 2``. ``kappa = (P - Pe) / (1 - Pe)``
    with ``P`` the mean pairwise agreement per subject and ``Pe`` the chance agreement from the
    category proportions (Fleiss 1971). NaN when ``Pe == 1`` (every rating in one category:
    kappa is undefined, though the raters trivially agree).
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise ShapeMismatchError(f"need an N x K table with K >= 2; found shape {t.shape}")
    n = t.sum(axis=1)
    if np.any(t < 0) or not np.all(n == n[0]) or n[0] < 2:
        raise MicrosegError("every subject needs the same number (>= 2) of non-negative ratings")
    n0 = n[0]
    p_i = ((t * (t - 1)).sum(axis=1)) / (n0 * (n0 - 1))
    p_j = t.sum(axis=0) / (t.shape[0] * n0)
    p_bar, p_e = p_i.mean(), np.square(p_j).sum()
    if np.isclose(p_e, 1.0, rtol=0, atol=1e-15):
        logger.warning("Fleiss' kappa undefined: every rating falls in one category")
        return float("nan")
    return float((p_bar - p_e) / (1.0 - p_e))


def fleiss_kappa(
    masks: Sequence[np.ndarray], mask: np.ndarray | None = None, min_raters: int = 3
) -> float:
    """Fleiss' kappa of binary masks, every pixel (inside ``mask``) one subject.

    Computed in closed form from the per-pixel vote counts, so no ``N x 2`` table is built.
    Over a whole volume it is dominated by the easy background; see the module notes.
    """
    k, r = vote_counts(masks, min_raters)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != k.shape:
            raise ShapeMismatchError(f"mask has shape {mask.shape}; the raters' is {k.shape}")
        k = k[mask]
    k = k.ravel().astype(np.float64)
    if k.size == 0:
        raise MicrosegError("Fleiss' kappa needs at least one pixel")
    p_bar = float(np.mean(k * (k - 1) + (r - k) * (r - k - 1))) / (r * (r - 1))
    p1 = float(k.sum()) / (k.size * r)
    p_e = p1 * p1 + (1 - p1) * (1 - p1)
    if p_e >= 1.0:
        logger.warning("Fleiss' kappa undefined: every rater marks every pixel the same way")
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def pairwise_dice(
    masks: Sequence[np.ndarray], names: Sequence[str] | None = None, min_raters: int = 3
) -> pd.DataFrame:
    """Dice between every pair of raters: columns rater_a, rater_b, dice."""
    ms = _as_masks(masks, min_raters)
    names = [f"rater{i}" for i in range(len(ms))] if names is None else list(names)
    if len(names) != len(ms):
        raise MicrosegError(f"{len(names)} rater names for {len(ms)} masks")
    rows = [
        {"rater_a": names[i], "rater_b": names[j], "dice": dice(ms[i], ms[j])}
        for i, j in itertools.combinations(range(len(ms)), 2)
    ]
    return pd.DataFrame(rows, columns=["rater_a", "rater_b", "dice"])


def near_foreground(
    masks: Sequence[np.ndarray], radius: int = 3, planar: bool = True
) -> np.ndarray:
    """Union of the raters' masks grown by ``radius`` pixels (a square/cube neighbourhood).

    ``planar`` (default) grows a 3D stack in YX only: with Z steps several times the pixel size,
    growing along Z by the same count would reach much farther in micrometres.
    """
    ms = _as_masks(masks, min_raters=1)
    union = np.zeros(ms[0].shape, bool)
    for m in ms:
        union |= m
    if radius <= 0:
        return union
    size = [2 * radius + 1] * union.ndim
    if planar and union.ndim == 3:
        size[0] = 1
    return ndimage.maximum_filter(union, size=size)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic; ties count one half.

    ``AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with average
    ranks for ties (``scipy.stats.rankdata``). NaN when a class is empty.
    """
    s = np.asarray(scores).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ShapeMismatchError(f"scores {s.shape} and labels {y.shape} differ in size")
    return _auroc_ranked(rankdata(s), y)


def _auroc_ranked(ranks: np.ndarray, y: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = float(ranks[y].sum(dtype=np.float64)) - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, max_points: int | None = ROC_MAX_POINTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score (``score >= t``), from (0, 0).

    The first point has threshold ``+inf``. With ``max_points`` the curve is thinned to about
    that many points spread evenly along it (the first and last kept), for plotting; the AUC
    should come from :func:`auroc`, not from the thinned curve.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    tpr = np.r_[0.0, tps / n_pos if n_pos else np.full(tps.shape, np.nan)]
    fpr = np.r_[0.0, fps / n_neg if n_neg else np.full(fps.shape, np.nan)]
    thr = np.r_[np.inf, s[last]]
    if max_points is not None and fpr.size > max_points:
        # even spacing along the curve's length, so steep and flat parts both keep detail
        seg = np.hypot(np.diff(np.nan_to_num(fpr)), np.diff(np.nan_to_num(tpr)))
        arc = np.r_[0.0, np.cumsum(seg)]
        keep = np.unique(
            np.r_[0, np.searchsorted(arc, np.linspace(0, arc[-1], max_points)), fpr.size - 1]
        )
        keep = keep[keep < fpr.size]
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return fpr, tpr, thr


def compare_uncertainty_to_disagreement(
    unc_maps: Mapping[str, np.ndarray],
    disagreement: np.ndarray,
    mask: np.ndarray | None = None,
    max_pixels: int | None = 2_000_000,
    seed: int = 0,
    roc_points: int | None = ROC_MAX_POINTS,
) -> pd.DataFrame:
    """How well each uncertainty map predicts rater disagreement, one row per map.

    Columns: map, n_pixels (scored), n_disagree (pixels with disagreement > 0), subsampled,
    spearman (rho against the disagreement map), auroc (Mann-Whitney, ties half). Pixels
    inside ``mask`` only (see the module notes for why a near-foreground mask matters); when
    more than ``max_pixels`` remain, every map is scored on the same seeded random subset.
    No p-values: neighbouring pixels are far from independent, so they would mean nothing.

    ``df.attrs["roc_curves"]`` maps each map's name to ``(fpr, tpr, auroc)`` (thinned to about
    ``roc_points`` points) for :func:`microseg.report.figures.roc_figure`.
    """
    d = np.asarray(disagreement, dtype=np.float64)
    sel = None
    if mask is not None:
        sel = np.asarray(mask, dtype=bool)
        if sel.shape != d.shape:
            raise ShapeMismatchError(f"mask has shape {sel.shape}; disagreement has {d.shape}")
    for name, u in unc_maps.items():
        if np.shape(u) != d.shape:
            raise ShapeMismatchError(
                f"uncertainty map {name!r} has shape {np.shape(u)}; disagreement has {d.shape}"
            )
    flat_idx = np.flatnonzero(sel) if sel is not None else None
    n_total = d.size if flat_idx is None else flat_idx.size
    subsampled = max_pixels is not None and n_total > max_pixels
    if subsampled:
        pick = np.sort(np.random.default_rng(seed).choice(n_total, int(max_pixels), replace=False))
        flat_idx = pick if flat_idx is None else flat_idx[pick]
    dd = d.ravel() if flat_idx is None else d.ravel()[flat_idx]
    y = dd > 0
    d_ranks = rankdata(dd)
    rows, curves = [], {}
    for name, u in unc_maps.items():
        uu = np.asarray(u).ravel()
        uu = uu if flat_idx is None else uu[flat_idx]
        uu = uu.astype(np.float64, copy=False)
        u_ranks = rankdata(uu)
        a = _auroc_ranked(u_ranks, y)
        # Spearman's rho is Pearson's r of the ranks; spearmanr would rank both again.
        rho = (
            float(np.corrcoef(u_ranks, d_ranks)[0, 1])
            if dd.size > 1 and np.ptp(dd) > 0 and np.ptp(uu) > 0
            else float("nan")
        )
        fpr, tpr, _ = roc_curve(uu, y, roc_points)
        curves[name] = (fpr, tpr, a)
        rows.append(
            {
                "map": name,
                "n_pixels": int(dd.size),
                "n_disagree": int(y.sum()),
                "subsampled": bool(subsampled),
                "spearman": rho,
                "auroc": a,
            }
        )
    df = pd.DataFrame(
        rows, columns=["map", "n_pixels", "n_disagree", "subsampled", "spearman", "auroc"]
    )
    df.attrs["roc_curves"] = curves
    return df
