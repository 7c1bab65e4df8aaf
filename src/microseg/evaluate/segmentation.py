"""Pixel (voxel) overlap metrics for binary masks and threshold sweeps.

Metrics count true/false positives/negatives over every pixel (or those inside ``mask``):
Dice ``2TP / (2TP + FP + FN)`` (= pixel F1), IoU/Jaccard ``TP / (TP + FP + FN)``, precision
``TP / (TP + FP)``, recall ``TP / (TP + FN)``.

Empty sets, the same conventions as :mod:`microseg.evaluate.points`, so no metric turns NaN:
an empty prediction against an empty target is a perfect answer (Dice = IoU = P = R = 1).
Precision with nothing predicted is 1 only when there is nothing to find, else 0; recall with
an empty target is 1 only when nothing was predicted, else 0. (sklearn's ``zero_division``
would give 0 or a warning instead; our tests compare on non-degenerate inputs.)

Probabilities become masks by ``prob >= threshold`` everywhere in this package.

The classical spine baseline that used to live here (difference of Gaussians) is a model, so
it is in :mod:`microseg.models.classical.dog`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError, ShapeMismatchError

logger = logging.getLogger(__name__)


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "iuf":
        raise MicrosegError(f"{name} must be a binary mask (bool or 0/1); found dtype {a.dtype}")
    b = a != 0
    if a.size and not np.all(a[b] == 1):
        bad = np.unique(a[b & (a != 1)])[:5].tolist()
        raise MicrosegError(f"{name} must be a binary mask (bool or 0/1); found values {bad}")
    return b


def _same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ShapeMismatchError(
            f"{names[0]} and {names[1]} must have the same shape; found {a.shape} and {b.shape}"
        )


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of a binary prediction against a binary target, and the rates from them."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def dice(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    @property
    def iou(self) -> float:
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else 1.0

    @property
    def precision(self) -> float:
        n_pred = self.tp + self.fp
        return self.tp / n_pred if n_pred else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        n_gt = self.tp + self.fn
        return self.tp / n_gt if n_gt else (1.0 if self.fp == 0 else 0.0)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "dice": self.dice,
            "iou": self.iou,
            "precision": self.precision,
            "recall": self.recall,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


def confusion(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> Confusion:
    """TP, FP, FN, TN of binary ``pred`` against ``target`` (inside ``mask`` when given)."""
    pred, target = _binary(pred, "prediction"), _binary(target, "target")
    _same_shape(pred, target, ("prediction", "target"))
    if mask is not None:
        mask = _binary(mask, "mask")
        _same_shape(pred, mask, ("prediction", "mask"))
        pred, target = pred[mask], target[mask]
    n = pred.size
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(target))
    tp = int(np.count_nonzero(pred & target))
    return Confusion(tp, n_pred - tp, n_gt - tp, n - n_pred - n_gt + tp)


def dice(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Dice coefficient (pixel F1); 1.0 when both are empty."""
    return confusion(pred, target, mask).dice


def iou(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Intersection over union (Jaccard); 1.0 when both are empty."""
    return confusion(pred, target, mask).iou


def precision(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pixel precision; see the module notes for empty masks."""
    return confusion(pred, target, mask).precision


def recall(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pixel recall (sensitivity); see the module notes for empty masks."""
    return confusion(pred, target, mask).recall


def segmentation_metrics(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float | int]:
    """Dice, IoU, precision, recall and the four counts, as one flat dict (for metrics JSON)."""
    return confusion(pred, target, mask).as_dict()


def threshold_sweep(
    prob: np.ndarray,
    target: np.ndarray,
    thresholds: Iterable[float] | None = None,
    mask: np.ndarray | None = None,
) -> pd.DataFrame:
    """Dice, IoU, precision, recall of ``prob >= t`` for each threshold ``t``.

    One sort of the positive and of the negative scores, then a binary search per threshold,
    so hundreds of thresholds cost about as much as one. ``thresholds`` defaults to 0.05 ...
    0.95 in steps of 0.05. Columns: threshold, dice, iou, precision, recall, tp, fp, fn, tn.
    """
    prob = np.asarray(prob)
    target = _binary(target, "target")
    _same_shape(prob, target, ("probabilities", "target"))
    if mask is not None:
        mask = _binary(mask, "mask")
        _same_shape(prob, mask, ("probabilities", "mask"))
        prob, target = prob[mask], target[mask]
    if np.isnan(prob).any():
        raise MicrosegError("probabilities contain NaN")
    ts = np.arange(1, 20) / 20 if thresholds is None else np.asarray(list(thresholds), float)
    pos = np.sort(prob[target], axis=None)
    neg = np.sort(prob[~target], axis=None)
    # counts of scores >= t
    tp = pos.size - np.searchsorted(pos, ts, side="left")
    fp = neg.size - np.searchsorted(neg, ts, side="left")
    rows = []
    for t, a, b in zip(ts, tp, fp, strict=True):
        c = Confusion(int(a), int(b), int(pos.size - a), int(neg.size - b))
        rows.append({"threshold": float(t), **c.as_dict()})
    return pd.DataFrame(
        rows,
        columns=["threshold", "dice", "iou", "precision", "recall", "tp", "fp", "fn", "tn"],
    )
