"""Data commands: ``synth``, ``ingest``, ``validate``, ``convert``, ``prepare-targets``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import ParamsOpt, SetOpt, load


def synth(
    target: Annotated[str, typer.Argument(help="spines, tracking or all")] = "all",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Generate the seeded synthetic datasets (spine stacks, tracking sequences)."""
    from microseg.stages import data

    params = load(params_path, set_)
    for t in data.synth_targets(target):
        result = data.run_synth(params, t)
        typer.echo(f"synthetic {t} data written to {result.out}")


def ingest(
    dataset: Annotated[str, typer.Argument(help="dataset name from params.yaml `datasets`")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="parallel reader processes")] = None,
) -> None:
    """Native dataset -> data/prepared/<dataset> (canonical TIFFs + manifest.parquet)."""
    from microseg.stages import data

    result = data.run_ingest(load(params_path, set_), dataset, workers)
    typer.echo(f"{dataset}: {len(result.metrics)} samples -> {result.out}")


def validate(
    dataset: Annotated[str, typer.Argument(help="dataset name from params.yaml `datasets`")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Great Expectations checks on a prepared dataset; fails on bad data."""
    from microseg.stages import data

    result = data.run_validate(load(params_path, set_), dataset)
    n = result.metrics.n_expectations
    typer.echo(f"{dataset}: {n} expectations passed; report in {result.out}")


def convert(
    target: Annotated[str, typer.Argument(help="yolo: d3set -> Ultralytics dataset")],
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Convert a dataset into a model family's training format."""
    from microseg.errors import ConfigError
    from microseg.stages import data

    if target != "yolo":
        raise ConfigError(f"unknown conversion {target!r}; available: yolo")
    result = data.run_convert(load(params_path, set_), target)
    typer.echo(f"YOLO dataset in {result.out}")


def prepare_targets(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Nuclei dataset -> normalised images, 3-class targets and U-Net weight maps (cached)."""
    from microseg.stages import data

    result = data.run_prepare_targets(load(params_path, set_))
    typer.echo(f"targets of {result.metrics} in {result.out}")
