"""The LSTM-UNet's training: a LightningModule and DataModule on the U-Net targets cache.

Input: a targets cache (:func:`microseg.data.targets.write_targets`) of the frames of time
series, sample ids ``<sequence>_t<frame>`` (as ``stages/tracking.py`` names them); an id
without ``_t<digits>`` is a sequence of one frame. Frames of a sequence are ordered by the
number after ``_t``.

One epoch = ``steps_per_epoch`` batches of ``batch_size`` windows of ``window`` consecutive
frames of the train sequences. A window's frames are stacked along the channel axis, so the
U-Net family's patch pipeline (:func:`microseg.models.unet.train.patch_transforms`: crop
centred on a nucleus of any frame with probability ``fg_fraction``, flips, 90-degree
rotations, elastic deformation, intensity scale/shift, noise, and the random-shape occluders
of ``shapes`` when on) applies the *same* crop and augmentation to every frame of the window
(an occluder sits still through a window); the batches are drawn by the U-Net family's
:class:`~microseg.models.unet.train.PatchSampler`, seeded per epoch as every family's are.
The LSTM starts every window from a zero state.

Loss: one of :mod:`microseg.train.softmax_losses` on every frame of every window (the 3-class
targets and U-Net weight maps of the cache). Optimisation as the U-Net's: AdamW, warm-up then
cosine per step, gradient clipping by the engine.

Validation: each val sequence whole (its first ``val_max_frames`` frames), frame by frame
with the state carried (:func:`~microseg.models.lstmunet.predict.predict_sequence_probs`),
watershed, then the mean over frames of the instance F1 at IoU 0.5 (``val_f1_50``, picks
``best.pt``) and of the foreground Dice (``val_dice``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms.utils import map_binary_to_indices

from microseg.data.shapes import ShapesConfig
from microseg.data.targets import TargetSample, load_targets, match_channels
from microseg.errors import ConfigError
from microseg.evaluate.instances import validation_scores
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.models.lstmunet.network import LstmUnet, LstmUnetConfig, save_lstmunet
from microseg.models.lstmunet.predict import SequenceInferConfig, predict_sequence_probs
from microseg.models.unet.train import PatchSampler
from microseg.train.engine import EngineConfig, TrainResult, fit
from microseg.train.family import FamilyModule, SampledDataModule, per_step_schedule
from microseg.train.hooks import HookBase
from microseg.train.softmax_losses import build_loss
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.lstmunet.train/1"
BEST_METRIC = "val_f1_50"
_FRAME_ID = re.compile(r"^(?P<seq>.+)_t(?P<t>\d+)$")


@dataclass
class LstmUnetTrainConfig(EngineConfig):
    """Every knob of :func:`train_lstmunet` (the engine's, plus the family's). The
    augmentation knobs are the U-Net family's, with the same meaning."""

    model: LstmUnetConfig = field(default_factory=LstmUnetConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    # loss
    loss: str = "wce_dice"
    loss_params: dict[str, Any] = field(default_factory=dict)
    # data: batch_size windows of `window` frames, patch_size pixels square
    window: int = 4
    patch_size: int = 64
    batch_size: int = 2
    fg_fraction: float = 0.7
    augment: bool = True
    elastic_prob: float = 0.2
    intensity_prob: float = 0.5
    noise_prob: float = 0.2
    #: random-shape occluders on the image (:mod:`microseg.data.shapes`); prob 0: off
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    # schedule
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    # validation: the first frames of every val sequence (None: all)
    val_max_frames: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.model, Mapping):
            self.model = LstmUnetConfig.from_mapping(self.model)
        if isinstance(self.post, Mapping):
            self.post = PostprocessConfig.from_mapping(self.post)
        self.shapes = ShapesConfig.from_mapping(self.shapes)
        self.loss_params = dict(self.loss_params or {})
        checks = {
            "window": self.window >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "fg_fraction": 0.0 <= self.fg_fraction <= 1.0,
            "val_max_frames": self.val_max_frames is None or self.val_max_frames >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid lstmunet training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )
        if self.patch_size % self.model.size_multiple:
            raise ConfigError(
                f"patch_size {self.patch_size} must be a multiple of {self.model.size_multiple} "
                f"for {len(self.model.features)} levels"
            )
        build_loss(self.loss, **self.loss_params)  # fail early on a bad name

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LstmUnetTrainConfig:
        """From a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "lstmunet training"))

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly (``model.*``, ``post.*``, ``loss.*``) for logging as params."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict) and k in ("model", "post", "shapes", "loss_params"):
                prefix = "loss" if k == "loss_params" else k
                out.update(
                    {
                        f"{prefix}.{kk}": list(vv) if isinstance(vv, tuple) else vv
                        for kk, vv in v.items()
                    }
                )
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def infer_config(self) -> SequenceInferConfig:
        """Validation's inference (frames come normalised from the cache)."""
        return SequenceInferConfig(post=self.post, device=self.device)


# -- data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceSample:
    """One cached sequence: normalised ``(T, C, H, W)`` frames, 3-class targets, weight maps
    and instance labels ``(T, H, W)``."""

    sequence_id: str
    images: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int | None) -> SequenceSample:
        if n is None:
            return self
        return SequenceSample(
            self.sequence_id, self.images[:n], self.targets[:n], self.weights[:n], self.labels[:n]
        )


def group_sequences(samples: Sequence[TargetSample], channels: int) -> list[SequenceSample]:
    """Cached frames grouped into sequences by their ids (``<seq>_t<frame>``), frames in
    order; images matched to ``channels``. Frames of one sequence must share one shape."""
    groups: dict[str, list[tuple[int, TargetSample]]] = {}
    for s in samples:
        m = _FRAME_ID.match(s.sample_id)
        seq, t = (m["seq"], int(m["t"])) if m else (s.sample_id, 0)
        groups.setdefault(seq, []).append((t, s))
    out = []
    for seq, frames in groups.items():
        frames.sort(key=lambda p: p[0])
        shapes = {f.target.shape for _, f in frames}
        if len(shapes) > 1:
            raise ConfigError(f"frames of sequence {seq!r} differ in shape: {sorted(shapes)}")
        out.append(
            SequenceSample(
                seq,
                np.stack([match_channels(f.image, channels) for _, f in frames]),
                np.stack([f.target for _, f in frames]),
                np.stack([f.weight for _, f in frames]).astype(np.float32),
                np.stack([f.labels for _, f in frames]),
            )
        )
    return out


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(0, size - a.shape[-2]), max(0, size - a.shape[-1])
    if not (ph or pw):
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)])


def window_items(
    sequences: Sequence[SequenceSample], cfg: LstmUnetTrainConfig
) -> list[dict[str, Any]]:
    """Every window of ``cfg.window`` consecutive frames as one sample of the U-Net's patch
    pipeline: frames stacked on the channel axis (image ``(T*C, H, W)``, target and weight
    ``(T, H, W)``), padded to a patch, crops centred on the foreground of any frame."""
    items = []
    for s in sequences:
        for start in range(len(s) - cfg.window + 1):
            sl = slice(start, start + cfg.window)
            image = s.images[sl]
            target = _pad_to(s.targets[sl].astype(np.float32), cfg.patch_size)
            fg, bg = map_binary_to_indices((target > 0).any(axis=0, keepdims=True))
            items.append(
                {
                    "image": _pad_to(image.reshape(-1, *image.shape[-2:]), cfg.patch_size),
                    "target": target,
                    "weight": _pad_to(s.weights[sl], cfg.patch_size),
                    "fg": fg,
                    "bg": bg,
                }
            )
    if not items:
        longest = max((len(s) for s in sequences), default=0)
        raise ConfigError(
            f"no train sequence has {cfg.window} frames (longest: {longest}); lower `window`"
        )
    return items


class LstmUnetDataModule(SampledDataModule):
    """Random window batches of the train sequences; whole val sequences, one per step."""

    def __init__(self, targets_dir: str | Path, cfg: LstmUnetTrainConfig) -> None:
        super().__init__()
        self.targets_dir, self.cfg = Path(targets_dir), cfg
        self.sampler: PatchSampler | None = None
        self.val_samples: list[SequenceSample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        cfg, channels = self.cfg, self.cfg.model.in_channels
        train = group_sequences(load_targets(self.targets_dir, "train"), channels)
        val = group_sequences(load_targets(self.targets_dir, "val"), channels)
        self.val_samples = [s.head(cfg.val_max_frames) for s in val]
        if not self.val_samples:
            log.warning("%s: no 'val' samples; best.pt will be the last epoch", self.targets_dir)
        # the U-Net's sampler and pipeline; it reads only the data knobs both configs share
        self.sampler = PatchSampler(window_items(train, cfg), cfg)  # type: ignore[arg-type]
        log.info(
            "lstmunet training: %d train sequences (%d frames), %d val sequences, window %d",
            len(train),
            sum(len(s) for s in train),
            len(self.val_samples),
            cfg.window,
        )


class LstmUnetModule(FamilyModule):
    """The LSTM-UNet, its loss, optimizer and per-step schedule, and its validation."""

    monitor = BEST_METRIC
    mode = "max"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: LstmUnetTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = LstmUnet(cfg.model)
        self.loss_fn = build_loss(cfg.loss, **cfg.loss_params)
        self.infer_cfg = cfg.infer_config()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        image, target, weight = batch["image"], batch["target"], batch["weight"]
        b, t = target.shape[:2]
        logits, _ = self.net(image.view(b, t, -1, *image.shape[-2:]))
        loss = self.loss_fn(logits.flatten(0, 1), target.flatten(0, 1), weight.flatten(0, 1))
        if not torch.isfinite(loss):
            log.warning("non-finite loss at epoch %d; step skipped", self.current_epoch)
            return None
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=b)
        return loss

    def validation_step(self, sample: SequenceSample, batch_idx: int) -> None:
        probs = predict_sequence_probs(self.net, sample.images, self.infer_cfg, normalised=True)
        scores = [
            validation_scores(gt, probs_to_instances(p, self.infer_cfg.post))
            for gt, p in zip(sample.labels, probs, strict=True)
        ]
        self.log_val({k: float(np.mean([s[k] for s in scores])) for k in scores[0]})

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return per_step_schedule(opt, cfg.epochs * cfg.steps_per_epoch, cfg.warmup_steps, 0.02)

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {
            "train_format": CHECKPOINT_FORMAT,
            "epoch": self.current_epoch + 1,
            "window": self.cfg.window,
            "metrics": dict(metrics),
        }
        save_lstmunet(self.net, path, self.cfg.post, extra)


def train_lstmunet(
    targets_dir: str | Path,
    out_dir: str | Path,
    cfg: LstmUnetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train the LSTM-UNet on a targets cache of sequence frames: ``out_dir/best.pt`` (model
    format) and ``out_dir/last.ckpt`` (resume); see :func:`microseg.train.engine.fit`."""
    cfg = cfg or LstmUnetTrainConfig()
    data = LstmUnetDataModule(targets_dir, cfg)
    arch = cfg.model.as_dict()
    build = lambda: LstmUnetModule(cfg)  # noqa: E731  (built by fit only when needed)
    return fit(build, data, cfg, out_dir, hooks, resume=resume, model_config=arch)
