"""Model families, registered by name behind one small protocol (detectron2-style registry).

A family module decorates its class with ``@register_model("name")``; stages look it up with
:func:`get_model`. Modules register on import, so :func:`get_model` imports the known family
modules lazily (torch/ultralytics are heavy and not every stage needs them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from microseg.errors import ConfigError

#: name -> family class
MODELS: dict[str, type] = {}

#: family name -> module that registers it (imported on first :func:`get_model` lookup)
_KNOWN_MODULES = {
    "yolo": "microseg.models.yolo",
    "punet": "microseg.models.punet",
    "unet": "microseg.models.unet",
    "maskrcnn": "microseg.models.maskrcnn",
}

T = TypeVar("T", bound=type)


@runtime_checkable
class ModelFamily(Protocol):
    """What every family offers: build a network, train it, predict, save and load it."""

    @classmethod
    def build(cls, **params: Any) -> ModelFamily:
        """A fresh, untrained model from hyper-parameters (architecture, channels, ...)."""
        ...

    def train(self, data: str | Path, out_dir: str | Path, **params: Any) -> Any:
        """Fit on ``data``, writing checkpoints under ``out_dir``; resumes when it can."""
        ...

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """One result per input image, in the family's documented output format."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the weights (and whatever ``load`` needs) to ``path``."""
        ...

    @classmethod
    def load(cls, path: str | Path, **params: Any) -> ModelFamily:
        """A model from a file written by ``save`` (or the family's native checkpoint)."""
        ...


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available as ``get_model(name)``."""

    def deco(cls: T) -> T:
        existing = MODELS.get(name)
        if existing is not None and existing is not cls:
            raise ConfigError(
                f"model name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        MODELS[name] = cls
        return cls

    return deco


def get_model(name: str) -> type:
    """The family class registered as ``name`` (importing its module on first use)."""
    if name not in MODELS and name in _KNOWN_MODULES:
        importlib.import_module(_KNOWN_MODULES[name])
    try:
        return MODELS[name]
    except KeyError:
        known = sorted(set(MODELS) | set(_KNOWN_MODULES))
        raise ConfigError(f"unknown model {name!r}; registered models: {known}") from None
