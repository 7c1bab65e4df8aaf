"""The sparse pixel contingency table of two label images, the basis of every instance score.

:func:`instance_overlap` counts every (GT label, predicted label) pixel pair of two label
images in one ``np.bincount`` over paired compact indices (no loop over instances or pairs);
background (0) takes index 0, so the result is the full contingency table, kept sparse. IoU of
a pair is ``inter / (area_gt + area_pred - inter)``. Matching, Rand/VOI and the error analysis
all read this one table (:mod:`microseg.evaluate.instances`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.segmentation import Confusion

#: Dense ``np.bincount`` over paired indices while ``(G+1)(P+1)`` stays below this (or below
#: four times the pixel count); beyond it, ``np.unique`` on the pair keys.
_DENSE_PAIRS = 1 << 22


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise MicrosegError(f"{name} must be an integer label image; found dtype {labels.dtype}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise MicrosegError(f"{name} must hold non-negative labels; found {labels.min()}")
    return labels


def _label_index(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, Callable]:
    """(label ids present, their areas, a map from label values to 1-based compact indices).

    ``flat`` holds the labels of some pixels (zeros are counted as background). Areas come
    from one ``np.bincount`` on the label values when the largest label is not far beyond the
    pixel count, else from ``np.unique`` (arbitrary ids such as random uint32).
    """
    empty = np.zeros(0, np.int64)
    if flat.size == 0:
        return empty, empty, lambda v: np.zeros(v.shape, np.intp)
    top = int(flat.max())
    if top == 0:
        return empty, empty, lambda v: np.zeros(v.shape, np.intp)
    if top <= 4 * flat.size + 1024:
        values = flat if flat.dtype.itemsize < 8 else flat.astype(np.intp)
        counts = np.bincount(values, minlength=top + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), counts[ids].astype(np.int64), lambda v: np.take(lut, v)
    values, counts = np.unique(flat, return_counts=True)
    if values[0] == 0:
        values, counts = values[1:], counts[1:]
    return (
        values.astype(np.int64),
        counts.astype(np.int64),
        lambda v: np.searchsorted(values, v).astype(np.intp) + 1,
    )


@dataclass(frozen=True)
class InstanceOverlap:
    """Sparse contingency table of a GT and a predicted label image.

    ``gt_ids``/``pred_ids`` are the label values present (sorted), ``gt_area``/``pred_area``
    their pixel counts. ``rows``, ``cols``, ``counts`` list every non-zero cell of the full
    ``(G + 1) x (P + 1)`` table, index 0 being background on either side (so row ``i >= 1`` is
    ``gt_ids[i - 1]``).
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    n_pixels: int

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @cached_property
    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(gt_index, pred_index, intersection, iou)`` of every overlapping instance pair.

        Indices are 0-based positions into ``gt_ids`` / ``pred_ids``.
        """
        keep = (self.rows > 0) & (self.cols > 0)
        gi, pi = self.rows[keep] - 1, self.cols[keep] - 1
        inter = self.counts[keep]
        iou = inter / (self.gt_area[gi] + self.pred_area[pi] - inter)
        return gi, pi, inter, iou

    def iou_matrix(self) -> np.ndarray:
        """Dense ``(n_gt, n_pred)`` IoU matrix (zeros where instances do not touch)."""
        gi, pi, _, iou = self.pairs
        out = np.zeros((self.n_gt, self.n_pred))
        out[gi, pi] = iou
        return out

    def intersection_matrix(self) -> np.ndarray:
        """Dense ``(n_gt, n_pred)`` matrix of overlapping pixel counts."""
        gi, pi, inter, _ = self.pairs
        out = np.zeros((self.n_gt, self.n_pred), np.int64)
        out[gi, pi] = inter
        return out

    def contingency(self) -> np.ndarray:
        """Dense ``(G + 1) x (P + 1)`` pixel contingency table, background included."""
        out = np.zeros((self.n_gt + 1, self.n_pred + 1), np.int64)
        out[self.rows, self.cols] = self.counts
        return out

    def foreground_confusion(self) -> Confusion:
        """Pixel TP/FP/FN/TN of predicted foreground (label > 0) against GT foreground."""
        gt_fg, pred_fg = int(self.gt_area.sum()), int(self.pred_area.sum())
        tp = int(self.counts[(self.rows > 0) & (self.cols > 0)].sum())
        tn = self.n_pixels - gt_fg - pred_fg + tp
        return Confusion(tp=tp, fp=pred_fg - tp, fn=gt_fg - tp, tn=tn)


def instance_overlap(gt: np.ndarray, pred: np.ndarray) -> InstanceOverlap:
    """Count pixel overlaps of every GT and predicted instance (any dimensionality)."""
    gt, pred = check_labels(gt, "ground truth"), check_labels(pred, "prediction")
    if gt.shape != pred.shape:
        raise ShapeMismatchError(
            f"ground truth and prediction must have one shape; found {gt.shape} and {pred.shape}"
        )
    g, p = gt.ravel(), pred.ravel()
    g_fg, p_fg = g != 0, p != 0
    both = g_fg & p_fg
    # areas from foreground pixels only: background is most of a typical image
    g_ids, g_area, g_index = _label_index(g[g_fg])
    p_ids, p_area, p_index = _label_index(p[p_fg])
    n_g, n_p = g_ids.size, p_ids.size
    # instance pairs: count only pixels in both foregrounds (one bincount on paired indices)
    key = (g_index(g[both]) - 1).astype(np.int64) * max(n_p, 1) + (p_index(p[both]) - 1)
    if n_g * n_p <= max(_DENSE_PAIRS, 4 * key.size):
        table = np.bincount(key, minlength=n_g * n_p)
        cells = np.flatnonzero(table)
        inter = table[cells]
    else:
        cells, inter = np.unique(key, return_counts=True)
    fg_rows, fg_cols = cells // max(n_p, 1) + 1, cells % max(n_p, 1) + 1
    # background row and column of the contingency table follow from the areas
    g_on_bg = g_area - np.bincount(fg_rows - 1, weights=inter, minlength=n_g).astype(np.int64)
    p_on_bg = p_area - np.bincount(fg_cols - 1, weights=inter, minlength=n_p).astype(np.int64)
    bg_bg = g.size - int(g_area.sum()) - int(p_area.sum()) + int(inter.sum())
    rows = np.concatenate([[0], np.arange(1, n_g + 1), np.zeros(n_p, np.int64), fg_rows])
    cols = np.concatenate([[0], np.zeros(n_g, np.int64), np.arange(1, n_p + 1), fg_cols])
    counts = np.concatenate([[bg_bg], g_on_bg, p_on_bg, inter]).astype(np.int64)
    keep = counts > 0
    rows, cols, counts = rows[keep], cols[keep], counts[keep]
    order = np.lexsort((cols, rows))
    return InstanceOverlap(
        gt_ids=g_ids,
        pred_ids=p_ids,
        gt_area=g_area,
        pred_area=p_area,
        rows=rows[order].astype(np.intp),
        cols=cols[order].astype(np.intp),
        counts=counts[order],
        n_pixels=int(g.size),
    )


def foreground_confusion(gt: np.ndarray, pred: np.ndarray) -> Confusion:
    """Pixel confusion of predicted foreground (label > 0) against GT foreground."""
    return instance_overlap(gt, pred).foreground_confusion()
