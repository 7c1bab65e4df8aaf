"""Model families, registered by name behind one small protocol (detectron2-style registry).

A family is a package ``models/<family>/`` (network, predictor, Lightning training module,
façade). Its façade class is decorated with ``@register_model("name")``; stages, the CLI and
``tune/`` look it up with :func:`get_model` and never import a family by hand, so a new
family is one package plus one ``params.yaml`` entry. Lookups import the family lazily
(torch, ultralytics and detectron2 are heavy and not every stage needs them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np

from microseg.errors import ConfigError
from microseg.utils.registry import Registry

#: family name -> façade class
MODELS: Registry[type] = Registry(
    "model",
    lazy={
        "yolo": "microseg.models.yolo",
        "punet": "microseg.models.punet",
        "hpunet": "microseg.models.hpunet",
        "unet": "microseg.models.unet",
        "maskrcnn": "microseg.models.maskrcnn",
        "classical": "microseg.models.classical",
        "maunet": "microseg.models.maunet",
        "nnunet": "microseg.models.nnunet",
        "sac": "microseg.models.sac",
        "lstmunet": "microseg.models.lstmunet",
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


class EngineFamily:
    """Façade plumbing shared by the families the Lightning engine trains: ``train`` from a
    params section and ``check_train_keys``. A family names its training config class and
    training function as ``"module:name"`` (imported only when training, so predictors and
    registered MLflow models never load training code) and may override :meth:`data_args`.
    """

    trainable = True
    #: ``"package.module:ConfigClass"``: a dataclass with ``from_mapping``
    train_config: ClassVar[str]
    #: ``"package.module:function"`` called as ``fn(*data_args, out_dir, cfg, hooks, resume=)``
    train_function: ClassVar[str]

    @classmethod
    def data_args(cls, data: Any, train: dict[str, Any]) -> tuple[Any, ...]:
        """What the training function takes before ``out_dir`` (may pop keys of ``train``)."""
        return (data,)

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
        """Train from a params ``train`` section (progress bars off unless it asks)."""
        values = {"progress": False, **train}
        args = cls.data_args(data, values)
        cfg = _load(cls.train_config).from_mapping(values)
        return _load(cls.train_function)(*args, out_dir, cfg, hooks, resume=resume)

    @classmethod
    def check_train_keys(cls, keys: Iterable[str]) -> None:
        """Refuse dotted ``train`` keys that name no field of the training config (a study's
        space, a tuned params file), so typos fail before any training."""
        from microseg.utils.fields import unknown_dotted

        config = _load(cls.train_config)
        bad = unknown_dotted(config, keys)
        if bad:
            raise ConfigError(
                f"unknown {cls.__name__} training knob(s) {sorted(bad)}; expected "
                f"{config.__name__} fields"
            )

    @classmethod
    def train_defaults(cls, keys: Iterable[str]) -> dict[str, Any]:
        """The training config's defaults of dotted keys a ``train`` section leaves out (a
        study's baseline trial trains them); keys without a plain default are left out."""
        try:
            default = _load(cls.train_config).from_mapping({})
        except Exception:  # a config with required fields has no default to offer
            return {}
        out: dict[str, Any] = {}
        for k in keys:
            value: Any = default
            for part in k.split("."):
                value = (
                    value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
                )
            if isinstance(value, bool | int | float | str):
                out[k] = value
        return out


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available as ``get_model(name)``."""
    return MODELS.register(name)


def get_model(name: str) -> type:
    """The family class registered as ``name`` (importing its package on first use)."""
    return MODELS.get(name)
