"""The register stage's run carries the evaluation metrics the version was registered with."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModel

from microseg.registry.stage_logging import log_eval_metrics


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


def test_only_the_stage_records_a_promotion_in_its_output(params, tmp_path: Path):
    """By hand (`microseg promote`, no --record) the decision lives in the MLflow tag trail
    only; the stage's record of MLflow's side (<task>.mlflow.json) is the stage's."""
    import json

    from typer.testing import CliRunner

    from microseg.cli import app
    from microseg.registry.promotion import CHAMPION, register_version
    from microseg.stages.common import write_json
    from microseg.stages.registry import mlflow_record

    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("x")).info.run_id
    client.log_text(rid, "flavors: {}\n", "model/MLmodel")
    name = params.registry.nuclei.name
    for f1 in (0.8, 0.7):
        register_version(f"runs:/{rid}/model", name, {"f1_50": f1}, {}, True, client=client)
    out = mlflow_record("nuclei")  # relative: the fixture works in tmp_path
    write_json(out, {"name": name, "version": 2})
    before = out.read_text()
    repo_params = Path(__file__).resolve().parents[2] / "params.yaml"
    overrides = ["--params", str(repo_params), "-S", f"mlflow.tracking_uri={uri}"]
    args = ["promote", "--task", "nuclei", "--force", "--reason", "t", "--actor", "me"]
    res = CliRunner().invoke(app, [*args, "--version", "1", *overrides])
    assert res.exit_code == 0, res.output
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert out.read_text() == before
    res = CliRunner().invoke(app, [*args, "--version", "2", "--record", *overrides])
    assert res.exit_code == 0, res.output
    assert str(json.loads(out.read_text())["promotion"]["version"]) == "2"
