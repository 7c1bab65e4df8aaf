"""Cell tracking scores: the Cell Tracking Challenge measures and per-frame segmentation scores.

* :func:`evaluate_ctc` runs ``py-ctcmetrics`` (the Python port of the CTC evaluation software)
  on a result folder against a ground-truth folder: validity, SEG, DET, TRA (with the AOGM
  error counts), LNK, CHOTA, HOTA, IDF1, MOTA, CT, TF, BC(i), CCA, BIO(i), OP_CSB, OP_CTB,
  OP_CLB(i) -- all of its metrics, which together take well under a second on a small
  sequence. CCA needs a complete cell cycle (a track born in a division that divides again)
  in the ground truth; ``gt_cell_cycles`` counts them, so a missing CCA is explained. SEG
  (and the OP_ scores that need it) is only asked for when the ground truth has a ``SEG``
  folder.
* :func:`per_frame_scores` gives, per frame of two label stacks, what the HeLa U-Net study
  reported: foreground IoU, the IoU of matched instances and the adapted Rand error
  (:func:`skimage.metrics.adapted_rand_error`).

Pure functions of folders and arrays; nothing here trains, loads a model or logs a run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.metrics import adapted_rand_error

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.convert import to_builtin

log = logging.getLogger(__name__)

PER_FRAME_COLUMNS = (
    "frame", "fg_iou", "mean_instance_iou", "seg", "rand_error", "rand_precision",
    "rand_recall", "n_gt", "n_pred", "n_matched",
)  # fmt: skip
_NEED_GRAPH = {"LNK", "OP_CLB", "BIO"}  # py-ctcmetrics computes these only beside DET/TRA
_NEED_SEG = {"SEG", "OP_CSB", "OP_CTB"}


def _run_quietly(func, *args, **kwargs) -> tuple[object, list[str]]:
    """Call a py-ctcmetrics function; its prints go to the debug log, its warnings returned."""
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            result = func(*args, **kwargs)
        except AssertionError as exc:  # the package checks its inputs with assert
            raise DataFormatError(f"py-ctcmetrics could not read the sequence: {exc}") from exc
    if out.getvalue().strip():
        log.debug("py-ctcmetrics: %s", out.getvalue().strip())
    return result, [str(w.message) for w in caught]


def validate_ctc(res_root: str | Path, seq: str, threads: int = 1) -> bool:
    """The official validity check of ``<res_root>/<seq>_RES`` (``ctc_metrics.validate_sequence``).

    Logs the checker's reasons at WARNING when the result is invalid.
    """
    from ctc_metrics import validate_sequence

    res_dir = Path(res_root) / f"{seq}_RES"
    if not (res_dir / "res_track.txt").is_file():
        raise MissingFileError("expected a CTC result folder with res_track.txt", res_dir)
    result, messages = _run_quietly(validate_sequence, str(res_dir), threads=threads)
    ok = bool(result["Valid"])
    if not ok:
        log.warning("%s is not a valid CTC result: %s", res_dir, "; ".join(messages[:10]))
    return ok


def evaluate_ctc(
    gt_root: str | Path,
    seq: str,
    res_root: str | Path,
    metrics: Sequence[str] | None = None,
    threads: int = 1,
) -> dict[str, float | int]:
    """Score ``<res_root>/<seq>_RES`` against ``<gt_root>/<seq>_GT`` with ``py-ctcmetrics``.

    Args:
        gt_root: folder holding ``<seq>_GT/TRA`` (and optionally ``<seq>_GT/SEG``).
        seq: sequence name, e.g. ``"01"``.
        res_root: folder holding ``<seq>_RES`` (``mask###.tif`` + ``res_track.txt``).
        metrics: py-ctcmetrics metric names; default all of them (``ALL_METRICS``).
        threads: worker processes for mask matching (1: none; 0: one per CPU).

    Returns:
        ``{name: number}`` with ``Valid``, ``SEG`` (when the GT has SEG), ``DET``, ``TRA``,
        ``AOGM`` and its counts ``AOGM_NS/FN/FP/ED/EA/EC``, ``LNK``, ``CHOTA``, ``HOTA``,
        ``IDF1``, ``MOTA``, ``CT``, ``TF``, ``BC(i)``, ``CCA``, ``BIO(i)`` and the rest that the
        package computes; metrics it leaves undefined are left out (CCA without a complete
        ground-truth cell cycle: ``gt_cell_cycles`` is then 0).

    Raises:
        MissingFileError: a folder or track file is missing.
        AnnotationError: the result breaks the CTC rules (the checker's reasons quoted).
    """
    from ctc_metrics import evaluate_sequence
    from ctc_metrics.metrics import ALL_METRICS

    gt_dir = Path(gt_root) / f"{seq}_GT"
    res_dir = Path(res_root) / f"{seq}_RES"
    if not (gt_dir / "TRA" / "man_track.txt").is_file():
        raise MissingFileError("expected CTC ground truth with TRA/man_track.txt", gt_dir)
    if not (res_dir / "res_track.txt").is_file():
        raise MissingFileError("expected a CTC result folder with res_track.txt", res_dir)
    wanted = list(metrics) if metrics is not None else list(ALL_METRICS)
    unknown = [m for m in wanted if m not in ALL_METRICS and not m.startswith("BC(")]
    if unknown:
        raise DataFormatError(f"unknown CTC metrics {unknown}; known: {list(ALL_METRICS)}")
    if not any((gt_dir / "SEG").glob("man_seg*.tif")):
        dropped = [m for m in wanted if m in _NEED_SEG]
        if dropped:
            log.info("%s has no SEG ground truth; not computing %s", gt_dir, dropped)
        wanted = [m for m in wanted if m not in _NEED_SEG]
    if _NEED_GRAPH & set(wanted) and not {"DET", "TRA"} & set(wanted):
        wanted.append("TRA")
    result, messages = _run_quietly(
        evaluate_sequence, str(res_dir), str(gt_dir), metrics=wanted, threads=threads
    )
    if not result.get("Valid", 1):
        raise AnnotationError(
            "not a valid CTC result; the checker says: " + "; ".join(messages[:10]), res_dir
        )
    scores = {k: to_builtin(v) for k, v in result.items() if v is not None}
    scores["gt_cell_cycles"] = gt_cell_cycles(gt_dir / "TRA" / "man_track.txt")
    if "CCA" in wanted and "CCA" not in scores:
        log.info("%s: CCA is undefined (no complete cell cycle in the ground truth)", gt_dir)
    log.info(
        "%s: TRA %.4f DET %.4f SEG %s",
        res_dir,
        scores.get("TRA", float("nan")),
        scores.get("DET", float("nan")),
        f"{scores['SEG']:.4f}" if "SEG" in scores else "n/a",
    )
    return scores


def gt_cell_cycles(track_file: str | Path) -> int:
    """Ground-truth tracks that begin at a division and end in one: the cell cycles CCA
    compares (py-ctcmetrics leaves CCA undefined when there are none; this count says so)."""
    from microseg.io.ctc import read_track_file

    tracks = read_track_file(track_file)
    children = tracks.loc[tracks["P"] > 0, "P"].value_counts()
    mothers = set(children.index[children >= 2].tolist())
    full = tracks["L"].isin(mothers) & tracks["P"].isin(mothers)
    return int(full.sum())


# --------------------------------------------------------------------------- per frame


def _instance_ious(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, int, int]:
    """IoUs of instance pairs with IoU > 0.5 (a unique matching), and the instance counts."""
    g_ids, g_area = np.unique(gt[gt != 0], return_counts=True)
    p_ids, p_area = np.unique(pred[pred != 0], return_counts=True)
    both = (gt != 0) & (pred != 0)
    if not both.any():
        return np.zeros(0), len(g_ids), len(p_ids)
    gi = np.searchsorted(g_ids, gt[both])
    pi = np.searchsorted(p_ids, pred[both])
    key, inter = np.unique(gi.astype(np.int64) * len(p_ids) + pi, return_counts=True)
    gi, pi = key // len(p_ids), key % len(p_ids)
    iou = inter / (g_area[gi] + p_area[pi] - inter)
    return iou[iou > 0.5], len(g_ids), len(p_ids)


def frame_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """The scores of :func:`per_frame_scores` for one pair of ``(Y, X)`` label images."""
    g, p = gt != 0, pred != 0
    union = int(np.count_nonzero(g | p))
    fg_iou = np.count_nonzero(g & p) / union if union else 1.0
    matched, n_gt, n_pred = _instance_ious(gt, pred)
    if n_gt == 0 and n_pred == 0:
        mean_iou, seg = 1.0, 1.0
    else:
        mean_iou = float(matched.mean()) if len(matched) else 0.0
        seg = float(matched.sum() / n_gt) if n_gt else 0.0
    if not g.any():  # adapted Rand error ignores GT background: undefined without GT objects
        rand = (0.0, 1.0, 1.0) if not p.any() else (float("nan"),) * 3
    else:
        rand = adapted_rand_error(gt, pred)
    return {
        "fg_iou": float(fg_iou),
        "mean_instance_iou": mean_iou,
        "seg": seg,
        "rand_error": float(rand[0]),
        "rand_precision": float(rand[1]),
        "rand_recall": float(rand[2]),
        "n_gt": n_gt,
        "n_pred": n_pred,
        "n_matched": len(matched),
    }


def per_frame_scores(gt_masks: np.ndarray, pred_masks: np.ndarray) -> pd.DataFrame:
    """Per-frame segmentation scores of two ``(T, Y, X)`` instance label stacks.

    Columns (``PER_FRAME_COLUMNS``): ``frame``; ``fg_iou`` -- IoU of the foregrounds;
    ``mean_instance_iou`` -- mean IoU over instance pairs matched at IoU > 0.5; ``seg`` --
    the CTC SEG idea per frame (sum of matched IoUs / number of GT instances, so misses
    count as 0); ``rand_error`` with its ``rand_precision`` and ``rand_recall``
    (:func:`skimage.metrics.adapted_rand_error`, GT background ignored; NaN in a frame with
    no GT objects but some predicted); ``n_gt``, ``n_pred``, ``n_matched``. A frame empty in
    both scores perfectly. Label values need not agree between the stacks.
    """
    gt_masks, pred_masks = np.asarray(gt_masks), np.asarray(pred_masks)
    if gt_masks.ndim != 3 or gt_masks.shape != pred_masks.shape:
        raise ShapeMismatchError(
            f"expected two (T, Y, X) label stacks of one shape, found {gt_masks.shape} and "
            f"{pred_masks.shape}"
        )
    for name, arr in (("ground truth", gt_masks), ("prediction", pred_masks)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataFormatError(f"expected integer {name} labels, found {arr.dtype}")
    rows = [
        {"frame": t, **frame_scores(g, p)}
        for t, (g, p) in enumerate(zip(gt_masks, pred_masks, strict=True))
    ]
    return pd.DataFrame(rows, columns=list(PER_FRAME_COLUMNS))
