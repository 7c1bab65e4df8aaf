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


class DatasetConfig(_Strict):
    """One ingestable dataset: where its native files are and how to read them."""

    format: Literal["synthetic_spines", "dsb2018", "ctc"]
    source: Path
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
    synth: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
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
