"""``microseg`` in DVC and CI: a log file per command (named by what was given), no progress
bars on a pipe unless asked, and help grouped into panels."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
import typer
import yaml
from typer.testing import CliRunner

import microseg.cli as cli
from microseg.cli import app
from microseg.utils import logfile, progress

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture()
def log_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Commands write their log files (as under ``main``) into ``tmp_path/logs``."""
    monkeypatch.setattr(cli, "_log_files", True)
    monkeypatch.setenv(logfile.ENV_DIR, str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "logs"


def _toy_app() -> typer.Typer:
    toy = typer.Typer()

    def go(
        target: Annotated[str, typer.Argument()] = "all",
        model: Annotated[str, typer.Option("--model", "-m")] = "yolo",
        task: Annotated[str, typer.Option()] = "spines",
        other: Annotated[str, typer.Option()] = "x",
    ) -> None:
        logging.getLogger("microseg.toy").warning("ran %s %s %s %s", target, model, task, other)

    toy.command("go")(cli._with_log_file(("go",), go))
    toy.command("stay")(lambda: None)  # a second command keeps "go" a sub-command
    return toy


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["go"], "go.log"),  # defaults do not name the file
        (["go", "spines"], "go-spines.log"),
        (["go", "--model", "yolo"], "go-yolo.log"),  # given, even if it is the default
        (["go", "-m", "tracking_seg@unet", "--task", "nuclei", "--other", "y"],
         "go-tracking_seg@unet-nuclei.log"),  # other options do not name it
    ],
)  # fmt: skip
def test_log_file_is_named_by_the_given_keys(log_files: Path, args: list[str], name: str) -> None:
    res = CliRunner().invoke(_toy_app(), args)
    assert res.exit_code == 0, res.output
    assert [p.name for p in log_files.iterdir()] == [name]
    text = (log_files / name).read_text()
    assert text.startswith("# microseg ") and "WARNING microseg.toy: ran" in text


def test_no_log_file_outside_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logfile.ENV_DIR, str(tmp_path / "logs"))
    assert CliRunner().invoke(_toy_app(), ["go"]).exit_code == 0
    assert not (tmp_path / "logs").exists()


def test_real_command_logs_even_when_it_fails(log_files: Path) -> None:
    shutil.copy(REPO / "params.yaml", log_files.parent)
    res = CliRunner().invoke(app, ["synth", "nope", "-p", "params.yaml"])
    assert res.exit_code != 0 and "unknown synth target" in str(res.exception)
    text = (log_files / "synth-nope.log").read_text()
    assert "ERROR microseg: ConfigError: unknown synth target 'nope'" in text
    assert "Traceback" not in text  # a user error is one line, in the file as on stderr


@pytest.fixture()
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(cli, "_log_files", False)  # main sets it; undone afterwards
    monkeypatch.delenv(progress.TQDM_ENV, raising=False)  # main sets it; undone afterwards
    yield
    root.handlers[:], root.level = handlers, level


def test_main_writes_the_log_file(
    log_files: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    shutil.copy(REPO / "params.yaml", log_files.parent)
    monkeypatch.setattr(sys, "argv", ["microseg", "where", "-p", "params.yaml"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    first = (log_files / "where.log").read_text().splitlines()[0]
    assert first.startswith("# microseg ") and first.endswith("microseg where -p params.yaml")


def test_every_command_is_in_a_help_panel_in_panel_order() -> None:
    group = typer.main.get_command(app)
    names = group.list_commands(None)  # type: ignore[arg-type]
    assert not [n for n in names if n not in cli.PANEL_OF], "add the command to cli.PANELS"
    order = list(cli.PANELS)
    firsts = [order.index(cli.PANEL_OF[n]) for n in names]
    assert sorted(set(firsts)) == [i for i in dict.fromkeys(firsts)]  # panels in PANELS order
    out = CliRunner().invoke(app, ["--help"], terminal_width=120).stdout
    titles = re.findall(r"^╭─ (.+?) ─", out, re.MULTILINE)
    assert titles == ["Options", *order]


@pytest.mark.slow
def test_synth_in_a_pipe_logs_to_file_and_mlflow_without_bars(tmp_path: Path) -> None:
    """The real entry point as DVC runs it (stderr a pipe): no bar lines, the stage's log in
    ``logs/`` and in its MLflow run; ``MICROSEG_PROGRESS=1`` brings the bars back."""
    import mlflow

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["synth"]["tracking"].update(n_sequences=2, n_frames=3, shape=[32, 32])
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p["mlflow"].update(tracking_uri=db, artifact_root="mlruns")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSEG_", "TQDM_"))}
    env.pop("MLFLOW_TRACKING_URI", None)

    def synth(**extra: str) -> subprocess.CompletedProcess[str]:
        args = [str(BIN / "microseg"), "synth", "tracking", "-p", "params.yaml"]
        return subprocess.run(
            args, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
            timeout=600, check=True,
        )  # fmt: skip

    quiet = synth()
    assert "it/s" not in quiet.stderr and "\r" not in quiet.stderr
    log = (tmp_path / "logs" / "synth-tracking.log").read_text()
    assert "INFO microseg.data.synthesize: synthetic tracking data in" in log
    mlflow.set_tracking_uri(db)
    (run,) = mlflow.search_runs(experiment_names=["microseg-tracking"], output_format="list")
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="logs/synth-tracking.log", dst_path=str(tmp_path)
    )
    assert "synthetic tracking data in" in Path(local).read_text()

    loud = synth(MICROSEG_PROGRESS="1", MICROSEG_LOG_DIR=str(tmp_path / "other"))
    assert "it/s" in loud.stderr and (tmp_path / "other" / "synth-tracking.log").is_file()
