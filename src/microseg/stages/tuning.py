"""Training studies: ``microseg tune --target <model>`` and the tuned params they leave.

A target is any trainable model of :func:`microseg.stages.training.trainers` that trains one
registered family (``yolo``, ``punet``, the learned ``cells.models``): the table says what the
family trains on and its ``train`` section, and every trial trains it through
:func:`microseg.models.get_model`. A study writes ``params/tuned_<target>.yaml`` (only the
searched keys); the training stage merges that file over its ``params.yaml`` section, and DVC
tracks the file as a dependency of the training stage, so ``dvc repro`` retrains with the
tuned values after a study. The file is committed empty (``{}``: nothing tuned yet); studies
are run on purpose (they cost many trainings), not by every ``dvc repro``.

With ``out_dir`` (``microseg tune --target yolo --out-dir studies/yolo``, the stages of
``studies/dvc.yaml``) a study leaves its own files instead: ``best.yaml``, ``summary.json`` and
``trials.csv``, and ``params/tuned_<target>.yaml`` is untouched until
``microseg tune --adopt <target>`` (:func:`adopt`) copies ``best.yaml``
over it, so the root pipeline never has a study upstream. A model of ``cells.models`` may be
named ``cells:<model>`` as well as ``<model>``.
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
from microseg.stages.tuned import (  # noqa: F401
    STUDIES_DIR,
    TUNED_DIR,
    resolve_target,
    tuned_path,
    tuned_train_config,
)

log = logging.getLogger(__name__)

WORK_DIR = Path("models/tune")
#: the files a study run with ``out_dir`` leaves there
BEST_FILE, SUMMARY_FILE, TRIALS_FILE = "best.yaml", "summary.json", "trials.csv"


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
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Run (or continue) the study; write the best params and the summary
    (``params/tuned_<target>.yaml`` and ``metrics/tune_<target>.json``, or with ``out_dir``
    its ``best.yaml``, ``summary.json`` and ``trials.csv``); return the summary."""
    from microseg.stages.training import tunable
    from microseg.tune.training import (
        family_train_fn,
        study_summary,
        tune_training,
        write_best_params,
    )

    target = resolve_target(params, target)
    families = tunable(params)
    if target not in families:
        raise ConfigError(f"unknown training study {target!r}; available: {sorted(families)}")
    fam = families[target]
    cfg = study_config(params, target, fam.name)
    if out_dir is not None:  # holds the study's SQLite storage too (studies/dvc.yaml)
        out_dir.mkdir(parents=True, exist_ok=True)
    section = fam.section()
    epochs = cfg.epochs if cfg.epochs is not None else section.get("epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"tune.{target}.epochs is null and the training section has no epochs")
    fn = family_train_fn(fam.name, fam.data(), epochs, metric=cfg.metric, direction=cfg.direction)
    best, st = tune_training(
        target,
        fn,
        section,
        cfg,
        seed=params.seed,
        on_trial=on_trial,
        work_dir=WORK_DIR / target,
        worker=worker,
        trial_hooks=trial_hooks,
        family=fam.name,
    )
    out = {"best": best, "epochs": epochs, **study_summary(st)}
    if out_dir is None:
        write_best_params(tuned_path(target), best, fam.name)
        write_json(metrics_path(params, target), out)
        return out
    write_best_params(out_dir / BEST_FILE, best, fam.name)
    write_json(out_dir / SUMMARY_FILE, {"target": target, **out})
    write_trials(st, out_dir / TRIALS_FILE)
    return out


def write_trials(st: Any, path: Path) -> Path:
    """One row per trial (number, state, value, params, duration, baseline: the default
    params' trial) as CSV, atomically."""
    from microseg.utils.atomic import write_text

    df = st.trials_dataframe(attrs=("number", "state", "value", "params", "duration"))
    df["baseline"] = [bool(t.user_attrs.get("baseline")) for t in st.get_trials(deepcopy=False)]
    if "duration" in df:
        df["duration"] = df["duration"].dt.total_seconds().round(1)
    write_text(path, df.to_csv(index=False))
    return path


def run_tune(
    params: Params, target: str, worker: int = 0, out_dir: Path | None = None
) -> StageResult:
    """An Optuna study (each trial a nested MLflow run); best params -> ``params/tuned_*``
    (training studies with ``out_dir``: ``<out_dir>/best.yaml``)."""
    from microseg.registry.stage_logging import MlflowTrialLogger
    from microseg.stages.training import trainers
    from microseg.utils.convert import flatten

    target = resolve_target(params, target)
    if out_dir is not None and target == "fusion":
        raise ConfigError(
            "--out-dir is for training studies; the fusion study writes "
            "params/tuned_fusion.yaml (its dvc.yaml stage's output)"
        )
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
        out = tune_training_stage(params, target, on_trial=on_trial, worker=worker, out_dir=out_dir)
        best = tuned_path(target) if out_dir is None else out_dir / BEST_FILE
        return StageResult(
            f"tune_{target}",
            out,
            metrics_file=metrics_path(params, target) if out_dir is None else None,
            log_metrics={k: v for k, v in out.items() if k != "best"},
            log_params={f"best.{k}": v for k, v in flatten(out["best"]).items()},
            artifacts=[(best, "tuned")],
            out=best,
        )

    return run_stage(
        params,
        tune_training,
        stage=f"tune_{target}",
        task=runners[target].task,
        dataset=runners[target].dataset,
        section=params.tune.get(target, {}),
    )


def adopt(
    params: Params, target: str, src: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Copy a study's best params (``studies/<target>/best.yaml`` unless ``src``) over
    ``params/tuned_<target>.yaml``, atomically; (old, new, written path).

    The keys are checked against the target's model family before anything is written, so a
    stale or hand-edited ``best.yaml`` cannot leave a tuned file the training stage refuses.
    A study whose ``trials.csv`` (beside ``best.yaml``) shows no trial beating another (one
    complete trial, or all scoring the same, e.g. a per-trial budget too short to learn
    anything) is refused: its "best" params are arbitrary, not tuned. So is a study whose
    ``summary.json`` shows its baseline trial (the default params) not beaten: adopting would
    change nothing but the file.
    """
    from microseg.stages.training import tunable
    from microseg.tune.training import read_best_params, write_best_params

    target = resolve_target(params, target)
    families = tunable(params)
    if target not in families:
        raise ConfigError(f"cannot adopt a study of {target!r}; trainable: {sorted(families)}")
    src = src if src is not None else STUDIES_DIR / target / "best.yaml"
    new = read_best_params(src)
    if not new:
        raise ConfigError(f"{src}: the study's best params are empty; nothing to adopt")
    _check_signal(src.parent / "trials.csv", target)
    _check_beats_default(src.parent / SUMMARY_FILE, target)
    dst = tuned_path(target)
    old = read_best_params(dst) if dst.is_file() else {}
    write_best_params(dst, new, families[target].name)
    log.info("adopted %s into %s", src, dst)
    return old, new, dst


def _check_signal(trials_csv: Path, target: str) -> None:
    """Refuse a study none of whose complete trials beat another (see :func:`adopt`)."""
    import csv

    if not trials_csv.is_file():
        return
    with trials_csv.open(newline="") as f:
        values = [float(r["value"]) for r in csv.DictReader(f) if r.get("state") == "COMPLETE"]
    if len(set(values)) < 2:
        raise ConfigError(
            f"no trial of the study beat another ({len(values)} complete, values "
            f"{sorted(set(values))}): its best params are arbitrary, not adopted; give it more "
            f"trials or epochs per trial (params.yaml tune.{target}) and rerun it",
            trials_csv,
        )


def _check_beats_default(summary_json: Path, target: str) -> None:
    """Refuse a study whose best trial does not beat its baseline (the default params)."""
    import json

    if not summary_json.is_file():
        return
    summary = json.loads(summary_json.read_text())
    default, best = summary.get("default_value"), summary.get("best_value")
    if default is None or best is None:
        return
    better = best < default if summary.get("direction") == "minimize" else best > default
    if not better:
        raise ConfigError(
            f"the study's best {summary.get('metric')} {best:.4g} does not beat the default "
            f"params' {default:.4g} (trial {summary.get('default_trial')}): nothing to adopt "
            f"for {target}",
            summary_json,
        )
