"""Fusion of YOLO spine boxes with Probabilistic U-Net spine probabilities.

YOLO finds spines; the Prob-UNet spine probability map only *validates* the uncertain ones
(the behaviour of DeepD3.V2's ``yolo_prob_fusion.py``). For each box, by its YOLO score ``s``:

* ``s >= high_conf`` -> kept as ``high``; its score stays ``s``;
* ``s < low_conf`` -> ``rejected_low_yolo``;
* otherwise the Prob-UNet probability aggregated over the box, ``p``
  (:func:`box_probability`), decides: ``p >= punet_thr`` -> kept as ``validated`` with the
  fused score ``(w_yolo * s + w_punet * p) / (w_yolo + w_punet)``; else ``rejected_no_punet``.

The kept boxes are then merged across planes in nanometres (:func:`microseg.infer.dedup.dedup_3d`).

Box convention (as :mod:`microseg.infer.yolo_predict`): ``x1, y1, x2, y2`` are pixel-edge
coordinates; a box covers the pixels whose centre lies in ``[x1, x2) x [y1, y2)`` (for integer
boxes: columns ``x1 <= c < x2``), at least the one pixel nearest its corner when it is thinner
than a pixel, clipped to the image. A box wholly outside the image has probability 0. The point
a box stands for is its centre in voxel-centre coordinates, ``(x1 + x2)/2 - 0.5``.

Box aggregation never loops over pixels: ``mean`` reads a summed-area table (one per plane,
built once; O(1) per box); ``max`` is one slice reduction per box (a loop over boxes, each a
single numpy call); ``quantile`` gathers all boxes of a plane into one padded ``(n, h, w)`` block
of windows of a strided view (chunked, boxes sorted by area so one huge box does not pad the
rest) and sorts it once. The quantile uses numpy's default (linear) interpolation, so it equals
``np.quantile`` on the box's slice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from microseg.errors import AnnotationError, ConfigError, ShapeMismatchError
from microseg.evaluate.points import evaluate_points
from microseg.infer.dedup import dedup_3d
from microseg.utils.atomic import atomic_path, write_text
from microseg.utils.convert import jsonable
from microseg.utils.units import VoxelSize

log = logging.getLogger(__name__)

Agg = Literal["mean", "max", "quantile"]
AGGS: tuple[str, ...] = ("mean", "max", "quantile")
STATUSES: tuple[str, ...] = ("high", "validated", "rejected_low_yolo", "rejected_no_punet")
KEPT_STATUSES: tuple[str, ...] = ("high", "validated")
BOX_COLS = ["x1", "y1", "x2", "y2"]
INPUT_COLS = ["z", *BOX_COLS, "score"]
RAW_COLS = ["z", *BOX_COLS, "x", "y", "yolo_score", "punet_prob", "score", "status"]
DEDUP_COLS = ["z", *BOX_COLS, "score", "status"]
STAT_KEYS = (
    "yolo_total",
    "kept_high_conf",
    "kept_validated",
    "rejected_low_yolo",
    "rejected_no_punet",
)

#: ``results.json`` keys of DeepD3.V2's ``yolo_prob_fusion.py`` -> ours: written beside ours
#: with the same values, so tools reading the seed's file read ours too
SEED_RESULT_ALIASES: dict[str, str] = {"f1_score": "f1", "parameters": "params"}
#: the seed's command-line names of our :class:`FusionParams` (its ``parameters`` entries)
SEED_PARAM_NAMES: dict[str, str] = {
    "yolo_high_conf": "high_conf",
    "yolo_low_conf": "low_conf",
    "punet_validation": "punet_thr",
    "weight_yolo": "w_yolo",
    "weight_punet": "w_punet",
    "dedup_nm": "dedup_radius_nm",
}

#: Elements of one padded gather block in :func:`box_probability` (``quantile``).
GATHER_BUDGET = 1 << 22


class PlaneSource(Protocol):
    """A lazy ``ZYX`` stack (e.g. :class:`microseg.io.tiff.TiffStack`)."""

    shape: tuple[int, ...]

    def plane(self, z: int) -> np.ndarray: ...


@dataclass(frozen=True)
class FusionParams:
    """Knobs of :func:`fuse` (defaults: DeepD3.V2's, with a 1.5 µm de-duplication radius)."""

    high_conf: float = 0.50
    low_conf: float = 0.08
    punet_thr: float = 0.35
    w_yolo: float = 0.45
    w_punet: float = 0.55
    agg: Agg = "mean"
    quantile: float = 0.9
    dedup_radius_nm: float = 1500.0
    dedup_mode: Literal["nms", "cluster"] = "nms"

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"fusion params: {what}; found {self!r}")

        for name in ("high_conf", "low_conf", "punet_thr", "quantile"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise bad(f"{name} must be a number in [0, 1]")
        if self.low_conf > self.high_conf:
            raise bad("low_conf must not exceed high_conf")
        if not (self.w_yolo >= 0 and self.w_punet >= 0 and self.w_yolo + self.w_punet > 0):
            raise bad("w_yolo and w_punet must be >= 0 with a positive sum")
        if self.agg not in AGGS:
            raise bad(f"agg must be one of {AGGS}")
        if not (math.isfinite(self.dedup_radius_nm) and self.dedup_radius_nm >= 0):
            raise bad("dedup_radius_nm must be a finite number >= 0")
        if self.dedup_mode not in ("nms", "cluster"):
            raise bad("dedup_mode must be 'nms' or 'cluster'")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusionParams:
        """From a mapping (e.g. ``params/tuned_fusion.yaml``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"fusion params: unknown key(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FusionResult:
    """``raw``: every YOLO box with its decision (:data:`RAW_COLS`; ``score`` is NaN for rejected
    boxes); ``dedup``: the kept boxes after 3D de-duplication (:data:`DEDUP_COLS` plus centres
    ``x, y`` in voxels and ``n_merged``), best first; ``stats``: counts per decision
    (:data:`STAT_KEYS`, which add up to ``yolo_total``) plus ``kept_after_dedup``."""

    raw: pd.DataFrame
    dedup: pd.DataFrame
    stats: dict[str, int]
    params: FusionParams = field(default_factory=FusionParams)


# --------------------------------------------------------------------------- box probability


def box_pixel_bounds(
    detections: pd.DataFrame, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer pixel ranges ``r0:r1, c0:c1`` of each box (see module notes), clipped."""
    x1, y1, x2, y2 = (detections[c].to_numpy(dtype=float) for c in BOX_COLS)
    c0 = np.ceil(x1 - 0.5).astype(np.int64)
    c1 = np.maximum(np.ceil(x2 - 0.5).astype(np.int64), c0 + 1)
    r0 = np.ceil(y1 - 0.5).astype(np.int64)
    r1 = np.maximum(np.ceil(y2 - 0.5).astype(np.int64), r0 + 1)
    return (
        np.clip(r0, 0, height),
        np.clip(r1, 0, height),
        np.clip(c0, 0, width),
        np.clip(c1, 0, width),
    )


def integral_image(plane: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: ``S[r, c] = plane[:r, :c].sum()``."""
    sat = np.zeros((plane.shape[0] + 1, plane.shape[1] + 1), dtype=np.float64)
    np.cumsum(plane, axis=1, dtype=np.float64, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=0, out=sat[1:, 1:])
    return sat


def _box_mean(plane: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    sat = integral_image(plane)
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    return total / area


def _box_max(plane: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    """Per-box slice max: one C-level reduction per box (measured faster than a padded gather,
    whose copy costs more than the loop it saves; see benchmarks/bench_box_probability.py)."""
    return np.fromiter(
        (
            plane[a:b, c:d].max()
            for a, b, c, d in zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist(), strict=True)
        ),
        dtype=np.float64,
        count=len(r0),
    )


def _box_quantile(plane: np.ndarray, r0, r1, c0, c1, q: float) -> np.ndarray:
    """Linear-interpolated quantile per box, from padded ``(n, h, w)`` gathers."""
    h, w = r1 - r0, c1 - c0
    out = np.empty(len(r0), dtype=np.float64)
    order = np.argsort(h * w, kind="stable")
    pos = 0
    while pos < len(order):
        rest = order[pos:]
        cost = (
            np.arange(1, len(rest) + 1)
            * np.maximum.accumulate(h[rest])
            * np.maximum.accumulate(w[rest])
        )
        n = max(1, int(np.searchsorted(cost, GATHER_BUDGET, side="right")))
        idx = rest[:n]
        pos += n
        hm, wm = int(h[idx].max()), int(w[idx].max())
        # every box's top-left (hm, wm) window at once, from a strided view of the padded plane
        windows = sliding_window_view(np.pad(plane, ((0, hm), (0, wm))), (hm, wm))
        vals = windows[r0[idx], c0[idx]].astype(np.float64)
        valid = (np.arange(hm) < h[idx, None])[:, :, None] & (np.arange(wm) < w[idx, None])[
            :, None, :
        ]
        # numpy's "linear" quantile: sorted values, position q * (count - 1)
        s = np.sort(np.where(valid, vals, np.inf).reshape(n, -1), axis=1)
        count = (h[idx] * w[idx]).astype(np.float64)
        p = q * (count - 1)
        lo = np.floor(p).astype(np.int64)
        hi = np.minimum(lo + 1, count.astype(np.int64) - 1)
        a = s[np.arange(n), lo]
        b = s[np.arange(n), hi]
        out[idx] = a + (b - a) * (p - lo)
    return out


def _get_plane(prob: np.ndarray | PlaneSource, z: int) -> np.ndarray:
    plane = prob.plane(z) if hasattr(prob, "plane") else prob[z]
    return np.asarray(plane)


def box_probability(
    prob_plane_or_stack: np.ndarray | PlaneSource,
    detections: pd.DataFrame,
    agg: Agg = "mean",
    quantile: float = 0.9,
) -> np.ndarray:
    """Prob-UNet probability aggregated over each box: one float per row of ``detections``.

    ``prob_plane_or_stack`` is one ``YX`` plane (every box is read on it; ``z`` is ignored) or a
    ``ZYX`` array / lazy stack with ``.plane(z)`` (each box on its plane ``z``; planes are read
    once each, only those that hold boxes). ``agg``: ``mean``, ``max`` or ``quantile`` (at
    ``quantile``). Boxes wholly outside the image get 0.
    """
    if agg not in AGGS:
        raise ConfigError(f"box aggregation must be one of {AGGS}; found {agg!r}")
    missing = [c for c in BOX_COLS if c not in detections.columns]
    if missing:
        raise AnnotationError(
            f"detections need box columns {BOX_COLS}; missing {missing}, "
            f"found {list(detections.columns)}"
        )
    out = np.zeros(len(detections), dtype=np.float64)
    if len(detections) == 0:
        return out
    shape = tuple(int(s) for s in prob_plane_or_stack.shape)
    if len(shape) == 2:
        groups: list[tuple[int | None, np.ndarray]] = [(None, np.arange(len(detections)))]
    elif len(shape) == 3:
        if "z" not in detections.columns:
            raise AnnotationError("detections on a ZYX stack need a plane column 'z'")
        z = detections["z"].to_numpy()
        zi = np.round(z).astype(np.int64)
        if len(z) and (zi.min() < 0 or zi.max() >= shape[0]):
            raise ShapeMismatchError(
                f"detections lie on planes {int(zi.min())}..{int(zi.max())}, but the probability "
                f"stack has {shape[0]} planes"
            )
        planes, inverse = np.unique(zi, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(planes) + 1))
        groups = [(int(p), order[bounds[k] : bounds[k + 1]]) for k, p in enumerate(planes)]
    else:
        raise ShapeMismatchError(f"probability map must be YX or ZYX; found shape {shape}")
    height, width = shape[-2:]
    r0, r1, c0, c1 = box_pixel_bounds(detections, height, width)
    nonempty = (r1 > r0) & (c1 > c0)
    for z_plane, idx in groups:
        idx = idx[nonempty[idx]]
        if len(idx) == 0:
            continue
        plane = prob_plane_or_stack if z_plane is None else _get_plane(prob_plane_or_stack, z_plane)
        b = (r0[idx], r1[idx], c0[idx], c1[idx])
        if agg == "mean":
            out[idx] = _box_mean(np.asarray(plane), *b)
        elif agg == "max":
            out[idx] = _box_max(np.asarray(plane), *b)
        else:
            out[idx] = _box_quantile(np.asarray(plane), *b, float(quantile))
    return out


# --------------------------------------------------------------------------- decision and fusion


def decide(
    yolo_scores: np.ndarray, punet_probs: np.ndarray, params: FusionParams
) -> tuple[np.ndarray, np.ndarray]:
    """The decision tree on arrays: status strings and final scores (NaN where rejected)."""
    s = np.asarray(yolo_scores, dtype=np.float64)
    p = np.asarray(punet_probs, dtype=np.float64)
    high = s >= params.high_conf
    low = ~high & (s < params.low_conf)
    validated = ~high & ~low & (p >= params.punet_thr)
    status = np.select(
        [high, low, validated], ["high", "rejected_low_yolo", "validated"], "rejected_no_punet"
    ).astype(object)
    fused = (params.w_yolo * s + params.w_punet * p) / (params.w_yolo + params.w_punet)
    score = np.where(high, s, np.where(validated, fused, np.nan))
    return status, score


def _check_detections(detections: pd.DataFrame) -> None:
    missing = [c for c in INPUT_COLS if c not in detections.columns]
    if missing:
        raise AnnotationError(
            f"detections need columns {INPUT_COLS}; missing {missing}, "
            f"found {list(detections.columns)}"
        )


def fuse_with_probabilities(
    detections: pd.DataFrame,
    punet_prob: np.ndarray,
    params: FusionParams,
    voxel_size_nm: VoxelSize,
) -> FusionResult:
    """:func:`fuse` with the box probabilities already computed (one per detection row).

    Lets a caller that tries many parameter sets (the fusion tuner) aggregate each box once.
    """
    _check_detections(detections)
    punet_prob = np.asarray(punet_prob, dtype=np.float64)
    if punet_prob.shape != (len(detections),):
        raise ShapeMismatchError(
            f"need one box probability per detection ({len(detections)}); found shape "
            f"{punet_prob.shape}"
        )
    yolo = detections["score"].to_numpy(dtype=np.float64)
    status, score = decide(yolo, punet_prob, params)
    x1, y1, x2, y2 = (detections[c].to_numpy(dtype=np.float64) for c in BOX_COLS)
    raw = pd.DataFrame(
        {
            "z": detections["z"].to_numpy(),
            "x1": x1,
            "y1": y1,
            "x2": x2,
            "y2": y2,
            "x": (x1 + x2) / 2 - 0.5,
            "y": (y1 + y2) / 2 - 0.5,
            "yolo_score": yolo,
            "punet_prob": punet_prob,
            "score": score,
            "status": status,
        },
        columns=RAW_COLS,
    )
    kept = raw.loc[np.isin(status, KEPT_STATUSES), ["z", *BOX_COLS, "x", "y", "score", "status"]]
    dedup = dedup_3d(kept, voxel_size_nm, params.dedup_radius_nm, mode=params.dedup_mode)
    dedup = dedup[[*DEDUP_COLS, "x", "y", "n_merged"]]
    counts = pd.Series(status).value_counts()
    stats = {
        "yolo_total": len(raw),
        "kept_high_conf": int(counts.get("high", 0)),
        "kept_validated": int(counts.get("validated", 0)),
        "rejected_low_yolo": int(counts.get("rejected_low_yolo", 0)),
        "rejected_no_punet": int(counts.get("rejected_no_punet", 0)),
        "kept_after_dedup": len(dedup),
    }
    return FusionResult(raw=raw, dedup=dedup, stats=stats, params=params)


def fuse(
    detections: pd.DataFrame,
    prob_spine: np.ndarray | PlaneSource,
    params: FusionParams | None = None,
    voxel_size_nm: VoxelSize = (500.0, 94.0, 94.0),
) -> FusionResult:
    """Validate YOLO boxes (``z, x1, y1, x2, y2, score``) with a ``ZYX`` spine probability stack
    (array or lazy stack with ``.plane(z)``), then de-duplicate the kept ones in 3D."""
    params = params or FusionParams()
    _check_detections(detections)
    prob = box_probability(prob_spine, detections, params.agg, params.quantile)
    result = fuse_with_probabilities(detections, prob, params, voxel_size_nm)
    log.info(
        "fusion: %d boxes -> %d high + %d validated -> %d after 3D dedup",
        result.stats["yolo_total"],
        result.stats["kept_high_conf"],
        result.stats["kept_validated"],
        result.stats["kept_after_dedup"],
    )
    return result


def evaluate_fusion(
    result: FusionResult,
    gt_points_df: pd.DataFrame,
    voxel_size_nm: VoxelSize,
    max_dist_nm: float = 1000.0,
) -> dict[str, float | int]:
    """Precision, recall, F1 (and counts) of the de-duplicated boxes' centres vs points."""
    return evaluate_points(result.dedup[["x", "y", "z"]], gt_points_df, voxel_size_nm, max_dist_nm)


def write_fusion_outputs(
    out_dir: str | Path,
    result: FusionResult,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``predictions_raw.csv`` (:data:`RAW_COLS`), ``predictions_dedup.csv``
    (:data:`DEDUP_COLS`) and ``results.json`` (precision, recall, f1 -- null without
    ``metrics`` --, detections, statistics, params, metrics, and the seed's names for them,
    :data:`SEED_RESULT_ALIASES`: ``f1_score``, and ``parameters`` = ``params`` plus the seed's
    option names, :data:`SEED_PARAM_NAMES`), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "raw": out / "predictions_raw.csv",
        "dedup": out / "predictions_dedup.csv",
        "results": out / "results.json",
    }
    with atomic_path(paths["raw"]) as tmp:
        result.raw[RAW_COLS].to_csv(tmp, index=False)
    with atomic_path(paths["dedup"]) as tmp:
        result.dedup[DEDUP_COLS].to_csv(tmp, index=False)
    m = dict(metrics or {})
    summary = {
        "precision": m.get("precision"),
        "recall": m.get("recall"),
        "f1": m.get("f1"),
        "detections": len(result.dedup),
        "detections_before_dedup": int(
            result.stats["kept_high_conf"] + result.stats["kept_validated"]
        ),
        "statistics": result.stats,
        "params": result.params.to_dict(),
        "metrics": m,
    }
    summary.update({seed: summary[ours] for seed, ours in SEED_RESULT_ALIASES.items()})
    params = summary["params"]
    seed_params = {seed: params[ours] for seed, ours in SEED_PARAM_NAMES.items()}
    summary["parameters"] = {**params, **seed_params}
    write_text(paths["results"], json.dumps(jsonable(summary), indent=2) + "\n")
    return paths


__all__: Sequence[str] = (
    "AGGS",
    "DEDUP_COLS",
    "RAW_COLS",
    "SEED_PARAM_NAMES",
    "SEED_RESULT_ALIASES",
    "STATUSES",
    "FusionParams",
    "FusionResult",
    "box_pixel_bounds",
    "box_probability",
    "decide",
    "evaluate_fusion",
    "fuse",
    "fuse_with_probabilities",
    "integral_image",
    "write_fusion_outputs",
)
