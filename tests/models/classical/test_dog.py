"""The DoG spine baseline and its grid search."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.segmentation import dice, threshold_sweep
from microseg.models.classical.dog import dog_baseline, dog_response, remove_small, tune_dog


def _pair(seed: int, shape=(6, 40, 50)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
    pred = target ^ (rng.uniform(size=shape) < 0.1)
    return pred, target


def _spine_like(seed: int = 0, shape=(32, 256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Blobs (the 'spines') dimmer than a broad tube, on a background ramp, Poisson noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mid = shape[1] / 2
    tube = np.exp(-((yy - mid - 10 * np.sin(xx / 40)) ** 2) / (2 * 6.0**2))
    img = 120.0 * tube * np.exp(-((zz - shape[0] / 2) ** 2) / (2 * 8.0**2)) + 30 + 0.3 * xx
    mask = np.zeros(shape, bool)
    hi_c = np.array(shape) - [4, 20, 20]
    for _ in range(40):
        c = rng.uniform([4, 20, 20], np.maximum(hi_c, [5, 21, 21]))
        r = rng.uniform(2.0, 3.5)
        lo = np.maximum(np.floor(c - [3, 12, 12]).astype(int), 0)
        hi = np.minimum(lo + np.array([7, 25, 25]), shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        z, y, x = np.ogrid[sl]
        d2 = ((z - c[0]) * 3) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        img[sl] += 100.0 * np.exp(-d2 / (2 * r**2))
        mask[sl] |= d2 <= (1.2 * r) ** 2
    return rng.poisson(img).astype(np.uint16), mask


def test_remove_small_matches_skimage() -> None:
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(6)
    m = ndimage.gaussian_filter(rng.normal(size=(8, 40, 40)), 1) > 0.2
    for min_size in (1, 5, 20):
        ours = remove_small(m, min_size)
        ref = remove_small_objects(m, max_size=min_size - 1) if min_size > 1 else m
        np.testing.assert_array_equal(ours, ref)


def test_dog_baseline_finds_blobs_and_tuning_is_fast() -> None:
    stack, mask = _spine_like()
    grid = {
        "sigma_small": [1.0, 2.0],
        "sigma_large": [4.0, 8.0],
        "threshold": [0.02, 0.05, 0.1, 0.2],
        "min_size": [1, 20, 60],
    }
    t0 = time.perf_counter()
    best, table = tune_dog(stack, mask, grid)
    elapsed = time.perf_counter() - t0
    assert len(table) == 2 * 2 * 4 * 3
    assert isinstance(table, pd.DataFrame)
    assert table["dice"].is_monotonic_decreasing
    assert table["seconds"].max() < 1.0  # each evaluation alone
    assert elapsed < 5.0
    assert table.iloc[0]["dice"] > 0.7
    assert best == {"sigma_small": 2.0, "sigma_large": 4.0, "threshold": 0.1, "min_size": 1}
    assert all(type(v) in (float, int) for v in best.values())
    # the tuned parameters reproduce the table's best Dice through the public baseline
    pred = dog_baseline(stack, **best)
    assert dice(pred, mask) == pytest.approx(table.iloc[0]["dice"], abs=1e-12)
    # and it beats thresholding the raw intensity at its best (the tube is brighter than spines)
    raw = threshold_sweep(stack / stack.max(), mask, np.linspace(0.05, 0.95, 19))
    assert table.iloc[0]["dice"] > raw["dice"].max()


def test_dog_sigmas_per_plane_or_3d() -> None:
    stack, _ = _spine_like(shape=(6, 40, 40))
    planar = dog_response(stack, 1.0, 3.0)
    per_plane = np.stack([dog_response(stack[z : z + 1], 1.0, 3.0)[0] for z in range(6)])
    # scalar sigmas filter each plane alone (up to the stack-wide normalisation)
    norm = dog_response(stack, (0, 1, 1), (0, 3, 3))
    np.testing.assert_allclose(planar, norm, atol=1e-6)
    assert planar.shape == per_plane.shape
    aniso = dog_response(stack, (0.3, 1, 1), (1.0, 3, 3))
    assert not np.allclose(aniso, planar)
    with pytest.raises(MicrosegError, match="sigma_large"):
        dog_response(stack, 3.0, 1.0)
    with pytest.raises(ShapeMismatchError, match="one sigma per axis"):
        dog_response(stack, (1, 1), (3, 3))
