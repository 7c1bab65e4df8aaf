"""Evaluation stages as ``dvc.yaml`` runs them, each inside its MLflow run: spine detectors
and segmenters (``eval_yolo``, ``baseline_log``, ``predict_punet``), ``fuse``,
``evaluate_spines``, ``uncertainty``, ``inter_rater``, ``track``, ``evaluate_tracking``,
``evaluate_cells`` and the benchmark ``report``.

The stage functions write their own outputs (metrics JSON, plots, reports); these add the
run and say what it records.
"""

from __future__ import annotations

from microseg.config import Params
from microseg.errors import ConfigError
from microseg.stages.common import metrics_file
from microseg.stages.result import StageResult, run_stage


def run_evaluate(params: Params, model: str, task: str) -> StageResult:
    """``--task tracking``: the tracks; a ``cells`` model: the nuclei benchmark; else spines."""
    if task == "tracking":
        return run_evaluate_tracking(params)
    if task in ("nuclei", "cells") or model in params.cells.all_models():
        return run_evaluate_cells(params, model)
    if task != "spines":
        raise ConfigError(f"unknown task {task!r}; available: spines, tracking")
    return run_evaluate_spines(params, model)


def run_evaluate_spines(params: Params, model: str) -> StageResult:
    """``yolo``, ``log`` or ``punet`` on the spine benchmark -> ``metrics/spines_<model>.json``."""
    from microseg.stages import punet, spines

    runners = {
        "yolo": ("eval_yolo", spines.eval_yolo, params.yolo),
        "log": ("baseline_log", spines.baseline_log, params.baseline_log),
        "punet": ("predict_punet", punet.predict_punet, params.punet.predict),
    }
    if model not in runners:
        raise ConfigError(f"unknown model {model!r}; available: {sorted(runners)}")
    stage, fn, section = runners[model]
    path = metrics_file(params, f"spines_{model}")

    def evaluate() -> StageResult:
        result = fn(params)
        csv, png = spines.pr_plot_paths(params, f"spines_{model}")
        plots = [(png, "plots"), (csv, "plots")] if model == "yolo" else []
        return StageResult(
            stage,
            result,
            metrics_file=path,
            log_metrics={k: v for k, v in result.items() if k != "params"},
            artifacts=[*plots, (path, "metrics")],
        )

    return run_stage(params, evaluate, stage=stage, task="spines", section=section)


def run_evaluate_cells(params: Params, name: str) -> StageResult:
    """One nuclei model on the held-out split -> ``metrics/cells/<name>.json``."""
    from microseg.registry.stage_logging import RUN_ID_FILE
    from microseg.stages import cells

    mc = cells.model_config(params, name)
    path = metrics_file(params, f"cells/{name}")

    def evaluate() -> StageResult:
        metrics = cells.evaluate_cell_model(params, name)
        return StageResult(
            "evaluate_cells",
            metrics,
            metrics_file=path,
            log_metrics=metrics,
            artifacts=[(path, "metrics"), (cells.REPORTS_ROOT / name, "evaluation")],
            run_id_file=cells.REPORTS_ROOT / name / RUN_ID_FILE,
        )

    return run_stage(
        params,
        evaluate,
        stage="evaluate_cells",
        task="nuclei",
        section=mc,
        run_name=f"evaluate-{name}",
        tags={"microseg.model": name, "microseg.family": mc.family},
    )


def run_evaluate_tracking(params: Params) -> StageResult:
    """CTC scores of every segmenter's tracks -> ``metrics/tracking.json`` (a row each)."""
    from microseg.stages import tracking

    path = metrics_file(params, "tracking")

    def evaluate() -> StageResult:
        result = tracking.evaluate_tracking(params)
        return StageResult(
            "evaluate_tracking",
            result,
            metrics_file=path,
            log_metrics={k: v for k, v in result.items() if isinstance(v, dict)},
            artifacts=[(path, "metrics")],
        )

    return run_stage(
        params,
        evaluate,
        stage="evaluate_tracking",
        task="tracking",
        section=params.tracking,
    )


def run_track(params: Params, name: str | None = None) -> StageResult:
    """Segmenter ``name``'s per-frame masks (every segmenter's when None, one run each)
    linked into tracks (Cell Tracking Challenge results under ``reports/tracking/<name>``).
    ``metrics``: ``{name: {seq: summary}}``; ``out``: ``reports/tracking``."""
    from microseg.stages import tracking

    summaries: dict[str, dict] = {}
    for seg in tracking.segmenter_names(params, name):

        def link(_seg: str = seg) -> StageResult:
            summary = tracking.track(params, _seg)
            return StageResult("track", summary, log_metrics=summary, out=tracking.RESULT_DIR)

        section = params.tracking.model_copy(
            update={"segmenters": {seg: params.tracking.segmenters[seg]}}
        )
        summaries[seg] = run_stage(
            params,
            link,
            stage="track",
            task="tracking",
            section=section,
            run_name=f"track-{seg}",
            tags={"microseg.model": seg},
        ).metrics
    return StageResult("track", summaries, out=tracking.RESULT_DIR)


def run_fuse(params: Params) -> StageResult:
    """Tuned fusion on the benchmark -> ``metrics/spines_fusion.json``."""
    from microseg.stages import fusion

    def fuse() -> StageResult:
        result = fusion.fuse_stage(params)
        return StageResult(
            "fuse",
            result,
            metrics_file=metrics_file(params, "spines_fusion"),
            log_metrics={k: v for k, v in result.items() if k != "params"},
            artifacts=[(fusion.FUSION_DIR, "fusion")],
        )

    return run_stage(
        params,
        fuse,
        stage="fuse",
        task="spines",
        section=params.spines,
    )


def run_compare_spines(params: Params) -> StageResult:
    """The four spine methods side by side -> ``metrics/spines.json``."""
    from microseg.stages import fusion

    def compare() -> StageResult:
        table = fusion.evaluate_spines(params)
        return StageResult(
            "evaluate_spines", table, metrics_file=metrics_file(params, "spines"), log_metrics=table
        )

    return run_stage(
        params,
        compare,
        stage="evaluate_spines",
        task="spines",
        section=params.spines,
    )


def run_uncertainty(params: Params) -> StageResult:
    """Prob-UNet uncertainty maps and panels of the benchmark stack."""
    from microseg.stages import punet

    def maps() -> StageResult:
        summary = punet.uncertainty(params)
        return StageResult(
            "uncertainty",
            summary,
            log_metrics=summary,
            metrics_prefix="uncertainty.",
            artifacts=[(punet.UNC_DIR, "uncertainty")],
            out=punet.UNC_DIR,
        )

    return run_stage(
        params,
        maps,
        stage="uncertainty",
        task="spines",
        section=params.punet.predict,
    )


def run_inter_rater(params: Params) -> StageResult:
    """Rater disagreement vs model uncertainty -> ``metrics/spines_inter_rater.json``."""
    from microseg.stages import punet

    path = metrics_file(params, "spines_inter_rater")

    def compare() -> StageResult:
        result = punet.inter_rater(params)
        return StageResult(
            "inter_rater",
            result,
            metrics_file=path,
            log_metrics=result,
            artifacts=[(punet.RATER_DIR, "inter_rater"), (path, "metrics")],
        )

    return run_stage(
        params,
        compare,
        stage="inter_rater",
        task="spines",
        section=params.punet,
    )


def run_report(params: Params) -> StageResult:
    """The nuclei benchmark report, each model linked to its evaluation run."""
    from microseg.registry.stage_logging import RUN_ID_FILE, read_run_id
    from microseg.stages import cells

    run_ids = {}
    for name in params.cells.all_models():
        run_id = read_run_id(cells.REPORTS_ROOT / name / RUN_ID_FILE)
        if run_id is not None:
            run_ids[name] = run_id

    def build() -> StageResult:
        index = cells.build_benchmark(params, run_ids)
        return StageResult("report", artifacts=[(index.parent, "benchmark")], out=index)

    return run_stage(
        params,
        build,
        stage="report",
        task="nuclei",
        section=params.cells,
    )
