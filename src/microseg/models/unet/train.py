"""The U-Net family's training: a LightningModule and DataModule on a targets cache.

Input: a folder written by :func:`microseg.data.targets.prepare_targets` (normalised images,
3-class targets, weight maps and instance labels, with an index of splits). The engine
(:mod:`microseg.train.engine`) runs it: checkpoints, resume, devices, precision, DDP and early
stopping come from Lightning; ``best.pt`` is written in this family's model format
(:func:`microseg.models.unet.network.save_unet`).

One epoch = ``steps_per_epoch`` batches of ``batch_size`` random patches from the train split,
drawn with MONAI dictionary transforms on the keys ``image``/``target``/``weight``:
``RandCropByPosNegLabeld`` (patches centred on a nucleus with probability ``fg_fraction``),
``RandFlipd`` on both axes, ``RandRotate90d``, ``Rand2DElasticd`` (bilinear for the image,
nearest for target and weight map; small rotation/scale), ``RandScaleIntensityd`` and
``RandShiftIntensityd`` (intensity jitter) and ``RandGaussianNoised`` on the image; with
``shapes.prob > 0``, random occluders (:class:`~microseg.data.shapes.RandShapesd`, image only)
are drawn after the spatial transforms and before the intensity jitter. Images
smaller than a patch are zero-padded beforehand, with weight 0 in the padding. The streams
are re-seeded from ``(seed, epoch, rank)`` every epoch
(:class:`~microseg.train.family.EpochBatches`).

Optimisation: AdamW, linear warm-up then cosine decay per step (floor 0.02), gradient-norm
clipping; the loss is one of :mod:`microseg.train.softmax_losses` by name. A non-finite loss
skips its step (the schedule still advances).

Validation every ``val_every`` epochs: every val image whole through the family's
sliding-window predictor (``roi = patch_size``), softmax -> seeded watershed -> instances,
then the mean over images of the instance F1 at IoU 0.5 (``val_f1_50``) and of the pixel
foreground Dice (``val_dice``); ``best.pt`` holds the weights with the best ``val_f1_50``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.transforms.utils import map_binary_to_indices

from microseg.data.shapes import ShapesConfig
from microseg.data.targets import TargetSample, load_targets, match_channels
from microseg.errors import ConfigError
from microseg.evaluate.instances import validation_scores
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.models.unet.network import UnetConfig, build_unet, save_unet
from microseg.models.unet.predict import InferConfig, predict_probs
from microseg.train.engine import EngineConfig, TrainResult, fit
from microseg.train.family import FamilyModule, SampledDataModule, per_step_schedule, seed_globals
from microseg.train.hooks import HookBase
from microseg.train.softmax_losses import build_loss
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.unet.train/2"
KEYS = ("image", "target", "weight")
BEST_METRIC = "val_f1_50"


@dataclass
class UnetTrainConfig(EngineConfig):
    """Every knob of :func:`train_unet` (the engine's, plus the family's). Defaults: the CPU
    demo on DSB 2018. On a shared 2-core CPU set ``num_threads: 1`` (torch's default 2
    threads made an epoch 16x slower when the other core was busy)."""

    model: UnetConfig = field(default_factory=UnetConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    # loss
    loss: str = "wce_dice"
    loss_params: dict[str, Any] = field(default_factory=dict)
    # data
    patch_size: int = 128
    batch_size: int = 8
    fg_fraction: float = 0.7
    #: how training images are drawn: 0 each image equally often, 1 each modality equally
    #: often (weight per image ``n_modality ** -modality_balance``); DSB 2018's 301
    #: fluorescence / 63 tissue / 10 brightfield train images at 0.5 give 61 / 28 / 11 %
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
            self.model = UnetConfig.from_mapping(self.model)
        if isinstance(self.post, Mapping):
            self.post = PostprocessConfig.from_mapping(self.post)
        self.shapes = ShapesConfig.from_mapping(self.shapes)
        self.loss_params = dict(self.loss_params or {})
        checks = {
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "fg_fraction": 0.0 <= self.fg_fraction <= 1.0,
            "modality_balance": 0.0 <= self.modality_balance <= 1.0,
            "blend": self.blend in ("gaussian", "min"),
            "overlap": 0.0 <= self.overlap < 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid unet training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )
        if self.patch_size % self.model.size_multiple:
            raise ConfigError(
                f"patch_size {self.patch_size} must be a multiple of {self.model.size_multiple} "
                f"for arch {self.model.arch!r} with {self.model.levels} levels"
            )
        build_loss(self.loss, **self.loss_params)  # fail early on a bad name

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UnetTrainConfig:
        """From a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "unet training"))

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly (``model.*``, ``post.*``, ``shapes.*`` prefixed) for logging as
        params."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict) and k in ("model", "post", "shapes"):
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


# -- validation -------------------------------------------------------------------------------
# -- data -------------------------------------------------------------------------------------
def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(a, pad)


def _train_items(samples: Sequence[TargetSample], cfg: UnetTrainConfig) -> list[dict[str, Any]]:
    items = []
    for s in samples:
        image = _pad_to(match_channels(s.image, cfg.model.in_channels), cfg.patch_size)
        target = _pad_to(s.target[None].astype(np.float32), cfg.patch_size)
        weight = _pad_to(s.weight[None].astype(np.float32), cfg.patch_size)
        fg, bg = map_binary_to_indices(target > 0)
        items.append(
            {
                "image": image,
                "target": target,
                "weight": weight,
                "fg": fg,
                "bg": bg,
            }
        )
    return items


def patch_transforms(cfg: UnetTrainConfig) -> Compose:
    """The MONAI dictionary pipeline that turns a padded sample into one augmented patch."""
    p = cfg.patch_size
    pos = cfg.fg_fraction
    crop = RandCropByPosNegLabeld(
        keys=KEYS,
        label_key="target",
        spatial_size=(p, p),
        pos=pos,
        neg=1.0 - pos,
        num_samples=1,
        fg_indices_key="fg",
        bg_indices_key="bg",
    )
    shapes = getattr(cfg, "shapes", None)
    occlude = shapes.transform("image") if shapes is not None else None
    if not cfg.augment:  # shapes are their own knob: drawn when asked for, even so
        return Compose([crop, occlude] if occlude is not None else [crop])
    jitter = [
        RandScaleIntensityd(keys="image", factors=0.25, prob=cfg.intensity_prob),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=cfg.intensity_prob),
        RandGaussianNoised(keys="image", std=0.03, prob=cfg.noise_prob),
    ]
    return Compose(
        [
            crop,
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=KEYS, prob=0.5, max_k=3),
            Rand2DElasticd(
                keys=KEYS,
                spacing=(32, 32),
                magnitude_range=(0.5, 2.0),
                prob=cfg.elastic_prob,
                rotate_range=(math.pi / 12,),
                scale_range=(0.15, 0.15),
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="reflection",
            ),
            *([occlude] if occlude is not None else []),
            *jitter,
        ]
    )


def _plain(t: Any) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.as_tensor() if hasattr(t, "as_tensor") else t


class PatchSampler:
    """Batches of augmented patches; :meth:`reseed` makes an epoch's stream reproducible."""

    def __init__(
        self,
        items: list[dict[str, Any]],
        cfg: UnetTrainConfig,
        modalities: Sequence[str] | None = None,
    ) -> None:
        if not items:
            raise ConfigError("no training samples: the targets index has no 'train' rows")
        self.items, self.cfg = items, cfg
        balance = getattr(cfg, "modality_balance", 0.0)
        self.p = modality_weights(modalities, balance) if modalities and balance else None
        self.transforms = patch_transforms(cfg)
        #: indices of the samples drawn so far this epoch (DDP tests read the shards from it)
        self.drawn: list[int] = []

    def configure(self, cfg: UnetTrainConfig) -> None:
        """A phase's data knobs (:mod:`microseg.train.phases`): the augmentation rebuilt."""
        self.cfg = cfg
        self.transforms = patch_transforms(cfg)

    def reseed(self, seed: int) -> None:
        self.transforms.set_random_state(seed=seed)
        seed_globals(seed + 1)
        self.drawn = []

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if self.p is None:
            picks = rng.integers(0, len(self.items), self.cfg.batch_size)
        else:
            picks = rng.choice(len(self.items), size=self.cfg.batch_size, p=self.p)
        self.drawn.extend(int(i) for i in picks)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
        track = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata costs ~5x on small patches
        try:
            for i in picks:
                d = self.transforms(dict(self.items[i]))
                d = d[0] if isinstance(d, list) else d
                for k in KEYS:
                    out[k].append(_plain(d[k]).float())
        finally:
            set_track_meta(track)
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["target"] = batch["target"].round().long()
        return batch


def modality_weights(modalities: Sequence[str], balance: float) -> np.ndarray:
    """Per-image draw probabilities ``n_modality ** -balance``, normalised."""
    _names, inverse, counts = np.unique(
        np.asarray(modalities), return_inverse=True, return_counts=True
    )
    w = counts[inverse].astype(np.float64) ** -float(balance)
    return w / w.sum()


def stratified_samples(samples: Sequence[TargetSample], n: int | None) -> list[TargetSample]:
    """At most ``n`` samples with every modality keeping its share (at least one each), in
    their cached order within a modality: a small validation set that still sees tissue."""
    samples = list(samples)
    if n is None or len(samples) <= n:
        return samples
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.modality, []).append(i)
    keep: list[int] = []
    for idx in groups.values():
        keep += idx[: max(1, round(n * len(idx) / len(samples)))]
    return [samples[i] for i in sorted(keep)]


# -- the Lightning pieces ---------------------------------------------------------------------
class UnetDataModule(SampledDataModule):
    """Random patch batches of the train split; whole val images, one per step."""

    def __init__(self, targets_dir: str | Path, cfg: UnetTrainConfig) -> None:
        super().__init__()
        self.targets_dir, self.cfg = Path(targets_dir), cfg
        self.sampler: PatchSampler | None = None
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
        self.sampler = PatchSampler(_train_items(train, cfg), cfg, [s.modality for s in train])
        log.info(
            "unet training: %d train / %d val images, %s",
            len(train),
            len(self.val_samples),
            cfg.model.arch,
        )


class UnetModule(FamilyModule):
    """The 3-class U-Net, its loss, optimizer and per-step schedule, and its validation."""

    monitor = BEST_METRIC
    mode = "max"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: UnetTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_unet(cfg.model)
        self.loss_fn = build_loss(cfg.loss, **cfg.loss_params)
        self.infer_cfg = cfg.infer_config()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        loss = self.loss_fn(self.net(batch["image"]), batch["target"], batch["weight"])
        if not torch.isfinite(loss):
            log.warning("non-finite loss at epoch %d; step skipped", self.current_epoch)
            return None
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=self.cfg.batch_size)
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
        save_unet(
            self.net, path, self.cfg.model, self.cfg.post, {**extra, "metrics": dict(metrics)}
        )


def train_unet(
    prepared_targets_dir: str | Path,
    out_dir: str | Path,
    cfg: UnetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train the 3-class U-Net on a targets cache: ``out_dir/best.pt`` (model format) and
    ``out_dir/last.ckpt`` (resume). An unfinished run is continued; a finished one is returned
    as is unless ``cfg.epochs`` grew; ``resume=False`` starts over."""
    cfg = cfg or UnetTrainConfig()
    data = UnetDataModule(prepared_targets_dir, cfg)
    build, arch = (lambda: UnetModule(cfg)), cfg.model.as_dict()
    return fit(build, data, cfg, out_dir, hooks, resume=resume, model_config=arch)
