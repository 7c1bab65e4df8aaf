"""LoG baseline: finds known blobs on a synthetic stack, and tuning prefers a sane threshold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from microseg.errors import ConfigError, ShapeMismatchError
from microseg.evaluate.points import evaluate_points
from microseg.infer.blobs import detect_blobs_log, log_response, normalize_stack, tune_log

VS = (500.0, 94.0, 94.0)
CENTRES = np.array([[2, 14, 16], [3, 45, 20], [5, 20, 48], [6, 50, 50]])  # z, y, x voxels


def synthetic_stack(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """8x64x64: four Gaussian blobs (sigma 1 plane, 2.5 px) on a noisy uneven background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:8, :64, :64].astype(float)
    img = 0.15 + 0.05 * x / 64  # gentle gradient
    for cz, cy, cx in CENTRES:
        img = img + np.exp(-((z - cz) ** 2) / 2 - ((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.5**2))
    img = img + rng.normal(0, 0.04, img.shape)
    gt = pd.DataFrame({"x": CENTRES[:, 2], "y": CENTRES[:, 1], "z": CENTRES[:, 0]})
    return (img * 1000).astype(np.uint16), gt


def test_log_response_equals_full_filter() -> None:
    rng = np.random.default_rng(1)
    plane = rng.random((30, 41))
    yx = np.array([[0, 0], [29, 40], [15, 20], [2, 38], [15, 20]])
    sig = np.array([1.5, 2.0, 1.5, 4.0, 6.0])
    expected = [
        -(s**2) * ndi.gaussian_laplace(plane, s)[a, b] for (a, b), s in zip(yx, sig, strict=True)
    ]
    np.testing.assert_allclose(log_response(plane, yx, sig), expected, rtol=1e-10, atol=1e-12)


def test_normalize_stack_maps_percentiles_to_unit_range() -> None:
    stack = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    out = normalize_stack(stack, "stack", (0.0, 100.0))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    per_plane = normalize_stack(stack, "plane", (0.0, 100.0))
    assert per_plane[5].min() == 0.0 and per_plane[5].max() == 1.0
    with pytest.raises(ConfigError, match="normalize"):
        normalize_stack(stack, "global")  # type: ignore[arg-type]


def test_finds_synthetic_blobs() -> None:
    stack, gt = synthetic_stack()
    pred = detect_blobs_log(stack, VS, min_sigma=1.5, max_sigma=4.0, threshold=0.3)
    metrics = evaluate_points(pred, gt, VS, max_dist_nm=1000.0)
    assert metrics["f1"] == 1.0, metrics
    assert metrics["mean_distance_nm"] < 300
    assert pred["n_merged"].min() >= 2, "each blob spans several planes and must be merged"
    assert pred["score"].between(0, 1).all()
    r = np.sqrt(2) * pred["sigma"]
    np.testing.assert_allclose(pred["x2"] - pred["x1"], 2 * r)
    np.testing.assert_allclose((pred["y1"] + pred["y2"]) / 2, pred["y"])
    # Without 3D de-duplication the same blob is reported once per plane it shows in.
    raw = detect_blobs_log(stack, VS, threshold=0.3, dedup_radius_nm=None)
    assert len(raw) >= 2 * len(pred)
    assert {"n_merged", "z_min"}.isdisjoint(raw.columns)


def test_tune_log_beats_a_bad_threshold() -> None:
    stack, gt = synthetic_stack(seed=2)
    grid = {"threshold": [0.002, 0.3, 2.0], "max_sigma": [4.0]}
    best, table = tune_log(stack, gt, VS, 1000.0, grid, min_sigma=1.5)
    assert len(table) == 3 and {"threshold", "max_sigma", "f1", "n_pred"} <= set(table.columns)
    assert best == {"threshold": 0.3, "max_sigma": 4.0}
    f1 = table.set_index("threshold")["f1"]
    assert f1[0.3] == 1.0
    assert f1[0.002] < 0.8, "a near-zero threshold must drown in noise blobs"
    assert f1[2.0] == 0.0, "an unreachable threshold finds nothing"


def test_bad_input_is_reported() -> None:
    with pytest.raises(ShapeMismatchError, match=r"3D ZYX.*found shape"):
        detect_blobs_log(np.zeros((64, 64)), VS)
    with pytest.raises(ConfigError, match="min_sigma"):
        detect_blobs_log(np.zeros((2, 8, 8)), VS, min_sigma=3.0, max_sigma=2.0)
    _, gt = synthetic_stack()
    with pytest.raises(ConfigError, match=r"unknown LoG parameter\(s\) \['sigma'\]"):
        tune_log(np.zeros((2, 8, 8)), gt, VS, 1000.0, {"sigma": [1.0]})


def test_empty_stack_gives_empty_table() -> None:
    out = detect_blobs_log(np.zeros((3, 16, 16)), VS)
    assert out.empty and {"z", "y", "x", "sigma", "score", "x1", "y2"} <= set(out.columns)
