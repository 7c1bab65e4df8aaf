"""Multi-class (softmax) segmentation losses for the 3-class U-Net, selectable by name.

Every loss is a small callable ``loss(logits, target, weight_map) -> scalar`` with
``logits`` ``(B, C, H, W)``, ``target`` class indices ``(B, 1, H, W)`` or ``(B, H, W)``, and
``weight_map`` ``(B, 1, H, W)``/``(B, H, W)`` or None. Only the weighted losses read the
weight map; the others accept and ignore it, so a training loop calls them all alike.

* ``"wce"`` -- per-pixel cross-entropy times the U-Net weight map (Ronneberger et al. 2015),
  averaged over pixels (plain CE when no weight map is given).
* ``"wce_dice"`` -- ``"wce"`` + soft Dice on the foreground classes (MONAI ``DiceLoss``).
* ``"dice_ce"`` -- :class:`monai.losses.DiceCELoss` (softmax, one-hot target).
* ``"focal"`` -- :class:`monai.losses.FocalLoss` (softmax focal, ``gamma``).
* ``"tversky"`` -- :class:`monai.losses.TverskyLoss` (softmax, ``alpha`` FP / ``beta`` FN).

The binary sigmoid losses of :mod:`microseg.train.losses` serve the spine models; these serve
the mutually exclusive background / interior / boundary classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss
from torch import nn

from microseg.errors import ConfigError
from microseg.utils.registry import Registry

SegLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _index_target(target: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` long class indices from ``(B, 1, H, W)`` or ``(B, H, W)``."""
    if target.ndim == 4:
        target = target[:, 0]
    return target.long()


def _channel_target(target: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` class indices, as MONAI's ``to_onehot_y`` expects."""
    return target if target.ndim == 4 else target[:, None]


class WeightedCrossEntropy(nn.Module):
    """``mean(w * CE)`` per pixel; ``w`` is the weight map (1 everywhere when None)."""

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        ce = F.cross_entropy(logits, _index_target(target), reduction="none")
        if weight_map is None:
            return ce.mean()
        w = weight_map[:, 0] if weight_map.ndim == 4 else weight_map
        return (ce * w.to(ce.dtype)).mean()


class WeightedCEDice(nn.Module):
    """Weighted CE + ``dice_weight`` * soft Dice over the foreground classes."""

    def __init__(self, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.wce = WeightedCrossEntropy()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        self.dice_weight = float(dice_weight)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        dice = self.dice(logits, _channel_target(target))
        return self.wce(logits, target, weight_map) + self.dice_weight * dice


class _Unweighted(nn.Module):
    """A MONAI loss on ``(logits, one-hot-able target)``; the weight map is ignored."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss(logits, _channel_target(target))


def _dice_ce(**kw: Any) -> nn.Module:
    return _Unweighted(DiceCELoss(to_onehot_y=True, softmax=True, batch=True, **kw))


def _focal(gamma: float = 2.0, **kw: Any) -> nn.Module:
    return _Unweighted(FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, **kw))


def _tversky(alpha: float = 0.3, beta: float = 0.7, **kw: Any) -> nn.Module:
    return _Unweighted(
        TverskyLoss(to_onehot_y=True, softmax=True, alpha=alpha, beta=beta, batch=True, **kw)
    )


#: loss name -> factory (keyword parameters from ``loss_params``)
LOSSES: Registry[Callable[..., nn.Module]] = Registry("segmentation loss")
for _name, _factory in {
    "wce": WeightedCrossEntropy,
    "wce_dice": WeightedCEDice,
    "dice_ce": _dice_ce,
    "focal": _focal,
    "tversky": _tversky,
}.items():
    LOSSES.add(_name, _factory)


def build_loss(name: str, **params: Any) -> nn.Module:
    """The loss called ``name`` (see the module docstring), with its keyword parameters."""
    factory = LOSSES.get(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters {params} for loss {name!r}: {exc}") from exc
