"""MAUNet's training: a LightningModule and DataModule on the ``unet`` family's targets cache.

Targets: the cache of :func:`microseg.data.targets.prepare_targets` (normalised image, 3-class
map, U-Net weight map, instance labels) plus, computed once per training image when it is
loaded, the per-instance normalised distance (:func:`normalised_distance`). Batches are the
``unet`` family's: its :class:`~microseg.models.unet.train.PatchSampler` and MONAI pipeline
(positive/negative crops, flips, 90-degree turns, elastic deformation, intensity jitter, noise).
The distance travels as a second channel of the ``weight`` key, so every spatial transform
moves it exactly as the target and weight map (nearest-neighbour under the elastic warp) and
intensity transforms leave it alone; :class:`DistanceSampler` splits it off again.

Loss per member network: the 3-class loss of :mod:`microseg.train.softmax_losses` by name (the
``unet`` family's, with the weight map) + ``dist_weight`` x the regression loss (``mse`` or
``smooth_l1``) between the distance channel (linear, see :mod:`~microseg.models.maunet.network`)
and its target, on every pixel; an ensemble (``model.backbones``) sums its members' losses, so
the networks train side by side on the same batches. Optimiser, schedule, validation
(``val_f1_50`` picks ``best.pt``) and the engine are as in :mod:`microseg.models.unet.train`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import map_binary_to_indices
from scipy import ndimage

from microseg.data.shapes import ShapesConfig
from microseg.data.targets import TargetSample, load_targets, match_channels
from microseg.errors import ConfigError, DataFormatError
from microseg.evaluate.instances import validation_scores
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.models.maunet.network import N_CLASSES, MaunetConfig, build_maunet, save_maunet
from microseg.models.maunet.predict import DEFAULT_POST, InferConfig, predict_probs
from microseg.models.unet.train import PatchSampler, _pad_to, stratified_samples
from microseg.train.engine import EngineConfig, TrainResult, fit
from microseg.train.family import FamilyModule, SampledDataModule, per_step_schedule
from microseg.train.hooks import HookBase
from microseg.train.softmax_losses import build_loss
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.maunet.train/1"
BEST_METRIC = "val_f1_50"
DIST_LOSSES = ("mse", "smooth_l1")


# -- the distance target ----------------------------------------------------------------------
def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """Per instance, the Euclidean distance to the nearest pixel outside it divided by its
    maximum (1 at the centre, down to ``1 / max`` at the edge, 0 outside), float32.

    Touching instances count as outside each other. One EDT per instance over its bounding box
    grown by one pixel: the ring around the box is outside the instance, and the nearest
    outside pixel is never farther than the ring, so this equals the full-image EDT."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise DataFormatError(f"expected 2D integer instance labels; found {labels.dtype}")
    out = np.zeros(labels.shape, np.float32)
    h, w = labels.shape
    for idx, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        win = (
            slice(max(0, sl[0].start - 1), min(h, sl[0].stop + 1)),
            slice(max(0, sl[1].start - 1), min(w, sl[1].stop + 1)),
        )
        inside = labels[win] == idx + 1
        d = ndimage.distance_transform_edt(inside)
        peak = d.max()
        if peak > 0:
            out[win][inside] = (d[inside] / peak).astype(np.float32)
    return out


# -- config -----------------------------------------------------------------------------------
@dataclass
class MaunetTrainConfig(EngineConfig):
    """Every knob of :func:`train_maunet` (the engine's, the ``unet`` family's data and
    schedule knobs with the same defaults, and the distance loss)."""

    model: MaunetConfig = field(default_factory=MaunetConfig)
    post: PostprocessConfig = field(default_factory=lambda: DEFAULT_POST)
    # loss
    loss: str = "wce_dice"
    loss_params: dict[str, Any] = field(default_factory=dict)
    dist_loss: Literal["mse", "smooth_l1"] = "mse"
    dist_weight: float = 1.0
    # data
    patch_size: int = 128
    batch_size: int = 8
    fg_fraction: float = 0.7
    #: as the unet family's: 0 every image equally often, 1 every modality
    modality_balance: float = 0.0
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
    # validation / inference
    val_max_images: int | None = None
    overlap: float = 0.25
    blend: Literal["gaussian", "min"] = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.model, Mapping):
            self.model = MaunetConfig.from_mapping(self.model)
        if isinstance(self.post, Mapping):
            self.post = PostprocessConfig.from_mapping({**asdict(DEFAULT_POST), **self.post})
        self.shapes = ShapesConfig.from_mapping(self.shapes)
        self.loss_params = dict(self.loss_params or {})
        checks = {
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "fg_fraction": 0.0 <= self.fg_fraction <= 1.0,
            "blend": self.blend in ("gaussian", "min"),
            "overlap": 0.0 <= self.overlap < 1.0,
            "dist_loss": self.dist_loss in DIST_LOSSES,
            "dist_weight": self.dist_weight >= 0,
            "patch_size": self.patch_size % self.model.size_multiple == 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid maunet training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + f" (patch_size: a multiple of {self.model.size_multiple}; dist_loss: "
                f"{DIST_LOSSES})"
            )
        build_loss(self.loss, **self.loss_params)  # fail early on a bad name

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaunetTrainConfig:
        """From a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "maunet training"))

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly (``model.*``, ``post.*``, ``shapes.*``, ``loss.*`` prefixed) for
        logging."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k in ("model", "post", "shapes"):
                out.update(
                    {f"{k}.{kk}": list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                )
            elif k == "loss_params":
                out.update({f"loss.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def infer_config(self) -> InferConfig:
        return InferConfig(
            roi=self.patch_size,
            overlap=self.overlap,
            blend=self.blend,
            post=self.post,
            device=self.device,
        )


# -- data -------------------------------------------------------------------------------------
def train_items(samples: Sequence[TargetSample], cfg: MaunetTrainConfig) -> list[dict[str, Any]]:
    """Padded training items for :class:`PatchSampler`: ``weight`` holds the weight map and
    the normalised distance as two channels (computed here, once per image)."""
    items = []
    for s in samples:
        aux = np.stack([s.weight.astype(np.float32), normalised_distance(s.labels)])
        target = _pad_to(s.target[None].astype(np.float32), cfg.patch_size)
        fg, bg = map_binary_to_indices(target > 0)
        items.append(
            {
                "image": _pad_to(match_channels(s.image, cfg.model.in_channels), cfg.patch_size),
                "target": target,
                "weight": _pad_to(aux, cfg.patch_size),
                "fg": fg,
                "bg": bg,
            }
        )
    return items


class DistanceSampler(PatchSampler):
    """The ``unet`` family's patch batches with the distance split off the weight channels."""

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        out = super().batch(rng)
        aux = out.pop("weight")
        out["weight"], out["distance"] = aux[:, :1], aux[:, 1:]
        return out


class MaunetDataModule(SampledDataModule):
    """Random patch batches of the train split; whole val images, one per step."""

    def __init__(self, targets_dir: str | Path, cfg: MaunetTrainConfig) -> None:
        super().__init__()
        self.targets_dir, self.cfg = Path(targets_dir), cfg
        self.sampler: DistanceSampler | None = None
        self.val_samples: list[TargetSample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        cfg = self.cfg
        train = load_targets(self.targets_dir, "train")
        self.val_samples = load_targets(self.targets_dir, "val")
        self.val_samples = stratified_samples(self.val_samples, cfg.val_max_images)
        if not self.val_samples:
            log.warning("%s: no 'val' samples; best.pt will be the last epoch", self.targets_dir)
        self.sampler = DistanceSampler(  # type: ignore[arg-type]
            train_items(train, cfg), cfg, [s.modality for s in train]
        )
        log.info(
            "maunet training: %d train / %d val images, backbones %s",
            len(train),
            len(self.val_samples),
            list(cfg.model.members),
        )


# -- the Lightning module ---------------------------------------------------------------------
def distance_loss(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Regression of the normalised distance (``pred`` the raw channel), mean over pixels."""
    if name == "mse":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=0.1)


class MaunetModule(FamilyModule):
    """The dual-decoder network(s), their summed losses, optimiser, schedule and validation."""

    monitor = BEST_METRIC
    mode = "max"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: MaunetTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_maunet(cfg.model)
        self.loss_fn = build_loss(cfg.loss, **cfg.loss_params)
        self.infer_cfg = cfg.infer_config()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class loss, distance loss)`` summed over the ensemble's members."""
        seg = dist = torch.zeros((), device=batch["image"].device)
        for out in self.net.raw(batch["image"]):
            seg = seg + self.loss_fn(out[:, :N_CLASSES], batch["target"], batch["weight"])
            pred = out[:, N_CLASSES:]
            dist = dist + distance_loss(self.cfg.dist_loss, pred, batch["distance"])
        return seg, dist

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        seg, dist = self.losses(batch)
        loss = seg + self.cfg.dist_weight * dist
        if not torch.isfinite(loss):
            log.warning("non-finite loss at epoch %d; step skipped", self.current_epoch)
            return None
        bs = self.cfg.batch_size
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train_dist_loss", dist, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, sample: TargetSample, batch_idx: int) -> None:
        probs = predict_probs(self.net, sample.image, self.infer_cfg, normalised=True)
        labels = probs_to_instances(probs, self.infer_cfg.post)
        self.log_val(validation_scores(sample.labels, labels))

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return per_step_schedule(opt, cfg.epochs * cfg.steps_per_epoch, cfg.warmup_steps, 0.02)

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {"train_format": CHECKPOINT_FORMAT, "epoch": self.current_epoch + 1}
        save_maunet(
            self.net, path, self.cfg.model, self.cfg.post, {**extra, "metrics": dict(metrics)}
        )


def train_maunet(
    prepared_targets_dir: str | Path,
    out_dir: str | Path,
    cfg: MaunetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train MAUNet (one backbone or an ensemble) on a targets cache: ``out_dir/best.pt``
    (:func:`~microseg.models.maunet.network.save_maunet`) and ``out_dir/last.ckpt`` (resume)."""
    cfg = cfg or MaunetTrainConfig()
    data = MaunetDataModule(prepared_targets_dir, cfg)
    build, arch = (lambda: MaunetModule(cfg)), cfg.model.as_dict()
    return fit(build, data, cfg, out_dir, hooks, resume=resume, model_config=arch)
