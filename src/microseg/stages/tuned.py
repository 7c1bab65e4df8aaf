"""Tuned params: ``params/tuned_<target>.yaml`` (what a training study leaves) merged over a
training section. A leaf module: the training stages read it, the study stage writes it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microseg.config import Params

log = logging.getLogger(__name__)

TUNED_DIR = Path("params")


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
