"""Training commands: ``train`` and ``tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import DeviceOpt, ParamsOpt, SetOpt, load


def train(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="yolo, punet, tracking_seg@<segmenter of `tracking.segmenters`>, or a model "
            "of params.yaml `cells.models`",
        ),
    ] = "yolo",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train a model family; everything goes into one MLflow run; resumes when interrupted."""
    from microseg.stages import training

    result = training.run_train(load(params_path, set_, device), model)
    typer.echo(f"{model} weights: {result.out}")


def tune(
    target: Annotated[
        str, typer.Option("--target", help="fusion, yolo, punet or a cells model (cells:<model>)")
    ] = "fusion",
    worker: Annotated[int, typer.Option(help="worker index when several share a study")] = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="training studies: write best.yaml, summary.json, trials.csv here instead of "
            "params/tuned_<target>.yaml (studies/dvc.yaml)",
        ),
    ] = None,
    adopt: Annotated[
        str | None,
        typer.Option(
            "--adopt",
            help="run no study: copy studies/<TARGET>/best.yaml over params/tuned_<TARGET>.yaml",
        ),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Optuna study; each trial is a nested MLflow run; best params -> params/tuned_*.yaml."""
    from microseg.stages import tuning

    params = load(params_path, set_)
    if adopt is not None:
        from microseg.stages.tuning import adopt as adopt_study
        from microseg.utils.convert import flatten

        old, new, dst = adopt_study(params, adopt)
        before, after = flatten(old), flatten(new)
        for key in sorted(before.keys() | after.keys()):
            typer.echo(f"{key}: {before.get(key, '-')} -> {after.get(key, '-')}")
        typer.echo(f"{adopt}: adopted into {dst}")
        return
    result = tuning.run_tune(params, target, worker, out_dir)
    out = result.metrics
    if target == "fusion":
        typer.echo(f"best validation F1 {out['best_val_f1']:.3f}; params in {result.out}")
        return
    typer.echo(
        f"{target}: best {out.get('metric')} {out.get('best_value', float('nan')):.4f} "
        f"({out.get('n_complete', 0)} complete, {out.get('n_pruned', 0)} pruned); "
        f"params in {result.out}"
    )
