"""Synthetic-data augmentation study: does adding fitted synthetic nuclei to the real training
images help a nuclei segmenter on the real test split?

``microseg synth-study`` (``make synth-study``; not a ``dvc.yaml`` stage: it trains arms x
seeds models) fits :mod:`microseg.data.synth_nuclei` on the real **train** split only, renders
the synthetic images once into ``data/synth/<dataset>/prepared`` (their targets cache beside
it), and trains ONE model of ``cells.models`` at the ``synth_study`` budget per arm and seed:

- ``R``: the real training images only;
- ``S``: synthetic images only, as many as ``R`` has real ones;
- ``R+S@p``: every real training image **plus** added synthetic images, so that p % of the
  training set is synthetic (``round(n_real * p / (100 - p))`` of them): the seed's recipe
  adds synthetic data to real data, so the training set grows with p (R+S@50 is twice R).

Each arm's synthetic images are the first ones of each modality, in the real split's modality
shares, so the arms are nested (R+S@10 within R+S@25 within R+S@50). Each arm's training set is
a targets cache ``data/synth/<dataset>/arms/<arm>`` (``index.parquet`` + hard links into the
real and synthetic caches) that ``train_cell_model(targets=...)`` reads; its ``val`` rows are
the real validation images, and evaluation (post-processing chosen on real val, then the real
test split) reads the real prepared dataset, so validation and test are never synthetic.

Per (arm, seed): ``models/synth_study/<dataset>/<arm>/seed<s>`` and
``reports/synth_study/<arm>/seed<s>/per_image.csv`` (reused when their recipe is unchanged),
and a nested MLflow run under the study's run. The summary (``metrics/synth_study.json``,
``reports/synth_study/summary.csv``, ``arms.png``) gives per arm the mean +- sd over seeds of
the pooled and the per-image-mean F1@0.5, and against ``R`` on the same test images the
per-image difference averaged over seeds with a bootstrap 95 % CI and a Wilcoxon signed-rank
p-value (:mod:`microseg.evaluate.arm_comparison`). The verdict follows the benchmark's rule: a
difference is claimed only when its CI excludes 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microseg.config import Params
from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.evaluate.arm_comparison import (
    REFERENCE,
    pooled_f1,
    summarise,
    summary_table,
    variant_sentence,
)
from microseg.stages import cells
from microseg.stages.common import write_json
from microseg.stages.result import StageResult, run_stage
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

SYNTH_ROOT = Path("data/synth")
STUDY_MODELS = Path("models/synth_study")
METRICS_NAME = "synth_study.json"
REPORT_DIR = "synth_study"
#: the recipe of one finished (arm, seed): a run is reused only when it matches
RECIPE_NAME = "recipe.json"
ARM_RE = re.compile(r"R|S|R\+S@(\d+(?:\.\d+)?)")
TARGET_COLS = ("image_path", "target_path", "weight_path", "label_path")


class ArmVariant(BaseModel):
    """An arm that differs from ``data`` (R, S or R+S@p) only by its training overrides."""

    model_config = ConfigDict(extra="forbid")

    data: str = "R"
    #: merged over the study model's train section (top-level keys replace)
    train: dict[str, Any] = Field(default_factory=dict)


class StudyConfig(BaseModel):
    """params ``synth_study``: which model, at which budget, which arms and seeds."""

    model_config = ConfigDict(extra="forbid")

    #: a key of ``cells.models``: its family and train/infer sections, then the overrides below
    model: str = "maunet"
    #: merged over the model's ``train`` section (the study's fixed budget)
    train: dict[str, Any] = Field(default_factory=dict)
    #: merged over the model's ``infer`` section (e.g. ``tta: false``)
    infer: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    arms: list[str] = Field(default_factory=lambda: ["R", "S", "R+S@10", "R+S@25", "R+S@50"])
    #: named arms that train on another arm's images with train-config overrides (e.g.
    #: ``R+shapes: {data: R, train: {shapes: {prob: 0.5}}}``): the augmentation and schedule
    #: knobs measured against their data arm in the same framework; listed in ``arms`` to run
    variants: dict[str, ArmVariant] = Field(default_factory=dict)
    #: synthetic images rendered; null: as many as the arms need (``S`` and ``R+S@50``: n_real)
    n_synthetic: int | None = Field(None, ge=1)
    generator_seed: int = 0
    #: cap on the validation post-processing search images (``cells.post_max_images``)
    post_max_images: int | None = Field(None, ge=1)
    #: the post-processing grid searched on real val for the study's model (its family's
    #: ``PostprocessConfig`` keys); null: ``cells.post_grids``/``post_grid`` as the demo searches
    post_grid: dict[str, list[Any]] | None = None
    n_resamples: int = Field(10_000, ge=1)
    confidence_level: float = Field(0.95, gt=0, lt=1)


@dataclass(frozen=True)
class Arm:
    """One training set: real training images or not, and the synthetic share."""

    name: str
    real: bool
    #: percentage of the training set that is synthetic (100 for ``S``, 0 for ``R``)
    percent: float
    #: train-config overrides of a variant arm (empty for the data arms)
    train: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def slug(self) -> str:
        """A folder name (``R+S@10`` -> ``R_S10``)."""
        slug = self.name.replace("+", "_").replace("@", "").replace(".", "p")
        return re.sub(r"[^A-Za-z0-9_-]", "_", slug)

    def n_synthetic(self, n_real: int) -> int:
        """Synthetic images in this arm's training set, given ``n_real`` real ones."""
        if not self.real:
            return n_real
        return round(n_real * self.percent / (100 - self.percent))


def parse_arm(name: str, variants: Mapping[str, ArmVariant] | None = None) -> Arm:
    """``R``, ``S``, ``R+S@<percent>`` or a key of ``variants`` (its data arm + overrides)."""
    if variants and name.strip() in variants:
        v = variants[name.strip()]
        if v.data.strip() in variants:
            raise ConfigError(f"synth_study.variants.{name}: data {v.data!r} must be a data arm")
        base = parse_arm(v.data)
        return Arm(name.strip(), base.real, base.percent, dict(v.train))
    m = ARM_RE.fullmatch(name.strip())
    if m is None:
        raise ConfigError(
            f"synth_study.arms: {name!r} is not R, S, R+S@<percent> or a synth_study.variants key"
        )
    if name.strip() in ("R", "S"):
        return Arm(name.strip(), name.strip() == "R", 0.0 if name.strip() == "R" else 100.0)
    percent = float(m.group(1))
    if not 0 < percent < 100:
        raise ConfigError(f"synth_study.arms: {name!r} needs a percentage in (0, 100)")
    return Arm(name.strip(), True, percent)


def study_config(params: Params) -> tuple[StudyConfig, list[Arm]]:
    """The validated ``synth_study`` section and its arms (``R`` first: the reference)."""
    try:
        cfg = StudyConfig.model_validate(params.synth_study)
    except ValidationError as exc:
        raise ConfigError(f"params synth_study: {exc}") from exc
    if cfg.model not in params.cells.models:
        raise ConfigError(
            f"synth_study.model {cfg.model!r} is not in cells.models {sorted(params.cells.models)}"
        )
    arms = [parse_arm(a, cfg.variants) for a in dict.fromkeys(cfg.arms)]
    if REFERENCE not in [a.name for a in arms]:
        raise ConfigError(f"synth_study.arms must include {REFERENCE!r} (the reference arm)")
    if len(set(cfg.seeds)) < 2:
        raise ConfigError(f"synth_study.seeds needs at least two different seeds: {cfg.seeds}")
    cfg.seeds = list(dict.fromkeys(int(s) for s in cfg.seeds))
    arms.sort(key=lambda a: a.name != REFERENCE)
    return cfg, arms


def study_params(params: Params, cfg: StudyConfig, seed: int, arm: Arm | None = None) -> Params:
    """``params`` whose study model trains at the study budget (and ``arm``'s overrides)
    with ``seed``."""
    models = dict(params.cells.models)
    mc = models[cfg.model]
    extra = arm.train if arm is not None else {}
    train = {**mc.train, **cfg.train, **extra, "seed": int(seed)}
    models[cfg.model] = mc.model_copy(update={"train": train, "infer": {**mc.infer, **cfg.infer}})
    update: dict[str, Any] = {"models": models}
    if cfg.post_max_images is not None:
        update["post_max_images"] = cfg.post_max_images
    if cfg.post_grid is not None:
        update["post_grids"] = {**params.cells.post_grids, mc.family: cfg.post_grid}
    return params.model_copy(update={"cells": params.cells.model_copy(update=update)})


# ------------------------------------------------------------------------------- data
def synth_root(params: Params) -> Path:
    return SYNTH_ROOT / params.cells.dataset


def real_targets(params: Params) -> Path:
    """The pipeline's real targets cache when ``prepare_targets`` ran, else the study's own."""
    from microseg.data.targets import INDEX_NAME

    pipeline = cells.targets_dir(params)
    if (pipeline / INDEX_NAME).is_file():
        return pipeline
    own = synth_root(params) / "real_targets"
    if not (own / INDEX_NAME).is_file():
        log.info("synth study: real targets cache -> %s", own)
        cells.prepare_targets_stage(params, out_dir=own)
    return own


def synthetic_targets(params: Params, cfg: StudyConfig, n: int) -> Path:
    """Render ``n`` synthetic images fitted on the real train split (once: kept while seed,
    count and source match) and cache their targets; the targets folder."""
    from microseg.data.synth_nuclei import STATS_NAME, fit_nuclei_stats, generate
    from microseg.data.targets import INDEX_NAME

    real = params.paths.prepared / params.cells.dataset
    root = synth_root(params)
    prepared, targets = root / "prepared", root / "targets"
    record = prepared / STATS_NAME
    want = {"seed": cfg.generator_seed, "n": n, "source": str(real), "split": "train"}
    have = None
    if record.is_file():
        r = json.loads(record.read_text())
        stats = r.get("stats", {})
        have = {
            "seed": r.get("seed"),
            "n": sum(r.get("counts", {}).values()),
            "source": stats.get("source"),
            "split": stats.get("split"),
        }
    if have != want:
        log.info("synth study: fitting on %s (train) and rendering %d images", real, n)
        stats = fit_nuclei_stats(real, split="train")
        generate(stats, prepared, seed=cfg.generator_seed, total=n, val_fraction=0.0)
        shutil.rmtree(targets, ignore_errors=True)
    if not (targets / INDEX_NAME).is_file():
        cells.prepare_targets_stage(params, out_dir=targets, prepared=prepared)
    return targets


def take_stratified(rows: pd.DataFrame, k: int, by: str = "modality") -> pd.DataFrame:
    """The first ``k`` rows (in ``sample_id`` order within a group) with each ``by`` group
    keeping its share (largest remainders, so exactly ``k``): a prefix, so arms nest."""
    if k > len(rows):
        raise ConfigError(f"{k} synthetic images needed, {len(rows)} rendered")
    rows = rows.sort_values("sample_id")
    sizes = rows.groupby(by, sort=True).size()
    exact = k * sizes.to_numpy(float) / max(len(rows), 1)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: k - int(counts.sum())]:
        counts[i] += 1
    parts = [rows[rows[by] == g].head(int(c)) for g, c in zip(sizes.index, counts, strict=True)]
    return pd.concat(parts).sort_values("sample_id") if parts else rows.head(0)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def arm_index(real_index: pd.DataFrame, synth_index: pd.DataFrame, arm: Arm) -> pd.DataFrame:
    """An arm's target rows: real train (when the arm has them), the synthetic share (as
    ``train``), the real ``val`` rows; ``source`` says real or synthetic. No test rows."""
    real_train = real_index[real_index["split"] == "train"]
    n_real = len(real_train)
    if n_real == 0:
        raise ConfigError("the real targets cache has no train images")
    synth = take_stratified(synth_index, arm.n_synthetic(n_real)).assign(split="train")
    parts = [
        real_train.assign(source="real") if arm.real else real_train.head(0).assign(source="real"),
        synth.assign(source="synthetic"),
        real_index[real_index["split"] == "val"].assign(source="real"),
    ]
    out = pd.concat(parts, ignore_index=True)
    if out["sample_id"].duplicated().any():
        raise DataFormatError("real and synthetic sample ids collide", "index.parquet")
    return out


def build_arm(real: Path, synth: Path, arm: Arm, out_dir: Path) -> pd.DataFrame:
    """The arm's targets cache in ``out_dir``: ``index.parquet`` over hard links (copies on
    another file system) of the real and synthetic cached files; returns the index."""
    from microseg.data.targets import INDEX_NAME, PARAMS_NAME, read_index

    index = arm_index(read_index(real), read_index(synth), arm)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        rows = []
        for row in index.to_dict("records"):
            base, sub = (real, "real") if row["source"] == "real" else (synth, "synthetic")
            for col in TARGET_COLS:
                _link(base / row[col], tmp / sub / row[col])
                row[col] = f"{sub}/{row[col]}"
            rows.append(row)
        index = pd.DataFrame.from_records(rows)
        index.to_parquet(tmp / INDEX_NAME, index=False)
        if (real / PARAMS_NAME).is_file():
            shutil.copy2(real / PARAMS_NAME, tmp / PARAMS_NAME)
    return index


# ------------------------------------------------------------------------------- runs
def recipe(p: Params, cfg: StudyConfig, index: pd.DataFrame) -> dict[str, Any]:
    """What one (arm, seed) result depends on: model sections, training set, evaluation."""
    mc = p.cells.models[cfg.model]
    ids = ",".join(sorted(index["sample_id"] + ":" + index["split"]))
    return {
        "family": mc.family,
        "train": p.engine.train_section(mc.train),
        "infer": mc.infer,
        "training_set": hashlib.sha256(ids.encode()).hexdigest()[:16],
        "dataset": p.cells.dataset,
        "split": p.cells.split,
        "max_images": p.cells.max_images,
        "post_max_images": p.cells.post_max_images,
        "post_grid": cells.post_grid_for(p, mc.family),
    }


def run_dirs(params: Params, arm: Arm, seed: int) -> tuple[Path, Path]:
    """``(model folder, report folder)`` of one (arm, seed)."""
    tail = Path(arm.slug) / f"seed{seed}"
    return (
        STUDY_MODELS / params.cells.dataset / tail,
        params.paths.reports / REPORT_DIR / tail,
    )


def train_and_score(
    params: Params, cfg: StudyConfig, arm: Arm, seed: int, data: Path, index: pd.DataFrame
) -> dict[str, Any]:
    """Train and evaluate one (arm, seed) (reused when its recipe file matches); its
    per-image table, training seconds and where it is."""
    p = study_params(params, cfg, seed, arm)
    model_dir, report_dir = run_dirs(params, arm, seed)
    want = json.loads(json.dumps(recipe(p, cfg, index), default=str))
    done = report_dir / RECIPE_NAME
    seconds = None
    if not (done.is_file() and json.loads(done.read_text()) == want):
        shutil.rmtree(model_dir, ignore_errors=True)  # another recipe: never resume it
        log.info("synth study: %s seed %d (%d training images)", arm.name, seed, _n_train(index))
        trained = cells.train_cell_model(p, cfg.model, out_dir=model_dir, targets=data)
        seconds = trained.get("seconds")
        cells.evaluate_cell_model(
            p, cfg.model, out_dir=report_dir, model_dir=model_dir, write_metrics=False
        )
        write_json(done, want)
    per_image = report_dir / "per_image.csv"
    if not per_image.is_file():
        raise MissingFileError("evaluation left no per-image table", per_image)
    return {
        "per_image": pd.read_csv(per_image),
        "seconds": seconds if seconds is not None else cells.train_seconds(model_dir),
        "report_dir": report_dir,
    }


def _n_train(index: pd.DataFrame) -> int:
    return int((index["split"] == "train").sum())


# ------------------------------------------------------------------------------- stage
def run_synth_study(params: Params, jobs: int = 1) -> StageResult:
    """Generate, build the arms, train and score every (arm, seed) (``jobs`` at a time, one
    core each), summarise; ``metrics/synth_study.json`` and ``reports/synth_study/``."""
    cfg, arms = study_config(params)
    out_dir = params.paths.reports / REPORT_DIR
    metrics_path = params.paths.metrics / METRICS_NAME

    def fn() -> StageResult:
        from joblib import Parallel, delayed

        from microseg.data.targets import read_index
        from microseg.registry import stage_logging
        from microseg.registry.runs import stage_run
        from microseg.report.synth_study import arms_figure

        real = real_targets(params)
        n_real = int((read_index(real)["split"] == "train").sum())
        need = max(a.n_synthetic(n_real) for a in arms)
        n_synth = cfg.n_synthetic or need
        if n_synth < need:
            raise ConfigError(
                f"synth_study.n_synthetic {n_synth} < {need}, what the arms need with "
                f"{n_real} real training images"
            )
        synth = synthetic_targets(params, cfg, n_synth)
        indexes = {
            a.name: build_arm(real, synth, a, synth_root(params) / "arms" / a.slug) for a in arms
        }
        todo = [(a, s) for a in arms for s in cfg.seeds]
        done = Parallel(n_jobs=max(1, jobs), backend="loky")(
            delayed(train_and_score)(
                params, cfg, a, s, synth_root(params) / "arms" / a.slug, indexes[a.name]
            )
            for a, s in todo
        )
        runs: dict[str, dict[int, pd.DataFrame]] = {a.name: {} for a in arms}
        for (a, s), r in zip(todo, done, strict=True):
            runs[a.name][s] = r["per_image"]
            child = StageResult(
                "synth_study",
                log_metrics={
                    "test.pooled_f1_50": pooled_f1(r["per_image"]),
                    "test.mean_f1_50": float(r["per_image"]["f1_50"].mean()),
                }
                | ({"train_seconds": r["seconds"]} if r["seconds"] is not None else {}),
                tags={"microseg.synth_arm": a.name, "microseg.seed": str(s)},
                artifacts=[(r["report_dir"] / "per_image.csv", f"synth_study/{a.slug}")],
            )
            section = {"arm": a.name, "seed": s, "model": cfg.model, **_sizes(indexes[a.name])}
            with stage_run(
                params,
                stage="synth_study",
                task="nuclei",
                dataset=params.cells.dataset,
                section=section,
                run_name=f"synth-study-{a.slug}-seed{s}",
                nested=True,
            ) as run:
                stage_logging.log_stage_result(child, run.info.run_id)
        stats = summarise(runs, n_resamples=cfg.n_resamples, confidence_level=cfg.confidence_level)
        ran = [a.name for a in arms if a.train]
        if ran:
            stats["variants_sentence"] = variant_sentence(stats["vs_R"], ran)
            log.info("synth study variants: %s", stats["variants_sentence"])
        sizes = {name: _sizes(index) for name, index in indexes.items()}
        summary = {
            "metric": "f1_50",
            "what": "F1@0.5 on the real test split; pooled (all objects) and per-image mean, "
            "mean and sample sd over training seeds; vs_R: per-image difference to R averaged "
            "over seeds, bootstrap CI of its mean and Wilcoxon signed-rank p",
            "design": "R+S@p adds synthetic images to all real ones (p % of the set); S has "
            "as many synthetic images as R has real; val and test are real; a variant arm "
            "trains on its data arm's images with other training knobs (variants)",
            "variants": {k: v.model_dump() for k, v in cfg.variants.items()},
            "model": cfg.model,
            "budget": {"train": cfg.train, "infer": cfg.infer},
            "dataset": params.cells.dataset,
            "split": params.cells.split,
            "generator_seed": cfg.generator_seed,
            "n_synthetic": n_synth,
            "sizes": sizes,
            **stats,
        }
        write_json(metrics_path, summary)
        table = summary_table(stats, sizes)
        with atomic_path(out_dir / "summary.csv") as tmp:
            table.to_csv(tmp, index=False)
        arms_figure(runs, stats, out_dir / "arms.png")
        log.info("synth study: %s", stats["sentence"])
        flat = {
            f"{a}.{k}": r[k]["mean"]
            for a, r in stats["arms"].items()
            for k in ("pooled_f1_50", "mean_f1_50")
        } | {f"{a}.diff_to_R": r["mean_diff"] for a, r in stats["vs_R"].items()}
        return StageResult(
            "synth_study",
            summary,
            metrics_file=metrics_path,
            log_metrics=flat,
            tags={"microseg.synth_verdict": stats["sentence"][:250]},
            artifacts=[
                (out_dir / "summary.csv", "synth_study"),
                (out_dir / "arms.png", "synth_study"),
            ],
            out=out_dir,
        )

    return run_stage(
        params,
        fn,
        stage="synth_study",
        task="nuclei",
        # variant names ("R+shapes") are not MLflow param keys: logged as one JSON value
        section={
            **cfg.model_dump(exclude={"variants"}),
            "variants": json.dumps({k: v.model_dump() for k, v in cfg.variants.items()}),
        },
        run_name="synth-study",
    )


def _sizes(index: pd.DataFrame) -> dict[str, int]:
    train = index[index["split"] == "train"]
    return {
        "n_train_real": int((train["source"] == "real").sum()),
        "n_train_synthetic": int((train["source"] == "synthetic").sum()),
        "n_val_real": int(((index["split"] == "val") & (index["source"] == "real")).sum()),
    }
