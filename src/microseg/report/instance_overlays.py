"""Outlines of GT and predicted instances over an image, and the best and worst images to show.

Overlays (:func:`render_overlay`, :func:`best_worst_overlays`) are drawn at the image's own
resolution (small images upscaled 2x, nearest) with PIL: the image in grey, GT outlines in
green, predicted outlines in magenta, white where they coincide.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.segmentation import find_boundaries

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.utils.atomic import atomic_path

GT_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 0, 255)
BOTH_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Overlay:
    """A rendered overlay PNG of one image for one model."""

    image_id: str
    kind: str  # "best" or "worst" (or any short word)
    path: Path
    metric: str = "f1_50"
    score: float | None = None


def slug(name: str) -> str:
    """A file-name-safe form of a model name or image id."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return s or "x"


def overlay_rgb(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, scale: int = 1) -> np.ndarray:
    """``(Y*scale, X*scale, 3)`` uint8: grey image, GT and predicted instance outlines."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    image = np.asarray(image, np.float64)
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[:2] == gt.shape:
        image = image[..., :3].mean(axis=-1)
    if gt.ndim != 2 or gt.shape != pred.shape or image.shape != gt.shape:
        raise ShapeMismatchError(
            f"overlay needs a 2D image, GT and prediction of one shape; found {image.shape}, "
            f"{gt.shape} and {pred.shape}"
        )
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0)
    grey = np.clip((np.nan_to_num(image) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat((grey * 200).astype(np.uint8)[..., None], 3, axis=2)
    if scale > 1:
        rgb = rgb.repeat(scale, 0).repeat(scale, 1)
        gt = gt.repeat(scale, 0).repeat(scale, 1)
        pred = pred.repeat(scale, 0).repeat(scale, 1)
    g_edge = find_boundaries(gt, mode="inner") & (gt != 0)
    p_edge = find_boundaries(pred, mode="inner") & (pred != 0)
    rgb[g_edge] = GT_COLOUR
    rgb[p_edge] = PRED_COLOUR
    rgb[g_edge & p_edge] = BOTH_COLOUR
    return rgb


def render_overlay(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, out_png: str | Path
) -> Path:
    """Write :func:`overlay_rgb` as a PNG (atomically); images under 512 px upscaled 2x."""
    scale = 2 if max(np.shape(gt)) < 512 else 1
    rgb = overlay_rgb(image, gt, pred, scale)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
    return out_png


def best_worst_overlays(
    name: str,
    per_image: pd.DataFrame,
    load: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]],
    out_dir: str | Path,
    *,
    metric: str = "f1_50",
    k: int = 1,
    higher_is_better: bool = True,
) -> list[Overlay]:
    """Render the ``k`` best and ``k`` worst images of a model by ``metric``.

    ``load(image_id)`` returns ``(image, gt labels, predicted labels)``. Ties are broken by
    image id. Files: ``<out_dir>/<model>_<best|worst>_<k>.png``.
    """
    if metric not in per_image or "image_id" not in per_image:
        raise MicrosegError(f"per-image table needs 'image_id' and {metric!r} columns")
    df = per_image[["image_id", metric]].dropna().astype({"image_id": str})
    best = df.sort_values([metric, "image_id"], ascending=[not higher_is_better, True]).head(k)
    worst = df.sort_values([metric, "image_id"], ascending=[higher_is_better, True])
    worst = worst[~worst["image_id"].isin(best["image_id"])].head(k)
    picks = [("best", best), ("worst", worst)]
    out = []
    for kind, rows in picks:
        for n, row in enumerate(rows.itertuples(index=False), start=1):
            image_id, score = str(row[0]), float(row[1])
            path = Path(out_dir) / f"{slug(name)}_{kind}_{n}.png"
            render_overlay(*load(image_id), path)
            out.append(Overlay(image_id, kind, path, metric, score))
    return out
