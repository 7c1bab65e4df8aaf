"""Scores of a batch evaluation against the annotations found beside the inputs.

Spines: ``<stem>.csv`` points scored by :func:`microseg.evaluate.points.evaluate_points` in nm
with the stack's voxel size. Nuclei: ``<stem>_labels.tif`` ground truth scored by F1 at IoU 0.5
(:mod:`microseg.evaluate.instances`). A file whose output was rejected is listed, never scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError
from microseg.evaluate.instances import image_scores, summarize
from microseg.evaluate.points import evaluate_points
from microseg.evaluate.rates import prf
from microseg.io.points import read_points
from microseg.registry.batch_inputs import LABEL_SUFFIX
from microseg.registry.batch_predict import read_labels

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5


def _annotation(where: Sequence[Path], names: Sequence[str]) -> Path | None:
    for folder in where:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _score_spines(
    pred: pd.DataFrame,
    row: pd.Series,
    where: Sequence[Path],
    voxel_size_nm: Sequence[float] | None,
    max_dist_nm: float,
) -> dict[str, Any] | None:
    ann = _annotation(where, [f"{row['sample_id']}.csv"])
    if ann is None:
        return None
    voxel = [row.get(f"voxel_size_{a}_nm") for a in "zyx"]
    if not all(v is not None and np.isfinite(v) and v > 0 for v in voxel):
        if voxel_size_nm is None:
            raise MicrosegError(
                "expected a voxel size (z, y, x) in the stack's metadata or passed as "
                f"voxel_size_nm to score against {ann}, found {voxel}",
                row["image_path"],
            )
        voxel = list(voxel_size_nm)
    shape = tuple(int(s) for s in str(row["shape"]).split(","))
    gt = read_points(ann, shape=shape, allow_empty=True)
    scores = evaluate_points(pred, gt, voxel, max_dist_nm)
    return {"annotation": str(ann), **scores}


def _score_nuclei(
    pred: pd.DataFrame, row: pd.Series, where: Sequence[Path]
) -> dict[str, Any] | None:
    stem = row["sample_id"]
    names = [f"{stem}{LABEL_SUFFIX}{s}" for s in (".tif", ".tiff", ".png")]
    ann = _annotation(where, names)
    if ann is None:
        return None
    gt = read_labels(ann)
    labels = read_labels(Path(pred["labels_path"].iloc[0]))
    scores = image_scores(gt, labels, (IOU_THRESHOLD,), with_rand=False)
    return {"annotation": str(ann), **scores}


def score_all(
    task: str,
    good: pd.DataFrame,
    outputs: dict[str, pd.DataFrame],
    out_bad: dict[str, list[str]],
    where: Sequence[Path],
    voxel_size_nm: Sequence[float] | None,
    max_dist_nm: float,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per evaluated file; files with rejected outputs are listed but never scored."""
    rows, errors = [], {}
    for _, row in good.iterrows():
        fname = row["file"]
        rec: dict[str, Any] = {"file": fname, "status": "ok", "scored": False}
        pred = outputs.get(fname)
        if pred is not None:
            rec["n_pred"] = len(pred) if task == "spines" else int(pred["n_objects"].sum())
        if fname in out_bad:
            rec["status"] = "prediction_failed" if pred is None else "output_rejected"
            rows.append(rec)
            continue
        try:
            if task == "spines":
                scores = _score_spines(pred, row, where, voxel_size_nm, max_dist_nm)
            else:
                scores = _score_nuclei(pred, row, where)
        except MicrosegError as exc:
            errors[fname] = str(exc)
            logger.warning("could not score %s: %s", fname, exc)
            scores = None
        if scores is not None:
            rec.update(scored=True, **scores)
        rows.append(rec)
    return pd.DataFrame(rows), errors


def score_summary(task: str, scored: pd.DataFrame) -> dict[str, Any]:
    if scored.empty:
        return {"n_scored": 0}
    if task == "spines":
        tp, fp, fn = (int(scored[c].sum()) for c in ("tp", "fp", "fn"))
        return {
            "n_scored": len(scored),
            **prf(tp, fp, fn, empty=1.0)._asdict(),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "n_pred": int(scored["n_pred"].sum()),
            "n_gt": int(scored["n_gt"].sum()),
        }
    return {"n_scored": len(scored), **summarize(scored, (IOU_THRESHOLD,))}
