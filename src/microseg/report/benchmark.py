"""The benchmark report: every model against the classical baseline, as HTML and Markdown.

:func:`build_report` writes one folder (default ``reports/benchmark/``)::

    index.html  index.md            the report (same content; Markdown for PRs and the CLI)
    models.csv  per_image.csv       the numbers behind the tables
    per_modality.csv  hardest.csv
    figures/pr_curves.png           foreground pixel PR curves of all models
    figures/reliability_<model>.png reliability diagram per model
    overlays/<model>_<kind>_<k>.png best and worst images per model (copied in)

Tables: all models x metrics (F1 at IoU 0.5/0.7/0.9, COCO mask AP/AP50/AP75, DSB score, Dice,
adapted Rand error, VOI, ECE), training time, parameter count and a link to the MLflow run; a
per-modality table (micro F1 from summed counts); the images hardest across models. The best
value of each column is bold; the classical baseline row is marked, and a report without one
is refused unless ``require_baseline=False``: a learnt model's number means little without
the floor it has to beat.

The folder is self-contained (relative paths, inline CSS, no script, nothing fetched) and
deterministic: no timestamps, models in the order given, files named from model names, so the
same inputs give byte-identical files. It is built in a temporary sibling folder and renamed
into place, so a killed report stage leaves the previous report, never half of a new one.

Overlays come from :mod:`microseg.report.instance_overlays`; the HTML/Markdown rendering
from :mod:`microseg.report.document`.
"""

from __future__ import annotations

import html
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError
from microseg.evaluate.errors_analysis import hardest_images, per_modality
from microseg.evaluate.instances import InstanceEvaluation
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
from microseg.report.figures import pr_curve_figure, reliability_diagram
from microseg.report.instance_overlays import Overlay, slug
from microseg.report.instance_overlays import (
    best_worst_overlays as best_worst_overlays,  # re-export
)
from microseg.utils.atomic import atomic_path

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
)

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


def _model_label(r: ModelResult) -> str:
    return f"{r.name} (baseline)" if r.baseline else r.name


def _models_table(results: Sequence[ModelResult], columns: Sequence[Column]) -> Table:
    best = {c.key: best_value([r.metrics.get(c.key) for r in results], c.higher_is_better)
            for c in columns}  # fmt: skip
    header = ["model", *(c.header for c in columns), "train time", "params", "MLflow run"]
    rows = []
    for r in results:
        cells: list[tuple[str, str | None, bool]] = [(_model_label(r), None, False)]
        for c in columns:
            v = r.metrics.get(c.key)
            bold = best[c.key] is not None and not is_missing(v) and float(v) == best[c.key]
            cells.append((format_number(v, c.digits), None, bold))
        cells.append((fmt_seconds(r.train_seconds), None, False))
        cells.append((fmt_params(r.n_params), None, False))
        run = r.mlflow_run_id[:12] if r.mlflow_run_id else ("run" if r.mlflow_url else "—")
        cells.append((run, r.mlflow_url, False))
        rows.append(cells)
    return Table(header, rows, ["baseline" if r.baseline else "" for r in results])


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
) -> Path:
    """Write the benchmark folder (see the module notes); returns ``out_dir/index.html``.

    ``context`` (dataset, split, commit, ...) is shown as given, in order. ``manifest`` gives
    each image's modality (``sample_id``, ``modality``) when per-image tables lack one.
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
            + ". Best per column in bold; lower is better for ARE, VOI and ECE.",
            "legend",
        )
        rows = []
        for r in results:
            rows.append(
                {
                    "model": r.name,
                    "baseline": r.baseline,
                    **{k: r.metrics[k] for k in sorted(r.metrics)},
                    "train_seconds": r.train_seconds,
                    "n_params": r.n_params,
                    "mlflow_run_id": r.mlflow_run_id,
                    "mlflow_url": r.mlflow_url,
                }
            )
        pd.DataFrame(rows).to_csv(tmp / "models.csv", index=False)

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

        # per model: overlays, run link, per-image table
        if any(r.overlays for r in results):
            (tmp / "overlays").mkdir()
        doc.heading("Models one by one")
        for r in results:
            doc.heading(_model_label(r), 3)
            if r.description:
                doc.para(r.description)
            links = []
            if r.mlflow_url:
                links.append((f"MLflow run {r.mlflow_run_id or ''}".strip(), r.mlflow_url))
            if links:
                doc.links(links)
            elif r.mlflow_run_id:
                doc.para(f"MLflow run id: {r.mlflow_run_id}")
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

        body = "\n".join(doc.html)
        page = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n"
        )
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "index.md").write_text("\n".join(doc.md), encoding="utf-8")
    logger.info("benchmark report of %d models written to %s", len(results), out_dir)
    return out_dir / "index.html"


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
