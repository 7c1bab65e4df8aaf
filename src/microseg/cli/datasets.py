"""``microseg dataset add|verify|list``: a lab's own data into the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import ParamsOpt, SetOpt, load
from microseg.errors import ConfigError

app = typer.Typer(
    help="Add a dataset to params.yaml, check it, list them (dvc.yaml ingests each).",
    no_args_is_help=True,
)


def _floats(text: str | None, n: int, option: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ConfigError(f"{option} expects {n} comma-separated numbers, got {text!r}")
    return values


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="dataset name (data/prepared/<name>)")],
    task: Annotated[str, typer.Option(help="nuclei, spines or tracking")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="dsb2018, png_pairs, ome-tiff (OME-TIFF/CZI/ND2/LIF via bioio), coco, ctc, d3set",
        ),
    ],
    source: Annotated[Path, typer.Option(help="folder of the dataset's native files")],
    split: Annotated[
        str | None, typer.Option(help="train,val,test fractions (e.g. 0.7,0.15,0.15)")
    ] = None,
    voxel_size: Annotated[str | None, typer.Option(help="z,y,x in nm")] = None,
    mask_kind: Annotated[
        str | None, typer.Option(help="png_pairs masks: instance, binary or auto")
    ] = None,
    annotations: Annotated[Path | None, typer.Option(help="COCO JSON (format coco)")] = None,
    channel: Annotated[
        str | None, typer.Option(help="ome-tiff: the channel (index or name) with the nuclei")
    ] = None,
    use: Annotated[
        bool, typer.Option("--use", help="make the task's stages train and score on it")
    ] = False,
    replace: Annotated[bool, typer.Option(help="overwrite an existing entry")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write a `datasets` entry into params.yaml (comments kept); `dvc repro` ingests it."""
    from microseg.stages.datasets import TASK_KEYS, add_dataset, dataset_entry

    if task not in TASK_KEYS:
        raise ConfigError(f"--task must be one of {sorted(TASK_KEYS)}, got {task!r}")
    entry = dataset_entry(
        task, format_, source,
        split=_floats(split, 3, "--split"),  # type: ignore[arg-type]
        voxel_size_nm=_floats(voxel_size, 3, "--voxel-size"),  # type: ignore[arg-type]
        mask_kind=mask_kind, annotations=annotations, channel=channel,
    )  # fmt: skip
    written = add_dataset(params_path, name, entry, use=use, replace=replace)
    typer.echo(f"{params_path}: wrote {', '.join(written)}")
    typer.echo(f"next: microseg dataset verify {name}; dvc repro")


@app.command("verify")
def verify(
    name: Annotated[str, typer.Argument(help="dataset name from params.yaml `datasets`")],
    report: Annotated[
        Path | None, typer.Option(help="keep the Great Expectations report (Data Docs) here")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Ingest into a scratch folder and run the data checks; print one readable report
    (exit 1 when the pipeline could not use the dataset)."""
    from microseg.stages.datasets import verify_dataset

    result = verify_dataset(load(params_path, set_), name, report)
    for line in result.lines():
        typer.echo(line)
    if not result.ok:
        raise typer.Exit(1)


@app.command("list")
def list_(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """The datasets of params.yaml and which task's stages use each."""
    from microseg.stages.datasets import list_datasets

    for row in list_datasets(load(params_path, set_)):
        used = f"  <- {row['used_by']} stages" if row["used_by"] else ""
        typer.echo(f"{row['name']:<16} {row['task']:<9} {row['format']:<17} {row['source']}{used}")
