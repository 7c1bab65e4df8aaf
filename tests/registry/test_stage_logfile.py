"""The command's log file ends up in the MLflow run a stage opens (``logs/<file>``), with what
the stage logged up to the end of the run, failed runs included."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from microseg.registry import runs
from microseg.utils import logfile

STAGE_LOG = logging.getLogger("microseg.stages.fake")


@pytest.fixture()
def info_logs() -> Iterator[None]:
    """INFO records reach the handlers (``microseg`` sets this up in ``main``)."""
    before = STAGE_LOG.level
    STAGE_LOG.setLevel(logging.INFO)
    yield
    STAGE_LOG.setLevel(before)


def _artifact(run_id: str, name: str, dst: Path) -> str:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=f"logs/{name}", dst_path=str(dst)
    )
    return Path(local).read_text()


def test_stage_run_attaches_the_command_log(params, tmp_path: Path, info_logs: None) -> None:
    path = logfile.log_path(["train", "unet"], tmp_path / "logs")
    assert path == tmp_path / "logs" / "train-unet.log"
    with logfile.attached(path, header="# microseg train --model unet") as attached:
        assert logfile.current() == attached == path
        with runs.stage_run(params, stage="train", task="nuclei", dataset="dsb") as run:
            STAGE_LOG.info("epoch 1 of 1: marker-7f3a")
            STAGE_LOG.debug("below INFO: not in the file")
        STAGE_LOG.info("after the run ended")
    assert logfile.current() is None
    text = _artifact(run.info.run_id, "train-unet.log", tmp_path / "dl")
    assert text.startswith("# microseg train --model unet\n")
    assert "INFO microseg.stages.fake: epoch 1 of 1: marker-7f3a" in text
    assert "below INFO" not in text and "after the run ended" not in text
    assert "after the run ended" in path.read_text()  # the file goes on; the run keeps a copy


def test_failed_run_keeps_its_log_and_no_file_no_artifact(
    params, tmp_path: Path, info_logs: None
) -> None:
    path = tmp_path / "logs" / "evaluate.log"
    with (
        logfile.attached(path),
        pytest.raises(RuntimeError, match="boom"),
        runs.stage_run(params, stage="evaluate", task="nuclei", dataset="dsb") as run,
    ):
        STAGE_LOG.warning("about to fail: marker-b21c")
        raise RuntimeError("boom")
    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    text = _artifact(run.info.run_id, "evaluate.log", tmp_path / "dl")
    assert "marker-b21c" in text
    assert "ERROR microseg: RuntimeError: boom" in text and "Traceback" in text
    assert path.read_text().count("RuntimeError: boom") == 2  # once: the line + the traceback's
    # outside ``microseg`` (no log file) a run gets no log artifact
    assert logfile.current() is None
    with runs.stage_run(params, stage="ingest", task="nuclei", dataset="dsb") as plain:
        pass
    assert mlflow.MlflowClient().list_artifacts(plain.info.run_id, "logs") == []


def test_each_run_overwrites_the_file(tmp_path: Path, info_logs: None) -> None:
    path = tmp_path / "x.log"
    with logfile.attached(path):
        STAGE_LOG.info("first run")
    with logfile.attached(path):
        STAGE_LOG.info("second run")
    text = path.read_text()
    assert "second run" in text and "first run" not in text


def test_log_names_are_safe_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logfile.ENV_DIR, str(tmp_path / "elsewhere"))
    assert logfile.log_path(["train", "tracking_seg@unet"]) == (
        tmp_path / "elsewhere" / "train-tracking_seg@unet.log"
    )
    assert logfile.log_path(["ingest", "../a b/c"], "logs") == Path("logs/ingest-a_b_c.log")
    monkeypatch.delenv(logfile.ENV_DIR)
    assert logfile.log_path(["where"]) == Path(logfile.DEFAULT_DIR) / "where.log"


def test_colour_codes_stay_out_of_the_file(tmp_path: Path) -> None:
    ultra = logging.getLogger("ultralytics")  # its own handler, no propagation
    before = ultra.propagate, ultra.level
    ultra.propagate, ultra.level = False, logging.INFO
    try:
        with logfile.attached(tmp_path / "y.log") as path:
            ultra.info("\x1b[34m\x1b[1mtrain: \x1b[0mScanning labels")
    finally:
        ultra.propagate, ultra.level = before
    assert "INFO ultralytics: train: Scanning labels" in path.read_text()
