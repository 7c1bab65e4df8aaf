"""The "maskrcnn" family: Mask R-CNN R50-FPN for nuclei, on torchvision or detectron2.

``config`` says what to build and how to post-process, ``network`` builds, saves and loads the
networks, ``predict`` turns detections into a label image (tiled over large images), ``train``
is the Lightning module and data module of the torchvision engine and ``train_detectron2`` the
detectron2 engine's own trainer; :class:`MaskRCNNSegmenter` is the façade the stages reach
through :func:`microseg.models.get_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from microseg.errors import MissingFileError
from microseg.models import EngineFamily, Prediction, Predictor, register_model
from microseg.models.maskrcnn.config import (
    BACKBONES,
    ENGINES,
    MaskRCNNConfig,
    MaskRCNNPostConfig,
    detectron2_available,
    resolve_engine,
)
from microseg.models.maskrcnn.network import (
    MODEL_FORMAT,
    build_network,
    build_torchvision,
    detectron2_cfg,
    freeze_backbone,
    load_local_weights,
    load_maskrcnn,
    no_weight_downloads,
    save_maskrcnn,
    weights_digest,
)
from microseg.models.maskrcnn.predict import (
    Detections,
    detect_tiled,
    paste_mask,
    predict_image,
    prepare_image,
    raw_detections,
    resolve_instances,
    tile_windows,
)
from microseg.utils.devices import resolve_device

__all__ = [
    "BACKBONES",
    "ENGINES",
    "MODEL_FORMAT",
    "Detections",
    "MaskRCNNConfig",
    "MaskRCNNPostConfig",
    "MaskRCNNSegmenter",
    "build_network",
    "build_torchvision",
    "detect_tiled",
    "detectron2_available",
    "detectron2_cfg",
    "freeze_backbone",
    "load_local_weights",
    "load_maskrcnn",
    "no_weight_downloads",
    "paste_mask",
    "predict_image",
    "prepare_image",
    "raw_detections",
    "resolve_engine",
    "resolve_instances",
    "save_maskrcnn",
    "tile_windows",
    "weights_digest",
]


@register_model("maskrcnn")
@dataclass
class MaskRCNNSegmenter(EngineFamily):
    """Mask R-CNN (torchvision or detectron2 engine) with its post-processing."""

    network: nn.Module
    config: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    post: MaskRCNNPostConfig = field(default_factory=MaskRCNNPostConfig)

    train_config = "microseg.models.maskrcnn.train:MaskRCNNTrainConfig"
    train_function = "microseg.models.maskrcnn.train:train_maskrcnn"

    @classmethod
    def data_args(cls, data: Any, train: dict[str, Any]) -> tuple[Any, ...]:
        """The targets cache's train and val splits."""
        from microseg.data.targets import load_targets

        return load_targets(data, "train"), load_targets(data, "val")

    @property
    def engine(self) -> str:
        return self.config.engine

    @classmethod
    def build(cls, **params: Any) -> MaskRCNNSegmenter:
        """From ``MaskRCNNConfig`` keys plus ``post`` (a mapping); ``engine`` is resolved."""
        post = MaskRCNNPostConfig.from_mapping(params.pop("post", None) or {})
        cfg = MaskRCNNConfig.from_mapping(params)
        cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg.engine))
        return cls(build_network(cfg), cfg, post)

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> MaskRCNNSegmenter:
        """A trained network from ``best.pt`` (or :meth:`save`): the post-processing saved
        with it, overridden by ``infer`` keys (:class:`MaskRCNNPostConfig`'s, plus ``device``,
        default ``auto``), then by ``post``. ``train`` is not needed (the input scale is
        stored with the weights)."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained maskrcnn weights; run its training stage", path)
        keys = dict(infer or {})
        device = keys.pop("device", None) or keys.pop("map_location", None) or "auto"
        network, cfg, saved = load_maskrcnn(path, device)
        chosen = {**saved.as_dict(), **keys, **dict(post or {})}
        return cls(network, cfg, MaskRCNNPostConfig.from_mapping(chosen))

    def as_predictor(self) -> Predictor:
        def maskrcnn(image: np.ndarray) -> Prediction:
            labels, scores = predict_image(
                self.network, self.engine, image, self.config.scale, self.post
            )
            return labels, None, {i + 1: float(s) for i, s in enumerate(scores)}

        return maskrcnn

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """``(labels uint16 H x W, scores float32 per id)`` per image.

        Images are raw ``YX``/``YXC`` unless ``normalised=True`` (``CYX`` in [0, 1] from the
        targets cache). Other keys override :class:`MaskRCNNPostConfig` for this call;
        ``device`` (``auto | cpu | cuda[:N] | mps``) moves the network first.
        """
        normalised = bool(params.pop("normalised", False))
        device = params.pop("device", None)
        if device is not None:
            self.network.to(resolve_device(device))
        post = MaskRCNNPostConfig.from_mapping({**self.post.as_dict(), **params})
        return [
            predict_image(self.network, self.engine, im, self.config.scale, post, normalised)
            for im in images
        ]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Raw image -> labels, the callable :func:`microseg.infer.instances.predict_dataset`
        takes."""
        return self.predict([image])[0][0]

    def save(self, path: str | Path) -> Path:
        return save_maskrcnn(self.network, path, self.config, self.post)
