"""Training checkpoints shared by our loops: atomic save, checked load.

A checkpoint is a dict saved with ``torch.save``; ``key`` names the entry that holds the
loop's format tag, so a file from another loop (or not a checkpoint at all) is refused with
a message that says how to start over, never silently resumed from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from microseg.errors import DataFormatError
from microseg.utils.atomic import write_torch


def load_checkpoint(path: Path, fmt: str, key: str = "format") -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(
            f"expected a training checkpoint, could not load it ({type(exc).__name__}: "
            f"{exc}); delete it to start over",
            path,
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get(key) != fmt:
        raise DataFormatError(
            f"expected a {fmt} checkpoint, found something else; delete it to start over",
            path,
        )
    return ckpt


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    write_torch(path, dict(payload))
