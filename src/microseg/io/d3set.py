"""DeepD3 ``.d3set`` training files (flammkuchen/HDF5), read and written the way DeepD3 does.

Layout, as DeepD3's ``DataGeneratorStream`` reads it: ``fl.load(fn)`` gives
``{"data": {"stacks": {"x0": ZYX, ...}, "dendrites": {...bool}, "spines": {...bool}},
"meta": DataFrame}`` and stack ``i`` is ``data[...][f"x{i}"]`` with its row
``meta.iloc[i]`` (``Width``/``Height``/``Depth`` bound the random crop, ``Resolution_XY`` in
micrometres sets the rescaling). So keys must be exactly ``x0..x{N-1}`` and meta row ``i``
must describe stack ``i``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

GROUPS = ("stacks", "dendrites", "spines")
META_COLUMNS = (
    "crop",
    "X",
    "Y",
    "Width",
    "Height",
    "Depth",
    "Z_begin",
    "Z_end",
    "Resolution_XY",
    "Resolution_Z",
    "Timestamp",
    "Generated_from",
)
_INT_COLUMNS = ("X", "Y", "Width", "Height", "Depth", "Z_begin", "Z_end")


@contextlib.contextmanager
def _numpy2_aliases() -> Iterator[None]:
    """Restore ``np.unicode_``/``np.string_`` while flammkuchen runs.

    flammkuchen 1.0.3 still calls these aliases (removed in NumPy 2.0) when it saves any
    array and when it loads string arrays. They are added only for the duration of the call
    and removed again, so no other code sees a patched NumPy. Not thread-safe by design:
    d3set files are written by one stage at a time.
    """
    added = []
    for name, value in (("unicode_", np.str_), ("string_", np.bytes_)):
        if name not in vars(np):
            setattr(np, name, value)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


#: PyTables creators of HDF5 datasets; each takes ``track_times`` (HDF5 object times)
_LEAF_CREATORS = (
    "create_array",
    "create_carray",
    "create_earray",
    "create_table",
    "create_vlarray",
)


@contextlib.contextmanager
def _untimed_hdf5() -> Iterator[None]:
    """Write HDF5 datasets without their creation/modification times.

    HDF5 stamps every dataset's object header with the wall clock, so the same stacks saved
    twice differ in bytes and DVC sees a new output. flammkuchen (and pandas' HDFStore, which
    writes ``meta``) do not expose PyTables' ``track_times``; the default is switched off only
    for the duration of the save and restored afterwards.
    """
    import tables

    originals = {name: getattr(tables.File, name) for name in _LEAF_CREATORS}

    def untimed(method: Any) -> Any:
        def create(self: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("track_times", False)
            return method(self, *args, **kwargs)

        return create

    try:
        for name, method in originals.items():
            setattr(tables.File, name, untimed(method))
        yield
    finally:
        for name, method in originals.items():
            setattr(tables.File, name, method)


@dataclass
class D3Set:
    """Stacks and their dendrite/spine masks keyed ``x0..x{N-1}``, one meta row per stack."""

    stacks: dict[str, np.ndarray]
    dendrites: dict[str, np.ndarray]
    spines: dict[str, np.ndarray]
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.stacks)

    def stack_keys(self) -> list[str]:
        return [f"x{i}" for i in range(len(self))]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stack, dendrite mask, spine mask) of stack ``i``."""
        key = f"x{i}"
        return self.stacks[key], self.dendrites[key], self.spines[key]


def meta_row(
    shape: tuple[int, int, int],
    resolution_xy_um: float,
    resolution_z_um: float,
    generated_from: str = "",
    *,
    crop: bool = False,
    x: int = 0,
    y: int = 0,
    z_begin: int = 0,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """One meta row as DeepD3's generator writes it (``Z_end`` is inclusive, units µm)."""
    depth, height, width = (int(s) for s in shape)
    return {
        "crop": bool(crop),
        "X": int(x),
        "Y": int(y),
        "Width": width,
        "Height": height,
        "Depth": depth,
        "Z_begin": int(z_begin),
        "Z_end": int(z_begin) + depth - 1,
        "Resolution_XY": float(resolution_xy_um),
        "Resolution_Z": float(resolution_z_um),
        "Timestamp": timestamp or datetime.now().strftime(r"%Y%m%d_%H%M%S"),
        "Generated_from": str(generated_from),
    }


def _meta_frame(meta: Any, path: Path) -> pd.DataFrame:
    """pandas 2 round-trips the DataFrame; pandas 3 may hand back a dict: rebuild it."""
    if isinstance(meta, pd.DataFrame):
        return meta.reset_index(drop=True)
    if isinstance(meta, dict):
        if meta and all(np.ndim(v) == 0 for v in meta.values()):
            return pd.DataFrame([meta])  # a single-stack .d3data-style meta dict
        try:
            return pd.DataFrame(meta)
        except ValueError as exc:
            raise DataFormatError(
                f"expected 'meta' to be a table, found an unreadable dict ({exc})", path
            ) from exc
    raise DataFormatError(
        f"expected 'meta' to be a pandas DataFrame, found {type(meta).__name__}", path
    )


def _validate(d3set: D3Set, path: Path) -> None:
    expected = [f"x{i}" for i in range(len(d3set.stacks))]
    for group in GROUPS:
        keys = getattr(d3set, group)
        if sorted(keys) != sorted(expected):
            raise DataFormatError(
                f"expected data/{group} keys {_short(expected)} (x0..x{len(expected) - 1}, "
                f"same as data/stacks), found {_short(sorted(keys))}",
                path,
            )
    missing = [c for c in META_COLUMNS if c not in d3set.meta.columns]
    if missing:
        raise DataFormatError(f"meta lacks required columns {missing}", path)
    if len(d3set.meta) != len(expected):
        raise DataFormatError(
            f"expected one meta row per stack ({len(expected)}), found {len(d3set.meta)}", path
        )
    for i, key in enumerate(expected):
        stack = d3set.stacks[key]
        if stack.ndim != 3:
            raise ShapeMismatchError(
                f"expected data/stacks/{key} to be ZYX (3D), found shape {stack.shape}", path
            )
        for group in ("dendrites", "spines"):
            mask = getattr(d3set, group)[key]
            if mask.shape != stack.shape:
                raise ShapeMismatchError(
                    f"data/{group}/{key} has shape {mask.shape}, expected the stack's "
                    f"shape {stack.shape}",
                    path,
                )
        row = d3set.meta.iloc[i]
        for col, size in zip(("Depth", "Height", "Width"), stack.shape, strict=True):
            if not 0 < int(row[col]) <= size:
                raise ShapeMismatchError(
                    f"meta row {i} {col}={row[col]} does not fit data/stacks/{key} of "
                    f"shape {stack.shape} (DeepD3 crops within {col})",
                    path,
                )


def _short(items: list[str], n: int = 6) -> str:
    return str(items) if len(items) <= n else f"{items[:n]}... ({len(items)} keys)"


def _as_bool(mask: np.ndarray, where: str, path: Path) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    values = np.unique(mask)
    if not np.isin(values, (0, 1)).all():
        raise DataFormatError(
            f"expected {where} to be a binary mask, found values {values[:8].tolist()}", path
        )
    return mask.astype(bool)


def write_d3set(path: str | Path, d3set: D3Set) -> Path:
    """Validate and write ``d3set`` atomically, blosc-compressed, as DeepD3 saves it."""
    import flammkuchen as fl

    path = Path(path)
    meta = d3set.meta.reset_index(drop=True).copy()
    for col in _INT_COLUMNS:
        if col in meta:
            meta[col] = meta[col].astype("int64")
    d3set = D3Set(
        stacks={k: np.asarray(v) for k, v in d3set.stacks.items()},
        dendrites={k: _as_bool(v, f"dendrites/{k}", path) for k, v in d3set.dendrites.items()},
        spines={k: _as_bool(v, f"spines/{k}", path) for k, v in d3set.spines.items()},
        meta=meta,
    )
    _validate(d3set, path)
    payload = {
        "data": {g: {k: getattr(d3set, g)[k] for k in d3set.stack_keys()} for g in GROUPS},
        "meta": d3set.meta,
    }
    with atomic_path(path) as tmp, _numpy2_aliases(), _untimed_hdf5():
        fl.save(str(tmp), payload, compression="blosc")
    log.info("wrote %d stacks to %s", len(d3set), path)
    return path


def read_d3set(path: str | Path) -> D3Set:
    """Load a ``.d3set`` fully and check that DeepD3 could train on it."""
    import flammkuchen as fl

    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a DeepD3 .d3set file, found nothing", path)
    import tables

    if not tables.is_hdf5_file(str(path)):  # else HDF5 prints a 20-line C back trace
        raise DataFormatError(
            "expected a flammkuchen/HDF5 .d3set file, found no HDF5 signature", path
        )
    try:
        with _numpy2_aliases():
            raw = fl.load(str(path))
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise DataFormatError(  # one line: HDF5's own errors end with the one that matters
            f"expected a flammkuchen/HDF5 .d3set file, could not load it "
            f"({type(exc).__name__}: {lines[-1] if lines else ''})",
            path,
        ) from exc
    if not isinstance(raw, dict):
        raise DataFormatError(f"expected a dict at the top level, found {type(raw)}", path)
    for key in ("data", "meta"):
        if key not in raw:
            raise DataFormatError(f"missing required key '{key}' (found {sorted(raw)})", path)
    data = raw["data"]
    if not isinstance(data, dict):
        raise DataFormatError(f"expected 'data' to be a group, found {type(data)}", path)
    for group in GROUPS:
        if group not in data:
            raise DataFormatError(
                f"missing required key 'data/{group}' (found {sorted(data)})", path
            )
        if not isinstance(data[group], dict):
            raise DataFormatError(f"expected 'data/{group}' to be a group of arrays", path)
    d3set = D3Set(
        stacks={k: np.asarray(v) for k, v in data["stacks"].items()},
        # the check write_d3set applies: a -1 "ignore" patch or a 0/255 mask is not a label
        dendrites={
            k: _as_bool(v, f"data/dendrites/{k}", path) for k, v in data["dendrites"].items()
        },
        spines={k: _as_bool(v, f"data/spines/{k}", path) for k, v in data["spines"].items()},
        meta=_meta_frame(raw["meta"], path),
    )
    _validate(d3set, path)
    return d3set
