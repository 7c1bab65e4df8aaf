"""Figures for uncertainty, calibration and detection quality (matplotlib, no pyplot).

Every figure is a bare :class:`matplotlib.figure.Figure` rendered by the Agg/PDF backends:
no pyplot state, no GUI, safe in worker processes. Nothing touches the network (matplotlib
ships DejaVu fonts and we ask for no other). Output is deterministic: fixed rcParams, no
timestamps in PDF metadata, and the same inputs give byte-identical files. Files are written
atomically (a temporary sibling with the same suffix, then renamed), so a killed report stage
never leaves a truncated image behind.

- :func:`uncertainty_panel`: image, mean probability, variance, entropy, mutual information,
  aleatoric (expected) entropy and rater disagreement for chosen planes, with colour bars;
- :func:`reliability_diagram`: a calibration table from :mod:`microseg.evaluate.calibration`;
- :func:`roc_figure`: ROC curves of uncertainty maps against rater disagreement;
- :func:`pr_curve_figure`: precision-recall curves of one or more methods;
- :func:`difference_figure`: paired differences to a baseline with their intervals, one panel
  per group (all images, each modality);
- :func:`size_histogram`: true vs predicted object areas; :func:`confusion_figure`: a 2 x 2
  pixel confusion matrix.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.inter_rater import disagreement_map
from microseg.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

#: rcParams every figure is drawn with: bundled font, embedded TrueType in PDFs, fixed hashing.
RC: dict[str, object] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "pdf.fonttype": 42,
    "svg.hashsalt": "microseg",
    "savefig.dpi": 120,
    "image.interpolation": "nearest",
}

#: Panel order, titles and colour maps of :func:`uncertainty_panel`; other keys follow in
#: the order given, drawn with ``"magma"``.
PANEL_STYLE: dict[str, tuple[str, str]] = {
    "mean": ("mean p(spine)", "viridis"),
    "variance": ("variance", "magma"),
    "entropy": ("predictive entropy", "magma"),
    "mutual_information": ("mutual information\n(epistemic)", "magma"),
    "expected_entropy": ("expected entropy\n(aleatoric)", "magma"),
    "disagreement": ("rater disagreement", "cividis"),
}

_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def save_figure(fig: Figure, *paths: str | Path | None) -> list[Path]:
    """Write ``fig`` to each path (format from the suffix: png, pdf, svg) atomically."""
    written = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise MicrosegError(
                f"figure path must end in one of {sorted(_FORMATS)}; found {path.suffix!r}",
                path,
            )
        # no dates or versions in the files: same figure, same bytes
        meta = {
            "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
            "png": {"Software": None},
            "svg": {"Date": None},
        }[fmt]
        with mpl.rc_context(RC), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta)
        written.append(path)
        logger.debug("wrote %s", path)
    return written


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _with_rc(func: F) -> F:
    """Run a figure function under :data:`RC` (artists read rcParams when created and drawn)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(RC):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _planes(a: np.ndarray, planes: Sequence[int] | None, name: str) -> list[np.ndarray]:
    a = np.asarray(a)
    if a.ndim == 2:
        return [a]
    if a.ndim != 3:
        raise ShapeMismatchError(f"{name} must be a 2D plane or a 3D ZYX stack; found {a.shape}")
    idx = [a.shape[0] // 2] if planes is None else list(planes)
    for z in idx:
        if not -a.shape[0] <= z < a.shape[0]:
            raise MicrosegError(f"plane {z} out of range for {name} with {a.shape[0]} planes")
    return [a[z] for z in idx]


@_with_rc
def uncertainty_panel(
    image_plane: np.ndarray,
    maps: Mapping[str, np.ndarray],
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    gt: np.ndarray | None = None,
    raters: Sequence[np.ndarray] | None = None,
    disagreement: np.ndarray | None = None,
    planes: Sequence[int] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Panel of the image and uncertainty maps, one row per plane, colour bar per column.

    ``image_plane`` and every map are 2D planes, or 3D ZYX stacks of which ``planes`` (default:
    the middle one) are drawn. ``maps`` are as :func:`microseg.evaluate.uncertainty.
    uncertainty_maps` returns them (extra keys are drawn too). ``gt`` is outlined on the image
    and the mean map; the rater disagreement column comes from ``disagreement`` or is computed
    from ``raters``. Colour scales are shared down each column. Returns the paths written.
    """
    if disagreement is None and raters is not None:
        disagreement = disagreement_map(raters)
    cols: dict[str, np.ndarray] = {}
    for key in PANEL_STYLE:
        if key == "disagreement":
            if disagreement is not None:
                cols[key] = np.asarray(disagreement)
        elif key in maps:
            cols[key] = np.asarray(maps[key])
    for key, value in maps.items():
        if key not in cols:
            cols[key] = np.asarray(value)
    image = np.asarray(image_plane)
    for key, value in cols.items():
        if value.shape != image.shape:
            raise ShapeMismatchError(f"map {key!r} has shape {value.shape}; image {image.shape}")
    if gt is not None and np.shape(gt) != image.shape:
        raise ShapeMismatchError(f"gt has shape {np.shape(gt)}; image {image.shape}")

    img_rows = _planes(image, planes, "image")
    col_rows = {k: _planes(v, planes, k) for k, v in cols.items()}
    gt_rows = _planes(np.asarray(gt, bool), planes, "gt") if gt is not None else None
    z_labels = (
        [f"z = {z}" for z in ([image.shape[0] // 2] if planes is None else planes)]
        if image.ndim == 3
        else [""]
    )
    n_rows, n_cols = len(img_rows), 1 + len(cols)
    h, w = img_rows[0].shape
    panel = 2.1
    fig = _new_figure(panel * n_cols, panel * n_rows * h / w + 0.5 * (title is not None) + 0.35)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    lo, hi = np.percentile(np.concatenate([r.ravel() for r in img_rows]), (0.5, 99.5))
    for r in range(n_rows):
        ax = axes[r, 0]
        ax.imshow(img_rows[r], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if gt_rows is not None and gt_rows[r].any():
            ax.contour(gt_rows[r], levels=[0.5], colors="tab:red", linewidths=0.6)
        ax.set_ylabel(z_labels[r])
        if r == 0:
            ax.set_title("image")
    for c, (key, rows) in enumerate(col_rows.items(), start=1):
        label, cmap = PANEL_STYLE.get(key, (key.replace("_", " "), "magma"))
        if key == "mean":
            vmin, vmax = 0.0, 1.0
        elif key == "disagreement":
            vmin, vmax = 0.0, 0.25  # the largest population variance of 0/1 labels
        else:
            vmin = 0.0
            vmax = float(max(np.nanmax(x) if x.size else 0.0 for x in rows)) or 1.0
        for r, plane in enumerate(rows):
            ax = axes[r, c]
            im = ax.imshow(plane, cmap=cmap, vmin=vmin, vmax=vmax)
            if key == "mean" and gt_rows is not None and gt_rows[r].any():
                ax.contour(gt_rows[r], levels=[0.5], colors="white", linewidths=0.5)
            if r == 0:
                ax.set_title(label)
        fig.colorbar(im, ax=list(axes[:, c]), shrink=0.8, location="bottom", aspect=15)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def reliability_diagram(
    table: pd.DataFrame,
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    title: str = "reliability of p(y=1)",
) -> list[Path]:
    """Observed frequency of positives against mean predicted p per bin, with pixel counts.

    ``table`` is :func:`microseg.evaluate.calibration.reliability_table` (columns lower, upper,
    count, mean_confidence, frequency). Bars show the frequency per bin, red marks the gap to
    the diagonal; the lower axis shows how many pixels each bin holds (log scale). The ECE of
    the table is printed in the legend.
    """
    need = {"lower", "upper", "count", "mean_confidence", "frequency"}
    if not need <= set(table.columns):
        raise MicrosegError(f"reliability table needs columns {sorted(need)}; has {list(table)}")
    t = table[table["count"] > 0]
    n = float(t["count"].sum())
    ece = float((t["count"] * (t["mean_confidence"] - t["frequency"]).abs()).sum() / n) if n else 0
    fig = _new_figure(4.2, 4.8)
    ax, axc = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = (table["upper"] - table["lower"]).to_numpy()
    ax.bar(
        t["lower"],
        t["frequency"],
        width=(t["upper"] - t["lower"]),
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="observed frequency",
    )
    ax.bar(
        t["lower"],
        t["mean_confidence"] - t["frequency"],
        bottom=t["frequency"],
        width=(t["upper"] - t["lower"]),
        align="edge",
        facecolor=(0.84, 0.15, 0.16, 0.25),
        edgecolor="tab:red",
        linewidth=0.5,
        label="gap to diagonal",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect")
    ax.plot(
        t["mean_confidence"],
        t["frequency"],
        "o-",
        color="black",
        markersize=3,
        linewidth=0.8,
        label=f"ECE = {ece:.4f}",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of positives")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7)
    axc.bar(
        table["lower"],
        table["count"].clip(lower=0),
        width=width,
        align="edge",
        color="gray",
        log=bool((table["count"] > 0).any()),
    )
    axc.set_xlabel("mean predicted p(y=1)")
    axc.set_ylabel("pixels")
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def roc_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    title: str = "uncertainty vs rater disagreement",
) -> list[Path]:
    """ROC curves ``name -> (fpr, tpr, auc)``, e.g. ``df.attrs["roc_curves"]`` of
    :func:`microseg.evaluate.inter_rater.compare_uncertainty_to_disagreement`."""
    if not curves:
        raise MicrosegError("roc_figure needs at least one curve")
    fig = _new_figure(4.2, 4.0)
    ax = fig.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        label = f"{name} (AUC {auc:.3f})" if auc is not None and math.isfinite(auc) else name
        ax.plot(fpr, tpr, linewidth=1.2, label=label)
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def pr_curve_figure(
    df: pd.DataFrame,
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    method_col: str = "method",
    title: str = "precision-recall",
) -> list[Path]:
    """Precision-recall curves from a table with ``precision`` and ``recall`` columns.

    One curve per value of ``method_col`` when that column exists, else one curve. Points are
    drawn in order of recall; the best-F1 point of each curve is marked and its F1 given in the
    legend. Rows with nothing predicted (``tp + fp == 0`` when those columns exist, as in
    :func:`microseg.evaluate.segmentation.threshold_sweep`) are left out: their precision is a
    convention, not a measurement, and would draw a spurious drop to the origin.
    """
    need = {"precision", "recall"}
    if not need <= set(df.columns):
        raise MicrosegError(f"PR table needs columns {sorted(need)}; has {list(df.columns)}")
    if df.empty:
        raise MicrosegError("PR table is empty")
    groups = df.groupby(method_col, sort=False) if method_col in df.columns else [("", df)]
    fig = _new_figure(4.2, 4.0)
    ax = fig.subplots()
    for name, g in groups:
        if {"tp", "fp"} <= set(g.columns):
            g = g[(g["tp"] + g["fp"]) > 0]
        if g.empty:
            continue
        g = g.sort_values(["recall", "precision"], ascending=[True, False], kind="stable")
        p, r = g["precision"].to_numpy(float), g["recall"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        k = int(np.nanargmax(f1))
        label = f"{name} (best F1 {f1[k]:.3f})" if name != "" else f"best F1 {f1[k]:.3f}"
        (line,) = ax.plot(r, p, linewidth=1.2, label=label)
        ax.plot(r[k], p[k], "o", color=line.get_color(), markersize=4)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=7)
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def difference_figure(
    table: pd.DataFrame,
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    title: str = "difference to the baseline",
    filled: str = "excludes_zero",
) -> list[Path]:
    """Mean differences with their intervals: one panel per ``group``, one row per ``model``.

    ``table`` has columns model, group, mean_diff, low, high and the boolean column ``filled``
    (as :func:`microseg.report.benchmark.compare_to_baselines` writes them: ``excludes_zero``
    or ``claimed``); optionally ``n_images``. Rows where ``filled`` is true get a filled marker,
    the others an open one (shape, not colour, carries the claim); the panels share the x axis,
    with 0 marked, so groups compare at a glance.
    """
    need = {"model", "group", "mean_diff", "low", "high", filled}
    if not need <= set(table.columns):
        raise MicrosegError(f"difference table needs columns {sorted(need)}; has {list(table)}")
    if table.empty:
        raise MicrosegError("difference table is empty")
    models = list(dict.fromkeys(table["model"]))
    groups = list(dict.fromkeys(table["group"]))
    fig = _new_figure(0.8 + 2.2 * len(groups), 1.0 + 0.32 * len(models))
    axes = fig.subplots(1, len(groups), sharex=True, sharey=True, squeeze=False)[0]
    y = {m: len(models) - 1 - k for k, m in enumerate(models)}
    for ax, g in zip(axes, groups, strict=True):
        sub = table[table["group"] == g]
        ax.axvline(0, color="gray", linestyle="--", linewidth=0.8)
        for row in sub.itertuples():
            mean, low, high = float(row.mean_diff), float(row.low), float(row.high)
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y[row.model]] * 2, color="black", linewidth=1.2)
            ax.plot(
                mean,
                y[row.model],
                "o",
                markersize=5,
                markeredgecolor="black",
                markerfacecolor="black" if bool(getattr(row, filled)) else "white",
            )
        n = sub["n_images"].iloc[0] if "n_images" in sub else None
        ax.set_title(f"{g} (n={int(n)})" if n is not None else str(g))
        ax.set_yticks(range(len(models)), models[::-1])
        ax.set_ylim(-0.6, len(models) - 0.4)
    for ax in axes:
        ax.set_xlabel("mean difference")
    legend = "interval excludes 0" if filled == "excludes_zero" else filled.replace("_", " ")
    fig.suptitle(f"{title}\nfilled: {legend}")
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def size_histogram(
    true_areas: np.ndarray,
    pred_areas: np.ndarray,
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    title: str = "object sizes",
    max_area: float | None = None,
    bins: int = 40,
) -> list[Path]:
    """Histograms of true and predicted object areas (pixels) on shared log-spaced bins, with
    their medians; ``max_area`` (a size filter's threshold) is marked when given."""
    t = np.asarray(true_areas, dtype=np.float64)
    p = np.asarray(pred_areas, dtype=np.float64)
    both = np.concatenate([t, p])
    if both.size == 0:
        raise MicrosegError("size_histogram needs at least one object")
    if (both <= 0).any():
        raise MicrosegError("object areas must be > 0 pixels")
    # a margin either side: the bins increase even when every object has one area
    lo, hi = float(both.min()) / 1.25, max(float(both.max()), max_area or 0.0) * 1.25
    edges = np.geomspace(lo, hi, bins + 1)
    fig = _new_figure(4.6, 3.4)
    ax = fig.subplots()
    for areas, name, colour in ((t, "true", "tab:green"), (p, "predicted", "tab:purple")):
        if areas.size:
            label = f"{name}: {areas.size} objects, median {np.median(areas):.0f} px"
            ax.hist(areas, bins=edges, histtype="step", linewidth=1.4, color=colour, label=label)
    if max_area is not None:
        ax.axvline(
            max_area, color="gray", linestyle="--", linewidth=1, label=f"max_area {max_area:g}"
        )
    ax.set_xscale("log")
    ax.set_xlabel("object area (pixels)")
    ax.set_ylabel("objects")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    return save_figure(fig, out_png, out_pdf)


@_with_rc
def confusion_figure(
    tp: int,
    fp: int,
    fn: int,
    tn: int,
    out_png: str | Path,
    out_pdf: str | Path | None = None,
    *,
    title: str = "pixel confusion",
    labels: tuple[str, str] = ("background", "foreground"),
) -> list[Path]:
    """A 2 x 2 confusion matrix (rows: truth, columns: prediction) with counts and the
    fraction of each true class, coloured by that fraction."""
    counts = np.array([[tn, fp], [fn, tp]], dtype=np.int64)
    if (counts < 0).any():
        raise MicrosegError("confusion counts must be >= 0")
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _new_figure(3.6, 3.2)
    ax = fig.subplots()
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{counts[i, j]:,}\n{frac[i, j]:.1%}", ha="center", va="center",
                    color=colour)  # fmt: skip
    ax.set_xticks([0, 1], [f"pred {x}" for x in labels])
    ax.set_yticks([0, 1], [f"true {x}" for x in labels])
    ax.set_title(title)
    return save_figure(fig, out_png, out_pdf)
