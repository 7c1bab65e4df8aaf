from pathlib import Path

import mlflow
import pandas as pd
import pytest

from microseg.registry import runs


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
