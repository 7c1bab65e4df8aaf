"""numpy and pandas values to plain Python, for YAML params files and strict JSON.

``yaml.safe_dump`` refuses numpy scalars and ``json.dumps`` writes ``NaN`` (not JSON, and DVC
metrics files must parse everywhere), so every writer of such files goes through here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd


def to_builtin(value: Any) -> Any:
    """A numpy scalar as the Python number (or bool, str) it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def jsonable(value: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with only JSON types inside: mappings get ``str`` keys, lists/tuples/sets
    become lists, numpy scalars (anything 0-d with an ``.item()``: 0-d arrays, scalar tensors)
    Python numbers, NaN, inf, ``pd.NA`` and ``pd.NaT`` become ``None``.

    Any other object is returned as is, or passed through ``default`` when given (e.g. ``str``
    for a report that must always serialise).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, default=default) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v, default=default) for v in value]
    if callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if default is None or value is None or isinstance(value, str | int | float | bool):
        return value
    return default(value)
