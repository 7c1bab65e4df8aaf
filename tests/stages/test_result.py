"""run_stage: a stage's StageResult becomes its MLflow run (metrics tree, params, tags,
artifacts, mlflow_run.json) without the stage or the CLI calling MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from mlflow import MlflowClient

from microseg.registry.stage_logging import MlflowTrialLogger, read_run_id
from microseg.stages.result import StageResult, run_stage


def test_run_stage_logs_what_the_stage_describes(params, tmp_path: Path) -> None:
    report = tmp_path / "report"
    (report / "sub").mkdir(parents=True)
    (report / "sub" / "a.txt").write_text("a")
    metrics_json = tmp_path / "m.json"
    metrics_json.write_text("{}")
    run_id_file = tmp_path / "eval" / "mlflow_run.json"

    def stage() -> StageResult:
        return StageResult(
            "demo",
            {"benchmark": {"f1": 0.5}},
            log_metrics={"benchmark": {"f1": 0.5, "n": 3, "ok": True, "bad": float("nan")}},
            metrics_prefix="x.",
            log_params={"best.k": 2},
            tags={"validation": "passed"},
            artifacts=[(report, "folder"), (metrics_json, "metrics")],
            run_id_file=run_id_file,
        )

    out = run_stage(
        params, stage, stage="demo", task="spines", dataset="d", section={"a": 1},
        tags={"microseg.model": "m"},
    )  # fmt: skip
    assert out.metrics == {"benchmark": {"f1": 0.5}}
    client = MlflowClient(params.mlflow.tracking_uri)
    run_id = read_run_id(run_id_file)
    assert json.loads(run_id_file.read_text()) == {"run_id": run_id}
    run = client.get_run(run_id)
    assert run.info.run_name == "demo-d"
    assert run.data.metrics == {"x.benchmark.f1": 0.5, "x.benchmark.n": 3.0}
    assert run.data.params == {"a": "1", "best.k": "2"}
    tags = run.data.tags
    assert tags["microseg.model"] == "m" and tags["validation"] == "passed"
    assert tags["microseg.stage"] == "demo"
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"folder", "metrics"}
    assert [a.path for a in client.list_artifacts(run_id, "folder/sub")] == ["folder/sub/a.txt"]


def test_trial_logger_opens_a_nested_run(params) -> None:
    def stage() -> StageResult:
        MlflowTrialLogger()(
            SimpleNamespace(number=3),
            {"params": {"lr": 0.1}, "state": "COMPLETE", "value": 0.7, "curve": [0.5, None, 0.7]},
        )
        return StageResult("tune")

    run_stage(params, stage, stage="tune_x", task="spines", dataset="spines")
    client = MlflowClient(params.mlflow.tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.mlflow.runName = 'trial-3'"
    )
    (trial,) = runs
    assert trial.data.params == {"lr": "0.1"} and trial.data.tags["optuna.state"] == "COMPLETE"
    assert trial.data.metrics["value"] == 0.7
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "curve")] == [0, 2]
    assert "mlflow.parentRunId" in trial.data.tags
