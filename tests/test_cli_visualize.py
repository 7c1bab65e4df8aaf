"""`microseg visualize` as a user calls it: flags reach the renderer, errors are one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from typer.testing import CliRunner

from microseg.cli import app


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 200, (6, 32, 40), np.uint16))
    csv = tmp_path / "det.csv"
    pd.DataFrame(
        {
            "z": [1, 3],
            "x1": [4, 10],
            "y1": [4, 12],
            "x2": [12, 20],
            "y2": [10, 22],
            "score": [0.9, 0.4],
        }
    ).to_csv(csv, index=False)
    return stack, csv


def test_visualize_writes_selected_planes(tmp_path: Path) -> None:
    stack, csv = _inputs(tmp_path)
    out = tmp_path / "vis"
    args = ["visualize", str(stack), str(csv), "--out", str(out), "--mode", "boxes"]
    res = CliRunner().invoke(
        app, [*args, "--z-start", "1", "--z-step", "2", "--box-color", "#00ff00"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.png")) == [
        "plane_0001.png",
        "plane_0003.png",
        "plane_0005.png",
    ]
    overlay = tifffile.imread(out / "overlay.tif")
    assert overlay.shape == (3, 32, 40, 3)
    # the z=1 box's top edge (row 4, columns 4..11) is drawn in the requested colour
    assert (overlay[0, 4, 4:12] == [0, 255, 0]).all()
    assert "2 marks on 3 planes" in res.output


def test_visualize_bad_csv_is_a_clear_error(tmp_path: Path) -> None:
    stack, _ = _inputs(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    res = CliRunner().invoke(app, ["visualize", str(stack), str(bad), "--out", str(tmp_path / "v")])
    assert res.exit_code != 0
    assert "bad.csv" in str(res.exception) and not (tmp_path / "v").exists()


def test_an_output_too_large_is_refused_before_writing(tmp_path: Path) -> None:
    """Issue 18: `--scale 200` wrote 8.3 GB from a 295 KB stack (here: 7 GiB would be)."""
    stack, csv = _inputs(tmp_path)
    out = tmp_path / "vis"
    res = CliRunner().invoke(app, ["visualize", str(stack), str(csv), "--out", str(out),
                                   "--scale", "400"])  # fmt: skip
    assert res.exit_code != 0
    assert "would write about" in str(res.exception) and "--scale" in str(res.exception)
    assert not out.exists()
