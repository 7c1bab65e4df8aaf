"""What a training study searches and for how long: search spaces, budgets, per-family defaults.

A study searches training knobs (learning rate, regularisation, augmentation strength ...)
given as a ``space`` of ``param -> spec``; dotted names (``augment.scale``) reach nested keys
of the family's params ``train`` section. :func:`check_keys` asks the family
(``check_train_keys``) whether it knows them, so typos fail before anything trains.
:data:`STUDY_CONFIGS` holds the default study of each family that has one; any other
registered family gets :class:`TrainStudyConfig`, filled from its ``params.yaml`` entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microseg.errors import ConfigError
from microseg.tune.storage import DEFAULT_STORAGE
from microseg.utils.convert import flatten
from microseg.utils.registry import Registry

Direction = Literal["maximize", "minimize"]

#: knobs that set how much a trial computes rather than how it learns: the adopted best params
#: must apply unchanged to the training stage's own budget (``epochs`` is the study's budget)
BUDGET_KNOBS = frozenset({"imgsz", "patch_size"})


class ParamSpec(BaseModel):
    """One searched knob: ``{choices: [...]}`` or ``{low, high[, log][, step]}``.

    Integer ``low`` and ``high`` give an integer knob; write ``0.0`` for a float range.
    """

    model_config = ConfigDict(extra="forbid")

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either a non-empty 'choices' or 'low' and 'high'")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both 'low' and 'high' (or give 'choices')")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; found {self.low}")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined")
        return self

    @property
    def kind(self) -> Literal["categorical", "int", "float"]:
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) for v in (self.low, self.high))
        return "int" if ints and isinstance(self.step, int | None) else "float"

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, self.choices)  # type: ignore[arg-type]
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)  # type: ignore[arg-type]


class PrunerConfig(BaseModel):
    """Median pruner: no pruning before ``n_startup_trials`` trials completed, nor before epoch
    ``n_warmup_steps`` (0-based) of a trial."""

    model_config = ConfigDict(extra="forbid")

    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(1, ge=0)


class TrainStudyConfig(BaseModel):
    """Budget, storage, objective and search space of one training study."""

    model_config = ConfigDict(extra="forbid")

    #: total finished (COMPLETE + PRUNED) trials the study should hold
    n_trials: int = Field(16, ge=1)
    #: training epochs of every trial (the per-trial budget); null: the training section's own
    #: ``epochs``, so the study scores the knobs at the budget they will be trained with
    epochs: int | None = Field(4, ge=1)
    #: trial 0 of a fresh study trains the training section's own values of the searched knobs
    #: (the default), so the best trial is compared with the default on the same budget
    baseline: bool = True
    #: points of the space queued after the baseline in a fresh study (dotted keys of
    #: ``space``): e.g. a promising trial of an earlier study at another budget, retried here
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    #: seconds after which this call starts no new trial (null: no limit)
    timeout: float | None = Field(None, gt=0)
    storage: str = DEFAULT_STORAGE
    study_name: str = "train"
    #: epoch metric reported to the pruner and returned as the trial's value (best epoch)
    metric: str = "val_spine_dice"
    direction: Direction = "maximize"
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    #: failed trials (training raised) tolerated in one call before it gives up
    max_failed_trials: int = Field(3, ge=0)
    space: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_epochs_in_space(self) -> TrainStudyConfig:
        if "epochs" in self.space:
            raise ValueError("'epochs' is the per-trial budget (study 'epochs'), not a knob")
        return self

    @model_validator(mode="after")
    def _enqueued_in_space(self) -> TrainStudyConfig:
        for point in self.enqueue:
            unknown = sorted(set(point) - set(self.space))
            if unknown:
                raise ValueError(f"enqueue: {unknown} are not knobs of {sorted(self.space)}")
        return self

    @model_validator(mode="after")
    def _no_budget_knobs(self) -> TrainStudyConfig:
        knobs = sorted(BUDGET_KNOBS & set(self.space))
        if knobs:
            raise ValueError(
                f"{knobs} set the training budget (compute per epoch); a value tuned at the "
                "study's budget would not carry over to the training stage's, so they are not knobs"
            )
        return self


def _yolo_space() -> dict[str, ParamSpec]:
    return {
        "lr0": ParamSpec(low=1e-4, high=1e-2, log=True),
        "augment.scale": ParamSpec(low=0.0, high=0.5),
        "augment.degrees": ParamSpec(low=0.0, high=30.0),
        "augment.translate": ParamSpec(low=0.0, high=0.2),
        "augment.mosaic": ParamSpec(low=0.0, high=1.0),
        "augment.hsv_v": ParamSpec(low=0.0, high=0.5),
    }


def _punet_space() -> dict[str, ParamSpec]:
    return {
        "lr": ParamSpec(low=3e-4, high=1e-2, log=True),
        "weight_decay": ParamSpec(low=1e-6, high=1e-3, log=True),
        "fg_fraction": ParamSpec(low=0.3, high=0.8),
        "tversky_alpha": ParamSpec(low=0.2, high=0.5),
        "kl_beta": ParamSpec(low=0.1, high=3.0, log=True),
        "augment": ParamSpec(choices=[True, False]),
    }


def _unet_space() -> dict[str, ParamSpec]:
    return {
        "lr": ParamSpec(low=1e-3, high=1e-2, log=True),
        "weight_decay": ParamSpec(low=1e-6, high=1e-3, log=True),
        "fg_fraction": ParamSpec(low=0.5, high=0.9),
        "elastic_prob": ParamSpec(low=0.0, high=0.4),
    }


def _maskrcnn_space() -> dict[str, ParamSpec]:
    return {
        "lr": ParamSpec(low=2e-3, high=2e-2, log=True),
        "weight_decay": ParamSpec(low=1e-5, high=1e-3, log=True),
    }


class YoloStudyConfig(TrainStudyConfig):
    """Defaults of ``tune.yolo``: mAP@0.5 (spines are matched by position downstream, so box
    tightness, which mAP@0.5:0.95 rewards, matters little)."""

    n_trials: int = Field(4, ge=1)
    #: the demo's own budget: from scratch, mAP@0.5 stays ~0 for the first ~4 epochs, so a
    #: shorter trial scores every knob 0 (no signal)
    epochs: int | None = Field(None, ge=1)
    study_name: str = "yolo-train"
    metric: str = "val/mAP50"
    pruner: PrunerConfig = Field(
        default_factory=lambda: PrunerConfig(n_startup_trials=1, n_warmup_steps=4)
    )
    space: dict[str, ParamSpec] = Field(default_factory=_yolo_space)


class PunetStudyConfig(TrainStudyConfig):
    """Defaults of ``tune.punet``: validation spine Dice, what ``train_punet`` keeps best.pt by."""

    n_trials: int = Field(16, ge=1)
    epochs: int = Field(4, ge=1)
    study_name: str = "punet-train"
    metric: str = "val_spine_dice"
    space: dict[str, ParamSpec] = Field(default_factory=_punet_space)


class UnetStudyConfig(TrainStudyConfig):
    """Defaults of a ``cells.models`` U-Net's study: validation instance F1 at IoU 0.5, what
    ``train_unet`` keeps best.pt by."""

    study_name: str = "unet-train"
    metric: str = "val_f1_50"
    space: dict[str, ParamSpec] = Field(default_factory=_unet_space)


class MaskrcnnStudyConfig(TrainStudyConfig):
    """Defaults of a ``cells.models`` Mask R-CNN's study (``val_f1_50``, as for the U-Net)."""

    study_name: str = "maskrcnn-train"
    metric: str = "val_f1_50"
    space: dict[str, ParamSpec] = Field(default_factory=_maskrcnn_space)


#: family -> its default study (a family not here gets :class:`TrainStudyConfig`)
#: family -> its default training study (others get :class:`TrainStudyConfig`)
STUDY_CONFIGS: Registry[type[TrainStudyConfig]] = Registry("training study")
STUDY_CONFIGS.add("yolo", YoloStudyConfig)
STUDY_CONFIGS.add("punet", PunetStudyConfig)
STUDY_CONFIGS.add("unet", UnetStudyConfig)
STUDY_CONFIGS.add("maskrcnn", MaskrcnnStudyConfig)


def default_study_config(family: str) -> TrainStudyConfig:
    """The default study of ``family`` (one of :data:`STUDY_CONFIGS`)."""
    return STUDY_CONFIGS.get(family)()


def check_keys(family: str, keys: Iterable[str]) -> None:
    """Refuse dotted keys the registered ``family`` would not train with (its
    ``check_train_keys``; a family without one accepts any key) and ``epochs``, which is the
    study's per-trial budget."""
    from microseg.models import get_model

    keys = list(keys)
    if "epochs" in keys:
        raise ConfigError("'epochs' is the per-trial budget of the study, not a searched knob")
    check = getattr(get_model(family), "check_train_keys", None)
    if check is not None:
        check(keys)


def baseline_values(
    family: str | None, base_params: Mapping[str, Any], keys: Iterable[str]
) -> dict[str, Any] | None:
    """The values the training section trains ``keys`` with (dotted): the section's own, else
    the family's (``train_defaults``, e.g. YOLO's augmentation defaults); None when a key has
    neither, so no baseline trial can be the default."""
    flat = flatten(dict(base_params))
    keys = list(keys)
    missing = [k for k in keys if k not in flat]
    if missing and family is not None:
        from microseg.models import get_model

        defaults = getattr(get_model(family), "train_defaults", None)
        if defaults is not None:
            flat.update(defaults(missing))
    if any(k not in flat for k in keys):
        return None
    return {k: flat[k] for k in keys}
