"""Post-processing chosen on the validation split: the seeded-watershed thresholds of a 3-class
U-Net (``t_seed``, ``t_mask``, ``elevation``, ``min_size``), or of a network with a distance
head (``seeds``, ``elevation: predicted_distance``).

nnU-Net decides its post-processing on validation folds and Cellpose exposes its flow and
probability thresholds for the same reason: the network's probabilities are fixed after
training, but where to cut them into instances depends on the data (on DSB 2018 the defaults
merge touching nuclei). Probabilities are computed once per image; each grid point only reruns
the watershed, so an exhaustive grid is cheap and needs no Optuna. Grid points are scored in
``workers`` processes (joblib/loky, which memory-maps the probability maps rather than copying
them): the result does not depend on the number of workers.

One grid serves every family (``params.cells.post_grid``): points that read the predicted
distance (:func:`~microseg.infer.watershed.needs_distance`) are skipped for models whose maps
have no distance channel, so adding ``predicted_distance`` to the grid leaves a 3-class U-Net's
search exactly as it was.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace

import numpy as np
import pandas as pd

from microseg.errors import ConfigError
from microseg.evaluate.instances import image_scores, threshold_key
from microseg.evaluate.rates import prf
from microseg.infer.watershed import (
    KNOBS,
    PostprocessConfig,
    needs_distance,
    probs_to_instances,
)
from microseg.utils.convert import to_builtin

log = logging.getLogger(__name__)


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    names = set(KNOBS)
    unknown = sorted(set(grid) - names)
    if unknown:
        raise ConfigError(f"unknown post-processing keys {unknown}; known: {sorted(names)}")
    keys = sorted(grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def pooled_f1(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    cfg: PostprocessConfig,
    threshold: float = 0.5,
) -> tuple[float, int, int, int]:
    """``(F1, TP, FP, FN)`` at IoU ``threshold`` with TP/FP/FN summed over the images."""
    key = threshold_key(threshold)
    tp = fp = fn = 0
    for p, gt in zip(probs, gts, strict=True):
        s = image_scores(gt, probs_to_instances(p, cfg), (threshold,), dsb_thresholds=(),
                         with_rand=False)  # fmt: skip
        tp, fp, fn = tp + s[f"tp_{key}"], fp + s[f"fp_{key}"], fn + s[f"fn_{key}"]
    return prf(tp, fp, fn, empty=0.0).f1, tp, fp, fn


def _score_chunk(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    cfgs: Sequence[PostprocessConfig],
    threshold: float,
) -> list[tuple[float, int, int, int]]:
    return [pooled_f1(probs, gts, cfg, threshold) for cfg in cfgs]


def _score_all(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    cfgs: list[PostprocessConfig],
    threshold: float,
    workers: int,
) -> list[tuple[float, int, int, int]]:
    """Pooled F1 of every config, in order; chunks of configs go to ``workers`` processes."""
    workers = max(1, min(workers, len(cfgs)))
    if workers == 1:
        return _score_chunk(probs, gts, cfgs, threshold)
    from joblib import Parallel, delayed

    size = -(-len(cfgs) // (4 * workers))  # about 4 chunks per worker, in grid order
    chunks = [cfgs[i : i + size] for i in range(0, len(cfgs), size)]
    parts = Parallel(n_jobs=workers, backend="loky")(
        delayed(_score_chunk)(list(probs), list(gts), chunk, threshold) for chunk in chunks
    )
    return [score for part in parts for score in part]  # joblib keeps the order


def search_postprocess(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    base: PostprocessConfig,
    grid: Mapping[str, Sequence],
    threshold: float = 0.5,
    workers: int | None = None,
) -> tuple[PostprocessConfig, pd.DataFrame]:
    """The grid point with the best pooled F1 at ``threshold`` (ties: the earliest point, with
    ``base`` itself first so an unhelpful grid changes nothing) and the table of all points.
    ``workers`` processes score the points (default: every core)."""
    if len(probs) != len(gts) or not probs:
        raise ConfigError("post-processing search needs validation images with labels")
    points = [{}, *grid_points(grid)]
    has_distance = all(np.shape(p)[0] == 4 for p in probs)
    cfgs = []
    for point in points:
        cfg = replace(base, **point)
        if point and needs_distance(cfg) and not has_distance:
            continue  # a distance setting for maps without a distance channel
        cfgs.append(cfg)
    scores = _score_all(probs, gts, cfgs, threshold, workers or os.cpu_count() or 1)
    rows = [
        {**{k: getattr(cfg, k) for k in KNOBS}, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
        for cfg, (f1, tp, fp, fn) in zip(cfgs, scores, strict=True)
    ]
    table = pd.DataFrame(rows)
    best = int(np.argmax(table["f1"].to_numpy()))  # first maximum
    chosen = replace(base, **{k: to_builtin(table.iloc[best][k]) for k in KNOBS})
    log.info("post-processing on validation: F1 %.4f (base %.4f) with %s",
             table["f1"].iloc[best], table["f1"].iloc[0], asdict(chosen))  # fmt: skip
    return chosen, table


def search_by_modality(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    kinds: Sequence[str],
    chosen: PostprocessConfig,
    grid: Mapping[str, Sequence],
    min_images: int,
    threshold: float = 0.5,
    workers: int | None = None,
) -> tuple[PostprocessConfig, pd.DataFrame]:
    """``chosen`` with ``by_modality``: for each image kind with at least ``min_images`` of
    the given images, the grid point best on that kind's images alone, kept where it differs
    from ``chosen`` (which is searched first, so a tie keeps it); plus every kind's table (a
    ``modality`` column). Kinds with fewer images keep ``chosen``."""
    if not (len(probs) == len(gts) == len(kinds)):
        raise ConfigError("post-processing search: one image kind per validation image")
    shared = chosen.for_modality(None)
    overrides: dict[str, dict] = {}
    tables = []
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if len(idx) < min_images:
            log.info("post-processing: %d %s validation images (< %d), the shared choice",
                     len(idx), kind, min_images)  # fmt: skip
            continue
        best, table = search_postprocess(
            [probs[i] for i in idx], [gts[i] for i in idx], shared, grid, threshold, workers
        )
        tables.append(table.assign(modality=kind, n_images=len(idx)))
        knobs = {k: getattr(best, k) for k in KNOBS if getattr(best, k) != getattr(shared, k)}
        if knobs:
            overrides[kind] = knobs
            log.info("post-processing for %s: F1 %.4f (shared %.4f) with %s",
                     kind, table["f1"].max(), table["f1"].iloc[0], knobs)  # fmt: skip
    columns = [*KNOBS, "f1", "tp", "fp", "fn", "modality", "n_images"]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    return replace(shared, by_modality=overrides), table
