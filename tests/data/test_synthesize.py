import hashlib
from pathlib import Path

import flammkuchen as fl
import numpy as np

from microseg.config import SynthSpinesConfig
from microseg.data.synthesize import write_spines
from microseg.io import ctc, points, tiff
from microseg.io.d3set import read_d3set


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_spine_layout(tiny_spines_master: Path) -> None:
    root = tiny_spines_master
    d = fl.load(str(root / "train.d3set"))
    assert set(d["data"]) == {"stacks", "dendrites", "spines"}
    assert d["meta"].iloc[0].Resolution_XY == 0.094 and d["meta"].iloc[0].Resolution_Z == 0.5
    with tiff.open_stack(root / "benchmark" / "stack.tif") as st:
        assert st.shape == (8, 64, 64)
        assert st.voxel_size_nm == (500.0, 94.0, 94.0)
    pts = points.read_points(root / "benchmark" / "spines.csv", shape=(8, 64, 64))
    assert len(pts) > 0 and {"spine_id", "kind"} <= set(pts.columns)
    raters = sorted(p.name for p in (root / "raters").iterdir())
    assert raters == [f"rater{k}_{w}.tif" for k in (1, 2, 3) for w in ("dendrites", "spines")]
    assert (root / "points" / "train_x0.csv").exists()


def test_spine_files_are_byte_identical_for_a_seed(
    tiny_spines_master: Path, tiny_spines_cfg: SynthSpinesConfig, tmp_path: Path
) -> None:
    """Same params, same data. TIFF/CSV files are byte-identical; HDF5 stores object
    timestamps (PyTables' track_times, not reachable through flammkuchen), so d3sets are
    compared by content."""
    again = write_spines(tiny_spines_cfg, tmp_path / "again")
    a, b = _digest(again), _digest(tiny_spines_master)
    assert {k: v for k, v in a.items() if not k.endswith(".d3set")} == {
        k: v for k, v in b.items() if not k.endswith(".d3set")
    }
    for name in ("train.d3set", "val.d3set"):
        x, y = read_d3set(again / name), read_d3set(tiny_spines_master / name)
        assert x.meta.equals(y.meta)
        for group in ("stacks", "dendrites", "spines"):
            for key in getattr(x, group):
                np.testing.assert_array_equal(getattr(x, group)[key], getattr(y, group)[key])
    other = write_spines(tiny_spines_cfg.model_copy(update={"seed": 8}), tmp_path / "other")
    assert _digest(other)["benchmark/stack.tif"] != _digest(again)["benchmark/stack.tif"]


def test_tracking_layout(tiny_tracking_master: Path) -> None:
    seq = ctc.read_ctc_gt(tiny_tracking_master, "01")
    assert seq.frames.shape == (6, 48, 48)
    assert seq.tra.max() == seq.tracks.L.max()
    assert sorted(p.name for p in tiny_tracking_master.iterdir()) == [
        "01",
        "01_GT",
        "02",
        "02_GT",
        "03",
        "03_GT",
    ]
