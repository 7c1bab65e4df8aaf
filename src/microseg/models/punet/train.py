"""The Prob-UNet family's training: a LightningModule and DataModule on DeepD3 ``.d3set`` files.

The engine (:mod:`microseg.train.engine`) runs it: ``out_dir/last.ckpt`` (resume), devices,
precision, DDP, gradient clipping and early stopping come from Lightning; ``best.pt`` is
written in this family's model format (:func:`microseg.models.punet.network.save_punet`), so
:func:`~microseg.models.punet.network.load_punet`, the predictor and the MLflow pyfunc read it.

One epoch = ``steps_per_epoch`` batches of ``batch_size`` random patches
(:class:`~microseg.data.patches.PatchDataset`: foreground oversampling, MONAI augmentation).
Each batch is keyed by one draw of the epoch's generator, seeded from ``(seed, epoch, rank)``
(:class:`~microseg.train.family.EpochBatches`), and the global generators (the latent
``rsample``) are re-seeded from it every epoch: a resumed run draws what an uninterrupted one
would, DDP ranks draw different patches.

Loss per step: ``w_s * Tversky(spine) + w_d * Tversky(dendrite) + beta * (KL_s + KL_d)``
with the posterior sample's logits and free bits per head, ``beta`` ramped linearly from 0
over ``kl_warmup_epochs`` (or GECO: minimise KL subject to the reconstruction loss staying
below ``geco_goal``). AdamW; LR: linear warm-up, then cosine decay to 5% (or ``constant``).
Non-finite losses or gradients skip the step and are counted (``nonfinite_steps``); more than
``max_nonfinite_steps`` in one epoch, or an epoch without a finite step, raises
:class:`TrainingDiverged` naming the epoch.

Validation every ``val_every`` epochs on whole planes of the validation stacks with the prior
mean latent (or the mean probability of ``val_samples`` prior draws): spine and dendrite
Dice, precision and recall at probability 0.5, pooled over all voxels. ``best.pt`` holds the
weights with the best ``val_spine_dice``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from microseg.data.patches import (
    DEFAULT_PERCENTILES,
    KEYS,
    LabeledStack,
    PatchDataset,
    build_augment,
    iter_planes,
    labeled_stacks,
)
from microseg.data.shapes import ShapesConfig
from microseg.errors import ConfigError, MicrosegError
from microseg.io.d3set import D3Set
from microseg.models.punet.network import (
    HEADS,
    ProbUNet,
    build_punet,
    count_parameters,
    pad_to_multiple,
    save_punet,
)
from microseg.train.engine import EngineConfig, TrainResult, fit
from microseg.train.family import (
    FamilyModule,
    SampledDataModule,
    per_step_schedule,
    seed_globals,
)
from microseg.train.hooks import HookBase
from microseg.train.losses import Geco, TverskyLoss, free_bits, linear_warmup
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

#: ``train_format`` tag of ``last.ckpt`` and ``best.pt`` (1: the pre-Lightning ``last.pt``)
CHECKPOINT_FORMAT = "microseg.punet.train/2"
BEST_METRIC = "val_spine_dice"
D3Source = D3Set | str | Path | Sequence[D3Set | str | Path]


class TrainingDiverged(MicrosegError):
    """The loss or its gradient stayed NaN/inf: training stopped."""


@dataclass
class PunetTrainConfig(EngineConfig):
    """Every knob of :func:`train_punet` (the engine's, plus the family's). Defaults: a CPU
    demo that trains in minutes.

    On the synthetic spine data (6 train / 2 val stacks of 32x256x256) the defaults (320
    steps of 8 patches of 128 px, 157k parameters) reach validation spine Dice 0.61 and
    dendrite Dice 0.86 in about 3.5 minutes on 2 busy CPU cores with ``num_threads=1``.
    DeepD3.V2's full size is ``filters=(32, 64, 128, 192)``, ``latent_dim_*=12``,
    ``head_convs=4``, ``dual_decoder=True``, 50 epochs of 2048 batches of 16 on a GPU.
    """

    epochs: int = 8
    steps_per_epoch: int = 40
    # model
    filters: tuple[int, ...] = (16, 32, 64)
    latent_filters: tuple[int, ...] | None = (8, 16, 32)
    latent_dim_spine: int = 6
    latent_dim_dendrite: int = 6
    head_convs: int = 3
    head_hidden: int | None = None  # channels inside a head (None: filters[0])
    dual_decoder: bool = False
    context: int = 0  # planes each side as input channels (1 -> 2.5D, in_channels=3)
    # data
    patch_size: int = 128
    batch_size: int = 8
    fg_fraction: float = 0.5
    augment: bool = True
    #: random-shape occluders on the image (:mod:`microseg.data.shapes`); prob 0: off
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    # schedule
    lr: float = 2e-3
    weight_decay: float = 1e-5
    lr_warmup_steps: int = 20
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # loss
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    tversky_gamma: float = 1.0
    loss_weight_spine: float = 1.0
    loss_weight_dendrite: float = 1.0
    kl_beta: float = 1.0
    kl_warmup_epochs: float = 2.0
    kl_free_bits: float = 0.5  # nats per head (DeepD3.V2), keeps the latents in use
    kl_schedule: Literal["linear", "geco"] = "linear"
    geco_goal: float = 0.5
    geco_step_size: float = 1e-2
    geco_alpha: float = 0.99
    max_nonfinite_steps: int = 10
    # validation
    val_batch_planes: int = 8
    val_plane_stride: int = 1
    val_samples: int = 0  # 0 = prior mean; n > 0 = mean probability of n prior draws

    def __post_init__(self) -> None:
        super().__post_init__()
        self.filters = tuple(int(f) for f in self.filters)
        if self.latent_filters is not None:
            self.latent_filters = tuple(int(f) for f in self.latent_filters)
        self.percentiles = tuple(float(p) for p in self.percentiles)  # type: ignore[assignment]
        self.shapes = ShapesConfig.from_mapping(self.shapes)
        checks = {
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "context": self.context >= 0,
            "fg_fraction": 0.0 <= self.fg_fraction <= 1.0,
            "kl_beta": self.kl_beta >= 0,
            "kl_schedule": self.kl_schedule in ("linear", "geco"),
            "lr_schedule": self.lr_schedule in ("cosine", "constant"),
            "filters": len(self.filters) >= 2,
            "max_nonfinite_steps": self.max_nonfinite_steps >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid Probabilistic U-Net training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )
        multiple = 2 ** (len(self.filters) - 1)
        if self.patch_size % multiple:
            raise ConfigError(
                f"patch_size {self.patch_size} must be a multiple of {multiple} "
                f"({len(self.filters)} U-Net levels)"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PunetTrainConfig:
        """Build from a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "punet training"))

    def model_config(self) -> dict[str, Any]:
        """Constructor arguments of the :class:`ProbUNet` this config trains (built on the
        meta device: no memory, and the random generators are left untouched)."""
        with torch.device("meta"):
            net = ProbUNet(
                in_channels=2 * self.context + 1,
                filters=self.filters,
                latent_dim_spine=self.latent_dim_spine,
                latent_dim_dendrite=self.latent_dim_dendrite,
                head_convs=self.head_convs,
                head_hidden=self.head_hidden,
                dual_decoder=self.dual_decoder,
                latent_filters=self.latent_filters,
            )
        return net.config

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (tuples as lists), for logging as params; ``from_mapping`` reads it
        back (``shapes`` and ``phases`` stay nested)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- validation -------------------------------------------------------------------------------
def _counts(prob: torch.Tensor, target: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    pred = prob >= thr
    gt = target > 0.5
    tp = (pred & gt).sum()
    fp = (pred & ~gt).sum()
    fn = (~pred & gt).sum()
    return torch.stack([tp, fp, fn]).double()


def _scores(counts: torch.Tensor) -> dict[str, float]:
    tp, fp, fn = (float(c) for c in counts)
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }


@torch.no_grad()
def validate_punet(
    model: ProbUNet,
    stacks: Sequence[LabeledStack],
    *,
    context: int = 0,
    batch_planes: int = 8,
    plane_stride: int = 1,
    n_samples: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dice/precision/recall per head over whole validation planes, pooled over all voxels.

    ``n_samples=0`` uses the prior mean latent (one deterministic pass); otherwise the mean
    probability of ``n_samples`` prior draws from a (CPU) generator seeded with ``seed``.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed) if n_samples else None
    counts = {h: torch.zeros(3, dtype=torch.float64) for h in HEADS}
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, model.pad_multiple)
        features = model.unet_features(xp)
        prior = model.prior(xp)
        if n_samples:
            logits = model.sample_heads(features, prior, n_samples, generator=gen)
            probs = {k: torch.sigmoid(v).mean(1) for k, v in logits.items()}
        else:
            z = {k: d.mean for k, d in prior.items()}
            probs = {k: torch.sigmoid(v[:, 0]) for k, v in model.head_logits(features, z).items()}
        targets = {
            "spine": torch.from_numpy(np.stack([b[1] for b in batch])),
            "dendrite": torch.from_numpy(np.stack([b[2] for b in batch])),
        }
        for k in HEADS:
            counts[k] += _counts(probs[k][..., :h, :w].float().cpu(), targets[k])
        batch.clear()

    for item in iter_planes(stacks, context=context, stride=plane_stride):
        batch.append(item)
        if len(batch) >= batch_planes:
            flush()
    if batch:
        flush()
    model.train(was_training)
    metrics = {}
    for k in HEADS:
        for name, value in _scores(counts[k]).items():
            metrics[f"val_{k}_{name}"] = value
    return metrics


# -- data -------------------------------------------------------------------------------------
class PatchBatches:
    """Batches of random patches; :meth:`batch` keys each one by a draw of the epoch's
    generator (patch ``i`` of a batch depends on ``(seed, key, i)`` only)."""

    def __init__(self, stacks: Sequence[LabeledStack], cfg: PunetTrainConfig) -> None:
        self.cfg = cfg
        self.dataset = PatchDataset(
            list(stacks),
            patch_size=cfg.patch_size,
            samples_per_epoch=cfg.batch_size,
            fg_fraction=cfg.fg_fraction,
            context=cfg.context,
            augment=build_augment(cfg.augment, cfg.shapes) or False,
            seed=cfg.seed,
        )

    def configure(self, cfg: PunetTrainConfig) -> None:
        """A phase's data knobs (:mod:`microseg.train.phases`): the augmentation rebuilt."""
        self.cfg = cfg
        self.dataset.augment = build_augment(cfg.augment, cfg.shapes)

    def reseed(self, seed: int) -> None:
        """Start of an epoch: the global generators (latent ``rsample``) follow its seed."""
        seed_globals(seed + 1)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        self.dataset.set_epoch(int(rng.integers(2**31)))
        items = [self.dataset[i] for i in range(self.cfg.batch_size)]
        return {k: torch.stack([item[k] for item in items]) for k in KEYS}


def _as_list(source: D3Source) -> list[D3Set | str | Path]:
    return [source] if isinstance(source, D3Set | str | Path) else list(source)


class PunetDataModule(SampledDataModule):
    """Random patch batches of the train stacks; all validation stacks in one step."""

    def __init__(self, train_d3set: D3Source, val_d3set: D3Source, cfg: PunetTrainConfig) -> None:
        super().__init__()
        self.train_source, self.val_source, self.cfg = train_d3set, val_d3set, cfg
        self.sampler: PatchBatches | None = None
        self.val_stacks: list[LabeledStack] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        t0 = time.perf_counter()
        train = labeled_stacks(_as_list(self.train_source), self.cfg.percentiles)
        self.val_stacks = labeled_stacks(_as_list(self.val_source), self.cfg.percentiles)
        self.sampler = PatchBatches(train, self.cfg)
        self.val_samples = [self.val_stacks] if self.val_stacks else []  # one step: all stacks
        log.info(
            "Probabilistic U-Net: %d train / %d val stacks loaded in %.1fs",
            len(train),
            len(self.val_stacks),
            time.perf_counter() - t0,
        )


# -- the Lightning module ---------------------------------------------------------------------
class PunetModule(FamilyModule):
    """The Prob-UNet, its losses and KL schedule, optimizer and per-step LR, its validation."""

    monitor = BEST_METRIC
    mode = "max"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: PunetTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_punet(cfg.model_config())
        self.recon_loss = TverskyLoss(cfg.tversky_alpha, cfg.tversky_beta, cfg.tversky_gamma)
        self.geco = (
            Geco(cfg.geco_goal, step_size=cfg.geco_step_size, alpha=cfg.geco_alpha)
            if cfg.kl_schedule == "geco"
            else None
        )
        self.kl_warmup_steps = round(cfg.kl_warmup_epochs * cfg.steps_per_epoch)
        #: this step's values, logged once its gradient is known to be finite
        self._pending: dict[str, torch.Tensor | float] | None = None
        self._skipped = False
        self._n_ok = self._n_bad = 0

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        return self.net(x, masks)

    # -- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._n_ok = self._n_bad = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        cfg = self.cfg
        self._pending, self._skipped = None, False
        targets = {k: batch[k] for k in HEADS}
        out = self.net(batch["image"], torch.cat([targets[k] for k in HEADS], dim=1))
        recon_h = {k: self.recon_loss(out.logits[k].float(), targets[k]) for k in HEADS}
        recon = cfg.loss_weight_spine * recon_h["spine"]
        recon = recon + cfg.loss_weight_dendrite * recon_h["dendrite"]
        kl = out.kl or {}
        kl_term = sum(free_bits(kl[k].float(), cfg.kl_free_bits) for k in HEADS)
        if self.geco is not None:
            loss = self.geco.loss(recon, kl_term)
            beta = self.geco.beta
        else:
            # every batch counts, skipped ones too: the step of the run, resume-proof
            step = self.current_epoch * cfg.steps_per_epoch + batch_idx
            beta = linear_warmup(step, self.kl_warmup_steps, cfg.kl_beta)
            loss = recon + beta * kl_term
        if not torch.isfinite(loss):
            self._skip(f"non-finite loss {loss.item()}")
            return None
        self._pending = {
            "train_loss": loss.detach(),
            "train_recon": recon.detach(),
            "train_recon_spine": recon_h["spine"].detach(),
            "train_recon_dendrite": recon_h["dendrite"].detach(),
            "train_kl_spine": kl["spine"].detach().mean(),
            "train_kl_dendrite": kl["dendrite"].detach().mean(),
            "train_kl": (kl["spine"].detach() + kl["dendrite"].detach()).mean(),
            "beta": float(beta),
        }
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient skips the step (its gradients are dropped). Under 16-bit
        mixed precision the grad scaler skips such steps itself."""
        if self._pending is None or str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            self._pending = None
            self._skip("non-finite gradient")

    def _skip(self, why: str) -> None:
        self._skipped = True
        self._n_bad += 1
        log.warning("epoch %d: %s, step skipped", self.current_epoch, why)
        self._check_divergence(self._n_bad)

    def _check_divergence(self, n_bad: int) -> None:
        cfg = self.cfg
        if n_bad > cfg.max_nonfinite_steps:
            msg = (
                f"training diverged in epoch {self.current_epoch}: {n_bad} steps with a "
                f"non-finite loss or gradient (limit {cfg.max_nonfinite_steps}); lower lr "
                f"({cfg.lr}) or kl_beta ({cfg.kl_beta}), or check the data for NaN"
            )
            log.error(msg)
            raise TrainingDiverged(msg)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        bs = self.cfg.batch_size
        if self._pending is not None:
            self._n_ok += 1
            for name, value in self._pending.items():
                self.log(name, value, on_step=False, on_epoch=True, batch_size=bs)
        self.log(
            "nonfinite_steps",
            float(self._skipped),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            batch_size=1,
        )
        if batch_idx == self.cfg.steps_per_epoch - 1:  # the epoch's last batch
            if self._n_ok == 0:  # nothing finite to report or to keep
                self._check_divergence(self.cfg.max_nonfinite_steps + 1)
            if self.geco is not None:
                self.log("geco_lambda", self.geco.lam, on_step=False, on_epoch=True, batch_size=1)

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * cfg.steps_per_epoch
        constant = cfg.lr_schedule == "constant"
        return per_step_schedule(opt, total, cfg.lr_warmup_steps, 0.05, constant)

    # -- validation -------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, index: int) -> Any:
        if isinstance(batch, list):  # the validation stacks stay numpy; planes move per batch
            return batch
        return super().transfer_batch_to_device(batch, device, index)

    def validation_step(self, stacks: list[LabeledStack], batch_idx: int) -> None:
        cfg = self.cfg
        metrics = validate_punet(
            self.net,
            stacks,
            context=cfg.context,
            batch_planes=cfg.val_batch_planes,
            plane_stride=cfg.val_plane_stride,
            n_samples=cfg.val_samples,
            seed=cfg.seed,
            device=self.device,
        )
        self.log_val(metrics)

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.geco is not None:
            checkpoint["geco"] = self.geco.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.geco is not None and checkpoint.get("geco"):
            self.geco.load_state_dict(checkpoint["geco"])

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {
            "train_format": CHECKPOINT_FORMAT,
            "epoch": self.current_epoch + 1,
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        save_punet(self.net, path, extra)

    def flat_config(self) -> dict[str, Any]:
        return {**self.cfg.as_dict(), "n_parameters": count_parameters(self.net)}


def train_punet(
    train_d3set: D3Source,
    val_d3set: D3Source,
    out_dir: str | Path,
    cfg: PunetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train a :class:`ProbUNet`: ``out_dir/best.pt`` (model format) and ``out_dir/last.ckpt``.

    ``train_d3set``/``val_d3set`` are d3set paths or loaded :class:`D3Set` objects (or lists
    of them). An unfinished run in ``out_dir`` is continued; a finished one is returned as is
    unless ``cfg.epochs`` grew; ``resume=False`` starts over.
    """
    cfg = cfg or PunetTrainConfig()
    data = PunetDataModule(train_d3set, val_d3set, cfg)
    arch = cfg.model_config()
    return fit(
        lambda: PunetModule(cfg), data, cfg, out_dir, hooks, resume=resume, model_config=arch
    )
