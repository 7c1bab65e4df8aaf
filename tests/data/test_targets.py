"""3-class targets, U-Net weight maps and the targets cache, on hand-made discs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import (
    BOUNDARY,
    INTERIOR,
    WeightMapConfig,
    border_distances,
    border_distances_naive,
    class_weights,
    instances_to_classes,
    load_targets,
    match_channels,
    percentile_normalise,
    prepare_targets,
    unet_weight_map,
)
from microseg.io.tiff import read_stack, write_stack


def touching_discs(shape=(64, 64)) -> np.ndarray:
    """Two discs of radius 10 whose outlines touch along column 32."""
    labels = np.zeros(shape, np.uint16)
    labels[disk((32, 22), 10.5, shape=shape)] = 1
    labels[disk((32, 43), 10.5, shape=shape)] = 2
    return labels


def test_boundary_separates_touching_discs():
    labels = touching_discs()
    assert ndimage.label(labels > 0)[1] == 1  # one blob as a foreground mask
    classes = instances_to_classes(labels)
    assert classes.dtype == np.uint8
    assert set(np.unique(classes)) == {0, 1, 2}
    _, n = ndimage.label(classes == INTERIOR)
    assert n == 2
    # both sides of the contact are boundary; boundary lies inside the instances only
    assert classes[32, 32] == BOUNDARY and classes[32, 33] == BOUNDARY
    assert np.all(labels[classes == BOUNDARY] > 0)
    assert np.all(classes[labels == 0] == 0)


def test_weight_map_peaks_between_touching_and_is_class_weight_far_away():
    labels = touching_discs()
    classes = instances_to_classes(labels)
    cfg = WeightMapConfig(w0=10.0, sigma=5.0)
    w = unet_weight_map(labels, cfg)
    wc = class_weights(classes)
    assert w.dtype == np.float32 and w.shape == labels.shape
    # far from both discs only the background class weight is left
    assert w[0, 0] == pytest.approx(wc[0], abs=1e-6)
    assert w[63, 63] == pytest.approx(wc[0], abs=1e-6)
    # interior pixels carry exactly their class weight
    assert np.allclose(w[classes == INTERIOR], wc[INTERIOR])
    # the maximum lies on the contact between the discs, close to w_c + w0
    r, c = np.unravel_index(np.argmax(w), w.shape)
    assert 26 <= r <= 38 and 31 <= c <= 34
    assert w[r, c] > wc[classes[r, c]] + 0.9 * cfg.w0
    # a boundary pixel on the far side of a disc gets (almost) no separation term
    assert w[32, 12] == pytest.approx(wc[BOUNDARY], abs=0.05)


def test_class_weights_balance_frequencies():
    classes = np.zeros((10, 10), np.uint8)
    classes[:2] = INTERIOR  # 20 px
    classes[2, :5] = BOUNDARY  # 5 px, background 75 px
    w = class_weights(classes, max_class_weight=10.0)
    assert w.tolist() == pytest.approx([1.0, 75 / 20, 10.0])  # 75/5 = 15 clipped to 10


def random_labels(seed: int, shape=(96, 96), n=25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        rr, cc = disk(rng.uniform(0, shape[0], 2), rng.uniform(3, 9), shape=shape)
        labels[rr, cc] = i
    return labels


@pytest.mark.parametrize("seed", [0, 1])
def test_windowed_weight_map_equals_naive_within_tolerance(seed):
    labels = random_labels(seed)
    fast_cfg = WeightMapConfig(cutoff_sigmas=3.0)
    fast = unet_weight_map(labels, fast_cfg)
    naive = unet_weight_map(labels, WeightMapConfig(cutoff_sigmas=0))
    diff = np.abs(fast - naive).max()
    assert diff <= fast_cfg.tolerance + 1e-5
    assert fast_cfg.tolerance < 0.2
    # the distances themselves are exact wherever the true d2 is inside the pad
    d1, d2 = border_distances(labels, 15.0)
    n1, n2 = border_distances_naive(labels)
    near = n2 <= 15.0
    assert np.allclose(d1[near], n1[near]) and np.allclose(d2[near], n2[near])
    assert np.all(d2[~near] > 15.0)


def test_percentile_normalise_per_channel():
    rng = np.random.default_rng(0)
    rgb = np.stack(
        [rng.integers(0, 50, (20, 30)), rng.integers(100, 255, (20, 30)), np.full((20, 30), 7)],
        axis=-1,
    ).astype(np.uint8)
    out = percentile_normalise(rgb)
    assert out.shape == (3, 20, 30) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    for c in range(2):  # each channel spans [0, 1] on its own
        assert np.percentile(out[c], 1) == pytest.approx(0.0, abs=1e-3)
        assert np.percentile(out[c], 99) == pytest.approx(1.0, abs=1e-3)
    assert np.all(out[2] == 0.0)  # a flat channel
    grey = percentile_normalise(rgb[..., 0])
    assert grey.shape == (1, 20, 30)
    assert match_channels(grey, 3).shape == (3, 20, 30)
    assert match_channels(out, 1).shape == (1, 20, 30)


def write_tiny_prepared(root: Path, n: int = 3) -> Path:
    rows = []
    for i in range(n):
        labels = random_labels(10 + i, (48, 40), n=6)
        image = (labels > 0).astype(np.uint8) * 180 + 20
        colour = i == 0
        if colour:
            image = np.stack([image, image // 2, 255 - image], axis=-1)
        sid = f"s{i}"
        write_stack(root / "images" / f"{sid}.tif", image)  # as ingest writes YXC colour
        write_stack(root / "labels" / f"{sid}.tif", labels)
        rows.append(
            {
                "sample_id": sid,
                "dataset": "tiny",
                "task": "nuclei",
                "split": ["train", "val", "test"][i % 3],
                "image_path": f"images/{sid}.tif",
                "label_path": f"labels/{sid}.tif",
                "label_kind": "instance",
                "axes": "YXC" if colour else "YX",
                "modality": "tissue" if colour else "fluorescence",
            }
        )
    write_manifest(rows, root)
    return root


def test_prepare_targets_writes_cache(tmp_path):
    prepared = write_tiny_prepared(tmp_path / "prepared")
    index = prepare_targets(prepared, tmp_path / "targets", progress=False)
    assert len(index) == 3
    assert set(index["split"]) == {"train", "val", "test"}
    assert (tmp_path / "targets" / "index.parquet").is_file()
    assert (tmp_path / "targets" / "targets.json").is_file()
    row = index[index["sample_id"] == "s0"].iloc[0]
    assert row["channels"] == 3
    img = read_stack(tmp_path / "targets" / row["image_path"])
    assert img.dtype == np.float32 and img.shape == (3, 48, 40)
    tgt = read_stack(tmp_path / "targets" / row["target_path"])
    assert tgt.dtype == np.uint8 and tgt.max() <= 2
    wgt = read_stack(tmp_path / "targets" / row["weight_path"])
    assert wgt.dtype == np.float32 and wgt.min() >= 1.0
    samples = load_targets(tmp_path / "targets", "val")
    assert len(samples) == 1 and samples[0].image.shape == (1, 48, 40)
    assert samples[0].labels.max() > 0
    # no temporary leftovers next to the output folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "targets"]
