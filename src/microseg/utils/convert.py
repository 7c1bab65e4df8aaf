"""numpy and pandas values to plain Python, and nested mappings to dotted keys and back.

``yaml.safe_dump`` refuses numpy scalars and ``json.dumps`` writes ``NaN`` (not JSON, and DVC
metrics files must parse everywhere), so every writer of such files goes through here.
MLflow params, Optuna knobs and ``-S`` overrides name nested keys with dots
(``augment.scale``): :func:`flatten`, :func:`nest` and :func:`merge_dotted` convert.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import ConfigError


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


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"augment": {"scale": 0.2}} -> {"augment.scale": 0.2}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested dicts: the inverse of :func:`flatten`."""
    return merge_dotted({}, values)


def merge_dotted(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with every (dotted or nested) key of ``update`` set in it;
    keys ``update`` does not hold keep their ``base`` values."""
    out = copy.deepcopy(dict(base))
    for dotted, value in flatten(update).items():
        node = out
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"key {dotted!r}: expected a mapping at {where!r}, found {child!r}"
                )
            node = child
        node[leaf] = copy.deepcopy(value)
    return out


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a missing, unreadable or broken file is a
    :class:`~microseg.errors.DataFormatError` naming it (not a JSONDecodeError traceback)."""
    import json

    from microseg.errors import DataFormatError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a JSON file, found nothing", path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(f"not readable JSON ({exc}); delete or restore it", path) from None
