"""Our training hooks, reached from Ultralytics' trainer through its event callbacks.

Ultralytics calls ``model.add_callback(event, fn)`` functions with the trainer at fixed
events (``ultralytics/utils/callbacks/base.py``). :func:`attach_hooks` translates them into
:class:`~microseg.train.hooks.HookBase` events, so the MLflow hook (``mlflow_hooks``), Optuna
reporting and anything else written for our own loops work unchanged on YOLO training:

==================  ==========================================================================
Ultralytics event   our hook event
==================  ==========================================================================
on_train_start      ``before_train(config)``: the run's hyper-parameters (flat)
on_model_save       ``after_checkpoint(last.pt, False)`` and, when this epoch is the best so far,
                    ``after_checkpoint(best.pt, True)``
on_fit_epoch_end    ``after_epoch(epoch, metrics)``: train losses (``train/box_loss`` ...),
                    validation (``val/precision``, ``val/recall``, ``val/mAP50``,
                    ``val/mAP50-95``, ``val/*_loss``), ``fitness`` and ``lr/pg*``; epoch from 0
on_train_end        ``after_train(best, best.pt)``: validation of best.pt plus ``fitness`` and
                    ``best_epoch`` (0-based)
==================  ==========================================================================

Ultralytics runs ``on_fit_epoch_end`` once more after training, for its final validation of
best.pt; that call is not an epoch and feeds ``after_train`` instead.

A hook (or a :class:`~microseg.train.hooks.Hooks` member) whose ``should_stop`` turns true
(e.g. :class:`~microseg.train.hooks.EarlyStopping`) stops the trainer after that epoch.

Ultralytics' own MLflow integration opens a run of its own; :func:`disable_ultralytics_mlflow`
switches it off in the settings and strips its callbacks from every trainer, so all logging
goes through our hooks into the run that is active when training starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microseg.train.hooks import HookBase, should_stop

log = logging.getLogger(__name__)

#: Ultralytics callback modules we never let run (they open runs/connections of their own)
FOREIGN_CALLBACK_MODULES = (
    "ultralytics.utils.callbacks.mlflow",
    # reports to a Ray Tune session when it finds one; our studies are Optuna's (tune/)
    "ultralytics.utils.callbacks.raytune",
)

#: trainer arguments passed to ``before_train`` (the knobs that change a result)
CONFIG_KEYS = (
    "model",
    "data",
    "epochs",
    "patience",
    "batch",
    "imgsz",
    "device",
    "workers",
    "seed",
    "deterministic",
    "single_cls",
    "optimizer",
    "lr0",
    "lrf",
    "cos_lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "box",
    "cls",
    "dfl",
    "close_mosaic",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
    "cutmix",
    "amp",
    "pretrained",
)

_VAL_NAMES = {
    "metrics/precision(B)": "val/precision",
    "metrics/recall(B)": "val/recall",
    "metrics/mAP50(B)": "val/mAP50",
    "metrics/mAP50-95(B)": "val/mAP50-95",
}


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def val_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Ultralytics' validation dict with friendly names (``val/precision``, ``val/mAP50`` ...)."""
    out = {}
    for k, v in (metrics or {}).items():
        value = _number(v)
        if value is not None:
            out[_VAL_NAMES.get(k, k)] = value
    return out


def epoch_metrics(trainer: Any) -> dict[str, float]:
    """Losses, validation metrics, fitness and learning rates of the trainer's current epoch."""
    out: dict[str, float] = {}
    if trainer.tloss is not None and getattr(trainer, "loss_names", None):
        out.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    out.update(val_metrics(trainer.metrics))
    fitness = _number(getattr(trainer, "fitness", None))
    if fitness is not None:
        out["fitness"] = fitness
    out.update({k: float(v) for k, v in (getattr(trainer, "lr", None) or {}).items()})
    return out


def train_config(trainer: Any) -> dict[str, Any]:
    """The hyper-parameters of a trainer run, flat, with paths as strings."""
    args = vars(trainer.args)
    out = {k: args[k] for k in CONFIG_KEYS if k in args}
    out = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
    out["start_epoch"] = int(getattr(trainer, "start_epoch", 0))
    return out


class UltralyticsHookBridge:
    """Holds the per-run state of the translation (which ``on_fit_epoch_end`` is an epoch)."""

    def __init__(self, hooks: HookBase) -> None:
        self.hooks = hooks
        self.in_epoch = False
        self.final_metrics: dict[str, float] = {}

    def on_train_start(self, trainer: Any) -> None:
        self.in_epoch = False
        self.final_metrics = {}
        self.hooks.before_train(train_config(trainer))

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.in_epoch = True

    def on_model_save(self, trainer: Any) -> None:
        self.hooks.after_checkpoint(Path(trainer.last), False)
        if trainer.best_fitness == trainer.fitness and Path(trainer.best).exists():
            self.hooks.after_checkpoint(Path(trainer.best), True)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        if not self.in_epoch:  # Ultralytics' final validation of best.pt, not an epoch
            self.final_metrics = val_metrics(trainer.metrics)
            return
        self.in_epoch = False
        self.hooks.after_epoch(int(trainer.epoch), epoch_metrics(trainer))
        if should_stop(self.hooks):
            log.info("a training hook asked to stop after epoch %d", trainer.epoch)
            trainer.stop = True

    def on_train_end(self, trainer: Any) -> None:
        best = dict(self.final_metrics)
        fitness = _number(trainer.best_fitness)
        if fitness is not None:
            best["fitness"] = fitness
        stopper = getattr(trainer, "stopper", None)
        if stopper is not None and getattr(stopper, "best_epoch", None) is not None:
            best["best_epoch"] = float(stopper.best_epoch - 1)  # its epochs count from 1
        best_path = Path(trainer.best) if Path(trainer.best).exists() else None
        self.hooks.after_train(best, best_path)


def attach_hooks(yolo_model: Any, hooks: HookBase) -> UltralyticsHookBridge:
    """Add callbacks to an ``ultralytics.YOLO`` model that drive ``hooks`` during ``train``."""
    bridge = UltralyticsHookBridge(hooks)
    for event in (
        "on_train_start",
        "on_train_epoch_end",
        "on_model_save",
        "on_fit_epoch_end",
        "on_train_end",
    ):
        yolo_model.add_callback(event, getattr(bridge, event))
    return bridge


def strip_foreign_callbacks(trainer: Any) -> None:
    """Remove Ultralytics' MLflow callbacks from a trainer (runs as ``on_pretrain_routine_start``).

    Integration callbacks are added in the trainer's constructor from the settings of that
    moment; this runs right after, before any of them has opened a run.
    """
    removed = 0
    for event, fns in list(trainer.callbacks.items()):
        keep = [f for f in fns if getattr(f, "__module__", "") not in FOREIGN_CALLBACK_MODULES]
        removed += len(fns) - len(keep)
        trainer.callbacks[event] = keep
    if removed:
        log.debug("removed %d Ultralytics integration callbacks", removed)


def disable_ultralytics_mlflow(yolo_model: Any) -> None:
    """Switch off Ultralytics' MLflow integration for this model's training (no stray runs)."""
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("mlflow"):
        SETTINGS.update({"mlflow": False})
    callbacks = yolo_model.callbacks.setdefault("on_pretrain_routine_start", [])
    if strip_foreign_callbacks not in callbacks:
        callbacks.insert(0, strip_foreign_callbacks)
