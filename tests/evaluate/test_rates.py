import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from microseg.evaluate.rates import Rates, prf, prf_counts


def test_counts_give_the_textbook_ratios() -> None:
    r = prf(6, 2, 4, empty=1.0)
    assert r == pytest.approx((0.75, 0.6, 12 / 18))
    assert r.f1 == pytest.approx(2 * r.precision * r.recall / (r.precision + r.recall))
    assert all(type(v) is float for v in r)


@pytest.mark.parametrize("empty", [0.0, 1.0])
def test_empty_convention_is_the_callers(empty: float) -> None:
    # nothing to find and nothing found: every score is the stated convention
    assert prf(0, 0, 0, empty=empty) == (empty, empty, empty)
    # nothing predicted but something to find: precision and F1 are 0, not the convention
    assert prf(0, 0, 3, empty=empty) == (0.0, 0.0, 0.0)
    # predictions but nothing to find: recall and F1 are 0
    assert prf(0, 2, 0, empty=empty) == (0.0, 0.0, 0.0)


def test_prf_counts_keeps_the_stage_key_order() -> None:
    out = prf_counts(np.int64(3), np.int64(1), np.int64(0), empty=1.0)
    assert list(out) == ["precision", "recall", "f1", "tp", "fp", "fn"]
    assert out == {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "tp": 3, "fp": 1, "fn": 0}
    assert type(out["tp"]) is int
    assert Rates(*prf(3, 1, 0, empty=1.0))._asdict() == {
        k: out[k] for k in ("precision", "recall", "f1")
    }


def test_matches_sklearn_on_random_label_vectors() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 5, 40, 300):
        for _ in range(25):
            y_true = rng.random(n) < rng.random()
            y_pred = rng.random(n) < rng.random()
            tp = int((y_true & y_pred).sum())
            fp = int((~y_true & y_pred).sum())
            fn = int((y_true & ~y_pred).sum())
            if tp + fp == 0 or tp + fn == 0:
                continue  # sklearn's zero_division is a different rule there (tested above)
            ref = precision_recall_fscore_support(
                y_true, y_pred, average="binary", zero_division=np.nan
            )[:3]
            assert prf(tp, fp, fn, empty=1.0) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("empty", [0.0, 1.0])
def test_all_empty_agrees_with_sklearn_zero_division(empty: float) -> None:
    y = np.zeros(7, bool)
    ref = precision_recall_fscore_support(y, y, average="binary", zero_division=empty)[:3]
    assert prf(0, 0, 0, empty=empty) == pytest.approx(ref)


def test_stage_helper_is_the_points_convention() -> None:
    from microseg.stages.common import prf as stage_prf

    assert stage_prf(0, 0, 0)["f1"] == 1.0
    assert stage_prf(tp=2, fp=1, fn=1) == prf_counts(2, 1, 1, empty=1.0)
