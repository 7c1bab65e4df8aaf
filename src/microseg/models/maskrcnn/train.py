"""The Mask R-CNN family's training on the torchvision engine: a LightningModule and
DataModule run by the engine (:mod:`microseg.train.engine`).

Input: :class:`microseg.data.targets.TargetSample` lists (``load_targets(dir, "train")`` and
``"val"``): normalised ``CYX`` images and instance labels (the 3-class maps are not used).

Patches: one random ``patch_size`` crop per draw (images smaller than a patch are zero-padded),
with random flips on both axes and a random multiple of 90 degrees when ``augment``; instances
cut by the crop to fewer than ``min_instance_pixels`` pixels are left out of the targets (their
pixels count as background for the mask head). The crop is resized by the model's ``scale``
(bilinear image, nearest labels) so training sees nuclei at the size inference does. An epoch
is ``steps_per_epoch`` batches of ``batch_size`` patches drawn from a generator seeded by
``(seed, epoch, rank)`` (:class:`~microseg.train.family.EpochBatches`), which also re-seeds
torch (the RPN and RoI samplers draw from it), so a resumed run draws what an uninterrupted
one would.

Optimisation: the loss is the sum of torchvision's five Mask R-CNN losses (RPN objectness and
box, classifier, box regression, mask BCE; each is logged as ``train_<name>``). SGD with
momentum (or AdamW), linear warm-up then cosine decay per step (floor 0.02), gradient-norm
clipping (10 by default); a non-finite loss skips its step (the schedule still advances).
Full precision by default (``precision: 32-true``), as before Lightning.

Validation every ``val_every`` epochs: every val image whole through
:func:`~microseg.models.maskrcnn.predict.predict_image` (tiled above ``post.max_size``), then
the mean instance F1 at IoU 0.5 (``val_f1_50``, :func:`microseg.evaluate.instances.
image_scores`) and foreground Dice; ``best.pt`` (model format ``microseg.maskrcnn/1``) holds
the weights of the best ``val_f1_50``, ``last.ckpt`` is Lightning's resume checkpoint.

The detectron2 engine keeps detectron2's own trainer
(:mod:`microseg.models.maskrcnn.train_detectron2`); :func:`train_maskrcnn` dispatches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microseg.data.targets import TargetSample
from microseg.errors import ConfigError
from microseg.evaluate.instances import validation_scores
from microseg.models.maskrcnn.config import resolve_engine
from microseg.models.maskrcnn.network import build_network, save_maskrcnn
from microseg.models.maskrcnn.predict import predict_image
from microseg.models.maskrcnn.train_data import (
    BEST_METRIC,
    Batch,
    MaskRCNNTrainConfig,
    instance_targets,
    random_patch,
    scale_patch,
)
from microseg.train.engine import TrainResult, fit
from microseg.train.family import FamilyModule, SampledDataModule, per_step_schedule, seed_globals
from microseg.train.hooks import HookBase

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.maskrcnn.train/2"


class PatchSampler:
    """Batches of augmented, scaled patches drawn with the generator it is given."""

    def __init__(self, samples: Sequence[TargetSample], cfg: MaskRCNNTrainConfig) -> None:
        if not samples:
            raise ConfigError("no training samples: the 'train' split is empty")
        self.samples, self.cfg = list(samples), cfg

    def configure(self, cfg: MaskRCNNTrainConfig) -> None:
        """A phase's data knobs (:mod:`microseg.train.phases`: ``augment`` here)."""
        self.cfg = cfg

    def reseed(self, seed: int) -> None:
        """Start of an epoch: torch's global generator drives the RPN/RoI sampling."""
        seed_globals(seed + 1)

    def patch(
        self, rng: np.random.Generator, index: int | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """One scaled patch ``(3 x P x P image, labels)`` of sample ``index`` (random if None)."""
        if index is None:
            index = int(rng.integers(0, len(self.samples)))
        s = self.samples[index]
        image, labels = random_patch(
            np.asarray(s.image, np.float32),
            np.asarray(s.labels),
            self.cfg.patch_size,
            rng,
            self.cfg.augment,
        )
        return scale_patch(image, labels, self.cfg.model.scale)

    def batch(self, rng: np.random.Generator) -> Batch:
        images, targets = [], []
        for _ in range(self.cfg.batch_size):
            x, labels = self.patch(rng)
            images.append(x)
            targets.append(instance_targets(labels, self.cfg.min_instance_pixels))
        return images, targets


def build_optimizer(model: nn.Module, cfg: MaskRCNNTrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters (a frozen stem stays out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_loss(
    model: nn.Module, images: list[torch.Tensor], targets: list[dict]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed torchvision Mask R-CNN losses of one batch (model in train mode) and the parts."""
    parts = model(images, targets)
    return sum(parts.values()), parts


# -- the Lightning pieces ---------------------------------------------------------------------
class MaskRCNNDataModule(SampledDataModule):
    """Random patch batches of the train samples; whole val images, one per step."""

    def __init__(
        self,
        train_samples: Sequence[TargetSample],
        val_samples: Sequence[TargetSample],
        cfg: MaskRCNNTrainConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sampler = PatchSampler(train_samples, cfg)
        val = list(val_samples)
        self.val_samples = val if cfg.val_max_images is None else val[: cfg.val_max_images]
        if not self.val_samples:
            log.warning("maskrcnn: no 'val' samples; best.pt will be the last epoch")


class MaskRCNNModule(FamilyModule):
    """torchvision's Mask R-CNN, its summed losses, optimizer and per-step schedule, and its
    validation F1."""

    monitor = BEST_METRIC
    mode = "max"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: MaskRCNNTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_network(cfg.model)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        return self.net(images, targets)

    def training_step(self, batch: Batch, batch_idx: int) -> Any:
        images, targets = batch
        loss, parts = train_loss(self.net, images, targets)
        if not torch.isfinite(loss):
            shown = {k: float(v.detach()) for k, v in parts.items()}
            log.warning("non-finite loss at epoch %d (%s); step skipped", self.current_epoch, shown)
            return None
        n = len(images)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=n)
        for k, v in parts.items():
            self.log(f"train_{k}", v.detach(), on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, sample: TargetSample, batch_idx: int) -> None:
        cfg = self.cfg
        labels, _ = predict_image(
            self.net, cfg.model.engine, sample.image, cfg.model.scale, cfg.post, normalised=True
        )
        self.log_val(validation_scores(sample.labels, labels))
        self.log("val_images", 1.0, on_epoch=True, reduce_fx="sum", batch_size=1, sync_dist=True)

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        opt = build_optimizer(self.net, cfg)
        return per_step_schedule(opt, cfg.epochs * cfg.steps_per_epoch, cfg.warmup_steps, 0.02)

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {"train_format": CHECKPOINT_FORMAT, "epoch": self.current_epoch + 1}
        save_maskrcnn(
            self.net, path, self.cfg.model, self.cfg.post, {**extra, "metrics": dict(metrics)}
        )


def train_maskrcnn(
    train_samples: Sequence[TargetSample],
    val_samples: Sequence[TargetSample],
    out_dir: str | Path,
    cfg: MaskRCNNTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train Mask R-CNN: ``out_dir/best.pt`` (model format) and the resume state (torchvision:
    ``out_dir/last.ckpt``; detectron2: its own, see ``train_detectron2``). An unfinished run is
    continued; a finished one is returned as is unless ``cfg.epochs`` grew; ``resume=False``
    starts over. A run of a different architecture (test-time settings aside) is refused."""
    cfg = cfg or MaskRCNNTrainConfig()
    engine = resolve_engine(cfg.model.engine)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engine=engine))
    if engine == "detectron2":
        from microseg.models.maskrcnn.train_detectron2 import train_detectron2

        return train_detectron2(train_samples, val_samples, out_dir, cfg, hooks, resume=resume)
    data = MaskRCNNDataModule(train_samples, val_samples, cfg)
    log.info(
        "maskrcnn (torchvision, %s) training: %d train / %d val images",
        cfg.model.backbone,
        len(data.sampler.samples),
        len(data.val_samples),
    )
    build, arch = (lambda: MaskRCNNModule(cfg)), cfg.model.architecture()
    return fit(build, data, cfg, out_dir, hooks, resume=resume, model_config=arch)
