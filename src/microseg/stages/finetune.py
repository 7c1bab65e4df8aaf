"""``init_from: models:/name@alias`` in a ``train`` section: the registered version's weights
file, downloaded through the registry, so a family's training only ever sees a local path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError


def resolve_init_from(train: Mapping[str, Any], params: Params, artifact: str) -> dict[str, Any]:
    """``train`` with a registry ``init_from`` replaced by the local file of ``artifact``
    (``weights`` for nuclei models; ``yolo`` or ``punet`` of the spine pipeline)."""
    out = dict(train)
    value = out.get("init_from")
    if not value:
        return out
    from microseg.registry.resolve import is_registry_uri, resolve_registered_model

    if not is_registry_uri(str(value)):
        return out
    local = resolve_registered_model(str(value), params=params)
    keys = [artifact, "weights"] if artifact != "weights" else ["weights", "unet"]
    for key in keys:
        if key in local.artifacts:
            out["init_from"] = str(local.artifacts[key])
            return out
    raise ConfigError(
        f"init_from {value}: the registered model ({local.family}) has no {artifact!r} weights; "
        f"its files: {sorted(local.artifacts)}"
    )
