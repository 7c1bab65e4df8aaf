"""The "hpunet" family: a hierarchical Probabilistic U-Net (Kohl et al., 2019), dual task.

``network`` builds, saves and loads the :class:`HierarchicalProbUNet`, ``predict`` streams
ZYX stacks through it with the flat ``punet`` family's output contract (mean probabilities
and the per-sample sums), ``train`` is its Lightning module (GECO, bounded multiplier).
:class:`HpunetSegmenter` is the façade the stages reach through
:func:`microseg.models.get_model`; ``spines.prob_model: hpunet`` puts it wherever the flat
Prob-UNet was used. Importing this package does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from microseg.models import register_model
from microseg.models.hpunet.network import (
    MODEL_FORMAT,
    HierarchicalProbUNet,
    HpunetOutput,
    build_hpunet,
    is_hpunet_file,
    load_hpunet,
    save_hpunet,
)
from microseg.models.hpunet.predict import predict_stack_hpunet
from microseg.models.punet import PunetSegmenter

__all__ = [
    "MODEL_FORMAT",
    "HierarchicalProbUNet",
    "HpunetOutput",
    "HpunetSegmenter",
    "build_hpunet",
    "is_hpunet_file",
    "load_hpunet",
    "predict_stack_hpunet",
    "save_hpunet",
]


@register_model("hpunet")
class HpunetSegmenter(PunetSegmenter):
    """A :class:`HierarchicalProbUNet` behind the ``models`` protocol; trains on what the
    flat family trains on (its ``data_args``), predicts what it predicts."""

    train_config = "microseg.models.hpunet.train:HpunetTrainConfig"
    train_function = "microseg.models.hpunet.train:train_hpunet"

    def __init__(self, network: HierarchicalProbUNet) -> None:  # type: ignore[override]
        self.network = network

    @classmethod
    def owns(cls, path: str | Path) -> bool:
        """Whether ``path`` is a file of this family (its format tag), not a flat Prob-UNet's:
        the stages load either family's file through one call."""
        return is_hpunet_file(path)

    @classmethod
    def build(cls, **params: Any) -> HpunetSegmenter:
        """``HierarchicalProbUNet(**params)``, e.g. ``filters``, ``latent_levels``."""
        return cls(HierarchicalProbUNet(**params))

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **_: Any
    ) -> HpunetSegmenter:
        return cls(load_hpunet(path, map_location))

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        return [predict_stack_hpunet(self.network, image, **params) for image in images]

    def predict_stack(self, stack: Any, **options: Any) -> Any:
        """:func:`~microseg.models.hpunet.predict.predict_stack_hpunet` of one ZYX stack."""
        return predict_stack_hpunet(self.network, stack, **options)

    def save(self, path: str | Path) -> Path:
        return save_hpunet(self.network, path)
