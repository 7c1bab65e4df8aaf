"""Mappings from ``params.yaml`` checked against a dataclass before it is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
