"""Params keys checked against dataclasses: flat (``known_fields``) and dotted
(``unknown_dotted``, what a study's space and a tuned params file are checked with)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from microseg.errors import ConfigError
from microseg.utils.fields import known_fields, unknown_dotted


@dataclass
class Inner:
    depth: int = 3


@dataclass
class Outer:
    lr: float = 1e-3
    model: Inner = field(default_factory=Inner)
    loss_params: dict = field(default_factory=dict)
    limit: int | None = None


def test_unknown_dotted_goes_down_dataclasses_and_dicts_only():
    keys = ["lr", "model.depth", "loss_params.gamma", "model.width", "lr.x", "limit.y", "nope"]
    assert unknown_dotted(Outer, keys) == ["model.width", "lr.x", "limit.y", "nope"]
    assert unknown_dotted(Outer, []) == []


def test_known_fields_names_the_unknown_keys():
    assert known_fields(Outer, {"lr": 0.1}, "outer") == {"lr": 0.1}
    with pytest.raises(ConfigError, match=r"unknown outer keys \['nope'\]"):
        known_fields(Outer, {"nope": 1}, "outer")
