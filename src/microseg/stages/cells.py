"""Nuclei benchmark stages: targets, training and evaluation per model, and the report.

``prepare_targets`` caches normalised images, 3-class targets and U-Net weight maps of the
nuclei dataset; ``train_cells@<model>`` trains one model of ``cells.models`` (a U-Net
architecture or Mask R-CNN; the classical baseline has nothing to train);
``evaluate_cells@<model>`` predicts the held-out split and scores it with the same metric
names for every model (instance F1 at IoU thresholds, COCO AP, Dice, Rand error, VOI,
calibration, error categories, count errors and object sizes); ``report`` puts all of them
into ``reports/benchmark/``.

Every family is reduced to one predictor type, ``raw image -> (labels uint16, foreground
probability or None, per-instance scores or None)``, so evaluation never asks which family
it is scoring.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from microseg.config import CellModelConfig, Params
from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.io.tiff import read_stack, write_stack
from microseg.models import InstanceSegmenter, Predictor, get_model
from microseg.stages.common import metrics_file, write_json
from microseg.utils.atomic import atomic_path

if TYPE_CHECKING:
    from microseg.evaluate.instances import InstanceEvaluation

log = logging.getLogger(__name__)

TARGETS_ROOT = Path("data/targets")
MODELS_ROOT = Path("models/cells")
REPORTS_ROOT = Path("reports/cells")
#: the post-processing ``evaluate_cells`` chose on validation, in ``REPORTS_ROOT/<name>/``
POSTPROCESS_FILE = "postprocess.json"
BENCHMARK_DIR = Path("reports/benchmark")
INFO_NAME = "train_info.json"
#: what evaluation measures in seconds: logged to MLflow, kept out of the DVC metrics file
TIMED = ("predict_seconds_per_image",)


def targets_dir(params: Params) -> Path:
    return TARGETS_ROOT / params.cells.dataset


def model_config(params: Params, name: str) -> CellModelConfig:
    models = params.cells.all_models()
    if name not in models:
        raise ConfigError(f"unknown cells model {name!r}; params.yaml defines {sorted(models)}")
    return models[name]


def prepare_targets_stage(
    params: Params, out_dir: Path | None = None, prepared: Path | None = None
) -> dict[str, Any]:
    """Targets of ``cells.dataset`` (or of another prepared folder, ``prepared``: e.g. the
    synthetic images of ``microseg synth-study``) with the ``cells.targets`` settings."""
    from microseg.data.targets import WeightMapConfig, prepare_targets

    t = params.cells.targets
    out_dir = out_dir or targets_dir(params)
    index = prepare_targets(
        prepared or params.paths.prepared / params.cells.dataset,
        out_dir,
        WeightMapConfig(w0=t.w0, sigma=t.sigma, max_class_weight=t.max_class_weight),
        tuple(t.percentiles),
    )
    return {
        "n_" + str(k): int(v) for k, v in index["split"].value_counts().sort_index().items()
    } | {"n_instances": int(index["n_instances"].sum())}


# ------------------------------------------------------------------------------- training
def train_cell_model(
    params: Params,
    name: str,
    hooks=None,
    out_dir: Path | None = None,
    targets: Path | None = None,
) -> dict[str, Any]:
    """Train one model of ``cells.models`` through its registered family (into
    ``models/cells/<name>`` unless ``out_dir`` says otherwise, e.g. a seed-spread run; on
    ``data/targets/<dataset>`` unless ``targets`` names another cache, e.g. a synth-study arm)."""
    mc = model_config(params, name)
    family = get_model(mc.family)
    if not getattr(family, "trainable", True):
        raise ConfigError(f"cells model {name!r} ({mc.family}) has nothing to train")
    out_dir = out_dir or MODELS_ROOT / name
    start = time.perf_counter()
    from microseg.stages.finetune import resolve_init_from

    train = resolve_init_from(params.engine.train_section(mc.train), params, "weights")
    result = family.train(targets or targets_dir(params), out_dir, train, hooks)
    out = {
        "best": dict(result.best),
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_completed,
        "seconds": result.seconds,
    }
    wall = time.perf_counter() - start
    # the run's own training time (a resumed run adds up its pieces) when the loop reports it
    seconds = float(out.get("seconds") or wall)
    n_params = count_parameters(out_dir / "best.pt")
    # no seconds here: train_info.json is hashed by DVC (times: timing.json and MLflow)
    info: dict[str, Any] = {"n_params": n_params, "family": mc.family}
    encoder = out_dir / "encoder.json"  # families that say which encoder ran (sac)
    if encoder.is_file():
        info |= {k: v for k, v in json.loads(encoder.read_text()).items() if k == "encoder"}
    write_json(out_dir / INFO_NAME, info | {"profile": params.profile})
    return out | {"seconds": seconds, "n_params": n_params}


def train_unet_model(
    train_cfg: dict[str, Any], data_dir: Path, out_dir: Path, hooks=None
) -> dict[str, Any]:
    """A 3-class U-Net on a targets cache (tracking's segmenter); best scores and timing."""
    result = get_model("unet").train(data_dir, out_dir, train_cfg, hooks)
    return {
        "best": result.best,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_completed,
        "seconds": result.seconds,
    }


def train_seconds(model_dir: Path) -> float | None:
    """The training time the engine recorded in ``model_dir/timing.json`` (None without)."""
    from microseg.train.engine import read_timing

    seconds = read_timing(model_dir).get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


def count_parameters(weights: Path) -> int | None:
    """Parameters stored in a model file's ``model`` state dict (None when there is none)."""
    if not weights.is_file():
        return None
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"not a readable model file ({type(exc).__name__}: {exc})"
        raise DataFormatError(msg, weights) from exc
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        return None
    return int(sum(v.numel() for v in state.values() if hasattr(v, "numel")))


# ------------------------------------------------------------------------------- prediction
def load_model(
    mc: CellModelConfig, model_dir: Path, post: dict[str, Any] | None = None
) -> InstanceSegmenter:
    """The family's model, loaded from ``model_dir/best.pt`` with its params sections."""
    family = get_model(mc.family)
    weights = model_dir / "best.pt"
    if getattr(family, "trainable", True) and not weights.is_file():
        raise MissingFileError(f"no trained weights; run train_cells@{model_dir.name}", weights)
    return family.load(weights, train=mc.train, infer=mc.infer, post=post)


def tune_postprocess(
    params: Params, name: str, out_dir: Path, model_dir: Path | None = None
) -> dict[str, Any] | None:
    """Post-processing thresholds chosen on the validation split (``cells.post_grid``), for
    families that expose probabilities; the table goes to ``out_dir/postprocess_search.csv``.
    With ``cells.post_by_modality`` each image kind's own validation images may then choose
    knobs of their own (``by_modality``; table ``postprocess_search_by_modality.csv``).
    None when the grid is empty or the family has no probability map to search on."""
    from microseg.infer.modality import image_modality
    from microseg.tune.postprocess import search_by_modality, search_postprocess

    mc = model_config(params, name)
    grid = post_grid_for(params, mc.family)
    if not grid:
        return None
    model = load_model(mc, model_dir or MODELS_ROOT / name)
    if not hasattr(model, "probabilities"):
        return None
    prepared = params.paths.prepared / params.cells.dataset
    from microseg.data.manifest import read_manifest

    m = read_manifest(prepared)
    rows = m[(m["split"] == "val") & (m["label_kind"] == "instance")]
    if params.cells.max_images is not None:
        rows = rows.head(params.cells.max_images)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def maps(r: Any) -> tuple[np.ndarray, np.ndarray]:  # each image's probabilities once
        if r.sample_id not in cache:
            image = read_stack(prepared / r.image_path)
            cache[r.sample_id] = (model.probabilities(image), read_stack(prepared / r.label_path))
        return cache[r.sample_id]

    shared_rows = rows
    if params.cells.post_max_images is not None:
        shared_rows = stratified_head(rows, params.cells.post_max_images)
    probs, gts = zip(*(maps(r) for r in shared_rows.itertuples()), strict=True)
    chosen, table = search_postprocess(probs, gts, model.infer.post, grid)
    with atomic_path(out_dir / "postprocess_search.csv") as tmp:
        table.to_csv(tmp, index=False)
    by = params.cells.post_by_modality
    if by is not None:
        kinds = [image_modality(read_stack(prepared / r.image_path)) for r in rows.itertuples()]
        shared_ids = set(shared_rows["sample_id"])
        picked = []
        for _, g in rows.assign(kind=kinds).groupby("kind", sort=True):
            # the kind's images the shared search saw first, topped up to max_images
            seen = g["sample_id"].isin(shared_ids)
            n = max(int(seen.sum()), by.max_images or len(g))
            picked.append(pd.concat([g[seen], g[~seen]]).head(n))
        picked = pd.concat(picked)
        probs, gts = zip(*(maps(r) for r in picked.itertuples()), strict=True)
        chosen, table = search_by_modality(
            probs, gts, list(picked["kind"]), chosen, grid, by.min_images
        )
        with atomic_path(out_dir / "postprocess_search_by_modality.csv") as tmp:
            table.to_csv(tmp, index=False)
    from dataclasses import asdict

    return asdict(chosen)


def chosen_postprocess(name: str) -> dict[str, Any] | None:
    """What :func:`tune_postprocess` chose for model ``name`` (None before its evaluation, or
    for a family without a search): what a packaged model must predict with."""
    path = REPORTS_ROOT / name / POSTPROCESS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def post_grid_for(params: Params, family: str) -> dict[str, list[Any]]:
    """``cells.post_grids[family]`` when the family has its own grid, else ``cells.post_grid``."""
    from microseg.models import MODELS

    unknown = sorted(set(params.cells.post_grids) - set(MODELS.names()))
    if unknown:
        raise ConfigError(
            f"cells.post_grids names unknown families {unknown}; known: {sorted(MODELS.names())}"
        )
    return params.cells.post_grids.get(family, params.cells.post_grid)


def stratified_head(rows: pd.DataFrame, n: int, by: str = "modality") -> pd.DataFrame:
    """At most ``n`` rows, each ``by`` group keeping its share (at least one row per group),
    in manifest order within a group: a small search set that still sees every modality."""
    if len(rows) <= n:
        return rows
    groups = rows.groupby(by, sort=True)
    quota = {k: max(1, round(n * len(g) / len(rows))) for k, g in groups}
    return pd.concat([g.head(quota[k]) for k, g in groups]).sort_index()


def load_predictor(
    mc: CellModelConfig, model_dir: Path, post: dict[str, Any] | None = None
) -> Predictor:
    """The family's model behind one call: ``raw image -> (labels, fg prob, scores)``."""
    return load_model(mc, model_dir, post).as_predictor()


# ------------------------------------------------------------------------------- evaluation
def _rows(params: Params) -> pd.DataFrame:
    from microseg.data.manifest import read_manifest

    prepared = params.paths.prepared / params.cells.dataset
    m = read_manifest(prepared)
    rows = m[(m["split"] == params.cells.split) & (m["label_kind"] == "instance")]
    if rows.empty:
        raise ConfigError(f"no {params.cells.split!r} samples with instance labels in {prepared}")
    return rows if params.cells.max_images is None else rows.head(params.cells.max_images)


def evaluate_cell_model(
    params: Params,
    name: str,
    out_dir: Path | None = None,
    model_dir: Path | None = None,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Predict the held-out split with one model; write predictions, tables and metrics
    (``metrics/cells/<name>.json`` unless ``write_metrics`` is False). ``model_dir``: weights
    other than ``models/cells/<name>`` (a seed-spread run).

    Predicted objects above ``cells.max_area`` are dropped first (:func:`resolve_max_area`).
    ``out_dir`` gets ``per_image.csv`` (scores, error categories, ``count_error`` and
    ``count_rel_error``), ``objects.csv`` (one row per predicted object: ``image_id``, ``id``,
    centroid, ``area_px``, ``score`` = mean foreground probability when the family gives one)
    and the :data:`COUNT_FIGURES`; the metrics gain a ``counting`` block
    (:func:`microseg.evaluate.counting.counting_summary`) and ``pixel_confusion``."""
    from microseg.evaluate.coco_eval import coco_evaluate, coco_metrics
    from microseg.evaluate.counting import drop_large_objects, object_areas, object_table
    from microseg.evaluate.errors_analysis import error_table
    from microseg.evaluate.instances import InstanceSample, evaluate_instances
    from microseg.io.coco import write_coco

    mc = model_config(params, name)
    out_dir = out_dir or REPORTS_ROOT / name
    prepared = params.paths.prepared / params.cells.dataset
    samples, objects, true_areas, seconds = [], [], [], 0.0
    rows = _rows(params)
    max_area = resolve_max_area(params)
    with atomic_path(out_dir) as tmp:
        model_dir = model_dir or MODELS_ROOT / name
        post = tune_postprocess(params, name, tmp, model_dir)
        predictor = load_predictor(mc, model_dir, post=post)
        for row in tqdm(rows.itertuples(), total=len(rows), desc=f"evaluate {name}"):
            sid = str(row.sample_id)
            image = read_stack(prepared / row.image_path)
            gt = read_stack(prepared / row.label_path)
            t0 = time.perf_counter()
            labels, prob, scores = predictor(image)
            seconds += time.perf_counter() - t0
            labels = np.asarray(labels).astype(np.uint16, copy=False)
            labels = drop_large_objects(labels, max_area)
            write_stack(tmp / "labels" / f"{sid}.tif", labels)
            samples.append(InstanceSample(sid, gt, labels, scores, prob))
            table = object_table(labels, prob)
            objects.append(table.assign(image_id=sid, modality=str(row.modality)))
            true_areas.append(object_areas(gt))
        evaluation = evaluate_instances(samples, params.cells.iou_thresholds)
        coco = coco_evaluate(samples)
        metrics = {**evaluation.summary, **coco_metrics(coco)}
        metrics["predict_seconds_per_image"] = seconds / len(samples)
        if post is not None:
            (tmp / POSTPROCESS_FILE).write_text(json.dumps(post, indent=2))
        errors = error_table(
            [(s.image_id, s.gt, s.pred) for s in samples],
            threshold=params.cells.iou_thresholds[0],
        )
        shared = [c for c in errors.columns if c != "image_id" and c in evaluation.per_image]
        per_image = evaluation.per_image.merge(
            errors.drop(columns=shared), on="image_id", how="left"
        )
        modality = {str(r.sample_id): str(r.modality) for r in rows.itertuples()}
        per_image["modality"] = per_image["image_id"].map(modality)
        per_image = _with_counts(per_image)
        per_image.to_csv(tmp / "per_image.csv", index=False)
        _write_overlays(samples, prepared, rows, per_image, tmp, name, params.cells.n_overlays)
        objects_df = pd.concat([t for t in objects if len(t)] or objects[:1], ignore_index=True)
        objects_df = objects_df[["image_id", *(c for c in objects_df if c != "image_id")]]
        objects_df.to_csv(tmp / "objects.csv", index=False)
        metrics["counting"] = _counting(
            per_image, np.concatenate(true_areas), objects_df["area_px"].to_numpy(), max_area
        )
        metrics["pixel_confusion"] = _write_count_figures(
            per_image, np.concatenate(true_areas), objects_df, evaluation, tmp, name, max_area
        )
        if evaluation.curves is not None:
            evaluation.curves.to_csv(tmp / "pixel_curves.csv", index=False)
        if evaluation.reliability is not None:
            evaluation.reliability.to_csv(tmp / "reliability.csv", index=False)
        from microseg.evaluate.coco_eval import to_coco

        data = to_coco(samples)
        write_coco(tmp / "coco_gt.json", data.gt)
        write_coco(tmp / "coco_results.json", data.results)
    out = {k: _num(v) for k, v in metrics.items()} | {"profile": params.profile}
    # the DVC metrics file holds scores only: a time would differ on every run (MLflow has it)
    if write_metrics:
        scores = {k: v for k, v in out.items() if k not in TIMED}
        write_json(metrics_file(params, f"cells/{name}"), scores)
    return out


def _num(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------------- counting
#: per-model figures of ``evaluate_cells`` in ``REPORTS_ROOT/<name>/`` (file, caption); the
#: benchmark report copies the ones a model has
COUNT_FIGURES = (
    ("sizes.png", "object areas, true vs predicted"),
    ("confusion.png", "pixel confusion of the predicted foreground"),
    ("roc.png", "foreground pixel ROC"),
)


def resolve_max_area(params: Params) -> float | None:
    """``cells.max_area`` in pixels: as given, or for ``"p<q>"`` the q-th percentile of the
    training split's true object areas (read from the prepared labels); None when off."""
    from microseg.data.manifest import read_manifest
    from microseg.evaluate.counting import area_percentile

    v = params.cells.max_area
    if v is None or not isinstance(v, str):
        return v
    prepared = params.paths.prepared / params.cells.dataset
    m = read_manifest(prepared)
    rows = m[(m["split"] == "train") & (m["label_kind"] == "instance")]
    if rows.empty:
        raise ConfigError(
            f"cells.max_area {v!r} needs train samples with instance labels in {prepared}"
        )
    labels = (read_stack(prepared / r.label_path) for r in rows.itertuples())
    area = area_percentile(labels, float(v[1:]))
    log.info("max_area %s: %.1f px (train split, %d images)", v, area, len(rows))
    return area


def _with_counts(per_image: pd.DataFrame) -> pd.DataFrame:
    """``per_image`` with the count errors of its ``n_gt``/``n_pred`` columns."""
    from microseg.evaluate.counting import count_errors

    errors = count_errors(per_image["n_gt"], per_image["n_pred"])
    return per_image.drop(columns=list(errors), errors="ignore").join(errors)


def _counting(
    per_image: pd.DataFrame, true_areas: np.ndarray, pred_areas: np.ndarray, max_area: float | None
) -> dict[str, Any]:
    from microseg.evaluate.counting import counting_summary

    out = counting_summary(per_image["n_gt"], per_image["n_pred"], true_areas, pred_areas)
    return out | {"max_area": max_area}


def _write_count_figures(
    per_image: pd.DataFrame,
    true_areas: np.ndarray,
    objects: pd.DataFrame,
    evaluation: InstanceEvaluation,
    folder: Path,
    name: str,
    max_area: float | None,
) -> dict[str, int]:
    """The :data:`COUNT_FIGURES` of one model; returns the summed pixel confusion counts (of
    the predicted labels' foreground, i.e. at the chosen post-processing threshold)."""
    from microseg.report.figures import confusion_figure, roc_figure, size_histogram

    pred_areas = objects["area_px"].to_numpy()
    if true_areas.size or pred_areas.size:
        size_histogram(
            true_areas, pred_areas, folder / "sizes.png", title=f"{name}: object areas",
            max_area=max_area,
        )  # fmt: skip
    counts = {k: int(per_image[f"px_{k}"].sum()) for k in ("tp", "fp", "fn", "tn")}
    confusion_figure(**counts, out_png=folder / "confusion.png", title=f"{name}: pixels")
    curves = evaluation.curves  # pixel_curves.csv: tp/fp/fn/tn at every probability threshold
    if curves is not None and not curves.empty:
        fpr, tpr = curves["fpr"].to_numpy()[::-1], curves["tpr"].to_numpy()[::-1]
        auc = evaluation.summary.get("auroc")
        roc = {name: (np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0], auc)}
        roc_figure(roc, folder / "roc.png", title=f"{name}: foreground pixels ROC")
    return counts


# ------------------------------------------------------------------------------- report
def build_benchmark(params: Params, run_ids: dict[str, str] | None = None) -> Path:
    """``reports/benchmark/index.html`` (+ ``index.md``, ``comparison.csv|json``) of every
    model in ``cells.models`` against the baselines; a model's ``train_info.json`` keys
    ``encoder``/``backbone``/``profile`` are shown with its description."""
    from microseg.data.manifest import read_manifest
    from microseg.evaluate.instances import InstanceEvaluation
    from microseg.report.benchmark import ModelResult, Overlay, build_report, details_from_info

    prepared = params.paths.prepared / params.cells.dataset
    manifest = read_manifest(prepared)
    results = []
    for name, mc in params.cells.all_models().items():
        folder = REPORTS_ROOT / name
        metrics_path = params.paths.metrics / "cells" / f"{name}.json"
        if not metrics_path.is_file():
            raise MissingFileError(
                f"metrics of {name} missing; run evaluate_cells@{name}", metrics_path
            )
        metrics = json.loads(metrics_path.read_text())
        # flat for the tables: the counting block's scores join the others (count_mae, ...)
        counting = metrics.get("counting") or {}
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        metrics |= {k: v for k, v in counting.items() if k.startswith("count_")}
        per_image = pd.read_csv(folder / "per_image.csv")
        curves = folder / "pixel_curves.csv"
        rel = folder / "reliability.csv"
        info_path = MODELS_ROOT / name / INFO_NAME
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info["seconds"] = train_seconds(MODELS_ROOT / name)
        evaluation = InstanceEvaluation(
            per_image,
            metrics,
            pd.read_csv(curves) if curves.is_file() else None,
            pd.read_csv(rel) if rel.is_file() else None,
        )
        overlays = [
            Overlay(o["image_id"], o["kind"], folder / o["file"], o["metric"], o["score"])
            for o in json.loads((folder / "overlays.json").read_text())
        ]
        results.append(
            ModelResult.from_evaluation(
                name,
                evaluation,
                train_seconds=info.get("seconds"),
                n_params=info.get("n_params"),
                mlflow_run_id=(run_ids or {}).get(name),
                overlays=overlays,
                baseline=mc.family == "classical",
                description=mc.description or mc.family,
                details=details_from_info(info),
                figures=[(folder / f, c) for f, c in COUNT_FIGURES if (folder / f).is_file()],
            )
        )
    context = {
        "dataset": params.cells.dataset,
        "split": params.cells.split,
        "images": str(int((manifest["split"] == params.cells.split).sum())),
    }
    from microseg.report.seed_spread import METRICS_NAME, read_spread, seed_differences

    spread = read_spread(params.paths.metrics / METRICS_NAME)
    here = (params.cells.dataset, params.cells.split)
    if spread and (spread.get("dataset"), spread.get("split")) != here:
        log.warning("%s is of another dataset or split than %s: not used", METRICS_NAME, here)
        spread = None
    seed_diffs = seed_differences(spread) if spread else None
    if spread:
        seeds = sorted({s for row in spread.get("models", {}).values() for s in row["seeds"]})
        context["seed spread"] = f"{METRICS_NAME}, seeds {', '.join(map(str, seeds))}"
    return build_report(
        results, BENCHMARK_DIR, context=context, manifest=manifest, seed_diffs=seed_diffs
    )


def _write_overlays(samples, prepared, rows, per_image, folder: Path, name: str, k: int) -> None:
    """Best and worst images (by F1@0.5) drawn into ``overlays/``, listed in overlays.json."""
    from microseg.report.instance_overlays import best_worst_overlays

    by_id = {s.image_id: s for s in samples}
    images = {str(r.sample_id): prepared / r.image_path for r in rows.itertuples()}

    def load(sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return read_stack(images[sid]), by_id[sid].gt, by_id[sid].pred

    made = best_worst_overlays(name, per_image, load, folder / "overlays", k=k)
    listing = [
        {
            "image_id": o.image_id,
            "kind": o.kind,
            "file": str(Path(o.path).relative_to(folder)),
            "metric": o.metric,
            "score": o.score,
        }
        for o in made
    ]
    (folder / "overlays.json").write_text(json.dumps(listing, indent=2))
