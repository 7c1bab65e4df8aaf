"""Ultralytics training runs on disk, and training offline.

Resume: a run lives in ``<out_dir>/<name>/`` (``weights/last.pt``, ``best.pt``,
``results.csv``). Ultralytics' ``last.pt`` keeps the optimizer and the epoch while training
runs and has both stripped (epoch -1) when training ends, so an interrupted run is one whose
``last.pt`` still has them (:func:`run_state`).

Offline: Ultralytics would download a font while checking the dataset, the AMP-check weights
on CUDA and ask PyPI for updates. :func:`offline_guards` turns these into no-ops while we
train (plots are off, so no font is needed; AMP is trusted on CUDA and off elsewhere, as
Ultralytics decides it).

Safety: Ultralytics pickles its whole network into a ``.pt``, and loads it with
``weights_only=False``. :func:`network_classes` vets a file first with torch's own scanner
(``get_unsafe_globals_in_checkpoint``): beyond what ``weights_only`` loading allows, it may
name only ``nn.Module`` classes of torch or Ultralytics (and its argument namespace); nothing
of it runs while checking. We then load it ourselves with ``weights_only=True`` and those
classes allowed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a training run left its files and how it ended."""

    save_dir: Path
    best: Path | None
    last: Path
    metrics: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    already_finished: bool = False


def ultralytics_args() -> set[str]:
    """Ultralytics' train argument names, read from its ``cfg/default.yaml`` (importing
    ``ultralytics`` itself costs seconds, too much for a config check)."""
    import yaml

    spec = importlib.util.find_spec("ultralytics")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "cfg" / "default.yaml"
        if path.is_file():
            return set(yaml.safe_load(path.read_text()))
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return set(DEFAULT_CFG_DICT)


#: where the classes an Ultralytics checkpoint may name live (its network's layers)
NETWORK_MODULES = ("torch.nn.modules.", "ultralytics.nn.")
#: plain data containers an interrupted run also pickles (its training arguments)
DATA_CLASSES = frozenset({"ultralytics.utils.IterableSimpleNamespace"})


def network_classes(path: str | Path) -> list[type]:
    """The network classes ``path`` pickles, after refusing any other global it names.

    Raises :class:`DataFormatError` for a file that is no PyTorch checkpoint or that would
    call anything beyond torch's ``weights_only`` set, torch/Ultralytics module classes and
    :data:`DATA_CLASSES`.
    """
    import torch

    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip, truncated, not a pickle: several exception types
        msg = f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        raise DataFormatError(msg, path) from exc
    classes, refused = [], []
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        obj = None
        if name.startswith(NETWORK_MODULES) or name in DATA_CLASSES:
            with contextlib.suppress(ImportError, AttributeError):
                obj = getattr(importlib.import_module(module), attr)
        module_class = isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        if module_class or (isinstance(obj, type) and name in DATA_CLASSES):
            classes.append(obj)
        else:
            refused.append(name)
    if refused:
        raise DataFormatError(
            "refusing to load: the checkpoint names code beyond a network's layers "
            f"({', '.join(refused[:5])}); only torch/Ultralytics nn.Module classes are allowed",
            path,
        )
    return classes


def _load_ckpt(path: Path) -> dict[str, Any]:
    import torch

    with torch.serialization.safe_globals(network_classes(path)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"expected an Ultralytics checkpoint dict, found {type(ckpt).__name__}", path
        )
    return ckpt


def run_state(last: Path) -> str:
    """``"missing"``, ``"interrupted"`` (resumable), ``"finished"`` or ``"unreadable"``.

    Ultralytics writes ``last.pt`` in place, so a run killed while saving can leave it
    truncated: such a run cannot resume and is trained afresh.
    """
    if not last.is_file():
        return "missing"
    try:
        ckpt = _load_ckpt(last)
    except Exception as exc:  # truncated pickle/zip: any of several exception types
        log.warning("cannot read %s (%s: %s)", last, type(exc).__name__, exc)
        return "unreadable"
    if ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None:
        return "interrupted"
    return "finished"


def is_resumable(last: Path) -> bool:
    """True when ``last`` is an Ultralytics checkpoint of a run that did not finish."""
    return run_state(last) == "interrupted"


def _amp_without_download(model: Any) -> bool:
    """Ultralytics' AMP decision without its check (which downloads weights): CUDA only."""
    device = next(model.parameters()).device
    return device.type not in ("cpu", "mps")


@contextlib.contextmanager
def offline_guards() -> Iterator[None]:
    """Keep Ultralytics from reaching the network while training (restored afterwards)."""
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_mod
    import ultralytics.utils.checks as checks

    patches = [
        (data_utils, "check_font", lambda *a, **k: None),
        (checks, "check_font", lambda *a, **k: None),
        (checks, "check_pip_update_available", lambda *a, **k: False),
        (trainer_mod, "check_amp", _amp_without_download),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, new in patches:
            setattr(mod, name, new)
        yield
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)
