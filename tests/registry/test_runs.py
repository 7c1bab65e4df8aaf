import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from microseg.registry import runs

REPO = Path(__file__).resolve().parents[2]


def _check_run(params, dataset: str) -> None:
    df = pd.DataFrame({"sample_id": ["a", "b"], "split": ["train", "test"]})
    with runs.stage_run(
        params, stage="ingest", task="nuclei", dataset=dataset, section=params.validate_
    ) as run:
        runs.log_manifest(df, "data/prepared/x", dataset, context="ingest")
    got = mlflow.get_run(run.info.run_id)
    tags = got.data.tags
    assert tags["microseg.stage"] == "ingest" and tags["microseg.dataset"] == dataset
    assert tags["params_hash"] == runs.params_hash(params.validate_)
    assert {"git_commit", "data_md5"} <= set(tags)
    assert got.data.params["split_tolerance"] == "0.1"
    assert got.inputs.dataset_inputs[0].dataset.name == dataset
    exp = mlflow.get_experiment(got.info.experiment_id)
    assert exp.name == "microseg-nuclei"


def test_stage_run_tags_params_and_dataset(params) -> None:
    _check_run(params, "dsb")
    assert Path(params.mlflow.tracking_uri.removeprefix("sqlite:///")).exists()


def test_env_overrides_params(params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert runs.configure(params) == other


def test_params_hash_is_stable_and_sensitive(params) -> None:
    a = runs.params_hash(params.validate_)
    assert a == runs.params_hash(params.validate_.model_copy())
    changed = params.validate_.model_copy(update={"split_tolerance": 0.2})
    assert runs.params_hash(changed) != a


def test_data_md5_reads_dvc_file(tmp_path: Path) -> None:
    f = tmp_path / "data.dvc"
    f.write_text("outs:\n- md5: abc.dir\n  path: data/raw\n")
    assert runs.data_md5(f) == "abc.dir"
    assert runs.data_md5(tmp_path / "none.dvc") == "none"


@pytest.mark.postgres
def test_postgres_backend_store(params, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The team setup: the same code against a real PostgreSQL backend store."""
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", pg_database.replace("postgresql://", "postgresql+psycopg2://")
    )
    _check_run(params, "dsb-pg")


_HOLD_RUN = """
import json, pathlib, sys, time
from microseg.config import load_params
from microseg.registry import runs
repo, overrides, out = sys.argv[1], json.loads(sys.argv[2]), pathlib.Path(sys.argv[3])
params = load_params(pathlib.Path(repo) / "params.yaml", overrides)
with runs.stage_run(params, stage="train", task="nuclei", dataset="dsb") as run:
    out.write_text(run.info.run_id)
    time.sleep(600)
"""


def _hold_run(params, tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    """A stage in another process that opens its run and waits (to be killed)."""
    out = tmp_path / f"{name}.run_id"
    overrides = {
        "mlflow.tracking_uri": runs.tracking_uri(params),
        "mlflow.artifact_root": params.mlflow.artifact_root,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_RUN, str(REPO), json.dumps(overrides), str(out)],
        env={**os.environ, "MLFLOW_TRACKING_URI": runs.tracking_uri(params)},
    )
    deadline = time.monotonic() + 120
    while not out.exists() or not out.read_text():
        assert proc.poll() is None, "the stage process ended before opening its run"
        assert time.monotonic() < deadline, "the stage process never opened its run"
        time.sleep(0.2)
    return proc, out.read_text()


def _check_dead_runs_end(params, tmp_path: Path) -> None:
    runs.configure(params)
    killed, killed_id = _hold_run(params, tmp_path, "killed")
    alive, alive_id = _hold_run(params, tmp_path, "alive")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert mlflow.get_run(killed_id).info.status == "RUNNING"  # nothing could end it
        with runs.stage_run(params, stage="evaluate", task="nuclei", dataset="dsb"):
            pass
        dead = mlflow.get_run(killed_id)
        assert dead.info.status == "KILLED"
        assert f"pid {killed.pid}" in dead.data.tags["microseg.ended"]
        assert mlflow.get_run(alive_id).info.status == "RUNNING"  # its process still runs
    finally:
        alive.kill()
        alive.wait()


def test_run_of_a_killed_stage_is_marked_killed_by_the_next(params, tmp_path: Path) -> None:
    _check_dead_runs_end(params, tmp_path)


@pytest.mark.postgres
def test_run_of_a_killed_stage_is_marked_killed_on_postgres(
    params, pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", pg_database.replace("postgresql://", "postgresql+psycopg2://")
    )
    _check_dead_runs_end(params, tmp_path)


def test_runs_of_other_machines_are_left_alone(params) -> None:
    """A RUNNING run whose owner ran elsewhere cannot be checked here: it is not touched."""
    runs.configure(params)
    exp = runs.ensure_experiment(params, "nuclei")
    tags = {**runs.owner_tags(), "microseg.owner.host": "another-node"}
    run = mlflow.MlflowClient().create_run(exp, tags={**tags, "microseg.owner.pid": "1"})
    assert runs.end_dead_runs([exp]) == []
    assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"
