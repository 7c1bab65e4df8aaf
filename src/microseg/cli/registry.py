"""Registry commands: ``register``, ``promote``, ``batch-eval`` and ``where``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import DeviceOpt, ParamsOpt, SetOpt, TaskOpt, load

EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="local (this process) or ray (Ray workers, the model loaded once in each; "
        "default: params scale.engine)",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="with --engine ray: the cluster to join (auto, host:port; default: params "
        "scale.address, else a local cluster)",
    ),
]


def register(task: TaskOpt = "spines", params_path: ParamsOpt = Path("params.yaml"),
             set_: SetOpt = None) -> None:  # fmt: skip
    """Package the task's model as an MLflow pyfunc and register it as `challenger`."""
    from microseg.stages import registry

    out = registry.run_register(load(params_path, set_), task).metrics
    typer.echo(
        f"registered {out['name']} version {out['version']} as challenger "
        f"({out['metric']} = {out['value']})"
    )


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
    from microseg.stages import registry

    d = registry.promote_stage(
        load(params_path, set_), task, force=force, reason=reason, actor=actor, version=version,
        record=record,
    )  # fmt: skip
    verdict = "promoted to champion" if d["promoted"] else "not promoted"
    typer.echo(f"version {d['version']}: {verdict}: {d['reason']}")


def batch_eval(
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
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """Evaluate new data with a registered model: validated inputs, checked outputs, scores.
    A rerun into the same --out skips inputs this model answered already."""
    from microseg.registry.batch_eval import batch_eval as run_batch_eval

    res = run_batch_eval(
        model, input_dir, out, annotations_dir=annotations, strict=strict, progress=progress,
        params=load(params_path, set_, device), device=device, engine=engine, address=address,
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


def where(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Print where the pipeline's results are and how to open the MLflow UI."""
    from microseg.registry.runs import tracking_uri

    params = load(params_path, None)
    p = params.paths
    typer.echo(f"microseg results (profile: {params.profile}):")
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
    from microseg.utils.convert import read_json

    # MLflow's side of each registration (the version, the decision): <task>.mlflow.json
    for record in sorted(Path(p.reports, "registry").glob("*.mlflow.json")):
        r = read_json(record)
        promo = r.get("promotion", {})
        state = "champion" if promo.get("promoted") else "challenger"
        typer.echo(f"  registered model     models:/{r.get('name')}/{r.get('version')} ({state})")
    uri = tracking_uri(params)
    typer.echo(f"MLflow tracking store: {uri}")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000  (or: make ui)")
    typer.echo("           then open http://127.0.0.1:5000")
