"""Shared inputs of the batch-eval tests that run a stub spine model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microseg.io.tiff import write_stack

VOXEL = (500.0, 100.0, 100.0)
SHAPE = (4, 32, 32)


def _write_spine_stacks(folder: Path, n: int) -> Path:
    """``s0.tif``..: a few bright voxels (the stub's spines) each, two of three annotated in
    ``s<i>.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        stack = np.full(SHAPE, 100, np.uint16)
        bright = rng.integers(0, SHAPE, size=(3, 3))
        for z, y, x in bright:
            stack[z, y, x] = 5000
        write_stack(folder / f"s{i}.tif", stack, voxel_size_nm=VOXEL)
        pts = pd.DataFrame(bright[:2], columns=["z", "y", "x"])
        pts[["x", "y", "z"]].to_csv(folder / f"s{i}.csv", index=False)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def spine_stacks() -> Callable[[Path, int], Path]:
    return _write_spine_stacks


@pytest.fixture(scope="session")
def folder_digest() -> Callable[[Path], dict[str, str]]:
    return _digest
