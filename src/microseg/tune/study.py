"""The training-study loop: ``microseg tune --target <model>`` and the params it leaves.

Each trial trains for ``epochs`` epochs in its own folder ``<work_dir>/trial_<n>`` and
reports its validation metric after every epoch (:class:`.trials.OptunaPruningHook`); a
median pruner stops trials whose curve falls below the median of the completed ones at the
same epoch. The best trial's params are written to ``params/tuned_<target>.yaml`` as a nested
mapping that :func:`merge_tuned` merges into the model's ``train`` section.

The training itself is injected (``train_fn(trial_params, hooks, trial_dir) -> metric``), so
the study logic runs with a cheap fake in tests; :func:`.objectives.family_train_fn` trains a
registered model family.

Budget and resume: unlike the fusion study (whose ``n_trials`` counts the trials one call
adds), ``n_trials`` here is the study's *total* of finished (COMPLETE + PRUNED) trials, so a
rerun after an interruption only runs what is missing, and a finished study runs nothing.
Trials lost to an interruption or a dead process are run again with the same params, once
each (:func:`.trials.requeue_lost`). Failed trials (training raised) are recorded FAIL and the
study goes on; more than ``max_failed_trials`` failures in one call stop it with
:class:`TuningError`.

Several workers: point them at one storage with distinct ``worker`` numbers. Before training,
a trial checks that fewer than ``n_trials`` live trials precede it (by number); otherwise it
is a surplus trial (recorded FAIL, not trained), so concurrent workers never overshoot.

Reproducibility: TPE is seeded from ``(seed, worker, trials so far)`` (:mod:`.storage`) and
keeps its own random state, so training code that reseeds the global ``random``/NumPy/torch
generators does not move it. The same seed on a fresh storage proposes the same start-up
points whatever the training returns, and the same whole sequence when the values repeat.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.train.hooks import HookBase, Hooks
from microseg.tune.spaces import TrainStudyConfig, baseline_values, check_keys
from microseg.tune.storage import study as open_study
from microseg.tune.trials import OptunaPruningHook, TuningError, owner, requeue_lost
from microseg.utils.atomic import write_text
from microseg.utils.convert import flatten, nest, to_builtin
from microseg.utils.convert import merge_dotted as merge_tuned

log = logging.getLogger(__name__)

#: ``train_fn(trial_params, hooks, trial_dir) -> final validation metric``
TrainFn = Callable[[dict[str, Any], HookBase, Path], float]
OnTrial = Callable[[optuna.Trial, dict[str, Any]], None]
TrialHooks = Callable[[optuna.Trial, Path], Iterable[HookBase]]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_ALIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class _TrialFailed(Exception):
    """Training raised: the trial is FAIL, the study goes on (Optuna's ``catch``)."""


class _SurplusTrial(Exception):
    """Other workers already hold ``n_trials`` live trials: this one is not trained."""


@dataclass
class _Last:
    number: int | None = None
    outcome: str = ""


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
    family: str | None = None,
) -> tuple[dict[str, Any], optuna.Study]:
    """Run the study until it holds ``cfg.n_trials`` finished trials; (best params, study).

    Each trial calls ``train_fn(merge_tuned(base_params, sampled), hooks, trial_dir)`` with
    ``hooks`` = ``trial_hooks(trial, trial_dir)`` (e.g. a per-trial MLflow hook) followed by
    the :class:`OptunaPruningHook`. ``on_trial(trial, metrics)`` runs after every COMPLETE or
    PRUNED trial with ``state``, ``value``, ``metric``, ``curve`` (epoch -> value), ``params``
    (nested, searched keys only) and ``trial_dir``; an exception there fails the trial and
    stops the study. The best params are nested and hold the searched keys only.
    The space's keys are checked against the registered model ``family`` (default: ``target``
    when that names a family; otherwise, e.g. a fake trainer in tests, nothing is checked).
    """
    from microseg.models import MODELS

    family = family if family is not None else (target if target in MODELS else None)
    if family is not None:
        check_keys(family, cfg.space)
    work_dir = Path(work_dir) if work_dir is not None else Path("tune") / target
    st = _open_study(cfg, seed, worker)
    st.pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.pruner.n_startup_trials, n_warmup_steps=cfg.pruner.n_warmup_steps
    )
    _check_study(st, target, cfg)
    fresh = not st.get_trials(deepcopy=False)
    if cfg.baseline:
        _enqueue_baseline(st, cfg, base_params, family)
    if fresh:
        for point in cfg.enqueue:
            st.enqueue_trial(
                {k: to_builtin(v) for k, v in point.items()},
                user_attrs={"enqueued": True},
                skip_if_exists=True,
            )
    last = _Last()

    def objective(trial: optuna.Trial) -> float:
        last.number, last.outcome = trial.number, "failed"
        ahead = [t for t in st.get_trials(deepcopy=False, states=_ALIVE) if t.number < trial.number]
        if len(ahead) >= cfg.n_trials:
            last.outcome = "surplus"
            raise _SurplusTrial(f"the study already holds {cfg.n_trials} trials; not trained")
        trial.set_user_attr("owner", owner())
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
        if requeue_lost(st, trials):
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


def _enqueue_baseline(
    st: optuna.Study, cfg: TrainStudyConfig, base_params: Mapping[str, Any], family: str | None
) -> None:
    """Queue the training section's own values as the first trial of a fresh study (marked
    ``baseline``), so the best trial is compared with the default on the same budget."""
    if st.get_trials(deepcopy=False) or not cfg.space:
        return
    values = baseline_values(family, base_params, cfg.space)
    if values is None:
        log.warning("the training section lacks values of %s: no baseline trial", sorted(cfg.space))
        return
    st.enqueue_trial(
        {k: to_builtin(v) for k, v in values.items()},
        user_attrs={"baseline": True},
        skip_if_exists=True,
    )
    log.info("trial 0 is the baseline (the training section's values): %s", values)


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
    return nest({k: to_builtin(v) for k, v in best.params.items()})


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
    # the default params' trial (and any rerun of it after an interruption): its value
    base = [t for t in trials if t.user_attrs.get("baseline")]
    if base:
        done = [t for t in base if t.state == TrialState.COMPLETE]
        out["default_trial"] = (done or base)[-1].number
        out["default_value"] = float(done[-1].value) if done else None
        out["direction"] = st.direction.name.lower()
    return out


# -- params files ---------------------------------------------------------------------------
def write_best_params(path: str | Path, best: Mapping[str, Any], family: str | None = None) -> Path:
    """Write ``best`` as a nested YAML mapping (``params/tuned_<target>.yaml``), atomically.

    With ``family`` the keys are checked against that model family first, so a bad file is
    never written.
    """
    flat = {k: to_builtin(v) for k, v in flatten(best).items()}
    if family is not None:
        check_keys(family, flat)
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
