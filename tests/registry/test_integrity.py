"""sha256 of a registered version's files: recorded at registration, any change refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from microseg.errors import MicrosegError
from microseg.registry import integrity
from microseg.registry.promotion import register_version


def _model(folder: Path) -> Path:
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "artifacts" / "best.pt").write_bytes(b"weights" * 100)
    (folder / "python_model.pkl").write_bytes(b"pickle")
    return folder


def test_digest_sees_every_change_but_mlflows_meta_file(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    tree, files = integrity.folder_digests(folder)
    assert set(files) == {"MLmodel", "artifacts/best.pt", "python_model.pkl"}
    (folder / "registered_model_meta").write_text("model_name: x\n")  # MLflow adds it
    assert integrity.folder_digests(folder)[0] == tree
    (folder / "artifacts" / "best.pt").write_bytes(b"weights" * 99 + b"x" * 7)
    changed = integrity.folder_digests(folder)[0]
    assert changed != tree
    (folder / "artifacts" / "best.pt").rename(folder / "artifacts" / "other.pt")
    assert integrity.folder_digests(folder)[0] not in (tree, changed)
    tags = integrity.version_tags(folder)
    assert set(tags) == {integrity.DIGEST_TAG, "sha256.other.pt"}


def test_verify_refuses_changed_files_and_records_a_missing_digest(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    tags = integrity.version_tags(folder)
    integrity.verify_folder(folder, tags, "models:/x/1")  # untouched: passes
    (folder / "python_model.pkl").write_bytes(b"evil")
    with pytest.raises(MicrosegError, match="changed since registration") as err:
        integrity.verify_folder(folder, tags, "models:/x/1")
    assert "models:/x/1" in str(err.value)
    recorded: list[dict[str, str]] = []
    integrity.verify_folder(folder, {}, "models:/x/2", recorded.append)  # registered by hand
    assert recorded[0][integrity.DIGEST_TAG] == integrity.folder_digests(folder)[0]


def test_register_version_records_the_digest_of_the_logged_files(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("i", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(exp)
    rid = run.info.run_id
    client.log_artifacts(rid, str(_model(tmp_path / "m")), "model")
    mv = register_version(f"runs:/{rid}/model", "nuc", {}, {}, True, client=client)
    assert mv.tags[integrity.DIGEST_TAG] == integrity.folder_digests(tmp_path / "m")[0]
    assert mv.tags["sha256.best.pt"] == integrity.file_sha256(tmp_path / "m/artifacts/best.pt")
