"""Instance segmentation metrics of label images: matching, F1/AP per IoU threshold, Rand, VOI.

All of them read one sparse pixel contingency table (:mod:`microseg.evaluate.overlap`); pixel
ROC/PR curves of probabilities come from :mod:`microseg.evaluate.pixel_curves`.

Matching (:func:`match_instances`)
    One-to-one, on pairs with ``IoU >= threshold`` (the ``>=`` of pycocotools' COCOeval and
    StarDist's ``matching``, so TP counts agree with both). Among all such matchings we take one
    with the most pairs and, among those, the largest total IoU: the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) on weights ``1 + IoU / (2 n)``, which puts
    cardinality first exactly as StarDist does. It runs only where it is needed: for
    ``threshold > 0.5`` a GT can overlap at most one prediction with IoU above the threshold
    (two disjoint predictions cannot each cover more than half of the union with it), and vice
    versa, so the candidate pairs already *are* the matching; at exactly 0.5 only exact ties
    (IoU == 0.5 twice) can conflict; below 0.5 conflicts are common. So candidate pairs are
    split into connected components and only components with a conflict go to the solver.
    Greedy matching (COCOeval's, by score) gives the same count wherever there is no conflict;
    the optimum never gives fewer.

Scores per threshold ``t`` (keys suffixed with :func:`threshold_key`, e.g. ``f1_50``)
    ``tp``, ``fp`` (unmatched predictions), ``fn`` (unmatched GT), ``precision``, ``recall``,
    ``f1``, ``dsb_ap`` = ``TP / (TP + FP + FN)`` (what the Data Science Bowl 2018 called
    "average precision" and StarDist calls "accuracy"), ``mean_iou`` of matched pairs and
    ``pq`` (panoptic quality: summed matched IoU / (TP + FP/2 + FN/2)). ``dsb_ap`` without a
    suffix is the Kaggle DSB 2018 score of one image: ``dsb_ap`` averaged over 0.5:0.05:0.95
    (Kaggle counted a hit at IoU strictly above the threshold; the two differ only on exact
    ties such as a 2 x 2 nucleus predicted as one 2 x 1 half).
    Empty conventions as in :mod:`microseg.evaluate.segmentation`: nothing to find and nothing
    found scores 1; precision with nothing predicted is 0 when something was to be found.

Dataset aggregates (:func:`summarize`)
    micro: precision/recall/F1/dsb_ap from TP, FP, FN summed over images (un-prefixed keys,
    e.g. ``f1_50``); macro: the mean of the per-image values (``macro_`` prefix). Pixel Dice
    and foreground IoU micro from summed pixel counts (``dice``, ``fg_iou``) and macro.
    Adapted Rand error and variation of information are means over images.

Segmentation-level scores reuse scikit-image: :func:`skimage.metrics.adapted_rand_error`
(GT background ignored) and :func:`skimage.metrics.variation_of_information` (bits; split =
H(pred | GT), merge = H(GT | pred)); tests cross-check both against formulas on our
contingency table.
Pure functions of arrays and tables: nothing here trains, loads a model or logs a run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_array
from scipy.sparse.csgraph import connected_components
from skimage.metrics import adapted_rand_error, variation_of_information

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.calibration import CalibrationAccumulator
from microseg.evaluate.overlap import InstanceOverlap, check_labels, instance_overlap
from microseg.evaluate.overlap import foreground_confusion as foreground_confusion  # re-export
from microseg.evaluate.pixel_curves import PixelCurveAccumulator
from microseg.evaluate.rates import prf
from microseg.evaluate.segmentation import Confusion

logger = logging.getLogger(__name__)

#: IoU thresholds reported by default (F1 at 0.5, 0.7 and 0.9).
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.9)
#: The Kaggle DSB 2018 thresholds, 0.5:0.05:0.95, averaged into ``dsb_ap``.
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
#: Per-threshold score names (suffixed ``_<key>``) in :func:`image_scores` rows.
PER_THRESHOLD = ("tp", "fp", "fn", "precision", "recall", "f1", "dsb_ap", "mean_iou", "pq")

#: Conflicting matchings are solved as one dense Hungarian block up to this many cells.
_DENSE_BLOCK = 1 << 16


def threshold_key(threshold: float) -> str:
    """Metric-name suffix of an IoU threshold: ``'50'`` for 0.5, ``'62.5'`` for 0.625.

    Names stay within MLflow's allowed characters (no ``@``).
    """
    return f"{round(float(threshold) * 100, 6):g}"


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    ts = tuple(float(t) for t in thresholds)
    if not ts or any(not (0.0 < t <= 1.0) for t in ts):
        raise MicrosegError(f"IoU thresholds must lie in (0, 1]; found {ts}")
    return ts


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of GT and predicted instances at one IoU threshold.

    ``gt_index``/``pred_index`` are positions into the overlap's ``gt_ids``/``pred_ids``,
    sorted by GT; ``iou`` the IoU of each matched pair.
    """

    threshold: float
    n_gt: int
    n_pred: int
    gt_index: np.ndarray
    pred_index: np.ndarray
    iou: np.ndarray

    @property
    def tp(self) -> int:
        return int(self.gt_index.size)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_gt - self.tp

    @property
    def precision(self) -> float:
        return prf(self.tp, self.fp, self.fn, empty=1.0).precision

    @property
    def recall(self) -> float:
        return prf(self.tp, self.fp, self.fn, empty=1.0).recall

    @property
    def f1(self) -> float:
        return prf(self.tp, self.fp, self.fn, empty=1.0).f1

    @property
    def dsb_ap(self) -> float:
        return _dsb_ap(self.tp, self.fp, self.fn)

    @property
    def mean_iou(self) -> float:
        """Mean IoU of matched pairs (1 when both sides are empty, 0 with no match)."""
        if self.tp:
            return float(self.iou.mean())
        return 1.0 if self.n_gt == 0 and self.n_pred == 0 else 0.0

    @property
    def pq(self) -> float:
        """Panoptic quality: summed matched IoU / (TP + FP/2 + FN/2)."""
        d = self.tp + 0.5 * (self.fp + self.fn)
        return float(self.iou.sum() / d) if d else 1.0

    def unmatched_gt(self) -> np.ndarray:
        """Positions (into ``gt_ids``) of GT instances left unmatched (misses)."""
        return np.setdiff1d(np.arange(self.n_gt), self.gt_index)

    def unmatched_pred(self) -> np.ndarray:
        """Positions (into ``pred_ids``) of predictions left unmatched (false positives)."""
        return np.setdiff1d(np.arange(self.n_pred), self.pred_index)

    def scores(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in PER_THRESHOLD}


def _dsb_ap(tp: int, fp: int, fn: int) -> float:
    d = tp + fp + fn
    return tp / d if d else 1.0


def _assign(sel: np.ndarray, gi: np.ndarray, pi: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Candidate pairs ``sel`` chosen by one Hungarian solve on their dense block.

    Weights ``1 + IoU / (2 n)`` (``n`` the smaller side): IoUs of one matching sum to at most
    ``n``, so one more pair always outweighs any IoU gain, and ties in count go to the larger
    IoU sum. Blocks that fall apart into components are solved as well jointly as apart.
    """
    rows, r_inv = np.unique(gi[sel], return_inverse=True)
    cols, c_inv = np.unique(pi[sel], return_inverse=True)
    n = min(rows.size, cols.size)
    weight = np.zeros((rows.size, cols.size))
    weight[r_inv, c_inv] = 1.0 + iou[sel] / (2 * n)
    r, k = linear_sum_assignment(weight, maximize=True)
    lookup = np.full((rows.size, cols.size), -1, np.intp)
    lookup[r_inv, c_inv] = sel
    chosen = lookup[r, k]
    return chosen[chosen >= 0]


def _solve_conflicts(
    gi: np.ndarray, pi: np.ndarray, iou: np.ndarray, n_gt: int, n_pred: int
) -> np.ndarray:
    """Boolean mask over candidate pairs: the max-cardinality, max-IoU one-to-one subset.

    Small problems (the candidates' rows x columns up to :data:`_DENSE_BLOCK` cells) are one
    dense solve; large ones are split into connected components of the candidate graph, and
    only the components with a conflict are solved, one by one.
    """
    keep = np.zeros(gi.size, bool)
    if np.unique(gi).size * np.unique(pi).size <= _DENSE_BLOCK:
        keep[_assign(np.arange(gi.size), gi, pi, iou)] = True
        return keep
    graph = coo_matrix(
        (np.ones(gi.size), (gi, n_gt + pi)), shape=(n_gt + n_pred, n_gt + n_pred)
    ).tocsr()
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[gi]
    row_deg = np.bincount(gi, minlength=n_gt)
    col_deg = np.bincount(pi, minlength=n_pred)
    conflicted = np.unique(pair_comp[(row_deg[gi] > 1) | (col_deg[pi] > 1)])
    keep[~np.isin(pair_comp, conflicted)] = True
    order = np.argsort(pair_comp, kind="stable")
    starts = np.searchsorted(pair_comp[order], conflicted, side="left")
    ends = np.searchsorted(pair_comp[order], conflicted, side="right")
    for lo, hi in zip(starts, ends, strict=True):
        keep[_assign(order[lo:hi], gi, pi, iou)] = True
    return keep


def match_instances(overlap: InstanceOverlap, threshold: float = 0.5) -> Matching:
    """Optimal one-to-one matching at ``IoU >= threshold`` (see the module notes)."""
    (threshold,) = _check_thresholds([threshold])
    gi, pi, _, iou = overlap.pairs
    # COCOeval's guard: a threshold of 1 still matches identical masks despite rounding
    cand = iou >= min(threshold, 1 - 1e-10)
    gi, pi, iou = gi[cand], pi[cand], iou[cand]
    unique = (
        np.bincount(gi, minlength=overlap.n_gt).max(initial=0) <= 1
        and np.bincount(pi, minlength=overlap.n_pred).max(initial=0) <= 1
    )
    if not unique:
        keep = _solve_conflicts(gi, pi, iou, overlap.n_gt, overlap.n_pred)
        gi, pi, iou = gi[keep], pi[keep], iou[keep]
    order = np.argsort(gi, kind="stable")
    return Matching(threshold, overlap.n_gt, overlap.n_pred, gi[order], pi[order], iou[order])


def rand_voi(
    gt: np.ndarray, pred: np.ndarray, overlap: InstanceOverlap | None = None
) -> dict[str, float]:
    """Adapted Rand error (+ its precision and recall) and VOI split/merge of two label images.

    scikit-image's :func:`~skimage.metrics.adapted_rand_error` (GT background ignored) and
    :func:`~skimage.metrics.variation_of_information` compute the scores, fed with our sparse
    contingency table (``overlap``, computed when not given) instead of building their own,
    which is where they spend most of their time. With no GT foreground the Rand error is
    undefined: 0 when nothing is predicted either, NaN otherwise.
    """
    gt, pred = check_labels(gt, "ground truth"), check_labels(pred, "prediction")
    ov = instance_overlap(gt, pred) if overlap is None else overlap
    if gt.shape != pred.shape or ov.n_pixels != gt.size:
        raise ShapeMismatchError(f"shapes differ: {gt.shape} and {pred.shape}")
    shape = (ov.n_gt + 1, ov.n_pred + 1)
    if ov.n_gt == 0:
        are = (0.0, 1.0, 1.0) if ov.n_pred == 0 else (math.nan,) * 3
    else:
        fg = ov.rows > 0  # GT background ignored
        table = csr_array((ov.counts[fg].astype(np.float64), (ov.rows[fg], ov.cols[fg])), shape)
        are = adapted_rand_error(table=table)
    if ov.n_pixels:
        joint = csr_array((ov.counts / ov.n_pixels, (ov.rows, ov.cols)), shape)
        split, merge = variation_of_information(gt, pred, table=joint)
    else:
        split = merge = 0.0
    return {
        "are": float(are[0]),
        "are_precision": float(are[1]),
        "are_recall": float(are[2]),
        "voi_split": float(split),
        "voi_merge": float(merge),
        "voi": float(split + merge),
    }


def image_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    dsb_thresholds: Sequence[float] = DSB_THRESHOLDS,
    with_rand: bool = True,
) -> dict[str, float | int]:
    """All per-image instance and pixel scores of one GT/prediction pair (one table row).

    Keys: ``n_gt``, ``n_pred``; for each threshold the :data:`PER_THRESHOLD` names suffixed
    ``_<threshold_key>``; ``dsb_ap`` (mean ``dsb_ap`` over ``dsb_thresholds``); pixel counts
    ``px_tp``, ``px_fp``, ``px_fn``, ``px_tn`` with ``dice`` and ``fg_iou``; with
    ``with_rand`` the keys of :func:`rand_voi`.
    """
    thresholds = _check_thresholds(thresholds)
    ov = instance_overlap(gt, pred)
    row: dict[str, float | int] = {"n_gt": ov.n_gt, "n_pred": ov.n_pred}
    for t in thresholds:
        k = threshold_key(t)
        row.update({f"{name}_{k}": v for name, v in match_instances(ov, t).scores().items()})
    if dsb_thresholds:
        row["dsb_ap"] = float(
            np.mean([match_instances(ov, t).dsb_ap for t in _check_thresholds(dsb_thresholds)])
        )
    c = ov.foreground_confusion()
    row.update({"px_tp": c.tp, "px_fp": c.fp, "px_fn": c.fn, "px_tn": c.tn})
    row.update({"dice": c.dice, "fg_iou": c.iou})
    if with_rand:
        row.update(rand_voi(gt, pred, ov))
    return row


def validation_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """What training validates on per image: instance F1 at IoU 0.5 (one-to-one matching)
    and pixel foreground Dice, named as the training loops log them."""
    row = image_scores(gt, pred, (0.5,), dsb_thresholds=(), with_rand=False)
    return {"val_f1_50": float(row["f1_50"]), "val_dice": float(row["dice"])}


def summarize(
    per_image: pd.DataFrame, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """Dataset scores from a per-image table (:func:`image_scores` rows); see the module notes.

    Micro scores carry plain names (``f1_50``, ``precision_50``, ``dice``), per-image means
    the ``macro_`` prefix (``macro_f1_50``, ``macro_dice``); ``dsb_ap``, ``are`` and ``voi``
    are means over images (NaN rows skipped), ``n_images``/``n_gt``/``n_pred`` counts.
    """
    thresholds = _check_thresholds(thresholds)
    out: dict[str, float] = {"n_images": len(per_image)}
    if per_image.empty:
        return out
    for col in ("n_gt", "n_pred"):
        if col in per_image:
            out[col] = int(per_image[col].sum())
    for t in thresholds:
        k = threshold_key(t)
        need = [f"{n}_{k}" for n in ("tp", "fp", "fn")]
        if not set(need) <= set(per_image.columns):
            raise MicrosegError(f"per-image table lacks {need} for threshold {t}")
        tp, fp, fn = (int(per_image[c].sum()) for c in need)
        rates = prf(tp, fp, fn, empty=1.0)
        out.update(
            {
                f"precision_{k}": rates.precision,
                f"recall_{k}": rates.recall,
                f"f1_{k}": rates.f1,
                f"dsb_ap_{k}": _dsb_ap(tp, fp, fn),
            }
        )
        for name in ("precision", "recall", "f1", "dsb_ap", "mean_iou", "pq"):
            col = f"{name}_{k}"
            if col in per_image:
                out[f"macro_{col}"] = float(per_image[col].mean())
    if {"px_tp", "px_fp", "px_fn", "px_tn"} <= set(per_image.columns):
        c = Confusion(*(int(per_image[f"px_{n}"].sum()) for n in ("tp", "fp", "fn", "tn")))
        out.update({"dice": c.dice, "fg_iou": c.iou})
    for col in ("dice", "fg_iou"):
        if col in per_image:
            out[f"macro_{col}"] = float(per_image[col].mean())
    for col in ("dsb_ap", "are", "are_precision", "are_recall", "voi_split", "voi_merge", "voi"):
        if col in per_image:
            out[col] = float(per_image[col].mean(skipna=True))
    return out


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class InstanceSample:
    """One evaluated image: GT and predicted label images, optional scores and probabilities.

    ``scores`` gives each predicted label value a confidence (for COCO AP; absent: 1 for all);
    ``prob`` is the foreground probability map (for pixel ROC/PR curves and calibration).
    """

    image_id: str
    gt: np.ndarray
    pred: np.ndarray
    scores: Mapping[int, float] | None = None
    prob: np.ndarray | None = None


@dataclass
class InstanceEvaluation:
    """Per-image table, dataset summary and (when probabilities were given) pixel curves."""

    per_image: pd.DataFrame
    summary: dict[str, float]
    curves: pd.DataFrame | None = None
    reliability: pd.DataFrame | None = None


def evaluate_instances(
    samples: Iterable[InstanceSample],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    dsb_thresholds: Sequence[float] = DSB_THRESHOLDS,
    curve_thresholds: np.ndarray | None = None,
    calibration_bins: int = 15,
    with_rand: bool = True,
) -> InstanceEvaluation:
    """Score a dataset in one pass: per-image rows, micro/macro summary, pixel curves.

    When samples carry ``prob``, the summary adds ``auroc``, ``pixel_ap`` (average precision
    of foreground pixels), ``ece`` and ``brier``; ``curves`` is the
    :meth:`PixelCurveAccumulator.table` and ``reliability`` the calibration table.
    """
    thresholds = _check_thresholds(thresholds)
    rows = []
    curves = PixelCurveAccumulator(
        np.linspace(0.0, 1.0, 201) if curve_thresholds is None else curve_thresholds
    )
    calib = CalibrationAccumulator.uniform(calibration_bins)
    n_prob = 0
    for s in samples:
        row = image_scores(
            s.gt, s.pred, thresholds, dsb_thresholds=dsb_thresholds, with_rand=with_rand
        )
        rows.append({"image_id": str(s.image_id), **row})
        if s.prob is not None:
            fg = np.asarray(s.gt) != 0
            curves.update(s.prob, fg)
            calib.update(s.prob, fg)
            n_prob += 1
    per_image = pd.DataFrame(rows)
    if per_image.empty:
        raise MicrosegError("no samples to evaluate")
    if per_image["image_id"].duplicated().any():
        dup = per_image.loc[per_image["image_id"].duplicated(), "image_id"].tolist()[:5]
        raise MicrosegError(f"duplicate image ids {dup}")
    summary = summarize(per_image, thresholds)
    table = reliability = None
    if n_prob:
        if n_prob < len(per_image):
            logger.warning("only %d of %d samples carry probabilities", n_prob, len(per_image))
        table = curves.table()
        reliability = calib.table()
        summary.update(
            {
                "auroc": curves.auroc(),
                "pixel_ap": curves.average_precision(),
                "ece": calib.ece(),
                "brier": calib.brier(),
            }
        )
    logger.info(
        "instances: %d images, F1@%s %.4f, Dice %.4f",
        len(per_image),
        thresholds[0],
        summary[f"f1_{threshold_key(thresholds[0])}"],
        summary.get("dice", math.nan),
    )
    return InstanceEvaluation(per_image, summary, table, reliability)
