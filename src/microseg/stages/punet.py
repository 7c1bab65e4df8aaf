"""Prob-UNet stages: ``train_punet``, ``train_hpunet``, ``predict_punet``, ``uncertainty``,
``inter_rater``.

``spines.prob_model`` picks the probabilistic segmenter (``punet``: the flat Prob-UNet in
``models/punet``; ``hpunet``: the hierarchical one in ``models/hpunet``); ``predict_punet``
writes its samples' sums to ``reports/spines/punet`` either way, so ``uncertainty``,
``inter_rater`` and the fusion read them unchanged.

Benchmark numbers are measured on the held-out benchmark stack; everything tuned (the DoG
baseline's parameters) is tuned on a validation stack.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.data.ingest import SPINE_CLASSES
from microseg.errors import MissingFileError
from microseg.io import tiff
from microseg.stages.common import Sample, metrics_file, samples, torch_device, write_json

log = logging.getLogger(__name__)

MODEL_DIR = Path("models/punet")
HPUNET_DIR = Path("models/hpunet")
PRED_DIR = Path("reports/spines/punet")
UNC_DIR = Path("reports/spines/uncertainty")
RATER_DIR = Path("reports/spines/inter_rater")
HEADS = ("spine", "dendrite")


def _source(params: Params) -> Path:
    return params.dataset_source("spines")


def _targets(sample: Sample) -> dict[str, np.ndarray]:
    labels = tiff.read_stack(sample.label_path)
    return {h: labels == SPINE_CLASSES[h] for h in HEADS}


def punet_data(params: Params) -> tuple[Path, Path]:
    """The ``(train, val)`` d3sets the ``punet`` family trains on."""
    src = _source(params)
    return src / "train.d3set", src / "val.d3set"


def prob_model_dir(params: Params) -> Path:
    """Where the probabilistic segmenter ``spines.prob_model`` names is trained."""
    return HPUNET_DIR if params.spines.prob_model == "hpunet" else MODEL_DIR


def load_prob_model(path: str | Path, map_location: Any = "cpu") -> Any:
    """The family façade (``predict_stack``, ``network``) of a flat or hierarchical Prob-UNet
    file, told apart by the file's format tag."""
    from microseg.models import get_model

    family = "hpunet" if get_model("hpunet").owns(path) else "punet"
    return get_model(family).load(path, map_location=map_location)


def hpunet_section(params: Params) -> dict[str, Any]:
    """``hpunet.train`` over the engine section (as :func:`punet_section`)."""
    from microseg.stages.finetune import resolve_init_from

    section = params.engine.train_section(dict(params.hpunet.train))
    return resolve_init_from(section, params, "hpunet")


def train_hpunet_stage(params: Params, hooks=None, out_dir: Path = HPUNET_DIR) -> dict[str, Any]:
    """The hierarchical Prob-UNet on the flat one's d3sets -> ``models/hpunet/best.pt``."""
    from microseg.models import get_model

    t0 = time.perf_counter()
    result = get_model("hpunet").train(punet_data(params), out_dir, hpunet_section(params), hooks)
    if result.best_path is None:
        raise MissingFileError("training produced no best checkpoint", out_dir)
    return {
        "train_seconds": time.perf_counter() - t0,
        "best_epoch": result.best_epoch,
        **{f"best_{k}": v for k, v in result.best.items()},
    }


def punet_section(params: Params) -> dict[str, Any]:
    """``punet.train`` over the engine section (no progress bar unless it asks for one, as
    for every family the stages train through the registry)."""
    from microseg.stages.finetune import resolve_init_from

    return resolve_init_from(params.engine.train_section(dict(params.punet.train)), params, "punet")


def train_punet_stage(params: Params, hooks=None, out_dir: Path = MODEL_DIR) -> dict[str, Any]:
    from microseg.models import get_model
    from microseg.stages.tuned import tuned_train_config

    section = tuned_train_config(params, "punet", punet_section(params))
    t0 = time.perf_counter()
    result = get_model("punet").train(punet_data(params), out_dir, section, hooks)
    if result.best_path is None:
        raise MissingFileError("training produced no best checkpoint", out_dir)
    return {
        "train_seconds": time.perf_counter() - t0,
        "best_epoch": result.best_epoch,
        **{f"best_{k}": v for k, v in result.best.items()},
    }


def predict_stack(model, path: Path, params: Params) -> dict[str, Any]:
    """The Prob-UNet over one stack file with the ``punet.predict`` knobs (the evaluate stage
    and ``microseg predict -m punet`` both run it). ``model``: a family façade (either
    Prob-UNet family, see :func:`load_prob_model`) or a flat :class:`ProbUNet` network."""
    from microseg.models.punet.predict import predict_stack_punet

    p = params.punet.predict
    run = getattr(model, "predict_stack", None) or functools.partial(predict_stack_punet, model)
    with tiff.open_stack(path) as stack:
        return run(
            stack,
            n_samples=p.n_samples,
            temperature=p.temperature,
            tile=p.tile,
            batch_planes=p.batch_planes,
            seed=params.seed,
            device=torch_device(p.device),
        )


def _predict(model, sample: Sample, params: Params, out_dir: Path) -> dict[str, Any]:
    from microseg.models.punet.predict import write_predictions

    p = params.punet.predict
    result = predict_stack(model, sample.image_path, params)
    write_predictions(
        out_dir,
        result,
        sample.voxel_size_nm,
        size_thr=p.size_thr,
        prob_thr=p.prob_thr,
        model=params.spines.prob_model,
    )
    return result


def predict_punet(params: Params, out_dir: Path = PRED_DIR) -> dict[str, Any]:
    """Predict validation and benchmark stacks; Dice/IoU/ECE per head; DoG baseline
    (``metrics/spines_punet.json``)."""
    from microseg.evaluate.calibration import calibration_summary, reliability_table
    from microseg.evaluate.segmentation import segmentation_metrics, threshold_sweep
    from microseg.models.classical.dog import dog_baseline, tune_dog
    from microseg.models.punet.predict import remove_small
    from microseg.report.figures import reliability_diagram

    family = params.spines.prob_model
    weights = prob_model_dir(params) / "best.pt"
    if not weights.exists():
        hint = f"run `microseg train -m {family}`"
        raise MissingFileError(f"trained {family} missing; {hint}", weights)
    model = load_prob_model(weights)
    prepared = params.prepared_dir("spines")
    p = params.punet.predict
    probs: dict[str, dict[str, np.ndarray]] = {}
    metrics: dict[str, Any] = {}
    val, (bench,) = samples(prepared, "val"), samples(prepared, "test")
    for sample in [*val, bench]:
        result = _predict(model, sample, params, out_dir / sample.sample_id)
        probs[sample.sample_id] = {h: np.asarray(result[f"prob_{h}"], np.float32) for h in HEADS}
    # the probability threshold per head is tuned on the validation stacks (pooled)
    thresholds = {}
    for head in HEADS:
        pooled = np.concatenate([probs[s.sample_id][head].ravel() for s in val])
        target = np.concatenate([_targets(s)[head].ravel() for s in val])
        table = threshold_sweep(pooled, target, np.arange(1, 40) / 40)
        thresholds[head] = float(table.sort_values("dice", ascending=False).iloc[0]["threshold"])
    for sample in [*val, bench]:
        targets = _targets(sample)
        entry = {}
        for head in HEADS:
            prob = probs[sample.sample_id][head]
            fixed = tiff.read_stack(next((out_dir / sample.sample_id).glob(f"mask_{head}_*.tif")))
            tuned = remove_small(prob >= thresholds[head], p.size_thr)
            entry[head] = {
                **segmentation_metrics(tuned, targets[head]),
                "threshold": thresholds[head],
                f"dice_at_{p.prob_thr:g}": segmentation_metrics(fixed > 0, targets[head])["dice"],
                **calibration_summary(prob, targets[head]),
            }
            if sample is bench:
                table = reliability_table(prob, targets[head])
                reliability_diagram(table, out_dir / f"reliability_{head}.png")
        metrics[sample.sample_id] = entry
    # classical floor: DoG tuned on the first validation stack, applied to the benchmark
    best, _ = tune_dog(tiff.read_stack(val[0].image_path), _targets(val[0])["spine"])
    dog = dog_baseline(tiff.read_stack(bench.image_path), **best)
    metrics["dog_baseline"] = {
        "params": best,
        "spine": segmentation_metrics(dog, _targets(bench)["spine"]),
    }
    metrics["settings"] = {
        "n_samples": p.n_samples,
        "temperature": p.temperature,
        "prob_thr": p.prob_thr,
        "size_thr": p.size_thr,
        "prob_model": family,
    }
    metrics["benchmark"] = metrics.pop(bench.sample_id)
    write_json(metrics_file(params, "spines_punet"), metrics)
    return metrics


def _maps(pred_dir: Path, head: str) -> dict[str, np.ndarray]:
    import json

    from microseg.stages.uncertainty_maps import maps_from_sums

    def read(name: str) -> np.ndarray:
        return tiff.read_stack(pred_dir / f"{name}_{head}.tif")

    n = int(json.loads((pred_dir / "punet_prediction.json").read_text())["n_samples"])
    return maps_from_sums(read("sum_p"), read("sum_p2"), read("sum_entropy"), n)


def uncertainty(params: Params, out_dir: Path = UNC_DIR) -> dict[str, Any]:
    """Mean, variance, entropy, MI and aleatoric maps of the benchmark, plus panel figures
    (written as ``microseg uncertainty STACK`` writes a user's stack)."""
    from microseg.stages.uncertainty_maps import write_uncertainty_maps

    prepared = params.prepared_dir("spines")
    (bench,) = samples(prepared, "test")
    image = tiff.read_stack(bench.image_path)
    summary = {}
    for head in HEADS:
        summary[head] = write_uncertainty_maps(
            out_dir,
            head,
            image,
            _maps(PRED_DIR / bench.sample_id, head),
            bench.voxel_size_nm,
            planes=params.punet.uncertainty_planes or [image.shape[0] // 2],
            title=f"Prob-UNet {head} uncertainty (benchmark)",
            gt=_targets(bench)[head],
        )
    return summary


def inter_rater(params: Params, out_dir: Path = RATER_DIR) -> dict[str, Any]:
    """Rater disagreement vs model uncertainty: Spearman and AUROC, with the ROC figure
    (``metrics/spines_inter_rater.json``)."""
    from microseg.evaluate.inter_rater import (
        disagreement_map,
        fleiss_kappa,
        near_foreground,
        pairwise_dice,
    )
    from microseg.report.figures import uncertainty_panel
    from microseg.stages.uncertainty_maps import write_disagreement_scores

    raters_dir = _source(params) / "raters"
    prepared = params.prepared_dir("spines")
    (bench,) = samples(prepared, "test")
    out: dict[str, Any] = {}
    for head in HEADS:
        paths = sorted(raters_dir.glob(f"rater*_{head}s.tif"))
        if len(paths) < 3:
            raise MissingFileError(
                f"need >= 3 raters' {head} masks, found {len(paths)}", raters_dir
            )
        masks = [tiff.read_stack(p) > 0 for p in paths]
        dis = disagreement_map(masks)
        tiff.write_stack(out_dir / f"disagreement_{head}.tif", dis.astype(np.float32))
        region = near_foreground(masks, radius=params.punet.rater_region_px)
        maps = _maps(PRED_DIR / bench.sample_id, head)
        table = write_disagreement_scores(out_dir, head, maps, dis, region, params.seed)
        z = int(np.argmax(dis.sum(axis=(1, 2))))
        uncertainty_panel(
            tiff.read_stack(bench.image_path),
            maps,
            out_dir / f"panel_{head}.png",
            raters=masks,
            disagreement=dis,
            planes=[z],
            title=f"{head}: model uncertainty vs rater disagreement (plane {z})",
        )
        out[head] = {
            "fleiss_kappa": fleiss_kappa(masks, mask=region),
            "mean_pairwise_dice": float(pairwise_dice(masks)["dice"].mean()),
            "disagreement_fraction": float((dis > 0).mean()),
            **{
                f"{r.map}_{k}": float(getattr(r, k))
                for r in table.itertuples()
                for k in ("auroc", "spearman")
            },
        }
    write_json(metrics_file(params, "spines_inter_rater"), out)
    return out
