"""Counting: per-object tables against a hand-built image and scipy, count errors on known
counts, area percentiles against numpy, and the maximum-area filter."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.measure import label

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.counting import (
    area_percentile,
    count_errors,
    counting_summary,
    drop_large_objects,
    object_areas,
    object_table,
)


def hand_built() -> tuple[np.ndarray, np.ndarray]:
    """Object 1: a 2 x 2 square at the top left; 5: a 1 x 3 bar; ids 2-4 absent."""
    lab = np.zeros((6, 8), np.uint16)
    lab[0:2, 0:2] = 1
    lab[4, 2:5] = 5
    prob = np.full(lab.shape, 0.1)
    prob[0:2, 0:2] = [[0.9, 0.7], [0.5, 0.3]]  # mean 0.6
    prob[4, 2:5] = [1.0, 0.8, 0.9]  # mean 0.9
    return lab, prob


def test_object_table_of_a_hand_built_image():
    lab, prob = hand_built()
    t = object_table(lab, prob)
    assert list(t.columns) == ["id", "y_px", "x_px", "area_px", "score"]
    assert t["id"].tolist() == [1, 5]
    assert t["area_px"].tolist() == [4, 3]
    assert t["y_px"].tolist() == pytest.approx([0.5, 4.0])
    assert t["x_px"].tolist() == pytest.approx([0.5, 3.0])
    assert t["score"].tolist() == pytest.approx([0.6, 0.9])
    assert "score" not in object_table(lab)  # no probability map, no score column


def random_labels(seed: int, shape=(64, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random(shape) < 0.45)
    return label(mask).astype(np.uint16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_object_table_equals_scipy_on_random_labels(seed):
    lab = random_labels(seed)
    prob = np.random.default_rng(seed + 10).random(lab.shape)
    ids = np.unique(lab)[1:]
    assert ids.size > 5
    t = object_table(lab, prob)
    assert t["id"].tolist() == ids.tolist()
    np.testing.assert_array_equal(t["area_px"], ndimage.sum_labels(np.ones_like(lab), lab, ids))
    centroids = np.array(ndimage.center_of_mass(np.ones_like(lab), lab, ids))
    np.testing.assert_allclose(t[["y_px", "x_px"]].to_numpy(), centroids, atol=1e-12)
    np.testing.assert_allclose(t["score"], ndimage.mean(prob, lab, ids), atol=1e-12)
    np.testing.assert_array_equal(object_areas(lab), np.bincount(lab.ravel())[ids])


def test_object_table_of_an_empty_image_and_bad_inputs():
    empty = object_table(np.zeros((5, 5), np.uint16), np.zeros((5, 5)))
    assert empty.empty and list(empty.columns) == ["id", "y_px", "x_px", "area_px", "score"]
    with pytest.raises(MicrosegError, match="integer label image"):
        object_table(np.zeros((5, 5), float))
    with pytest.raises(ShapeMismatchError, match="probability map"):
        object_table(np.zeros((5, 5), np.uint16), np.zeros((4, 5)))
    with pytest.raises(ShapeMismatchError, match="2D"):
        object_table(np.zeros((2, 5, 5), np.uint16))


def test_count_errors_on_known_counts():
    e = count_errors([10, 0, 0, 4], [8, 0, 3, 6])
    assert e["count_error"].tolist() == [-2, 0, 3, 2]
    rel = e["count_rel_error"].tolist()
    assert rel[0] == pytest.approx(-0.2) and rel[1] == 0.0 and rel[3] == pytest.approx(0.5)
    assert math.isnan(rel[2])  # nothing to find, three found: no relative error
    with pytest.raises(ShapeMismatchError):
        count_errors([1, 2], [1])
    with pytest.raises(MicrosegError, match=">= 0"):
        count_errors([-1], [1])


def test_counting_summary_on_known_counts_and_areas():
    rng = np.random.default_rng(3)
    true_areas, pred_areas = rng.integers(20, 400, 50), rng.integers(10, 600, 37)
    s = counting_summary([10, 0, 0, 4], [8, 0, 3, 6], true_areas, pred_areas)
    assert s["n_images"] == 4 and s["n_true_objects"] == 14 and s["n_pred_objects"] == 17
    assert s["count_mae"] == pytest.approx((2 + 0 + 3 + 2) / 4)
    assert s["count_mre"] == pytest.approx((0.2 + 0.0 + 0.5) / 3)  # the undefined one left out
    assert s["count_bias"] == pytest.approx((-2 + 0 + 3 + 2) / 4)
    assert s["n_rel_undefined"] == 1
    for q in (5, 25, 50, 75, 95):
        assert s[f"true_area_p{q:02d}"] == pytest.approx(np.percentile(true_areas, q))
        assert s[f"pred_area_p{q:02d}"] == pytest.approx(np.percentile(pred_areas, q))
    nothing = counting_summary([0], [0], np.array([]), np.array([]))
    assert nothing["count_mae"] == 0 and math.isnan(nothing["pred_area_p50"])


@pytest.mark.parametrize("q", [50, 95, 99])
def test_area_percentile_equals_numpy(q):
    labels = [random_labels(s, (40, 40)) for s in range(4)]
    areas = np.concatenate([np.bincount(lab.ravel())[1:] for lab in labels])
    assert area_percentile(labels, q) == pytest.approx(np.percentile(areas[areas > 0], q))
    assert area_percentile(iter(labels), q) == area_percentile(labels, q)  # a generator too


def test_area_percentile_refuses_nothing_to_measure():
    with pytest.raises(MicrosegError, match="no objects"):
        area_percentile([np.zeros((4, 4), np.uint8)])
    with pytest.raises(MicrosegError, match="percentile"):
        area_percentile([np.ones((4, 4), np.uint8)], 101)


def test_drop_large_objects():
    lab, _ = hand_built()
    lab[2, 6] = 2  # a one-pixel object
    out = drop_large_objects(lab, 3)
    assert sorted(np.unique(out)) == [0, 2, 5] and out.dtype == lab.dtype
    np.testing.assert_array_equal(out[lab != 1], lab[lab != 1])  # the others untouched
    assert drop_large_objects(lab, 4) is lab and drop_large_objects(lab, None) is lab
    big = random_labels(7)
    cut = float(np.percentile(object_areas(big), 80))
    kept = drop_large_objects(big, cut)
    areas = pd.Series(np.bincount(big.ravel())).iloc[1:]
    assert set(np.unique(kept)[1:]) == set(areas.index[(areas > 0) & (areas <= cut)])
    with pytest.raises(MicrosegError, match="> 0"):
        drop_large_objects(lab, 0)


def test_drop_large_objects_takes_large_ids():
    lab = np.zeros((4, 4), np.uint32)
    lab[:2, :2] = 4_000_000_000
    lab[3, 3] = 7
    out = drop_large_objects(lab, 1)
    assert sorted(np.unique(out)) == [0, 7]
