"""Arm comparison: the paired statistics equal scipy's on the same numbers (bootstrap CI via
the project's function and scipy.stats.bootstrap, Wilcoxon p via scipy.stats.wilcoxon), pooled
F1 and the seed spread by hand, and the CI rule's verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from microseg.errors import DataFormatError
from microseg.evaluate.arm_comparison import paired_test, summarise
from microseg.evaluate.paired import bootstrap_mean_ci


def _per_image(f1: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    tp = rng.integers(0, 20, f1.size)
    return pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(f1.size)],
            "f1_50": f1,
            "tp_50": tp,
            "fp_50": rng.integers(0, 5, f1.size),
            "fn_50": rng.integers(0, 5, f1.size),
        }
    )


def test_paired_statistics_equal_scipys_on_the_same_numbers():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 25)
    runs = {
        arm: {
            s: _per_image(np.clip(base + shift + rng.normal(0, 0.03, 25), 0, 1), rng)
            for s in (1, 2, 3)
        }
        for arm, shift in (("R", 0.0), ("R+S@25", 0.04), ("S", -0.06))
    }
    out = summarise(runs, n_resamples=2000)
    for arm in ("R+S@25", "S"):
        # per image, in image-id order (as the study pairs them), averaged over seeds
        d = np.mean(
            [
                runs[arm][s].sort_values("image_id")["f1_50"].to_numpy()
                - runs["R"][s].sort_values("image_id")["f1_50"].to_numpy()
                for s in (1, 2, 3)
            ],
            axis=0,
        )
        got = out["vs_R"][arm]
        assert got["mean_diff"] == pytest.approx(d.mean())
        assert got["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx(
            bootstrap_mean_ci(d, n_resamples=2000), rel=1e-12
        )
        ref = sps.bootstrap(
            (d,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(0)
        ).confidence_interval
        assert got["ci_low"] == pytest.approx(ref.low) and got["ci_high"] == pytest.approx(ref.high)
    assert out["vs_R"]["R+S@25"]["verdict"] == "helped"
    assert out["vs_R"]["S"]["verdict"] == "hurt"
    assert out["sentence"].startswith("synthetic data helped")
    # pooled F1 by hand (2 TP / (2 TP + FP + FN)), mean and sample sd over seeds
    r1 = runs["R"][1]
    tp, fp, fn = r1["tp_50"].sum(), r1["fp_50"].sum(), r1["fn_50"].sum()
    assert out["arms"]["R"]["pooled_f1_50"]["per_seed"][0] == round(2 * tp / (2 * tp + fp + fn), 4)
    means = [runs["R"][s]["f1_50"].mean() for s in (1, 2, 3)]
    assert out["arms"]["R"]["mean_f1_50"]["sd"] == pytest.approx(np.std(means, ddof=1))


def test_no_difference_is_not_claimed():
    rng = np.random.default_rng(1)
    f1 = rng.uniform(0.5, 0.9, 12)
    same = {s: _per_image(f1, rng) for s in (1, 2)}
    out = summarise({"R": same, "R+S@10": same}, n_resamples=200)
    t = out["vs_R"]["R+S@10"]
    assert t["mean_diff"] == 0 and np.isnan(t["wilcoxon_p"]) and t["verdict"] == "did not help"
    assert out["sentence"].startswith("synthetic data did not help")


def test_arms_scored_on_other_images_are_refused():
    a = pd.Series([0.5, 0.6], index=["x", "y"])
    b = pd.Series([0.5, 0.6], index=["x", "z"])
    with pytest.raises(DataFormatError, match="different test images"):
        paired_test(a, b)
