"""MLflow as a training hook: params once, metrics per epoch, checkpoints as artifacts.

Attached to our loops (``train.hooks.HookBase``) and, through ``ultralytics_callbacks``, to
Ultralytics' trainer, always logging into the run that is active when training starts, so
no integration opens a stray run of its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

from microseg.registry.runs import flatten
from microseg.train.hooks import HookBase

log = logging.getLogger(__name__)


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metric names allow only [A-Za-z0-9_-./ ]; values must be finite floats."""
    out = {}
    for k, v in metrics.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            name = "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(k))
            out[name] = value
    return out


class MlflowHook(HookBase):
    """Log into the run active at construction (or ``run_id``)."""

    def __init__(self, run_id: str | None = None, log_checkpoints: bool = False) -> None:
        active = mlflow.active_run()
        self.run_id = run_id or (active.info.run_id if active else None)
        if self.run_id is None:
            raise RuntimeError("MlflowHook needs an active MLflow run (use runs.stage_run)")
        self.client = mlflow.MlflowClient()
        self.log_checkpoints = log_checkpoints

    def before_train(self, config: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        params = {k: str(v)[:500] for k, v in flatten(config).items() if k not in existing}
        if params:
            mlflow.log_params(params, run_id=self.run_id)

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        clean = clean_metrics(metrics)
        if clean:
            mlflow.log_metrics(clean, step=epoch, run_id=self.run_id)

    def after_checkpoint(self, path: Path, is_best: bool) -> None:
        if self.log_checkpoints and is_best:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")

    def after_train(self, best: Mapping[str, float], best_path: Path | None) -> None:
        clean = {f"best_{k}": v for k, v in clean_metrics(best).items()}
        if clean:
            mlflow.log_metrics(clean, run_id=self.run_id)
