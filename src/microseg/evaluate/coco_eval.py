"""COCO AP/AR of instance label images, scored by pycocotools' ``COCOeval`` (segm and bbox).

GT label images become a COCO ground-truth set and predicted label images (with one score per
instance) COCO results, both through :mod:`microseg.io.coco` (compressed RLE, so masks are
exact), and ``COCOeval`` scores them: AP averaged over IoU 0.50:0.05:0.95, AP50, AP75,
AP small/medium/large and AR at each ``maxDets``.

Choices, and why:

- ``maxDets`` defaults to ``(1, 10, 1000)``, not COCO's ``(1, 10, 100)``: a DSB 2018 image
  holds up to ~200 annotated nuclei here (and several hundred in the stage-2 set), so a cap
  of 100 detections per image would silently turn every nucleus past the 100th into a miss.
- The summary numbers are read from ``COCOeval.eval`` by :func:`_stats`, not from
  ``COCOeval.summarize()``: ``summarize`` asks for AP at a hard-coded ``maxDets=100`` and
  returns -1 as soon as 100 is not in the list. With the default ``(1, 10, 100)`` our numbers
  equal ``summarize()``'s (tested). Undefined entries (e.g. APl without large objects) are
  NaN rather than COCO's -1, so means over models and images stay honest.
- Area ranges are COCO's (small < 32², medium < 96², large) unless given: most nuclei are small
  or medium. GT ``area`` is the mask area; segm results get their mask area and bbox results
  ``w * h`` (what ``COCO.loadRes`` assigns in each case).
- Results are loaded separately per IoU type (segm without ``bbox``, bbox without
  ``segmentation``), since ``loadRes`` would otherwise give segm detections their box area.
- Instances without a score get ``default_score`` (1.0): ties keep label order (COCOeval
  sorts stably), which makes AP of a score-less classical method well defined but arbitrary
  in its ranking; F1 at fixed IoU (:mod:`microseg.evaluate.instances`) ignores scores.
- pycocotools prints progress; it goes to this module's debug log instead.

``faster-coco-eval`` is not a dependency; ``benchmarks/bench_coco_eval.py`` compares with it
only when it happens to be importable.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from microseg.errors import MicrosegError
from microseg.evaluate.instances import InstanceSample
from microseg.io.coco import labels_to_coco, labels_to_coco_results

logger = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
DEFAULT_MAX_DETS: tuple[int, int, int] = (1, 10, 1000)


def stat_names(max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> tuple[str, ...]:
    """Names of the 12 COCO summary numbers, the three AR ones after ``max_dets``."""
    m = tuple(int(v) for v in max_dets)
    return ("AP", "AP50", "AP75", "APs", "APm", "APl", f"AR{m[0]}", f"AR{m[1]}", f"AR{m[2]}",
            "ARs", "ARm", "ARl")  # fmt: skip


@dataclass(frozen=True)
class CocoData:
    """A COCO GT dict, the results list, and the COCO image id of each sample id."""

    gt: dict[str, Any]
    results: list[dict[str, Any]]
    image_ids: dict[str, int]


@dataclass
class CocoEvaluation:
    """Summary numbers of one IoU type plus the evaluated ``COCOeval`` (for matches)."""

    iou_type: str
    stats: dict[str, float]
    cocoeval: COCOeval
    image_ids: dict[str, int]

    def match_counts(self, iou_threshold: float = 0.5) -> pd.DataFrame:
        """Per-image TP/FP/FN of COCOeval's own greedy matching (see :func:`match_counts`)."""
        return match_counts(self.cocoeval, iou_threshold, self.image_ids)


def _quiet(func, *args, **kwargs):
    """Run a pycocotools call with its prints sent to the debug log."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = func(*args, **kwargs)
    text = buf.getvalue().strip()
    if text:
        logger.debug("pycocotools: %s", text.replace("\n", " | "))
    return out


def to_coco(samples: Iterable[InstanceSample], default_score: float = 1.0) -> CocoData:
    """GT dict and results list of samples; COCO image ids are 1..N in sample order."""
    gts: list[tuple[int, str, np.ndarray]] = []
    results: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}
    for s in samples:
        sid = str(s.image_id)
        if sid in image_ids:
            raise MicrosegError(f"duplicate image id {sid!r}")
        if np.shape(s.gt) != np.shape(s.pred) or np.ndim(s.gt) != 2:
            raise MicrosegError(
                f"image {sid}: GT and prediction must be 2D of one shape; found "
                f"{np.shape(s.gt)} and {np.shape(s.pred)}"
            )
        image_id = len(image_ids) + 1
        image_ids[sid] = image_id
        gts.append((image_id, sid, np.asarray(s.gt)))
        pred = np.asarray(s.pred)
        scores: Mapping[int, float]
        if s.scores is None:
            scores = {int(v): default_score for v in np.unique(pred) if v != 0}
        else:
            scores = {int(k): float(v) for k, v in s.scores.items()}
        results.extend(labels_to_coco_results(image_id, pred, scores))
    if not image_ids:
        raise MicrosegError("no samples to evaluate")
    return CocoData(labels_to_coco(gts, mode="rle"), results, image_ids)


def _results_for(iou_type: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = {"segm": ("bbox", "area"), "bbox": ("segmentation", "area")}[iou_type]
    return [{k: copy.copy(v) for k, v in r.items() if k not in drop} for r in results]


def _load_results(coco_gt: COCO, anns: list[dict[str, Any]]) -> COCO:
    if anns:
        return _quiet(coco_gt.loadRes, anns)
    dt = COCO()  # loadRes cannot take an empty list
    dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    _quiet(dt.createIndex)
    return dt


def _stats(E: COCOeval) -> list[float]:
    """The 12 numbers of ``COCOeval.summarize`` for the configured ``maxDets``; NaN if none."""
    p = E.params

    def one(ap: bool, iou: float | None = None, area: str = "all", max_det: int = 0) -> float:
        a = p.areaRngLbl.index(area)
        m = list(p.maxDets).index(max_det)
        s = E.eval["precision"] if ap else E.eval["recall"]
        if iou is not None:
            t = np.flatnonzero(np.isclose(p.iouThrs, iou))
            s = s[t]
        s = s[..., a, m]
        s = s[s > -1]
        return float(s.mean()) if s.size else math.nan

    m0, m1, m2 = p.maxDets[0], p.maxDets[1], p.maxDets[-1]
    return [
        one(True, max_det=m2),
        one(True, 0.5, max_det=m2),
        one(True, 0.75, max_det=m2),
        one(True, area="small", max_det=m2),
        one(True, area="medium", max_det=m2),
        one(True, area="large", max_det=m2),
        one(False, max_det=m0),
        one(False, max_det=m1),
        one(False, max_det=m2),
        one(False, area="small", max_det=m2),
        one(False, area="medium", max_det=m2),
        one(False, area="large", max_det=m2),
    ]


def run_cocoeval(
    data: CocoData,
    iou_type: str = "segm",
    *,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    area_ranges: Sequence[tuple[float, float]] | None = None,
) -> CocoEvaluation:
    """Evaluate, accumulate and summarise one IoU type of prepared COCO data."""
    if iou_type not in IOU_TYPES:
        raise MicrosegError(f"iou_type must be one of {IOU_TYPES}; found {iou_type!r}")
    max_dets = tuple(sorted(int(v) for v in max_dets))
    if len(max_dets) != 3 or max_dets[0] < 1:
        raise MicrosegError(f"max_dets must be three positive counts; found {max_dets}")
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(data.gt)
    _quiet(coco_gt.createIndex)
    coco_dt = _load_results(coco_gt, _results_for(iou_type, data.results))
    E = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    E.params.maxDets = list(max_dets)
    if area_ranges is not None:
        if len(area_ranges) != 3:
            raise MicrosegError("area_ranges must give (lo, hi) for small, medium and large")
        E.params.areaRng = [[0, 1e10], *([float(lo), float(hi)] for lo, hi in area_ranges)]
    _quiet(E.evaluate)
    _quiet(E.accumulate)
    stats = dict(zip(stat_names(max_dets), _stats(E), strict=True))
    return CocoEvaluation(iou_type, stats, E, dict(data.image_ids))


def coco_evaluate(
    samples: Iterable[InstanceSample],
    iou_types: Sequence[str] = IOU_TYPES,
    *,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    area_ranges: Sequence[tuple[float, float]] | None = None,
    default_score: float = 1.0,
) -> dict[str, CocoEvaluation]:
    """COCO segm and/or bbox evaluation of label-image samples: ``iou_type -> result``."""
    data = to_coco(samples, default_score)
    out = {t: run_cocoeval(data, t, max_dets=max_dets, area_ranges=area_ranges) for t in iou_types}
    for t, r in out.items():
        logger.info("COCO %s: AP %.4f AP50 %.4f AP75 %.4f", t, r.stats["AP"], r.stats["AP50"],
                    r.stats["AP75"])  # fmt: skip
    return out


def coco_metrics(results: Mapping[str, CocoEvaluation]) -> dict[str, float]:
    """Flat ``{iou_type}_{stat}`` metrics, e.g. ``segm_AP``, ``bbox_AP50``."""
    return {f"{t}_{k}": v for t, r in results.items() for k, v in r.stats.items()}


def match_counts(
    E: COCOeval, iou_threshold: float = 0.5, image_ids: Mapping[str, int] | None = None
) -> pd.DataFrame:
    """Per-image TP, FP, FN of COCOeval's greedy score-ordered matching at one IoU threshold.

    Read from ``evalImgs`` for area range ``all`` and the largest ``maxDets``; ignored
    detections are left out. ``image_id`` is the sample id when ``image_ids`` is given.
    """
    p = E.params
    t = np.flatnonzero(np.isclose(p.iouThrs, iou_threshold))
    if t.size != 1:
        raise MicrosegError(f"IoU threshold {iou_threshold} not among COCOeval's {p.iouThrs}")
    t = int(t[0])
    back = {v: k for k, v in (image_ids or {}).items()}
    a_all = [list(r) for r in p.areaRng].index(list(p.areaRng[p.areaRngLbl.index("all")]))
    n_img = len(p.imgIds)
    rows = []
    for k, img in enumerate(p.imgIds):
        e = E.evalImgs[a_all * n_img + k]  # one category: (area, image) order
        if e is None:
            tp = fp = fn = 0
        else:
            dt_ig = np.asarray(e["dtIgnore"], bool).reshape(len(p.iouThrs), -1)[t]
            matched = np.asarray(e["dtMatches"]).reshape(len(p.iouThrs), -1)[t] > 0
            gt_ig = np.asarray(e["gtIgnore"], bool)
            tp = int(np.count_nonzero(matched & ~dt_ig))
            fp = int(np.count_nonzero(~matched & ~dt_ig))
            fn = int(np.count_nonzero(~gt_ig)) - tp
        rows.append({"image_id": back.get(img, img), "tp": tp, "fp": fp, "fn": fn})
    return pd.DataFrame(rows, columns=["image_id", "tp", "fp", "fn"])
