"""The "unet" family: MONAI 2D U-Nets (background / interior / boundary) + seeded watershed.

``network`` builds and saves the networks, ``predict`` runs them over whole images,
``train`` is the Lightning module and data module; :class:`UnetSegmenter` is the façade the
stages reach through :func:`microseg.models.get_model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from torch import nn

from microseg.errors import MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import EngineFamily, Prediction, Predictor, register_model
from microseg.models.unet.network import (
    ARCHS,
    MODEL_FORMAT,
    UnetConfig,
    build_unet,
    load_unet,
    model_in_channels,
    save_unet,
)
from microseg.models.unet.predict import InferConfig, predict_instances, predict_probs
from microseg.utils.devices import model_device

__all__ = [
    "ARCHS",
    "MODEL_FORMAT",
    "InferConfig",
    "UnetConfig",
    "UnetSegmenter",
    "build_unet",
    "instance_scores",
    "load_unet",
    "model_in_channels",
    "predict_instances",
    "predict_probs",
    "save_unet",
]


def instance_scores(labels: np.ndarray, prob: np.ndarray) -> dict[int, float]:
    """Mean foreground probability of each instance (its confidence for COCO AP)."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return {}
    means = ndimage.mean(prob, labels, ids)
    return {int(i): float(m) for i, m in zip(ids, np.atleast_1d(means), strict=True)}


@register_model("unet")
@dataclass
class UnetSegmenter(EngineFamily):
    """A 3-class MONAI U-Net with its inference config, behind the ``models`` protocol."""

    network: nn.Module
    config: UnetConfig = field(default_factory=UnetConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    train_config = "microseg.models.unet.train:UnetTrainConfig"
    train_function = "microseg.models.unet.train:train_unet"

    @property
    def post(self) -> PostprocessConfig:
        return self.infer.post

    @classmethod
    def build(cls, **params: Any) -> UnetSegmenter:
        post = params.pop("post", None) or {}
        cfg = UnetConfig.from_mapping(params)
        return cls(build_unet(cfg), cfg, InferConfig(post=PostprocessConfig.from_mapping(post)))

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Any = None,
        **_: Any,
    ) -> UnetSegmenter:
        """A trained network and its inference config: the training run's window, overlap
        and blend, then ``infer`` overrides; post-processing from ``post`` (e.g. chosen on
        validation), else ``infer["post"]``, else the one saved with the weights."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained unet weights; run its training stage", path)
        net, cfg, trained_post = load_unet(path)
        infer = dict(infer or {})
        base = _window(train or {})
        chosen = post if post is not None else infer.get("post", asdict(trained_post))
        icfg = InferConfig.from_mapping({**base, **infer, "post": chosen})
        return cls(net.to(model_device(net, icfg.device)), cfg, icfg)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Softmax ``(3, H, W)`` of a raw image (what post-processing searches run on)."""
        return predict_probs(self.network, image, self.infer)

    def as_predictor(self) -> Predictor:
        def unet(image: np.ndarray) -> Prediction:
            labels, probs = predict_instances(self.network, image, self.infer)
            fg = 1.0 - probs[0]
            return labels, fg, instance_scores(labels, fg)

        return unet

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """``(labels uint16, probs float32 3xHxW)`` per raw image (``YX`` or ``YXC``)."""
        cfg = InferConfig.from_mapping({**asdict(self.infer), **params}) if params else self.infer
        return [predict_instances(self.network, image, cfg) for image in images]

    def save(self, path: str | Path) -> Path:
        return save_unet(self.network, path, self.config, self.infer.post)


def _window(train: Mapping[str, Any]) -> dict[str, Any]:
    """The sliding window a training section implies (roi = patch size, overlap, blend)."""
    keys = {"patch_size": "roi", "overlap": "overlap", "blend": "blend"}
    defaults = {"roi": 128, "overlap": 0.25, "blend": "gaussian"}
    return defaults | {keys[k]: v for k, v in train.items() if k in keys}
