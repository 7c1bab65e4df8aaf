"""Classical spine-detection baseline: 2D Laplacian-of-Gaussian blobs per plane, merged in 3D.

Every learned detector is judged against this. It runs :func:`skimage.feature.blob_log` on
each plane (2D: the axial blur is 5x the lateral one, so a 3D LoG with one sigma fits badly),
then :func:`microseg.infer.dedup.dedup_3d` merges the detections of one spine across planes
in nanometres.

Score: the scale-normalised LoG response ``r = -sigma^2 * LoG_sigma(plane)`` at the blob's
position and sigma (the quantity ``blob_log`` thresholds), mapped to [0, 1) by the fixed
saturating transform ``score = r / (r + response_half)`` (0.5 at ``r = response_half``,
monotone, 0 for r <= 0). It depends on nothing but the blob itself, so scores are comparable
across stacks and a score threshold means the same thing everywhere. With percentile
normalisation, a Gaussian blob of amplitude A seen at its own sigma gives ``r ~ A / 2``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import blob_log

from microseg.data.transforms import normalize_stack
from microseg.errors import AnnotationError, ConfigError, MicrosegError, ShapeMismatchError
from microseg.evaluate.points import evaluate_points
from microseg.infer.dedup import dedup_3d
from microseg.utils.convert import to_builtin

logger = logging.getLogger(__name__)

BLOB_COLS = ["z", "y", "x", "sigma", "response", "score", "x1", "y1", "x2", "y2"]


def _log_kernel(sigma: float) -> np.ndarray:
    """The 2D kernel of ``ndi.gaussian_laplace(., sigma)`` (default truncate 4), symmetric."""
    r = int(4.0 * sigma + 0.5)
    delta = np.zeros((2 * r + 1, 2 * r + 1))
    delta[r, r] = 1.0
    return ndi.gaussian_laplace(delta, sigma)


def log_response(plane: np.ndarray, yx: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """``-s^2 * gaussian_laplace(plane, s)[y, x]`` for each point, without filtering the plane.

    Exactly the value ``blob_log`` thresholded (same kernel, same 'reflect' border), computed
    as one small dot product per blob instead of one more full-plane filter per sigma.
    """
    out = np.empty(len(yx))
    plane = np.asarray(plane, dtype=float)
    for s in np.unique(sigmas):
        sel = np.flatnonzero(sigmas == s)
        kern = _log_kernel(float(s))
        r = kern.shape[0] // 2
        padded = np.pad(plane, r, mode="symmetric")  # numpy 'symmetric' == scipy 'reflect'
        off = np.arange(-r, r + 1)
        ys = yx[sel, 0].astype(np.intp)[:, None, None] + r + off[None, :, None]
        xs = yx[sel, 1].astype(np.intp)[:, None, None] + r + off[None, None, :]
        out[sel] = -(float(s) ** 2) * (padded[ys, xs] * kern).sum(axis=(1, 2))
    return out


def score_from_response(response: np.ndarray, response_half: float) -> np.ndarray:
    """Fixed map of LoG response to [0, 1): ``r / (r + response_half)``, 0 where r <= 0."""
    r = np.clip(np.asarray(response, dtype=float), 0.0, None)
    return r / (r + response_half)


def detect_blobs_log(
    stack: np.ndarray,
    voxel_size_nm: Sequence[float] = (500.0, 94.0, 94.0),
    *,
    min_sigma: float = 1.5,
    max_sigma: float = 4.0,
    num_sigma: int = 4,
    threshold: float = 0.2,
    overlap: float = 0.5,
    normalize: Literal["stack", "plane"] | None = "stack",
    percentiles: tuple[float, float] = (1.0, 99.8),
    background_sigma: float | None = None,
    response_half: float = 0.1,
    dedup_radius_nm: float | None = 1000.0,
    dedup_mode: Literal["nms", "cluster"] = "nms",
    exclude_border: bool = False,
) -> pd.DataFrame:
    """Bright blobs in a ``ZYX`` stack: 2D LoG per plane, then 3D de-duplication in nm.

    The tuned knobs are ``min_sigma``, ``max_sigma`` (pixels; a blob's radius is about
    ``sqrt(2) * sigma``) and ``threshold`` (on the scale-normalised LoG response of the
    normalised image); ``dedup_radius_nm`` is worth tuning with them: per-plane detections of
    one blob spread over about the axial PSF's FWHM (1.5-2.5 µm), while spines can sit closer
    than that laterally. Returns columns z, y, x (voxels), sigma, response, score (see module
    notes), box x1, y1, x2, y2 (centre +- sqrt(2) * sigma), and with de-duplication
    (``dedup_radius_nm`` not None) also n_merged, z_min, z_max.
    """
    img = np.asarray(stack)
    if img.ndim != 3:
        raise ShapeMismatchError(f"expected a 3D ZYX stack; found shape {img.shape}")
    if not 0 < min_sigma <= max_sigma or num_sigma < 1 or response_half <= 0:
        raise ConfigError(
            "LoG parameters need 0 < min_sigma <= max_sigma, num_sigma >= 1, response_half > 0;"
            f" found min_sigma={min_sigma}, max_sigma={max_sigma}, num_sigma={num_sigma}, "
            f"response_half={response_half}"
        )
    img = normalize_stack(img, normalize, percentiles, background_sigma)
    parts = []
    for z, plane in enumerate(img):
        blobs = blob_log(
            plane,
            min_sigma=min_sigma,
            max_sigma=max_sigma,
            num_sigma=num_sigma,
            threshold=threshold,
            overlap=overlap,
            exclude_border=exclude_border,
        )
        if len(blobs) == 0:
            continue
        yx = blobs[:, :2]
        sigma = blobs[:, 2].astype(float)
        resp = log_response(plane, yx, blobs[:, 2])
        parts.append(np.column_stack([np.full(len(blobs), z), yx, sigma, resp]))
    arr = np.concatenate(parts) if parts else np.empty((0, 5))
    df = pd.DataFrame(arr, columns=["z", "y", "x", "sigma", "response"])
    df["score"] = score_from_response(df["response"].to_numpy(), response_half)
    rad = np.sqrt(2.0) * df["sigma"]
    df["x1"], df["y1"] = df["x"] - rad, df["y"] - rad
    df["x2"], df["y2"] = df["x"] + rad, df["y"] + rad
    df = df[BLOB_COLS]
    logger.debug("LoG: %d plane detections in %d planes", len(df), img.shape[0])
    if dedup_radius_nm is None:
        order = ["score", "z", "y", "x"]
        df = df.sort_values(order, ascending=[False, True, True, True], kind="stable")
        return df.reset_index(drop=True)
    return dedup_3d(df, voxel_size_nm, dedup_radius_nm, score_col="score", mode=dedup_mode)


_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(detect_blobs_log).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
_TUNABLE = set(_DEFAULTS)


def tune_log(
    stack: np.ndarray,
    gt_df: pd.DataFrame,
    voxel_size_nm: Sequence[float],
    max_dist_nm: float,
    grid: Mapping[str, Sequence[Any]],
    **fixed: Any,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Grid search of :func:`detect_blobs_log` parameters for the best point F1 on one stack.

    ``grid`` maps keyword parameters to candidate values (every combination is run);
    ``fixed`` sets the others. Returns the best combination (highest F1; ties go to the first
    in grid order) and a table with one row per combination: its values, precision, recall,
    f1, tp, fp, fn, n_pred. Combinations with ``min_sigma > max_sigma`` are skipped.
    """
    unknown = sorted((set(grid) | set(fixed)) - _TUNABLE)
    if unknown:
        raise ConfigError(
            f"unknown LoG parameter(s) {unknown}; expected some of {sorted(_TUNABLE)}"
        )
    overlap = sorted(set(grid) & set(fixed))
    if overlap:
        raise ConfigError(f"parameter(s) {overlap} given both in grid and as fixed values")
    empty = [k for k, v in grid.items() if len(v) == 0]
    if empty:
        raise ConfigError(f"grid values must be non-empty lists; found empty {empty}")
    if len(gt_df) == 0:
        raise AnnotationError("tuning needs ground-truth points; found an empty table")
    keys = list(grid)
    rows = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        full = {**fixed, **params}
        if {**_DEFAULTS, **full}["min_sigma"] > {**_DEFAULTS, **full}["max_sigma"]:
            continue
        pred = detect_blobs_log(stack, voxel_size_nm, **full)
        metrics = evaluate_points(pred, gt_df, voxel_size_nm, max_dist_nm)
        rows.append({**params, **{k: metrics[k] for k in _TABLE_METRICS}})
        logger.info("tune_log %s -> F1 %.3f", params, metrics["f1"])
    if not rows:
        raise MicrosegError(f"no valid parameter combination in grid {dict(grid)}")
    table = pd.DataFrame(rows)
    best_row = table.iloc[int(table["f1"].to_numpy().argmax())]
    best = {k: to_builtin(best_row[k]) for k in keys}
    return best, table


_TABLE_METRICS = ("precision", "recall", "f1", "tp", "fp", "fn", "n_pred")
