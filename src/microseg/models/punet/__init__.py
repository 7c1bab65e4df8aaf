"""The "punet" family: a Probabilistic U-Net for dendritic spines and dendrites (DeepD3 style).

``network`` builds, saves and loads the :class:`ProbUNet`, ``predict`` streams ZYX stacks
through it (mean probabilities and the sums the uncertainty stage needs), ``train`` is the
Lightning module and data module; :class:`PunetSegmenter` is the façade the stages reach
through :func:`microseg.models.get_model`. Importing this package does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from microseg.errors import ConfigError
from microseg.models import register_model
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
from microseg.utils.fields import unknown_dotted

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
class PunetSegmenter:
    """A :class:`ProbUNet` behind the ``models`` protocol (build, train, load, predict, save)."""

    trainable = True

    def __init__(self, network: ProbUNet) -> None:
        self.network = network

    @classmethod
    def build(cls, **params: Any) -> PunetSegmenter:
        """``ProbUNet(**params)``, e.g. ``filters``, ``latent_dim_spine``, ``dual_decoder``."""
        return cls(ProbUNet(**params))

    @classmethod
    def train(
        cls,
        data: Any,
        out_dir: str | Path,
        train: Mapping[str, Any],
        hooks: Any = None,
        *,
        resume: bool = True,
    ) -> Any:
        """:func:`microseg.models.punet.train.train_punet` from a params ``train`` section.

        ``data`` is a ``(train, val)`` tuple of d3sets (paths or loaded ``D3Set`` objects, or
        lists of them), a folder holding ``train.d3set`` and ``val.d3set`` (the synthetic
        spine layout), or a training ``.d3set`` with ``val.d3set`` beside it; with a path, a
        ``val`` key in ``train`` names another validation d3set. Every other key is a
        ``PunetTrainConfig`` field (architecture included); the progress bar is off unless
        asked for.
        """
        from microseg.models.punet.train import PunetTrainConfig, train_punet

        values = {"progress": False, **train}
        val = values.pop("val", None)
        if isinstance(data, tuple):
            train_src, val_src = data
        else:
            data = Path(data)
            train_src = data / "train.d3set" if data.is_dir() else data
            val_src = Path(val) if val is not None else train_src.with_name("val.d3set")
        cfg = PunetTrainConfig.from_mapping(values)
        return train_punet(train_src, val_src, out_dir, cfg, hooks, resume=resume)

    @classmethod
    def check_train_keys(cls, keys: Iterable[str]) -> None:
        """Refuse dotted ``train`` keys that name no ``PunetTrainConfig`` field (a study's space, a
        tuned params file), so typos fail before any training."""
        from microseg.models.punet.train import PunetTrainConfig

        bad = unknown_dotted(PunetTrainConfig, keys)
        if bad:
            raise ConfigError(
                f"unknown punet training knob(s) {sorted(bad)}; expected PunetTrainConfig fields"
            )

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
