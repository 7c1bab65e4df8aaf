"""Pixel ROC and PR curves of foreground probabilities, accumulated image by image.

Counts are binned on a fixed threshold grid, so a dataset of any size costs one pass and two
small arrays; on the grid the curves equal sklearn's ``roc_curve``/``precision_recall_curve``
(cross-checked in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError, ShapeMismatchError


@dataclass
class PixelCurveAccumulator:
    """Foreground ROC and PR curves of pixel probabilities, accumulated image by image.

    A pixel is predicted positive at threshold ``t`` when ``p >= t``. Counts of positives and
    negatives are kept per interval of the ``thresholds`` grid (default 0, 0.005, ..., 1), so
    the curves are exact at the grid points whatever the number of pixels; add a point at
    ``t = inf`` (nothing predicted) for the ROC origin.
    """

    thresholds: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, 201))
    pos: np.ndarray = field(init=False)
    neg: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size < 2:
            raise MicrosegError("curve thresholds must be a 1D array of at least two values")
        if np.any(np.diff(self.thresholds) <= 0):
            raise MicrosegError("curve thresholds must increase strictly")
        # index 0: below every threshold; index k + 1: thresholds[k] <= p < thresholds[k + 1]
        self.pos = np.zeros(self.thresholds.size + 1, np.int64)
        self.neg = np.zeros(self.thresholds.size + 1, np.int64)

    def update(self, prob: np.ndarray, target: np.ndarray) -> PixelCurveAccumulator:
        prob, target = np.asarray(prob, dtype=np.float64), np.asarray(target)
        if prob.shape != target.shape:
            raise ShapeMismatchError(
                f"probabilities and target must have one shape; found {prob.shape} and "
                f"{target.shape}"
            )
        if not np.all(np.isfinite(prob)):
            raise MicrosegError("probabilities must be finite")
        idx = np.searchsorted(self.thresholds, prob.ravel(), side="right")
        y = target.ravel() != 0
        n = self.thresholds.size + 1
        self.pos += np.bincount(idx[y], minlength=n)
        self.neg += np.bincount(idx[~y], minlength=n)
        return self

    def table(self) -> pd.DataFrame:
        """One row per threshold: threshold, tp, fp, fn, tn, precision, recall, tpr, fpr, f1.

        Precision with nothing predicted is 1 (sklearn's end point); recall and TPR with no
        positives are 0, FPR with no negatives 0.
        """
        tp = np.cumsum(self.pos[::-1])[::-1][1:]
        fp = np.cumsum(self.neg[::-1])[::-1][1:]
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        fn, tn = n_pos - tp, n_neg - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
            recall = tp / n_pos if n_pos else np.zeros(tp.size)
            fpr = fp / n_neg if n_neg else np.zeros(fp.size)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
        return pd.DataFrame(
            {
                "threshold": self.thresholds,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                "precision": precision,
                "recall": recall,
                "tpr": recall,
                "fpr": fpr,
                "f1": f1,
            }
        )

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoids through the grid points, (0,0) and (1,1))."""
        t = self.table()
        if not self.pos.sum() or not self.neg.sum():
            return math.nan
        fpr = np.concatenate([[0.0], t["fpr"].to_numpy()[::-1]])
        tpr = np.concatenate([[0.0], t["tpr"].to_numpy()[::-1]])
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Step-wise AP ``sum (R_k - R_{k-1}) P_k`` over decreasing thresholds (sklearn's)."""
        t = self.table()
        if not self.pos.sum():
            return math.nan
        r = np.concatenate([[0.0], t["recall"].to_numpy()[::-1]])
        p = t["precision"].to_numpy()[::-1]
        return float(np.sum(np.diff(r) * p))
