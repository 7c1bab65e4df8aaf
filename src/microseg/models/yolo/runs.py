"""Ultralytics training runs on disk, and training offline.

Resume: a run lives in ``<out_dir>/<name>/`` (``weights/last.pt``, ``best.pt``,
``results.csv``). Ultralytics' ``last.pt`` keeps the optimizer and the epoch while training
runs and has both stripped (epoch -1) when training ends, so an interrupted run is one whose
``last.pt`` still has them (:func:`run_state`).

Offline: Ultralytics would download a font while checking the dataset, the AMP-check weights
on CUDA and ask PyPI for updates. :func:`offline_guards` turns these into no-ops while we
train (plots are off, so no font is needed; AMP is trusted on CUDA and off elsewhere, as
Ultralytics decides it).

Safety: Ultralytics pickles its whole network into a ``.pt``, and loads it
with ``weights_only`` off. :func:`network_classes` vets a file first with torch's own scanner
(``get_unsafe_globals_in_checkpoint``): beyond what ``weights_only`` loading allows, it may
name only ``nn.Module`` classes of torch or Ultralytics (and its argument namespace); nothing
of it runs while checking. We then load it ourselves with ``weights_only=True`` and those
classes allowed.

Same bytes: a finished run is rewritten in place by :func:`normalise_run` so that the same
training, run again elsewhere or later, leaves the same files (the run folder is a DVC
output): absolute paths in ``args.yaml`` and in the checkpoints become relative to the run
folder's parent, the checkpoints' ``date`` is fixed and their ``git`` record dropped, and the
wall-clock ``time`` column of ``results.csv`` moves to ``timing.json`` (ignored by DVC).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError
from microseg.utils.atomic import write_text, write_torch

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run Ultralytics with ``n`` torch threads on the CPU (None: every usable core; 0: as
    many as torch uses now).

    Ultralytics' ``select_device`` sets ``torch.set_num_threads(min(8, cores - 1))``: one
    thread on a 2-core runner, which halves CPU training speed there, and a setting that
    outlives the call. Its count is patched for the block and torch's restored after it.
    """
    import torch
    import ultralytics.utils.torch_utils as torch_utils

    before, saved = torch.get_num_threads(), torch_utils.NUM_THREADS
    torch_utils.NUM_THREADS = before if n == 0 else max(1, n or usable_cores())
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = saved
        torch.set_num_threads(before)


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


@contextlib.contextmanager
def quiet_bars(quiet: bool = True) -> Iterator[None]:
    """Ultralytics' progress bars off while the block runs (``quiet``): they redraw with
    carriage returns on stdout, one unreadable line in a DVC or CI log. Its ``verbose`` does
    not reach them; every bar it draws is its ``TQDM``, so that class is switched off."""
    if not quiet:
        yield
        return
    from ultralytics.utils.tqdm import TQDM

    init = TQDM.__init__

    def silent(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "disable": True})

    TQDM.__init__ = silent
    try:
        yield
    finally:
        TQDM.__init__ = init


#: the ``date`` of a normalised checkpoint (Ultralytics stamps the moment it saved)
FIXED_DATE = "1970-01-01T00:00:00+00:00"
#: checkpoint keys that record the host rather than the run (``git``: the checkout's root
#: folder, branch and commit), dropped by :func:`normalise_run`
HOST_KEYS = ("git",)
#: the wall-clock column of Ultralytics' ``results.csv`` (seconds since training started)
TIME_COLUMN = "time"
#: where :func:`normalise_run` keeps those times (ignored by DVC, as the engine's)
TIMING = "timing.json"


def _relative(value: Any, base: Path) -> Any:
    """``value`` relative to ``base`` when it is an absolute path string, else unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return Path(os.path.relpath(value, base)).as_posix()
    except ValueError:  # another drive (Windows): no relative path, keep the name only
        return Path(value).name


def _relative_args(args: Any, base: Path) -> Any:
    """Training arguments (a dict or Ultralytics' namespace) with paths relative to ``base``."""
    if isinstance(args, dict):
        return {k: _relative(v, base) for k, v in args.items()}
    if hasattr(args, "__dict__"):  # IterableSimpleNamespace of an unstripped checkpoint
        for k, v in vars(args).items():
            setattr(args, k, _relative(v, base))
    return args


def _normalise_ckpt(path: Path, base: Path) -> None:
    """Rewrite the checkpoint ``path`` without its date, host record or absolute paths."""
    ckpt = _load_ckpt(path)  # vetted, weights_only
    ckpt["date"] = FIXED_DATE
    for key in HOST_KEYS:
        ckpt.pop(key, None)
    if "train_args" in ckpt:
        ckpt["train_args"] = _relative_args(ckpt["train_args"], base)
    for key in ("model", "ema"):  # the network keeps its own copy of the arguments
        net = ckpt.get(key)
        if net is not None and getattr(net, "args", None) is not None:
            net.args = _relative_args(net.args, base)
    results = ckpt.get("train_results")
    if isinstance(results, dict):
        ckpt["train_results"] = {k: v for k, v in results.items() if k != TIME_COLUMN}
    write_torch(path, ckpt)


def _move_times(results: Path, timing: Path) -> None:
    """Drop ``results.csv``'s wall-clock column, writing its times to ``timing.json``
    (``{"seconds": total, "epochs": [{"epoch": n, "elapsed_seconds": t}]}``, epochs as
    Ultralytics numbers them there, from 1). Nothing happens once the column is gone."""
    rows = list(csv.reader(io.StringIO(results.read_text(encoding="utf-8"))))
    if not rows or TIME_COLUMN not in rows[0]:
        return
    col = rows[0].index(TIME_COLUMN)
    epochs = []
    for row in rows[1:]:
        with contextlib.suppress(ValueError, IndexError):
            epochs.append({"epoch": int(float(row[0])), "elapsed_seconds": float(row[col])})
    seconds = epochs[-1]["elapsed_seconds"] if epochs else 0.0
    write_text(timing, json.dumps({"seconds": seconds, "epochs": epochs}, indent=1))
    kept = "".join(",".join(v for i, v in enumerate(row) if i != col) + "\n" for row in rows if row)
    write_text(results, kept)


def normalise_run(save_dir: Path) -> None:
    """Make a finished run's folder the same bytes for the same training (see module notes).

    Only for a finished run: an interrupted one must keep its absolute paths and its state to
    resume. Paths become relative to ``save_dir.parent`` (the ``out_dir`` of
    :meth:`~microseg.models.yolo.YoloSpineDetector.fit`); running it again changes nothing.
    """
    import yaml

    save_dir = Path(save_dir)
    base = save_dir.parent
    args_yaml = save_dir / "args.yaml"
    if args_yaml.is_file():
        args = _relative_args(yaml.safe_load(args_yaml.read_text(encoding="utf-8")) or {}, base)
        write_text(args_yaml, yaml.safe_dump(args, sort_keys=False, allow_unicode=True))
    for ckpt in sorted((save_dir / "weights").glob("*.pt")):
        _normalise_ckpt(ckpt, base)
    results = save_dir / "results.csv"
    if results.is_file():
        _move_times(results, save_dir / TIMING)
