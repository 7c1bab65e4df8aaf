"""The hierarchical Prob-UNet's training: the flat family's Lightning plumbing, GECO by default.

Data (random patches of ``.d3set`` stacks), the optimizer and per-step LR, non-finite step
skipping and :class:`~microseg.models.punet.train.TrainingDiverged`, logging and checkpoints
are the flat family's (:mod:`microseg.models.punet.train`, subclassed here); the network, the
loss and the validation are this family's.

Loss per step (Kohl et al. 2019 with GECO, Rezende & Viola 2018):
``KL + lambda * (recon - geco_goal)`` where ``recon = w_s * Tversky(spine) + w_d *
Tversky(dendrite)`` of the posterior sample's logits and ``KL = sum_k max(KL_k - free, 0)``,
``KL_k`` the analytic KL of latent scale ``k`` summed over its channels and pixels, with
``kl_free_bits`` nats per scale free (batch mean; as the flat family per head: without them
the tiny demo's latents collapse to the prior and the samples stop differing). ``lambda``
follows the moving average (``geco_alpha``) of the constraint ``recon - goal``:
``lambda <- lambda * exp(geco_step_size * ma)``, clamped to ``[geco_lambda_min,
geco_lambda_max]`` (:class:`~microseg.train.losses.Geco`): without the clamp a goal the model
cannot reach makes ``lambda`` grow exponentially and the step size with it, the divergence
GECO is known for. ``kl_schedule: linear`` uses the flat family's ramped ``beta`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from microseg.data.patches import LabeledStack, iter_planes
from microseg.errors import ConfigError
from microseg.models.hpunet.network import HierarchicalProbUNet, build_hpunet, save_hpunet
from microseg.models.punet.network import HEADS, count_parameters, pad_to_multiple
from microseg.models.punet.train import (
    D3Source,
    PunetDataModule,
    PunetModule,
    PunetTrainConfig,
    _counts,
    _scores,
)
from microseg.train.engine import TrainResult, fit
from microseg.train.family import FamilyModule
from microseg.train.hooks import HookBase
from microseg.train.losses import Geco, TverskyLoss, free_bits, linear_warmup
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.hpunet.train/1"


@dataclass
class HpunetTrainConfig(PunetTrainConfig):
    """:class:`PunetTrainConfig`'s knobs (data, schedule, Tversky, validation) plus the
    hierarchy's. ``latent_dim_*`` and ``latent_filters`` of the flat model are not used;
    ``kl_free_bits`` applies per latent scale. Defaults: a small CPU model; params.yaml's
    ``hpunet.train`` holds the demo budget, profiles/full.yaml a GPU one (latents at the 3
    coarsest of 4 scales, as Kohl 2019's at the coarsest scales of a deeper U-Net)."""

    epochs: int = 4
    steps_per_epoch: int = 30
    filters: tuple[int, ...] = (16, 32, 64)
    posterior_filters: tuple[int, ...] | None = None
    latent_levels: int = 2
    latent_dim: int = 2
    dual_decoder: bool = True
    kl_schedule: Literal["linear", "geco"] = "geco"
    #: GECO's reconstruction goal: the two heads' Tversky losses summed (0 .. 2)
    geco_goal: float = 0.6
    geco_lambda_init: float = 1.0
    geco_lambda_min: float = 1e-2
    geco_lambda_max: float = 1e2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.posterior_filters is not None:
            self.posterior_filters = tuple(int(f) for f in self.posterior_filters)
        checks = {
            "latent_levels": 1 <= self.latent_levels <= len(self.filters) - 1,
            "latent_dim": self.latent_dim >= 1,
            "geco_lambda_min": 0 < self.geco_lambda_min <= self.geco_lambda_init,
            "geco_lambda_max": self.geco_lambda_init <= self.geco_lambda_max,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid hierarchical Prob-UNet training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HpunetTrainConfig:
        """Build from a dict (e.g. ``hpunet.train`` of params.yaml); unknown keys are an error."""
        return cls(**known_fields(cls, values, "hpunet training"))

    def model_config(self) -> dict[str, Any]:
        """Constructor arguments of the network this config trains (built on the meta device)."""
        with torch.device("meta"):
            net = HierarchicalProbUNet(
                in_channels=2 * self.context + 1,
                filters=self.filters,
                latent_levels=self.latent_levels,
                latent_dim=self.latent_dim,
                head_convs=self.head_convs,
                head_hidden=self.head_hidden,
                dual_decoder=self.dual_decoder,
                posterior_filters=self.posterior_filters,
            )
        return net.config


@torch.no_grad()
def validate_hpunet(
    model: HierarchicalProbUNet,
    stacks: Sequence[LabeledStack],
    *,
    context: int = 0,
    batch_planes: int = 8,
    plane_stride: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dice/precision/recall per head over whole validation planes with the prior's mean
    latent at every scale (one deterministic pass), pooled over all voxels."""
    was_training = model.training
    model.eval()
    counts = {h: torch.zeros(3, dtype=torch.float64) for h in HEADS}
    items = list(iter_planes(stacks, context=context, stride=plane_stride))
    for start in range(0, len(items), max(1, batch_planes)):
        batch = items[start : start + batch_planes]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        h, w = x.shape[-2:]
        out = model(pad_to_multiple(x, model.pad_multiple), sample=False)
        for i, head in enumerate(HEADS):
            target = torch.from_numpy(np.stack([b[1 + i] for b in batch]))
            prob = torch.sigmoid(out.logits[head][:, 0, :h, :w]).float().cpu()
            counts[head] += _counts(prob, target)
    model.train(was_training)
    return {f"val_{k}_{n}": v for k in HEADS for n, v in _scores(counts[k]).items()}


class HpunetModule(PunetModule):
    """The flat family's module with the hierarchical network, per-scale KL and GECO."""

    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: HpunetTrainConfig) -> None:
        FamilyModule.__init__(self)  # the flat family's __init__ builds its own network
        self.cfg = cfg
        self.net = build_hpunet(cfg.model_config())
        self.recon_loss = TverskyLoss(cfg.tversky_alpha, cfg.tversky_beta, cfg.tversky_gamma)
        self.geco = (
            Geco(
                cfg.geco_goal,
                step_size=cfg.geco_step_size,
                alpha=cfg.geco_alpha,
                lambda_init=cfg.geco_lambda_init,
                lambda_min=cfg.geco_lambda_min,
                lambda_max=cfg.geco_lambda_max,
            )
            if cfg.kl_schedule == "geco"
            else None
        )
        self.kl_warmup_steps = round(cfg.kl_warmup_epochs * cfg.steps_per_epoch)
        self._pending: dict[str, torch.Tensor | float] | None = None
        self._skipped = False
        self._n_ok = self._n_bad = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        cfg = self.cfg
        self._pending, self._skipped = None, False
        targets = {k: batch[k] for k in HEADS}
        out = self.net(batch["image"], torch.cat([targets[k] for k in HEADS], dim=1))
        recon_h = {k: self.recon_loss(out.logits[k].float(), targets[k]) for k in HEADS}
        recon = cfg.loss_weight_spine * recon_h["spine"]
        recon = recon + cfg.loss_weight_dendrite * recon_h["dendrite"]
        kl_scales = [k.float().mean() for k in out.kl or []]
        kl_term = sum(free_bits(k.float(), cfg.kl_free_bits) for k in out.kl or [])
        if self.geco is not None:
            loss = self.geco.loss(recon, kl_term)
            beta = self.geco.beta
        else:
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
            "train_kl": torch.stack(kl_scales).sum().detach(),
            **{f"train_kl_scale{i}": v.detach() for i, v in enumerate(kl_scales)},
            "beta": float(beta),
        }
        return loss

    def validation_step(self, stacks: list[LabeledStack], batch_idx: int) -> None:
        cfg = self.cfg
        metrics = validate_hpunet(
            self.net,
            stacks,
            context=cfg.context,
            batch_planes=cfg.val_batch_planes,
            plane_stride=cfg.val_plane_stride,
            device=self.device,
        )
        self.log_val(metrics)

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {
            "train_format": CHECKPOINT_FORMAT,
            "epoch": self.current_epoch + 1,
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        save_hpunet(self.net, path, extra)

    def flat_config(self) -> dict[str, Any]:
        return {**self.cfg.as_dict(), "n_parameters": count_parameters(self.net)}


def train_hpunet(
    train_d3set: D3Source,
    val_d3set: D3Source,
    out_dir: str | Path,
    cfg: HpunetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train a :class:`HierarchicalProbUNet`: ``out_dir/best.pt`` (model format) and
    ``out_dir/last.ckpt`` (resume), as :func:`~microseg.models.punet.train.train_punet`."""
    cfg = cfg or HpunetTrainConfig()
    data = PunetDataModule(train_d3set, val_d3set, cfg)
    arch = cfg.model_config()
    return fit(
        lambda: HpunetModule(cfg), data, cfg, out_dir, hooks, resume=resume, model_config=arch
    )
