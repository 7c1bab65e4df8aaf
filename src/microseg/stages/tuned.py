"""Tuned params: ``params/tuned_<target>.yaml`` (what a training study leaves) merged over a
training section. A leaf module: the training stages read it, the study stage writes it, and
:func:`microseg.stages.tuning.adopt` copies a study's ``studies/<target>/best.yaml``
(``studies/dvc.yaml``) over it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError

log = logging.getLogger(__name__)

TUNED_DIR = Path("params")
#: where the stages of ``studies/dvc.yaml`` leave each study (``studies/<target>/best.yaml``)
STUDIES_DIR = Path("studies")
CELLS_PREFIX = "cells:"


def resolve_target(params: Params, target: str) -> str:
    """``cells:<model>`` names the ``cells.models`` entry ``<model>``; other targets as given."""
    if not target.startswith(CELLS_PREFIX):
        return target
    name = target.removeprefix(CELLS_PREFIX)
    if name not in params.cells.models:
        raise ConfigError(
            f"unknown cells model {name!r} in tuning target {target!r}; cells.models has "
            f"{sorted(params.cells.models)}"
        )
    return name


def tuned_path(target: str) -> Path:
    return TUNED_DIR / f"tuned_{target}.yaml"


def tuned_train_config(params: Params, target: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """``target``'s ``train`` section ``base`` with the study's best params merged over it."""
    base = dict(base)
    path = tuned_path(target)
    if not path.is_file():
        return base
    import yaml

    tuned = yaml.safe_load(path.read_text()) or {}
    if not tuned:
        return base
    from microseg.utils.convert import merge_dotted

    log.info("%s training uses the tuned params of %s: %s", target, path, tuned)
    return merge_dotted(base, tuned)
