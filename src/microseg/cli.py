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
