"""The objective of a training study: train a registered model family for one trial.

Any family of :data:`microseg.models.MODELS` can be tuned: its façade's
``train(data, out_dir, train_section, hooks, resume=False)`` runs each trial, so a new family
needs no code here. Pruning: a family whose loop ends normally when a hook asks it to
(``stops_on_request``, e.g. YOLO through Ultralytics' ``trainer.stop``) is stopped that way,
its loaders closed and checkpoints finalised, and the trial is marked pruned afterwards; any
other family is stopped by :class:`optuna.TrialPruned` raised from the epoch hook.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from microseg.train.hooks import HookBase, Hooks
from microseg.tune.spaces import Direction
from microseg.tune.study import TrainFn
from microseg.tune.trials import CurveRecorder, pruning_hooks


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def family_train_fn(
    family: str,
    data: Any,
    epochs: int,
    *,
    metric: str,
    direction: Direction = "maximize",
    extra_hooks: Sequence[HookBase] = (),
) -> TrainFn:
    """A ``train_fn`` that trains ``get_model(family)`` afresh for ``epochs`` epochs per trial.

    ``data`` is what the family's ``train`` takes (a dataset yaml, a targets folder, a
    ``(train, val)`` pair of d3sets ...); each trial's params are a whole ``train`` section
    (the study merges the sampled knobs over it). Returns the best epoch's ``metric`` (a name
    the family's epoch metrics use: ``val/mAP50``, ``val_spine_dice``, ``val_f1_50`` ...).
    """
    from microseg.models import get_model

    model = get_model(family)  # an unknown family fails before the study starts
    soft_stop = bool(getattr(model, "stops_on_request", False))

    def run(section: dict[str, Any], hooks: HookBase, trial_dir: Path) -> float:
        pruners = pruning_hooks(hooks)
        for p in pruners:
            p.raise_on_prune = not soft_stop
        curve = CurveRecorder(metric)
        try:
            model.train(
                data,
                trial_dir,
                {**section, "epochs": epochs},
                Hooks([*extra_hooks, curve, hooks]),
                resume=False,
            )
        finally:
            _free_memory()
        for p in pruners:
            if p.pruned:
                raise optuna.TrialPruned(p.message())
        return curve.best(direction)

    return run
