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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError
from microseg.stages.common import write_json
from microseg.stages.result import StageResult, run_stage
from microseg.stages.tuned import TUNED_DIR, tuned_path, tuned_train_config  # noqa: F401

log = logging.getLogger(__name__)

WORK_DIR = Path("models/tune")


def metrics_path(params: Params, target: str) -> Path:
    """The study summary (``metrics/tune_<target>.json``)."""
    return params.paths.metrics / f"tune_{target}.json"


def study_config(params: Params, target: str, family: str):
    """The ``tune.<target>`` entry over ``family``'s default study (a generic one for a family
    without defaults); the study is named ``<target>-train`` unless the entry says otherwise."""
    from pydantic import ValidationError

    from microseg.config import describe_errors
    from microseg.tune.training import STUDY_CONFIGS, TrainStudyConfig

    cls = STUDY_CONFIGS.get(family) if family in STUDY_CONFIGS else TrainStudyConfig
    try:
        return cls.model_validate({"study_name": f"{target}-train", **params.tune.get(target, {})})
    except ValidationError as exc:
        raise ConfigError(f"tune.{target}: {describe_errors(exc)}") from None


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


def run_tune(params: Params, target: str, worker: int = 0) -> StageResult:
    """An Optuna study (each trial a nested MLflow run); best params -> ``params/tuned_*``."""
    from microseg.registry.stage_logging import MlflowTrialLogger
    from microseg.stages.training import trainers
    from microseg.utils.convert import flatten

    runners = {} if target == "fusion" else trainers(params)
    if target != "fusion" and (target not in runners or runners[target].family is None):
        names = ", ".join(["fusion", *(n for n, t in runners.items() if t.family is not None)])
        raise ConfigError(f"unknown tuning target {target!r}; available: {names}")
    on_trial = MlflowTrialLogger()
    if target == "fusion":
        from microseg.stages import fusion

        def tune_fusion() -> StageResult:
            out = fusion.tune_fusion_stage(params, on_trial=on_trial, worker=worker)
            return StageResult(
                "tune_fusion",
                out,
                log_metrics={"best_val_f1": out["best_val_f1"]},
                log_params={f"best.{k}": v for k, v in out["best"].items()},
                artifacts=[(fusion.TUNED, "tuned")],
                out=fusion.TUNED,
            )

        return run_stage(
            params,
            tune_fusion,
            stage="tune_fusion",
            task="spines",
            section=params.fusion,
        )

    def tune_training() -> StageResult:
        out = tune_training_stage(params, target, on_trial=on_trial, worker=worker)
        return StageResult(
            f"tune_{target}",
            out,
            metrics_file=metrics_path(params, target),
            log_metrics={k: v for k, v in out.items() if k != "best"},
            log_params={f"best.{k}": v for k, v in flatten(out["best"]).items()},
            artifacts=[(tuned_path(target), "tuned")],
            out=tuned_path(target),
        )

    return run_stage(
        params,
        tune_training,
        stage=f"tune_{target}",
        task=runners[target].task,
        dataset=runners[target].dataset,
        section=params.tune.get(target, {}),
    )
