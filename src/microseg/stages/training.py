"""Training and tuning stages as ``dvc.yaml`` runs them: ``train_<model>`` and ``tune_<target>``.

:func:`trainers` maps every trainable model name to its stage function and where its run
belongs, and, for a model that trains one registered family, what that family trains on
(:class:`FamilyTraining`): what a training study of the model needs, so any such model is a
``tune`` target. Each family's training itself stays in its own stage module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError
from microseg.stages.result import StageResult, run_stage


@dataclass(frozen=True)
class FamilyTraining:
    """A registered family and what it trains on: ``get_model(name).train(data(), out_dir,
    section(), hooks)``. Callables, so that building the table reads and checks nothing."""

    name: str
    #: the family's ``data`` (a dataset yaml, a targets folder, a ``(train, val)`` pair ...)
    data: Callable[[], Any]
    #: its params ``train`` section (engine defaults included; tuned values not merged)
    section: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Trainer:
    """One trainable model: ``fn(params, hooks=...)`` and what its MLflow run records."""

    fn: Callable[..., dict[str, Any]]
    section: Any
    out_dir: Path
    task: str
    dataset: str
    #: the one family it trains (None: a stage of its own, e.g. ``tracking_seg@<name>``)
    family: FamilyTraining | None = None
    #: the MLflow stage tag (None: ``train_<model>``)
    stage: str | None = None


def trainers(params: Params) -> dict[str, Trainer]:
    """``yolo``, ``punet``, ``tracking_seg@<name>`` for every segmenter of
    ``tracking.segmenters`` and every learned model of ``cells.models``."""
    from microseg.stages import cells, punet, spines, tracking

    out = {
        "yolo": Trainer(
            spines.train_yolo,
            params.yolo.train,
            spines.YOLO_MODEL_DIR,
            "spines",
            params.spines.dataset,
            FamilyTraining(
                "yolo", lambda: spines.yolo_data(params), lambda: spines.yolo_section(params)
            ),
        ),
        "punet": Trainer(
            punet.train_punet_stage,
            params.punet.train,
            punet.MODEL_DIR,
            "spines",
            params.spines.dataset,
            FamilyTraining(
                "punet", lambda: punet.punet_data(params), lambda: punet.punet_section(params)
            ),
        ),
        "hpunet": Trainer(
            punet.train_hpunet_stage,
            params.hpunet.train,
            punet.HPUNET_DIR,
            "spines",
            params.spines.dataset,
            FamilyTraining(
                "hpunet", lambda: punet.punet_data(params), lambda: punet.hpunet_section(params)
            ),
        ),
    }
    for name, sc in params.tracking.segmenters.items():
        out[f"tracking_seg@{name}"] = Trainer(
            lambda p, hooks=None, _n=name: tracking.train_tracking_seg(p, _n, hooks),
            sc,
            tracking.SEG_MODEL_DIR / name,
            "tracking",
            params.tracking.dataset,
            stage="train_tracking_seg",
        )
    from microseg.models import get_model

    for name, mc in params.cells.models.items():
        if getattr(get_model(mc.family), "trainable", True) and name not in out:
            out[name] = Trainer(
                lambda p, hooks=None, _n=name: cells.train_cell_model(p, _n, hooks),
                mc,
                cells.MODELS_ROOT / name,
                "nuclei",
                params.cells.dataset,
                FamilyTraining(
                    mc.family,
                    lambda: cells.targets_dir(params),
                    lambda _mc=mc: params.engine.train_section(_mc.train),
                ),
            )
    return out


def tunable(params: Params) -> dict[str, FamilyTraining]:
    """The models a training study can tune: those that train one registered family."""
    return {name: t.family for name, t in trainers(params).items() if t.family is not None}


def run_train(params: Params, model: str) -> StageResult:
    """Train ``model`` in one MLflow run (per-epoch metrics, best weights as an artifact)."""
    from microseg.registry.mlflow_hooks import MlflowHook

    runners = trainers(params)
    if model not in runners:
        raise ConfigError(f"unknown model {model!r}; trainable: {sorted(runners)}")
    t = runners[model]
    weights = t.out_dir / "best.pt"

    def fn() -> StageResult:
        out = t.fn(params, hooks=MlflowHook())
        logged = {k: v for k, v in out.items() if k != "best"}
        if isinstance(out.get("best"), dict):
            logged["best"] = out["best"]
        return StageResult(
            f"train_{model}",
            out,
            log_metrics=logged,
            artifacts=[(weights, "model")] if weights.is_file() else [],
            out=weights,
        )

    return run_stage(
        params,
        fn,
        stage=t.stage or (f"train_{model}" if t.task != "nuclei" else "train_cells"),
        task=t.task,
        dataset=t.dataset,
        section=t.section,
        run_name=f"train-{model}",
        tags={"microseg.model": model},
    )
