"""Spine-detection stages: ``convert_yolo``, ``train_yolo``, ``eval_yolo``, ``baseline_log``.

Thresholds are chosen on the validation stacks and only then applied to the benchmark
stack, so the benchmark numbers are never tuned on the benchmark itself. The full benchmark
sweep is still written (``metrics_summary.csv``), as DeepD3's tooling did, for inspection.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.config import Params
from microseg.errors import MissingFileError
from microseg.evaluate.points import match_points
from microseg.io import tiff
from microseg.stages.common import Sample, metrics_file, prf, samples, write_json
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

YOLO_DATA = Path("data/yolo/spines")
YOLO_MODEL_DIR = Path("models/yolo")
YOLO_REPORT = Path("reports/spines/yolo")
LOG_REPORT = Path("reports/spines/log")
PLOTS_DIR = Path("plots")


def _prepared(params: Params) -> Path:
    return params.prepared_dir("spines")


def _synthetic(params: Params) -> Path:
    return params.dataset_source("spines")


# ------------------------------------------------------------------------------- convert
def convert_yolo(params: Params, out_dir: Path = YOLO_DATA) -> dict[str, Any]:
    from microseg.data.yolo_convert import convert_d3set_to_yolo, read_summary

    c = params.yolo.convert
    src = _synthetic(params)
    data_yaml = convert_d3set_to_yolo(
        src / "train.d3set",
        src / "val.d3set",
        out_dir,
        min_box_px=c.min_box_px,
        max_box_px=c.max_box_px,
        channels=c.channels,
        norm_percentiles=c.norm_percentiles,
        include_empty=c.include_empty,
        pad_px=c.pad_px,
        box=c.box,
        seed=params.seed,
    )
    summary = read_summary(out_dir)
    log.info("YOLO dataset %s: %s", data_yaml, summary)
    return summary


# --------------------------------------------------------------------------------- train
def yolo_data(params: Params) -> Path:
    """The Ultralytics dataset yaml the ``yolo`` family trains on (``convert_yolo``'s)."""
    data_yaml = YOLO_DATA / "spine_detection.yaml"
    if not data_yaml.exists():
        raise MissingFileError("YOLO dataset missing; run `microseg convert yolo`", data_yaml)
    return data_yaml


def yolo_section(params: Params) -> dict[str, Any]:
    """``yolo.train`` plus the ``meta`` the detector keeps (its input channels)."""
    return {**params.yolo.train.model_dump(), "meta": {"channels": params.yolo.convert.channels}}


def train_yolo(params: Params, hooks=None, out_dir: Path = YOLO_MODEL_DIR) -> dict[str, Any]:
    from microseg.config import YoloTrainConfig
    from microseg.models import get_model
    from microseg.stages.tuned import tuned_train_config

    section = tuned_train_config(params, "yolo", yolo_section(params))
    meta = section.pop("meta")
    from microseg.stages.finetune import resolve_init_from

    t = YoloTrainConfig.model_validate(resolve_init_from(section, params, "yolo"))
    data_yaml = yolo_data(params)
    t0 = time.perf_counter()
    result = get_model("yolo").train(data_yaml, out_dir, {**t.model_dump(), "meta": meta}, hooks)
    best = Path(result.best or result.last)
    with atomic_path(out_dir / "best.pt") as tmp:
        tmp.write_bytes(best.read_bytes())
    return {"train_seconds": time.perf_counter() - t0, "best": str(out_dir / "best.pt")}


# ---------------------------------------------------------------------------------- eval
class _YoloOnDevice:
    """A detector whose every prediction runs on one device (``yolo.predict.device``)."""

    def __init__(self, detector: Any, device: str) -> None:
        self._detector, self._device = detector, device

    def predict(self, images: list[np.ndarray], **kwargs: Any) -> list[np.ndarray]:
        return self._detector.predict(images, device=self._device, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)


def load_yolo(weights: Path, params: Params) -> Any:
    """Trained YOLO weights, predicting on ``yolo.predict.device`` when that is set."""
    from microseg.models.yolo import YoloSpineDetector

    det = YoloSpineDetector.load(weights)
    device = params.yolo.predict.device
    return det if device is None else _YoloOnDevice(det, device)


def _raw_detections(det, sample: Sample, params: Params) -> pd.DataFrame:
    from microseg.infer.yolo_predict import predict_stack

    # every box the sweep may keep: its lowest confidence, no NMS yet (the sweep applies both)
    return predict_stack(
        det, sample.image_path, conf=min(params.yolo.sweep.confs), iou=1.0,
        **yolo_stack_kwargs(params),
    )  # fmt: skip


def yolo_stack_kwargs(params: Params) -> dict[str, Any]:
    """``predict_stack``'s arguments other than ``conf``/``iou``, as the detector was trained
    (channels, normalisation) and as ``yolo.predict`` asks (tiles, batches): one source for the
    pipeline's evaluation and ``microseg predict``."""
    p, c = params.yolo.predict, params.yolo.convert
    return {
        "tile": p.tile, "fusion": p.fusion, "batch_planes": p.batch_planes,
        "channels": c.channels, "norm_percentiles": c.norm_percentiles, "max_det": p.max_det,
    }  # fmt: skip


def _sweep(raw: pd.DataFrame, sample: Sample, params: Params, out_dir: Path | None) -> pd.DataFrame:
    from microseg.infer.yolo_predict import sweep

    s = params.spines
    return sweep(
        raw,
        sample.points(),
        sample.voxel_size_nm,
        params.yolo.sweep.confs,
        params.yolo.sweep.ious,
        out_dir,
        dedup_radius_nm=s.dedup_radius_nm,
        dedup_mode=s.dedup_mode,
        max_dist_nm=s.match_dist_nm,
    )


def _write_raw(out_dir: Path, sample: Sample, raw: pd.DataFrame) -> None:
    """Raw per-plane boxes (lowest sweep confidence, no NMS): the input of fusion."""
    with atomic_path(out_dir / f"{sample.sample_id}_raw.csv") as tmp:
        raw.to_csv(tmp, index=False)


def _pooled(tables: list[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """Sum TP/FP/FN over stacks per setting, then P/R/F1 of the pooled counts."""
    pooled = pd.concat(tables).groupby(keys, as_index=False)[["tp", "fp", "fn"]].sum()
    metrics = [prf(r.tp, r.fp, r.fn) for r in pooled.itertuples()]
    return pooled.assign(**pd.DataFrame(metrics)[["precision", "recall", "f1"]])


def _best(table: pd.DataFrame) -> pd.Series:
    """Highest F1; ties to the higher confidence/threshold (fewer, surer detections)."""
    return table.sort_values(["f1", *table.columns[:1]], ascending=False).iloc[0]


def eval_yolo(params: Params, out_dir: Path = YOLO_REPORT) -> dict[str, Any]:
    """Thresholds chosen on validation, scored on the benchmark; writes the raw boxes, the
    PR curve (``plots/spines_yolo_pr.csv``) and ``metrics/spines_yolo.json``."""
    from microseg.infer.yolo_predict import detections_to_points, nms_per_plane

    weights = YOLO_MODEL_DIR / "best.pt"
    if not weights.exists():
        raise MissingFileError("trained YOLO weights missing; run `microseg train`", weights)
    det = load_yolo(weights, params)
    prepared = _prepared(params)
    val = []
    for s in samples(prepared, "val"):
        raw_val = _raw_detections(det, s, params)
        _write_raw(out_dir, s, raw_val)
        val.append(_sweep(raw_val, s, params, None))
    chosen = _best(_pooled(val, ["conf", "iou"]))
    conf, iou = float(chosen["conf"]), float(chosen["iou"])
    (bench,) = samples(prepared, "test")
    raw = _raw_detections(det, bench, params)
    _write_raw(out_dir, bench, raw)
    table = _sweep(raw, bench, params, out_dir / "benchmark_sweep")
    row = table[(table["conf"] == conf) & (table["iou"] == iou)].iloc[0]
    s = params.spines
    pts = detections_to_points(
        nms_per_plane(raw, iou=iou, conf=conf), bench.voxel_size_nm, s.dedup_radius_nm, s.dedup_mode
    )
    with atomic_path(out_dir / "benchmark_points.csv") as tmp:
        pts.to_csv(tmp, index=False)
    pr = table[table["iou"] == iou].sort_values("conf")[["conf", "precision", "recall", "f1"]]
    write_pr_plot(pr, "spines_yolo", params)
    out = {
        "benchmark": prf(row.tp, row.fp, row.fn),
        "val": prf(int(chosen["tp"]), int(chosen["fp"]), int(chosen["fn"])),
        "conf": conf,
        "iou": iou,
        "match_dist_nm": s.match_dist_nm,
    }
    write_json(metrics_file(params, "spines_yolo"), out)
    return out


def pr_plot_paths(params: Params, name: str) -> tuple[Path, Path]:
    """The PR curve of ``name`` as a DVC plot (CSV) and as a figure (PNG)."""
    return PLOTS_DIR / f"{name}_pr.csv", params.paths.reports / "spines" / f"{name}_pr.png"


def write_pr_plot(curve: pd.DataFrame, name: str, params: Params) -> tuple[Path, Path]:
    from microseg.report.figures import pr_curve_figure

    csv, png = pr_plot_paths(params, name)
    with atomic_path(csv) as tmp:
        curve.to_csv(tmp, index=False)
    pr_curve_figure(curve.assign(method=name), png)
    return csv, png


# ---------------------------------------------------------------------------- LoG baseline
def _log_counts(
    stack: np.ndarray, sample: Sample, params: Params, kw: dict
) -> tuple[dict[str, int], pd.DataFrame]:
    from microseg.infer.blobs import detect_blobs_log

    s = params.spines
    det = detect_blobs_log(
        stack,
        sample.voxel_size_nm,
        dedup_radius_nm=s.dedup_radius_nm,
        dedup_mode=s.dedup_mode,
        **kw,
    )
    gt = sample.points()
    m = match_points(
        det[["z", "y", "x"]].to_numpy(float),
        gt[["z", "y", "x"]].to_numpy(float),
        sample.voxel_size_nm,
        s.match_dist_nm,
    )
    return {"tp": m.tp, "fp": m.fp, "fn": m.fn}, det


def baseline_log(params: Params, out_dir: Path = LOG_REPORT) -> dict[str, Any]:
    """Grid-search the LoG parameters on the validation stacks, report on the benchmark
    (``metrics/spines_log.json``)."""
    cfg = params.baseline_log
    prepared = _prepared(params)
    val = [(s, tiff.read_stack(s.image_path)) for s in samples(prepared, "val")]
    keys = list(cfg.grid)
    rows = []
    for values in itertools.product(*(cfg.grid[k] for k in keys)):
        kw = dict(zip(keys, values, strict=True)) | cfg.fixed
        if kw.get("min_sigma", 0) > kw.get("max_sigma", np.inf):
            continue
        counts = [_log_counts(stack, s, params, kw)[0] for s, stack in val]
        tp, fp, fn = (sum(c[k] for c in counts) for k in ("tp", "fp", "fn"))
        rows.append({**kw, **prf(tp, fp, fn)})
    table = pd.DataFrame(rows)
    best = table.sort_values("f1", ascending=False, kind="stable").iloc[0]
    best_kw = {k: best[k] for k in keys} | cfg.fixed
    (bench,) = samples(prepared, "test")
    counts, det = _log_counts(tiff.read_stack(bench.image_path), bench, params, best_kw)
    with atomic_path(out_dir / "val_grid.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "benchmark_points.csv") as tmp:
        det.to_csv(tmp, index=False)
    out = {
        "benchmark": prf(**counts),
        "val": prf(int(best["tp"]), int(best["fp"]), int(best["fn"])),
        "params": best_kw,
        "match_dist_nm": params.spines.match_dist_nm,
    }
    write_json(metrics_file(params, "spines_log"), out)
    return out
