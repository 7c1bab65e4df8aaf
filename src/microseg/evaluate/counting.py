"""Counting and object sizes: per-object tables, count errors, size quantiles, a size filter.

A nuclei model is often used to *count* (objects per image) and to *size* (area distribution)
rather than to delineate, and a model with a good F1 can still be biased in both (e.g. it
merges clumps: fewer, larger objects). These functions measure that from label images:

- :func:`object_table`: one row per object (``id``, centroid ``y_px``/``x_px``, ``area_px``
  and, with a foreground probability map, ``score`` = the mean probability inside the
  object), from :func:`skimage.measure.regionprops_table` through
  :func:`microseg.io.exports.object_table`, so its columns are those of ``microseg predict``'s
  ``<stem>_objects.csv``;
- :func:`count_errors`: per image ``count_error = n_pred - n_true`` and
  ``count_rel_error = count_error / n_true``. With nothing to find the relative error is 0
  when nothing was found and undefined (NaN) otherwise: it is left out of the mean and counted
  in ``n_rel_undefined``, never turned into a number that would dominate the mean;
- :func:`counting_summary`: mean absolute count error (``count_mae``), mean absolute
  relative error (``count_mre``), the signed mean (``count_bias``: > 0 over-counts) and the
  quantiles of true and predicted object areas;
- :func:`area_percentile` and :func:`drop_large_objects`: the maximum-area outlier filter of
  the neuron-detector seed, whose threshold is a percentile (95th) of the training split's
  true object areas.

Pure functions of arrays and tables: nothing here loads a model or writes a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError, ShapeMismatchError

#: Quantiles of the object-area distributions in :func:`counting_summary`.
AREA_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def _labels(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise MicrosegError(f"expected an integer label image, found dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise MicrosegError(f"expected labels >= 0, found {lab.min()}")
    return lab


def object_table(labels: np.ndarray, prob: np.ndarray | None = None) -> pd.DataFrame:
    """One row per object of a 2D label image, sorted by id: ``id``, ``y_px``, ``x_px``,
    ``area_px`` and, when ``prob`` (foreground probability, same shape) is given, ``score``
    (its mean over the object's pixels)."""
    from microseg.io.exports import object_table as exported

    lab = _labels(labels)
    if lab.ndim != 2:
        raise ShapeMismatchError(f"expected a 2D (YX) label image, found shape {lab.shape}")
    if prob is not None and np.shape(prob) != lab.shape:
        raise ShapeMismatchError(
            f"probability map of shape {np.shape(prob)} differs from the labels' {lab.shape}"
        )
    table = exported(lab, intensity=prob).rename(columns={"mean_intensity": "score"})
    cols = ["id", "y_px", "x_px", "area_px"] + (["score"] if prob is not None else [])
    return table[cols]


def object_areas(labels: np.ndarray) -> np.ndarray:
    """Areas (pixels) of the objects of a label image, in order of id (``np.unique``: ids
    up to 2**32 cost no more than small ones)."""
    ids, areas = np.unique(_labels(labels), return_counts=True)
    return areas[ids != 0].astype(np.int64)


def count_errors(
    n_true: Sequence[int] | np.ndarray, n_pred: Sequence[int] | np.ndarray
) -> pd.DataFrame:
    """Per image ``count_error`` (``n_pred - n_true``) and ``count_rel_error`` (divided by
    ``n_true``; 0 when both are 0, NaN when only ``n_true`` is): see the module notes."""
    t = np.asarray(n_true, dtype=np.int64)
    p = np.asarray(n_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ShapeMismatchError(f"true and predicted counts differ in shape: {t.shape}, {p.shape}")
    if (t < 0).any() or (p < 0).any():
        raise MicrosegError("object counts must be >= 0")
    err = p - t
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(t > 0, err / np.maximum(t, 1), np.where(err == 0, 0.0, np.nan))
    return pd.DataFrame({"count_error": err, "count_rel_error": rel.astype(np.float64)})


def _quantiles(areas: np.ndarray, prefix: str, qs: Sequence[float]) -> dict[str, float]:
    values = np.quantile(areas, qs) if areas.size else np.full(len(qs), np.nan)
    return {f"{prefix}_p{round(100 * q):02d}": float(v) for q, v in zip(qs, values, strict=True)}


def counting_summary(
    n_true: Sequence[int] | np.ndarray,
    n_pred: Sequence[int] | np.ndarray,
    true_areas: np.ndarray,
    pred_areas: np.ndarray,
    quantiles: Sequence[float] = AREA_QUANTILES,
) -> dict[str, float]:
    """Dataset counting scores: ``count_mae``, ``count_mre``, ``count_bias``,
    ``n_rel_undefined``, object totals and ``true_area_pXX``/``pred_area_pXX`` quantiles
    (numpy's linear interpolation) of all true and predicted object areas."""
    errors = count_errors(n_true, n_pred)
    if errors.empty:
        raise MicrosegError("no images to summarise counts of")
    rel = errors["count_rel_error"].abs()
    true_areas, pred_areas = np.asarray(true_areas), np.asarray(pred_areas)
    return {
        "n_images": len(errors),
        "n_true_objects": int(np.sum(n_true)),
        "n_pred_objects": int(np.sum(n_pred)),
        "count_mae": float(errors["count_error"].abs().mean()),
        "count_mre": float(rel.mean()) if rel.notna().any() else float("nan"),
        "count_bias": float(errors["count_error"].mean()),
        "n_rel_undefined": int(rel.isna().sum()),
        **_quantiles(true_areas, "true_area", quantiles),
        **_quantiles(pred_areas, "pred_area", quantiles),
    }


def area_percentile(labels_list: Iterable[np.ndarray], q: float = 95) -> float:
    """The ``q``-th percentile of the areas of all objects of ``labels_list`` (e.g. the
    training split's true objects): the seed's choice of a maximum object area."""
    if not 0 <= q <= 100:
        raise MicrosegError(f"percentile must be in [0, 100], found {q}")
    areas = [object_areas(lab) for lab in labels_list]
    if not areas or not sum(a.size for a in areas):
        raise MicrosegError("no objects to take an area percentile of")
    return float(np.percentile(np.concatenate(areas), q))


def drop_large_objects(labels: np.ndarray, max_area: float | None) -> np.ndarray:
    """``labels`` without the objects larger than ``max_area`` pixels (set to background;
    the other ids unchanged); ``None`` returns ``labels`` as it is."""
    lab = _labels(labels)
    if max_area is None:
        return labels
    if not max_area > 0:
        raise MicrosegError(f"max_area must be > 0 pixels, found {max_area}")
    ids, inverse, areas = np.unique(lab, return_inverse=True, return_counts=True)
    big = (areas > max_area) & (ids != 0)
    if not big.any():
        return labels
    return np.where(big[inverse].reshape(lab.shape), 0, lab).astype(lab.dtype, copy=False)
