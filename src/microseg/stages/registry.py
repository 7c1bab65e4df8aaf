"""Registry stages: package a task's model as a pyfunc, register it, promote it by policy.

``register`` logs the pyfunc into the active stage run and registers it as a new version of
``registry.<task>.name`` with its evaluation metrics, lineage tags and the alias
``challenger``; ``promote`` moves ``champion`` to the challenger only when the policy
(``metric``, ``min_delta``, validation passed) says so, or when a person forces it.

Two records per task: ``reports/registry/<task>.json``, the stage's DVC output, says *what*
was registered (model name, metric and value, whether the data checks passed, the md5 of every
file the packaged model is built from): the same models give the same bytes, so a clone that
pulls them finds the stage up to date, and ``batch_eval`` reruns when the model changes.
``reports/registry/<task>.mlflow.json`` says what MLflow made of it (version, model URI,
promotion decision with its time and actor): store state, outside the DVC hash
(``.dvcignore``), and always also in MLflow itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.errors import ConfigError, MissingFileError
from microseg.registry.runs import configure, data_md5, flatten, git_commit, params_hash
from microseg.registry.stage_logging import log_eval_metrics
from microseg.stages.common import write_json
from microseg.stages.result import StageResult, run_stage
from microseg.utils.convert import read_json

log = logging.getLogger(__name__)

REGISTRY_DIR = Path("reports/registry")
TASKS = ("spines", "nuclei")


def _task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown registry task {task!r}; available: {list(TASKS)}")


def _metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError("evaluation metrics missing; run the evaluation stage first", path)
    flat = flatten(read_json(path))
    return {k: v for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def mlflow_record(task: str) -> Path:
    """Where the register and promote stages record MLflow's side (version, URI, decision)."""
    return REGISTRY_DIR / f"{task}.mlflow.json"


def _sources(params: Params, task: str) -> dict[str, str]:
    """``{path: md5}`` of the files the task's packaged model is built from."""
    from microseg.stages import cells, fusion, punet, spines

    if task == "spines":
        paths = [
            spines.YOLO_MODEL_DIR / "best.pt",
            punet.prob_model_dir(params) / "best.pt",
            fusion.TUNED,
        ]
    else:
        folder = cells.MODELS_ROOT / params.registry.nuclei_model
        paths = [folder / "best.pt"]
        chosen = cells.REPORTS_ROOT / params.registry.nuclei_model / cells.POSTPROCESS_FILE
        if chosen.is_file():
            paths.append(chosen)
    from microseg.data.ingest import file_md5

    return {Path(p).as_posix(): file_md5(Path(p)) for p in paths if Path(p).is_file()}


def _validation_passed(params: Params, dataset: str) -> bool:
    path = params.paths.reports / "validation" / dataset / "result.json"
    if not path.is_file():
        log.warning("%s missing: the model counts as not validated", path)
        return False
    return bool(read_json(path).get("success", False))


def _log_spines(params: Params):
    from microseg.infer.spine_pipeline import SpinePipelineConfig
    from microseg.registry.pyfunc import log_spine_model
    from microseg.stages import fusion, punet, spines

    info = log_spine_model(
        "model",
        spines.YOLO_MODEL_DIR / "best.pt",
        punet.prob_model_dir(params) / "best.pt",  # spines.prob_model: flat or hierarchical
        fusion.TUNED,
        SpinePipelineConfig.from_params(params),
        input_example_path=_example_stack(params),
    )
    section = {"yolo": params.yolo, "punet": params.punet, "fusion": params.fusion}
    return info, _metrics(params.paths.metrics / "spines_fusion.json"), section, "spines"


def _example_stack(params: Params) -> Path | None:
    """A small crop of the benchmark stack: the model's input example (MLflow runs it once
    while logging, so a whole stack would cost a full prediction)."""
    from microseg.io import tiff

    bench = params.dataset_source("spines") / "benchmark" / "stack.tif"
    if not bench.is_file():
        return None
    with tiff.open_stack(bench, expect_ndim=3) as st:
        z0 = st.shape[0] // 2
        crop = np.stack([st.plane(z)[:96, :96] for z in range(z0 - 2, z0 + 2)])
        voxel = st.voxel_size_nm
    out = REGISTRY_DIR / "spines_example.tif"
    tiff.write_stack(out, crop, voxel_size_nm=voxel)
    return out


def _log_nuclei(params: Params):
    from microseg.registry.pyfunc import log_nuclei_model
    from microseg.stages import cells

    name = params.registry.nuclei_model
    mc = cells.model_config(params, name)
    prepared = params.paths.prepared / params.cells.dataset
    from microseg.stages.common import samples

    test = samples(prepared, params.cells.split)
    info = log_nuclei_model(
        "model",
        cells.MODELS_ROOT / name / "best.pt",
        mc.infer,
        input_example_path=test[0].image_path if test else None,
        family=mc.family,
        train=mc.train,
        post=cells.chosen_postprocess(name),  # predicts what its metrics measured
    )
    metrics = _metrics(params.paths.metrics / "cells" / f"{name}.json")
    return info, metrics, mc, params.cells.dataset


def register_stage(params: Params, task: str) -> dict[str, Any]:
    """Log the task's pyfunc into the active run and register it as ``challenger``."""
    from microseg.registry.promotion import register_version

    _task(task)
    info, metrics, section, dataset = (_log_spines if task == "spines" else _log_nuclei)(params)
    log_eval_metrics(metrics, info.model_id)
    cfg = getattr(params.registry, task)
    validated = _validation_passed(params, dataset)
    version = register_version(
        info.model_uri,
        cfg.name,
        metrics,
        {
            "git_commit": git_commit(),
            "dataset_md5": data_md5(),
            "params_hash": params_hash(section),
        },
        validated,
    )
    out = {
        "name": cfg.name,
        "metric": cfg.metric,
        "value": metrics.get(cfg.metric),
        "validated": validated,
        "sources": _sources(params, task),
    }
    write_json(REGISTRY_DIR / f"{task}.json", out)
    write_json(
        mlflow_record(task),
        {"name": cfg.name, "version": int(version.version), "model_uri": info.model_uri},
    )
    return out | {"version": int(version.version), "model_uri": info.model_uri}


def run_register(params: Params, task: str) -> StageResult:
    """:func:`register_stage` in the ``register`` stage's MLflow run."""
    dataset = params.task_dataset(task)

    def register() -> StageResult:
        out = register_stage(params, task)
        return StageResult("register", out, out=REGISTRY_DIR / f"{task}.json")

    return run_stage(
        params,
        register,
        stage="register",
        task=task,
        dataset=dataset,
        section=getattr(params.registry, task, None),
    )


def promote_stage(
    params: Params,
    task: str,
    *,
    force: bool = False,
    reason: str | None = None,
    actor: str | None = None,
    version: int | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """Apply the promotion policy of ``registry.<task>`` to the challenger (or ``version``).

    ``record``: add the decision to ``reports/registry/<task>.mlflow.json`` (see the module
    notes). Only the register stage should: the record is of what that stage did."""
    from microseg.registry.promotion import promote

    _task(task)
    configure(params)
    cfg = getattr(params.registry, task)
    decision = promote(
        cfg.name,
        cfg.metric,
        cfg.min_delta,
        higher_is_better=cfg.higher_is_better,
        force=force,
        reason=reason,
        actor=actor,
        version=None if version is None else str(version),
    )
    if record:
        path = mlflow_record(task)
        entry = read_json(path) if path.is_file() else {}
        entry["promotion"] = decision.as_dict()
        write_json(path, entry)
    return decision.as_dict()
