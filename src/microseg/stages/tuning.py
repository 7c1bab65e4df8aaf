"""Training studies: ``microseg tune --target <model>`` and the tuned params they leave.

A target is any trainable model of :func:`microseg.stages.training.trainers` that trains one
registered family (``yolo``, ``punet``, the learned ``cells.models``): the table says what the
family trains on and its ``train`` section, and every trial trains it through
:func:`microseg.models.get_model`. A study writes ``params/tuned_<target>.yaml`` (only the
searched keys); the training stage merges that file over its ``params.yaml`` section, and DVC
tracks the file as a dependency of the training stage, so ``dvc repro`` retrains with the
tuned values after a study. The file is committed empty (``{}``: nothing tuned yet); studies
are run on purpose (they cost many trainings), not by every ``dvc repro``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
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


def tuned_train_config(params: Params, target: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """``target``'s ``train`` section ``base`` with the study's best params merged over it."""
    base = dict(base)
    path = tuned_path(target)
    if not path.is_file():
        return base
    import yaml

    tuned = yaml.safe_load(path.read_text()) or {}
    if not tuned:
        return base
    from microseg.utils.convert import merge_dotted

    log.info("%s training uses the tuned params of %s: %s", target, path, tuned)
    return merge_dotted(base, tuned)


def study_config(params: Params, target: str, family: str):
    """The ``tune.<target>`` entry over ``family``'s default study (a generic one for a family
    without defaults); the study is named ``<target>-train`` unless the entry says otherwise."""
    from microseg.tune.training import STUDY_CONFIGS, TrainStudyConfig

    cls = STUDY_CONFIGS.get(family) if family in STUDY_CONFIGS else TrainStudyConfig
    return cls.model_validate({"study_name": f"{target}-train", **params.tune.get(target, {})})


def tune_training_stage(
    params: Params,
    target: str,
    on_trial: Callable | None = None,
    trial_hooks: Callable | None = None,
    worker: int = 0,
) -> dict[str, Any]:
    """Run (or continue) the study; write the best params and the summary
    (``metrics/tune_<target>.json``); return the summary."""
    from microseg.stages.training import tunable
    from microseg.tune.training import (
        family_train_fn,
        study_summary,
        tune_training,
        write_best_params,
    )

    families = tunable(params)
    if target not in families:
        raise ConfigError(f"unknown training study {target!r}; available: {sorted(families)}")
    fam = families[target]
    cfg = study_config(params, target, fam.name)
    fn = family_train_fn(
        fam.name, fam.data(), cfg.epochs, metric=cfg.metric, direction=cfg.direction
    )
    best, st = tune_training(
        target,
        fn,
        fam.section(),
        cfg,
        seed=params.seed,
        on_trial=on_trial,
        work_dir=WORK_DIR / target,
        worker=worker,
        trial_hooks=trial_hooks,
        family=fam.name,
    )
    write_best_params(tuned_path(target), best, fam.name)
    out = {"best": best, **study_summary(st)}
    write_json(metrics_path(params, target), out)
    return out
