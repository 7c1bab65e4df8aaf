"""Calibration metrics against sklearn, hand-made tables, streaming = one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.calibration as sk_calibration
import sklearn.metrics as sk_metrics

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.calibration import (
    CalibrationAccumulator,
    bin_edges,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_table,
)


def _data(seed: int, shape=(8, 40, 40), bias: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from p_true; the prediction is p_true pushed by ``bias`` in logit space."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(-1.0, 2.0, shape)
    target = rng.uniform(size=shape) < 1 / (1 + np.exp(-logit))
    prob = 1 / (1 + np.exp(-(logit + bias)))
    return prob, target


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_reliability_table_matches_sklearn(strategy: str, n_bins: int) -> None:
    prob, target = _data(0, bias=0.8)
    prob[0, 0, :5] = [0.0, 1.0, 0.2, 0.4, 1 / 3]  # values on (uniform) bin edges
    table = reliability_table(prob, target, n_bins, strategy)
    freq, conf = sk_calibration.calibration_curve(
        target.ravel(), prob.ravel(), n_bins=n_bins, strategy=strategy
    )
    nz = table[table["count"] > 0]
    np.testing.assert_allclose(nz["frequency"], freq, atol=1e-12)
    np.testing.assert_allclose(nz["mean_confidence"], conf, atol=1e-12)
    assert table["count"].sum() == prob.size
    assert len(table) == n_bins
    if strategy == "quantile":  # equal mass: counts within one value of each other
        assert nz["count"].max() - nz["count"].min() <= 1


def test_brier_matches_sklearn() -> None:
    prob, target = _data(1, bias=-0.5)
    ours = brier_score(prob, target)
    assert ours == pytest.approx(
        sk_metrics.brier_score_loss(target.ravel(), prob.ravel()), abs=1e-14
    )
    assert calibration_summary(prob, target)["brier"] == pytest.approx(ours, abs=1e-14)


def test_ece_mce_by_hand() -> None:
    # bin [0, 0.5]: p = 0.2, 0.2, 0.4, 0.4 -> mean 0.3, one positive of four -> 0.25
    # bin (0.5, 1]: p = 0.9, 0.9            -> mean 0.9, both positive        -> 1.0
    prob = np.array([0.2, 0.2, 0.4, 0.4, 0.9, 0.9])
    target = np.array([0, 1, 0, 0, 1, 1])
    table = reliability_table(prob, target, n_bins=2)
    np.testing.assert_allclose(table["mean_confidence"], [0.3, 0.9])
    np.testing.assert_allclose(table["frequency"], [0.25, 1.0])
    np.testing.assert_array_equal(table["count"], [4, 2])
    ece = (4 / 6) * 0.05 + (2 / 6) * 0.1
    assert expected_calibration_error(prob, target, n_bins=2) == pytest.approx(ece)
    assert maximum_calibration_error(prob, target, n_bins=2) == pytest.approx(0.1)
    brier = (0.04 + 0.64 + 0.16 + 0.16 + 0.01 + 0.01) / 6
    assert brier_score(prob, target) == pytest.approx(brier)


def test_calibrated_beats_miscalibrated() -> None:
    prob, target = _data(2, shape=(20, 64, 64))
    over, _ = _data(2, shape=(20, 64, 64), bias=1.5)
    ece_cal = expected_calibration_error(prob, target)
    ece_over = expected_calibration_error(over, target)
    assert ece_cal < 0.01 < 0.1 < ece_over
    assert brier_score(prob, target) < brier_score(over, target)


def test_streaming_plane_by_plane_equals_one_shot() -> None:
    prob, target = _data(3, bias=0.3)
    prob = prob.astype(np.float32)
    acc = CalibrationAccumulator()
    for z in range(prob.shape[0]):
        acc.update(prob[z], target[z])
    ref = reliability_table(prob, target)
    got = acc.table()
    np.testing.assert_array_equal(got["count"], ref["count"])
    np.testing.assert_allclose(
        got[["mean_confidence", "frequency"]], ref[["mean_confidence", "frequency"]], atol=1e-12
    )
    summary = calibration_summary(prob, target)
    assert acc.summary() == pytest.approx(summary, abs=1e-12)
    assert acc.n == prob.size
    # two workers, merged
    a, b = CalibrationAccumulator(), CalibrationAccumulator()
    a.update(prob[:3], target[:3])
    b.update(prob[3:], target[3:])
    assert a.merge(b).summary() == pytest.approx(summary, abs=1e-12)
    # streamed equal-mass bins: edges from a subsample, statistics exact for those edges
    edges = bin_edges(10, "quantile", prob, max_pixels=2000, seed=0)
    q = CalibrationAccumulator(edges)
    for z in range(prob.shape[0]):
        q.update(prob[z], target[z])
    counts = q.table()["count"]
    assert counts.sum() == prob.size
    assert counts.min() > 0.7 * prob.size / 10  # roughly equal mass
    with pytest.raises(MicrosegError, match="different bin edges"):
        q.merge(acc)


def test_mask_and_subsample() -> None:
    prob, target = _data(4)
    keep = np.zeros(prob.shape, bool)
    keep[:, :20] = True
    assert expected_calibration_error(prob, target, mask=keep) == pytest.approx(
        expected_calibration_error(prob[:, :20], target[:, :20])
    )
    sub = calibration_summary(prob, target, max_pixels=5000, seed=1)
    assert sub["n"] == 5000
    assert sub == calibration_summary(prob, target, max_pixels=5000, seed=1)  # seeded
    assert sub != calibration_summary(prob, target, max_pixels=5000, seed=2)
    full = calibration_summary(prob, target)
    assert sub["brier"] == pytest.approx(full["brier"], abs=0.02)


def test_empty_bins_and_bad_input() -> None:
    table = reliability_table(np.array([0.05, 0.95]), np.array([0, 1]), n_bins=4)
    assert list(table["count"]) == [1, 0, 0, 1]
    assert table["mean_confidence"].isna().tolist() == [False, True, True, False]
    assert np.isnan(CalibrationAccumulator().ece())
    with pytest.raises(ShapeMismatchError):
        brier_score(np.zeros(3), np.zeros(4))
    with pytest.raises(MicrosegError, match=r"\[0, 1\]"):
        brier_score(np.array([1.5]), np.array([1]))
    with pytest.raises(MicrosegError, match="binary"):
        brier_score(np.array([0.5]), np.array([2]))
    with pytest.raises(MicrosegError, match="strategy"):
        bin_edges(5, "log")  # type: ignore[arg-type]
