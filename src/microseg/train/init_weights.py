"""Fine-tuning: start a training run from the weights of an earlier model (``init_from``).

The file is any of our checkpoints (``best.pt`` of every Lightning family, ``last.ckpt``) or a
plain state dict, always read with ``torch.load(weights_only=True)``. Its tensors are matched
to the new network by name, allowing for the wrappers that differ between formats
(``model.``, ``net.``, ``module.`` prefixes); tensors whose shape differs (a head with other
classes) are left as initialised and listed, as nnU-Net and Detectron2 do when they load
pretrained weights. A file that matches too little of the network is refused: it is the
weights of another architecture, and training from it would silently start from scratch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError

log = logging.getLogger(__name__)

#: entries of a checkpoint dict that may hold the state dict, most specific first
STATE_KEYS = ("model", "state_dict", "net", "model_state", "weights")
WRAPPERS = ("model.", "net.", "module.", "_orig_mod.")
#: the share of the network's tensors a checkpoint must provide
MIN_MATCHED = 0.5


@dataclass
class InitReport:
    path: Path
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        total = len(self.loaded) + len(self.shape_mismatch) + len(self.missing)
        return len(self.loaded) / total if total else 0.0


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def find_state_dict(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: the dict itself, or one of :data:`STATE_KEYS`."""
    if _is_state_dict(ckpt):
        return dict(ckpt)
    if isinstance(ckpt, Mapping):
        for key in STATE_KEYS:
            if _is_state_dict(ckpt.get(key)):
                return dict(ckpt[key])
    raise DataFormatError(
        f"init_from: no state dict found (looked for a dict of tensors or the keys {STATE_KEYS})",
        path,
    )


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in WRAPPERS:
            if key.startswith(w):
                key, changed = key[len(w) :], True
    return key


def match_tensors(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``(target key -> tensor, shape mismatches, missing)``: names compared without the
    wrapper prefixes, so ``model.net.conv.weight`` and ``net.conv.weight`` meet."""
    by_name = {_strip(k): v for k, v in source.items()}
    matched: dict[str, torch.Tensor] = {}
    mismatch: list[str] = []
    missing: list[str] = []
    for key, value in target.items():
        found = by_name.get(_strip(key))
        if found is None:
            missing.append(key)
        elif tuple(found.shape) != tuple(value.shape):
            mismatch.append(key)
        else:
            matched[key] = found
    return matched, mismatch, missing


def load_init_weights(module: torch.nn.Module, path: str | Path) -> InitReport:
    """Copy the matching tensors of ``path`` into ``module`` (in place)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("init_from: weights file not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(
            f"init_from: not a weights file torch can load safely ({type(exc).__name__}: {exc})",
            path,
        ) from None
    target = module.state_dict()
    matched, mismatch, missing = match_tensors(find_state_dict(ckpt, path), target)
    report = InitReport(path, sorted(matched), mismatch, missing)
    if report.fraction < MIN_MATCHED:
        raise ConfigError(
            f"init_from {path}: only {len(matched)} of {len(target)} tensors of the network "
            f"match by name and shape ({len(mismatch)} differ in shape); it holds the weights "
            "of another architecture or family"
        )
    module.load_state_dict(matched, strict=False)
    log.info(
        "init_from %s: %d tensors loaded, %d left as initialised (shape differs: %s)",
        path, len(matched), len(mismatch) + len(missing), mismatch[:5],
    )  # fmt: skip
    return report
