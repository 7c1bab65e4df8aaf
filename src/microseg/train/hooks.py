"""Training hooks: how logging, checkpointing and early stopping reach a loop.

detectron2-style: a loop calls its hooks at fixed events and knows nothing about MLflow or
Optuna. ``registry/mlflow_hooks.py`` logs to MLflow, ``tune/`` reports to Optuna (and may
raise ``optuna.TrialPruned`` from ``after_epoch``), checkpoint hooks live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

H = TypeVar("H", bound="HookBase")


class HookBase:
    """Override what you need; every event is a no-op by default."""

    def before_train(self, config: Mapping[str, Any]) -> None:
        """Once, with the flat training config (for logging params)."""

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """After each epoch with its losses and validation metrics (``epoch`` from 0)."""

    def after_checkpoint(self, path: Path, is_best: bool) -> None:
        """After a checkpoint file was written atomically."""

    def after_train(self, best: Mapping[str, float], best_path: Path | None) -> None:
        """Once, when training ends normally."""


class Hooks(HookBase):
    """Fan one event out to many hooks, in order."""

    def __init__(self, hooks: Iterable[HookBase] = ()) -> None:
        self.hooks = list(hooks)

    def before_train(self, config: Mapping[str, Any]) -> None:
        for h in self.hooks:
            h.before_train(config)

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for h in self.hooks:
            h.after_epoch(epoch, metrics)

    def after_checkpoint(self, path: Path, is_best: bool) -> None:
        for h in self.hooks:
            h.after_checkpoint(path, is_best)

    def after_train(self, best: Mapping[str, float], best_path: Path | None) -> None:
        for h in self.hooks:
            h.after_train(best, best_path)


def should_stop(hook: HookBase | None) -> bool:
    """True when ``hook`` (or any hook inside a :class:`Hooks`) asks the loop to stop."""
    if hook is None:
        return False
    if getattr(hook, "should_stop", False):
        return True
    return isinstance(hook, Hooks) and any(should_stop(h) for h in hook.hooks)


def find_hooks(hook: HookBase | None, kind: type[H]) -> list[H]:
    """Every hook of type ``kind`` in ``hook`` (walking nested :class:`Hooks`)."""
    if isinstance(hook, kind):
        return [hook]
    if isinstance(hook, Hooks):
        return [found for h in hook.hooks for found in find_hooks(h, kind)]
    return []


class EarlyStopping(HookBase):
    """Signals a stop when ``metric`` has not improved for ``patience`` epochs."""

    def __init__(self, metric: str, patience: int, mode: str = "max") -> None:
        self.metric, self.patience, self.mode = metric, patience, mode
        self.best: float | None = None
        self.bad_epochs = 0
        self.should_stop = False

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            self.should_stop = self.bad_epochs >= self.patience
