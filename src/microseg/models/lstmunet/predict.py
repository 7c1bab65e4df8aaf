"""The LSTM-UNet's predictor: a whole sequence, frame by frame, the LSTM state carried along.

Every frame is percentile normalised alone (as the targets cache normalises training frames),
zero-padded to a multiple of the network's size step, pushed through the network with the
state the previous frame left, and cropped back; the softmax goes through the U-Net family's
seeded watershed (:func:`microseg.infer.watershed.probs_to_instances`). Whole frames, no
sliding window: the state of a frame is the state of the whole field of view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from microseg.data.targets import match_channels
from microseg.errors import DataFormatError
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.models.lstmunet.network import LstmUnet, State
from microseg.models.unet.predict import prepare_input
from microseg.utils.devices import model_device
from microseg.utils.fields import known_fields


@dataclass(frozen=True)
class SequenceInferConfig:
    """How a sequence is segmented: normalisation, post-processing, device."""

    percentiles: tuple[float, float] = (1.0, 99.0)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.post, Mapping):
            object.__setattr__(self, "post", PostprocessConfig.from_mapping(self.post))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SequenceInferConfig:
        return cls(**known_fields(cls, values, "lstmunet inference"))


def _pad(x: torch.Tensor, m: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -w % m, 0, -h % m))


@torch.no_grad()
def predict_sequence_probs(
    model: LstmUnet,
    frames: Iterable[np.ndarray],
    cfg: SequenceInferConfig | None = None,
    normalised: bool = False,
) -> np.ndarray:
    """Softmax ``(T, 3, H, W)`` float32 of a sequence of raw frames (``YX``/``YXC``), or of
    normalised ``CYX`` frames with ``normalised=True``; the state runs from the first frame."""
    cfg = cfg or SequenceInferConfig()
    channels = model.config.in_channels
    device = model_device(model, cfg.device)
    was_training = model.training
    model.eval()
    state: State | None = None
    out = []
    try:
        for frame in frames:
            if normalised:
                x = match_channels(np.asarray(frame, np.float32), channels)
            else:
                x = prepare_input(np.asarray(frame), channels, cfg.percentiles)
            h, w = x.shape[-2:]
            t = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)
            logits, state = model(_pad(t, model.config.size_multiple), state)
            probs = torch.softmax(logits[0, 0, :, :h, :w].float(), dim=0)
            out.append(probs.cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        raise DataFormatError("an empty sequence has nothing to segment")
    return np.stack(out)


def predict_sequence(
    model: LstmUnet,
    frames: Iterable[np.ndarray],
    cfg: SequenceInferConfig | None = None,
    normalised: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels uint16 TxHxW, probs float32 Tx3xHxW)`` of a sequence."""
    cfg = cfg or SequenceInferConfig()
    probs = predict_sequence_probs(model, frames, cfg, normalised)
    labels = np.stack([probs_to_instances(p, cfg.post) for p in probs]).astype(np.uint16)
    return labels, probs
