"""MAUNet's predictor: whole images through sliding windows, then the distance-seeded watershed.

The windows, blending (``gaussian`` or ``min``), test-time mirroring and input normalisation
are the ``unet`` family's (:class:`~microseg.models.unet.predict.InferConfig`, same knobs); what
is blended here is four channels, the class softmax and the predicted normalised distance,
already averaged over an ensemble's members by :meth:`Maunet.forward`. Post-processing is
:func:`microseg.infer.watershed.probs_to_instances` on those four channels (seeds from the
distance, flooding ``-distance`` inside ``1 - P(background) > t_mask`` by default).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from microseg.data.targets import match_channels
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.models.maunet.network import Maunet
from microseg.models.unet.network import model_in_channels
from microseg.models.unet.predict import MIRRORS, InferConfig, _min_blend, prepare_input
from microseg.utils.devices import model_device

#: maunet's default post-processing: seeds at the peaks of the predicted distance (h-maxima of
#: height 0.1 where it exceeds 0.1), grown over ``-distance`` inside the predicted foreground,
#: the distance first weighted by the interior share and smoothed by 1 px. Peaks, not a fixed
#: cut: after 100-500 steps on DSB 2018 the regressed distance peaks at 0.2-0.45, and peak seeds
#: gave val F1@0.5 0.742 against 0.712 for the best fixed cut (0.5) and 0.720 for the
#: interior-probability seeds of the same network. Weighting and smoothing: the demo's MAUNet
#: on 81 val images, F1 0.784 (280 merges) against 0.757 (288) for the raw distance and 0.739
#: (360) for its 3-class map decoded as the U-Net's (``benchmarks/bench_merges.py``).
DEFAULT_POST = PostprocessConfig(
    seeds="distance",
    elevation="predicted_distance",
    t_seed=0.1,
    peak_h=0.1,
    seed_weight="interior",
    seed_sigma=1.0,
)

__all__ = ["DEFAULT_POST", "InferConfig", "predict_instances", "predict_probs"]


@torch.no_grad()
def predict_probs(
    model: Maunet, image: np.ndarray, cfg: InferConfig | None = None, normalised: bool = False
) -> np.ndarray:
    """``(4, H, W)`` float32 of a whole image: background / interior / boundary softmax and
    the normalised distance (``normalised=True``: ``image`` is the targets cache's ``CYX``)."""
    cfg = cfg or InferConfig()
    channels = model_in_channels(model)
    if normalised:
        x = match_channels(np.asarray(image, np.float32), channels)
    else:
        x = prepare_input(image, channels, cfg.percentiles)
    device = model_device(model, cfg.device)
    was_training = model.training
    model.eval()
    try:
        t = torch.from_numpy(np.ascontiguousarray(x))[None].to(device)

        def net(batch: torch.Tensor) -> torch.Tensor:
            out = model(batch)
            if cfg.tta:
                for dims in MIRRORS:
                    out = out + model(batch.flip(dims)).flip(dims)
                out = out / (1 + len(MIRRORS))
            return out

        if cfg.blend == "gaussian":
            inferer = SlidingWindowInferer(
                roi_size=(cfg.roi, cfg.roi),
                sw_batch_size=cfg.sw_batch_size,
                overlap=cfg.overlap,
                mode="gaussian",
                padding_mode="constant",
            )
            probs = inferer(t, net)
        else:
            probs = _min_blend(net, t, cfg.roi, cfg.overlap, cfg.sw_batch_size)
    finally:
        model.train(was_training)
    return probs[0].float().cpu().numpy()


def predict_instances(
    model: Maunet, image: np.ndarray, cfg: InferConfig | None = None, normalised: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels uint16 HxW, probs float32 4xHxW)`` for one whole image; a raw image is
    post-processed with its kind's knobs (``post.by_modality``), a normalised one with the
    shared ones."""
    cfg = cfg or InferConfig(post=DEFAULT_POST)
    probs = predict_probs(model, image, cfg, normalised=normalised)
    post = cfg.post if normalised else cfg.post.for_image(image)
    return probs_to_instances(probs, post), probs
