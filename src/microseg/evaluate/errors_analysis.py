"""What went wrong, per image and per modality: false positives, misses, merges and splits.

Categories come from one :class:`~microseg.evaluate.instances.InstanceOverlap` (sparse pixel
overlaps) and the one-to-one matching at IoU ``threshold``:

- **false positive**: a prediction left unmatched (for ``threshold >= 0.5`` exactly the
  predictions whose IoU with every GT instance is below the threshold);
- **miss**: a GT instance left unmatched;
- **merge**: a prediction covering at least two GT instances, each of which it covers by more
  than ``cover`` of *the GT's* area (``|g ∩ p| / |g| > cover``): one blob for several nuclei;
- **split**: a GT instance covered by at least two predictions, each lying by more than
  ``cover`` of *the prediction's* area inside it (``|g ∩ p| / |p| > cover``): the mirror
  image of a merge, several blobs for one nucleus.

A merged GT instance is often also a miss, and a split fragment also a false positive; the
``*_in_merge`` / ``*_in_split`` counts say how many of the misses and false positives the
merges and splits explain.

:func:`hardest_images` ranks images across models (e.g. lowest mean F1 at IoU 0.5) and
:func:`per_modality` aggregates a per-image table by imaging modality (fluorescence, tissue,
brightfield) from the dataset manifest, micro scores recomputed from summed counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError
from microseg.evaluate.instances import (
    DEFAULT_THRESHOLDS,
    InstanceOverlap,
    instance_overlap,
    match_instances,
    summarize,
    threshold_key,
)

logger = logging.getLogger(__name__)

ERROR_COLUMNS = (
    "n_gt", "n_pred", "tp", "false_positives", "misses", "merges", "merged_gt", "splits",
    "split_pred", "misses_in_merge", "fp_in_split",
)  # fmt: skip


@dataclass(frozen=True)
class ErrorReport:
    """Label values (not positions) of the instances in each error category of one image."""

    threshold: float
    cover: float
    n_gt: int
    n_pred: int
    tp: int
    false_positive_ids: np.ndarray
    miss_ids: np.ndarray
    merge_pred_ids: np.ndarray  # predictions that merge >= 2 GT instances
    merged_gt_ids: np.ndarray  # the GT instances they merge
    split_gt_ids: np.ndarray  # GT instances split into >= 2 predictions
    split_pred_ids: np.ndarray  # the fragments

    def counts(self) -> dict[str, int]:
        return {
            "n_gt": self.n_gt,
            "n_pred": self.n_pred,
            "tp": self.tp,
            "false_positives": int(self.false_positive_ids.size),
            "misses": int(self.miss_ids.size),
            "merges": int(self.merge_pred_ids.size),
            "merged_gt": int(self.merged_gt_ids.size),
            "splits": int(self.split_gt_ids.size),
            "split_pred": int(self.split_pred_ids.size),
            "misses_in_merge": int(np.intersect1d(self.miss_ids, self.merged_gt_ids).size),
            "fp_in_split": int(np.intersect1d(self.false_positive_ids, self.split_pred_ids).size),
        }


def _grouped(owner: np.ndarray, other: np.ndarray, n_owner: int) -> tuple[np.ndarray, np.ndarray]:
    """Owners that appear with >= 2 partners, and the partners of those owners."""
    counts = np.bincount(owner, minlength=n_owner)
    hit = counts >= 2
    return np.flatnonzero(hit), np.unique(other[hit[owner]])


def classify_errors(
    gt: np.ndarray | InstanceOverlap,
    pred: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    cover: float = 0.5,
) -> ErrorReport:
    """Error categories of one image, from label images or a precomputed overlap."""
    if not 0.0 <= cover < 1.0:
        raise MicrosegError(f"cover must lie in [0, 1); found {cover}")
    if isinstance(gt, InstanceOverlap):
        ov = gt
    else:
        if pred is None:
            raise MicrosegError("classify_errors needs a prediction with a GT label image")
        ov = instance_overlap(gt, pred)
    m = match_instances(ov, threshold)
    gi, pi, inter, _ = ov.pairs
    # merges: pairs where the prediction covers most of the GT
    sel = inter / ov.gt_area[gi] > cover
    merge_pred, merged_gt = _grouped(pi[sel], gi[sel], ov.n_pred)
    # splits: pairs where the prediction lies mostly inside the GT
    sel = inter / ov.pred_area[pi] > cover
    split_gt, split_pred = _grouped(gi[sel], pi[sel], ov.n_gt)
    return ErrorReport(
        threshold=float(threshold),
        cover=float(cover),
        n_gt=ov.n_gt,
        n_pred=ov.n_pred,
        tp=m.tp,
        false_positive_ids=ov.pred_ids[m.unmatched_pred()],
        miss_ids=ov.gt_ids[m.unmatched_gt()],
        merge_pred_ids=ov.pred_ids[merge_pred],
        merged_gt_ids=ov.gt_ids[merged_gt],
        split_gt_ids=ov.gt_ids[split_gt],
        split_pred_ids=ov.pred_ids[split_pred],
    )


def error_table(
    samples: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    threshold: float = 0.5,
    cover: float = 0.5,
) -> pd.DataFrame:
    """One row of :data:`ERROR_COLUMNS` counts per ``(image_id, gt, pred)`` triple."""
    rows = [
        {"image_id": str(i), **classify_errors(g, p, threshold=threshold, cover=cover).counts()}
        for i, g, p in samples
    ]
    return pd.DataFrame(rows, columns=["image_id", *ERROR_COLUMNS])


def hardest_images(
    per_image: pd.DataFrame,
    metric: str = "f1_50",
    k: int = 10,
    *,
    model_col: str = "model",
    image_col: str = "image_id",
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """The ``k`` images with the worst mean ``metric`` over models.

    ``per_image`` stacks per-image tables of several models (a ``model_col`` column; without
    it, one model). Returns one row per image: ``image_col``, one column per model, ``mean``,
    ``min``, ``max`` and ``n_models`` (images scored by fewer models are averaged over those
    that scored them). Ties are broken by image id, so the order is deterministic.
    """
    need = {metric, image_col}
    if not need <= set(per_image.columns):
        raise MicrosegError(f"per-image table needs columns {sorted(need)}; has {list(per_image)}")
    if k < 1:
        raise MicrosegError(f"k must be >= 1; found {k}")
    df = per_image if model_col in per_image else per_image.assign(**{model_col: "model"})
    wide = df.pivot_table(
        index=image_col, columns=model_col, values=metric, aggfunc="mean", sort=True
    )
    models = list(dict.fromkeys(df[model_col]))
    wide = wide[models]
    out = wide.copy()
    out["mean"] = wide.mean(axis=1, skipna=True)
    out["min"] = wide.min(axis=1, skipna=True)
    out["max"] = wide.max(axis=1, skipna=True)
    out["n_models"] = wide.notna().sum(axis=1)
    out = out.reset_index()
    out = out.sort_values(
        ["mean", image_col], ascending=[higher_is_better, True], kind="stable", na_position="last"
    )
    out.columns.name = None
    return out.head(k).reset_index(drop=True)


def per_modality(
    per_image: pd.DataFrame,
    manifest: pd.DataFrame | None = None,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    model_col: str = "model",
    image_col: str = "image_id",
    modality_col: str = "modality",
    manifest_id_col: str = "sample_id",
) -> pd.DataFrame:
    """Scores per (model, modality): micro F1 etc. from summed counts, means of the rest.

    The modality comes from ``per_image[modality_col]`` or, when absent, from ``manifest``
    (joined on ``manifest_id_col``). Images without a modality are grouped as ``"unknown"``.
    Columns: model (when present), modality, ``n_images`` and the :func:`summarize` keys;
    rows sorted by modality (alphabetically), then by model (in order of appearance).
    """
    df = per_image.copy()
    if modality_col not in df:
        if manifest is None:
            raise MicrosegError(
                f"per-image table has no {modality_col!r} column and no manifest was given"
            )
        if not {manifest_id_col, modality_col} <= set(manifest.columns):
            raise MicrosegError(
                f"manifest needs columns {manifest_id_col!r} and {modality_col!r}; "
                f"has {list(manifest.columns)}"
            )
        lookup = dict(
            zip(manifest[manifest_id_col].astype(str), manifest[modality_col], strict=True)
        )
        df[modality_col] = df[image_col].astype(str).map(lookup)
    missing = int(df[modality_col].isna().sum())
    if missing:
        logger.warning("%d per-image rows have no modality; grouped as 'unknown'", missing)
    df[modality_col] = df[modality_col].fillna("unknown").astype(str)
    keys = [model_col, modality_col] if model_col in df else [modality_col]
    rows = []
    for key, group in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key, strict=True)), **summarize(group, thresholds)})
    out = pd.DataFrame(rows)
    order = sorted(out[modality_col].unique())
    out[modality_col] = pd.Categorical(out[modality_col], order, ordered=True)
    if model_col in out:
        models = list(dict.fromkeys(df[model_col]))
        out[model_col] = pd.Categorical(out[model_col], models, ordered=True)
    out = out.sort_values(keys[::-1], kind="stable").reset_index(drop=True)
    for col in keys:
        out[col] = out[col].astype(str)
    return out


def errors_by_threshold(
    gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """Error counts of one image at several IoU thresholds (one overlap computation)."""
    ov = instance_overlap(gt, pred)
    rows = [
        {"threshold_key": threshold_key(t), "threshold": float(t),
         **classify_errors(ov, threshold=t).counts()}
        for t in thresholds
    ]  # fmt: skip
    return pd.DataFrame(rows)
