"""A stage's result and the one way a stage runs inside its MLflow run.

A stage writes its own outputs (the DVC metrics JSON, plots, reports) and returns a
:class:`StageResult` that says which numbers, params, tags and files its MLflow run gets;
:func:`run_stage` opens that run (``registry.runs.stage_run``) and hands the description to
``registry.stage_logging``. So calling a stage from Python, from the CLI or from ``dvc repro``
produces the same files and the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microseg.config import Params


@dataclass
class StageResult:
    """What a stage produced.

    ``metrics``: what the stage returns (and the CLI prints from); ``metrics_file``: the DVC
    metrics JSON it wrote; ``log_metrics``: the nested numbers its run gets (``a.b`` names,
    after ``metrics_prefix``); ``artifacts``: ``(file or folder, artifact folder)`` pairs;
    ``run_id_file``: where the run id is recorded (``mlflow_run.json``).
    """

    stage: str
    metrics: Any = field(default_factory=dict)
    metrics_file: Path | None = None
    log_metrics: Mapping[str, Any] = field(default_factory=dict)
    metrics_prefix: str = ""
    log_params: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    artifacts: Sequence[tuple[Path, str]] = ()
    run_id_file: Path | None = None
    #: where the stage's main output is (a folder, weights, a report), for the CLI's message
    out: Path | None = None


def run_stage(
    params: Params,
    fn: Callable[[], StageResult],
    *,
    stage: str,
    task: str,
    dataset: str | None = None,
    section: Any = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> StageResult:
    """``fn()`` inside the stage's MLflow run (house tags, ``section`` as params), then its
    result logged into that run. ``tags`` are set before ``fn`` runs. ``dataset`` defaults to
    the one the task's section names (``cells.dataset``, ``spines.dataset``,
    ``tracking.dataset``)."""
    from microseg.registry import stage_logging
    from microseg.registry.runs import stage_run

    if dataset is None:
        dataset = {"nuclei": params.cells.dataset, "spines": params.spines.dataset,
                   "tracking": params.tracking.dataset}.get(task, task)  # fmt: skip

    with stage_run(
        params, stage=stage, task=task, dataset=dataset, section=section, run_name=run_name
    ) as run:
        stage_logging.set_tags(tags or {})
        result = fn()
        stage_logging.log_stage_result(result, run.info.run_id)
    return result
