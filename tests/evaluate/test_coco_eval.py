"""COCO AP through pycocotools: known values, summarize() agreement, maxDets, TP cross-check."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from microseg.errors import MicrosegError
from microseg.evaluate.coco_eval import (
    coco_evaluate,
    coco_metrics,
    match_counts,
    run_cocoeval,
    stat_names,
    to_coco,
)
from microseg.evaluate.instances import InstanceSample, image_scores


def grid_of_squares(n: int, side: int = 8, gap: int = 3, shape=(72, 72)) -> np.ndarray:
    out = np.zeros(shape, np.uint16)
    per_row = shape[1] // (side + gap)
    for k in range(n):
        y, x = divmod(k, per_row)
        y0, x0 = y * (side + gap), x * (side + gap)
        out[y0 : y0 + side, x0 : x0 + side] = k + 1
    return out


def perturbed(gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, float]]:
    """Each square shifted/shrunk/grown a little, some dropped, a few false positives."""
    pred = np.zeros_like(gt)
    scores: dict[int, float] = {}
    label = 0
    for v in np.unique(gt)[1:]:
        ys, xs = np.nonzero(gt == v)
        if rng.random() < 0.15:
            continue
        d = rng.integers(-1, 2, 4) * (rng.random() < 0.6)  # 40 % exact
        y0, y1 = ys.min() + d[0], ys.max() + 1 + d[1]
        x0, x1 = xs.min() + d[2], xs.max() + 1 + d[3]
        label += 1
        pred[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = label
        scores[label] = float(rng.random())
    for _ in range(2):
        y, x = rng.integers(0, gt.shape[0] - 4, 2)
        if not pred[y : y + 4, x : x + 4].any():
            label += 1
            pred[y : y + 4, x : x + 4] = label
            scores[label] = float(rng.random() * 0.5)
    present = set(np.unique(pred).tolist())
    return pred, {k: v for k, v in scores.items() if k in present}


def dataset(seed: int = 0, n_images: int = 6) -> list[InstanceSample]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_images):
        gt = grid_of_squares(int(rng.integers(5, 37)))
        pred, scores = perturbed(gt, rng)
        out.append(InstanceSample(f"im{k}", gt, pred, scores))
    return out


def test_ground_truth_against_itself_scores_one():
    rng = np.random.default_rng(1)
    samples = [
        InstanceSample(s.image_id, s.gt, s.gt, {int(v): float(rng.random()) for v in range(1, 99)})
        for s in dataset(1)
    ]
    res = coco_evaluate(samples)
    for iou_type in ("segm", "bbox"):
        st = res[iou_type].stats
        for key in ("AP", "AP50", "AP75", "AR1000", "APs"):
            assert st[key] == pytest.approx(1.0), (iou_type, key)
        assert math.isnan(st["APl"])  # no large objects: undefined, not -1


def test_hand_made_case_with_known_ap():
    gt = np.zeros((64, 64), np.uint16)
    gt[:10, :10], gt[20:30, 20:30], gt[40:50, 5:15] = 1, 2, 3
    pred = np.zeros_like(gt)
    pred[:10, :10], pred[50:60, 50:60], pred[20:30, 20:30] = 1, 2, 3  # TP, FP, TP; GT 3 missed
    res = coco_evaluate([InstanceSample("a", gt, pred, {1: 0.9, 2: 0.8, 3: 0.7})])
    # P/R after each detection: (1, 1/3), (1/2, 1/3), (2/3, 2/3). Interpolated precision is 1
    # for the 34 recall points 0..0.33, 2/3 for the 33 points 0.34..0.66, 0 beyond.
    want = (34 * 1 + 33 * 2 / 3) / 101
    for iou_type in ("segm", "bbox"):
        st = res[iou_type].stats
        assert st["AP"] == pytest.approx(want) and st["AP50"] == pytest.approx(want)
        assert st["AR1"] == pytest.approx(1 / 3) and st["AR10"] == pytest.approx(2 / 3)


def test_segm_equals_bbox_on_axis_aligned_rectangles():
    res = coco_evaluate(dataset(2))
    segm, bbox = res["segm"].stats, res["bbox"].stats
    assert 0.2 < segm["AP"] < 0.95  # not a trivial case
    for key in segm:
        if math.isnan(segm[key]):
            assert math.isnan(bbox[key])
        else:
            assert segm[key] == pytest.approx(bbox[key], abs=1e-12), key


def test_stats_equal_summarize_with_default_max_dets():
    data = to_coco(dataset(3))
    ev = run_cocoeval(data, "segm", max_dets=(1, 10, 100))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.cocoeval.summarize()
    want = [math.nan if v == -1 else v for v in ev.cocoeval.stats]
    got = [ev.stats[k] for k in stat_names((1, 10, 100))]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_more_than_100_nuclei_need_the_raised_max_dets():
    gt = grid_of_squares(150, side=4, gap=2, shape=(96, 96))
    assert len(np.unique(gt)) - 1 == 150
    s = [InstanceSample("crowded", gt, gt, {v: 1.0 - v / 1000 for v in range(1, 151)})]
    capped = coco_evaluate(s, ["segm"], max_dets=(1, 10, 100))["segm"].stats
    full = coco_evaluate(s, ["segm"])["segm"].stats
    assert capped["AR100"] == pytest.approx(100 / 150)
    assert full["AR1000"] == pytest.approx(1.0) and full["AP"] == pytest.approx(1.0)
    assert capped["AP"] < 0.7


@pytest.mark.parametrize("t", [0.5, 0.7, 0.9])
def test_coco_tp_counts_equal_our_matching(t: float):
    samples = dataset(4, n_images=8)
    ev = coco_evaluate(samples, ["segm"])["segm"]
    counts = ev.match_counts(t).set_index("image_id")
    key = f"{round(t * 100)}"
    total = 0
    for s in samples:
        row = image_scores(s.gt, s.pred, [t], with_rand=False)
        got = counts.loc[s.image_id]
        assert (got["tp"], got["fp"], got["fn"]) == (
            row[f"tp_{key}"],
            row[f"fp_{key}"],
            row[f"fn_{key}"],
        ), (s.image_id, t)
        total += row[f"tp_{key}"]
    assert total > 15


def test_empty_predictions_and_missing_scores():
    gt = grid_of_squares(5)
    empty = np.zeros_like(gt)
    res = coco_evaluate([InstanceSample("a", gt, empty)])
    assert res["segm"].stats["AP"] == 0.0 and res["bbox"].stats["AR1000"] == 0.0
    half = coco_evaluate([InstanceSample("a", gt, gt), InstanceSample("b", gt, empty)])
    assert 0.0 < half["segm"].stats["AP"] < 1.0
    counts = half["segm"].match_counts(0.5)
    assert counts.to_dict("list") == {
        "image_id": ["a", "b"], "tp": [5, 0], "fp": [0, 0], "fn": [0, 5]
    }  # fmt: skip
    flat = coco_metrics(half)
    assert {"segm_AP", "bbox_AP75", "segm_AR1000"} <= set(flat)


def test_errors():
    gt = grid_of_squares(3)
    with pytest.raises(MicrosegError, match="duplicate"):
        to_coco([InstanceSample("a", gt, gt), InstanceSample("a", gt, gt)])
    with pytest.raises(MicrosegError, match="iou_type"):
        run_cocoeval(to_coco([InstanceSample("a", gt, gt)]), "keypoints")
    with pytest.raises(MicrosegError, match="not among"):
        match_counts(coco_evaluate([InstanceSample("a", gt, gt)])["segm"].cocoeval, 0.52)
    with pytest.raises(MicrosegError, match="no score"):
        to_coco([InstanceSample("a", gt, gt, {1: 0.5})])
