"""Training studies: ``microseg tune --target yolo|punet`` and the tuned params they leave.

A study writes ``params/tuned_<target>.yaml`` (only the searched keys); the training stage
merges that file over its ``params.yaml`` section, and DVC tracks the file as a dependency of
the training stage, so ``dvc repro`` retrains with the tuned values after a study. The file is
committed empty (``{}``: nothing tuned yet); studies are run on purpose (they cost many
trainings), not by every ``dvc repro``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError
from microseg.stages.common import write_json

log = logging.getLogger(__name__)

TUNED_DIR = Path("params")
WORK_DIR = Path("models/tune")


def tuned_path(target: str) -> Path:
    return TUNED_DIR / f"tuned_{target}.yaml"


def metrics_path(params: Params, target: str) -> Path:
    """The study summary (``metrics/tune_<target>.json``)."""
    return params.paths.metrics / f"tune_{target}.json"


def tuned_train_config(params: Params, target: str) -> dict[str, Any]:
    """The ``<target>.train`` section with the study's best params merged over it."""
    if target == "yolo":
        base = params.yolo.train.model_dump()
    else:  # a Lightning-trained family: the engine section is its default
        base = params.engine.train_section(dict(params.punet.train))
    path = tuned_path(target)
    if not path.is_file():
        return base
    import yaml

    tuned = yaml.safe_load(path.read_text()) or {}
    if not tuned:
        return base
    from microseg.tune.training import merge_tuned

    log.info("%s training uses the tuned params of %s: %s", target, path, tuned)
    return merge_tuned(base, tuned)


def study_config(params: Params, target: str):
    from microseg.tune.training import STUDY_CONFIGS

    if target not in STUDY_CONFIGS:
        raise ConfigError(f"unknown training study {target!r}; available: {sorted(STUDY_CONFIGS)}")
    return STUDY_CONFIGS[target].model_validate(params.tune.get(target, {}))


def tune_training_stage(
    params: Params,
    target: str,
    on_trial: Callable | None = None,
    trial_hooks: Callable | None = None,
    worker: int = 0,
) -> dict[str, Any]:
    """Run (or continue) the study; write the best params and the summary
    (``metrics/tune_<target>.json``); return the summary."""
    from microseg.stages import punet, spines
    from microseg.tune.training import (
        punet_train_fn,
        study_summary,
        tune_training,
        write_best_params,
        yolo_train_fn,
    )

    cfg = study_config(params, target)
    if target == "yolo":
        base = params.yolo.train.model_dump()
        fn = yolo_train_fn(
            spines.YOLO_DATA / "spine_detection.yaml",
            base,
            cfg.epochs,
            metric=cfg.metric,
            direction=cfg.direction,
            meta={"channels": params.yolo.convert.channels},
        )
    else:
        base = params.engine.train_section(dict(params.punet.train))
        src = punet._source(params)
        fn = punet_train_fn(
            src / "train.d3set",
            src / "val.d3set",
            base,
            cfg.epochs,
            metric=cfg.metric,
            direction=cfg.direction,
        )
    best, st = tune_training(
        target,
        fn,
        base,
        cfg,
        seed=params.seed,
        on_trial=on_trial,
        work_dir=WORK_DIR / target,
        worker=worker,
        trial_hooks=trial_hooks,
    )
    write_best_params(tuned_path(target), best, target)
    out = {"best": best, **study_summary(st)}
    write_json(metrics_path(params, target), out)
    return out
