"""The "lstmunet" family: LSTM-UNet (Arbelle & Raviv, ISBI 2019) for time-lapse sequences.

``network`` holds the ConvLSTM encoder U-Net and its model file, ``predict`` segments a
sequence frame by frame with the LSTM state carried, ``train`` is the Lightning module and
data module (windows of consecutive frames of the U-Net targets cache).
:class:`LstmUnetSegmenter` is the façade the stages reach through
:func:`microseg.models.get_model`: a sequence segmenter (``predict_sequence``, what the
tracking stages call) that is also an ``InstanceSegmenter`` of single images (a sequence of
one frame: no memory, for the benchmarks that have no time axis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microseg.errors import MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import EngineFamily, Prediction, Predictor, register_model
from microseg.models.lstmunet.network import (
    MODEL_FORMAT,
    ConvLSTMCell,
    LstmUnet,
    LstmUnetConfig,
    build_lstmunet,
    load_lstmunet,
    save_lstmunet,
)
from microseg.models.lstmunet.predict import (
    SequenceInferConfig,
    predict_sequence,
    predict_sequence_probs,
)
from microseg.models.unet import instance_scores
from microseg.utils.devices import model_device

__all__ = [
    "MODEL_FORMAT",
    "ConvLSTMCell",
    "LstmUnet",
    "LstmUnetConfig",
    "LstmUnetSegmenter",
    "SequenceInferConfig",
    "build_lstmunet",
    "load_lstmunet",
    "predict_sequence",
    "predict_sequence_probs",
    "save_lstmunet",
]


@register_model("lstmunet")
@dataclass
class LstmUnetSegmenter(EngineFamily):
    """An LSTM-UNet with its inference config, behind the ``models`` protocol."""

    network: LstmUnet
    infer: SequenceInferConfig = field(default_factory=SequenceInferConfig)

    train_config = "microseg.models.lstmunet.train:LstmUnetTrainConfig"
    train_function = "microseg.models.lstmunet.train:train_lstmunet"

    @property
    def config(self) -> LstmUnetConfig:
        return self.network.config

    @property
    def post(self) -> PostprocessConfig:
        return self.infer.post

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Any = None,
        **_: Any,
    ) -> LstmUnetSegmenter:
        """A trained network and its inference config (``infer`` keys of
        :class:`SequenceInferConfig`); post-processing from ``post``, else ``infer["post"]``,
        else the one saved with the weights. ``train`` is accepted for the protocol."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained lstmunet weights; run its training stage", path)
        net, trained_post = load_lstmunet(path)
        infer = dict(infer or {})
        chosen = post if post is not None else infer.get("post", asdict(trained_post))
        icfg = SequenceInferConfig.from_mapping({**infer, "post": chosen})
        return cls(net.to(model_device(net, icfg.device)), icfg)

    def predict_sequence(self, frames: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(labels uint16 TxHxW, probs float32 Tx3xHxW)`` of raw frames (``TYX``/``TYXC``),
        each frame segmented with the state the frames before it left."""
        return predict_sequence(self.network, frames, self.infer)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Softmax ``(3, H, W)`` of one raw image seen as a sequence of one frame."""
        return predict_sequence_probs(self.network, [image], self.infer)[0]

    def as_predictor(self) -> Predictor:
        """One raw image -> instances, as a sequence of one frame (no memory)."""

        def lstmunet(image: np.ndarray) -> Prediction:
            labels, probs = predict_sequence(self.network, [image], self.infer)
            fg = 1.0 - probs[0, 0]
            return labels[0], fg, instance_scores(labels[0], fg)

        return lstmunet

    def save(self, path: str | Path) -> Path:
        return save_lstmunet(self.network, path, self.infer.post)
