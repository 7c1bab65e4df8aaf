"""Optuna training studies of any registered model family: ``microseg tune --target <model>``.

The pieces live in :mod:`.spaces` (search spaces, budgets, per-family defaults),
:mod:`.trials` (what a trial reports, lost-trial requeue), :mod:`.study` (the study loop and
the tuned params files) and :mod:`.objectives` (a trial trains the family through
:func:`microseg.models.get_model`); this module is their one import point.
"""

from __future__ import annotations

from microseg.tune.objectives import family_train_fn
from microseg.tune.spaces import (
    STUDY_CONFIGS,
    Direction,
    MaskrcnnStudyConfig,
    ParamSpec,
    PrunerConfig,
    PunetStudyConfig,
    TrainStudyConfig,
    UnetStudyConfig,
    YoloStudyConfig,
    check_keys,
    default_study_config,
)
from microseg.tune.study import (
    OnTrial,
    TrainFn,
    TrialHooks,
    read_best_params,
    study_summary,
    tune_training,
    write_best_params,
)
from microseg.tune.trials import CurveRecorder, OptunaPruningHook, TuningError
from microseg.utils.convert import flatten, nest
from microseg.utils.convert import merge_dotted as merge_tuned

__all__ = [
    "STUDY_CONFIGS",
    "CurveRecorder",
    "Direction",
    "MaskrcnnStudyConfig",
    "OnTrial",
    "OptunaPruningHook",
    "ParamSpec",
    "PrunerConfig",
    "PunetStudyConfig",
    "TrainFn",
    "TrainStudyConfig",
    "TrialHooks",
    "TuningError",
    "UnetStudyConfig",
    "YoloStudyConfig",
    "check_keys",
    "default_study_config",
    "family_train_fn",
    "flatten",
    "merge_tuned",
    "nest",
    "read_best_params",
    "study_summary",
    "tune_training",
    "write_best_params",
]
