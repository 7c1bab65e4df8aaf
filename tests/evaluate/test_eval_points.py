"""Point matching: anisotropic nm distances, optimality against brute force and a dense oracle."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from microseg.errors import AnnotationError, MicrosegError, ShapeMismatchError
from microseg.evaluate import points
from microseg.evaluate.points import (
    average_precision,
    evaluate_points,
    match_points,
    pr_curve,
    to_nm,
)

VS = (500.0, 94.0, 94.0)


@pytest.fixture(params=["dense", "sparse"])
def solver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with contested components solved by dense Hungarian, then by sparse LAPJV."""
    if request.param == "sparse":
        monkeypatch.setattr(points, "DENSE_MAX", 0)
    return request.param


def brute_force(pred: np.ndarray, gt: np.ndarray, vs, max_dist: float) -> tuple[int, float]:
    """Enumerate every one-to-one matching; return (max #pairs, min total nm at that count)."""
    p, g = to_nm(pred, vs), to_nm(gt, vs)
    d = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    ok = d <= max_dist
    for k in range(min(len(p), len(g)), 0, -1):
        best = np.inf
        for ps in itertools.combinations(range(len(p)), k):
            for gs in itertools.permutations(range(len(g)), k):
                if all(ok[a, b] for a, b in zip(ps, gs, strict=True)):
                    best = min(best, sum(d[a, b] for a, b in zip(ps, gs, strict=True)))
        if np.isfinite(best):
            return k, float(best)
    return 0, 0.0


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Points near a few shared centres, so candidate pairs conflict (voxels, z y x)."""
    c = centres[rng.integers(0, len(centres), n)]
    return c + rng.normal(0, [1.0, 6.0, 6.0], (n, 3))


def test_to_nm_scales_each_axis() -> None:
    out = to_nm(np.array([[1, 2, 3], [0, 0, 0]]), VS)
    np.testing.assert_allclose(out, [[500, 188, 282], [0, 0, 0]])
    assert to_nm(np.empty((0, 3)), VS).shape == (0, 3)
    with pytest.raises(ShapeMismatchError, match=r"\(N, 3\).*\(4, 2\)"):
        to_nm(np.zeros((4, 2)), VS)
    with pytest.raises(MicrosegError, match="three positive"):
        to_nm(np.zeros((1, 3)), (0.0, 94.0, 94.0))


def test_anisotropy_two_planes_is_1000_nm() -> None:
    pred = np.array([[2.0, 10.0, 10.0]])
    gt = np.array([[4.0, 10.0, 10.0]])
    at = match_points(pred, gt, VS, max_dist_nm=1000.0)
    assert at.tp == 1 and at.distances_nm[0] == pytest.approx(1000.0)
    assert match_points(pred, gt, VS, max_dist_nm=999.0).tp == 0
    # The same 2-voxel offset laterally is only 188 nm.
    lateral = match_points(pred, np.array([[2.0, 12.0, 10.0]]), VS, max_dist_nm=200.0)
    assert lateral.tp == 1 and lateral.distances_nm[0] == pytest.approx(188.0)
    assert match_points(pred, gt, VS, max_dist_nm=200.0).tp == 0


def test_optimal_beats_greedy_nearest_neighbour(solver: str) -> None:
    # p0 is nearest to g0, but p1 can only reach g0; optimal pairs p0-g1 and p1-g0.
    pred = np.array([[0, 0, 0.0], [0, 0, 10.0]])
    gt = np.array([[0, 0, 4.0], [0, 0, -3.0]])
    m = match_points(pred, gt, (1.0, 100.0, 100.0), max_dist_nm=600.0)
    assert m.tp == 2
    assert dict(zip(m.pred_idx.tolist(), m.gt_idx.tolist(), strict=True)) == {0: 1, 1: 0}
    assert m.total_distance_nm == pytest.approx(900.0)


def test_prefers_more_matches_over_shorter_distance(solver: str) -> None:
    # p0-g0 at distance 0 would strand p1 and g1; two 900 nm pairs are the better answer.
    pred = np.array([[0, 0, 0.0], [0, 0, -9.0]])
    gt = np.array([[0, 0, 0.0], [0, 0, 9.0]])
    m = match_points(pred, gt, (1.0, 100.0, 100.0), max_dist_nm=900.0)
    assert m.tp == 2 and m.total_distance_nm == pytest.approx(1800.0)


@pytest.mark.parametrize("seed", range(120))
def test_matches_brute_force_enumeration(seed: int, solver: str) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0, 0], [4, 30, 30], (rng.integers(1, 4), 3))
    pred = clustered(rng, int(rng.integers(0, 8)), centres)
    gt = clustered(rng, int(rng.integers(0, 8)), centres)
    max_dist = float(rng.uniform(300, 1500))
    m = match_points(pred, gt, VS, max_dist)
    k, total = brute_force(pred, gt, VS, max_dist)
    assert m.tp == k
    assert m.total_distance_nm == pytest.approx(total, abs=1e-6)
    # The returned pairs are real, within reach, and one-to-one.
    assert len(set(m.pred_idx.tolist())) == m.tp == len(set(m.gt_idx.tolist()))
    d = np.linalg.norm(to_nm(pred[m.pred_idx], VS) - to_nm(gt[m.gt_idx], VS), axis=1)
    np.testing.assert_allclose(d, m.distances_nm)
    assert np.all(m.distances_nm <= max_dist)


@pytest.mark.parametrize("seed", range(4))
def test_matches_dense_hungarian_oracle(seed: int, solver: str) -> None:
    rng = np.random.default_rng(100 + seed)
    centres = rng.uniform([0, 0, 0], [20, 200, 200], (60, 3))
    pred = clustered(rng, 400, centres)
    gt = clustered(rng, 350, centres)
    max_dist = 800.0
    m = match_points(pred, gt, VS, max_dist)

    d = np.sqrt(((to_nm(pred, VS)[:, None] - to_nm(gt, VS)[None]) ** 2).sum(-1))
    ok = d <= max_dist
    big = min(d.shape) * max_dist + 1.0
    r, c = linear_sum_assignment(np.where(ok, d, big))
    keep = ok[r, c]
    assert m.tp == int(keep.sum())
    assert m.total_distance_nm == pytest.approx(float(d[r, c][keep].sum()), abs=1e-6)
    assert m.tp > 100, "the instance should have many contested matches"


def test_crowded_stack_percolates_into_a_giant_component() -> None:
    # ~1 spine per µm^3 at 1 µm reach: the candidate graph is one giant component, solved by
    # the sparse path with default settings; it must still equal the dense optimum.
    rng = np.random.default_rng(11)
    gt = rng.uniform(0, [10, 128, 128], (1500, 3))
    pred = np.vstack([gt[:1200] + rng.normal(0, [0.4, 2.5, 2.5], (1200, 3)), gt[1200:] + 6.0])
    i, j, _ = points._candidate_pairs(to_nm(pred, VS), to_nm(gt, VS), 1000.0)
    n = len(pred) + len(gt)
    graph = coo_matrix((np.ones(len(i)), (i, j + len(pred))), shape=(n, n))
    sizes = np.bincount(connected_components(graph, directed=False)[1])
    assert sizes.max() > 4 * points.DENSE_MAX
    m = match_points(pred, gt, VS, 1000.0)
    d = np.sqrt(((to_nm(pred, VS)[:, None] - to_nm(gt, VS)[None]) ** 2).sum(-1))
    ok = d <= 1000.0
    r, c = linear_sum_assignment(np.where(ok, d, min(d.shape) * 1000.0 + 1.0))
    assert m.tp == int(ok[r, c].sum())
    assert m.total_distance_nm == pytest.approx(float(d[r, c][ok[r, c]].sum()), abs=1e-6)


def test_scales_to_many_points() -> None:
    rng = np.random.default_rng(7)
    gt = rng.uniform([0, 0, 0], [60, 4000, 4000], (50_000, 3))
    pred = gt + rng.normal(0, [0.3, 1.5, 1.5], gt.shape)
    t0 = time.perf_counter()
    m = match_points(pred, gt, VS, 1000.0)
    assert time.perf_counter() - t0 < 10.0
    assert m.tp >= 0.99 * len(gt)


@pytest.mark.parametrize(
    ("n_pred", "n_gt", "expected"),
    [(0, 0, (1.0, 1.0, 1.0)), (0, 3, (0.0, 0.0, 0.0)), (3, 0, (0.0, 0.0, 0.0))],
)
def test_empty_set_conventions(n_pred: int, n_gt: int, expected: tuple) -> None:
    m = match_points(np.ones((n_pred, 3)), np.ones((n_gt, 3)) * 50, VS)
    assert (m.precision, m.recall, m.f1) == expected
    assert (m.tp, m.fp, m.fn) == (0, n_pred, n_gt)
    assert np.isnan(m.mean_distance_nm)


def test_counts_and_rates() -> None:
    gt = np.array([[0, 0, 0], [0, 50, 50], [5, 0, 0.0]])
    pred = np.array([[0, 1, 1], [0, 51, 50], [0, 200, 200], [10, 0, 0], [0, 100, 0.0]])
    m = match_points(pred, gt, VS, 1000.0)
    assert (m.tp, m.fp, m.fn) == (2, 3, 1)
    assert m.precision == pytest.approx(2 / 5) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 3 + 1))


def frame(pts: np.ndarray, **extra) -> pd.DataFrame:
    return pd.DataFrame({"x": pts[:, 2], "y": pts[:, 1], "z": pts[:, 0], **extra})


def test_evaluate_points_reads_xyz_columns() -> None:
    gt = np.array([[1, 10, 20], [3, 40, 40.0]])
    pred = np.array([[1.4, 10, 21], [9, 90, 90.0]])  # float z allowed
    out = evaluate_points(frame(pred), frame(gt), VS, 1000.0)
    assert out["tp"] == 1 and out["fp"] == 1 and out["fn"] == 1
    assert out["n_pred"] == 2 and out["n_gt"] == 2
    assert out["mean_distance_nm"] == pytest.approx(np.hypot(200.0, 94.0))
    assert "average_precision" not in out
    # Columns are by name: order in the frame is irrelevant, swapping x and y is not.
    swapped = frame(pred).rename(columns={"x": "y", "y": "x"})
    assert evaluate_points(swapped, frame(gt), VS, 1000.0)["tp"] == 0


def test_evaluate_points_rejects_bad_tables() -> None:
    gt = frame(np.zeros((2, 3)))
    with pytest.raises(AnnotationError, match=r"missing \['z'\].*found columns"):
        evaluate_points(pd.DataFrame({"x": [1.0], "y": [2.0]}), gt, VS, 1000.0)
    bad = frame(np.array([[np.nan, 1, 1.0]]))
    with pytest.raises(AnnotationError, match="NaN"):
        evaluate_points(bad, gt, VS, 1000.0)
    with pytest.raises(AnnotationError, match="score column 'score'"):
        evaluate_points(gt, gt, VS, 1000.0, score_col="score")


def test_pr_curve_rematches_per_threshold() -> None:
    rng = np.random.default_rng(3)
    gt = rng.uniform([0, 0, 0], [20, 300, 300], (40, 3))
    true_hits = gt[:30] + rng.normal(0, [0.2, 1, 1], (30, 3))
    junk = rng.uniform([0, 0, 0], [20, 300, 300], (20, 3))
    pred = frame(
        np.vstack([true_hits, junk]),
        score=np.r_[rng.uniform(0.5, 1, 30), rng.uniform(0, 0.6, 20)],
    )
    curve = pr_curve(pred, frame(gt), VS, 1000.0)
    assert len(curve) == 50 and curve["threshold"].is_monotonic_increasing
    assert curve["recall"].is_monotonic_decreasing
    assert (curve["tp"] + curve["fp"]).tolist() == list(range(50, 0, -1))
    full = evaluate_points(pred, frame(gt), VS, 1000.0)
    assert curve.iloc[0][["tp", "fp", "fn"]].tolist() == [full["tp"], full["fp"], full["fn"]]
    for t in (0.3, 0.55, 0.9):
        kept = pred[pred["score"] >= t]
        ref = evaluate_points(kept, frame(gt), VS, 1000.0)
        row = pr_curve(pred, frame(gt), VS, 1000.0, thresholds=[t]).iloc[0]
        assert (row["tp"], row["fp"], row["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
        assert row["f1"] == pytest.approx(ref["f1"])
    ap = evaluate_points(pred, frame(gt), VS, 1000.0, score_col="score")["average_precision"]
    assert 0.5 < ap < 0.75  # at most 30 of 40 recallable


def test_average_precision_of_perfect_and_empty_detectors() -> None:
    gt = np.array([[0, 0, 0], [5, 50, 50.0]])
    perfect = evaluate_points(frame(gt, score=[0.9, 0.8]), frame(gt), VS, score_col="score")
    assert perfect["average_precision"] == pytest.approx(1.0)
    nothing = frame(np.empty((0, 3)), score=np.empty(0))
    assert evaluate_points(nothing, frame(gt), VS, score_col="score")["average_precision"] == 0
    assert evaluate_points(nothing, nothing, VS, score_col="score")["average_precision"] == 1
    curve = pd.DataFrame({"recall": [0.5, 1.0, 0.0], "precision": [1.0, 0.5, 0.2]})
    assert average_precision(curve) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
