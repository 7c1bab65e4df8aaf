"""Pixel ROC/PR curves streamed image by image equal sklearn's on the threshold grid."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from microseg.evaluate.pixel_curves import PixelCurveAccumulator


def test_pixel_curves_equal_sklearn_on_the_grid():
    rng = np.random.default_rng(5)
    y = rng.random(20_000) < 0.3
    acc = PixelCurveAccumulator()
    # scores on the accumulator's grid (the curves are exact there)
    p = acc.thresholds[np.round((0.35 * y + rng.random(y.size) * 0.65) * 200).astype(int)]
    for part in np.array_split(np.arange(y.size), 3):  # streamed in pieces
        acc.update(p[part], y[part])
    table = acc.table().set_index("threshold")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:], strict=True):
        row = table.iloc[int(np.argmin(np.abs(table.index.to_numpy() - th)))]
        assert row["fpr"] == pytest.approx(f, abs=1e-12) and row["tpr"] == pytest.approx(t)
    prec, rec, thr = precision_recall_curve(y, p)
    for pr, rc, th in zip(prec[:-1], rec[:-1], thr, strict=True):
        row = table.iloc[int(np.argmin(np.abs(table.index.to_numpy() - th)))]
        assert row["precision"] == pytest.approx(pr) and row["recall"] == pytest.approx(rc)
    assert acc.auroc() == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert acc.average_precision() == pytest.approx(average_precision_score(y, p), abs=1e-12)
