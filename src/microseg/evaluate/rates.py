"""Precision, recall and F1 from true-positive, false-positive and false-negative counts.

One function for every detection score in the package (points, instances, fusion, batch
evaluation, post-processing search), so the formulas and the empty-set rule live in one place:

* ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
  ``F1 = 2 TP / (2 TP + FP + FN)`` (equal to the harmonic mean of P and R whenever both exist).
* **Empty sets** have no ratio, so the value is a convention that each caller states with the
  keyword ``empty``: the score when there was nothing to find and nothing was found. Most of
  the package uses ``empty=1.0`` (a perfect answer, see :class:`microseg.evaluate.points.
  Matching`); the post-processing search uses ``empty=0.0`` so that an empty validation set
  never looks like a good setting. Precision with no predictions is ``empty`` only when there
  was nothing to find, else 0; recall with no ground truth is ``empty`` only when nothing was
  predicted, else 0. So every number is defined and none turns NaN.
"""

from __future__ import annotations

from typing import NamedTuple


class Rates(NamedTuple):
    """Precision, recall and F1; unpacks as a tuple, ``._asdict()`` gives the three by name."""

    precision: float
    recall: float
    f1: float


def prf(tp: int, fp: int, fn: int, *, empty: float) -> Rates:
    """:class:`Rates` from counts; ``empty`` is the score when ``TP = FP = FN = 0``."""
    precision = tp / (tp + fp) if tp + fp else (empty if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (empty if fp == 0 else 0.0)
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else empty
    return Rates(float(precision), float(recall), float(f1))


def prf_counts(tp: int, fp: int, fn: int, *, empty: float) -> dict[str, float | int]:
    """``precision``, ``recall``, ``f1`` (see :func:`prf`) and the counts, as one mapping."""
    return {**prf(tp, fp, fn, empty=empty)._asdict(), "tp": int(tp), "fp": int(fp), "fn": int(fn)}
