"""Typed view of ``params.yaml``: the one place that reads it.

Stages receive the validated section they need; CLI flags override single values for one run.
DVC tracks the same file (``params:`` in ``dvc.yaml``), so a change here reruns exactly the
stages that read the changed keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from microseg.errors import ConfigError, MissingFileError

DEFAULT_PARAMS = Path("params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlruns"
    experiment_prefix: str = "microseg"


class PathsConfig(_Strict):
    raw: Path = Path("data/raw")
    synthetic: Path = Path("data/synthetic")
    prepared: Path = Path("data/prepared")
    reports: Path = Path("reports")
    metrics: Path = Path("metrics")


class SplitConfig(_Strict):
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


class SynthSpinesConfig(_Strict):
    """How many synthetic spine stacks to make and of what size (``microseg synth spines``)."""

    seed: int = 7
    n_train: int = Field(6, ge=1)
    n_val: int = Field(2, ge=1)
    shape: tuple[int, int, int] = (32, 256, 256)
    benchmark_shape: tuple[int, int, int] = (48, 384, 384)
    #: dendrites in the benchmark stack (its field is larger, so it gets more of them)
    benchmark_dendrites: tuple[int, int] = (3, 5)
    voxel_size_nm: tuple[float, float, float] = (500.0, 94.0, 94.0)
    n_raters: int = Field(3, ge=2)
    #: any other ``SpineSynthConfig`` field, e.g. ``{peak_photons: [10, 20]}``
    generator: dict[str, Any] = Field(default_factory=dict)


class SynthTrackingConfig(_Strict):
    """Synthetic Cell Tracking Challenge sequences (``microseg synth tracking``)."""

    seed: int = 11
    n_sequences: int = Field(3, ge=1)
    n_frames: int = Field(30, ge=2)
    shape: tuple[int, int] = (128, 128)
    #: any other ``TrackingSynthConfig`` field
    generator: dict[str, Any] = Field(default_factory=dict)


class SynthConfig(_Strict):
    spines: SynthSpinesConfig = Field(default_factory=SynthSpinesConfig)
    tracking: SynthTrackingConfig = Field(default_factory=SynthTrackingConfig)


class DatasetConfig(_Strict):
    """One ingestable dataset: where its native files are and how to read them."""

    format: Literal["synthetic_spines", "dsb2018", "ctc", "coco", "png_pairs"]
    source: Path
    #: COCO JSON for ``format: coco`` (default ``<source>/annotations.json``)
    annotations: Path | None = None
    task: Literal["spines", "nuclei", "tracking"]
    split: SplitConfig = Field(default_factory=SplitConfig)
    #: formats that carry their own split (d3set train/val files, CTC sequences) ignore ``split``
    voxel_size_nm: tuple[float, float, float] | None = None


class RangeConfig(_Strict):
    min: float
    max: float


class ValidateConfig(_Strict):
    allowed_image_dtypes: list[str] = ["uint8", "uint16", "float32"]
    allowed_label_dtypes: list[str] = ["uint8", "uint16", "uint32", "int32"]
    instances: RangeConfig = RangeConfig(min=0, max=5000)
    voxel_size_nm: RangeConfig = RangeConfig(min=10, max=5000)
    #: allowed absolute deviation of each split's fraction from the configured one
    split_tolerance: float = 0.1


class Params(_Strict):
    seed: int = 42
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` use dotted keys (``seed=1``)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError("params file not found", path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", path) from exc
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid params:\n{exc}", path) from exc
