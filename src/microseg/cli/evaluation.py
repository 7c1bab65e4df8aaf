"""Evaluation commands: ``report``, ``track``, ``evaluate``, ``compare-spines``, ``seeds`` and
``synth-study`` (``uncertainty`` and ``inter-rater``: :mod:`microseg.cli.uncertainty`)."""

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


def synth_study(
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs at a time (1 core each)")] = 2,
) -> None:
    """Synthetic-data study (params `synth_study`): one nuclei model per arm (R, S, R+S@p)
    and seed, scored on the real test split: metrics/synth_study.json, reports/synth_study/."""
    from microseg.stages import synth_study as stage

    result = stage.run_synth_study(load(params_path, set_), jobs=jobs)
    m = result.metrics
    for arm, row in m["arms"].items():
        test = m["vs_R"].get(arm)
        vs = (
            f"; minus R {test['mean_diff']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}]"
            f" p={test['wilcoxon_p']:.3g}"
            if test
            else ""
        )
        typer.echo(
            f"{arm:<8} F1@0.5 pooled {row['pooled_f1_50']['mean']:.3f} ± "
            f"{row['pooled_f1_50']['sd']:.3f}, per-image {row['mean_f1_50']['mean']:.3f} ± "
            f"{row['mean_f1_50']['sd']:.3f}{vs}"
        )
    typer.echo(m["sentence"])


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
