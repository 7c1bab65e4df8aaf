"""Tiny synthetic datasets written once per session and copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synthesize import write_spines, write_tracking
from microseg.io import deepd3, tiff

TINY_SPINES = SynthSpinesConfig(
    n_train=1,
    n_val=1,
    shape=(8, 64, 64),
    benchmark_shape=(8, 64, 64),
    benchmark_dendrites=(1, 1),
    generator={"n_dendrites": (1, 1)},
)
TINY_TRACKING = SynthTrackingConfig(n_sequences=3, n_frames=6, shape=(48, 48))


@pytest.fixture(scope="session")
def tiny_spines_cfg() -> SynthSpinesConfig:
    return TINY_SPINES


@pytest.fixture(scope="session")
def tiny_tracking_cfg() -> SynthTrackingConfig:
    return TINY_TRACKING


@pytest.fixture(scope="session")
def tiny_deepd3_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``microseg synth spines`` writes: the DeepD3 layout (``format: deepd3``)."""
    return write_spines(TINY_SPINES, tmp_path_factory.mktemp("synth") / "spines")


def _synthetic_spines_layout(src: Path, out: Path) -> Path:
    """The older ``format: synthetic_spines`` folder, made of the generator's files: d3sets,
    the benchmark with its true masks and points, every rater, the per-stack points."""
    (out / "benchmark").mkdir(parents=True)
    (out / "raters").mkdir()
    shutil.copyfile(src / deepd3.TRAINING, out / "train.d3set")
    shutil.copyfile(src / deepd3.VALIDATION, out / "val.d3set")
    shutil.copytree(src / "points", out / "points")
    shutil.copytree(src / "batch", out / "batch")
    shutil.copyfile(src / deepd3.BENCHMARK, out / "benchmark" / "stack.tif")
    shutil.copyfile(src / "truth" / "benchmark_spines.csv", out / "benchmark" / "spines.csv")
    for part in ("spine", "dendrite"):
        name = f"{part}_mask.tif"
        shutil.copyfile(src / "truth" / f"benchmark_{name}", out / "benchmark" / name)
        for k, rater in enumerate("UVW", start=1):
            mask = tiff.read_stack(src / f"{part.capitalize()}_{rater}.tif") > 0
            tiff.write_stack(out / "raters" / f"rater{k}_{part}s.tif", mask.astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def tiny_spines_master(tiny_deepd3_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data in the ``synthetic_spines`` layout (still ingestible, for older folders)."""
    return _synthetic_spines_layout(tiny_deepd3_master, tmp_path_factory.mktemp("legacy") / "sp")


@pytest.fixture(scope="session")
def tiny_tracking_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tracking(TINY_TRACKING, tmp_path_factory.mktemp("synth") / "tracking")


@pytest.fixture()
def tiny_spines(tiny_spines_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_spines_master, tmp_path / "src" / "spines"))


@pytest.fixture()
def tiny_deepd3(tiny_deepd3_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_deepd3_master, tmp_path / "src" / "deepd3"))


@pytest.fixture()
def tiny_tracking(tiny_tracking_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_tracking_master, tmp_path / "src" / "tracking"))
