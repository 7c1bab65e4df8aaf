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
    target: Annotated[str, typer.Option("--target", help="fusion, yolo or punet")] = "fusion",
    worker: Annotated[int, typer.Option(help="worker index when several share a study")] = 0,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Optuna study; each trial is a nested MLflow run; best params -> params/tuned_*.yaml."""
    from microseg.stages import tuning

    result = tuning.run_tune(load(params_path, set_), target, worker)
    out = result.metrics
    if target == "fusion":
        typer.echo(f"best validation F1 {out['best_val_f1']:.3f}; params in {result.out}")
        return
    typer.echo(
        f"{target}: best {out.get('metric')} {out.get('best_value', float('nan')):.4f} "
        f"({out.get('n_complete', 0)} complete, {out.get('n_pruned', 0)} pruned); "
        f"params in {result.out}"
    )
