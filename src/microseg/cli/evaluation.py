"""Evaluation commands: ``report``, ``track``, ``evaluate``, ``compare-spines``,
``uncertainty``, ``inter-rater`` and ``seeds``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.cli._options import DeviceOpt, ParamsOpt, SetOpt, load


def report(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """The nuclei benchmark report: reports/benchmark/index.html and index.md."""
    from microseg.stages import evaluation

    result = evaluation.run_report(load(params_path, set_))
    typer.echo(f"benchmark report: {result.out.resolve()}")


def seeds(
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="nuclei (models retrained per seed) | spines | tracking "
            "(the pipeline rerun per seed as DVC experiments) | all",
        ),
    ] = "all",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs at a time (1 core each)")] = 2,
) -> None:
    """Seed spread (params `seeds`): metrics/seeds.json (nuclei: F1@0.5 per seed against the
    baseline) and metrics/seeds_<task>.json (spines, tracking: their measures per seed)."""
    from microseg.errors import ConfigError
    from microseg.stages import seed_experiments
    from microseg.stages import seeds as stage

    tasks = ["nuclei", *seed_experiments.TASKS] if task == "all" else [task]
    if not set(tasks) <= {"nuclei", *seed_experiments.TASKS}:
        raise ConfigError(f"unknown --task {task!r}; expected nuclei, spines, tracking or all")
    params = load(params_path, set_)
    if "nuclei" in tasks:
        result = stage.run_seeds(params, jobs=jobs)
        for name, row in result.metrics["models"].items():
            a, d = row["groups"]["all"], row["diff_to_baseline"]
            typer.echo(
                f"{name:<10} F1@0.5 {a['mean']:.3f} ± {a['sd']:.3f} over seeds {row['seeds']}; "
                f"minus {result.metrics['baseline']} {d['mean']:+.3f} ± {d['sd']:.3f}"
            )
    for t in tasks:
        if t == "nuclei":
            continue
        summary = seed_experiments.run_pipeline_seeds(params, t)
        for key, st in summary["measures"].items():
            typer.echo(f"{t:<9} {key:<28} {st['mean']:.3f} ± {st['sd']:.3f} {st['per_seed']}")


def track(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="a segmenter of params.yaml `tracking.segmenters` (default: all)"
        ),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Link per-frame instance masks into tracks; write Cell Tracking Challenge results."""
    from microseg.stages import evaluation

    result = evaluation.run_track(load(params_path, set_), model)
    assert result.out is not None
    for name, summary in result.metrics.items():
        typer.echo(f"{name}: tracks of {sorted(summary)} in {result.out / name}")


def evaluate(
    model: Annotated[
        str, typer.Option("--model", "-m", help="yolo, log, punet or a cells.models name")
    ] = "yolo",
    task: Annotated[str, typer.Option("--task", help="spines, nuclei or tracking")] = "spines",
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Evaluate on held-out data: spine detectors/segmenters, or tracks (--task tracking)."""
    from microseg.stages import evaluation

    params = load(params_path, set_, device)
    result = evaluation.run_evaluate(params, model, task)
    m, path = result.metrics, result.metrics_file
    if result.stage == "evaluate_tracking":
        for name, rows in m.items():
            for seq, s in rows.items() if isinstance(rows, dict) else ():
                typer.echo(
                    f"{name} sequence {seq}: SEG {s.get('SEG', float('nan')):.3f} "
                    f"DET {s['DET']:.3f} TRA {s['TRA']:.3f}"
                )
    elif result.stage == "evaluate_cells":
        typer.echo(
            f"{model}: F1@0.5 {m.get('f1_50', float('nan')):.3f}, "
            f"mask AP {m.get('segm_AP', float('nan')):.3f} -> {path}"
        )
    elif model == "punet":
        b = m["benchmark"]
        typer.echo(
            f"punet: benchmark spine Dice {b['spine']['dice']:.3f}, dendrite Dice "
            f"{b['dendrite']['dice']:.3f}; DoG baseline spine Dice "
            f"{m['dog_baseline']['spine']['dice']:.3f} -> {path}"
        )
    else:
        b = m["benchmark"]
        typer.echo(
            f"{model}: benchmark F1 {b['f1']:.3f} (P {b['precision']:.3f}, "
            f"R {b['recall']:.3f}) at {params.spines.match_dist_nm:g} nm -> {path}"
        )


def compare_spines(params_path: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """YOLO alone, Prob-UNet alone, LoG and fusion side by side -> metrics/spines.json."""
    from microseg.stages import evaluation

    result = evaluation.run_compare_spines(load(params_path, set_))
    for name, row in result.metrics.items():
        if isinstance(row, dict):
            typer.echo(
                f"{name:<14} F1 {row['f1']:.3f}  P {row['precision']:.3f}  R {row['recall']:.3f}"
            )


PunetModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="a Prob-UNet: punet, a model file or folder, or a models:/ URI of a Prob-UNet or "
        "spine pipeline (default: models/punet/best.pt)",
    ),
]
PunetWeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Prob-UNet model file")]
SamplesOpt = Annotated[
    int | None, typer.Option("--samples", help="prior samples (default: punet.predict)")
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option("--temperature", help="logits divided by T (default: punet.predict)"),
]


def uncertainty(
    stack: Annotated[
        Path | None,
        typer.Argument(help="a ZYX stack of your own (default: the pipeline's benchmark)"),
    ] = None,
    samples: SamplesOpt = None,
    temperature: TemperatureOpt = None,
    planes: Annotated[
        str | None, typer.Option("--planes", help="planes a:b of STACK (b excluded)")
    ] = None,
    model: PunetModelOpt = None,
    weights: PunetWeightsOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="default: reports/uncertainty/<stack name>"),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Prob-UNet uncertainty maps (mean, variance, entropy, MI, aleatoric) and panels."""
    from microseg.stages import evaluation

    params = load(params_path, set_)
    if stack is None:
        _benchmark_only("uncertainty", samples=samples, temperature=temperature, planes=planes,
                        model=model, weights=weights, out=out)  # fmt: skip
        result = evaluation.run_uncertainty(params)
        typer.echo(f"uncertainty maps and panels in {result.out}")
        return
    from microseg.stages.uncertainty_tools import uncertainty_on_stack

    result = uncertainty_on_stack(
        params, stack, samples=samples, temperature=temperature, planes=planes, model=model,
        weights=weights, out=out,
    )  # fmt: skip
    for head, means in result.metrics.items():
        typer.echo(
            f"{head}: mean entropy {means['mean_entropy']:.4f}, mean MI "
            f"{means['mean_mutual_information']:.4f}"
        )
    typer.echo(f"uncertainty maps and panels in {result.out}")


def _benchmark_only(command: str, **given: object) -> None:
    """Options that only make sense with a user's stack are refused without one."""
    named = [f"--{k}" for k, v in given.items() if v not in (None, [])]
    if named:
        from microseg.errors import ConfigError

        raise ConfigError(
            f"{command}: {', '.join(named)}: only with a stack of your own (STACK/--stack)"
        )


def inter_rater(
    stack: Annotated[
        Path | None,
        typer.Option("--stack", help="a ZYX stack of your own (default: the benchmark)"),
    ] = None,
    rater: Annotated[
        list[Path] | None,
        typer.Option("--rater", help="a rater's binary spine mask, shaped as --stack (2+)"),
    ] = None,
    model: PunetModelOpt = None,
    weights: PunetWeightsOpt = None,
    samples: SamplesOpt = None,
    temperature: TemperatureOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="default: reports/inter_rater/<stack name>"),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Rater disagreement maps and how well model uncertainty predicts them."""
    from microseg.stages import evaluation

    params = load(params_path, set_)
    if stack is None:
        _benchmark_only("inter-rater", rater=rater, model=model, weights=weights,
                        samples=samples, temperature=temperature, out=out)  # fmt: skip
        result = evaluation.run_inter_rater(params)
        for head, r in result.metrics.items():
            auroc = r.get("entropy_auroc", float("nan"))
            typer.echo(f"{head}: AUROC of predictive entropy for rater disagreement {auroc:.3f}")
        return
    from microseg.stages.uncertainty_tools import inter_rater_on_stack

    result = inter_rater_on_stack(
        params, stack, rater or [], model=model, weights=weights, samples=samples,
        temperature=temperature, out=out,
    )  # fmt: skip
    m = result.metrics
    typer.echo(
        f"{m['n_raters']} raters: Fleiss' kappa {m['fleiss_kappa']:.3f}, mean pairwise Dice "
        f"{m['mean_pairwise_dice']:.3f}"
    )
    if "auroc" in m:
        typer.echo(
            f"AUROC of predictive entropy for rater disagreement {m['auroc']['entropy']:.3f}"
        )
    typer.echo(f"disagreement, consensus and inter_rater.json in {result.out}")
