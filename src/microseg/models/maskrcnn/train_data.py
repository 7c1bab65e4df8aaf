"""Mask R-CNN training config and the patch/target helpers both engines share (torchvision's
Lightning module in ``train``, detectron2's trainer in ``train_detectron2``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from microseg.data.targets import match_channels
from microseg.errors import ConfigError
from microseg.models.maskrcnn.config import MaskRCNNConfig, MaskRCNNPostConfig
from microseg.train.engine import EngineConfig
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)


BEST_METRIC = "val_f1_50"

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


@dataclass
class MaskRCNNTrainConfig(EngineConfig):
    """Every knob of :func:`train_maskrcnn`: the engine's, plus ``model``/``post`` (the
    family's configs), patches and the optimizer."""

    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    post: MaskRCNNPostConfig = field(default_factory=MaskRCNNPostConfig)
    # engine defaults of this family
    grad_clip_norm: float | None = 10.0
    precision: str = "32-true"
    # data
    patch_size: int = 256
    batch_size: int = 4
    augment: bool = True
    min_instance_pixels: int = 4
    # schedule
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    # validation
    val_max_images: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.model, Mapping):
            self.model = MaskRCNNConfig.from_mapping(self.model)
        if isinstance(self.post, Mapping):
            self.post = MaskRCNNPostConfig.from_mapping(self.post)
        checks = {
            "batch_size": self.batch_size >= 1,
            "patch_size": self.patch_size >= 32,
            "lr": self.lr > 0,
            "optimizer": self.optimizer in ("sgd", "adamw"),
            "warmup_steps": self.warmup_steps >= 0,
            "min_instance_pixels": self.min_instance_pixels >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid maskrcnn training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaskRCNNTrainConfig:
        """From a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "maskrcnn training"))

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly (``model.*``, ``post.*`` prefixed) for logging as params."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict):
                out.update(
                    {f"{k}.{kk}": list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                )
            else:
                out[k] = v
        return out


# -- patches ----------------------------------------------------------------------------------
def random_patch(
    image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, augment: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop of a ``CYX`` image and its labels (zero-padded when smaller),
    flipped and rotated by a multiple of 90 degrees when ``augment``."""
    h, w = labels.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        labels = np.pad(labels, ((0, ph), (0, pw)))
        h, w = labels.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    image, labels = image[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]
    if augment:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[::-1]
        if rng.random() < 0.5:
            image, labels = image[:, :, ::-1], labels[:, ::-1]
        k = int(rng.integers(0, 4))
        image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels)


def scale_patch(
    image: np.ndarray, labels: np.ndarray, scale: float
) -> tuple[torch.Tensor, np.ndarray]:
    """``3 x H x W`` tensor and labels resized by ``scale`` (bilinear / nearest)."""
    x = torch.from_numpy(np.ascontiguousarray(match_channels(image, 3)))
    if scale == 1.0:
        return x, labels
    x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
    lab = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    lab = F.interpolate(lab, size=tuple(x.shape[-2:]), mode="nearest")[0, 0]
    return x, lab.numpy().astype(labels.dtype)


def instance_targets(labels: np.ndarray, min_pixels: int = 1) -> dict[str, torch.Tensor]:
    """torchvision detection targets (boxes ``x0, y0, x1, y1``, labels 1, uint8 masks)."""
    labels = np.asarray(labels)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[areas >= min_pixels]
    h, w = labels.shape
    masks = np.zeros((len(ids), h, w), np.uint8)
    boxes = np.zeros((len(ids), 4), np.float32)
    for i, v in enumerate(ids):
        m = labels == v
        ys, xs = np.nonzero(m)
        masks[i] = m
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }
