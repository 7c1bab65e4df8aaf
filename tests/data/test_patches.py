"""Patch sampling from d3set stacks: shapes, determinism, foreground oversampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from microseg.data.patches import (
    PatchDataset,
    context_planes,
    intensity_range,
    iter_planes,
    labeled_stacks,
    normalize,
)
from microseg.errors import ShapeMismatchError
from microseg.io.d3set import D3Set, meta_row, write_d3set
from microseg.io.tiff import open_stack, write_stack


def toy_d3set(n: int = 2, shape=(6, 64, 64), seed: int = 0, n_spines: int = 3) -> D3Set:
    """Dim noisy stacks, a bright horizontal dendrite, a few brighter square spines."""
    rng = np.random.default_rng(seed)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i in range(n):
        img = rng.normal(100, 5, shape).clip(0, None)
        den = np.zeros(shape, bool)
        den[:, 30:34, :] = True
        sp = np.zeros(shape, bool)
        for _ in range(n_spines):
            z, y, x = rng.integers(0, shape[0]), rng.integers(36, 44), rng.integers(4, 60)
            sp[z, y - 1 : y + 2, x - 1 : x + 2] = True
        img[den] += 300 * (i + 1)
        img[sp] += 500 * (i + 1)
        key = f"x{i}"
        stacks[key], dendrites[key], spines[key] = img.astype(np.uint16), den, sp
        rows.append(meta_row(shape, 0.094, 0.5, timestamp="20260101_000000"))
    return D3Set(stacks, dendrites, spines, pd.DataFrame(rows))


def test_items_have_the_documented_shapes_and_values() -> None:
    ds = PatchDataset(toy_d3set(), patch_size=32, samples_per_epoch=5, seed=1)
    assert len(ds) == 5
    item = ds[0]
    assert set(item) == {"image", "spine", "dendrite"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    for k in ("spine", "dendrite"):
        assert item[k].shape == (1, 32, 32)
        assert set(torch.unique(item[k]).tolist()) <= {0.0, 1.0}
    with pytest.raises(IndexError):
        ds[5]


def test_same_seed_same_items_new_epoch_new_items() -> None:
    a = PatchDataset(toy_d3set(), patch_size=32, samples_per_epoch=4, seed=3)
    b = PatchDataset(toy_d3set(), patch_size=32, samples_per_epoch=4, seed=3)
    for i in (3, 0, 2):  # any order
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("image", "spine", "dendrite"))
    first = a[1]["image"]
    a.set_epoch(1)
    assert not torch.equal(first, a[1]["image"])
    c = PatchDataset(toy_d3set(), patch_size=32, samples_per_epoch=4, seed=4)
    assert not torch.equal(first, c[1]["image"])


def test_foreground_oversampling_centres_patches_on_spines() -> None:
    d3 = toy_d3set(n_spines=1)
    always = PatchDataset(d3, 32, 40, fg_fraction=1.0, augment=False, seed=0)
    never = PatchDataset(d3, 32, 40, fg_fraction=0.0, augment=False, seed=0)
    hit_always = np.mean([always[i]["spine"].max().item() for i in range(40)])
    hit_never = np.mean([never[i]["spine"].max().item() for i in range(40)])
    assert hit_always == 1.0
    assert hit_never < 0.5


def test_normalisation_is_per_stack_percentiles() -> None:
    d3 = toy_d3set()
    stacks = labeled_stacks(d3, percentiles=(1.0, 99.0))
    for i, s in enumerate(stacks):
        raw = d3.stacks[f"x{i}"]
        lo, hi = np.percentile(raw, (1.0, 99.0))
        np.testing.assert_allclose(s.image, (raw - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    # second stack is brighter, but its normalised dendrite looks the same
    den = [s.image[s.dendrite].mean() for s in stacks]
    assert den[0] == pytest.approx(den[1], rel=0.3)


def test_context_channels_are_neighbouring_planes_clamped() -> None:
    assert context_planes(5, 0, 1) == [0, 0, 1]
    assert context_planes(5, 4, 2) == [2, 3, 4, 4, 4]
    d3 = toy_d3set()
    ds = PatchDataset(d3, 32, 3, context=1, augment=False, seed=0)
    assert ds[0]["image"].shape == (3, 32, 32)
    planes = list(iter_planes(ds.stacks, context=1, stride=2))
    assert len(planes) == 2 * 3
    img, sp, den = planes[0]
    assert img.shape == (3, 64, 64) and sp.shape == (64, 64) and den.dtype == bool
    np.testing.assert_array_equal(img[0], img[1])  # plane 0 clamps its upper neighbour


def test_augmentation_keeps_masks_aligned_with_the_image() -> None:
    ds = PatchDataset(toy_d3set(n=1), 32, 30, fg_fraction=1.0, augment=True, seed=5)
    for i in range(30):
        item = ds[i]
        if item["spine"].sum() > 4:
            # spines are the brightest structures: their pixels stay brighter than background
            inside = item["image"][item["spine"] > 0].mean()
            outside = item["image"][(item["spine"] + item["dendrite"]) == 0].mean()
            assert inside > outside + 0.5


def test_works_with_a_dataloader_and_d3set_paths(tmp_path: Path) -> None:
    path = write_d3set(tmp_path / "train.d3set", toy_d3set())
    ds = PatchDataset([path], patch_size=32, samples_per_epoch=6, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 1, 32, 32)
    assert type(batch["image"]) is torch.Tensor


def test_rejects_patches_larger_than_stacks() -> None:
    with pytest.raises(ShapeMismatchError, match="patch size"):
        PatchDataset(toy_d3set(), patch_size=128)


def test_intensity_range_streams_integer_stacks_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 5000, (40, 16, 16)).astype(np.uint16)
    write_stack(tmp_path / "s.tif", arr)

    class Counting:
        """A lazy stack that records which planes are read."""

        def __init__(self, stack) -> None:
            self.stack, self.reads = stack, []

        def __len__(self) -> int:
            return len(self.stack)

        def __getitem__(self, z: int) -> np.ndarray:
            self.reads.append(z)
            return self.stack[z]

    with open_stack(tmp_path / "s.tif") as stack:
        counting = Counting(stack)
        got = intensity_range(counting, (1.0, 99.8))
    assert got == pytest.approx(tuple(np.percentile(arr, (1.0, 99.8))), abs=1e-9)
    assert sorted(counting.reads) == list(range(40))  # one plane at a time, each once
    for q in ((0.0, 100.0), (37.3, 50.0)):
        assert intensity_range(arr.astype(np.uint8), q) == pytest.approx(
            tuple(np.percentile(arr.astype(np.uint8), q))
        )
    floats = arr.astype(np.float32)
    counting = Counting(floats)
    sub = intensity_range(counting, max_planes=8)
    assert sorted(set(counting.reads)) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert sub == pytest.approx(tuple(np.percentile(arr, (1.0, 99.8))), abs=100)
    np.testing.assert_allclose(normalize(np.array([10.0, 20.0]), 10.0, 20.0), [0.0, 1.0])
    assert normalize(np.array([5.0]), 3.0, 3.0)[0] == 2.0
