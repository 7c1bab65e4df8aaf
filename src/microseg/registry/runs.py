"""MLflow run bookkeeping shared by every stage.

Every stage run carries the same tags (git commit, stage, dataset, the md5 of ``data.dvc``,
a hash of the params it read) so that runs can be traced back to code, data and knobs from
the MLflow UI; a run ends with the command's log file as an artifact (``logs/<file>``). The
tracking URI comes from ``MLFLOW_TRACKING_URI`` when set (a team server), else from
``params.yaml`` (embedded SQLite by default).

A run also carries who ran it (``microseg.owner.*``: host, boot, pid namespace, pid and start
time, :func:`microseg.utils.processes.identity`). A stage killed with SIGKILL (the OOM killer,
``kill -9``, a preempted runner) cannot end its run, which would stay RUNNING in the UI
forever; so before a stage opens its run, :func:`end_dead_runs` marks KILLED every RUNNING run
whose owner ran on this machine and is gone. Runs owned by other machines are left to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from microseg.config import Params
from microseg.utils import logfile, processes
from microseg.utils.convert import flatten

log = logging.getLogger(__name__)


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri


def configure(params: Params) -> str:
    """Point MLflow at the configured store; returns the URI in use."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_name(params: Params, task: str) -> str:
    return f"{params.mlflow.experiment_prefix}-{task}"


def ensure_experiment(params: Params, task: str) -> str:
    """Create the task's experiment on first use, with artifacts under ``artifact_root``.

    A local artifact root only makes sense with a local backend; with a tracking server the
    server decides where artifacts go.
    """
    name = experiment_name(params, task)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not tracking_uri(params).startswith(("http://", "https://", "databricks")):
        location = Path(params.mlflow.artifact_root).resolve().joinpath(name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_md5(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 DVC recorded for ``data/raw`` (what version of the raw data this run saw)."""
    path = Path(dvc_file)
    if not path.exists():
        return "none"
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs", [])
    return str(outs[0].get("md5", "none")) if outs else "none"


def params_hash(section: Any) -> str:
    """Stable short hash of a params section (pydantic model, dict or scalar)."""
    if hasattr(section, "model_dump"):
        section = section.model_dump(mode="json", by_alias=True)
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


OWNER = "microseg.owner."


def owner_tags() -> dict[str, str]:
    """Tags naming this process, so that a later stage can tell whether it still runs."""
    return {OWNER + k: v for k, v in processes.identity().items()}


def end_dead_runs(experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs (in ``experiment_ids``) whose owner process ran on this
    machine and no longer runs; returns their ids. Never fails the caller: a store that
    refuses the query or the update costs a warning."""
    from mlflow.tracking import MlflowClient

    host = processes.identity()["host"].replace("'", "")
    client = MlflowClient()
    ended: list[str] = []
    try:
        found = client.search_runs(
            experiment_ids,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER}host` = '{host}'",
            max_results=1000,
        )
        for run in found:
            tags = run.data.tags
            owner = {k.removeprefix(OWNER): v for k, v in tags.items() if k.startswith(OWNER)}
            if processes.is_running(owner) is not False:
                continue
            client.set_tag(
                run.info.run_id,
                "microseg.ended",
                f"KILLED: its process (pid {owner.get('pid')}) was gone when pid "
                f"{os.getpid()} started a stage",
            )
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    except MlflowException as exc:
        log.warning("could not check for runs left RUNNING by killed stages: %s", exc)
    for run_id in ended:
        log.warning("MLflow run %s was left RUNNING by a killed process: marked KILLED", run_id)
    return ended


@contextlib.contextmanager
def stage_run(
    params: Params,
    *,
    stage: str,
    task: str,
    dataset: str,
    section: Any = None,
    run_name: str | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run for one pipeline stage with the house tags and params."""
    configure(params)
    exp_id = ensure_experiment(params, task)
    if not nested:
        end_dead_runs([exp_id])
    tags = {
        **owner_tags(),
        "git_commit": git_commit(),
        "microseg.stage": stage,
        "microseg.dataset": dataset,
        "microseg.task": task,
        "data_md5": data_md5(),
        "params_hash": params_hash(section if section is not None else params),
    }
    with mlflow.start_run(
        experiment_id=exp_id, run_name=run_name or f"{stage}-{dataset}", tags=tags, nested=nested
    ) as run:
        try:
            if section is not None:
                dumped = (
                    section.model_dump(mode="json", by_alias=True)
                    if hasattr(section, "model_dump")
                    else section
                )
                if isinstance(dumped, Mapping):
                    flat = {k: str(v)[:500] for k, v in flatten(dumped).items()}
                    mlflow.log_params(flat)
            yield run
        except Exception as exc:  # a failed run keeps its log, error included: then it is read
            logfile.record_error(exc)
            raise
        finally:
            log_command_log(run.info.run_id)


def log_command_log(run_id: str | None = None) -> None:
    """The command's log file (:mod:`microseg.utils.logfile`), flushed, into run ``run_id``
    (default: the active run) as ``logs/<file>``; nothing outside ``microseg``. A store that
    refuses it costs a warning, not the stage."""
    path = logfile.current()
    if path is None or not path.is_file():
        return
    try:
        mlflow.log_artifact(str(path), "logs", run_id=run_id)
    except (OSError, MlflowException) as exc:
        log.warning("could not attach %s to MLflow run: %s", path, exc)


def log_manifest(manifest: pd.DataFrame, source: str | Path, name: str, context: str) -> None:
    """Log the manifest as an MLflow dataset input of the active run."""
    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources; neither applies to
        # a manifest that is logged for lineage, never used as a model input schema.
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(manifest, source=str(source), name=name)
        mlflow.log_input(ds, context=context)
