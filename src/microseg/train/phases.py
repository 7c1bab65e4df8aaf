"""Staged training schedules: a list of phases, each with its own epochs, learning rate and
augmentation (the neuron-detector seed trains phases 1.1 -> 1.2 -> 2 this way).

``phases`` is a knob of every engine config (:class:`~microseg.train.engine.EngineConfig`);
empty (the default) trains as before, bit for bit: nothing here is attached. With phases,
``epochs`` must equal the sum of their epochs, and :class:`PhaseSchedule` (a Lightning
callback the engine adds) switches at the start of every epoch that begins a phase:

* **data** -- the data module's ``set_phase(overrides)`` gets the phase's knobs (``augment``,
  ``shapes``, ``elastic_prob``, ``intensity_prob``, ``noise_prob``; a knob a phase leaves out
  keeps the train config's value, not the previous phase's) and rebuilds its augmentation
  (:meth:`~microseg.train.family.SampledDataModule.set_phase`). Each epoch's stream is then
  re-seeded from ``(seed, epoch, rank)`` as always, so a phase draws the same patches
  whether it was reached in one run or after a resume.
* **learning rate** -- ``lr`` (the first parameter group's base rate; other groups keep their
  ratio to it) or ``lr_scale`` (times the config's rate) becomes the optimizer's *base* rate.
  The family's per-step schedule (:func:`~microseg.train.family.per_step_schedule`: warm-up,
  then cosine decay over ``epochs * steps_per_epoch``) is **not** restarted: it keeps running
  over the whole run's steps, and each phase scales it. So the rate at step ``s`` of phase
  ``k`` is ``base_k * factor(s)``: warm-up happens once, at the start of the run, and the
  cosine reaches its floor at the end of the last phase. A phase that wants a flat rate sets
  its own ``lr`` and the family ``lr_schedule: constant`` where it has one. Chosen because it
  keeps the schedule a pure function of the global step (resume-proof without extra state)
  and a phase's ``lr`` then means what it says relative to its neighbours.

Resume: the phase is a function of the epoch number only, so a run resumed from
``last.ckpt`` mid-schedule applies the phase of its next epoch (the scheduler's saved base
rates are overwritten with that phase's); the callback keeps no state of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from microseg.errors import ConfigError

#: the data knobs a phase may override (each family's config must have the ones a phase sets)
DATA_KNOBS = ("augment", "shapes", "elastic_prob", "intensity_prob", "noise_prob")


@dataclass
class PhaseConfig:
    """One phase: ``epochs`` and what changes in it (``None``: the train config's value)."""

    epochs: int
    #: a label for logs ("1.1", "warm-up", ...)
    name: str = ""
    lr: float | None = None
    lr_scale: float | None = None
    augment: bool | None = None
    #: keys of :class:`~microseg.data.shapes.ShapesConfig`, merged over the config's
    shapes: dict[str, Any] | None = None
    elastic_prob: float | None = None
    intensity_prob: float | None = None
    noise_prob: float | None = None

    def overrides(self) -> dict[str, Any]:
        """The data knobs this phase sets."""
        return {k: getattr(self, k) for k in DATA_KNOBS if getattr(self, k) is not None}

    def lr_factor(self, base_lr: float) -> float:
        """This phase's base rate over the config's ``base_lr``."""
        if self.lr is not None:
            return float(self.lr) / float(base_lr)
        return 1.0 if self.lr_scale is None else float(self.lr_scale)


def parse_phases(values: Sequence[Any] | None, cfg: Any) -> list[PhaseConfig]:
    """``cfg.phases`` as :class:`PhaseConfig` objects, checked against ``cfg`` (a train config
    dataclass): whole positive epochs that sum to ``cfg.epochs``, ``lr`` or ``lr_scale`` (not
    both, positive), and data knobs that ``cfg`` has."""
    if not values:
        return []
    if isinstance(values, Mapping | str):
        raise ConfigError(f"invalid training config: phases must be a list, found {values!r}")
    knobs = {f.name for f in dataclasses.fields(cfg)}
    phase_keys = {f.name for f in dataclasses.fields(PhaseConfig)}
    phases = []
    for i, value in enumerate(values):
        where = f"invalid training config: phases[{i}]"
        if isinstance(value, PhaseConfig):
            value = {k: getattr(value, k) for k in phase_keys}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, found {value!r}")
        unknown = sorted(set(value) - phase_keys)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(phase_keys)}")
        if "epochs" not in value:
            raise ConfigError(f"{where}: 'epochs' is required")
        phase = PhaseConfig(**value)
        epochs = phase.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"{where}: epochs must be a whole number >= 1, found {epochs!r}")
        if phase.lr is not None and phase.lr_scale is not None:
            raise ConfigError(f"{where}: set lr or lr_scale, not both")
        for k in ("lr", "lr_scale"):
            v = getattr(phase, k)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise ConfigError(f"{where}: {k} must be a number > 0, found {v!r}")
        missing = sorted(set(phase.overrides()) - knobs)
        if missing:
            raise ConfigError(
                f"{where} sets {missing}, which {type(cfg).__name__} has no knob for "
                f"(its data knobs: {sorted(knobs & set(DATA_KNOBS))})"
            )
        phases.append(phase)
    total = sum(p.epochs for p in phases)
    if total != cfg.epochs:
        raise ConfigError(
            f"invalid training config: epochs={cfg.epochs}, but the phases add up to {total} "
            f"({' + '.join(str(p.epochs) for p in phases)}); set epochs to {total} or drop it"
        )
    return phases


def phase_index(phases: Sequence[PhaseConfig], epoch: int) -> int:
    """The index of the phase that epoch ``epoch`` (from 0) belongs to (the last one past
    the end)."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.epochs
        if epoch < end:
            return i
    return len(phases) - 1


def phase_at(phases: Sequence[PhaseConfig], epoch: int) -> PhaseConfig:
    """The phase that epoch ``epoch`` (from 0) belongs to (the last one past the end)."""
    return phases[phase_index(phases, epoch)]


def phase_config(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """``cfg`` (a train config dataclass) with a phase's data knobs, checked by the config's
    own validation. A mapping given for a dataclass knob (``shapes``) is merged over it."""
    values = {}
    for k, v in overrides.items():
        current = getattr(cfg, k)
        if dataclasses.is_dataclass(current) and isinstance(v, Mapping):
            v = {**dataclasses.asdict(current), **v}
        values[k] = v
    return dataclasses.replace(cfg, phases=[], **values) if values else cfg


def check_phases(cfg: Any) -> None:
    """Build every phase's config once, so a bad value fails before training starts."""
    for phase in cfg.phases:
        phase_config(cfg, phase.overrides())


def set_base_lr(trainer: L.Trainer, factor: float) -> None:
    """Make ``initial_lr * factor`` every parameter group's base rate; the current rate keeps
    the scheduler's factor (``lr = base * factor(step)`` for ``LambdaLR`` and any other
    multiplicative schedule)."""
    for opt in trainer.optimizers:
        schedulers = [
            c.scheduler
            for c in trainer.lr_scheduler_configs
            if getattr(c.scheduler, "optimizer", None) is opt
        ]
        for i, group in enumerate(opt.param_groups):
            group.setdefault("initial_lr", group["lr"])
            new = float(group["initial_lr"]) * factor
            old = float(schedulers[0].base_lrs[i]) if schedulers else float(group["lr"])
            group["lr"] = float(group["lr"]) * new / old if old else new
            for s in schedulers:
                s.base_lrs[i] = new
        for s in schedulers:
            s._last_lr = [g["lr"] for g in opt.param_groups]


class PhaseSchedule(Callback):
    """Switches learning rate and augmentation when an epoch starts a new phase."""

    def __init__(self, phases: Sequence[PhaseConfig]) -> None:
        self.phases = list(phases)
        self._current: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._current = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index = phase_index(self.phases, int(trainer.current_epoch))
        if index != self._current:
            self._apply(trainer, index)
            self._current = index
        pl_module.log(
            "phase", float(index), on_step=False, on_epoch=True, batch_size=1, sync_dist=True
        )

    def _apply(self, trainer: L.Trainer, index: int) -> None:
        phase = self.phases[index]
        opt = trainer.optimizers[0]
        base = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
        set_base_lr(trainer, phase.lr_factor(base))
        overrides = phase.overrides()
        datamodule = getattr(trainer, "datamodule", None)
        set_phase = getattr(datamodule, "set_phase", None)
        if set_phase is not None:
            set_phase(overrides)
        elif overrides:
            raise ConfigError(
                f"phase {index} sets {sorted(overrides)}, but the data module "
                f"{type(datamodule).__name__} cannot change its augmentation per phase"
            )
