"""Optuna training studies for YOLO and the Prob-UNet: ``microseg tune --target yolo|punet``.

A study searches training knobs (learning rate, image/patch size, augmentation strength ...)
given as a ``space`` of ``param -> spec``; dotted names (``augment.scale``) reach nested keys.
Each trial trains for ``epochs`` epochs in its own folder ``<work_dir>/trial_<n>`` and
reports its validation metric after every epoch (:class:`OptunaPruningHook`); a median
pruner stops trials whose curve falls below the median of the completed ones at the same
epoch. The best trial's params are written to ``params/tuned_<target>.yaml`` as a nested
mapping that :func:`merge_tuned` merges into ``yolo.train`` / ``punet.train``.

The training itself is injected (``train_fn(trial_params, hooks, trial_dir) -> metric``), so
the study logic runs with a cheap fake in tests; :func:`yolo_train_fn` and
:func:`punet_train_fn` plug in the real trainers.

Budget and resume: unlike the fusion study (whose ``n_trials`` counts the trials one call
adds), ``n_trials`` here is the study's *total* of finished (COMPLETE + PRUNED) trials, so a
rerun after an interruption only runs what is missing, and a finished study runs nothing.
Trials lost to an interruption are run again with the same params, once each:

* ``KeyboardInterrupt`` inside a trial: Optuna records it FAIL; we mark it ``interrupted``;
* a process killed outright leaves its trial RUNNING: on SQLite (no heartbeat) a RUNNING
  trial whose process (host + pid recorded on the trial) no longer exists is marked FAIL by
  the next call; on a server storage Optuna's heartbeat does the same after the grace period.

Failed trials (training raised) are recorded FAIL and the study goes on; more than
``max_failed_trials`` failures in one call stop it with :class:`TuningError`.

Several workers: point them at one storage with distinct ``worker`` numbers. Before training,
a trial checks that fewer than ``n_trials`` live trials precede it (by number); otherwise it
is a surplus trial (recorded FAIL, not trained), so concurrent workers never overshoot.

Reproducibility: TPE is seeded from ``(seed, worker, trials so far)`` (:mod:`.storage`) and
keeps its own random state, so training code that reseeds the global ``random``/NumPy/torch
generators does not move it. The same seed on a fresh storage proposes the same start-up
points whatever the training returns, and the same whole sequence when the values repeat.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import inspect
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microseg.errors import ConfigError, DataFormatError, MicrosegError, MissingFileError
from microseg.train.hooks import HookBase, Hooks
from microseg.tune.storage import DEFAULT_STORAGE
from microseg.tune.storage import study as open_study
from microseg.utils.atomic import write_text

log = logging.getLogger(__name__)

TARGETS = ("yolo", "punet")
Direction = Literal["maximize", "minimize"]
#: ``train_fn(trial_params, hooks, trial_dir) -> final validation metric``
TrainFn = Callable[[dict[str, Any], HookBase, Path], float]
OnTrial = Callable[[optuna.Trial, dict[str, Any]], None]
TrialHooks = Callable[[optuna.Trial, Path], Iterable[HookBase]]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_ALIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class TuningError(MicrosegError):
    """The study cannot go on (every trial fails, the metric is never reported ...)."""


# -- configuration --------------------------------------------------------------------------
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
    #: training epochs of every trial (the per-trial budget)
    epochs: int = Field(4, ge=1)
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


def _yolo_space() -> dict[str, ParamSpec]:
    return {
        "lr0": ParamSpec(low=1e-4, high=1e-2, log=True),
        "imgsz": ParamSpec(choices=[192, 256, 320]),
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
        "patch_size": ParamSpec(choices=[96, 128]),
        "fg_fraction": ParamSpec(low=0.3, high=0.8),
        "tversky_alpha": ParamSpec(low=0.2, high=0.5),
        "kl_beta": ParamSpec(low=0.1, high=3.0, log=True),
        "augment": ParamSpec(choices=[True, False]),
    }


class YoloStudyConfig(TrainStudyConfig):
    """Defaults of ``tune.yolo``: mAP@0.5 (spines are matched by position downstream, so box
    tightness, which mAP@0.5:0.95 rewards, matters little)."""

    n_trials: int = Field(20, ge=1)
    epochs: int = Field(10, ge=1)
    study_name: str = "yolo-train"
    metric: str = "val/mAP50"
    pruner: PrunerConfig = Field(
        default_factory=lambda: PrunerConfig(n_startup_trials=5, n_warmup_steps=2)
    )
    space: dict[str, ParamSpec] = Field(default_factory=_yolo_space)


class PunetStudyConfig(TrainStudyConfig):
    """Defaults of ``tune.punet``: validation spine Dice, what ``train_punet`` keeps best.pt by."""

    n_trials: int = Field(16, ge=1)
    epochs: int = Field(4, ge=1)
    study_name: str = "punet-train"
    metric: str = "val_spine_dice"
    space: dict[str, ParamSpec] = Field(default_factory=_punet_space)


STUDY_CONFIGS: dict[str, type[TrainStudyConfig]] = {
    "yolo": YoloStudyConfig,
    "punet": PunetStudyConfig,
}


def default_study_config(target: str) -> TrainStudyConfig:
    """The default study of ``target`` (``"yolo"`` or ``"punet"``)."""
    if target not in STUDY_CONFIGS:
        raise ConfigError(f"tune target must be one of {list(STUDY_CONFIGS)}; found {target!r}")
    return STUDY_CONFIGS[target]()


# -- nested params --------------------------------------------------------------------------
def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"augment": {"scale": 0.2}} -> {"augment.scale": 0.2}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested dicts: the inverse of :func:`flatten`."""
    return merge_tuned({}, values)


def merge_tuned(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with every (dotted or nested) key of ``tuned`` set in it.

    ``merge_tuned(params.yolo.train, read_best_params("params/tuned_yolo.yaml"))`` is the
    config to train with; keys ``tuned`` does not hold keep their ``base`` values.
    """
    out = copy.deepcopy(dict(base))
    for dotted, value in flatten(tuned).items():
        node = out
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"tuned key {dotted!r}: expected a mapping at {where!r}, found {child!r}"
                )
            node = child
        node[leaf] = copy.deepcopy(value)
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def check_keys(target: str, keys: Iterable[str]) -> None:
    """Refuse dotted keys ``target``'s trainer would not accept (typos fail before training)."""
    keys = list(keys)
    if "epochs" in keys:
        raise ConfigError("'epochs' is the per-trial budget of the study, not a searched knob")
    if target == "punet":
        from microseg.models.punet.train import PunetTrainConfig

        known = {f.name for f in PunetTrainConfig.__dataclass_fields__.values()}
        bad = [k for k in keys if k not in known]
        hint = "PunetTrainConfig fields"
    elif target == "yolo":
        ultralytics_args = _ultralytics_args()
        known = set(_yolo_train_kwargs()) | ultralytics_args
        bad = []
        for k in keys:
            head, _, rest = k.partition(".")
            ok = rest in ultralytics_args if head == "augment" else (k in known or k == "arch")
            if not ok or k in _YOLO_REFUSED:
                bad.append(k)
        hint = "YoloSpineDetector.train arguments, Ultralytics arguments or augment.<key>"
    else:
        raise ConfigError(f"tune target must be one of {list(TARGETS)}; found {target!r}")
    if bad:
        raise ConfigError(f"unknown {target} training knob(s) {sorted(bad)}; expected {hint}")


# -- reporting to Optuna --------------------------------------------------------------------
class OptunaPruningHook(HookBase):
    """Reports ``metric`` after every epoch (``trial.report(value, epoch)``) and prunes.

    When the pruner says so, it raises :class:`optuna.TrialPruned` (``raise_on_prune``), or
    instead sets ``should_stop`` so that a loop that honours it (ours, Ultralytics' through
    ``models.yolo.callbacks``) ends the run normally; ``pruned`` tells afterwards.
    Epochs without the metric (e.g. no validation that epoch) are not reported.
    """

    def __init__(self, trial: optuna.Trial, metric: str, *, raise_on_prune: bool = True) -> None:
        self.trial, self.metric, self.raise_on_prune = trial, metric, raise_on_prune
        self.curve: dict[int, float] = {}
        self.pruned_at: int | None = None
        self.should_stop = False

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.pruned or self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        self.trial.report(value, epoch)
        self.curve[int(epoch)] = value
        if self.trial.should_prune():
            self.pruned_at = int(epoch)
            self.should_stop = True
            if self.raise_on_prune:
                raise optuna.TrialPruned(self.message())

    def message(self) -> str:
        return (
            f"trial {self.trial.number} pruned after epoch {self.pruned_at}: {self.metric} "
            f"{self.curve.get(self.pruned_at or 0, math.nan):.4g} is worse than the median of "
            "the completed trials"
        )


class CurveRecorder(HookBase):
    """Keeps ``metric`` per epoch; :meth:`best` is a trial's final value."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.curve: dict[int, float] = {}
        self.seen: set[str] = set()

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.seen.update(metrics)
        if self.metric in metrics:
            self.curve[int(epoch)] = float(metrics[self.metric])

    def best(self, direction: Direction = "maximize") -> float:
        values = [v for v in self.curve.values() if math.isfinite(v)]
        if not values:
            raise TuningError(
                f"the training loop never reported a finite {self.metric!r}; its epoch "
                f"metrics were {sorted(self.seen)}"
            )
        return max(values) if direction == "maximize" else min(values)


def _pruning_hooks(hook: HookBase) -> list[OptunaPruningHook]:
    if isinstance(hook, OptunaPruningHook):
        return [hook]
    if isinstance(hook, Hooks):
        return [p for h in hook.hooks for p in _pruning_hooks(h)]
    return []


# -- the study ------------------------------------------------------------------------------
class _TrialFailed(Exception):
    """Training raised: the trial is FAIL, the study goes on (Optuna's ``catch``)."""


class _SurplusTrial(Exception):
    """Other workers already hold ``n_trials`` live trials: this one is not trained."""


@dataclass
class _Last:
    number: int | None = None
    outcome: str = ""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _requeue_lost(st: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
    """Run again, once each, the trials an interruption or a dead process took away.

    Returns whether anything changed (then ``trials`` is out of date).
    """
    storage = st._storage  # Optuna exposes no public accessor
    changed = False
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried |= {t.system_attrs.get("failed_trial") for t in trials}  # heartbeat retries
    heartbeat = getattr(storage, "get_heartbeat_interval", lambda: None)()  # server storages
    host = socket.gethostname()
    for t in trials:
        lost = t.state == TrialState.FAIL and t.user_attrs.get("interrupted", False)
        owner = t.user_attrs.get("owner") or {}
        if (
            t.state == TrialState.RUNNING
            and not heartbeat
            and owner.get("host") == host
            and not _pid_alive(int(owner["pid"]))
        ):
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            log.warning("trial %d: its process %s is gone; marked FAIL", t.number, owner["pid"])
            lost = changed = True
        if lost and t.number not in retried and t.params:
            st.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            retried.add(t.number)
            changed = True
            log.info("trial %d was interrupted: queued again with params %s", t.number, t.params)
    return changed


def _count(st: optuna.Study, *states: TrialState) -> int:
    return len(st.get_trials(deepcopy=False, states=states))


def _open_study(cfg: TrainStudyConfig, seed: int, worker: int) -> optuna.Study:
    """:func:`.storage.study`, retried when workers starting together on an empty database
    race to create Optuna's tables (PostgreSQL: a unique violation in ``pg_type``)."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(3):
        try:
            return open_study(cfg.study_name, cfg.storage, seed, cfg.direction, worker=worker)
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("another worker is creating the Optuna tables; retrying")
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _check_study(st: optuna.Study, target: str, cfg: TrainStudyConfig) -> None:
    attrs = st.user_attrs
    if "metric" not in attrs:
        st.set_user_attr("metric", cfg.metric)
        st.set_user_attr("target", target)
    elif attrs["metric"] != cfg.metric:
        raise ConfigError(
            f"study {cfg.study_name!r} in {cfg.storage} optimises {attrs['metric']!r}, but the "
            f"config asks for {cfg.metric!r}; use another study_name"
        )


def tune_training(
    target: str,
    train_fn: TrainFn,
    base_params: Mapping[str, Any],
    cfg: TrainStudyConfig,
    seed: int = 0,
    on_trial: OnTrial | None = None,
    *,
    work_dir: str | Path | None = None,
    worker: int = 0,
    trial_hooks: TrialHooks | None = None,
) -> tuple[dict[str, Any], optuna.Study]:
    """Run the study until it holds ``cfg.n_trials`` finished trials; (best params, study).

    Each trial calls ``train_fn(merge_tuned(base_params, sampled), hooks, trial_dir)`` with
    ``hooks`` = ``trial_hooks(trial, trial_dir)`` (e.g. a per-trial MLflow hook) followed by
    the :class:`OptunaPruningHook`. ``on_trial(trial, metrics)`` runs after every COMPLETE or
    PRUNED trial with ``state``, ``value``, ``metric``, ``curve`` (epoch -> value), ``params``
    (nested, searched keys only) and ``trial_dir``; an exception there fails the trial and
    stops the study. The best params are nested and hold the searched keys only.
    ``target`` ``"yolo"``/``"punet"`` checks the space's keys against that trainer; any other
    name skips the check.
    """
    if target in TARGETS:
        check_keys(target, cfg.space)
    work_dir = Path(work_dir) if work_dir is not None else Path("tune") / target
    st = _open_study(cfg, seed, worker)
    st.pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.pruner.n_startup_trials, n_warmup_steps=cfg.pruner.n_warmup_steps
    )
    _check_study(st, target, cfg)
    last = _Last()

    def objective(trial: optuna.Trial) -> float:
        last.number, last.outcome = trial.number, "failed"
        ahead = [t for t in st.get_trials(deepcopy=False, states=_ALIVE) if t.number < trial.number]
        if len(ahead) >= cfg.n_trials:
            last.outcome = "surplus"
            raise _SurplusTrial(f"the study already holds {cfg.n_trials} trials; not trained")
        trial.set_user_attr("owner", _owner())
        sampled = {name: spec.suggest(trial, name) for name, spec in cfg.space.items()}
        trial_dir = work_dir / f"trial_{trial.number}"
        if trial_dir.exists():  # a number is never reused: this is debris of another study
            log.warning("removing %s left from an earlier study", trial_dir)
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        pruning = OptunaPruningHook(trial, cfg.metric)
        extra = list(trial_hooks(trial, trial_dir)) if trial_hooks is not None else []
        hooks = Hooks([*extra, pruning])
        report = {"metric": cfg.metric, "params": nest(sampled), "trial_dir": str(trial_dir)}
        try:
            value = float(train_fn(merge_tuned(base_params, sampled), hooks, trial_dir))
            if pruning.pruned:  # the loop stopped on should_stop instead of raising
                raise optuna.TrialPruned(pruning.message())
        except optuna.TrialPruned:
            last.outcome = "pruned"
            if on_trial is not None:
                last_value = pruning.curve[max(pruning.curve)] if pruning.curve else None
                on_trial(
                    trial,
                    {**report, "state": "PRUNED", "value": last_value, "curve": pruning.curve},
                )
            raise
        except KeyboardInterrupt:
            last.outcome = "interrupted"
            trial.set_user_attr("interrupted", True)
            raise
        except TuningError:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise _TrialFailed(f"training failed: {type(exc).__name__}: {exc}") from exc
        if not math.isfinite(value):
            trial.set_user_attr("error", f"non-finite {cfg.metric}: {value}")
            raise _TrialFailed(f"training returned a non-finite {cfg.metric}: {value}")
        last.outcome = "complete"
        if on_trial is not None:
            on_trial(trial, {**report, "state": "COMPLETE", "value": value, "curve": pruning.curve})
        return value

    t0 = time.monotonic()
    failed = 0
    while True:
        trials = st.get_trials(deepcopy=False)
        if _requeue_lost(st, trials):
            trials = st.get_trials(deepcopy=False)
        done = sum(t.state in _FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= cfg.n_trials:
            break
        if done + running >= cfg.n_trials:
            log.info("the remaining %d trial(s) are running in other workers", running)
            break
        if cfg.timeout is not None and time.monotonic() - t0 >= cfg.timeout:
            log.info("timeout of %.0fs reached; %d/%d trials done", cfg.timeout, done, cfg.n_trials)
            break
        st.optimize(objective, n_trials=1, catch=(_TrialFailed, _SurplusTrial))
        if last.outcome == "surplus":
            break
        if last.outcome == "failed":
            failed += 1
            if failed > cfg.max_failed_trials:
                raise TuningError(
                    f"study {cfg.study_name!r}: {failed} trials failed in this run (limit "
                    f"max_failed_trials={cfg.max_failed_trials}); the last error: "
                    f"{st.trials[last.number].user_attrs.get('error')}"
                )

    return _best(st, cfg), st


def _best(st: optuna.Study, cfg: TrainStudyConfig) -> dict[str, Any]:
    complete = st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise TuningError(
            f"study {cfg.study_name!r} has no completed trial ({_count(st, TrialState.PRUNED)} "
            f"pruned, {_count(st, TrialState.FAIL)} failed); nothing to write back"
        )
    best = st.best_trial
    log.info(
        "study %r: %d finished trial(s); best %s %.4f (trial %d): %s",
        cfg.study_name,
        _count(st, *_FINISHED),
        cfg.metric,
        best.value,
        best.number,
        best.params,
    )
    return nest({k: _plain(v) for k, v in best.params.items()})


def study_summary(st: optuna.Study) -> dict[str, Any]:
    """Trial counts per state and the best trial, e.g. for a DVC metrics file."""
    trials = st.get_trials(deepcopy=False)
    out: dict[str, Any] = {
        f"n_{s.name.lower()}": sum(t.state == s for t in trials) for s in TrialState
    }
    if out["n_complete"]:
        best = st.best_trial
        out.update(
            best_value=float(best.value), best_trial=best.number, metric=st.user_attrs.get("metric")
        )
    return out


# -- params files ---------------------------------------------------------------------------
def write_best_params(path: str | Path, best: Mapping[str, Any], target: str | None = None) -> Path:
    """Write ``best`` as a nested YAML mapping (``params/tuned_<target>.yaml``), atomically.

    With ``target`` the keys are checked against that trainer first, so a bad file is never
    written.
    """
    flat = {k: _plain(v) for k, v in flatten(best).items()}
    if target is not None:
        check_keys(target, flat)
    write_text(path, yaml.safe_dump(nest(flat), sort_keys=False))
    return Path(path)


def read_best_params(path: str | Path) -> dict[str, Any]:
    """The nested params a :func:`write_best_params` file holds (merge with :func:`merge_tuned`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected tuned params (YAML), found nothing", path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise DataFormatError(f"expected a mapping of params, found {type(values).__name__}", path)
    return values


# -- ready-made training functions ----------------------------------------------------------
#: YoloSpineDetector.train arguments microseg sets itself
_YOLO_MANAGED = {"data_yaml", "out_dir", "hooks", "resume", "name", "extra", "self"}
_YOLO_REFUSED = _YOLO_MANAGED | {"project", "exist_ok", "data", "model"}


def _yolo_train_kwargs() -> list[str]:
    from microseg.models.yolo import YoloSpineDetector

    params = inspect.signature(YoloSpineDetector.train).parameters
    return [p for p in params if p not in _YOLO_MANAGED]


def _ultralytics_args() -> set[str]:
    """Ultralytics' train argument names, read from its ``cfg/default.yaml`` (importing
    ``ultralytics`` itself costs seconds, too much for a config check)."""
    spec = importlib.util.find_spec("ultralytics")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "cfg" / "default.yaml"
        if path.is_file():
            return set(yaml.safe_load(path.read_text()))
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return set(DEFAULT_CFG_DICT)


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def yolo_train_fn(
    data_yaml: str | Path,
    base_train_cfg: Mapping[str, Any],
    epochs: int,
    *,
    metric: str = "val/mAP50",
    direction: Direction = "maximize",
    extra_hooks: Sequence[HookBase] = (),
    meta: Mapping[str, Any] | None = None,
) -> TrainFn:
    """A ``train_fn`` that trains a fresh ``YoloSpineDetector`` for ``epochs`` epochs.

    ``base_train_cfg`` is a ``yolo.train`` section (``arch`` picks the model, the
    ``YoloSpineDetector.train`` arguments go there, any other key is passed to Ultralytics
    as ``extra``). Returns the best epoch's ``metric`` (an :func:`epoch_metrics` name such as
    ``val/mAP50``, ``val/mAP50-95`` or ``fitness``). A pruned trial stops Ultralytics through
    ``trainer.stop`` rather than an exception, so its run ends normally (loaders closed,
    checkpoints finalised) before the trial is marked pruned.
    """

    def run(trial_params: dict[str, Any], hooks: HookBase, trial_dir: Path) -> float:
        from microseg.models.yolo import YoloSpineDetector

        cfg = merge_tuned(base_train_cfg, trial_params)
        cfg["epochs"] = epochs
        arch = cfg.pop("arch", "n")
        names = set(_yolo_train_kwargs())
        kwargs = {k: v for k, v in cfg.items() if k in names}
        extra = {**(cfg.get("extra") or {}), **{k: v for k, v in cfg.items() if k not in names}}
        extra.pop("extra", None)
        pruners = _pruning_hooks(hooks)
        for p in pruners:
            p.raise_on_prune = False
        curve = CurveRecorder(metric)
        det = YoloSpineDetector.build(arch, **dict(meta or {}))
        try:
            det.train(
                data_yaml,
                trial_dir,
                hooks=Hooks([*extra_hooks, curve, hooks]),
                resume=False,
                extra=extra or None,
                **kwargs,
            )
        finally:
            del det
            _free_memory()
        for p in pruners:
            if p.pruned:
                raise optuna.TrialPruned(p.message())
        return curve.best(direction)

    return run


def punet_train_fn(
    train_d3set: Any,
    val_d3set: Any,
    base_train_cfg: Mapping[str, Any],
    epochs: int,
    *,
    metric: str = "val_spine_dice",
    direction: Direction = "maximize",
    extra_hooks: Sequence[HookBase] = (),
) -> TrainFn:
    """A ``train_fn`` that trains a Prob-UNet (``train_punet``) for ``epochs`` epochs.

    ``base_train_cfg`` is a ``punet.train`` section; d3set paths are read once, on the first
    trial. Returns the best validation epoch's ``metric`` (``val_spine_dice`` by default, by
    which ``train_punet`` keeps ``best.pt``).
    """
    loaded: dict[str, Any] = {}

    def data() -> tuple[Any, Any]:
        if not loaded:
            loaded["train"], loaded["val"] = _read_d3sets(train_d3set), _read_d3sets(val_d3set)
        return loaded["train"], loaded["val"]

    def run(trial_params: dict[str, Any], hooks: HookBase, trial_dir: Path) -> float:
        from microseg.models.punet.train import PunetTrainConfig, train_punet

        cfg = PunetTrainConfig.from_mapping(
            {**merge_tuned(base_train_cfg, trial_params), "epochs": epochs}
        )
        train, val = data()
        curve = CurveRecorder(metric)
        try:
            train_punet(
                train, val, trial_dir, cfg, Hooks([*extra_hooks, curve, hooks]), resume=False
            )
        finally:
            _free_memory()
        return curve.best(direction)

    return run


def _read_d3sets(source: Any) -> Any:
    from microseg.io.d3set import read_d3set

    if isinstance(source, str | Path):
        return read_d3set(source)
    if isinstance(source, list | tuple):
        return [read_d3set(s) if isinstance(s, str | Path) else s for s in source]
    return source
