"""An image's kind from its pixels: what per-kind post-processing is chosen for and applied by."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.infer.modality import image_modality


def _nuclei(background: int, nucleus: int) -> np.ndarray:
    img = np.full((32, 40), background, np.uint8)
    img[8:14, 8:14] = nucleus
    img[20:26, 24:30] = nucleus
    return img


def test_grey_kinds_follow_the_background():
    assert image_modality(_nuclei(10, 200)) == "fluorescence"
    assert image_modality(_nuclei(220, 60)) == "brightfield"


def test_colour_is_tissue_but_grey_saved_as_rgb_is_not():
    grey = _nuclei(220, 60)
    assert image_modality(np.dstack([grey] * 3)) == "brightfield"
    assert image_modality(np.dstack([grey] * 3 + [np.full_like(grey, 255)])) == "brightfield"
    he = np.dstack([grey, (grey * 0.6).astype(np.uint8), np.full_like(grey, 200)])
    assert image_modality(he) == "tissue"
    noisy = np.dstack([grey, grey, grey]).astype(np.int16)
    noisy[..., 1] += 1  # rounding differences are not colour
    assert image_modality(noisy) == "brightfield"


@pytest.mark.parametrize("shape", [(2, 32, 40), (5, 32, 40)])
def test_channel_first_stacks_are_read_by_their_mean_plane(shape):
    stack = np.broadcast_to(_nuclei(10, 200), shape)
    assert image_modality(stack) == "fluorescence"
