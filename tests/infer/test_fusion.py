"""YOLO + Prob-UNet fusion: box aggregation against brute force, the decision tree, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from microseg.errors import ConfigError
from microseg.infer import fusion
from microseg.infer.fusion import (
    DEDUP_COLS,
    RAW_COLS,
    FusionParams,
    box_probability,
    evaluate_fusion,
    fuse,
    fuse_with_probabilities,
    write_fusion_outputs,
)

VS = (500.0, 94.0, 94.0)


def _random_boxes(rng: np.random.Generator, n: int, depth: int, h: int, w: int) -> pd.DataFrame:
    """Float boxes at least one pixel wide, some hanging over the image edge."""
    x1 = rng.uniform(-6, w - 2, n)
    y1 = rng.uniform(-6, h - 2, n)
    x2 = x1 + rng.uniform(1.0, 14.0, n)
    y2 = y1 + rng.uniform(1.0, 14.0, n)
    z = rng.integers(0, depth, n)
    return pd.DataFrame({"z": z, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": 0.5})


def _brute(stack: np.ndarray, det: pd.DataFrame, fn) -> np.ndarray:
    """Pixels whose centre lies in [x1, x2) x [y1, y2), reduced by ``fn``; 0 when none."""
    h, w = stack.shape[1:]
    cy = np.arange(h) + 0.5
    cx = np.arange(w) + 0.5
    out = []
    for r in det.itertuples():
        rows = (cy >= r.y1) & (cy < r.y2)
        cols = (cx >= r.x1) & (cx < r.x2)
        patch = stack[r.z][np.ix_(rows, cols)].astype(np.float64)
        out.append(fn(patch) if patch.size else 0.0)
    return np.asarray(out)


@pytest.fixture()
def stack_and_boxes():
    rng = np.random.default_rng(3)
    stack = rng.random((4, 40, 50)).astype(np.float32)
    return stack, _random_boxes(rng, 300, 4, 40, 50)


def test_box_mean_from_integral_image_equals_slice_mean(stack_and_boxes):
    stack, det = stack_and_boxes
    got = box_probability(stack, det, "mean")
    np.testing.assert_allclose(got, _brute(stack, det, np.mean), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("agg", "fn"),
    [("max", np.max), ("quantile", lambda p: np.quantile(p, 0.7))],
)
def test_box_max_and_quantile_equal_slice_reductions(stack_and_boxes, monkeypatch, agg, fn):
    stack, det = stack_and_boxes
    monkeypatch.setattr(fusion, "GATHER_BUDGET", 2000)  # force many gather chunks
    got = box_probability(stack, det, agg, quantile=0.7)
    np.testing.assert_allclose(got, _brute(stack, det, fn), rtol=1e-9, atol=1e-9)


def test_box_probability_integer_boxes_cover_pixel_edges_and_one_plane():
    plane = np.arange(100, dtype=float).reshape(10, 10)
    det = pd.DataFrame({"z": [7], "x1": [2.0], "y1": [3.0], "x2": [5.0], "y2": [4.0]})
    # one row (3), columns 2..4; a 2D plane ignores z
    assert box_probability(plane, det, "mean")[0] == pytest.approx(np.mean([32, 33, 34]))
    assert box_probability(plane, det, "max")[0] == 34
    outside = pd.DataFrame({"z": [0], "x1": [20.0], "y1": [0.0], "x2": [25.0], "y2": [5.0]})
    assert box_probability(plane, outside, "quantile")[0] == 0.0


def test_lazy_stack_reads_each_needed_plane_once(stack_and_boxes):
    stack, det = stack_and_boxes
    det = det[det["z"].isin([1, 3])]

    class Lazy:
        shape = stack.shape
        reads: list[int] = []  # noqa: RUF012

        def plane(self, z: int) -> np.ndarray:
            self.reads.append(z)
            return stack[z]

    lazy = Lazy()
    np.testing.assert_allclose(box_probability(lazy, det, "mean"), box_probability(stack, det))
    assert sorted(lazy.reads) == [1, 3]


def _table() -> tuple[pd.DataFrame, np.ndarray]:
    # far apart in x so de-duplication leaves each kept box alone
    det = pd.DataFrame(
        {
            "z": [0, 0, 0, 0, 0],
            "x1": [0.0, 100, 200, 300, 400],
            "y1": 0.0,
            "x2": [8.0, 108, 208, 308, 408],
            "y2": 8.0,
            "score": [0.9, 0.05, 0.3, 0.3, 0.5],
        }
    )
    punet = np.array([0.0, 0.99, 0.6, 0.2, 0.0])
    return det, punet


def test_decision_tree_statuses_and_weighted_scores():
    det, punet = _table()
    p = FusionParams(w_yolo=1.0, w_punet=3.0)  # unnormalised on purpose
    res = fuse_with_probabilities(det, punet, p, VS)
    assert list(res.raw.columns) == RAW_COLS
    assert list(res.raw["status"]) == [
        "high",
        "rejected_low_yolo",
        "validated",
        "rejected_no_punet",
        "high",  # high_conf is inclusive
    ]
    np.testing.assert_allclose(res.raw["score"].iloc[[0, 2, 4]], [0.9, (0.3 + 3 * 0.6) / 4, 0.5])
    assert res.raw["score"].iloc[[1, 3]].isna().all()
    np.testing.assert_allclose(res.raw["punet_prob"], punet)
    assert res.stats == {
        "yolo_total": 5,
        "kept_high_conf": 2,
        "kept_validated": 1,
        "rejected_low_yolo": 1,
        "rejected_no_punet": 1,
        "kept_after_dedup": 3,
    }
    assert sorted(res.dedup["status"]) == ["high", "high", "validated"]


def test_low_conf_boundary_is_kept_for_validation():
    det = pd.DataFrame({"z": [0], "x1": [0.0], "y1": [0.0], "x2": [4.0], "y2": [4.0]})
    det["score"] = 0.08
    res = fuse_with_probabilities(det, np.array([0.9]), FusionParams(), VS)
    assert res.raw["status"].iloc[0] == "validated"


def test_dedup_sees_only_kept_boxes():
    # A rejected box with the higher YOLO score sits on the next plane of a validated one: were
    # it de-duplicated before the decision, it would suppress the box that is kept.
    det = pd.DataFrame(
        {
            "z": [0, 1, 5, 6],
            "x1": [10.0, 10, 50, 50.5],
            "y1": [10.0, 10, 50, 50],
            "x2": [18.0, 18, 58, 58.5],
            "y2": [18.0, 18, 58, 58],
            "score": [0.40, 0.20, 0.9, 0.8],
        }
    )
    res = fuse_with_probabilities(det, np.array([0.0, 0.9, 0.0, 0.0]), FusionParams(), VS)
    assert list(res.raw["status"]) == ["rejected_no_punet", "validated", "high", "high"]
    assert list(res.dedup.columns[: len(DEDUP_COLS)]) == DEDUP_COLS
    # the two high boxes on planes 5 and 6 merge; the validated one survives on its own
    assert sorted(res.dedup["status"]) == ["high", "validated"]
    assert res.dedup.set_index("status").loc["validated", "z"] == 1
    assert res.dedup.set_index("status").loc["high", "n_merged"] == 2


def test_fuse_on_stack_stats_add_up_and_evaluate():
    rng = np.random.default_rng(0)
    prob = np.zeros((6, 64, 64), np.float32)
    prob[2:5, 20:30, 20:30] = 0.9  # a spine the map sees
    det = pd.concat(
        [
            _random_boxes(rng, 40, 6, 64, 64).assign(score=rng.uniform(0, 1, 40)),
            pd.DataFrame(
                {"z": [3], "x1": [21.0], "y1": [21.0], "x2": [29.0], "y2": [29.0], "score": [0.2]}
            ),
        ],
        ignore_index=True,
    )
    res = fuse(det, prob, FusionParams(agg="max"), VS)
    s = res.stats
    assert s["yolo_total"] == len(det) == len(res.raw)
    assert sum(s[k] for k in fusion.STAT_KEYS[1:]) == s["yolo_total"]
    assert s["kept_after_dedup"] == len(res.dedup) <= s["kept_high_conf"] + s["kept_validated"]
    assert res.raw["status"].iloc[-1] == "validated"
    gt = pd.DataFrame({"x": [24.5], "y": [24.5], "z": [3.0]})
    m = evaluate_fusion(res, gt, VS)
    assert m["tp"] == 1
    assert m["fp"] == len(res.dedup) - 1


def test_write_fusion_outputs(tmp_path):
    det, punet = _table()
    res = fuse_with_probabilities(det, punet, FusionParams(), VS)
    metrics = {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "mean_distance_nm": float("nan")}
    paths = write_fusion_outputs(tmp_path / "out", res, metrics)
    raw = pd.read_csv(paths["raw"])
    dedup = pd.read_csv(paths["dedup"])
    assert list(raw.columns) == RAW_COLS and len(raw) == 5
    assert list(dedup.columns) == DEDUP_COLS and len(dedup) == 3
    results = json.loads(paths["results"].read_text())
    assert results["f1"] == pytest.approx(2 / 3)
    assert results["detections"] == 3
    assert results["statistics"]["yolo_total"] == 5
    assert results["metrics"]["mean_distance_nm"] is None  # NaN is not JSON
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_params_validation():
    with pytest.raises(ConfigError):
        FusionParams(low_conf=0.6, high_conf=0.5)
    with pytest.raises(ConfigError):
        FusionParams(agg="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FusionParams.from_dict({"high_conf": 0.5, "bogus": 1})
    assert FusionParams.from_dict(FusionParams().to_dict()) == FusionParams()
