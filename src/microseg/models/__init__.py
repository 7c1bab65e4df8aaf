"""Model families, registered by name behind one small protocol (detectron2-style registry).

A family is a package ``models/<family>/`` (network, predictor, Lightning training module,
façade). Its façade class is decorated with ``@register_model("name")``; stages, the CLI and
``tune/`` look it up with :func:`get_model` and never import a family by hand, so a new
family is one package plus one ``params.yaml`` entry. Lookups import the family lazily
(torch, ultralytics and detectron2 are heavy and not every stage needs them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from microseg.utils.registry import Registry

#: family name -> façade class
MODELS: Registry[type] = Registry(
    "model",
    lazy={
        "yolo": "microseg.models.yolo",
        "punet": "microseg.models.punet",
        "unet": "microseg.models.unet",
        "maskrcnn": "microseg.models.maskrcnn",
        "classical": "microseg.models.classical",
    },
)

T = TypeVar("T", bound=type)

#: what an instance-segmentation predictor returns for one raw image:
#: ``(labels uint16, foreground probability or None, per-instance scores or None)``
Prediction = tuple[np.ndarray, np.ndarray | None, dict[int, float] | None]
Predictor = Callable[[np.ndarray], Prediction]


@runtime_checkable
class ModelFamily(Protocol):
    """What every family offers the stages: train from params, load, and predict."""

    #: False for families with nothing to learn (the classical baseline)
    trainable: bool

    @classmethod
    def train(
        cls,
        data: str | Path,
        out_dir: str | Path,
        train: Mapping[str, Any],
        hooks: Any = None,
        *,
        resume: bool = True,
    ) -> Any:
        """Fit on ``data`` from a params ``train`` section; ``out_dir/best.pt`` at the end.
        Returns the engine's ``TrainResult`` (best metrics, epochs, seconds)."""
        ...

    @classmethod
    def load(cls, path: str | Path | None, **params: Any) -> ModelFamily:
        """A model from ``best.pt`` (or the family's native file) and its params sections."""
        ...


@runtime_checkable
class InstanceSegmenter(ModelFamily, Protocol):
    """A family of the nuclei benchmark: one call from a raw image to instances."""

    def as_predictor(self) -> Predictor: ...


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available as ``get_model(name)``."""
    return MODELS.register(name)


def get_model(name: str) -> type:
    """The family class registered as ``name`` (importing its package on first use)."""
    return MODELS.get(name)
