"""What one prediction gives back, per task, and how it is written: the same object for
``microseg predict`` (folders) and ``microseg.load(...).predict`` (Python).

Files, every one written atomically; the last one written is the result's *marker*: its
presence means the result is complete, so an interrupted folder run resumes with the images
whose marker is missing.

* nuclei: ``<stem>_labels.tif`` (OME-TIFF, uint16) or ``<stem>_labels.ome.zarr``,
  ``<stem>_probability.tif`` where the model has one, ``<stem>_rois.zip`` (ImageJ),
  ``<stem>.geojson`` (QuPath) on request, and ``<stem>_objects.csv`` (marker);
* tracking: ``<stem>_RES/`` (CTC: ``mask###.tif`` + ``res_track.txt``, checked against the
  CTC rules before it is written) and ``<stem>_tracks.csv`` (marker): one row per object and
  frame with its track id and the track's parent (0: none);
* spines (into a folder of its own, as before): YOLO ``detections.csv`` + ``spines.csv``
  (marker); Prob-UNet probability/mask/uncertainty TIFFs + ``punet_prediction.json``
  (marker); the registered fused pipeline ``predictions_*.csv`` + ``results.json`` (marker).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from microseg.errors import ConfigError
from microseg.utils.atomic import atomic_path

PixelSize = tuple[float, ...] | None
FORMATS = ("tif", "ome-zarr")


@dataclass
class SaveOptions:
    """How a nuclei result is written: label format and the optional ROI exports."""

    fmt: str = "tif"
    rois: bool = False
    geojson: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ConfigError(f"--format expects {' or '.join(FORMATS)}, got {self.fmt!r}")


@dataclass
class Result(ABC):
    """One image's prediction. ``labels``: instances (nuclei ``YX``; tracking ``TYX``, value =
    track id); ``points``: spines; ``tracks``: one row per object and frame with ``parent``;
    ``probability``/``uncertainty``: per-pixel maps where the model has them."""

    task: ClassVar[str] = ""
    name: str
    labels: np.ndarray | None = field(default=None, repr=False)
    probability: np.ndarray | None = field(default=None, repr=False)
    uncertainty: np.ndarray | None = field(default=None, repr=False)
    points: pd.DataFrame | None = field(default=None, repr=False)
    tracks: pd.DataFrame | None = field(default=None, repr=False)
    pixel_size_um: PixelSize = None
    seconds: float = 0.0

    @property
    def n_objects(self) -> int | None:
        """Objects found (spines, nuclei; tracking: objects over all frames)."""
        return len(self.to_dataframe())

    @abstractmethod
    def to_dataframe(self) -> pd.DataFrame:
        """The per-object table (nuclei: objects; tracking: object x frame; spines: points)."""

    @abstractmethod
    def save(
        self, out_dir: str | Path, *, fmt: str = "tif", rois: bool = False, geojson: bool = False
    ) -> list[Path]:
        """Write the result's files into ``out_dir`` (see the module docstring); ``fmt``,
        ``rois`` and ``geojson`` choose the nuclei label exports (:class:`SaveOptions`)."""

    @staticmethod
    @abstractmethod
    def marker(out_dir: Path, name: str, family: str = "") -> Path:
        """The file whose presence means a result of ``name`` in ``out_dir`` is complete."""


# ------------------------------------------------------------------------------- nuclei
@dataclass
class NucleiResult(Result):
    task: ClassVar[str] = "nuclei"
    scores: dict[int, float] | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # per-object intensities
    _table: pd.DataFrame | None = field(default=None, init=False, repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        if self._table is None:
            self._table = self._objects()
        return self._table

    def _objects(self) -> pd.DataFrame:
        from microseg.io.exports import object_table

        image = self.image
        if image is not None and image.ndim == 3:  # colour: the mean of the channels
            image = np.asarray(image, np.float64).mean(axis=-1)
        return object_table(
            self.labels,
            self.pixel_size_um,
            intensity=image,
            scores=self.scores,
            uncertainty=self.uncertainty,
        )

    @staticmethod
    def marker(out_dir: Path, name: str, family: str = "") -> Path:
        return Path(out_dir) / f"{name}_objects.csv"

    @staticmethod
    def labels_path(out_dir: Path, name: str, options: SaveOptions) -> Path:
        suffix = "_labels.ome.zarr" if options.fmt == "ome-zarr" else "_labels.tif"
        return Path(out_dir) / f"{name}{suffix}"

    def save(
        self, out_dir: str | Path, *, fmt: str = "tif", rois: bool = False, geojson: bool = False
    ) -> list[Path]:
        from microseg.io import exports
        from microseg.io.tiff import write_stack

        options = SaveOptions(fmt, rois, geojson)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels = np.asarray(self.labels).astype(np.uint16, copy=False)
        px = self.pixel_size_um
        written = []
        target = self.labels_path(out, self.name, options)
        if options.fmt == "ome-zarr":
            written.append(exports.write_labels_ome_zarr(target, labels, px))
        else:
            written.append(exports.write_labels_ome_tiff(target, labels, px))
        voxel = _voxel_nm(px)
        for key, array in (("probability", self.probability), ("uncertainty", self.uncertainty)):
            if array is not None:
                path = out / f"{self.name}_{key}.tif"
                written.append(write_stack(path, np.asarray(array, np.float32), voxel))
        if options.rois:
            written.append(exports.write_imagej_rois(out / f"{self.name}_rois.zip", labels))
        if options.geojson:
            path = out / f"{self.name}.geojson"
            written.append(exports.write_qupath_geojson(path, labels, px))
        marker = self.marker(out, self.name)
        written.append(exports.write_object_csv(marker, self.to_dataframe()))
        return written


def _voxel_nm(pixel_size_um: PixelSize) -> tuple[float, float, float] | None:
    """``(z, y, x)`` nm for ``io.tiff.write_stack`` from a ``(y, x)`` or ``(z, y, x)`` µm size."""
    if not pixel_size_um:
        return None
    y, x = pixel_size_um[-2:]
    return (float("nan"), float(y) * 1e3, float(x) * 1e3)


# ------------------------------------------------------------------------------- tracking
@dataclass
class TrackingResult(Result):
    task: ClassVar[str] = "tracking"
    #: the CTC track table ``L B E P`` (``res_track.txt``)
    track_table: pd.DataFrame | None = field(default=None, repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        if self.tracks is None:
            self.tracks = track_rows(self.labels, self.track_table, self.pixel_size_um)
        return self.tracks

    @staticmethod
    def marker(out_dir: Path, name: str, family: str = "") -> Path:
        return Path(out_dir) / f"{name}_tracks.csv"

    def save(self, out_dir: str | Path, **_: object) -> list[Path]:
        from microseg.io import ctc

        out = Path(out_dir)
        res = ctc.write_ctc_result(out, self.name, self.labels, self.track_table)
        marker = self.marker(out, self.name)
        with atomic_path(marker) as tmp:
            self.to_dataframe().to_csv(tmp, index=False)
        return [res, marker]


def track_rows(
    tracked: np.ndarray, table: pd.DataFrame, pixel_size_um: PixelSize = None
) -> pd.DataFrame:
    """One row per object and frame: ``track_id, t``, the object table's columns, ``parent``
    (the track's mother, 0 for none: CTC's ``P``)."""
    from microseg.io.exports import object_table

    parts = []
    for t, frame in enumerate(np.asarray(tracked)):
        rows = object_table(frame, pixel_size_um)
        rows = rows.rename(columns={"id": "track_id"})
        rows.insert(1, "t", t)
        parts.append(rows)
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if "track_id" not in rows.columns:
        rows["track_id"] = pd.Series(dtype="int64")
        rows["t"] = pd.Series(dtype="int64")
    parent = dict(zip(table["L"].astype(int), table["P"].astype(int), strict=True))
    rows["parent"] = rows["track_id"].map(parent).fillna(0).astype("int64")
    front = ["track_id", "t"]
    return rows[front + [c for c in rows.columns if c not in front]].sort_values(
        ["track_id", "t"], ignore_index=True
    )


# ------------------------------------------------------------------------------- spines
@dataclass
class SpineResult(Result):
    """Spines of one ``ZYX`` stack: ``points`` (one row per spine after 3D de-duplication);
    YOLO also keeps its per-plane ``boxes``; Prob-UNet its probability and uncertainty maps."""

    task: ClassVar[str] = "spines"
    family: str = "yolo"
    boxes: pd.DataFrame | None = field(default=None, repr=False)
    voxel_size_nm: tuple[float, float, float] | None = None
    #: what the family's own writer needs (Prob-UNet's sums, the fusion result)
    native: Any = field(default=None, repr=False)
    size_thr: int = 40
    prob_thr: float = 0.5

    MARKERS: ClassVar[dict[str, str]] = {
        "yolo": "spines.csv",
        "punet": "punet_prediction.json",
        "yolo+punet-fusion": "results.json",
    }

    @property
    def n_objects(self) -> int | None:  # type: ignore[override]
        return None if self.points is None else len(self.points)

    def to_dataframe(self) -> pd.DataFrame:
        return self.points if self.points is not None else pd.DataFrame()

    @staticmethod
    def marker(out_dir: Path, name: str, family: str = "") -> Path:
        return Path(out_dir) / SpineResult.MARKERS.get(family, "spines.csv")

    def save(self, out_dir: str | Path, **_: object) -> list[Path]:
        out = Path(out_dir)
        if self.family == "punet":
            from microseg.models.punet.predict import write_predictions

            paths = write_predictions(
                out, self.native, self.voxel_size_nm, size_thr=self.size_thr,
                prob_thr=self.prob_thr,
            )  # fmt: skip
            return list(paths.values())
        if self.family == "yolo+punet-fusion":
            from microseg.infer.fusion import write_fusion_outputs

            return list(write_fusion_outputs(out, self.native).values())
        written = []
        for name, df in (("detections.csv", self.boxes), ("spines.csv", self.points)):
            with atomic_path(out / name) as tmp:
                df.to_csv(tmp, index=False)
            written.append(out / name)
        return written


RESULTS: dict[str, type[Result]] = {
    "nuclei": NucleiResult,
    "tracking": TrackingResult,
    "spines": SpineResult,
}

__all__ = [
    "FORMATS",
    "RESULTS",
    "NucleiResult",
    "Result",
    "SaveOptions",
    "SpineResult",
    "TrackingResult",
    "track_rows",
]
