"""The "punet" family: a Probabilistic U-Net for dendritic spines and dendrites (DeepD3 style).

``network`` builds, saves and loads the :class:`ProbUNet`, ``predict`` streams ZYX stacks
through it (mean probabilities and the sums the uncertainty stage needs), ``train`` is the
Lightning module and data module; :class:`PunetSegmenter` is the façade the stages reach
through :func:`microseg.models.get_model`. Importing this package does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from microseg.models import EngineFamily, register_model
from microseg.models.punet.network import (
    HEADS,
    MODEL_FORMAT,
    ProbUNet,
    PunetOutput,
    build_punet,
    count_parameters,
    load_punet,
    pad_to_multiple,
    padded_size,
    save_punet,
)
from microseg.models.punet.predict import (
    STATS,
    mask_name,
    predict_stack_punet,
    remove_small,
    write_predictions,
)

__all__ = [
    "HEADS",
    "MODEL_FORMAT",
    "STATS",
    "ProbUNet",
    "PunetOutput",
    "PunetSegmenter",
    "build_punet",
    "count_parameters",
    "load_punet",
    "mask_name",
    "pad_to_multiple",
    "padded_size",
    "predict_stack_punet",
    "remove_small",
    "save_punet",
    "write_predictions",
]


@register_model("punet")
class PunetSegmenter(EngineFamily):
    """A :class:`ProbUNet` behind the ``models`` protocol (build, train, load, predict, save)."""

    train_config = "microseg.models.punet.train:PunetTrainConfig"
    train_function = "microseg.models.punet.train:train_punet"

    @classmethod
    def data_args(cls, data: Any, train: dict[str, Any]) -> tuple[Any, ...]:
        """``data`` is a ``(train, val)`` tuple of d3sets (paths or loaded ``D3Set`` objects,
        or lists of them), a folder holding ``train.d3set`` and ``val.d3set`` (the synthetic
        spine layout), or a training ``.d3set`` with ``val.d3set`` beside it; with a path, a
        ``val`` key in ``train`` names another validation d3set."""
        val = train.pop("val", None)
        if isinstance(data, tuple):
            return data
        data = Path(data)
        train_src = data / "train.d3set" if data.is_dir() else data
        return train_src, Path(val) if val is not None else train_src.with_name("val.d3set")

    def __init__(self, network: ProbUNet) -> None:
        self.network = network

    @classmethod
    def build(cls, **params: Any) -> PunetSegmenter:
        """``ProbUNet(**params)``, e.g. ``filters``, ``latent_dim_spine``, ``dual_decoder``."""
        return cls(ProbUNet(**params))

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **_: Any
    ) -> PunetSegmenter:
        """The network in ``path`` (``best.pt`` of a training run, or :meth:`save`'s file);
        other params sections are accepted and ignored."""
        return cls(load_punet(path, map_location))

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """:func:`~microseg.models.punet.predict.predict_stack_punet` per ZYX stack."""
        return [predict_stack_punet(self.network, image, **params) for image in images]

    def predict_stack(self, stack: Any, **options: Any) -> Any:
        """:func:`microseg.models.punet.predict.predict_stack_punet` of one ZYX stack (what the
        spine pipeline streams planes through)."""
        return predict_stack_punet(self.network, stack, **options)

    def save(self, path: str | Path) -> Path:
        return save_punet(self.network, path)
