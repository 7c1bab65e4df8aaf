"""Optuna search for the YOLO + Prob-UNet fusion knobs (:mod:`microseg.infer.fusion`).

The objective is the *pooled* F1 over the validation stacks (TP, FP and FN summed over stacks
before the ratio, so a stack with many spines weighs more than a sparse one), with points
matched one-to-one within ``max_dist_nm`` (1 µm by default).

Search space (TPE; fixed-range distributions, so every trial informs every later one):

* ``high_conf`` in [0.05, 1]; ``low_frac`` in [0, 1] with ``low_conf = low_frac * high_conf``,
  which keeps ``low_conf <= high_conf`` by construction instead of wasting rejected trials;
* ``punet_thr`` in [0.05, 0.95]; ``w_yolo`` in [0, 1] with ``w_punet = 1 - w_yolo``;
* ``agg`` in {mean, max, quantile} (the quantile level stays the base params' one);
* ``dedup_radius_nm`` in [500, 3000];
* ``yolo_conf`` in [0.01, 0.3]: YOLO's own confidence cut, boxes below it are dropped before
  fusion. The boxes are predicted once at the YOLO sweep's lowest confidence (``eval_yolo``,
  0.05 by default, so values below it drop nothing) and each trial filters them, so the study
  stays cheap. ``params/tuned_fusion.yaml`` holds it beside the :class:`FusionParams` fields;
  ``fuse`` drops the boxes the same way and the inference paths (``read_fusion_params``) fold
  it into the decision tree's cuts (:func:`microseg.infer.spine_pipeline.with_yolo_conf`).

Every box's Prob-UNet probability is aggregated once per stack and per ``agg`` before the
search (:func:`prepare`), so a trial costs only thresholding, 3D de-duplication and matching.

Resuming: the study lives in the storage (:mod:`microseg.tune.storage`). Calling
:func:`tune_fusion` again with the same ``storage_url`` and ``study_name`` *continues* it:
``n_trials`` counts the trials this call adds, and the best params are the best of the whole
study. Several workers (processes or machines) calling it at once on one server-backed storage
add up their trials in one study.

MLflow stays out of this module (MLflow lives in ``registry/``): pass ``on_trial`` to log each
trial, e.g. as a nested run, from the registry layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from microseg.errors import AnnotationError
from microseg.evaluate.points import match_points
from microseg.evaluate.rates import prf_counts
from microseg.infer.fusion import (
    AGGS,
    FusionParams,
    PlaneSource,
    box_probability,
    fuse_with_probabilities,
)
from microseg.infer.spine_pipeline import YOLO_CONF_KEY, split_yolo_conf, with_yolo_conf
from microseg.tune.storage import study as open_study
from microseg.utils.atomic import write_text
from microseg.utils.convert import to_builtin
from microseg.utils.units import VoxelSize

log = logging.getLogger(__name__)

#: One validation stack: YOLO detections, Prob-UNet spine probabilities (``ZYX``), annotated
#: points (x, y, z in voxels) and the voxel size (z, y, x) in nm.
ValItem = tuple[pd.DataFrame, np.ndarray | PlaneSource, pd.DataFrame, VoxelSize]
OnTrial = Callable[[optuna.Trial, dict[str, Any]], None]

HIGH_CONF = (0.05, 1.0)
PUNET_THR = (0.05, 0.95)
DEDUP_RADIUS_NM = (500.0, 3000.0)
YOLO_CONF = (0.01, 0.3)


@dataclass(frozen=True)
class PreparedStack:
    """A validation stack with its box probabilities computed once per aggregation."""

    detections: pd.DataFrame
    probs: Mapping[str, np.ndarray]
    gt_zyx: np.ndarray
    voxel_size_nm: np.ndarray


def prepare(val_items: Sequence[ValItem], quantile: float = 0.9) -> list[PreparedStack]:
    """Aggregate every box's probability for each of :data:`AGGS` (once per stack)."""
    out = []
    for k, (det, prob, gt, vs) in enumerate(val_items):
        missing = [c for c in ("x", "y", "z") if c not in gt.columns]
        if missing:
            raise AnnotationError(
                f"validation stack {k}: ground-truth points need columns x, y, z; missing "
                f"{missing}, found {list(gt.columns)}"
            )
        det = det.reset_index(drop=True)
        probs = {agg: box_probability(prob, det, agg, quantile) for agg in AGGS}
        out.append(
            PreparedStack(
                detections=det,
                probs=probs,
                gt_zyx=gt[["z", "y", "x"]].to_numpy(dtype=float),
                voxel_size_nm=np.asarray(vs, dtype=float),
            )
        )
    return out


def pooled_metrics(
    prepared: Sequence[PreparedStack],
    params: FusionParams,
    max_dist_nm: float = 1000.0,
    yolo_conf: float = 0.0,
) -> dict[str, Any]:
    """Precision, recall, F1 from TP, FP, FN summed over the stacks, plus ``f1_per_stack``;
    boxes scoring below ``yolo_conf`` are dropped before fusion."""
    tp = fp = fn = 0
    per_stack = []
    for st in prepared:
        keep = st.detections["score"].to_numpy() >= yolo_conf
        det = st.detections.loc[keep].reset_index(drop=True)
        prob = np.asarray(st.probs[params.agg])[keep]
        res = fuse_with_probabilities(det, prob, params, st.voxel_size_nm)
        pred = res.dedup[["z", "y", "x"]].to_numpy(dtype=float)
        m = match_points(pred, st.gt_zyx, st.voxel_size_nm, max_dist_nm)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        per_stack.append(m.f1)
    return {**prf_counts(tp, fp, fn, empty=1.0), "f1_per_stack": per_stack}


def params_from_search(values: Mapping[str, Any], base: FusionParams | None = None) -> FusionParams:
    """Map a trial's sampled values (search-space names) onto :class:`FusionParams`."""
    base = base or FusionParams()
    high = float(values["high_conf"])
    w_yolo = float(values["w_yolo"])
    return replace(
        base,
        high_conf=high,
        low_conf=min(high, float(values["low_frac"]) * high),
        punet_thr=float(values["punet_thr"]),
        w_yolo=w_yolo,
        w_punet=1.0 - w_yolo,
        agg=str(values["agg"]),
        dedup_radius_nm=float(values["dedup_radius_nm"]),
    )


def suggest(trial: optuna.Trial, base: FusionParams | None = None) -> tuple[FusionParams, float]:
    """Sample one parameter set and ``yolo_conf`` (see module notes for the space)."""
    values = {
        "high_conf": trial.suggest_float("high_conf", *HIGH_CONF),
        "low_frac": trial.suggest_float("low_frac", 0.0, 1.0),
        "punet_thr": trial.suggest_float("punet_thr", *PUNET_THR),
        "w_yolo": trial.suggest_float("w_yolo", 0.0, 1.0),
        "agg": trial.suggest_categorical("agg", list(AGGS)),
        "dedup_radius_nm": trial.suggest_float("dedup_radius_nm", *DEDUP_RADIUS_NM),
    }
    return params_from_search(values, base), trial.suggest_float(YOLO_CONF_KEY, *YOLO_CONF)


def tune_fusion(
    val_items: Sequence[ValItem],
    n_trials: int,
    storage_url: str | None = None,
    study_name: str = "fusion",
    seed: int = 0,
    timeout: float | None = None,
    on_trial: OnTrial | None = None,
    *,
    base: FusionParams | None = None,
    max_dist_nm: float = 1000.0,
    worker: int = 0,
) -> tuple[dict[str, Any], optuna.Study]:
    """Search fusion params that maximise pooled F1; returns (best params dict, study).

    ``n_trials`` new trials are added to the study ``study_name`` in ``storage_url`` (created,
    or continued when it exists). ``on_trial(trial, metrics)`` runs after each trial's
    evaluation (an exception there fails the trial and stops the search). ``base`` supplies the
    knobs not searched (``quantile``, ``dedup_mode``). ``worker`` distinguishes concurrent
    workers' sampler seeds. The best params dict has every :class:`FusionParams` field and
    ``yolo_conf``.
    """
    base = base or FusionParams()
    prepared = prepare(val_items, base.quantile)
    st = open_study(study_name, storage_url, seed, "maximize", worker=worker)

    def objective(trial: optuna.Trial) -> float:
        params, conf = suggest(trial, base)
        metrics = pooled_metrics(prepared, params, max_dist_nm, conf)
        # one attribute each: every set_user_attr is a storage round trip (a commit)
        trial.set_user_attr(
            "metrics", {k: metrics[k] for k in ("precision", "recall", "tp", "fp", "fn")}
        )
        trial.set_user_attr("fusion_params", {**params.to_dict(), YOLO_CONF_KEY: conf})
        if on_trial is not None:
            on_trial(trial, {**metrics, "params": {**params.to_dict(), YOLO_CONF_KEY: conf}})
        return metrics["f1"]

    st.optimize(objective, n_trials=n_trials, timeout=timeout)
    best = st.best_trial
    best_params = {
        **params_from_search(best.params, base).to_dict(),
        YOLO_CONF_KEY: float(best.params.get(YOLO_CONF_KEY, 0.0)),
    }
    log.info(
        "fusion study %r: %d trial(s); best F1 %.4f (trial %d): %s",
        study_name,
        len(st.trials),
        best.value,
        best.number,
        best_params,
    )
    return best_params, st


def write_best_params(path: str | Path, best: Mapping[str, Any]) -> Path:
    """Write ``best`` as a plain YAML mapping (e.g. ``params/tuned_fusion.yaml``), atomically.

    The values are checked against :class:`FusionParams` (and ``yolo_conf`` in [0, 1]) first,
    so a bad file is never written.
    """
    read_tuned(best)
    plain = {str(k): to_builtin(v) for k, v in best.items()}
    write_text(path, yaml.safe_dump(plain, sort_keys=False))
    return Path(path)


def read_tuned(
    values: Mapping[str, Any], path: str | Path | None = None
) -> tuple[FusionParams, float]:
    """A tuned mapping -> (:class:`FusionParams`, ``yolo_conf``; 0.0 when absent)."""
    fields_, conf = split_yolo_conf(values, path)
    return FusionParams.from_dict(fields_), conf


def read_best_file(path: str | Path) -> tuple[FusionParams, float]:
    """The params and ``yolo_conf`` a :func:`write_best_params` file holds."""
    return read_tuned(yaml.safe_load(Path(path).read_text()) or {}, path)


def read_best_params(path: str | Path) -> FusionParams:
    """The params a :func:`write_best_params` file holds, ``yolo_conf`` folded into the cuts
    (:func:`~microseg.infer.spine_pipeline.with_yolo_conf`: the same kept boxes)."""
    return with_yolo_conf(*read_best_file(path))
