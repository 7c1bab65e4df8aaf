"""The U-Net family's predictor: whole images through sliding windows, blending, watershed.

Whole-image instance prediction with a 3-class U-Net: sliding windows, blending, watershed.

:func:`predict_probs` runs the network over windows of ``roi`` pixels overlapping by
``overlap`` (a fraction of the window) and blends the per-window *softmax probabilities*:

* ``blend="gaussian"`` -- :class:`monai.inferers.SlidingWindowInferer` with
  ``mode="gaussian"``: each window's probabilities are weighted by a Gaussian centred on the
  window, so every pixel is dominated by the windows that see it with the most context.
* ``blend="min"`` -- conservative min-blend stitching: for every pixel, keep the probability
  vector of the window that gives it the *lowest foreground probability*
  ``1 - P(background)`` (equivalently the highest background probability). A pixel is then
  foreground only if every window that covers it agrees, which suppresses the half-seen
  objects and border artefacts that a window produces at its edges, at the price of slightly
  thinner objects. (The DeepD3_V2 seed code that inspired the option contains no stitching
  code; the rule is ours.)

With ``tta=True`` every window is also predicted mirrored along x, y and both, and the four
softmaxes are averaged (nnU-Net's test-time mirroring; 4x the inference time).

Images smaller than a window are zero-padded (both modes) and cropped back. Images come raw
(``YX`` greyscale or ``YXC`` colour, as ``ingest`` writes them) and are percentile normalised
and matched to the network's input channels here (greyscale repeated to 3 channels), or come
already normalised (``CYX`` float32 from the targets cache) with ``normalised=True``.

:func:`predict_dataset` writes ``labels/<id>.tif`` (uint16), optionally ``probs/<id>.tif``
(float32 ``CYX``), and ``objects.csv``: per image the object count and the area distribution
(mean, median, 10th and 90th percentile, in pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn
from tqdm.auto import tqdm

from microseg.data.manifest import read_manifest
from microseg.data.targets import match_channels, percentile_normalise
from microseg.errors import ConfigError
from microseg.infer.objects import object_stats
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.io.tiff import read_stack, write_stack
from microseg.models.unet.network import model_in_channels
from microseg.utils.atomic import atomic_path
from microseg.utils.devices import model_device
from microseg.utils.fields import known_fields
from microseg.utils.progress import bar_disabled

log = logging.getLogger(__name__)

Blend = Literal["gaussian", "min"]
OBJECTS_NAME = "objects.csv"
MIRRORS: tuple[tuple[int, ...], ...] = ((-1,), (-2,), (-2, -1))


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window inference and post-processing knobs."""

    roi: int = 128
    overlap: float = 0.25
    blend: Blend = "gaussian"
    sw_batch_size: int = 4
    percentiles: tuple[float, float] = (1.0, 99.0)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    device: str = "auto"
    save_probs: bool = False
    #: test-time mirroring (nnU-Net's default): softmax averaged over the 4 flips of a window
    tta: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.post, Mapping):
            object.__setattr__(self, "post", PostprocessConfig.from_mapping(self.post))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.blend not in ("gaussian", "min"):
            raise ConfigError(f"blend must be 'gaussian' or 'min'; found {self.blend!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be a fraction in [0, 1); found {self.overlap}")
        if self.roi < 1 or self.sw_batch_size < 1:
            raise ConfigError("roi and sw_batch_size must be >= 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> InferConfig:
        return cls(**known_fields(cls, values, "inference"))


def _starts(size: int, roi: int, step: int) -> list[int]:
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi, step))
    starts.append(size - roi)
    return starts


def _min_blend(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, roi: int, overlap: float, bs: int
) -> torch.Tensor:
    """Per pixel, the probability vector of the window with the lowest foreground probability."""
    _, _, h, w = x.shape
    ph, pw = max(0, roi - h), max(0, roi - w)
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
    hh, ww = x.shape[-2:]
    step = max(1, round(roi * (1.0 - overlap)))
    windows = [(y, xx) for y in _starts(hh, roi, step) for xx in _starts(ww, roi, step)]
    best: torch.Tensor | None = None
    fg_min = torch.full((hh, ww), float("inf"), device=x.device)
    for i in range(0, len(windows), bs):
        chunk = windows[i : i + bs]
        tiles = torch.cat([x[..., y : y + roi, xx : xx + roi] for y, xx in chunk])
        probs = net(tiles)
        if best is None:
            best = torch.zeros((probs.shape[1], hh, ww), device=x.device, dtype=probs.dtype)
        for (y, xx), p in zip(chunk, probs, strict=True):
            fg = 1.0 - p[0]
            region = (slice(y, y + roi), slice(xx, xx + roi))
            take = fg < fg_min[region]
            fg_min[region] = torch.where(take, fg, fg_min[region])
            best[(slice(None), *region)] = torch.where(take, p, best[(slice(None), *region)])
    assert best is not None
    return best[None, :, :h, :w]


def prepare_input(
    image: np.ndarray, channels: int, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Raw ``YX``/``YXC`` image -> normalised ``CYX`` float32 with ``channels`` channels."""
    return match_channels(percentile_normalise(image, *percentiles), channels)


@torch.no_grad()
def predict_probs(
    model: nn.Module, image: np.ndarray, cfg: InferConfig | None = None, normalised: bool = False
) -> np.ndarray:
    """Softmax probabilities ``(3, H, W)`` float32 of a whole image (see module docstring)."""
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
            out = torch.softmax(model(batch), dim=1)
            if cfg.tta:
                for dims in MIRRORS:
                    out = out + torch.softmax(model(batch.flip(dims)), dim=1).flip(dims)
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
    model: nn.Module, image: np.ndarray, cfg: InferConfig | None = None, normalised: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels uint16 HxW, probs float32 3xHxW)`` for one whole image; a raw image is
    post-processed with its kind's knobs (``post.by_modality``), a normalised one with the
    shared ones."""
    cfg = cfg or InferConfig()
    probs = predict_probs(model, image, cfg, normalised=normalised)
    post = cfg.post if normalised else cfg.post.for_image(image)
    return probs_to_instances(probs, post), probs


Predictor = nn.Module | Callable[[np.ndarray], np.ndarray]


def predict_dataset(
    model: Predictor,
    prepared_dir: str | Path,
    split: str | None,
    out_dir: str | Path,
    cfg: InferConfig | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every manifest sample of ``split`` (all when None); returns the objects table.

    ``model`` is a 3-class network, or any callable ``raw image -> uint16 labels`` (such as
    ``functools.partial(otsu_watershed, cfg=...)`` for the classical baseline; no probs then).
    """
    cfg = cfg or InferConfig()
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    manifest = read_manifest(prepared_dir)
    rows = manifest if split is None else manifest[manifest["split"] == split]
    if rows.empty:
        raise ConfigError(f"no samples of split {split!r} in {prepared_dir}")
    is_net = isinstance(model, nn.Module)
    records = []
    for row in tqdm(
        rows.itertuples(), total=len(rows), disable=bar_disabled(progress), desc="predict"
    ):
        sid = str(row.sample_id)
        image = read_stack(prepared_dir / row.image_path)
        if is_net:
            labels, probs = predict_instances(model, image, cfg)
            if cfg.save_probs:
                write_stack(out_dir / "probs" / f"{sid}.tif", probs, axes="CYX")
        else:
            labels = np.asarray(model(image)).astype(np.uint16)
        write_stack(out_dir / "labels" / f"{sid}.tif", labels)
        records.append(object_stats(sid, labels))
    table = pd.DataFrame.from_records(records)
    with atomic_path(out_dir / OBJECTS_NAME) as tmp:
        table.to_csv(tmp, index=False)
    log.info("predicted %d images of split %s into %s", len(table), split, out_dir)
    return table
