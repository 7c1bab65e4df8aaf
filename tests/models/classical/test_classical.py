"""Otsu + distance-transform watershed baseline on bright, dark and colour nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from microseg.models.classical import ClassicalConfig, grey, objects_are_dark, otsu_watershed

CENTRES = [(20, 20), (20, 39), (60, 25), (55, 70), (80, 80)]  # the first two touch


def nuclei(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a bright-on-dark 8-bit image of five nuclei of radius 10."""
    labels = np.zeros((100, 100), np.uint16)
    for i, c in enumerate(CENTRES, 1):
        labels[disk(c, 10, shape=labels.shape)] = i
    rng = np.random.default_rng(seed)
    image = 30 + 150 * (labels > 0) + rng.normal(0, 10, labels.shape)
    return labels, np.clip(image, 0, 255).astype(np.uint8)


def matched(truth: np.ndarray, pred: np.ndarray, thr: float = 0.7) -> int:
    n = 0
    for i in range(1, truth.max() + 1):
        t = truth == i
        ids, counts = np.unique(pred[t], return_counts=True)
        j = ids[np.argmax(counts)]
        if j and (t & (pred == j)).sum() / (t | (pred == j)).sum() > thr:
            n += 1
    return n


@pytest.mark.parametrize("polarity", ["auto", "bright"])
def test_bright_nuclei(polarity):
    truth, image = nuclei()
    assert not objects_are_dark(grey(image)[...])
    pred = otsu_watershed(image, ClassicalConfig(polarity=polarity))
    assert pred.dtype == np.uint16 and pred.shape == truth.shape
    assert pred.max() == 5
    assert matched(truth, pred) == 5  # touching pair split at the waist


@pytest.mark.parametrize("polarity", ["auto", "dark"])
def test_dark_nuclei(polarity):
    truth, image = nuclei(1)
    dark = 255 - image  # brightfield-like: dark nuclei on a bright background
    assert objects_are_dark(grey(dark))
    pred = otsu_watershed(dark, ClassicalConfig(polarity=polarity))
    assert pred.max() == 5 and matched(truth, pred) == 5
    # forcing the wrong polarity segments the background instead
    wrong = otsu_watershed(dark, ClassicalConfig(polarity="bright"))
    assert matched(truth, wrong) == 0


def test_colour_tissue_like_nuclei():
    truth, image = nuclei(2)
    g = image.astype(np.float32) / 255
    # H&E-like: purple nuclei (dark) on pink background, as YXC
    rgb = np.stack([230 - 120 * g, 180 - 130 * g, 210 - 60 * g], axis=-1).astype(np.uint8)
    pred = otsu_watershed(rgb)
    assert matched(truth, pred) == 5


def test_min_size_and_empty_image():
    _, image = nuclei()
    assert otsu_watershed(image, ClassicalConfig(min_size=1000)).max() == 0
    assert otsu_watershed(np.zeros((32, 32), np.uint8)).max() == 0
