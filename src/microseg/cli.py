"""The one ``microseg`` command: every pipeline stage is a sub-command.

``dvc.yaml``, ``MLproject`` and the workflows call these; no logic lives in YAML or shell.
User errors (:class:`~microseg.errors.MicrosegError`) print one clear line and exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from microseg.errors import ConfigError, MicrosegError

app = typer.Typer(
    name="microseg",
    help="Reproducible microscopy segmentation and detection (DVC + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("microseg")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a param: key.sub=value")
]


def _params(path: Path, overrides: list[str] | None):
    import yaml

    from microseg.config import load_params

    pairs = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key] = yaml.safe_load(value)
    return load_params(path, pairs)


def _dataset(params, name: str):
    if name not in params.datasets:
        raise ConfigError(
            f"unknown dataset {name!r}; params.yaml defines {sorted(params.datasets)}"
        )
    return params.datasets[name]


@app.command()
def synth(
    target: Annotated[str, typer.Argument(help="spines, tracking or all")] = "all",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Generate the seeded synthetic datasets (spine stacks, tracking sequences)."""
    from microseg.data import synthesize
    from microseg.registry.tracking import stage_run

    params = _params(params_path, set_)
    targets = ["spines", "tracking"] if target == "all" else [target]
    for t in targets:
        if t not in synthesize.WRITERS:
            raise ConfigError(
                f"unknown synth target {t!r}; choose from {sorted(synthesize.WRITERS)}"
            )
        cfg = getattr(params.synth, t)
        with stage_run(params, stage=f"synth_{t}", task=t, dataset=f"synthetic_{t}", section=cfg):
            out = synthesize.WRITERS[t](cfg, params.paths.synthetic / t)
        typer.echo(f"synthetic {t} data written to {out}")


@app.command()
def ingest(
    dataset: Annotated[str, typer.Argument(help="dataset name from params.yaml `datasets`")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="parallel reader processes")] = None,
) -> None:
    """Native dataset -> data/prepared/<dataset> (canonical TIFFs + manifest.parquet)."""
    from microseg.data.ingest import ingest as run_ingest
    from microseg.data.manifest import read_manifest
    from microseg.registry.tracking import log_manifest, stage_run

    params = _params(params_path, set_)
    cfg = _dataset(params, dataset)
    with stage_run(params, stage="ingest", task=cfg.task, dataset=dataset, section=cfg):
        out = run_ingest(dataset, cfg, params.paths.prepared, params.seed, workers)
        manifest = read_manifest(out)
        log_manifest(manifest, out, dataset, context="ingest")
        import mlflow

        mlflow.log_metrics(
            {f"n_{split}": int(n) for split, n in manifest["split"].value_counts().items()}
        )
    typer.echo(f"{dataset}: {len(manifest)} samples -> {out}")


@app.command()
def validate(
    dataset: Annotated[str, typer.Argument(help="dataset name from params.yaml `datasets`")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Great Expectations checks on a prepared dataset; fails on bad data."""
    import mlflow

    from microseg.data.manifest import read_manifest
    from microseg.data.validate import validate_manifest
    from microseg.errors import ValidationFailed
    from microseg.registry.tracking import log_manifest, stage_run

    params = _params(params_path, set_)
    cfg = _dataset(params, dataset)
    prepared = params.paths.prepared / dataset
    report_dir = params.paths.reports / "validation" / dataset
    manifest = read_manifest(prepared)
    split = cfg.split if cfg.format == "dsb2018" else None
    with stage_run(
        params, stage="validate", task=cfg.task, dataset=dataset, section=params.validate_
    ):
        log_manifest(manifest, prepared, dataset, context="validate")
        try:
            report = validate_manifest(
                manifest,
                params.validate_,
                split,
                report_dir,
                dataset,
                source=prepared / "manifest.parquet",
            )
        except ValidationFailed:
            mlflow.set_tag("validation", "failed")
            if report_dir.exists():
                mlflow.log_artifacts(str(report_dir), "validation")
            raise
        mlflow.log_metrics({"n_expectations": report.n_expectations, "n_failed": report.n_failed})
        mlflow.set_tag("validation", "passed")
        mlflow.log_artifacts(str(report_dir), "validation")
    typer.echo(f"{dataset}: {report.n_expectations} expectations passed; report in {report_dir}")


def _log_metrics_tree(metrics: dict, prefix: str = "") -> None:
    """Numbers of a nested metrics dict into the active MLflow run (``a.b`` names)."""
    import mlflow

    from microseg.registry.mlflow_hooks import clean_metrics
    from microseg.registry.tracking import flatten

    flat = clean_metrics(
        {
            f"{prefix}{k}": v
            for k, v in flatten(metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    if flat:
        mlflow.log_metrics(flat)


def _write_pr_plot(curve, name: str, params) -> None:
    """PR curve as a DVC plot (CSV) and an MLflow figure artifact."""
    import mlflow

    from microseg.report.figures import pr_curve_figure
    from microseg.utils.atomic import atomic_path

    plots = Path("plots")
    with atomic_path(plots / f"{name}_pr.csv") as tmp:
        curve.to_csv(tmp, index=False)
    png = params.paths.reports / "spines" / f"{name}_pr.png"
    pr_curve_figure(curve.assign(method=name), png)
    mlflow.log_artifact(str(png), "plots")
    mlflow.log_artifact(str(plots / f"{name}_pr.csv"), "plots")


@app.command()
def convert(
    target: Annotated[str, typer.Argument(help="yolo: d3set -> Ultralytics dataset")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Convert a dataset into a model family's training format."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import spines

    if target != "yolo":
        raise ConfigError(f"unknown conversion {target!r}; available: yolo")
    params = _params(params_path, set_)
    section = params.yolo.convert
    with stage_run(params, stage="convert_yolo", task="spines", dataset="spines", section=section):
        summary = spines.convert_yolo(params)
        _log_metrics_tree(summary, "convert.")
    typer.echo(f"YOLO dataset in {spines.YOLO_DATA}")


@app.command()
def train(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="yolo, punet, tracking_seg, or a model of params.yaml `cells.models`",
        ),
    ] = "yolo",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train a model family; everything goes into one MLflow run; resumes when interrupted."""
    import mlflow

    from microseg.registry.mlflow_hooks import MlflowHook
    from microseg.registry.tracking import stage_run
    from microseg.stages import cells, punet, spines, tracking

    params = _params(params_path, set_)
    runners = {
        "yolo": (spines.train_yolo, params.yolo.train, spines.YOLO_MODEL_DIR, "spines", "spines"),
        "punet": (punet.train_punet_stage, params.punet.train, punet.MODEL_DIR, "spines", "spines"),
        "tracking_seg": (
            tracking.train_tracking_seg,
            params.tracking.seg,
            tracking.SEG_MODEL_DIR,
            "tracking",
            "tracking",
        ),
    }
    for name, mc in params.cells.models.items():
        if mc.family != "classical" and name not in runners:
            runners[name] = (
                lambda p, hooks=None, _n=name: cells.train_cell_model(p, _n, hooks),
                mc,
                cells.MODELS_ROOT / name,
                "nuclei",
                params.cells.dataset,
            )
    if model not in runners:
        raise ConfigError(f"unknown model {model!r}; trainable: {sorted(runners)}")
    fn, section, out_dir, task, dataset = runners[model]
    stage = f"train_{model}" if task != "nuclei" else "train_cells"
    with stage_run(
        params, stage=stage, task=task, dataset=dataset, section=section, run_name=f"train-{model}"
    ):
        mlflow.set_tag("microseg.model", model)
        out = fn(params, hooks=MlflowHook())
        _log_metrics_tree({k: v for k, v in out.items() if k != "best"})
        _log_metrics_tree({"best": out["best"]} if isinstance(out.get("best"), dict) else {})
        if (out_dir / "best.pt").is_file():
            mlflow.log_artifact(str(out_dir / "best.pt"), "model")
    typer.echo(f"{model} weights: {out_dir / 'best.pt'}")


@app.command("prepare-targets")
def prepare_targets_cmd(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Nuclei dataset -> normalised images, 3-class targets and U-Net weight maps (cached)."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import cells

    params = _params(params_path, set_)
    with stage_run(
        params,
        stage="prepare_targets",
        task="nuclei",
        dataset=params.cells.dataset,
        section=params.cells.targets,
    ):
        summary = cells.prepare_targets_stage(params)
        _log_metrics_tree(summary)
    typer.echo(f"targets of {summary} in {cells.targets_dir(params)}")


def _evaluate_cells(params, name: str) -> None:
    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import cells
    from microseg.stages.common import write_json

    mc = cells.model_config(params, name)
    with stage_run(
        params,
        stage="evaluate_cells",
        task="nuclei",
        dataset=params.cells.dataset,
        section=mc,
        run_name=f"evaluate-{name}",
    ) as run:
        mlflow.set_tags({"microseg.model": name, "microseg.family": mc.family})
        metrics = cells.evaluate_cell_model(params, name)
        path = write_json(params.paths.metrics / "cells" / f"{name}.json", metrics)
        _log_metrics_tree(metrics)
        mlflow.log_artifact(str(path), "metrics")
        mlflow.log_artifacts(str(cells.REPORTS_ROOT / name), "evaluation")
        write_json(cells.REPORTS_ROOT / name / "mlflow_run.json", {"run_id": run.info.run_id})
    typer.echo(
        f"{name}: F1@0.5 {metrics.get('f1_50', float('nan')):.3f}, "
        f"mask AP {metrics.get('segm_AP', float('nan')):.3f} -> {path}"
    )


@app.command()
def report(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """The nuclei benchmark report: reports/benchmark/index.html and index.md."""
    import json

    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import cells

    params = _params(params_path, set_)
    run_ids = {}
    for name in params.cells.all_models():
        f = cells.REPORTS_ROOT / name / "mlflow_run.json"
        if f.is_file():
            run_ids[name] = json.loads(f.read_text())["run_id"]
    with stage_run(
        params, stage="report", task="nuclei", dataset=params.cells.dataset, section=params.cells
    ):
        index = cells.build_benchmark(params, run_ids)
        mlflow.log_artifacts(str(index.parent), "benchmark")
    typer.echo(f"benchmark report: {index.resolve()}")


@app.command()
def track(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Link per-frame instance masks into tracks; write Cell Tracking Challenge results."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import tracking

    params = _params(params_path, set_)
    with stage_run(
        params, stage="track", task="tracking", dataset="tracking", section=params.tracking
    ):
        summary = tracking.track(params)
        _log_metrics_tree(summary)
    typer.echo(f"tracks of {sorted(summary)} in {tracking.RESULT_DIR}")


def _evaluate_tracking(params) -> None:
    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import tracking
    from microseg.stages.common import write_json

    with stage_run(
        params,
        stage="evaluate_tracking",
        task="tracking",
        dataset="tracking",
        section=params.tracking,
    ):
        result = tracking.evaluate_tracking(params)
        path = write_json(params.paths.metrics / "tracking.json", result)
        _log_metrics_tree({k: v for k, v in result.items() if isinstance(v, dict)})
        mlflow.log_artifact(str(path), "metrics")
    for seq, s in result.items():
        if isinstance(s, dict):
            typer.echo(
                f"sequence {seq}: SEG {s.get('SEG', float('nan')):.3f} DET {s['DET']:.3f} "
                f"TRA {s['TRA']:.3f}"
            )


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Option("--model", "-m", help="yolo, log, punet or a cells.models name")
    ] = "yolo",
    task: Annotated[str, typer.Option("--task", help="spines, nuclei or tracking")] = "spines",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Evaluate on held-out data: spine detectors/segmenters, or tracks (--task tracking)."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import spines
    from microseg.stages.common import write_json

    params = _params(params_path, set_)
    if task == "tracking":
        _evaluate_tracking(params)
        return
    if task in ("nuclei", "cells") or model in params.cells.all_models():
        _evaluate_cells(params, model)
        return
    if task != "spines":
        raise ConfigError(f"unknown task {task!r}; available: spines, tracking")
    from microseg.stages import punet

    runners = {
        "yolo": ("eval_yolo", spines.eval_yolo, params.yolo),
        "log": ("baseline_log", spines.baseline_log, params.baseline_log),
        "punet": ("predict_punet", punet.predict_punet, params.punet.predict),
    }
    if model not in runners:
        raise ConfigError(f"unknown model {model!r}; available: {sorted(runners)}")
    stage, fn, section = runners[model]
    with stage_run(params, stage=stage, task="spines", dataset="spines", section=section):
        result = fn(params)
        curve = result.pop("pr_curve", None)
        if curve is not None:
            _write_pr_plot(curve, f"spines_{model}", params)
        path = write_json(params.paths.metrics / f"spines_{model}.json", result)
        _log_metrics_tree({k: v for k, v in result.items() if k != "params"})
        import mlflow

        mlflow.log_artifact(str(path), "metrics")
    b = result["benchmark"]
    if model == "punet":
        typer.echo(
            f"punet: benchmark spine Dice {b['spine']['dice']:.3f}, dendrite Dice "
            f"{b['dendrite']['dice']:.3f}; DoG baseline spine Dice "
            f"{result['dog_baseline']['spine']['dice']:.3f} -> {path}"
        )
    else:
        typer.echo(
            f"{model}: benchmark F1 {b['f1']:.3f} (P {b['precision']:.3f}, "
            f"R {b['recall']:.3f}) at {params.spines.match_dist_nm:g} nm -> {path}"
        )


@app.command()
def predict(
    stack: Annotated[Path, typer.Argument(help="3D TIFF stack (ZYX) or a folder of them")],
    out: Annotated[Path, typer.Option("--out", "-o", help="result folder")],
    model: Annotated[str, typer.Option("--model", "-m", help="yolo or punet")] = "yolo",
    weights: Annotated[Path | None, typer.Option(help="default: models/<model>/best.pt")] = None,
    voxel_size: Annotated[
        str | None, typer.Option(help="z,y,x in nm when the TIFF does not carry it")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Predict stacks plane by plane (memory does not grow with depth); a folder gives one
    result folder per stack, and a stack that cannot be read is reported and skipped."""
    from tqdm.auto import tqdm

    from microseg.stages import punet as punet_stage
    from microseg.stages import spines as spines_stage

    params = _params(params_path, set_)
    if model == "yolo":
        from microseg.models.yolo import YoloSpineDetector

        net = YoloSpineDetector.load(weights or spines_stage.YOLO_MODEL_DIR / "best.pt")
    elif model == "punet":
        from microseg.models.punet import load_punet

        net = load_punet(weights or punet_stage.MODEL_DIR / "best.pt")
    else:
        raise ConfigError(f"unknown model {model!r}; available: yolo, punet")
    if not stack.is_dir():
        typer.echo(_predict_one(net, model, stack, out, _voxel(voxel_size), params))
        return
    stacks = sorted(p for p in stack.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not stacks:
        raise ConfigError(f"no .tif stacks in {stack}")
    failed = []
    for path in tqdm(stacks, desc=f"predict {model}"):
        try:
            msg = _predict_one(net, model, path, out / path.stem, _voxel(voxel_size), params)
            log.info("%s: %s", path.name, msg)
        except MicrosegError as exc:
            failed.append(path.name)
            typer.secho(f"skipped {path.name}: {exc}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"{len(stacks) - len(failed)} of {len(stacks)} stacks predicted -> {out}")
    if len(failed) == len(stacks):
        raise typer.Exit(1)


def _predict_one(net, model: str, stack: Path, out: Path, voxel_size, params) -> str:
    """One stack -> ``out``: YOLO boxes + 3D spines, or Prob-UNet maps."""
    from microseg.io import tiff
    from microseg.utils.atomic import atomic_path

    with tiff.open_stack(stack, expect_ndim=3) as st:
        voxel = voxel_size or st.voxel_size_nm or params.datasets["spines"].voxel_size_nm
    if model == "yolo":
        from microseg.infer.yolo_predict import detections_to_points, nms_per_plane, predict_stack

        p, c, s = params.yolo.predict, params.yolo.convert, params.spines
        boxes = predict_stack(
            net,
            stack,
            conf=p.conf,
            iou=p.iou,
            tile=p.tile,
            fusion=p.fusion,
            batch_planes=p.batch_planes,
            channels=c.channels,
            norm_percentiles=c.norm_percentiles,
            max_det=p.max_det,
        )
        boxes = nms_per_plane(boxes, iou=p.iou, conf=p.conf)
        points = detections_to_points(boxes, voxel, s.dedup_radius_nm, s.dedup_mode)
        for name, df in (("detections.csv", boxes), ("spines.csv", points)):
            with atomic_path(out / name) as tmp:
                df.to_csv(tmp, index=False)
        return f"{len(boxes)} boxes, {len(points)} spines after 3D dedup -> {out}"
    from microseg.infer.punet_predict import predict_stack_punet, write_predictions

    p = params.punet.predict
    with tiff.open_stack(stack) as st:
        result = predict_stack_punet(
            net,
            st,
            n_samples=p.n_samples,
            temperature=p.temperature,
            tile=p.tile,
            batch_planes=p.batch_planes,
            seed=params.seed,
        )
    write_predictions(out, result, voxel, size_thr=p.size_thr, prob_thr=p.prob_thr)
    return f"probabilities, masks and uncertainty sums -> {out}"


@app.command()
def tune(
    target: Annotated[str, typer.Option("--target", help="fusion, yolo or punet")] = "fusion",
    worker: Annotated[int, typer.Option(help="worker index when several share a study")] = 0,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Optuna study; each trial is a nested MLflow run; best params -> params/tuned_*.yaml."""
    import mlflow

    from microseg.registry.tracking import stage_run

    params = _params(params_path, set_)
    if target not in ("fusion", "yolo", "punet"):
        raise ConfigError(f"unknown tuning target {target!r}; available: fusion, yolo, punet")

    def on_trial(trial, metrics) -> None:
        from microseg.registry.tracking import flatten

        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params({k: str(v) for k, v in flatten(metrics.get("params", {})).items()})
            if "state" in metrics:
                mlflow.set_tag("optuna.state", metrics["state"])
            _log_metrics_tree(
                {k: v for k, v in metrics.items() if k not in ("params", "curve", "trial_dir")}
            )
            for epoch, value in enumerate(metrics.get("curve") or []):
                if value is not None:
                    mlflow.log_metric("curve", float(value), step=epoch)

    if target == "fusion":
        from microseg.stages import fusion

        with stage_run(
            params, stage="tune_fusion", task="spines", dataset="spines", section=params.fusion
        ):
            out = fusion.tune_fusion_stage(params, on_trial=on_trial)
            mlflow.log_metric("best_val_f1", out["best_val_f1"])
            mlflow.log_params({f"best.{k}": str(v) for k, v in out["best"].items()})
            mlflow.log_artifact(str(fusion.TUNED), "tuned")
        typer.echo(f"best validation F1 {out['best_val_f1']:.3f}; params in {fusion.TUNED}")
        return

    from microseg.stages import tuning
    from microseg.stages.common import write_json

    section = params.tune.get(target, {})
    with stage_run(
        params, stage=f"tune_{target}", task="spines", dataset="spines", section=section
    ):
        out = tuning.tune_training_stage(params, target, on_trial=on_trial, worker=worker)
        _log_metrics_tree({k: v for k, v in out.items() if k != "best"})
        from microseg.registry.tracking import flatten

        mlflow.log_params({f"best.{k}": str(v) for k, v in flatten(out["best"]).items()})
        mlflow.log_artifact(str(tuning.tuned_path(target)), "tuned")
        write_json(params.paths.metrics / f"tune_{target}.json", out)
    typer.echo(
        f"{target}: best {out.get('metric')} {out.get('best_value', float('nan')):.4f} "
        f"({out.get('n_complete', 0)} complete, {out.get('n_pruned', 0)} pruned); "
        f"params in {tuning.tuned_path(target)}"
    )


@app.command()
def fuse(
    input_: Annotated[
        Path | None,
        typer.Option("--input", help="a stack or a folder of stacks (default: the benchmark)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="result folder (with --input)")] = None,
    yolo_weights: Annotated[Path, typer.Option(help="YOLO weights")] = Path("models/yolo/best.pt"),
    punet_weights: Annotated[Path, typer.Option(help="Prob-UNet weights")] = Path(
        "models/punet/best.pt"
    ),
    fusion_params: Annotated[Path, typer.Option(help="tuned fusion params")] = Path(
        "params/tuned_fusion.yaml"
    ),
    voxel_size: Annotated[
        str | None, typer.Option(help="z,y,x in nm when the TIFFs do not carry it")
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="folder of <stem>.csv spine points to score against")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="redo stacks that already have results")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """YOLO boxes validated by Prob-UNet probability, de-duplicated in 3D.

    Without --input: the pipeline's benchmark stage (from the evaluation's saved outputs).
    With --input: stacks are predicted end to end, one result folder each, resumable.
    """
    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import fusion
    from microseg.stages.common import write_json

    params = _params(params_path, set_)
    if input_ is not None:
        if out is None:
            raise ConfigError("--input needs --out (the folder for the results)")
        from microseg.infer.spine_pipeline import (
            SpinePipelineConfig,
            predict_folder,
            read_fusion_params,
        )
        from microseg.models.punet import load_punet
        from microseg.models.yolo import YoloSpineDetector

        cfg = SpinePipelineConfig.from_params(params)
        fp = read_fusion_params(fusion_params) if fusion_params.exists() else None
        summary = predict_folder(
            input_,
            out,
            YoloSpineDetector.load(yolo_weights),
            load_punet(punet_weights),
            fp or cfg.default_fusion_params(),
            cfg,
            voxel_size_nm=_voxel(voxel_size),
            annotations=annotations,
            overwrite=overwrite,
        )
        counts = summary["status"].value_counts().to_dict()
        for row in summary[summary["status"] == "failed"].itertuples():
            typer.secho(f"failed {row.stack}: {row.error}", fg=typer.colors.YELLOW, err=True)
        typer.echo(
            f"{counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('failed', 0)} failed -> {out}"
        )
        if counts.get("failed", 0) and not counts.get("done", 0) and not counts.get("skipped"):
            raise typer.Exit(1)
        return
    with stage_run(params, stage="fuse", task="spines", dataset="spines", section=params.spines):
        result = fusion.fuse_stage(params)
        path = write_json(params.paths.metrics / "spines_fusion.json", result)
        _log_metrics_tree({k: v for k, v in result.items() if k != "params"})
        mlflow.log_artifacts(str(fusion.FUSION_DIR), "fusion")
    b = result["benchmark"]
    typer.echo(f"fusion: benchmark F1 {b['f1']:.3f} -> {path}")


def _voxel(text: str | None) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        z, y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--voxel-size expects z,y,x in nm, got {text!r}") from None
    return z, y, x


@app.command("compare-spines")
def compare_spines(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """YOLO alone, Prob-UNet alone, LoG and fusion side by side -> metrics/spines.json."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import fusion
    from microseg.stages.common import write_json

    params = _params(params_path, set_)
    with stage_run(
        params, stage="evaluate_spines", task="spines", dataset="spines", section=params.spines
    ):
        table = fusion.evaluate_spines(params)
        write_json(params.paths.metrics / "spines.json", table)
        _log_metrics_tree(table)
    for name, row in table.items():
        if isinstance(row, dict):
            typer.echo(
                f"{name:<14} F1 {row['f1']:.3f}  P {row['precision']:.3f}  R {row['recall']:.3f}"
            )


@app.command("uncertainty")
def uncertainty_cmd(
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Prob-UNet uncertainty maps (mean, variance, entropy, MI, aleatoric) and panels."""
    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import punet

    params = _params(params_path, set_)
    with stage_run(
        params, stage="uncertainty", task="spines", dataset="spines", section=params.punet.predict
    ):
        summary = punet.uncertainty(params)
        _log_metrics_tree(summary, "uncertainty.")
        mlflow.log_artifacts(str(punet.UNC_DIR), "uncertainty")
    typer.echo(f"uncertainty maps and panels in {punet.UNC_DIR}")


@app.command("inter-rater")
def inter_rater_cmd(
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Rater disagreement maps and how well model uncertainty predicts them."""
    import mlflow

    from microseg.registry.tracking import stage_run
    from microseg.stages import punet
    from microseg.stages.common import write_json

    params = _params(params_path, set_)
    with stage_run(
        params, stage="inter_rater", task="spines", dataset="spines", section=params.punet
    ):
        result = punet.inter_rater(params)
        path = write_json(params.paths.metrics / "spines_inter_rater.json", result)
        _log_metrics_tree(result)
        mlflow.log_artifacts(str(punet.RATER_DIR), "inter_rater")
        mlflow.log_artifact(str(path), "metrics")
    for head, r in result.items():
        auroc = r.get("entropy_auroc", float("nan"))
        typer.echo(f"{head}: AUROC of predictive entropy for rater disagreement {auroc:.3f}")


@app.command()
def visualize(
    stack: Annotated[Path, typer.Argument(help="3D TIFF stack (ZYX)")],
    predictions: Annotated[Path, typer.Argument(help="CSV of boxes (z,x1,y1,x2,y2) or points")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNGs + overlay.tif")],
    mode: Annotated[str | None, typer.Option(help="dots, boxes or both")] = None,
    dot_radius: Annotated[int | None, typer.Option(help="dot radius in output pixels")] = None,
    color: Annotated[str | None, typer.Option(help="dot colour: name, #rrggbb or r,g,b")] = None,
    box_color: Annotated[str | None, typer.Option(help="box colour")] = None,
    line_width: Annotated[int | None, typer.Option(help="box line width")] = None,
    clahe: Annotated[bool, typer.Option("--clahe/--no-clahe", help="CLAHE contrast")] = False,
    scores: Annotated[bool, typer.Option("--scores", help="write each score")] = False,
    show_rejected: Annotated[bool, typer.Option(help="draw rejected detections")] = False,
    z_start: Annotated[int | None, typer.Option(help="first plane")] = None,
    z_stop: Annotated[int | None, typer.Option(help="stop before this plane")] = None,
    z_step: Annotated[int | None, typer.Option(help="every n-th plane")] = None,
    spread: Annotated[int | None, typer.Option(help="show marks faintly on z±n")] = None,
    scale: Annotated[int | None, typer.Option(help="upscale factor")] = None,
) -> None:
    """Per-plane PNG overlays and a stacked RGB TIFF of detections on a stack."""
    from microseg.report.overlays import OverlayConfig, render_overlays

    cfg = OverlayConfig.from_mapping(
        {
            "mode": mode,
            "dot_radius": dot_radius,
            "color": color,
            "box_color": box_color,
            "line_width": line_width,
            "clahe": clahe,
            "show_scores": scores,
            "show_rejected": show_rejected,
            "z_start": z_start,
            "z_stop": z_stop,
            "z_step": z_step,
            "spread": spread,
            "scale": scale,
        }
    )
    result = render_overlays(stack, predictions, out, cfg)
    typer.echo(f"{result.n_marks} marks on {result.n_planes} planes -> {result.out_dir}")


TaskOpt = Annotated[str, typer.Option("--task", help="spines or nuclei")]


@app.command()
def register(task: TaskOpt = "spines", params_path: ParamsOpt = Path("params.yaml"),
             set_: SetOpt = None) -> None:  # fmt: skip
    """Package the task's model as an MLflow pyfunc and register it as `challenger`."""
    from microseg.registry.tracking import stage_run
    from microseg.stages import registry

    params = _params(params_path, set_)
    dataset = "spines" if task == "spines" else params.cells.dataset
    cfg = getattr(params.registry, task, None)
    with stage_run(params, stage="register", task="nuclei" if task == "nuclei" else task,
                   dataset=dataset, section=cfg):  # fmt: skip
        out = registry.register_stage(params, task)
    typer.echo(
        f"registered {out['name']} version {out['version']} as challenger "
        f"({out['metric']} = {out['value']})"
    )


@app.command()
def promote(
    task: TaskOpt = "spines",
    force: Annotated[
        bool, typer.Option("--force", help="promote regardless of the policy")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="why (kept in the tag trail)")] = None,
    actor: Annotated[str | None, typer.Option(help="who decides (default: $USER)")] = None,
    version: Annotated[
        int | None, typer.Option(help="version to promote (default: challenger)")
    ] = None,
    record: Annotated[
        bool,
        typer.Option(
            "--record/--no-record",
            help="also write the decision into reports/registry/<task>.json, the register "
            "stage's output (dvc.yaml does; by hand, the MLflow tag trail is the record and "
            "DVC's outputs stay as the pipeline left them)",
        ),
    ] = False,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Move alias `champion` to the challenger if it beats the champion by `min_delta`."""
    from microseg.registry.tracking import configure
    from microseg.stages import registry

    params = _params(params_path, set_)
    configure(params)
    d = registry.promote_stage(
        params, task, force=force, reason=reason, actor=actor, version=version, record=record
    )
    verdict = "promoted to champion" if d["promoted"] else "not promoted"
    typer.echo(f"version {d['version']}: {verdict}: {d['reason']}")


@app.command("batch-eval")
def batch_eval_cmd(
    model: Annotated[str, typer.Option("--model", help="models:/<name>@champion or any model URI")],
    input_dir: Annotated[Path, typer.Option("--input", help="folder of images/stacks")],
    out: Annotated[Path, typer.Option("--out", help="result folder")],
    annotations: Annotated[
        Path | None, typer.Option(help="folder of annotations (default: beside the inputs)")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict/--no-strict", help="exit 1 if any file is bad")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Evaluate new data with a registered model: validated inputs, checked outputs, scores."""
    from microseg.registry.batch_eval import batch_eval
    from microseg.registry.tracking import configure

    params = _params(params_path, set_)
    configure(params)
    res = batch_eval(
        model, input_dir, out, annotations_dir=annotations, strict=strict, progress=progress,
        params=params,
    )  # fmt: skip
    for name, reasons in sorted(res.bad_files.items()):
        typer.secho(f"skipped {name}: {'; '.join(reasons)}", fg=typer.colors.YELLOW, err=True)
    for name, reasons in sorted(res.output_failures.items()):
        typer.secho(
            f"bad output for {name}: {'; '.join(reasons)}", fg=typer.colors.YELLOW, err=True
        )
    typer.echo(
        f"{res.model_name or model} v{res.model_version}: {len(res.good_files)} evaluated, "
        f"{len(res.bad_files)} skipped -> {out}"
    )
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@app.command()
def where(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Print where the pipeline's results are and how to open the MLflow UI."""
    from microseg.registry.tracking import tracking_uri

    params = _params(params_path, None)
    p = params.paths
    typer.echo("microseg results:")
    for label, path in (
        ("synthetic data", p.synthetic),
        ("prepared data", p.prepared),
        ("validation reports", p.reports / "validation"),
        ("metrics", p.metrics),
        ("reports", p.reports),
    ):
        state = "" if Path(path).exists() else "  (not produced yet)"
        typer.echo(f"  {label:<20} {Path(path).resolve()}{state}")
    for html in sorted(Path(p.reports, "validation").glob("*/data_docs/**/index.html"))[:10]:
        typer.echo(f"  data docs            {html.resolve()}")
    bench = Path(p.reports, "benchmark", "index.html")
    if bench.exists():
        typer.echo(f"  nuclei benchmark     {bench.resolve()}")
    for record in sorted(Path(p.reports, "registry").glob("*.json")):
        import json

        r = json.loads(record.read_text())
        promo = r.get("promotion", {})
        state = "champion" if promo.get("promoted") else "challenger"
        typer.echo(f"  registered model     models:/{r.get('name')}/{r.get('version')} ({state})")
    uri = tracking_uri(params)
    typer.echo(f"MLflow tracking store: {uri}")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000  (or: make ui)")
    typer.echo("           then open http://127.0.0.1:5000")


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("MICROSEG_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except MicrosegError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
