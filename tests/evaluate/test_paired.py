"""Paired bootstrap comparison: agrees with scipy's paired bootstrap, refuses unpaired data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from microseg.errors import DataFormatError, MicrosegError
from microseg.evaluate.paired import (
    ALL,
    bootstrap_mean_ci,
    paired_difference,
    paired_difference_table,
    paired_values,
)


def table(values, modality=None, ids=None) -> pd.DataFrame:
    ids = ids if ids is not None else [f"img{k:02d}" for k in range(len(values))]
    df = pd.DataFrame({"image_id": ids, "f1_50": values})
    if modality is not None:
        df["modality"] = modality
    return df


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(7)
    base = rng.uniform(0.3, 0.9, 30)
    model = np.clip(base + 0.04 + rng.normal(0, 0.08, 30), 0, 1)
    modality = ["fluorescence"] * 16 + ["tissue"] * 10 + ["brightfield"] * 4
    return model, base, modality


def diff_of_means(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_matches_scipy_paired_bootstrap(scores, method):
    model, base, _ = scores
    # rows in a different order in each table: pairing is by image id, not by position
    a, b = table(model), table(base).iloc[::-1]
    (res,) = paired_difference(a, b, n_resamples=4000, seed=3, method=method)
    ref = stats.bootstrap(
        (model, base),
        diff_of_means,
        paired=True,
        vectorized=True,
        n_resamples=4000,
        method=method,
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert res.group == ALL and res.n_images == 30
    assert res.mean_diff == pytest.approx(model.mean() - base.mean(), abs=1e-12)
    assert (res.low, res.high) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_agrees_with_independent_resampling_of_images(scores):
    """A hand-rolled percentile bootstrap over image indices (another seed) lands within
    Monte Carlo error of ours, and both bracket the normal-theory interval's ends."""
    model, base, _ = scores
    d = model - base
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, d.size, (20_000, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    (res,) = paired_difference(table(model), table(base))
    assert res.low == pytest.approx(lo, abs=0.004) and res.high == pytest.approx(hi, abs=0.004)
    se = d.std(ddof=1) / np.sqrt(d.size)
    t = stats.t.ppf(0.975, d.size - 1)
    assert res.low == pytest.approx(d.mean() - t * se, abs=0.01)
    assert res.high == pytest.approx(d.mean() + t * se, abs=0.01)


def test_identical_inputs_give_zero_and_no_claim(scores):
    model, _, modality = scores
    rows = paired_difference(table(model, modality), table(model, modality), group_col="modality")
    assert [r.group for r in rows] == [ALL, "brightfield", "fluorescence", "tissue"]
    for r in rows:
        assert (r.mean_diff, r.low, r.high) == (0.0, 0.0, 0.0)
        assert not r.excludes_zero


def test_clear_shift_is_claimed_in_the_right_direction(scores):
    _, base, modality = scores
    better = paired_difference(
        table(np.clip(base + 0.1, 0, 1), modality), table(base, modality), group_col="modality"
    )
    assert all(r.excludes_zero and r.low > 0 for r in better)
    worse = paired_difference(table(base - 0.05), table(base))
    assert worse[0].excludes_zero and worse[0].high < 0
    assert worse[0].mean_diff == pytest.approx(-0.05)
    # noise around no shift: no claim
    rng = np.random.default_rng(0)
    noise = paired_difference(table(base + rng.normal(0, 0.05, 30)), table(base))
    assert noise[0].low < 0 < noise[0].high and not noise[0].excludes_zero


def test_groups_are_subsets_of_the_images(scores):
    model, base, modality = scores
    rows = paired_difference(
        table(model, modality),
        table(base, modality),
        group_col="modality",
        group_order=["fluorescence", "tissue", "brightfield"],
    )
    assert [(r.group, r.n_images) for r in rows] == [
        (ALL, 30), ("fluorescence", 16), ("tissue", 10), ("brightfield", 4)
    ]  # fmt: skip
    m = np.array(modality)
    for r in rows[1:]:
        sel = m == r.group
        assert r.mean_diff == pytest.approx((model[sel] - base[sel]).mean())
        assert r.mean_a == pytest.approx(model[sel].mean())
        # fresh generator per group: a group alone gives the same interval
        (alone,) = paired_difference(table(model[sel]), table(base[sel]))
        assert (alone.low, alone.high) == (r.low, r.high)
    df = paired_difference_table(rows)
    assert list(df["group"]) == [r.group for r in rows] and "excludes_zero" in df


def test_mismatched_images_are_refused(scores):
    model, base, _ = scores
    with pytest.raises(MicrosegError, match=r"image sets differ.*1 only in 'unet'.*img99"):
        paired_difference(
            table([*model[:29], 0.5], ids=[*(f"img{k:02d}" for k in range(29)), "img99"]),
            table(base),
            names=("unet", "otsu"),
        )
    with pytest.raises(MicrosegError, match="image sets differ"):
        paired_difference(table(model[:20]), table(base))
    with pytest.raises(DataFormatError, match="repeats image ids"):
        paired_difference(table([0.5, 0.6], ids=["x", "x"]), table([0.5, 0.6], ids=["x", "y"]))
    with pytest.raises(DataFormatError, match="lacks columns"):
        paired_difference(table(model), table(base), value="f1_70")
    with pytest.raises(DataFormatError, match="differs between"):
        paired_difference(
            table([0.1, 0.2], ["tissue", "tissue"], ["x", "y"]),
            table([0.1, 0.2], ["tissue", "brightfield"], ["x", "y"]),
            group_col="modality",
        )


def test_missing_scores_refused_or_omitted():
    a, b = table([0.5, np.nan, 0.7, 0.9]), table([0.4, 0.5, 0.6, 0.6])
    with pytest.raises(DataFormatError, match="nan_policy"):
        paired_difference(a, b)
    (r,) = paired_difference(a, b, nan_policy="omit")
    assert r.n_images == 3 and r.mean_diff == pytest.approx((0.1 + 0.1 + 0.3) / 3)


def test_deterministic_by_seed(scores):
    model, base, modality = scores
    args = (table(model, modality), table(base, modality))
    one = paired_difference(*args, group_col="modality", seed=11, n_resamples=2000)
    two = paired_difference(*args, group_col="modality", seed=11, n_resamples=2000)
    other = paired_difference(*args, group_col="modality", seed=12, n_resamples=2000)
    assert one == two
    assert [(r.low, r.high) for r in one] != [(r.low, r.high) for r in other]


def test_small_groups_and_bad_knobs():
    assert np.isnan(bootstrap_mean_ci(np.array([0.3]))).all()
    (r,) = paired_difference(table([0.9]), table([0.1]))
    assert r.n_images == 1 and r.mean_diff == pytest.approx(0.8) and not r.excludes_zero
    with pytest.raises(MicrosegError, match="n_resamples"):
        bootstrap_mean_ci(np.array([0.1, 0.2]), n_resamples=0)
    with pytest.raises(MicrosegError, match="bootstrap method"):
        bootstrap_mean_ci(np.array([0.1, 0.2]), method="bca")  # type: ignore[arg-type]
    with pytest.raises(MicrosegError, match="confidence_level"):
        bootstrap_mean_ci(np.array([0.1, 0.2]), confidence_level=95)


def test_paired_values_sorted_by_id_with_groups():
    p = paired_values(
        table([0.1, 0.2], ["tissue", None], ["b", "a"]),
        table([0.3, 0.4], None, ["a", "b"]),
        "f1_50",
        group_col="modality",
    )
    assert p["image_id"].tolist() == ["a", "b"]
    assert p["a"].tolist() == [0.2, 0.1] and p["b"].tolist() == [0.3, 0.4]
    assert p["group"].tolist() == ["unknown", "tissue"]
