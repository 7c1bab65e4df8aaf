"""Figures for cell tracking: track-coloured overlays with ids, montages and lineage plots.

Figures are bare :class:`matplotlib.figure.Figure` objects rendered by Agg (no pyplot state,
no GUI, nothing fetched from the network) and written atomically: a temporary sibling with the
same suffix, then a rename, so a killed report stage never leaves half an image behind.

A track keeps one colour everywhere (overlays of every frame, the montage and the lineage
plot): its hue is ``id x golden ratio`` modulo 1, so neighbouring ids get distant hues.

- :func:`overlay_figure` / :func:`save_track_overlays`: one frame (or every frame, one PNG
  each) with instance masks filled in their track colour, outlined, and the track id written
  at each centroid; the raw image underneath when given;
- :func:`montage_figure` / :func:`save_track_montage`: a grid of such frames;
- :func:`lineage_figure` / :func:`save_lineage_plot`: tracks as horizontal lines over time,
  daughters drawn beside their mother with elbow connectors at divisions and dashed
  connectors across closed gaps (a parent with a single daughter, the CTC gap convention).
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries

from microseg.errors import DataFormatError, ShapeMismatchError
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

_GOLDEN = 0.618033988749895
RC: dict[str, object] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "savefig.dpi": 110,
    "image.interpolation": "nearest",
}
_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def track_colors(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """``(n, 3)`` RGB in [0, 1], one stable colour per track id."""
    ids = np.asarray(ids, np.int64).ravel()
    hues = (ids * _GOLDEN) % 1.0
    sat = 0.55 + 0.35 * ((ids * 7) % 3) / 2  # a little variation between close hues
    return np.array([colorsys.hsv_to_rgb(h, s, 0.95) for h, s in zip(hues, sat, strict=True)])


def _grey(image: np.ndarray) -> np.ndarray:
    """Image scaled to [0, 1] between its 1st and 99.5th percentiles."""
    image = np.asarray(image, np.float64)
    lo, hi = np.percentile(image, [1.0, 99.5]) if image.size else (0.0, 1.0)
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def overlay_rgb(
    mask: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """``(Y, X, 3)`` picture: objects filled in their track colour and outlined, image below."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ShapeMismatchError(f"expected a (Y, X) label image, found shape {mask.shape}")
    if image is not None and np.shape(image) != mask.shape:
        raise ShapeMismatchError(
            f"image shape {np.shape(image)} differs from mask shape {mask.shape}"
        )
    base = _grey(image) if image is not None else np.zeros(mask.shape)
    rgb = np.repeat(base[..., None], 3, axis=2)
    ids = np.unique(mask[mask != 0])
    if len(ids) == 0:
        return rgb
    lut = np.zeros((int(ids[-1]) + 1, 3)) if ids[-1] < 1 << 24 else None
    if lut is not None:
        lut[ids] = track_colors(ids)
        colour = lut[mask]
    else:
        colour = track_colors(ids)[np.searchsorted(ids, mask)]
    fg = mask != 0
    fill = alpha if image is not None else 0.85
    rgb[fg] = (1 - fill) * rgb[fg] + fill * colour[fg]
    edge = find_boundaries(mask, mode="inner") & fg
    rgb[edge] = colour[edge]
    return rgb


def _draw_frame(ax, mask: np.ndarray, image: np.ndarray | None, title: str, ids: bool) -> None:
    ax.imshow(overlay_rgb(mask, image))
    ax.set_title(title)
    ax.set_axis_off()
    if not ids or not mask.any():
        return
    props = regionprops_table(np.asarray(mask), properties=("label", "centroid"))
    size = max(4.0, min(8.0, 400.0 / max(np.sqrt(len(props["label"])) * 10, 1)))
    box = {"boxstyle": "round,pad=0.1", "fc": "black", "ec": "none", "alpha": 0.5}
    for lab, cy, cx in zip(props["label"], props["centroid-0"], props["centroid-1"], strict=True):
        ax.text(cx, cy, str(int(lab)), color="white", fontsize=size, ha="center", va="center",
                fontweight="bold", bbox=box)  # fmt: skip


def _check_stack(tracked: np.ndarray, images: np.ndarray | None) -> np.ndarray:
    tracked = np.asarray(tracked)
    if tracked.ndim != 3:
        raise ShapeMismatchError(f"expected tracked masks (T, Y, X), found shape {tracked.shape}")
    if not np.issubdtype(tracked.dtype, np.integer):
        raise DataFormatError(f"expected integer track labels, found {tracked.dtype}")
    if images is not None and np.shape(images) != tracked.shape:
        raise ShapeMismatchError(
            f"images shape {np.shape(images)} differs from masks shape {tracked.shape}"
        )
    return tracked


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataFormatError(f"expected a .png, .pdf or .svg file name, found {path.name!r}")
    metadata = {"Software": None} if fmt == "png" else {"Creator": None}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata=metadata, bbox_inches="tight")
    log.debug("wrote %s", path)
    return path


def overlay_figure(
    mask: np.ndarray, image: np.ndarray | None = None, title: str = "", ids: bool = True
) -> Figure:
    """One frame: track-coloured masks, outlines and ids at centroids (image below if given)."""
    with mpl.rc_context(RC):
        h, w = np.shape(mask)
        scale = 6.0 / max(h, w)
        fig = Figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0) + 0.3))
        _draw_frame(fig.add_subplot(1, 1, 1), np.asarray(mask), image, title, ids)
    return fig


def save_track_overlays(
    tracked: np.ndarray,
    out_dir: str | Path,
    images: np.ndarray | None = None,
    frames: Sequence[int] | None = None,
    prefix: str = "track_t",
) -> list[Path]:
    """One PNG per frame, ``<out_dir>/<prefix>###.png``; returns the paths written."""
    tracked = _check_stack(tracked, images)
    frames = range(len(tracked)) if frames is None else frames
    digits = 4 if len(tracked) >= 1000 else 3
    paths = []
    for t in frames:
        image = None if images is None else images[t]
        fig = overlay_figure(tracked[t], image, title=f"frame {t}")
        with mpl.rc_context(RC):
            paths.append(_save(fig, Path(out_dir) / f"{prefix}{t:0{digits}d}.png"))
    log.info("wrote %d track overlays to %s", len(paths), out_dir)
    return paths


def montage_figure(
    tracked: np.ndarray,
    images: np.ndarray | None = None,
    frames: Sequence[int] | None = None,
    n_frames: int = 8,
    ncols: int = 4,
    ids: bool = True,
) -> Figure:
    """A grid of overlays; ``frames`` default to ``n_frames`` spread over the sequence."""
    tracked = _check_stack(tracked, images)
    if frames is None:
        count = min(n_frames, len(tracked))
        frames = np.unique(np.linspace(0, len(tracked) - 1, count).round().astype(int)).tolist()
    frames = list(frames)
    if not frames:
        raise DataFormatError("a montage needs at least one frame")
    ncols = max(1, min(ncols, len(frames)))
    nrows = int(np.ceil(len(frames) / ncols))
    h, w = tracked.shape[1:]
    panel = 3.0
    with mpl.rc_context(RC):
        fig = Figure(figsize=(ncols * panel, nrows * panel * h / w + 0.3 * nrows))
        for k, t in enumerate(frames):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            image = None if images is None else images[t]
            _draw_frame(ax, tracked[t], image, f"frame {t}", ids)
        fig.tight_layout()
    return fig


def save_track_montage(
    tracked: np.ndarray,
    path: str | Path,
    images: np.ndarray | None = None,
    frames: Sequence[int] | None = None,
    n_frames: int = 8,
    ncols: int = 4,
) -> Path:
    """Write :func:`montage_figure` to ``path`` (.png, .pdf or .svg)."""
    fig = montage_figure(tracked, images, frames, n_frames, ncols)
    with mpl.rc_context(RC):
        return _save(fig, path)


# --------------------------------------------------------------------------- lineage


def lineage_rows(tracks: pd.DataFrame) -> dict[int, float]:
    """Vertical position of each track: trees laid out like dendrograms, roots by start time.

    Leaves take consecutive rows; a mother sits midway between its daughters, and the track
    after a closed gap (a single daughter) on the row of the track before it.
    """
    table = tracks[["L", "B", "E", "P"]].astype("int64")
    labels = set(table["L"].tolist())
    children: dict[int, list[int]] = {}
    for row in table.sort_values(["B", "L"]).itertuples(index=False):
        if row.P in labels:
            children.setdefault(int(row.P), []).append(int(row.L))
    roots = [
        int(r.L) for r in table.sort_values(["B", "L"]).itertuples(index=False)
        if r.P not in labels
    ]  # fmt: skip
    rows: dict[int, float] = {}
    next_leaf = 0.0
    for root in roots:
        stack: list[tuple[int, bool]] = [(root, False)]  # iterative post-order
        while stack:
            node, done = stack.pop()
            kids = children.get(node, [])
            if done or not kids:
                if kids:
                    rows[node] = float(np.mean([rows[k] for k in kids]))
                else:
                    rows[node] = next_leaf
                    next_leaf += 1.0
                continue
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
    return rows


def lineage_figure(tracks: pd.DataFrame, title: str = "lineage", ids: bool | None = None) -> Figure:
    """Tracks as horizontal lines over frames; elbows at divisions, dashes across gaps."""
    missing = [c for c in ("L", "B", "E", "P") if c not in tracks.columns]
    if missing:
        raise DataFormatError(f"track table lacks columns {missing}")
    table = tracks[["L", "B", "E", "P"]].astype("int64")
    rows = lineage_rows(table)
    n_rows = int(max(rows.values(), default=0.0)) + 1
    ids = len(table) <= 150 if ids is None else ids
    by_label = table.set_index("L")
    n_kids = table[table["P"].isin(by_label.index)].groupby("P").size()
    colours = dict(zip(table["L"].tolist(), track_colors(table["L"].to_numpy()), strict=True))
    t_max = int(table["E"].max()) if len(table) else 0
    with mpl.rc_context(RC):
        fig = Figure(figsize=(8.0, min(max(1.5, 0.16 * n_rows + 1.0), 40.0)))
        ax = fig.add_subplot(1, 1, 1)
        for row in table.itertuples(index=False):
            y = rows[int(row.L)]
            colour = colours[int(row.L)]
            ax.plot([row.B, row.E], [y, y], color=colour, lw=2.0, solid_capstyle="butt")
            if row.B == row.E:
                ax.plot([row.B], [y], "o", color=colour, ms=3)
            if ids:
                ax.annotate(str(int(row.L)), (row.B, y), xytext=(-3, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=6)  # fmt: skip
            if row.P in by_label.index:
                pe, py = int(by_label.at[row.P, "E"]), rows[int(row.P)]
                if n_kids.get(row.P, 0) >= 2:  # division: elbow from the mother's end
                    xm = pe + 0.5 * (row.B - pe)
                    ax.plot([pe, xm, xm, row.B], [py, py, y, y], color="0.25", lw=0.8)
                else:  # closed gap: the same cell, not seen in between
                    ax.plot([pe, row.B], [py, y], color="0.4", lw=1.0, ls=(0, (2, 2)))
        ax.set_xlim(-0.5 - (0.05 * (t_max + 1) if ids else 0.0), t_max + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks([x for x in ax.get_xticks() if 0 <= x <= t_max])
        ax.set_ylim(n_rows - 0.5, -0.5)
        ax.set_yticks([])
        ax.set_xlabel("frame")
        n_div = int((n_kids >= 2).sum())
        n_gap = int((n_kids == 1).sum())
        ax.set_title(f"{title}: {len(table)} tracks, {n_div} divisions, {n_gap} closed gaps")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
    return fig


def save_lineage_plot(tracks: pd.DataFrame, path: str | Path, title: str = "lineage") -> Path:
    """Write :func:`lineage_figure` to ``path`` (.png, .pdf or .svg)."""
    fig = lineage_figure(tracks, title)
    with mpl.rc_context(RC):
        return _save(fig, path)
