"""The smallest training sections of the tracking segmenters that still give CTC-valid masks,
shared by the tracking stage, CLI golden and end-to-end tests (each adds its own extras)."""

from __future__ import annotations

import copy
from typing import Any

_TRAIN: dict[str, dict[str, Any]] = {
    "unet": {
        "model": {"arch": "unet", "features": [4, 8, 16]},
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 2,
        "val_max_images": 2,
    },
    # lstmunet and maunet: enough steps that no object fills a whole frame (CTC refuses it)
    "lstmunet": {
        "model": {"features": [8, 16], "norm": "instance"},
        "window": 3,
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 10,
        "warmup_steps": 0,
        "lr": 0.01,
    },
    "maunet": {
        "model": {"backbone": "resnet10", "features": [4, 8, 16, 32]},
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 10,
        "warmup_steps": 0,
        "lr": 0.01,
        "val_max_images": 2,
    },
}


def tiny_train(family: str, **extra: Any) -> dict[str, Any]:
    """A fresh copy of ``family``'s tiny training section, ``extra`` keys appended."""
    return {**copy.deepcopy(_TRAIN[family]), **extra}
