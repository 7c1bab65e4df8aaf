"""The dataset fingerprint the nnunet planner reads (nnU-Net v2's ``dataset_fingerprint.json``).

What it records, for the images of the chosen splits (``train`` by default: the plan must not
depend on the images a model is selected or judged on):

* per image: sample id, split, modality, shape ``[H, W]``, channels, pixel spacing in nm
  (``null`` when the source gives none, as for DSB 2018), instances, foreground fraction;
* median, minimum and maximum shape, median spacing, total pixels (the planner caps the
  batch size with it), image counts per modality and per channel count;
* intensity statistics per modality and channel over *foreground* pixels (labels > 0): mean,
  std, median, 0.5 and 99.5 percentiles, min, max. As in nnU-Net, every image contributes the
  same number of foreground pixels (``samples_per_image``, drawn with replacement from a
  seeded generator), so large images do not drown small ones.

Two sources: a targets cache (:mod:`microseg.data.targets`, what ``train_cells`` gets; its
images are already percentile normalised, so the statistics are in those units and
``intensity_space`` says so) or a prepared dataset (``manifest.parquet``: raw intensities and
the manifest's voxel sizes). JSON is written NaN-free (unknown values are ``null``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microseg.data.manifest import read_manifest
from microseg.data.targets import INDEX_NAME, PARAMS_NAME, read_index
from microseg.data.transforms import to_chw
from microseg.errors import DataFormatError, MissingFileError
from microseg.io.tiff import read_stack
from microseg.utils.atomic import write_text

FINGERPRINT_NAME = "fingerprint.json"
FINGERPRINT_FORMAT = "microseg.nnunet.fingerprint/1"
#: the percentiles of nnU-Net's fingerprint (clipping range of its CT scheme)
LOW_Q, HIGH_Q = 0.5, 99.5


@dataclass(frozen=True)
class ImageRecord:
    """One image of the fingerprint."""

    sample_id: str
    split: str
    modality: str
    shape: tuple[int, int]
    channels: int
    spacing: tuple[float | None, float | None] = (None, None)  # nm per pixel (y, x)
    n_instances: int = 0
    foreground_fraction: float = 0.0


@dataclass(frozen=True)
class ChannelStats:
    """Foreground intensity statistics of one channel of one modality (pooled sample)."""

    mean: float
    std: float
    median: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float
    n_images: int


@dataclass(frozen=True)
class Fingerprint:
    """What the planner needs to know about a dataset (see the module docstring)."""

    source: str  # "targets" | "prepared"
    intensity_space: str  # "raw" | "percentile_normalised"
    splits: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    #: modality -> one entry per channel
    intensity: dict[str, list[ChannelStats]] = field(default_factory=dict)
    #: percentiles the targets cache normalised with (None for raw prepared data)
    cache_percentiles: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise DataFormatError(f"no images of splits {list(self.splits)} to fingerprint")

    # -- derived summaries (also written to the file, for people) --------------------------
    @property
    def shapes(self) -> np.ndarray:
        return np.array([im.shape for im in self.images], np.float64)

    @property
    def median_shape(self) -> tuple[float, float]:
        h, w = np.median(self.shapes, axis=0)
        return float(h), float(w)

    @property
    def min_shape(self) -> tuple[int, int]:
        h, w = self.shapes.min(axis=0)
        return int(h), int(w)

    @property
    def max_shape(self) -> tuple[int, int]:
        h, w = self.shapes.max(axis=0)
        return int(h), int(w)

    @property
    def median_spacing(self) -> tuple[float | None, float | None]:
        """Median nm per pixel per axis over the images that know it (None: none does)."""
        out: list[float | None] = []
        for axis in (0, 1):
            known = [im.spacing[axis] for im in self.images if im.spacing[axis] is not None]
            out.append(float(np.median(known)) if known else None)
        return out[0], out[1]

    @property
    def n_pixels(self) -> int:
        return int(sum(im.shape[0] * im.shape[1] for im in self.images))

    @property
    def modalities(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for im in self.images:
            out[im.modality] = out.get(im.modality, 0) + 1
        return dict(sorted(out.items()))

    @property
    def channel_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for im in self.images:
            out[im.channels] = out.get(im.channels, 0) + 1
        return dict(sorted(out.items()))

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FINGERPRINT_FORMAT,
            "source": self.source,
            "intensity_space": self.intensity_space,
            "splits": list(self.splits),
            "cache_percentiles": _list(self.cache_percentiles),
            "n_images": len(self.images),
            "n_pixels": self.n_pixels,
            "median_shape": list(self.median_shape),
            "min_shape": list(self.min_shape),
            "max_shape": list(self.max_shape),
            "median_spacing": list(self.median_spacing),
            "modalities": self.modalities,
            "channels": {str(k): v for k, v in self.channel_counts.items()},
            "intensity": {m: [asdict(c) for c in cs] for m, cs in self.intensity.items()},
            "images": [
                {**asdict(im), "shape": list(im.shape), "spacing": list(im.spacing)}
                for im in self.images
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        if data.get("format") != FINGERPRINT_FORMAT:
            raise DataFormatError(
                f"expected a {FINGERPRINT_FORMAT} fingerprint, found {data.get('format')!r}"
            )
        images = tuple(
            ImageRecord(
                **{
                    **im,
                    "shape": tuple(int(s) for s in im["shape"]),
                    "spacing": tuple(None if s is None else float(s) for s in im["spacing"]),
                }
            )
            for im in data["images"]
        )
        cp = data.get("cache_percentiles")
        return cls(
            source=data["source"],
            intensity_space=data["intensity_space"],
            splits=tuple(data["splits"]),
            images=images,
            intensity={m: [ChannelStats(**c) for c in cs] for m, cs in data["intensity"].items()},
            cache_percentiles=None if cp is None else (float(cp[0]), float(cp[1])),
        )

    def write(self, path: str | Path) -> Path:
        write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> Fingerprint:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError("no dataset fingerprint", path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"unreadable fingerprint ({exc})", path) from exc


def _list(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _nm(value: Any) -> float | None:
    v = float(value) if value is not None else math.nan
    return v if math.isfinite(v) and v > 0 else None


# -- computing it ------------------------------------------------------------------------------
def compute_fingerprint(
    folder: str | Path,
    splits: Sequence[str] = ("train",),
    samples_per_image: int = 10_000,
    seed: int = 1234,
) -> Fingerprint:
    """The fingerprint of a targets cache (``index.parquet``) or a prepared dataset
    (``manifest.parquet``) in ``folder``, over the images of ``splits``."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        items, source = _targets_items(folder, splits), "targets"
        meta = folder / PARAMS_NAME
        cp = json.loads(meta.read_text()).get("percentiles") if meta.is_file() else None
        percentiles = None if cp is None else (float(cp[0]), float(cp[1]))
        space = "percentile_normalised"
    elif (folder / "manifest.parquet").is_file():
        items, source, percentiles, space = _prepared_items(folder, splits), "prepared", None, "raw"
    else:
        raise MissingFileError(
            f"expected a targets cache ({INDEX_NAME}) or a prepared dataset (manifest.parquet)",
            folder,
        )
    rng = np.random.default_rng(seed)
    records: list[ImageRecord] = []
    pooled: dict[str, list[list[np.ndarray]]] = {}
    for record, image, labels in items:
        if image.shape[1:] != labels.shape:
            raise DataFormatError(
                f"image {image.shape[1:]} and labels {labels.shape} differ for {record.sample_id}",
                folder,
            )
        fg = labels > 0
        n_fg = int(fg.sum())
        records.append(
            ImageRecord(
                **{**asdict(record), "foreground_fraction": n_fg / fg.size},
            )
        )
        if n_fg == 0:
            continue
        per_channel = pooled.setdefault(record.modality, [])
        while len(per_channel) < image.shape[0]:
            per_channel.append([])
        pick = rng.integers(0, n_fg, samples_per_image)
        for c in range(image.shape[0]):
            per_channel[c].append(image[c][fg][pick].astype(np.float64))
    intensity = {m: [_stats(v) for v in chans] for m, chans in sorted(pooled.items())}
    return Fingerprint(source, space, tuple(splits), tuple(records), intensity, percentiles)


def _stats(samples: list[np.ndarray]) -> ChannelStats:
    x = np.concatenate(samples)
    lo, med, hi = np.percentile(x, [LOW_Q, 50.0, HIGH_Q])
    return ChannelStats(
        mean=float(x.mean()),
        std=float(x.std()),
        median=float(med),
        percentile_00_5=float(lo),
        percentile_99_5=float(hi),
        min=float(x.min()),
        max=float(x.max()),
        n_images=len(samples),
    )


Item = tuple[ImageRecord, np.ndarray, np.ndarray]


def _targets_items(folder: Path, splits: Sequence[str]) -> Iterator[Item]:
    index = read_index(folder)
    index = index[index["split"].isin(list(splits))]
    for row in index.itertuples():
        image = read_stack(folder / row.image_path)
        image = image[None] if image.ndim == 2 else image
        labels = read_stack(folder / row.label_path)
        record = ImageRecord(
            sample_id=str(row.sample_id),
            split=str(row.split),
            modality=str(row.modality),
            shape=(int(row.height), int(row.width)),
            channels=int(image.shape[0]),
            n_instances=int(row.n_instances),
        )
        yield record, image, labels


def _prepared_items(folder: Path, splits: Sequence[str]) -> Iterator[Item]:
    m = read_manifest(folder)
    rows = m[
        (m["label_kind"] == "instance") & (m["label_path"] != "") & m["split"].isin(list(splits))
    ]
    for row in rows.itertuples():
        labels = read_stack(folder / row.label_path)
        if labels.ndim != 2:
            continue  # the planner is 2D, as the family is
        image = to_chw(read_stack(folder / row.image_path))
        record = ImageRecord(
            sample_id=str(row.sample_id),
            split=str(row.split),
            modality=str(row.modality),
            shape=(int(labels.shape[0]), int(labels.shape[1])),
            channels=int(image.shape[0]),
            spacing=(_nm(row.voxel_size_y_nm), _nm(row.voxel_size_x_nm)),
            n_instances=len(np.unique(labels[labels > 0])),
        )
        yield record, image, labels
