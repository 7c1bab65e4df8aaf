"""A tiny prepared dataset and its targets cache for the nnunet family's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import prepare_targets
from microseg.io.tiff import write_stack

#: (split, modality, shape, colour, nm per pixel)
TOY = [
    ("train", "fluorescence", (64, 64), False, 250.0),
    ("train", "fluorescence", (64, 96), False, 250.0),
    ("train", "fluorescence", (48, 64), False, None),
    ("train", "brightfield", (80, 64), False, None),
    ("val", "fluorescence", (64, 64), False, None),
    ("test", "fluorescence", (128, 128), False, None),
]
FG, BG = 200, 20  # exact intensities inside / outside nuclei (no noise: stats are known)


def toy_sample(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 5):
        centre = (rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8))
        labels[disk(centre, rng.uniform(4, 7), shape=shape)] = i
    image = np.where(labels > 0, FG, BG).astype(np.uint8)
    return labels, image


def write_prepared(root: Path, samples=TOY) -> Path:
    rows = []
    for i, (split, modality, shape, colour, nm) in enumerate(samples):
        labels, image = toy_sample(i, shape)
        if colour:
            image = np.stack([image, image // 2, 255 - image], axis=-1)
        write_stack(root / "images" / f"t{i}.tif", image)
        write_stack(root / "labels" / f"t{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"t{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/t{i}.tif",
                "label_path": f"labels/t{i}.tif",
                "label_kind": "instance",
                "modality": modality,
                "voxel_size_y_nm": nm if nm is not None else float("nan"),
                "voxel_size_x_nm": nm if nm is not None else float("nan"),
            }
        )
    write_manifest(rows, root)
    return root


@pytest.fixture(scope="package")
def toy_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("nnunet") / "prepared")


@pytest.fixture(scope="package")
def toy_targets(toy_prepared: Path) -> Path:
    out = toy_prepared.parent / "targets"
    prepare_targets(toy_prepared, out, progress=False)
    return out
