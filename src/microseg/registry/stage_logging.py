"""What a finished stage leaves in its MLflow run: metrics, params, tags, artifacts, run id.

Stages describe their results (:class:`microseg.stages.result.StageResult`); this module is the
one place that turns such a description into MLflow calls, so neither ``stages`` nor ``cli``
talks to MLflow. The Optuna trial logger lives here for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from microseg.registry.mlflow_hooks import clean_metrics
from microseg.registry.runs import flatten, owner_tags
from microseg.utils.atomic import write_text

RUN_ID_FILE = "mlflow_run.json"


def log_metrics_tree(metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Numbers of a nested metrics dict into the active MLflow run (``a.b`` names)."""
    flat = clean_metrics(
        {
            f"{prefix}{k}": v
            for k, v in flatten(metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    if flat:
        mlflow.log_metrics(flat)


def log_artifacts(paths: Iterable[tuple[str | Path, str]]) -> None:
    """Each ``(file or folder, artifact folder)`` into the active run."""
    for path, folder in paths:
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), folder)
        else:
            mlflow.log_artifact(str(path), folder)


def log_stage_result(result: Any, run_id: str | None = None) -> None:
    """Tags, params, metrics and artifacts of a :class:`~microseg.stages.result.StageResult`
    into the active run; its ``run_id_file`` records ``run_id`` for later stages."""
    if result.tags:
        mlflow.set_tags(dict(result.tags))
    if result.log_params:
        mlflow.log_params({k: str(v) for k, v in result.log_params.items()})
    if result.log_metrics:
        log_metrics_tree(result.log_metrics, result.metrics_prefix)
    log_artifacts(result.artifacts)
    if result.run_id_file is not None and run_id is not None:
        write_run_id(result.run_id_file, run_id)


def set_tags(tags: Mapping[str, str]) -> None:
    """Tags on the active run (set before a stage starts, so a failed run carries them)."""
    if tags:
        mlflow.set_tags(dict(tags))


def write_run_id(path: str | Path, run_id: str) -> Path:
    """``{"run_id": ...}``: how the benchmark report links a model's page to its run."""
    write_text(path, json.dumps({"run_id": run_id}, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_run_id(path: str | Path) -> str | None:
    """The run id a stage recorded with :func:`write_run_id` (None: no such file)."""
    path = Path(path)
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


class MlflowTrialLogger:
    """Optuna ``on_trial`` callback: each trial is a nested run of the active study run."""

    def __call__(self, trial: Any, metrics: Mapping[str, Any]) -> None:
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=owner_tags()):
            mlflow.log_params({k: str(v) for k, v in flatten(metrics.get("params", {})).items()})
            if "state" in metrics:
                mlflow.set_tag("optuna.state", metrics["state"])
            log_metrics_tree(
                {k: v for k, v in metrics.items() if k not in ("params", "curve", "trial_dir")}
            )
            for epoch, value in enumerate(metrics.get("curve") or []):
                if value is not None:
                    mlflow.log_metric("curve", float(value), step=epoch)


def log_eval_metrics(metrics: Mapping[str, Any], model_id: str | None) -> None:
    """The evaluation metrics on the active run and on its logged model, so that the model
    version's run in the MLflow UI shows what the version was registered with."""
    finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
    if finite:
        mlflow.log_metrics(finite, model_id=model_id)
