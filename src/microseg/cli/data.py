"""Data commands: ``synth``, ``ingest``, ``pack-dsb``, ``synth-nuclei``, ``validate``,
``convert``, ``prepare-targets``."""

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


def pack_dsb(
    src: Annotated[Path, typer.Argument(help="published DSB folder (<id>/images, <id>/masks)")],
    dst: Annotated[Path, typer.Argument(help="compact output folder (images/, labels/)")],
    workers: Annotated[int, typer.Option(help="parallel reader threads")] = 2,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty DST as a whole")] = False,
) -> None:
    """Published DSB 2018 folders -> compact layout (greyscale/RGB PNG + one uint16 label PNG),
    lossless and checked sample by sample; `microseg ingest` reads either layout."""
    from microseg.io.dsb import pack_dsb as run_pack

    r = run_pack(src, dst, workers=workers, overwrite=overwrite)
    typer.echo(
        f"{r.n_samples} samples ({r.n_greyscale} greyscale, {r.n_colour} colour, "
        f"{r.n_instances} instances, {r.n_overlap_pixels} contested pixels) -> {r.out} "
        f"({r.n_bytes / 1e6:.1f} MB)"
    )


def synth_nuclei(
    prepared: Annotated[Path, typer.Argument(help="ingested nuclei dataset (data/prepared/<ds>)")],
    out: Annotated[Path, typer.Argument(help="output folder, prepared layout")],
    n: Annotated[int, typer.Option("--n", help="images in all, in the real modality mix")] = 100,
    per_modality: Annotated[
        int | None, typer.Option(help="images per modality instead of --n")
    ] = None,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    val_fraction: Annotated[float, typer.Option(help="share of each modality in val")] = 0.15,
) -> None:
    """Synthetic DSB-like nuclei fitted to a dataset's training split, written in the layout
    the nuclei stages read (images/, labels/, manifest.parquet, synth_nuclei.json)."""
    from microseg.data.synth_nuclei import fit_nuclei_stats, generate

    stats = fit_nuclei_stats(prepared, split="train")
    total = None if per_modality is not None else n
    result = generate(stats, out, seed, per_modality, total, val_fraction)
    typer.echo(f"synthetic nuclei ({', '.join(sorted(stats.modalities))}) -> {result}")


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
