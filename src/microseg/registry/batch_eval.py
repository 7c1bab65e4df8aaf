"""Batch evaluation by a registered model: validate inputs, predict, validate outputs, score.

``microseg batch-eval --model models:/<name>@champion --input DIR --out DIR`` runs
:func:`batch_eval`. The rules it keeps:

* **Inputs are judged before the model sees them.** One row per file (readable, ndim, shape,
  dtype, non-finite count, intensity range; read plane by plane, so a large stack costs one
  plane of memory) goes through a Great Expectations suite run by
  :mod:`microseg.data.expectations`. A file that fails is reported by name with the expectation it
  broke and is skipped, never silently used.
* **Outputs are judged before they are scored.** The model's answers go through a second GE
  suite: spines ``score`` in [0, 1], boxes with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``,
  ``0 <= z < Z``, no NaN; nuclei label images that exist, have the input's shape, an integer
  dtype and as many objects as the model claims. A file whose output fails is reported and left
  out of the scores.
* **The alias is resolved once.** ``models:/<name>@champion`` becomes ``models:/<name>/<v>``
  before loading, and the run is tagged with that name and version, so a promotion during the
  run cannot mix two models in one report.
* **Predictions scale out and resume.** ``engine="ray"`` (params ``scale``, ``--engine``)
  spreads the files over Ray workers that load the model once each; a worker that dies has
  its file retried. Each file's answer is written atomically with a key of the input's bytes
  and the pinned model, so a rerun into the same folder skips files already answered, and
  both engines write the same bytes.

The model is a pyfunc with ``metadata["task"]``: ``"spines"`` (input ``path`` of a ZYX TIFF,
output ``path, z, y, x, x1, y1, x2, y2, score, status``) or ``"nuclei"`` (input ``path``,
``params={"out_dir": ...}``; writes ``<out_dir>/<stem>_labels.tif`` and returns ``path,
labels_path, n_objects, height, width``).

Scores need annotations beside the inputs or in ``annotations_dir``
(:mod:`microseg.registry.batch_scoring`). This module runs the steps in order and writes the
reports and the MLflow run; inputs, prediction and scoring live in ``batch_inputs``,
``batch_predict`` and ``batch_scoring``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from microseg.config import Params, SpinesEvalConfig, ValidateConfig, check_device
from microseg.data.expectations import Failure, scrub_text
from microseg.registry import runs
from microseg.registry.batch_inputs import input_expectations, input_table, list_inputs
from microseg.registry.batch_predict import (
    BatchWorker,
    clear_output,
    load_model,
    model_task,
    predict_all,
    use_device,
)
from microseg.registry.batch_scoring import score_all, score_summary
from microseg.registry.batch_validation import Validator, failure_records
from microseg.registry.resolve import resolve_model_uri
from microseg.utils.atomic import write_text
from microseg.utils.convert import jsonable
from microseg.utils.engine import EngineOptions

logger = logging.getLogger(__name__)

RESULT_NAME = "batch_eval.json"
INPUT_RESULT_NAME = "input_validation.json"
#: the summary alone, small enough for ``dvc metrics``
METRICS_NAME = "metrics.json"


@dataclass
class BatchEvalResult:
    """What a batch evaluation found; the files it names are already on disk."""

    model_uri: str
    resolved_uri: str
    task: str
    model_name: str | None
    model_version: str | None
    #: inputs that passed validation and were given to the model
    good_files: list[Path]
    #: input file name -> why it was skipped (failed expectations, read errors)
    bad_files: dict[str, list[str]]
    #: one row per good file: output status and, when annotated, its scores
    per_file: pd.DataFrame
    #: input file name -> what was wrong with the model's answer for it
    output_failures: dict[str, list[str]]
    #: dataset scores and counts (also logged as ``batch_eval.<key>`` metrics)
    summary: dict[str, Any]
    out_dir: Path
    strict: bool = False
    #: input file name -> why its annotation could not be scored
    scoring_errors: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when asked to be strict and anything was bad, else 0."""
        bad = self.bad_files or self.output_failures or self.scoring_errors
        return int(self.strict and bool(bad))


def batch_eval(
    model_uri: str,
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    annotations_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    params: Params | None = None,
    predict_params: dict[str, Any] | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    task: str | None = None,
    device: str | None = None,
    engine: str | None = None,
    address: str | None = None,
) -> BatchEvalResult:
    """Validate, predict, check and score every image in ``input_dir``; log one MLflow run.

    ``params`` (microseg params) points MLflow at the configured store, supplies the allowed
    dtypes (``validate.allowed_image_dtypes``) and the match distance
    (``spines.match_dist_nm``), and names the run's experiment; without it the current MLflow
    settings and defaults apply. ``voxel_size_nm`` (z, y, x) is used for stacks whose metadata
    has none; ``task`` overrides the model's ``metadata["task"]``; ``device`` (``auto``,
    ``cpu``, ``cuda``, ``cuda:N``, ``mps``) overrides the one the model was logged with. A run
    already active is logged into; otherwise one is started.

    ``engine`` (``local`` | ``ray``) and ``address`` override params' ``scale`` section: with
    ``ray`` the model is loaded once per Ray worker and inputs are spread over the workers. A
    rerun into the same ``out_dir`` skips inputs answered earlier by the same model.
    """
    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if params is not None:
        runs.configure(params)
    validate_cfg = params.validate_ if params is not None else ValidateConfig()
    spines_cfg = params.spines if params is not None else SpinesEvalConfig()

    scale = params.scale.model_dump() if params is not None else {}
    options = EngineOptions.from_mapping(scale, engine=engine, address=address)

    device = check_device(device) if device is not None else None
    load_uri, name, version = resolve_model_uri(model_uri)
    model = None
    if options.engine == "local":
        model, task = load_model(load_uri, task)
        if device is not None:
            use_device(model, device, load_uri)
    else:  # each worker loads its own copy
        task = model_task(load_uri, task)
    paths = list_inputs(input_dir, task)
    logger.info("batch-eval: %d %s inputs in %s with %s", len(paths), task, input_dir, load_uri)

    validator = Validator()
    try:
        table = input_table(paths)
        bad, in_failures, in_json = validator.run(
            "inputs", table, input_expectations(task, validate_cfg.allowed_image_dtypes)
        )
        for fname, reasons in bad.items():
            error = table.loc[table["file"] == fname, "error"].iloc[0]
            if error:
                reasons.append(f"read error: {error}")
            logger.warning("skipping %s: %s", fname, "; ".join(reasons))
        good = table[~table["file"].isin(bad)]

        out_dir.mkdir(parents=True, exist_ok=True)
        for stem in table.loc[table["file"].isin(bad), "sample_id"]:
            clear_output(out_dir / stem)
        worker = BatchWorker(
            load_uri,
            task,
            str(out_dir),
            device=device,
            predict_params=predict_params,
            tracking_uri=mlflow.get_tracking_uri(),
            registry_uri=mlflow.get_registry_uri(),
            model=model,
        )
        outputs, out_bad, out_failures, out_json = predict_all(
            worker, good, validator, progress, options
        )
    finally:
        validator.close()
    for fname, reasons in out_bad.items():
        logger.warning("output of %s rejected: %s", fname, "; ".join(reasons))

    where = [Path(annotations_dir)] if annotations_dir is not None else []
    per_file, scoring_errors = score_all(
        task, good, outputs, out_bad, [*where, input_dir], voxel_size_nm, spines_cfg.match_dist_nm
    )
    scored = per_file[per_file["scored"]] if len(per_file) else per_file
    summary = {
        "n_inputs": len(paths),
        "n_bad_inputs": len(bad),
        "n_evaluated": len(good),
        "n_output_failures": len(out_bad),
        "n_scoring_errors": len(scoring_errors),
        **score_summary(task, scored),
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = BatchEvalResult(
        model_uri=model_uri,
        resolved_uri=load_uri,
        task=task,
        model_name=name,
        model_version=version,
        good_files=[Path(p) for p in good["image_path"]],
        bad_files=bad,
        per_file=per_file,
        output_failures=out_bad,
        summary=summary,
        out_dir=out_dir,
        strict=strict,
        scoring_errors=scoring_errors,
    )
    _write_reports(
        result, table, in_failures, in_json, out_failures, out_json, input_dir, annotations_dir
    )
    result.run_id = _log_run(result, params, input_dir)
    logger.info(
        "batch-eval: %d good, %d bad inputs, %d rejected outputs; %s",
        len(good),
        len(bad),
        len(out_bad),
        {k: v for k, v in summary.items() if k in ("precision", "recall", "f1", "f1_50")},
    )
    return result


def _write_reports(
    result: BatchEvalResult,
    table: pd.DataFrame,
    in_failures: list[Failure],
    in_json: dict[str, Any],
    out_failures: list[Failure],
    out_json: dict[str, Any],
    input_dir: Path,
    annotations_dir: str | Path | None,
) -> None:
    report = {
        "model_uri": result.model_uri,
        "resolved_uri": result.resolved_uri,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "task": result.task,
        "input_dir": str(input_dir),
        "annotations_dir": None if annotations_dir is None else str(annotations_dir),
        "strict": result.strict,
        "exit_code": result.exit_code,
        "summary": result.summary,
        "bad_files": result.bad_files,
        "output_failures": result.output_failures,
        "scoring_errors": result.scoring_errors,
        "per_file": result.per_file.to_dict(orient="records"),
        "output_validation": {
            "success": not out_failures,
            "failures": failure_records(out_failures),
            "great_expectations": out_json,
        },
    }
    inputs = {
        "success": not in_failures,
        "n_files": len(table),
        "n_bad": len(result.bad_files),
        "failures": failure_records(in_failures),
        "files": table.to_dict(orient="records"),
        "great_expectations": in_json,
    }
    # the folder is a DVC output: no clock (seconds: MLflow) and GE's ids and times made stable
    ids: dict[str, str] = {}
    summary = {k: v for k, v in result.summary.items() if k != "seconds"}
    for name, obj in (
        (RESULT_NAME, {**report, "summary": summary}),
        (INPUT_RESULT_NAME, inputs),
        (METRICS_NAME, summary),
    ):
        text = json.dumps(jsonable(obj, default=str), indent=2) + "\n"
        write_text(result.out_dir / name, scrub_text(text, ids))


def _log_run(result: BatchEvalResult, params: Params | None, input_dir: Path) -> str:
    """Log into the active run, else a new one (a stage run when params are given)."""
    tags = {
        "model_uri": result.model_uri,
        "model_uri_resolved": result.resolved_uri,
        "registered_model_name": result.model_name or "",
        "registered_model_version": result.model_version or "",
        "microseg.task": result.task,
        "batch_eval.strict": str(result.strict).lower(),
    }
    active = mlflow.active_run()
    if active is not None:
        ctx: Any = contextlib.nullcontext(active)
    elif params is not None:
        ctx = runs.stage_run(
            params,
            stage="batch_eval",
            task=result.task,
            dataset=input_dir.name,
            section={"model_uri": result.model_uri, "strict": result.strict},
        )
    else:
        ctx = mlflow.start_run(
            run_name=f"batch_eval-{input_dir.name}",
            tags={
                "microseg.stage": "batch_eval",
                "git_commit": runs.git_commit(),
                **runs.owner_tags(),
            },
        )
    with ctx as run:
        mlflow.set_tags(tags)
        metrics = {
            f"batch_eval.{k}": float(v)
            for k, v in result.summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        mlflow.log_metrics(metrics)
        for name in (RESULT_NAME, INPUT_RESULT_NAME):
            mlflow.log_artifact(str(result.out_dir / name), artifact_path="batch_eval")
        return run.info.run_id
