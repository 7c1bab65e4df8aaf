"""Tiny synthetic datasets written once per session and copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synthesize import write_spines, write_tracking

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
def tiny_spines_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spines(TINY_SPINES, tmp_path_factory.mktemp("synth") / "spines")


@pytest.fixture(scope="session")
def tiny_tracking_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tracking(TINY_TRACKING, tmp_path_factory.mktemp("synth") / "tracking")


@pytest.fixture()
def tiny_spines(tiny_spines_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_spines_master, tmp_path / "src" / "spines"))


@pytest.fixture()
def tiny_tracking(tiny_tracking_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_tracking_master, tmp_path / "src" / "tracking"))
