"""Helpers every stage needs: samples of a prepared dataset, metric files, JSON output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from microseg.data.manifest import read_manifest
from microseg.errors import MissingFileError
from microseg.evaluate.rates import prf_counts
from microseg.io import points as points_io
from microseg.utils.atomic import write_text
from microseg.utils.convert import jsonable as _jsonable


@dataclass
class Sample:
    """One prepared sample with absolute paths."""

    sample_id: str
    split: str
    image_path: Path
    label_path: Path | None
    points_path: Path | None
    voxel_size_nm: tuple[float, float, float]

    def points(self) -> pd.DataFrame:
        if self.points_path is None:
            raise MissingFileError(f"sample {self.sample_id} has no point annotations")
        return points_io.read_points(self.points_path, allow_empty=True)


def samples(prepared_dir: str | Path, split: str | None = None) -> list[Sample]:
    """Samples of a prepared dataset (optionally one split), in manifest order."""
    root = Path(prepared_dir)
    m = read_manifest(root)
    if split is not None:
        m = m[m["split"] == split]
    out = []
    for r in m.itertuples(index=False):
        out.append(
            Sample(
                sample_id=str(r.sample_id),
                split=str(r.split),
                image_path=root / str(r.image_path),
                label_path=root / str(r.label_path) if r.label_path else None,
                points_path=root / str(r.points_path) if r.points_path else None,
                voxel_size_nm=(
                    float(r.voxel_size_z_nm),
                    float(r.voxel_size_y_nm),
                    float(r.voxel_size_x_nm),
                ),
            )
        )
    return out


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Atomic, sorted, NaN-free JSON (DVC metrics files must parse everywhere)."""
    write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    return Path(path)


def torch_device(name: str | None) -> str | None:
    """A ``--device`` value as torch takes it (``auto``: the best device here, see
    :mod:`microseg.utils.devices`); None stays None (the model stays where it was loaded)."""
    if name is None:
        return None
    from microseg.utils.devices import resolve_device

    return str(resolve_device(name))


def metrics_file(params: Any, name: str) -> Path:
    """A stage's DVC metrics file: ``<paths.metrics>/<name>.json``."""
    return Path(params.paths.metrics) / f"{name}.json"


#: precision, recall, F1 and counts, with the empty-set convention of evaluate.points
prf = partial(prf_counts, empty=1.0)
