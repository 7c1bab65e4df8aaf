"""Instance metrics: sparse IoU, optimal matching against a brute-force oracle, Rand/VOI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import microseg.evaluate.instances as instances_module
from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.calibration import expected_calibration_error
from microseg.evaluate.instances import (
    InstanceSample,
    evaluate_instances,
    image_scores,
    match_instances,
    rand_voi,
    summarize,
    threshold_key,
)
from microseg.evaluate.overlap import foreground_confusion, instance_overlap
from microseg.evaluate.segmentation import confusion


def random_labels(rng: np.random.Generator, shape=(12, 12), n=5, max_side=6) -> np.ndarray:
    """Rectangles painted in order (later ones over earlier), so shapes are irregular."""
    out = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        h, w = rng.integers(2, max_side + 1, 2)
        y, x = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
        out[y : y + h, x : x + w] = k
    return out


def loop_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """IoU by one pair of boolean masks at a time: the obvious, slow way."""
    g_ids = [int(v) for v in np.unique(gt) if v]
    p_ids = [int(v) for v in np.unique(pred) if v]
    iou = np.zeros((len(g_ids), len(p_ids)))
    for i, g in enumerate(g_ids):
        for j, p in enumerate(p_ids):
            a, b = gt == g, pred == p
            iou[i, j] = (a & b).sum() / (a | b).sum()
    return g_ids, p_ids, iou


def oracle_matching(iou: np.ndarray, t: float) -> tuple[int, float]:
    """Every one-to-one matching enumerated: (most pairs with IoU >= t, then largest IoU sum)."""
    n_g, n_p = iou.shape
    best = (0, 0.0)
    if n_g == 0 or n_p == 0:
        return best
    small, large = (n_g, n_p) if n_g <= n_p else (n_p, n_g)
    m = iou if n_g <= n_p else iou.T
    for perm in itertools.permutations(range(large), small):
        vals = [m[i, j] for i, j in enumerate(perm) if m[i, j] >= t]
        cand = (len(vals), float(sum(vals)))
        if cand[0] > best[0] or (cand[0] == best[0] and cand[1] > best[1] + 1e-12):
            best = cand
    return best


def test_iou_matrix_matches_pairwise_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        gt, pred = random_labels(rng), random_labels(rng)
        pred[pred > 0] = pred[pred > 0] * 97 + 3  # sparse, non-contiguous ids
        ov = instance_overlap(gt, pred)
        g_ids, p_ids, want = loop_iou(gt, pred)
        assert ov.gt_ids.tolist() == g_ids and ov.pred_ids.tolist() == p_ids
        np.testing.assert_allclose(ov.iou_matrix(), want, rtol=0, atol=1e-15)
        assert ov.contingency().sum() == gt.size


def test_large_label_values_take_the_unique_path_with_same_result():
    rng = np.random.default_rng(1)
    gt, pred = random_labels(rng, (20, 20), 6), random_labels(rng, (20, 20), 6)
    big = np.where(pred > 0, pred.astype(np.uint32) * 400_000_000, 0).astype(np.uint32)
    a, b = instance_overlap(gt, pred), instance_overlap(gt, big)
    np.testing.assert_array_equal(a.iou_matrix(), b.iou_matrix())
    assert b.pred_ids.tolist() == sorted({int(v) for v in big.ravel() if v})


@pytest.mark.parametrize("dense_block", [1 << 16, 0], ids=["one-block", "per-component"])
def test_matching_equals_brute_force_oracle_at_many_thresholds(dense_block, monkeypatch):
    monkeypatch.setattr(instances_module, "_DENSE_BLOCK", dense_block)
    rng = np.random.default_rng(2)
    conflicts = 0
    for case in range(150):
        gt = random_labels(rng, (10, 10), int(rng.integers(0, 6)))
        pred = random_labels(rng, (10, 10), int(rng.integers(0, 6)))
        ov = instance_overlap(gt, pred)
        _, _, iou = loop_iou(gt, pred)
        for t in (0.1, 0.25, 0.4, 0.5, 0.7):
            m = match_instances(ov, t)
            want_tp, want_sum = oracle_matching(iou, t)
            assert m.tp == want_tp, (case, t)
            assert math.isclose(float(m.iou.sum()), want_sum, abs_tol=1e-9), (case, t)
            # one-to-one and above the threshold
            assert len(set(m.gt_index.tolist())) == m.tp == len(set(m.pred_index.tolist()))
            assert np.all(m.iou >= t)
            cand = iou >= t
            conflicts += bool((cand.sum(0) > 1).any() or (cand.sum(1) > 1).any())
    assert conflicts > 20  # the Hungarian path was exercised, not only the unique one


def test_greedy_by_iou_would_lose_a_match_that_the_optimum_keeps():
    gt = np.zeros((1, 20), np.uint8)
    gt[0, :10], gt[0, 10:] = 1, 2
    pred = np.zeros_like(gt)
    pred[0, 3:15] = 1  # IoU 7/15 with GT 1, 5/17 with GT 2
    pred[0, :3] = 2  # IoU 3/10 with GT 1
    m = match_instances(instance_overlap(gt, pred), 0.25)
    assert m.tp == 2 and (m.fp, m.fn) == (0, 0)
    np.testing.assert_allclose(sorted(m.iou), [5 / 17, 0.3])


def test_exact_half_tie_is_one_to_one():
    gt = np.zeros((2, 4), np.uint8)
    gt[:] = 1
    pred = np.zeros_like(gt)
    pred[:, :2], pred[:, 2:] = 1, 2  # each IoU exactly 0.5
    m = match_instances(instance_overlap(gt, pred), 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.iou.tolist() == [0.5]


def test_per_threshold_scores_by_hand():
    gt = np.zeros((6, 6), np.uint16)
    gt[:2, :2], gt[3:, 3:] = 1, 5
    pred = np.zeros_like(gt)
    pred[:2, :2], pred[3:, 3:5], pred[3:, 5] = 3, 2, 9  # exact; 6/9 of GT 5; a sliver
    row = image_scores(gt, pred)
    assert (row["tp_50"], row["fp_50"], row["fn_50"]) == (2, 1, 0)
    assert row["f1_50"] == pytest.approx(0.8)
    assert row["dsb_ap_50"] == pytest.approx(2 / 3)
    assert row["mean_iou_50"] == pytest.approx((1 + 2 / 3) / 2)
    assert row["pq_50"] == pytest.approx((1 + 2 / 3) / 2.5)
    assert (row["tp_70"], row["fp_70"], row["fn_70"]) == (1, 2, 1)
    assert row["f1_70"] == pytest.approx(0.4)
    # Kaggle score: TP/(TP+FP+FN) = 2/3 at 0.50..0.65, 1/4 at 0.70..0.95
    assert row["dsb_ap"] == pytest.approx((4 * 2 / 3 + 6 * 0.25) / 10)
    assert row["dice"] == 1.0 and row["px_tp"] == 13


def test_empty_conventions():
    z = np.zeros((5, 5), np.uint8)
    one = z.copy()
    one[1:3, 1:3] = 1
    both = image_scores(z, z)
    assert both["f1_50"] == both["precision_50"] == both["recall_50"] == both["dsb_ap"] == 1.0
    assert both["are"] == 0.0 and both["voi"] == 0.0
    missed = image_scores(one, z)
    assert (missed["precision_50"], missed["recall_50"], missed["f1_50"]) == (0.0, 0.0, 0.0)
    invented = image_scores(z, one)
    assert invented["recall_50"] == 0.0 and invented["precision_50"] == 0.0
    assert math.isnan(invented["are"])


def test_foreground_confusion_equals_pixel_confusion():
    rng = np.random.default_rng(3)
    gt, pred = random_labels(rng, (30, 30), 8), random_labels(rng, (30, 30), 8)
    assert foreground_confusion(gt, pred) == confusion(pred > 0, gt > 0)


def _rand_by_pairs(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Adapted Rand error by counting pixel pairs (GT background dropped), Arganda-Carreras."""
    keep = gt.ravel() != 0
    g, p = gt.ravel()[keep], pred.ravel()[keep]
    n = g.size
    pairs = pd.crosstab(g, p).to_numpy().astype(float)

    def same(counts: np.ndarray) -> float:  # ordered pairs in one segment, self-pairs excluded
        return float((counts * (counts - 1)).sum())

    both = same(pairs.ravel())
    prec = both / same(pairs.sum(0))  # pairs together in the prediction
    rec = both / same(pairs.sum(1))  # pairs together in the GT
    assert n == pairs.sum()
    return 1 - 2 * prec * rec / (prec + rec), prec, rec


def _voi_by_entropy(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(H(pred | GT), H(GT | pred)) in bits from the joint histogram."""
    joint = pd.crosstab(gt.ravel(), pred.ravel()).to_numpy().astype(float) / gt.size

    def h(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    hj = h(joint.ravel())
    return hj - h(joint.sum(1)), hj - h(joint.sum(0))


def test_rand_and_voi_agree_with_independent_formulas_and_skimage_direct():
    from skimage.metrics import adapted_rand_error, variation_of_information

    rng = np.random.default_rng(4)
    for _ in range(10):
        gt, pred = random_labels(rng, (25, 25), 7, 10), random_labels(rng, (25, 25), 9, 10)
        got = rand_voi(gt, pred)
        are, prec, rec = _rand_by_pairs(gt, pred)
        # skimage names the GT-pair ratio "precision"; we return its numbers as they are
        np.testing.assert_allclose(
            [got["are"], got["are_precision"], got["are_recall"]], [are, rec, prec], atol=1e-12
        )
        np.testing.assert_allclose(adapted_rand_error(gt, pred), [are, rec, prec], atol=1e-12)
        split, merge = _voi_by_entropy(gt, pred)
        np.testing.assert_allclose([got["voi_split"], got["voi_merge"]], [split, merge], atol=1e-12)
        np.testing.assert_allclose(variation_of_information(gt, pred), [split, merge], atol=1e-12)


def test_voi_split_and_merge_directions():
    gt = np.zeros((4, 4), np.uint8)
    gt[:, :2], gt[:, 2:] = 1, 2
    merged = np.ones_like(gt)
    r = rand_voi(gt, merged)
    assert r["voi_split"] == 0.0 and r["voi_merge"] == pytest.approx(1.0)
    split = gt.copy()
    split[2:, :2] = 3
    r = rand_voi(gt, split)
    assert r["voi_split"] == pytest.approx(0.5) and r["voi_merge"] == 0.0


def test_summary_micro_and_macro():
    per_image = pd.DataFrame(
        {
            "image_id": ["a", "b"],
            "tp_50": [9, 1], "fp_50": [1, 0], "fn_50": [0, 3],
            "f1_50": [18 / 19, 2 / 5],
            "px_tp": [90, 10], "px_fp": [10, 0], "px_fn": [0, 30], "px_tn": [0, 0],
            "dice": [180 / 190, 20 / 50],
            "are": [0.1, np.nan],
        }
    )  # fmt: skip
    s = summarize(per_image, [0.5])
    assert s["f1_50"] == pytest.approx(20 / 24)  # 2*10 / (2*10 + 1 + 3)
    assert s["precision_50"] == pytest.approx(10 / 11) and s["recall_50"] == pytest.approx(10 / 13)
    assert s["dsb_ap_50"] == pytest.approx(10 / 14)
    assert s["macro_f1_50"] == pytest.approx((18 / 19 + 2 / 5) / 2)
    assert s["dice"] == pytest.approx(200 / 240) and s["are"] == pytest.approx(0.1)


def test_threshold_keys():
    assert [threshold_key(t) for t in (0.5, 0.7, 0.9, 0.75, 0.625, 1.0)] == [
        "50", "70", "90", "75", "62.5", "100"
    ]  # fmt: skip


def test_evaluate_instances_end_to_end():
    rng = np.random.default_rng(6)
    samples = []
    for k in range(4):
        gt = random_labels(rng, (32, 32), 6, 8)
        pred = gt.copy() if k % 2 else random_labels(rng, (32, 32), 6, 8)
        prob = np.clip((pred > 0) * 0.8 + rng.random(gt.shape) * 0.2, 0, 1)
        samples.append(InstanceSample(f"img{k}", gt, pred, prob=prob))
    ev = evaluate_instances(samples)
    assert ev.per_image["image_id"].tolist() == ["img0", "img1", "img2", "img3"]
    assert ev.per_image.loc[1, "f1_90"] == 1.0 and ev.per_image.loc[1, "are"] == 0.0
    tp = ev.per_image["tp_50"].sum()
    assert ev.summary["f1_50"] == pytest.approx(
        2 * tp / (ev.per_image["n_gt"].sum() + ev.per_image["n_pred"].sum())
    )
    probs = np.concatenate([s.prob.ravel() for s in samples])
    fg = np.concatenate([(s.gt > 0).ravel() for s in samples])
    assert ev.summary["ece"] == pytest.approx(expected_calibration_error(probs, fg))
    assert ev.summary["auroc"] == pytest.approx(roc_auc_score(fg, probs), abs=2e-3)
    assert {"precision", "recall", "tp", "fp"} <= set(ev.curves.columns)
    assert len(ev.reliability) == 15


def test_bad_inputs():
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(ShapeMismatchError):
        instance_overlap(a, np.zeros((4, 5), np.uint8))
    with pytest.raises(MicrosegError, match="integer"):
        instance_overlap(a.astype(float), a)
    with pytest.raises(MicrosegError, match="non-negative"):
        instance_overlap(a.astype(np.int8) - 1, a.astype(np.int8))
    with pytest.raises(MicrosegError, match=r"\(0, 1\]"):
        match_instances(instance_overlap(a, a), 0.0)
    with pytest.raises(MicrosegError, match="duplicate"):
        evaluate_instances([InstanceSample("x", a, a), InstanceSample("x", a, a)])
