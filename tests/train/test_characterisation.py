"""Characterisation of today's trainers: a tiny fixed run per family must land where it did.

Each trainable family (U-Net, Prob-UNet, Mask R-CNN on torchvision with resnet18) trains a few
epochs of a few steps on a toy dataset on one CPU thread; its best validation metrics and its
number of optimizer steps are compared with ``tests/data/characterisation.json``, which
``benchmarks/characterise_families.py`` wrote from several seeds of the pre-Lightning code.
A metric passes when it lies within the pinned tolerance (``max(3 x seed std, floor)``) of
the pinned seed mean; the step count must match exactly.

Only the imports below and :data:`FAMILIES` know the training API: when the trainers move (to
Lightning), those lines are all that should change. The toy data are frozen copies of the
recipes in ``tests/train/test_train_unet.py`` and ``test_train_punet.py`` (not imported:
those modules may change with the port, the characterisation data must not).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.draw import disk
from torch.optim.optimizer import register_optimizer_step_post_hook

from microseg.data.manifest import write_manifest
from microseg.data.targets import load_targets, prepare_targets
from microseg.io.d3set import D3Set, meta_row
from microseg.io.tiff import write_stack

# -- the training API: the only lines that know it -----------------------------------------
from microseg.models.maskrcnn.train import MaskRCNNTrainConfig, train_maskrcnn
from microseg.models.punet.train import PunetTrainConfig, train_punet
from microseg.models.unet.train import UnetTrainConfig, train_unet

PINNED = Path(__file__).resolve().parents[1] / "data" / "characterisation.json"
PINNED_SEED = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- toy data (frozen) ----------------------------------------------------------------------
def _nuclei_sample(seed: int, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Five bright disks of radius 4-7 px on a noisy dark background (uint8 image)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 6):
        labels[disk(rng.uniform(8, shape[0] - 8, 2), rng.uniform(4, 7), shape=shape)] = i
    image = 20 + 160 * (labels > 0) + rng.normal(0, 8, shape)
    return labels, np.clip(image, 0, 255).astype(np.uint8)


def nuclei_targets(root: Path) -> Path:
    """A targets cache of 4 train and 2 val 64x64 nuclei images (U-Net and Mask R-CNN)."""
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        labels, image = _nuclei_sample(i)
        write_stack(root / "prepared" / "images" / f"t{i}.tif", image)
        write_stack(root / "prepared" / "labels" / f"t{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"t{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/t{i}.tif",
                "label_path": f"labels/t{i}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, root / "prepared")
    prepare_targets(root / "prepared", root / "targets", progress=False)
    return root / "targets"


def spine_d3set(n: int, seed: int, shape=(4, 64, 64)) -> D3Set:
    """Noisy background, a bright dendrite band, brighter 3x3 spines next to it."""
    rng = np.random.default_rng(seed)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i in range(n):
        img = rng.normal(100, 5, shape).clip(0, None)
        den = np.zeros(shape, bool)
        den[:, 28:34, :] = True
        sp = np.zeros(shape, bool)
        for z in range(shape[0]):
            for x in rng.choice(np.arange(4, 60, 6), size=4, replace=False):
                y = int(rng.integers(37, 42))
                sp[z, y - 1 : y + 2, x - 1 : x + 2] = True
        img[den] += 300
        img[sp] += 600
        key = f"x{i}"
        stacks[key], dendrites[key], spines[key] = img.astype(np.uint16), den, sp
        rows.append(meta_row(shape, 0.094, 0.5, timestamp="20260101_000000"))
    return D3Set(stacks, dendrites, spines, pd.DataFrame(rows))


@dataclass(frozen=True)
class ToyData:
    targets: Path  # nuclei targets cache
    spines_train: D3Set
    spines_val: D3Set


def make_toy_data(root: Path) -> ToyData:
    return ToyData(nuclei_targets(root), spine_d3set(2, seed=0), spine_d3set(1, seed=1))


# -- the adapter: family -> tiny run -> best validation metrics -----------------------------
def _unet(data: ToyData, out: Path, seed: int) -> Any:
    cfg = UnetTrainConfig.from_mapping(
        {
            "model": {"arch": "unet", "features": [4, 8, 16], "num_res_units": 0},
            "patch_size": 32,
            "batch_size": 8,
            "epochs": 4,
            "steps_per_epoch": 25,
            "warmup_steps": 0,
            "lr": 1e-2,
            "device": "cpu",
            "num_threads": 1,
            "progress": False,
            "seed": seed,
        }
    )
    return train_unet(data.targets, out, cfg)


def _punet(data: ToyData, out: Path, seed: int) -> Any:
    cfg = PunetTrainConfig(
        filters=(4, 8, 16),
        latent_filters=(4, 8),
        latent_dim_spine=2,
        latent_dim_dendrite=2,
        head_convs=3,
        patch_size=32,
        batch_size=4,
        fg_fraction=0.8,
        epochs=4,
        steps_per_epoch=20,
        lr=3e-2,
        lr_warmup_steps=10,
        kl_warmup_epochs=1,
        device="cpu",
        num_threads=1,
        progress=False,
        seed=seed,
    )
    return train_punet(data.spines_train, data.spines_val, out, cfg)


def _maskrcnn(data: ToyData, out: Path, seed: int) -> Any:
    cfg = MaskRCNNTrainConfig.from_mapping(
        {
            "model": {
                "engine": "torchvision",
                "backbone": "resnet18",
                "box_batch_size_per_image": 16,
                "rpn_pre_nms_top_n_test": 100,
                "rpn_post_nms_top_n_test": 20,
                "box_detections_per_img": 10,
            },
            "post": {"min_size": 5},
            "patch_size": 64,
            "batch_size": 1,
            "epochs": 2,
            "steps_per_epoch": 15,
            "optimizer": "adamw",
            "lr": 1e-3,
            "warmup_steps": 3,
            "device": "cpu",
            "num_threads": 1,
            "progress": False,
            "seed": seed,
        }
    )
    train = load_targets(data.targets, "train")
    val = load_targets(data.targets, "val")
    return train_maskrcnn(train, val, out, cfg)


def _best_and_last(result: Any) -> dict[str, Mapping[str, float]]:
    """Today's ``TrainResult``: ``best`` (the epoch that won the model selection) and the
    last epoch's metrics (``history[-1]``)."""
    return {"best": result.best, "last": result.history[-1]}


@dataclass(frozen=True)
class Family:
    train: Callable[[ToyData, Path, int], Any]  # builds the config and trains -> a result
    read: Callable[[Any], Mapping[str, Mapping[str, float]]]  # result -> {"best"|"last": ...}
    metrics: tuple[str, ...]  # the validation metrics that are pinned, of best and last


FAMILIES: dict[str, Family] = {
    "unet": Family(_unet, _best_and_last, ("val_f1_50", "val_dice")),
    "punet": Family(_punet, _best_and_last, ("val_spine_dice", "val_dendrite_dice")),
    "maskrcnn": Family(_maskrcnn, _best_and_last, ("val_f1_50", "val_dice")),
}


# -- measuring ------------------------------------------------------------------------------
class StepCounter:
    """Counts ``optimizer.step()`` calls of every torch optimizer, whatever loop drives them."""

    def __init__(self) -> None:
        self.steps = 0

    def __enter__(self) -> StepCounter:
        self._handle = register_optimizer_step_post_hook(self._count)
        return self

    def _count(self, *_: Any) -> None:
        self.steps += 1

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


def characterise(name: str, data: ToyData, out: Path, seed: int) -> dict[str, float]:
    """One tiny run of family ``name``: ``best.<metric>``, ``last.<metric>`` and
    ``optimizer_steps``."""
    family = FAMILIES[name]
    with StepCounter() as counter:
        read = family.read(family.train(data, out, seed))
    row = {f"{when}.{m}": float(read[when][m]) for when in ("best", "last") for m in family.metrics}
    row["optimizer_steps"] = float(counter.steps)
    return row


# -- the test -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToyData]:
    yield make_toy_data(tmp_path_factory.mktemp("characterisation"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tiny_run_lands_within_seed_noise_of_the_pinned_mean(
    name: str, toy_data: ToyData, tmp_path: Path
) -> None:
    pinned = json.loads(PINNED.read_text())
    assert pinned["pinned_seed"] == PINNED_SEED
    expected: dict[str, dict[str, float]] = pinned["families"][name]
    torch.set_num_threads(1)
    got = characterise(name, toy_data, tmp_path / name, PINNED_SEED)
    assert set(got) == set(expected), (got, expected)
    off = {
        m: (got[m], e["mean"], e["tolerance"])
        for m, e in expected.items()
        if not abs(got[m] - e["mean"]) <= e["tolerance"]
    }
    assert not off, f"{name}: (got, pinned mean, tolerance) {off}; all: {got}"
