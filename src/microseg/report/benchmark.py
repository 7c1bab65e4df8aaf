"""The benchmark report: every model against the classical baseline, as HTML and Markdown.

:func:`build_report` writes one folder (default ``reports/benchmark/``)::

    index.html  index.md            the report (same content; Markdown for PRs and the CLI)
    models.csv  per_image.csv       the numbers behind the tables
    per_modality.csv  hardest.csv
    comparison.csv  comparison.json paired differences of every model to each baseline
    errors.csv                      summed error counts (misses, merges, splits...) per model
    figures/pr_curves.png           foreground pixel PR curves of all models
    figures/differences_<baseline>.png  the paired differences with their intervals
    figures/reliability_<model>.png reliability diagram per model
    figures/<model>_<figure>.png    a model's own figures (object sizes, pixel confusion, ROC)
    overlays/<model>_<kind>_<k>.png best and worst images per model (copied in)
    runs.mlflow.html  runs.mlflow.csv   this build's training times and MLflow run links

Tables: all models x metrics (F1 at IoU 0.5/0.7/0.9, COCO mask AP/AP50/AP75, DSB score, Dice,
adapted Rand error, VOI, ECE, mean absolute and relative count error) and parameter count; a
per-modality table (micro F1 from summed counts); the images hardest across models. The best
value of each column is bold; the classical baseline row is marked, and a report without one
is refused unless ``require_baseline=False``: a learnt model's number means little without
the floor it has to beat.

Whether a model *beats* a baseline is read from the paired comparison
(:mod:`microseg.evaluate.paired`): the mean over images of the per-image difference of
``compare_metric`` (F1 at IoU 0.5 by default; model minus baseline) with a seeded bootstrap
interval, over all images and per modality, against every baseline (the first one is the
primary). A difference is claimed (bold, with the word "better" or "worse") only when its
interval excludes 0 and its group holds at least ``min_claim_images`` images (a bootstrap over
a handful of images is too narrow to trust); models scored on different image sets are
refused. Merge, split, miss and false-positive counts are summed per model. Descriptions and the
``details`` of each model (e.g. the encoder or profile a training recorded) are listed with
the model table.

The folder is self-contained (relative paths, inline CSS, no script, nothing fetched) and
deterministic: no timestamps, models in the order given, files named from model names, so the
same inputs give byte-identical files. What differs from build to build by nature, training
wall times and MLflow run ids, goes to ``runs.mlflow.html``/``.csv`` beside the report (linked
from it): ``.dvcignore`` leaves ``*.mlflow.*`` out of the folder's DVC hash, so a rebuild from
the same inputs keeps the hash and the runs stay where they belong, in MLflow. It is built in
a temporary sibling folder and renamed into place, so a killed report stage leaves the
previous report, never half of a new one.

Overlays come from :mod:`microseg.report.instance_overlays`; the HTML/Markdown rendering
from :mod:`microseg.report.document`.
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError
from microseg.evaluate.errors_analysis import hardest_images, per_modality
from microseg.evaluate.instances import InstanceEvaluation
from microseg.evaluate.paired import ALL, PairedDifference, paired_difference
from microseg.report.document import (
    CSS,
    Doc,
    Table,
    best_value,
    fmt_params,
    fmt_seconds,
    format_number,
    is_missing,
)
from microseg.report.figures import difference_figure, pr_curve_figure, reliability_diagram
from microseg.report.instance_overlays import Overlay, slug
from microseg.report.instance_overlays import (
    best_worst_overlays as best_worst_overlays,  # re-export
)
from microseg.utils.atomic import atomic_path, write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Column:
    """One metric column: key in ``ModelResult.metrics``, header, digits, direction."""

    key: str
    header: str
    digits: int = 3
    higher_is_better: bool = True
    help: str = ""


#: The columns of the model table, in order.
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("f1_50", "F1@0.5", help="instance F1, one-to-one matching at IoU ≥ 0.5 (micro)"),
    Column("f1_70", "F1@0.7", help="instance F1 at IoU ≥ 0.7"),
    Column("f1_90", "F1@0.9", help="instance F1 at IoU ≥ 0.9"),
    Column("segm_AP", "AP", help="COCO mask AP, IoU 0.50:0.95 (pycocotools)"),
    Column("segm_AP50", "AP50", help="COCO mask AP at IoU 0.5"),
    Column("segm_AP75", "AP75", help="COCO mask AP at IoU 0.75"),
    Column("dsb_ap", "DSB", help="Kaggle DSB 2018 score: TP/(TP+FP+FN) over 0.5:0.95"),
    Column("dice", "Dice", help="foreground pixel Dice (micro)"),
    Column("are", "ARE", higher_is_better=False, help="adapted Rand error (mean per image)"),
    Column("voi", "VOI", higher_is_better=False, help="variation of information, bits"),
    Column("ece", "ECE", 4, False, help="expected calibration error of p(foreground)"),
    Column("count_mae", "count err", 2, False, help="mean |predicted - true| objects per image"),
    Column("count_mre", "count rel", 3, False, help="mean |count error| / true count per image"),
)

#: Keys of a training's ``train_info.json`` shown next to a model's description when present
#: (which encoder or backbone ran, which profile: demo or full).
DETAIL_KEYS: tuple[str, ...] = ("encoder", "backbone", "profile")

#: Error counts of :func:`microseg.evaluate.errors_analysis.error_table` summed per model:
#: (per-image column, header); fewer is better for all but the first two.
ERROR_COUNTS: tuple[tuple[str, str], ...] = (
    ("n_gt", "GT nuclei"),
    ("n_pred", "predicted"),
    ("misses", "misses"),
    ("false_positives", "false positives"),
    ("merges", "merges"),
    ("merged_gt", "GT in merges"),
    ("splits", "splits"),
    ("split_pred", "split fragments"),
    ("misses_in_merge", "misses in merges"),
    ("fp_in_split", "FP in splits"),
)

#: Columns of ``comparison.csv``, one row per (model, baseline, group).
COMPARISON_COLUMNS = (
    "model", "baseline", "primary", "metric", "group", "n_images", "mean_model",
    "mean_baseline", "mean_diff", "low", "high", "excludes_zero", "claimed", "verdict",
    "confidence_level", "method", "n_resamples", "seed", "n_seeds", "seed_mean_diff",
    "seed_sd_diff", "seed_min_diff", "seed_max_diff",
)  # fmt: skip
#: the verdict of an image-level claim that other training seeds do not back
SEED_DEPENDENT = "seed-dependent"

#: Fewest images in a group for a difference to be claimed. A percentile bootstrap of a mean
#: is narrower than the Student-t interval by about z * sqrt((n - 1) / n) / t_{n-1}: 0.53 at
#: n = 4, 0.82 at n = 10, 0.91 at n = 19. Simulated (normal differences, 2000 trials) its
#: nominal 95% covers 76% at n = 3, 80% at n = 4, 90% at n = 10 and 93% at n = 19.
MIN_CLAIM_IMAGES = 10

#: Columns of the per-modality table (keys of :func:`microseg.evaluate.instances.summarize`).
MODALITY_COLUMNS: tuple[Column, ...] = (
    Column("f1_50", "F1@0.5"),
    Column("f1_70", "F1@0.7"),
    Column("f1_90", "F1@0.9"),
    Column("dsb_ap", "DSB"),
    Column("dice", "Dice"),
    Column("are", "ARE", higher_is_better=False),
)


@dataclass
class ModelResult:
    """Everything the report shows of one model.

    ``metrics`` holds dataset scores keyed as :data:`METRIC_COLUMNS` expects (``f1_50``,
    ``segm_AP``, ``dice``, ``are``, ``voi``, ``ece``...; absent keys show as a dash);
    ``per_image`` one row per image with ``image_id`` and per-image scores (optionally
    ``modality``); ``pr_curve`` a table with ``precision`` and ``recall`` (e.g.
    :attr:`InstanceEvaluation.curves`); ``reliability`` a calibration table. ``baseline`` marks
    the classical reference. ``mlflow_url`` is linked; ``mlflow_run_id`` alone is shown.
    ``description`` and ``details`` (see :func:`details_from_info`) say what the model is.
    """

    name: str
    metrics: Mapping[str, float]
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)
    train_seconds: float | None = None
    n_params: int | None = None
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    pr_curve: pd.DataFrame | None = None
    reliability: pd.DataFrame | None = None
    overlays: Sequence[Overlay] = ()
    baseline: bool = False
    description: str = ""
    #: short facts shown with the description, e.g. ``{"encoder": "resnet34"}``
    details: Mapping[str, str] = field(default_factory=dict)
    #: the model's own figures (path, caption), copied in under its name (e.g. object sizes)
    figures: Sequence[tuple[Path, str]] = ()

    @classmethod
    def from_evaluation(
        cls,
        name: str,
        evaluation: InstanceEvaluation,
        extra_metrics: Mapping[str, float] | None = None,
        **kwargs,
    ) -> ModelResult:
        """A result from :func:`~microseg.evaluate.instances.evaluate_instances` output plus,
        e.g., :func:`~microseg.evaluate.coco_eval.coco_metrics`."""
        return cls(
            name=name,
            metrics={**evaluation.summary, **(extra_metrics or {})},
            per_image=evaluation.per_image,
            pr_curve=evaluation.curves,
            reliability=evaluation.reliability,
            **kwargs,
        )


def details_from_info(info: Mapping[str, object], keys: Sequence[str] = DETAIL_KEYS) -> dict:
    """The :data:`DETAIL_KEYS` a training recorded (e.g. ``train_info.json``), as text."""
    out = {}
    for k in keys:
        v = info.get(k)
        if v is None or v == "":
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return out


def _model_label(r: ModelResult) -> str:
    return f"{r.name} (baseline)" if r.baseline else r.name


def _details_text(r: ModelResult) -> str:
    return ", ".join(f"{k}: {v}" for k, v in r.details.items())


def _full_label(r: ModelResult) -> str:
    """The model's name with its details, e.g. ``sac [encoder: resnet34, profile: demo]``."""
    d = _details_text(r)
    return f"{_model_label(r)} [{d}]" if d else _model_label(r)


def _descriptions_table(results: Sequence[ModelResult]) -> Table | None:
    keys = [k for k in DETAIL_KEYS if any(k in r.details for r in results)]
    keys += sorted({k for r in results for k in r.details} - set(keys))
    if not keys and not any(r.description for r in results):
        return None
    rows = [
        [(_model_label(r), None, False), (r.description or "—", None, False)]
        + [(r.details.get(k, "—"), None, False) for k in keys]
        for r in results
    ]
    return Table(
        ["model", "description", *keys], rows, ["baseline" if r.baseline else "" for r in results]
    )


def _models_table(results: Sequence[ModelResult], columns: Sequence[Column]) -> Table:
    best = {c.key: best_value([r.metrics.get(c.key) for r in results], c.higher_is_better)
            for c in columns}  # fmt: skip
    header = ["model", *(c.header for c in columns), "params"]
    rows = []
    for r in results:
        cells: list[tuple[str, str | None, bool]] = [(_model_label(r), None, False)]
        for c in columns:
            v = r.metrics.get(c.key)
            bold = best[c.key] is not None and not is_missing(v) and float(v) == best[c.key]
            cells.append((format_number(v, c.digits), None, bold))
        cells.append((fmt_params(r.n_params), None, False))
        rows.append(cells)
    return Table(header, rows, ["baseline" if r.baseline else "" for r in results])


#: this build's training times and MLflow runs (``*.mlflow.*``: outside the DVC hash)
RUNS_PAGE = "runs.mlflow.html"
RUNS_CSV = "runs.mlflow.csv"


def _has_runs(results: Sequence[ModelResult]) -> bool:
    return any(r.train_seconds is not None or r.mlflow_run_id or r.mlflow_url for r in results)


def _write_runs(results: Sequence[ModelResult], out_dir: Path, title: str) -> None:
    """``runs.mlflow.html``/``.csv``: per model its training time and MLflow run (linked)."""
    rows, table_rows = [], []
    for r in results:
        run = r.mlflow_run_id or ("run" if r.mlflow_url else "—")
        table_rows.append(
            [
                (_model_label(r), None, False),
                (fmt_seconds(r.train_seconds), None, False),
                (run, r.mlflow_url, False),
            ]
        )
        rows.append(
            {
                "model": r.name,
                "train_seconds": r.train_seconds,
                "mlflow_run_id": r.mlflow_run_id,
                "mlflow_url": r.mlflow_url,
            }
        )
    doc = Doc()
    doc.html.append(f"<h1>{html.escape(title)}: runs of this build</h1>")
    doc.para(
        "Training wall time and MLflow run of each model, as this build found them. They "
        "differ from build to build, so they are kept out of the report's DVC hash.",
        "legend",
    )
    classes = ["baseline" if r.baseline else "" for r in results]
    doc.table(Table(["model", "train time", "MLflow run"], table_rows, classes))
    doc.links([("the report", "index.html")])
    body = "\n".join(doc.html)
    write_text(
        out_dir / RUNS_PAGE,
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}: runs</title>\n<style>\n{CSS}\n</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n",
    )
    write_text(out_dir / RUNS_CSV, pd.DataFrame(rows).to_csv(index=False))


def _frame_table(
    df: pd.DataFrame,
    keys: Sequence[tuple[str, str]],
    columns: Sequence[Column],
    baseline_names: set[str],
    *,
    group: str | None = None,
    bold_best: bool = True,
) -> Table:
    """A table of ``df`` rows: key columns as text, metric columns formatted, best bold
    (within each ``group`` value when given, and unless ``bold_best`` is false)."""
    cols = [c for c in columns if c.key in df]
    header = [h for _, h in keys] + [c.header for c in cols]
    best: dict[tuple[object, str], float | None] = {}
    groups = df.groupby(group, sort=False) if group else [(None, df)]
    for g, sub in groups:
        for c in cols:
            best[(g, c.key)] = (
                best_value(sub[c.key].tolist(), c.higher_is_better) if bold_best else None
            )
    rows, classes = [], []
    for _, row in df.iterrows():
        g = row[group] if group else None
        is_base = "model" in df and str(row["model"]) in baseline_names
        cells: list[tuple[str, str | None, bool]] = []
        for k, _ in keys:
            text = (
                format_number(row[k], 0) if isinstance(row[k], float | np.floating) else str(row[k])
            )
            if k == "model" and is_base:
                text += " (baseline)"
            cells.append((text, None, False))
        for c in cols:
            v = row[c.key]
            b = best[(g, c.key)]
            cells.append((format_number(v, c.digits), None, b is not None and not is_missing(v)
                          and float(v) == b))  # fmt: skip
        rows.append(cells)
        classes.append("baseline" if is_base else "")
    return Table(header, rows, classes)


def _check_results(results: Sequence[ModelResult], require_baseline: bool) -> None:
    if not results:
        raise MicrosegError("the benchmark report needs at least one model result")
    names = [r.name for r in results]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MicrosegError(f"model names must be unique; found duplicates {dupes}")
    slugs = [slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise MicrosegError(f"model names {names} collide as file names {slugs}")
    if require_baseline and not any(r.baseline for r in results):
        raise MicrosegError(
            f"no baseline among the models {names}: mark the classical baseline's ModelResult "
            "with baseline=True (or pass require_baseline=False)"
        )
    for r in results:
        for o in r.overlays:
            if not Path(o.path).is_file():
                raise MicrosegError(f"overlay of model {r.name!r} is missing", o.path)


def _stacked_per_image(results: Sequence[ModelResult]) -> pd.DataFrame:
    frames = []
    for r in results:
        if r.per_image is None or r.per_image.empty:
            continue
        if "image_id" not in r.per_image:
            raise MicrosegError(f"per-image table of {r.name!r} has no 'image_id' column")
        df = r.per_image.copy()
        df.insert(0, "model", r.name)
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False).astype({"image_id": str})


def build_report(
    results: Sequence[ModelResult],
    out_dir: str | Path = "reports/benchmark",
    *,
    title: str = "Instance segmentation benchmark",
    context: Mapping[str, str] | None = None,
    manifest: pd.DataFrame | None = None,
    columns: Sequence[Column] = METRIC_COLUMNS,
    hardest_metric: str = "f1_50",
    n_hardest: int = 10,
    require_baseline: bool = True,
    compare_metric: str = "f1_50",
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    seed: int = 0,
    bootstrap_method: str = "percentile",
    min_claim_images: int = MIN_CLAIM_IMAGES,
    seed_diffs: Mapping[tuple[str, str, str], Sequence[float]] | None = None,
) -> Path:
    """Write the benchmark folder (see the module notes); returns ``out_dir/index.html``.

    ``context`` (dataset, split, commit, ...) is shown as given, in order. ``manifest`` gives
    each image's modality (``sample_id``, ``modality``) when per-image tables lack one.
    ``compare_metric`` (a per-image column), ``n_resamples``, ``confidence_level``, ``seed``,
    ``bootstrap_method`` and ``min_claim_images`` set the paired comparison to the baselines;
    ``seed_diffs`` (``(model, baseline, group) -> per-seed mean differences``, from
    ``metrics/seeds.json``) holds a claim to the training-seed spread as well.
    """
    results = list(results)
    _check_results(results, require_baseline)
    out_dir = Path(out_dir)
    baselines = {r.name for r in results if r.baseline}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "figures").mkdir()
        doc = Doc()
        doc.html.append(f"<h1>{html.escape(title)}</h1>")
        doc.md.append(f"# {title}\n")
        if context:
            items = "".join(
                f"<dt>{html.escape(str(k))}:</dt><dd>{html.escape(str(v))}</dd>"
                for k, v in context.items()
            )
            doc.html.append(f'<dl class="context">{items}</dl>')
            doc.md.append("\n".join(f"- **{k}**: {v}" for k, v in context.items()) + "\n")

        # models x metrics
        doc.heading("Models")
        doc.table(_models_table(results, columns))
        doc.para(
            "; ".join(f"{c.header}: {c.help}" for c in columns if c.help)
            + ". Best per column in bold; lower is better for ARE, VOI, ECE and count errors.",
            "legend",
        )
        if _has_runs(results):
            doc.links([("training times and MLflow runs of this build", RUNS_PAGE)])
        described = _descriptions_table(results)
        if described is not None:
            doc.table(described)
        rows = []
        for r in results:
            rows.append(
                {
                    "model": r.name,
                    "baseline": r.baseline,
                    "description": r.description,
                    **{f"detail_{k}": v for k, v in r.details.items()},
                    **{k: r.metrics[k] for k in sorted(r.metrics)},
                    "n_params": r.n_params,
                }
            )
        pd.DataFrame(rows).to_csv(tmp / "models.csv", index=False)

        header = next((c.header for c in columns if c.key == compare_metric), compare_metric)
        higher = next(
            (c.higher_is_better for c in (*columns, *METRIC_COLUMNS) if c.key == compare_metric),
            True,
        )
        comparison = compare_to_baselines(
            results,
            compare_metric,
            manifest=manifest,
            higher_is_better=higher,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
            seed=seed,
            method=bootstrap_method,
            min_claim_images=min_claim_images,
            seed_diffs=seed_diffs,
        )
        errors = error_counts(results, manifest)
        _comparison_section(doc, comparison, results, header, tmp, min_claim_images)
        _errors_section(doc, errors, results)
        comparison.to_csv(tmp / "comparison.csv", index=False)
        errors.to_csv(tmp / "errors.csv", index=False)
        summary = comparison_summary(
            comparison,
            errors,
            results,
            metric=compare_metric,
            confidence_level=confidence_level,
            method=bootstrap_method,
            n_resamples=n_resamples,
            seed=seed,
            min_claim_images=min_claim_images,
        )
        (tmp / "comparison.json").write_text(
            json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )

        stacked = _stacked_per_image(results)
        if not stacked.empty:
            stacked.to_csv(tmp / "per_image.csv", index=False)
            _modality_section(doc, stacked, manifest, baselines, tmp)
            if hardest_metric in stacked:
                hard = hardest_images(stacked, hardest_metric, n_hardest)
                hard.to_csv(tmp / "hardest.csv", index=False)
                doc.heading("Hardest images")
                doc.para(f"Lowest mean {hardest_metric} over models.", "legend")
                model_cols = [Column(r.name, _model_label(r)) for r in results if r.name in hard]
                doc.table(
                    _frame_table(
                        hard,
                        [("image_id", "image")],
                        [*model_cols, Column("mean", "mean")],
                        set(),
                        bold_best=False,
                    )
                )

        # curves
        figs: list[tuple[str, str]] = []
        curves = [
            r.pr_curve.assign(method=_model_label(r))
            for r in results
            if r.pr_curve is not None and not r.pr_curve.empty
        ]
        if curves:
            pr_curve_figure(
                pd.concat(curves, ignore_index=True),
                tmp / "figures" / "pr_curves.png",
                title="foreground pixels: precision-recall",
            )
            figs.append(("figures/pr_curves.png", "foreground pixel precision-recall"))
        for r in results:
            if r.reliability is not None and not r.reliability.empty:
                rel = f"figures/reliability_{slug(r.name)}.png"
                reliability_diagram(r.reliability, tmp / rel, title=f"{r.name}: reliability")
                figs.append((rel, f"{_model_label(r)}: reliability of p(foreground)"))
        if figs:
            doc.heading("Curves")
            doc.figures(figs)

        # per model: overlays, per-image table
        if any(r.overlays for r in results):
            (tmp / "overlays").mkdir()
        doc.heading("Models one by one")
        for r in results:
            doc.heading(_model_label(r), 3)
            if r.description:
                doc.para(r.description)
            if r.details:
                doc.para(_details_text(r), "legend")
            items = []
            seen: dict[str, int] = {}
            for o in r.overlays:
                n = seen[o.kind] = seen.get(o.kind, 0) + 1
                rel = f"overlays/{slug(r.name)}_{slug(o.kind)}_{n}{Path(o.path).suffix.lower()}"
                shutil.copyfile(o.path, tmp / rel)
                score = "" if o.score is None else f", {o.metric} = {format_number(o.score)}"
                items.append((rel, f"{o.kind}: {o.image_id}{score}"))
            if items:
                doc.figures(items)
                doc.para("green: ground truth; magenta: prediction; white: both.", "legend")
            own = []
            for path, caption in r.figures:
                rel = f"figures/{slug(r.name)}_{slug(Path(path).stem)}{Path(path).suffix.lower()}"
                shutil.copyfile(path, tmp / rel)
                own.append((rel, caption))
            if own:
                doc.figures(own)

        body = "\n".join(doc.html)
        page = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n"
        )
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "index.md").write_text("\n".join(doc.md), encoding="utf-8")
    if _has_runs(results):
        _write_runs(results, out_dir, title)
    logger.info("benchmark report of %d models written to %s", len(results), out_dir)
    return out_dir / "index.html"


# ------------------------------------------------------------------ paired comparison, errors


def _with_modality(per_image: pd.DataFrame, manifest: pd.DataFrame | None) -> pd.DataFrame:
    """``per_image`` with a ``modality`` column from the manifest when it has none."""
    if "modality" in per_image or manifest is None:
        return per_image
    if not {"sample_id", "modality"} <= set(manifest.columns):
        return per_image
    lookup = dict(zip(manifest["sample_id"].astype(str), manifest["modality"], strict=True))
    return per_image.assign(modality=per_image["image_id"].astype(str).map(lookup))


def _verdict(d: PairedDifference, higher_is_better: bool, min_images: int) -> str:
    if not d.excludes_zero:
        return "no claim"
    if d.n_images < min_images:
        return "too few images"
    return "better" if (d.low > 0) == higher_is_better else "worse"


def seed_verdict(verdict: str, mean_diff: float, seed_diffs: Sequence[float] | None) -> str:
    """An image-level claim stands only if training seeds agree: every seed's mean difference
    on the same images has the sign of the claimed ``mean_diff``, and their mean exceeds their
    sd (issue 16); otherwise :data:`SEED_DEPENDENT`. Fewer than 2 seeds: it stands as is."""
    if verdict not in ("better", "worse") or seed_diffs is None or len(seed_diffs) < 2:
        return verdict
    d = np.asarray(seed_diffs, dtype=float) * (1.0 if mean_diff > 0 else -1.0)
    agree = bool(np.all(d > 0)) and float(d.mean()) > float(d.std(ddof=1))
    return verdict if agree else SEED_DEPENDENT


def compare_to_baselines(
    results: Sequence[ModelResult],
    metric: str = "f1_50",
    *,
    manifest: pd.DataFrame | None = None,
    higher_is_better: bool = True,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
    min_claim_images: int = MIN_CLAIM_IMAGES,
    seed_diffs: Mapping[tuple[str, str, str], Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Paired per-image difference ``model - baseline`` of ``metric`` for every non-baseline
    model against every baseline (the first is the primary), over all images and per modality.

    One row per (model, baseline, group) with :data:`COMPARISON_COLUMNS`. ``claimed`` when the
    interval excludes 0 and the group holds at least ``min_claim_images`` images; ``verdict``
    then says "better" or "worse", else "no claim" (interval holds 0) or "too few images";
    with a seed spread for the row (``seed_diffs``) a claim the seeds do not back is
    "seed-dependent" (:func:`seed_verdict`).
    Models without per-image scores are left out (logged); different image sets are refused
    (:func:`microseg.evaluate.paired.paired_values`).
    """
    bases = [r for r in results if r.baseline]
    rows = []
    for k, b in enumerate(bases):
        pb = b.per_image
        if pb is None or pb.empty or metric not in pb:
            logger.info("baseline %s has no per-image %s: no paired comparison", b.name, metric)
            continue
        pb = _with_modality(pb, manifest)
        for r in results:
            if r.baseline:
                continue
            pr = r.per_image
            if pr is None or pr.empty or metric not in pr:
                logger.info("%s has no per-image %s: not compared to %s", r.name, metric, b.name)
                continue
            pr = _with_modality(pr, manifest)
            diffs = paired_difference(
                pr,
                pb,
                metric,
                group_col="modality" if "modality" in pr else None,
                n_resamples=n_resamples,
                confidence_level=confidence_level,
                seed=seed,
                method=method,  # type: ignore[arg-type]
                names=(r.name, b.name),
            )
            for d in diffs:
                spread = (seed_diffs or {}).get((r.name, b.name, d.group))
                verdict = _verdict(d, higher_is_better, min_claim_images)
                verdict = seed_verdict(verdict, d.mean_diff, spread)
                sd = np.asarray(spread if spread else [np.nan], dtype=float)
                rows.append(
                    {
                        "model": r.name,
                        "baseline": b.name,
                        "primary": k == 0,
                        "metric": metric,
                        "group": d.group,
                        "n_images": d.n_images,
                        "mean_model": d.mean_a,
                        "mean_baseline": d.mean_b,
                        "mean_diff": d.mean_diff,
                        "low": d.low,
                        "high": d.high,
                        "excludes_zero": d.excludes_zero,
                        "claimed": verdict in ("better", "worse"),
                        "verdict": verdict,
                        "confidence_level": d.confidence_level,
                        "method": method,
                        "n_resamples": n_resamples,
                        "seed": seed,
                        "n_seeds": len(spread) if spread else 0,
                        "seed_mean_diff": float(np.mean(sd)),
                        "seed_sd_diff": float(np.std(sd, ddof=1)) if len(sd) > 1 else np.nan,
                        "seed_min_diff": float(np.min(sd)),
                        "seed_max_diff": float(np.max(sd)),
                    }
                )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _error_column(df: pd.DataFrame, col: str) -> str | None:
    # per-image tables that merged instance scores with error counts may carry both sides
    return next((c for c in (col, f"{col}_y", f"{col}_x") if c in df), None)


def error_counts(
    results: Sequence[ModelResult], manifest: pd.DataFrame | None = None
) -> pd.DataFrame:
    """:data:`ERROR_COUNTS` summed over each model's images: one row per model and group
    (``all`` first, then each modality); models without error columns are left out."""
    rows = []
    for r in results:
        df = r.per_image
        if df is None or df.empty:
            continue
        cols = {k: _error_column(df, k) for k, _ in ERROR_COUNTS}
        if not any(cols[k] for k in ("merges", "splits", "misses")):
            continue
        df = _with_modality(df, manifest)
        groups = [(ALL, df)]
        if "modality" in df:
            mod = df["modality"].fillna("unknown").astype(str)
            groups += [(g, df[mod == g]) for g in sorted(mod.unique())]
        for g, sub in groups:
            row: dict[str, object] = {"model": r.name, "group": g, "n_images": len(sub)}
            for k, _ in ERROR_COUNTS:
                row[k] = int(sub[cols[k]].sum()) if cols[k] else None
            rows.append(row)
    return pd.DataFrame(rows, columns=["model", "group", "n_images", *(k for k, _ in ERROR_COUNTS)])


def _json_number(v: object) -> object:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def comparison_summary(
    comparison: pd.DataFrame,
    errors: pd.DataFrame,
    results: Sequence[ModelResult],
    *,
    metric: str,
    confidence_level: float,
    method: str,
    n_resamples: int,
    seed: int,
    min_claim_images: int,
) -> dict[str, object]:
    """``comparison.json``: the rule, the knobs and, per model, its description, details,
    differences (``differences[baseline][group]``) and summed error counts."""
    bases = [r.name for r in results if r.baseline]
    out: dict[str, object] = {
        "metric": metric,
        "difference": f"mean over images of per-image {metric}, model minus baseline",
        "rule": (
            "a difference is claimed only when its bootstrap interval excludes 0 and its group "
            f"holds at least {min_claim_images} images, and, where a seed spread exists "
            "(metrics/seeds.json), every training seed's mean difference has its sign and "
            "their mean exceeds their sd (else: seed-dependent)"
        ),
        "min_claim_images": min_claim_images,
        "confidence_level": confidence_level,
        "method": method,
        "n_resamples": n_resamples,
        "seed": seed,
        "baselines": bases,
        "primary_baseline": bases[0] if bases else None,
    }
    keep = (
        "n_images", "mean_model", "mean_baseline", "mean_diff", "low", "high", "n_seeds",
        "seed_mean_diff", "seed_sd_diff", "seed_min_diff", "seed_max_diff",
    )  # fmt: skip
    models: dict[str, object] = {}
    for r in results:
        entry: dict[str, object] = {
            "baseline": r.baseline,
            "description": r.description,
            "details": dict(r.details),
        }
        sub = comparison[comparison["model"] == r.name]
        if not sub.empty:
            entry["differences"] = {
                b: {
                    str(row["group"]): {
                        **{k: _json_number(row[k]) for k in keep},
                        "excludes_zero": bool(row["excludes_zero"]),
                        "claimed": bool(row["claimed"]),
                        "verdict": str(row["verdict"]),
                    }
                    for _, row in g.iterrows()
                }
                for b, g in sub.groupby("baseline", sort=False)
            }
        err = errors[(errors["model"] == r.name) & (errors["group"] == ALL)]
        if not err.empty:
            e = err.iloc[0]
            entry["errors"] = {k: _json_number(e[k]) for k in ("n_images", *dict(ERROR_COUNTS))}
        models[r.name] = entry
    out["models"] = models
    return out


def _signed(v: float) -> str:
    return "—" if is_missing(v) else f"{float(v):+.3f}"


def _comparison_section(
    doc: Doc,
    comparison: pd.DataFrame,
    results: Sequence[ModelResult],
    header: str,
    folder: Path,
    min_claim_images: int,
) -> None:
    if comparison.empty:
        return
    by_name = {r.name: r for r in results}
    first = comparison.iloc[0]
    level = round(float(first["confidence_level"]) * 100)
    doc.heading("Against the baseline")
    doc.para(
        f"Paired per-image difference of {header} (model minus baseline; each image scored by "
        f"both), mean over images with a {level}% {first['method']} bootstrap interval over "
        f"images ({int(first['n_resamples'])} resamples, seed {int(first['seed'])}); n is the "
        "number of images in each column. This is the mean of per-image scores, not the "
        "micro score of the models table. A difference is claimed only when its "
        f"{level}% bootstrap interval excludes 0 and its column holds at least "
        f"{min_claim_images} images (on fewer, a bootstrap interval is too narrow to trust): "
        "such cells are bold and say better or worse; the others are no evidence either way. "
        "Where the model was also trained with other seeds (metrics/seeds.json, make seeds), "
        "a claim also needs every seed's mean difference to have its sign and their mean to "
        "exceed their sd; a cell the seeds do not back says seed-dependent."
    )
    bases = list(dict.fromkeys(comparison["baseline"]))
    for k, b in enumerate(bases):
        sub = comparison[comparison["baseline"] == b]
        groups = list(dict.fromkeys(sub["group"]))
        n = {g: int(sub.loc[sub["group"] == g, "n_images"].iloc[0]) for g in groups}
        title = f"{header}: model minus {b}" + (" (primary baseline)" if k == 0 else "")
        if len(bases) > 1:
            doc.heading(title, 3)
        head = ["model", *(f"{'all images' if g == ALL else g} (n={n[g]})" for g in groups)]
        rows = []
        for model, g in sub.groupby("model", sort=False):
            cells: list[tuple[str, str | None, bool]] = [(_full_label(by_name[model]), None, False)]
            for grp in groups:
                row = g[g["group"] == grp].iloc[0]
                if is_missing(row["low"]):
                    text = f"{_signed(row['mean_diff'])} (no interval)"
                else:
                    text = f"{_signed(row['mean_diff'])} [{_signed(row['low'])}, "
                    text += f"{_signed(row['high'])}]"
                claimed = bool(row["claimed"])
                if claimed:
                    text += f" {row['verdict']}"
                elif row["verdict"] == "too few images":
                    text += f" (n < {min_claim_images}: no claim)"
                elif row["verdict"] == SEED_DEPENDENT:
                    text += (
                        f" seed-dependent (seeds {_signed(row['seed_min_diff'])} to "
                        f"{_signed(row['seed_max_diff'])})"
                    )
                cells.append((text, None, claimed))
            rows.append(cells)
        doc.table(Table(head, rows, ["" for _ in rows]))
        rel = f"figures/differences_{slug(b)}.png"
        difference_figure(sub, folder / rel, title=title, filled="claimed")
        doc.figures([(rel, f"{title}: mean and {level}% interval per modality")])


def _errors_section(doc: Doc, errors: pd.DataFrame, results: Sequence[ModelResult]) -> None:
    table = errors[errors["group"] == ALL]
    if table.empty:
        return
    by_name = {r.name: r for r in results}
    table = table.assign(label=[_full_label(by_name[m]) for m in table["model"]])
    doc.heading("Error types")
    doc.para(
        "Counts summed over the images (microseg.evaluate.errors_analysis, at the evaluation's "
        "first IoU threshold): a merge is one prediction covering several nuclei (GT in merges: "
        "the nuclei it swallows), a split is one nucleus cut into several predictions (split "
        "fragments: the pieces). Fewest per column in bold; errors.csv has them per modality.",
        "legend",
    )
    errs = [Column(k, h, 0, higher_is_better=False) for k, h in ERROR_COUNTS[2:]]
    keys = [("label", "model"), ("n_images", "images"), *ERROR_COUNTS[:2]]
    for k, _ in keys[1:]:  # counts as text, a dash where a table had none
        table[k] = [format_number(v, 0) for v in table[k]]
    baselines = {r.name for r in results if r.baseline}
    doc.table(_frame_table(table, keys, errs, baselines))


def _modality_section(
    doc: Doc,
    stacked: pd.DataFrame,
    manifest: pd.DataFrame | None,
    baselines: set[str],
    folder: Path,
) -> None:
    if "modality" not in stacked and manifest is None:
        logger.info("no modality in the per-image tables and no manifest: no modality table")
        return
    if not {"tp_50", "fp_50", "fn_50"} <= set(stacked.columns):
        logger.info("per-image tables lack TP/FP/FN at 0.5: no modality table")
        return
    ks = [c for c in stacked.columns if c.startswith("tp_")]
    thresholds = [float(c[3:]) / 100 for c in ks if {f"fp_{c[3:]}", f"fn_{c[3:]}"} <= set(stacked)]
    table = per_modality(stacked, manifest, thresholds=thresholds)
    table.to_csv(folder / "per_modality.csv", index=False)
    doc.heading("Per modality")
    doc.para("Micro scores from TP/FP/FN summed over the images of each modality.", "legend")
    doc.table(
        _frame_table(
            table,
            [("modality", "modality"), ("model", "model"), ("n_images", "images")],
            MODALITY_COLUMNS,
            baselines,
            group="modality",
        )
    )
