"""The register stage's run carries the evaluation metrics the version was registered with."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModel

from microseg.stages.registry import log_eval_metrics


class Const(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_metrics_on_the_run_and_the_logged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("reg", artifact_location=str(tmp_path / "art"))
    with mlflow.start_run(experiment_id=exp) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Const())
        log_eval_metrics({"benchmark.f1": 0.8, "n_gt": 333, "ece": float("nan")}, info.model_id)
    client = MlflowClient(uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics == {"benchmark.f1": 0.8, "n_gt": 333.0}  # NaN is not a metric
    logged = {m.key: m.value for m in client.get_logged_model(info.model_id).metrics}
    assert logged == metrics
