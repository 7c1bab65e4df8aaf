"""The "maunet" family: a ResNet encoder with a 3-class decoder and a distance decoder
(MAUNet, NeurIPS 2022 Cell Segmentation challenge) + a distance-seeded watershed.

``network`` builds and saves the networks (one backbone, or an ensemble whose outputs are
averaged), ``predict`` runs them over whole images, ``train`` is the Lightning module and data
module; :class:`MaunetSegmenter` is the façade the stages reach through
:func:`microseg.models.get_model`. Its :meth:`~MaunetSegmenter.probabilities` are four
channels (class softmax + distance), so ``evaluate_cells`` chooses the post-processing
(``t_seed`` on the distance, ``t_mask``, ``elevation``, ``min_size``...) on the val split as
for the ``unet`` family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from microseg.errors import ConfigError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import EngineFamily, Prediction, Predictor, register_model
from microseg.models.maunet.network import (
    BACKBONES,
    MODEL_FORMAT,
    SIZE_MULTIPLE,
    Maunet,
    MaunetConfig,
    build_maunet,
    load_maunet,
    save_maunet,
)
from microseg.models.maunet.predict import (
    DEFAULT_POST,
    InferConfig,
    predict_instances,
    predict_probs,
)
from microseg.models.unet import _window, instance_scores  # the same windows and scores
from microseg.utils.devices import model_device

__all__ = [
    "BACKBONES",
    "DEFAULT_POST",
    "MODEL_FORMAT",
    "InferConfig",
    "Maunet",
    "MaunetConfig",
    "MaunetSegmenter",
    "build_maunet",
    "load_maunet",
    "predict_instances",
    "predict_probs",
    "save_maunet",
]


@register_model("maunet")
@dataclass
class MaunetSegmenter(EngineFamily):
    """A dual-decoder MAUNet (or an ensemble of them) with its inference config."""

    network: nn.Module
    config: MaunetConfig = field(default_factory=MaunetConfig)
    infer: InferConfig = field(default_factory=lambda: InferConfig(post=DEFAULT_POST))

    train_config = "microseg.models.maunet.train:MaunetTrainConfig"
    train_function = "microseg.models.maunet.train:train_maunet"

    @property
    def post(self) -> PostprocessConfig:
        return self.infer.post

    @classmethod
    def build(cls, **params: Any) -> MaunetSegmenter:
        post = {**asdict(DEFAULT_POST), **(params.pop("post", None) or {})}
        cfg = MaunetConfig.from_mapping(params)
        return cls(build_maunet(cfg), cfg, InferConfig(post=PostprocessConfig(**post)))

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Any = None,
        **_: Any,
    ) -> MaunetSegmenter:
        """A trained network and its inference config: the training run's window, overlap
        and blend, then ``infer`` overrides; post-processing: the one saved with the weights,
        updated by ``infer["post"]``, then by ``post`` (e.g. chosen on validation)."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained maunet weights; run its training stage", path)
        net, cfg, trained_post = load_maunet(path)
        infer = dict(infer or {})
        chosen = {**asdict(trained_post), **(infer.pop("post", None) or {}), **(post or {})}
        icfg = InferConfig.from_mapping({**_window(train or {}), **infer, "post": chosen})
        if icfg.roi % SIZE_MULTIPLE:
            raise ConfigError(
                f"maunet windows must be a multiple of {SIZE_MULTIPLE}; roi={icfg.roi}"
            )
        return cls(net.to(model_device(net, icfg.device)), cfg, icfg)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """``(4, H, W)`` of a raw image: class softmax and predicted normalised distance (what
        post-processing searches run on)."""
        return predict_probs(self.network, image, self.infer)

    def as_predictor(self) -> Predictor:
        def maunet(image: np.ndarray) -> Prediction:
            labels, probs = predict_instances(self.network, image, self.infer)
            fg = 1.0 - probs[0]
            return labels, fg, instance_scores(labels, fg)

        return maunet

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """``(labels uint16, probs float32 4xHxW)`` per raw image (``YX`` or ``YXC``)."""
        cfg = InferConfig.from_mapping({**asdict(self.infer), **params}) if params else self.infer
        return [predict_instances(self.network, image, cfg) for image in images]

    def save(self, path: str | Path) -> Path:
        return save_maunet(self.network, path, self.config, self.infer.post)
