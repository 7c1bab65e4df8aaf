"""Fusion stages: ``tune_fusion`` (Optuna on validation), ``fuse`` (benchmark) and
``evaluate_spines`` (all four spine methods side by side in ``metrics/spines.json``).

Inputs are files of earlier stages: raw YOLO boxes per stack (``eval_yolo``) and Prob-UNet
spine probabilities per stack (``predict_punet``). The benchmark stack is never seen by the
study.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.config import Params
from microseg.errors import MissingFileError
from microseg.evaluate.points import evaluate_points
from microseg.io import tiff
from microseg.stages import punet as punet_stage
from microseg.stages import spines as spines_stage
from microseg.stages.common import Sample, metrics_file, samples, write_json

log = logging.getLogger(__name__)

TUNED = Path("params/tuned_fusion.yaml")
FUSION_DIR = Path("reports/spines/fusion")


def _item(sample: Sample, params: Params) -> tuple[pd.DataFrame, np.ndarray]:
    raw = spines_stage.YOLO_REPORT / f"{sample.sample_id}_raw.csv"
    prob = punet_stage.PRED_DIR / sample.sample_id / "prob_spine.tif"
    for path in (raw, prob):
        if not path.exists():
            raise MissingFileError("fusion input missing; run eval_yolo and predict_punet", path)
    return pd.read_csv(raw), tiff.read_stack(prob)


def tune_fusion_stage(
    params: Params, on_trial: Callable | None = None, out: Path = TUNED, worker: int = 0
) -> dict[str, Any]:
    from microseg.tune.fusion import tune_fusion, write_best_params

    cfg = params.fusion
    items = []
    for s in samples(params.prepared_dir("spines"), "val"):
        dets, prob = _item(s, params)
        items.append((dets, prob, s.points(), s.voxel_size_nm))
    # one study per pair of models: resuming never mixes trials scored on other detections
    digest = hashlib.md5()
    prob = punet_stage.prob_model_dir(params) / "best.pt"  # spines.prob_model's weights
    for w in (spines_stage.YOLO_MODEL_DIR / "best.pt", prob):
        digest.update(w.read_bytes() if w.exists() else b"")
    best, study = tune_fusion(
        items,
        n_trials=cfg.n_trials,
        storage_url=cfg.storage,
        study_name=f"{cfg.study_name}-{digest.hexdigest()[:8]}",
        seed=params.seed,
        timeout=cfg.timeout,
        on_trial=on_trial,
        max_dist_nm=params.spines.match_dist_nm,
        worker=worker,  # each worker of a shared study samples with its own seed
    )
    write_best_params(out, best)
    return {"best": best, "best_val_f1": float(study.best_value), "n_trials": len(study.trials)}


def fuse_stage(params: Params, out_dir: Path = FUSION_DIR) -> dict[str, Any]:
    """Tuned fusion on the benchmark stack -> ``out_dir`` and ``metrics/spines_fusion.json``."""
    from microseg.infer.fusion import FusionParams, evaluate_fusion, fuse, write_fusion_outputs
    from microseg.infer.spine_pipeline import drop_low_conf
    from microseg.tune.fusion import read_best_file

    fp, yolo_conf = read_best_file(TUNED) if TUNED.exists() else (FusionParams(), 0.0)
    (bench,) = samples(params.prepared_dir("spines"), "test")
    dets, prob = _item(bench, params)
    # the study's YOLO confidence: boxes below it never reach fusion (as in the study)
    result = fuse(drop_low_conf(dets, yolo_conf), prob, fp, bench.voxel_size_nm)
    metrics = evaluate_fusion(
        result, bench.points(), bench.voxel_size_nm, params.spines.match_dist_nm
    )
    write_fusion_outputs(out_dir, result, metrics)
    out = {
        "benchmark": metrics,
        "statistics": result.stats,
        "params": {**fp.to_dict(), "yolo_conf": yolo_conf},
    }
    write_json(metrics_file(params, "spines_fusion"), out)
    return out


def _punet_spots(params: Params, bench: Sample) -> dict[str, Any]:
    """Prob-UNet alone: centroids of 3D components of its thresholded spine probability."""
    from scipy import ndimage

    prob = tiff.read_stack(punet_stage.PRED_DIR / bench.sample_id / "prob_spine.tif")
    thr = json.loads(Path(params.paths.metrics, "spines_punet.json").read_text())["benchmark"][
        "spine"
    ]["threshold"]
    labels, n = ndimage.label(prob >= thr)
    if n == 0:
        pts = pd.DataFrame(columns=["z", "y", "x"])
    else:
        centres = ndimage.center_of_mass(prob, labels, range(1, n + 1))
        pts = pd.DataFrame(centres, columns=["z", "y", "x"])
    return evaluate_points(pts, bench.points(), bench.voxel_size_nm, params.spines.match_dist_nm)


def evaluate_spines(params: Params) -> dict[str, Any]:
    """One table: YOLO alone, Prob-UNet alone, LoG baseline, fusion (benchmark, 1000 nm),
    written to ``metrics/spines.json``."""
    m = params.paths.metrics
    (bench,) = samples(params.prepared_dir("spines"), "test")

    def load(name: str) -> dict[str, Any]:
        path = m / f"{name}.json"
        if not path.exists():
            raise MissingFileError("metrics of an earlier stage missing", path)
        return json.loads(path.read_text())["benchmark"]

    keys = ("precision", "recall", "f1", "tp", "fp", "fn")
    table = {
        "yolo": load("spines_yolo"),
        "punet_spots": _punet_spots(params, bench),
        "log_baseline": load("spines_log"),
        "fusion": load("spines_fusion"),
    }
    out = {name: {k: v[k] for k in keys if k in v} for name, v in table.items()} | {
        "match_dist_nm": params.spines.match_dist_nm
    }
    write_json(metrics_file(params, "spines"), out)
    return out
