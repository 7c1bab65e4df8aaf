"""Inter-rater agreement (exact small cases, Fleiss' published example) and AUROC vs sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as sk_metrics
from scipy import ndimage
from scipy.stats import spearmanr

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.inter_rater import (
    agreement_fraction,
    auroc,
    compare_uncertainty_to_disagreement,
    disagreement_map,
    fleiss_kappa,
    fleiss_kappa_from_counts,
    majority_vote,
    near_foreground,
    pairwise_dice,
    roc_curve,
    vote_counts,
)

# Fleiss (1971) as worked on Wikipedia's "Fleiss' kappa" page: 10 subjects, 14 raters,
# 5 categories; P = 0.378, Pe = 0.213, kappa = 0.210.
FLEISS_TABLE = np.array(
    [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
)


def _three() -> list[np.ndarray]:
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], bool)
    b = np.array([[1, 1, 0, 1], [0, 0, 0, 1]], bool)
    c = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], bool)
    return [a, b, c]


def test_disagreement_is_population_variance() -> None:
    masks = _three()
    d = disagreement_map(masks)
    # votes: [[3, 2, 0, 1], [1, 0, 1, 3]]
    np.testing.assert_array_equal(vote_counts(masks)[0], [[3, 2, 0, 1], [1, 0, 1, 3]])
    assert d[0, 0] == 0.0 and d[0, 2] == 0.0 and d[1, 3] == 0.0  # unanimous
    assert d[0, 1] == 2 / 9  # 2 vs 1: exactly 2/9
    assert d[0, 3] == 2 / 9  # 1 vs 2
    np.testing.assert_allclose(d, np.var(np.stack(masks).astype(float), axis=0), atol=1e-15)
    # four raters split 2/2: the maximum 1/4
    four = [*masks, ~masks[0]]
    assert disagreement_map(four).max() == 0.25


def test_majority_and_agreement() -> None:
    masks = _three()
    np.testing.assert_array_equal(majority_vote(masks), [[1, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(agreement_fraction(masks)[0], [1, 2 / 3, 1, 2 / 3])
    np.testing.assert_allclose(agreement_fraction(masks, "pairwise")[0], [1, 1 / 3, 1, 1 / 3])
    four = [*masks, masks[1]]
    tie_px = vote_counts(four)[0] == 2
    assert tie_px.any()
    assert not majority_vote(four)[tie_px].any()
    assert majority_vote(four, tie=True)[tie_px].all()


def test_fleiss_kappa_published_example() -> None:
    assert fleiss_kappa_from_counts(FLEISS_TABLE) == pytest.approx(0.2099, abs=1e-4)
    with pytest.raises(MicrosegError, match="same number"):
        fleiss_kappa_from_counts(FLEISS_TABLE[:, :4])


def test_fleiss_kappa_of_masks_equals_table_form() -> None:
    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.normal(size=(30, 30)), 2) > 0
    masks = [truth ^ (rng.uniform(size=truth.shape) < 0.1) for _ in range(5)]
    k = vote_counts(masks)[0].ravel().astype(int)
    table = np.stack([5 - k, k], axis=1)
    assert fleiss_kappa(masks) == pytest.approx(fleiss_kappa_from_counts(table), abs=1e-12)
    assert 0.5 < fleiss_kappa(masks) < 0.8
    # perfect agreement on a mixed image: 1; all raters blank: undefined
    assert fleiss_kappa([truth] * 3) == pytest.approx(1.0)
    assert np.isnan(fleiss_kappa([np.zeros((3, 3), bool)] * 3))
    # region restriction
    region = np.zeros(truth.shape, bool)
    region[:10] = True
    sub = [m[:10] for m in masks]
    assert fleiss_kappa(masks, region) == pytest.approx(fleiss_kappa(sub), abs=1e-12)


def test_pairwise_dice_and_shape_errors() -> None:
    masks = _three()
    df = pairwise_dice(masks, names=["ann", "bob", "cy"])
    assert list(zip(df.rater_a, df.rater_b, strict=True)) == [
        ("ann", "bob"),
        ("ann", "cy"),
        ("bob", "cy"),
    ]
    a, b = masks[0], masks[1]
    assert df.dice[0] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    with pytest.raises(ShapeMismatchError, match="rater 2"):
        disagreement_map([a, b, np.zeros((2, 5), bool)])
    with pytest.raises(MicrosegError, match="at least 3"):
        disagreement_map([a, b])


def _scores_labels(seed: int, n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=n) < 0.2
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: many ties
    return s, y


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    s, y = _scores_labels(seed)
    assert len(np.unique(s)) < len(s) / 10
    assert auroc(s, y) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    assert auroc(np.zeros(10), np.arange(10) % 2) == 0.5  # all tied
    assert np.isnan(auroc(s, np.zeros_like(y)))


def test_roc_curve_matches_sklearn_and_thins() -> None:
    s, y = _scores_labels(2)
    fpr, tpr, thr = roc_curve(s, y, max_points=None)
    sk_fpr, sk_tpr, sk_thr = sk_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s, y), abs=1e-12)
    u = np.random.default_rng(3).uniform(size=20000)
    f2, t2, _ = roc_curve(u, u > 0.7, max_points=100)
    assert len(f2) <= 102
    assert (f2[0], t2[0], f2[-1], t2[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(f2) >= 0) and np.all(np.diff(t2) >= 0)


def test_compare_uncertainty_to_disagreement() -> None:
    rng = np.random.default_rng(4)
    truth = ndimage.gaussian_filter(rng.normal(size=(4, 64, 64)), (0, 3, 3)) > 0.1
    edge = truth ^ ndimage.binary_erosion(truth, np.ones((1, 3, 3)))
    # raters differ on boundary pixels and a few random ones
    raters = [truth ^ (edge & (rng.uniform(size=truth.shape) < 0.5)) for _ in range(3)]
    dis = disagreement_map(raters)
    good = dis + rng.normal(0, 0.02, dis.shape)  # tracks disagreement
    noise = rng.uniform(size=dis.shape)  # knows nothing
    df = compare_uncertainty_to_disagreement({"good": good, "noise": noise}, dis)
    assert list(df["map"]) == ["good", "noise"]
    row = df.set_index("map")
    assert row.loc["good", "auroc"] > 0.95 and abs(row.loc["noise", "auroc"] - 0.5) < 0.05
    assert row.loc["good", "spearman"] > 0.3 and abs(row.loc["noise", "spearman"]) < 0.05
    assert not row["subsampled"].any() and row.loc["good", "n_pixels"] == dis.size
    # cross-checks: spearmanr and sklearn on the same pixels
    assert row.loc["good", "spearman"] == pytest.approx(
        spearmanr(good.ravel(), dis.ravel()).statistic, abs=1e-10
    )
    assert row.loc["good", "auroc"] == pytest.approx(
        sk_metrics.roc_auc_score(dis.ravel() > 0, good.ravel()), abs=1e-12
    )
    fpr, tpr, a = df.attrs["roc_curves"]["good"]
    assert a == row.loc["good", "auroc"] and fpr[-1] == 1 and tpr[-1] == 1
    # near-foreground region: fewer pixels, same question
    region = near_foreground(raters, radius=2)
    assert region.sum() < dis.size and region[dis > 0].all()
    near = compare_uncertainty_to_disagreement({"good": good}, dis, mask=region)
    assert near["n_pixels"][0] == region.sum()
    assert near["auroc"][0] == pytest.approx(
        sk_metrics.roc_auc_score(dis[region] > 0, good[region]), abs=1e-12
    )
    # seeded subsample when huge
    sub = compare_uncertainty_to_disagreement({"good": good}, dis, max_pixels=3000, seed=1)
    assert bool(sub["subsampled"][0]) and sub["n_pixels"][0] == 3000
    again = compare_uncertainty_to_disagreement({"good": good}, dis, max_pixels=3000, seed=1)
    assert sub["auroc"][0] == again["auroc"][0]
    assert sub["auroc"][0] == pytest.approx(row.loc["good", "auroc"], abs=0.03)
    with pytest.raises(ShapeMismatchError, match="'bad'"):
        compare_uncertainty_to_disagreement({"bad": good[0]}, dis)


def test_near_foreground_is_planar_for_stacks() -> None:
    m = np.zeros((5, 9, 9), bool)
    m[2, 4, 4] = True
    grown = near_foreground([m, m, m], radius=1)
    assert grown.sum() == 9 and grown[2, 3:6, 3:6].all()
    assert near_foreground([m], radius=1, planar=False).sum() == 27


def test_fleiss_kappa_matches_statsmodels_when_installed() -> None:
    from statsmodels.stats import inter_rater  # reference implementation, dev dependency

    assert fleiss_kappa_from_counts(FLEISS_TABLE) == pytest.approx(
        inter_rater.fleiss_kappa(FLEISS_TABLE, method="fleiss"), abs=1e-12
    )
