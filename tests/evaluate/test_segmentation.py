"""Pixel metrics against sklearn, empty-set conventions, threshold sweep, DoG baseline."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as sk_metrics
from scipy import ndimage

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.segmentation import (
    confusion,
    dice,
    iou,
    precision,
    recall,
    segmentation_metrics,
    threshold_sweep,
)


def _pair(seed: int, shape=(6, 40, 50)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
    pred = target ^ (rng.uniform(size=shape) < 0.1)
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    pred, target = _pair(seed)
    p, t = pred.ravel(), target.ravel()
    assert dice(pred, target) == pytest.approx(sk_metrics.f1_score(t, p), abs=1e-12)
    assert iou(pred, target) == pytest.approx(sk_metrics.jaccard_score(t, p), abs=1e-12)
    assert precision(pred, target) == pytest.approx(sk_metrics.precision_score(t, p), abs=1e-12)
    assert recall(pred, target) == pytest.approx(sk_metrics.recall_score(t, p), abs=1e-12)
    tn, fp, fn, tp = sk_metrics.confusion_matrix(t, p).ravel()
    c = confusion(pred, target)
    assert (c.tp, c.fp, c.fn, c.tn) == (tp, fp, fn, tn)
    # Dice and IoU are tied: IoU = D / (2 - D)
    d = dice(pred, target)
    assert iou(pred, target) == pytest.approx(d / (2 - d), abs=1e-12)


def test_metrics_match_hand_counts() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    target = np.array([[1, 0, 0, 0], [1, 1, 0, 1]], bool)
    m = segmentation_metrics(pred, target)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 2, 3)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    # mask restricts the pixels that count
    keep = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    assert dice(pred, target, keep) == pytest.approx(2 / 3)
    # 0/1 integers are accepted; other values are not
    assert dice(pred.astype(np.uint8), target.astype(float)) == m["dice"]
    with pytest.raises(MicrosegError, match="binary"):
        dice(pred * 255, target)


def test_empty_set_conventions() -> None:
    z = np.zeros((4, 4), bool)
    one = z.copy()
    one[1, 1] = True
    assert segmentation_metrics(z, z) | {} == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "tn": 16,
    }
    # nothing predicted, something to find
    assert (dice(z, one), iou(z, one), precision(z, one), recall(z, one)) == (0, 0, 0, 0)
    # something predicted, nothing to find
    assert (dice(one, z), iou(one, z), precision(one, z), recall(one, z)) == (0, 0, 0, 0)
    with pytest.raises(ShapeMismatchError, match="same shape"):
        dice(z, np.zeros((4, 5), bool))


def test_threshold_sweep_equals_thresholding_each_time() -> None:
    rng = np.random.default_rng(5)
    target = rng.uniform(size=(3, 30, 30)) < 0.3
    prob = np.clip(target * 0.4 + rng.uniform(0, 0.6, target.shape), 0, 1).astype(np.float32)
    prob[0, 0, :4] = [0.5, 0.25, 0.0, 1.0]  # values exactly on thresholds
    ts = [0.0, 0.1, 0.25, 0.5, 0.7, 1.0, 1.5]
    df = threshold_sweep(prob, target, ts)
    assert list(df["threshold"]) == ts
    for t, row in zip(ts, df.itertuples(), strict=True):
        m = segmentation_metrics(prob >= t, target)
        for k in ("dice", "iou", "precision", "recall", "tp", "fp", "fn", "tn"):
            assert getattr(row, k) == pytest.approx(m[k], abs=1e-12), (t, k)
    assert df.loc[df["threshold"] == 1.5, "dice"].item() == 0.0
    assert len(threshold_sweep(prob, target)) == 19
    # PR points agree with sklearn's precision_recall_curve at its thresholds
    p, r, thr = sk_metrics.precision_recall_curve(target.ravel(), prob.ravel())
    sw = threshold_sweep(prob, target, thr[::50])
    np.testing.assert_allclose(sw["precision"], p[:-1][::50], atol=1e-12)
    np.testing.assert_allclose(sw["recall"], r[:-1][::50], atol=1e-12)


def _spine_like(seed: int = 0, shape=(32, 256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Blobs (the 'spines') dimmer than a broad tube, on a background ramp, Poisson noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mid = shape[1] / 2
    tube = np.exp(-((yy - mid - 10 * np.sin(xx / 40)) ** 2) / (2 * 6.0**2))
    img = 120.0 * tube * np.exp(-((zz - shape[0] / 2) ** 2) / (2 * 8.0**2)) + 30 + 0.3 * xx
    mask = np.zeros(shape, bool)
    hi_c = np.array(shape) - [4, 20, 20]
    for _ in range(40):
        c = rng.uniform([4, 20, 20], np.maximum(hi_c, [5, 21, 21]))
        r = rng.uniform(2.0, 3.5)
        lo = np.maximum(np.floor(c - [3, 12, 12]).astype(int), 0)
        hi = np.minimum(lo + np.array([7, 25, 25]), shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        z, y, x = np.ogrid[sl]
        d2 = ((z - c[0]) * 3) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        img[sl] += 100.0 * np.exp(-d2 / (2 * r**2))
        mask[sl] |= d2 <= (1.2 * r) ** 2
    return rng.poisson(img).astype(np.uint16), mask
