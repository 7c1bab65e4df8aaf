"""``microseg pack-dsb``: published DSB folders -> the compact layout ``ingest`` also reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from microseg.cli import app
from microseg.errors import DataFormatError
from microseg.io.dsb import dsb_layout, read_dsb_sample, write_dsb_sample


def test_pack_dsb_command(tmp_path: Path) -> None:
    src = tmp_path / "published"
    labels = np.zeros((12, 16), np.uint16)
    labels[1:5, 1:5], labels[6:11, 8:15] = 1, 2
    write_dsb_sample(src, "a", np.arange(192, dtype=np.uint8).reshape(12, 16), labels)
    dst = tmp_path / "compact"
    res = CliRunner().invoke(app, ["pack-dsb", str(src), str(dst), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "1 samples (1 greyscale, 0 colour, 2 instances, 0 contested pixels)" in res.output
    assert dsb_layout(dst) == "compact"
    np.testing.assert_array_equal(read_dsb_sample(dst, "a").labels, labels)
    res = CliRunner().invoke(app, ["pack-dsb", str(src), str(dst)])  # dst now holds files
    assert isinstance(res.exception, DataFormatError) and "not empty" in str(res.exception)
    res = CliRunner().invoke(app, ["pack-dsb", str(src), str(dst), "--overwrite"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("missing", ["labels", "images"])
def test_pack_dsb_refuses_a_compact_source(tmp_path: Path, missing: str) -> None:
    (tmp_path / "src" / ("images" if missing == "labels" else "labels")).mkdir(parents=True)
    res = CliRunner().invoke(app, ["pack-dsb", str(tmp_path / "src"), str(tmp_path / "out")])
    assert isinstance(res.exception, DataFormatError)
    assert f"no {missing}/ folder" in str(res.exception) and "src" in str(res.exception)
