"""Mappings from ``params.yaml`` checked against a dataclass before it is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from microseg.errors import ConfigError


def known_fields(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``values`` as a dict, or a :class:`ConfigError` naming every key ``cls`` does not have
    (a typo in params must fail loudly, not fall back to a default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; known: {sorted(names)}")
    return dict(values)


def unknown_dotted(cls: type, keys: Iterable[str]) -> list[str]:
    """The dotted keys (``lr``, ``model.depth``, ``loss_params.gamma``) that name no field of
    the dataclass ``cls``: a key goes one level down where the field's default is a dataclass
    (checked against it) or a dict (any key); a scalar field has nothing below it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = []
    for key in keys:
        head, _, rest = key.partition(".")
        f = fields.get(head)
        if f is None:
            bad.append(key)
            continue
        if not rest:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            bad += [f"{head}.{k}" for k in unknown_dotted(type(default), [rest])]
        elif not isinstance(default, dict):
            bad.append(key)
    return bad
