"""The classical spine baseline: difference of Gaussians on the percentile-normalised stack,
thresholded, small objects removed (:func:`dog_baseline`), and its grid search by Dice
(:func:`tune_dog`); it gives the learnt spine models a floor to beat.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import difference_of_gaussians

from microseg.data.transforms import normalise_percentiles
from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.segmentation import _binary, _same_shape, confusion

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- DoG baseline

Sigma = float | Sequence[float]


def _sigmas(sigma: Sigma, ndim: int, name: str) -> tuple[float, ...]:
    """Scalar: in-plane (YX) sigma, 0 along Z for a 3D stack; sequence: one per axis."""
    if np.isscalar(sigma):
        s = float(sigma)  # type: ignore[arg-type]
        out = (0.0,) * (ndim - 2) + (s, s) if ndim >= 2 else (s,)
    else:
        out = tuple(float(v) for v in sigma)  # type: ignore[union-attr]
        if len(out) != ndim:
            raise ShapeMismatchError(
                f"{name} needs one sigma per axis ({ndim}) or a scalar; found {sigma!r}"
            )
    if any(v < 0 for v in out):
        raise MicrosegError(f"{name} must be >= 0; found {sigma!r}")
    return out


def dog_response(
    stack: np.ndarray,
    sigma_small: Sigma,
    sigma_large: Sigma,
    percentiles: tuple[float, float] = (1.0, 99.8),
) -> np.ndarray:
    """Difference of Gaussians of the percentile-normalised stack (float32).

    A scalar sigma is an in-plane sigma in pixels applied plane by plane (Z sigma 0), which
    suits stacks whose Z step is several times the pixel size; a sequence gives one sigma per
    axis (z, y, x) for a true anisotropic 3D filter.
    """
    x = normalise_percentiles(stack, percentiles)
    lo = _sigmas(sigma_small, x.ndim, "sigma_small")
    hi = _sigmas(sigma_large, x.ndim, "sigma_large")
    if any(b < a for a, b in zip(lo, hi, strict=True)) or lo == hi:
        raise MicrosegError(
            f"sigma_large must be >= sigma_small on every axis and larger on one; "
            f"found {sigma_small!r} and {sigma_large!r}"
        )
    return difference_of_gaussians(x, lo, hi).astype(np.float32, copy=False)


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, connectivity)


def remove_small(mask: np.ndarray, min_size: int, connectivity: int = 1) -> np.ndarray:
    """Drop connected components smaller than ``min_size`` pixels (face-connected by default)."""
    mask = _binary(mask, "mask")
    if min_size <= 1:
        return mask.copy()
    labels, n = ndimage.label(mask, _structure(mask.ndim, connectivity))
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def dog_baseline(
    stack: np.ndarray,
    sigma_small: Sigma,
    sigma_large: Sigma,
    threshold: float,
    min_size: int,
    *,
    percentiles: tuple[float, float] = (1.0, 99.8),
    connectivity: int = 1,
) -> np.ndarray:
    """Classical spine mask: ``DoG(normalised stack) >= threshold`` without small objects.

    ``threshold`` is in units of the normalised intensity (1 = the 1st-to-99.8th percentile
    range); ``min_size`` in voxels. See :func:`dog_response` for the sigmas.
    """
    resp = dog_response(stack, sigma_small, sigma_large, percentiles)
    return remove_small(resp >= threshold, min_size, connectivity)


DEFAULT_GRID: dict[str, list] = {
    "sigma_small": [1.0, 1.5, 2.0],
    "sigma_large": [4.0, 6.0, 8.0],
    "threshold": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3],
    "min_size": [1, 10, 30, 100],
}


def _plain(v: object) -> object:
    """numpy scalars (and tuples of them) as plain Python numbers, for YAML/JSON params."""
    if isinstance(v, tuple | list):
        return tuple(float(x) for x in v)
    return float(v)  # type: ignore[arg-type]


def tune_dog(
    stack: np.ndarray,
    spine_mask: np.ndarray,
    grid: Mapping[str, Sequence] | None = None,
    *,
    percentiles: tuple[float, float] = (1.0, 99.8),
    connectivity: int = 1,
    eval_mask: np.ndarray | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Grid search of :func:`dog_baseline` parameters by Dice against ``spine_mask``.

    ``grid`` maps sigma_small, sigma_large, threshold and min_size to candidate lists
    (:data:`DEFAULT_GRID` fills missing keys). Work is shared: one DoG per sigma pair, one
    labelling per threshold, and every ``min_size`` is a lookup in the component sizes, so a
    combination costs a few tens of ms on a 32x256x256 stack. Pairs with
    ``sigma_large <= sigma_small`` are skipped. Returns the best parameters (first in grid order
    on ties) and the table of every combination (dice, iou, precision, recall), best first.
    """
    spine_mask = _binary(spine_mask, "spine mask")
    stack = np.asarray(stack)
    _same_shape(stack, spine_mask, ("stack", "spine mask"))
    g = {**DEFAULT_GRID, **(grid or {})}
    unknown = set(g) - set(DEFAULT_GRID)
    if unknown:
        raise MicrosegError(f"unknown DoG grid key(s) {sorted(unknown)}; use {list(DEFAULT_GRID)}")
    if eval_mask is not None:
        eval_mask = _binary(eval_mask, "eval mask")
        _same_shape(stack, eval_mask, ("stack", "eval mask"))
    structure = _structure(stack.ndim, connectivity)
    rows = []
    for s_small, s_large in itertools.product(g["sigma_small"], g["sigma_large"]):
        lo = _sigmas(s_small, stack.ndim, "sigma_small")
        hi = _sigmas(s_large, stack.ndim, "sigma_large")
        if any(b <= a for a, b in zip(lo, hi, strict=True) if a or b):
            continue
        t0 = time.perf_counter()
        resp = dog_response(stack, s_small, s_large, percentiles)
        t_dog = time.perf_counter() - t0
        for thr in g["threshold"]:
            t1 = time.perf_counter()
            labels, _ = ndimage.label(resp >= thr, structure)
            sizes = np.bincount(labels.ravel())
            t_label = time.perf_counter() - t1
            for min_size in g["min_size"]:
                t2 = time.perf_counter()
                keep = sizes >= min_size
                keep[0] = False
                pred = keep[labels]
                c = confusion(pred, spine_mask, eval_mask)
                rows.append(
                    {
                        "sigma_small": s_small,
                        "sigma_large": s_large,
                        "threshold": float(thr),
                        "min_size": int(min_size),
                        "dice": c.dice,
                        "iou": c.iou,
                        "precision": c.precision,
                        "recall": c.recall,
                        "n_objects": int(np.count_nonzero(keep)),
                        # what this combination would cost alone: DoG + labelling + scoring
                        "seconds": t_dog + t_label + time.perf_counter() - t2,
                    }
                )
    if not rows:
        raise MicrosegError(
            f"DoG grid has no valid combination (need sigma_large > sigma_small): {g}"
        )
    table = pd.DataFrame(rows)
    best = int(table["dice"].to_numpy().argmax())
    best_params = {
        k: _plain(table.iloc[best][k]) for k in ("sigma_small", "sigma_large", "threshold")
    }
    best_params["min_size"] = int(table.iloc[best]["min_size"])
    logger.info(
        "DoG grid: %d combinations, best Dice %.4f at %s",
        len(table),
        table["dice"].max(),
        best_params,
    )
    table = table.sort_values("dice", ascending=False, kind="stable").reset_index(drop=True)
    return best_params, table
