"""microseg: reproducible microscopy segmentation and detection (DVC + MLflow).

From Python, any model on any image (:mod:`microseg.api`)::

    import microseg

    result = microseg.load("otsu").predict(image)
    result.labels, result.to_dataframe()

``import microseg`` stays light: ``load``, ``Model`` and ``Result`` import the API (and with
it numpy and pandas; torch only when a model loads) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Model", "Result", "load"]


def __getattr__(name: str) -> Any:
    # imported by name, not statement: modules below the API (registry/pyfunc reads
    # ``microseg.__file__``) import this package, and must not seem to import the API's stages
    if name in __all__:
        return getattr(importlib.import_module("microseg.api"), name)
    raise AttributeError(f"module 'microseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
