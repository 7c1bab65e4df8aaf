"""Seed spread: the nuclei models trained again with other seeds and scored like the demo's.

One training seed says little: the same recipe with another seed moved F1@0.5 by about 0.01
(issue 16), as much as some differences the report would otherwise claim. ``microseg seeds``
trains every model of ``seeds.models`` once per seed of ``seeds.seeds`` (the demo's own seed,
the engine's ``seed``, is read from the committed evaluation instead of being trained again),
scores each run exactly as ``evaluate_cells`` does (post-processing chosen on validation, then
the test split), and writes ``metrics/seeds.json``: per seed and per modality the mean
per-image F1@0.5, the mean and sample standard deviation over seeds, and each seed's mean
difference to the baseline on the same images. It is not a ``dvc.yaml`` stage: it costs a
few demo budgets, so the demo shows the committed spread beside its one seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.config import Params
from microseg.errors import ConfigError, MissingFileError
from microseg.report.seed_spread import METRICS_NAME
from microseg.stages import cells
from microseg.stages.common import write_json
from microseg.stages.result import StageResult, run_stage
from microseg.train.engine import EngineConfig

log = logging.getLogger(__name__)

SEEDS_MODELS = Path("models/seeds")
SEEDS_REPORTS = Path("reports/seeds")
#: what a train section without ``seed`` trains with (the engine's default)
DEFAULT_SEED = EngineConfig.seed


def spread_config(params: Params) -> tuple[list[str], list[int], str]:
    """``(models, seeds, baseline)`` from params ``seeds`` (defaults: the registered nuclei
    model and the 3-class U-Net, seeds 42, 1, 2, the first baseline)."""
    cfg = dict(getattr(params, "seeds", None) or {})
    models = list(cfg.get("models") or [params.registry.nuclei_model, "unet"])
    seeds = [int(s) for s in cfg.get("seeds") or [DEFAULT_SEED, 1, 2]]
    baseline = str(cfg.get("baseline") or next(iter(params.cells.baselines)))
    unknown = sorted(set(models) - set(params.cells.models))
    if unknown:
        raise ConfigError(
            f"seeds.models names {unknown}; cells.models has {sorted(params.cells.models)}"
        )
    if len(set(seeds)) < 2:
        raise ConfigError(f"seeds.seeds needs at least two different seeds; found {seeds}")
    return list(dict.fromkeys(models)), list(dict.fromkeys(seeds)), baseline


def with_seed(params: Params, name: str, seed: int) -> Params:
    """A copy of ``params`` whose model ``name`` trains with ``seed``."""
    models = dict(params.cells.models)
    mc = models[name]
    models[name] = mc.model_copy(update={"train": {**mc.train, "seed": int(seed)}})
    return params.model_copy(update={"cells": params.cells.model_copy(update={"models": models})})


def demo_seed(params: Params, name: str) -> int:
    """The seed ``train_cells@<name>`` trained with."""
    section = params.engine.train_section(cells.model_config(params, name).train)
    return int(section.get("seed", DEFAULT_SEED))


def per_image_of(params: Params, name: str, seed: int) -> pd.DataFrame:
    """Per-image scores of ``name`` trained with ``seed``: the pipeline's own evaluation for
    the demo's seed, else a training and evaluation under ``models/seeds``/``reports/seeds``
    (a finished one is reused: the training resumes or returns, the evaluation is read)."""
    if seed == demo_seed(params, name):
        path = cells.REPORTS_ROOT / name / "per_image.csv"
        if not path.is_file():
            raise MissingFileError(f"run evaluate_cells@{name} first (dvc repro)", path)
        return pd.read_csv(path)
    model_dir = SEEDS_MODELS / name / f"seed{seed}"
    report_dir = SEEDS_REPORTS / name / f"seed{seed}"
    per_image = report_dir / "per_image.csv"
    if not per_image.is_file():
        seeded = with_seed(params, name, seed)
        log.info("seed spread: training %s with seed %d", name, seed)
        cells.train_cell_model(seeded, name, out_dir=model_dir)
        cells.evaluate_cell_model(
            seeded, name, out_dir=report_dir, model_dir=model_dir, write_metrics=False
        )
    return pd.read_csv(per_image)


def _group_means(per_image: pd.DataFrame, value: str = "f1_50") -> dict[str, float]:
    out = {"all": float(per_image[value].mean())}
    for modality, rows in per_image.groupby("modality", sort=True):
        out[str(modality)] = float(rows[value].mean())
    return out


def spread_stats(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Per-seed values (rounded) with their mean, sample sd, min and max."""
    values = np.asarray(values, dtype=float)
    return {
        "per_seed": [round(float(v), 4) for v in values],
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }


def summarise(
    runs: dict[str, dict[int, pd.DataFrame]], baseline: pd.DataFrame, value: str = "f1_50"
) -> dict[str, Any]:
    """Per model and group (all images, each modality): the per-seed means of ``value``, and
    of its paired difference to ``baseline`` on the same images, with mean and sd over seeds
    (``diff_to_baseline`` repeats the ``all`` group's difference)."""
    base = baseline.set_index("image_id")[value]
    out: dict[str, Any] = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        means = {s: _group_means(by_seed[s], value) for s in seeds}
        diffs = {}
        for s in seeds:
            df = by_seed[s].assign(diff=lambda d: d[value] - base.reindex(d["image_id"]).to_numpy())
            diffs[s] = _group_means(df, "diff")
        row: dict[str, Any] = {"seeds": seeds, "groups": {}}
        for g in sorted({g for m in means.values() for g in m}):
            have = [s for s in seeds if g in means[s]]
            row["groups"][g] = spread_stats([means[s][g] for s in have]) | {
                "diff": spread_stats([diffs[s][g] for s in have])
            }
        row["diff_to_baseline"] = row["groups"]["all"]["diff"]
        out[name] = row
    return out


def run_seeds(params: Params, jobs: int = 1) -> StageResult:
    """Train and score every (model, seed) of the spread, ``jobs`` runs at a time (each on
    one core: two small trainings in two processes take the time of one, threads do not);
    ``metrics/seeds.json``."""
    models, seeds, baseline = spread_config(params)
    path = params.paths.metrics / METRICS_NAME

    def fn() -> StageResult:
        from joblib import Parallel, delayed

        runs: dict[str, dict[int, pd.DataFrame]] = {name: {} for name in models}
        todo = []
        for name in models:
            for s in seeds:
                if s == demo_seed(params, name):  # read, not trained: not worth a worker
                    runs[name][s] = per_image_of(params, name, s)
                else:
                    todo.append((name, s))
        frames = Parallel(n_jobs=max(1, jobs), backend="loky")(
            delayed(per_image_of)(params, name, s) for name, s in todo
        )
        for (name, s), df in zip(todo, frames, strict=True):
            runs[name][s] = df
        runs = {name: dict(sorted(by_seed.items())) for name, by_seed in runs.items()}
        base_path = cells.REPORTS_ROOT / baseline / "per_image.csv"
        if not base_path.is_file():
            raise MissingFileError(f"run evaluate_baseline@{baseline} first", base_path)
        summary = {
            "metric": "f1_50",
            "what": "mean over test images of per-image F1@0.5, per training seed; "
            "mean and sample sd over seeds",
            "baseline": baseline,
            "dataset": params.cells.dataset,
            "split": params.cells.split,
            "profile": params.profile,
            "models": summarise(runs, pd.read_csv(base_path)),
        }
        write_json(path, summary)
        flat = {
            f"{m}.{g}.{k}": v
            for m, row in summary["models"].items()
            for g, stats in row["groups"].items()
            for k, v in stats.items()
            if k in ("mean", "sd")
        }
        return StageResult("seeds", summary, metrics_file=path, log_metrics=flat, out=path)

    return run_stage(
        params,
        fn,
        stage="seeds",
        task="nuclei",
        section={"models": models, "seeds": seeds, "baseline": baseline},
        run_name="seed-spread",
    )
