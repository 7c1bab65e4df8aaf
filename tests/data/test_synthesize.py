import hashlib
import time
from pathlib import Path

import flammkuchen as fl
import numpy as np
import pandas as pd

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synthesize import write_spines, write_tracking
from microseg.io import ctc, points, tiff


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_spine_layout(tiny_deepd3_master: Path) -> None:
    """DeepD3's release files (what ``format: deepd3`` reads) plus the per-stack points, the
    benchmark's truth and the batch stacks."""
    root = tiny_deepd3_master
    d = fl.load(str(root / "DeepD3_Training.d3set"))
    assert set(d["data"]) == {"stacks", "dendrites", "spines"}
    assert d["meta"].iloc[0].Resolution_XY == 0.094 and d["meta"].iloc[0].Resolution_Z == 0.5
    with tiff.open_stack(root / "DeepD3_Benchmark.tif") as st:
        assert st.shape == (8, 64, 64)
        assert st.voxel_size_nm == (500.0, 94.0, 94.0)
    truth = points.read_points(root / "truth" / "benchmark_spines.csv", shape=(8, 64, 64))
    assert len(truth) > 0 and {"spine_id", "kind"} <= set(truth.columns)
    for r in "UVW":  # ImageJ's binary masks: 0 and 255
        for part in ("Spine", "Dendrite"):
            assert set(np.unique(tiff.read_stack(root / f"{part}_{r}.tif"))) <= {0, 255}
    clicks = pd.read_csv(root / "Annotations_and_Clusters.csv", index_col=0)
    assert list(clicks.columns) == ["Rater", "X", "Y", "Pos", "label"]
    assert set(clicks.Rater) <= set("UVW") and clicks.Pos.dtype.kind == "i"
    assert not clicks.duplicated(["Rater", "label"]).any()  # one click per rater and spine
    assert clicks.groupby("label").size().between(1, 3).all()
    assert (root / "points" / "train_x0.csv").exists()
    assert sorted(p.name for p in (root / "batch").iterdir())[:2] == ["stack01.csv", "stack01.tif"]


def test_spine_files_are_byte_identical_for_a_seed(
    tiny_deepd3_master: Path, tiny_spines_cfg: SynthSpinesConfig, tmp_path: Path
) -> None:
    """Same params, same bytes: in another folder and at another time (HDF5 object times are
    not written), so DVC hashes the same output on every machine."""
    time.sleep(1.1)  # HDF5 stores times in seconds: a second later would show in the bytes
    again = write_spines(tiny_spines_cfg, tmp_path / "again")
    assert _digest(again) == _digest(tiny_deepd3_master)
    assert any(k.endswith(".d3set") for k in _digest(again))
    other = write_spines(tiny_spines_cfg.model_copy(update={"seed": 8}), tmp_path / "other")
    for name in ("DeepD3_Benchmark.tif", "Annotations_and_Clusters.csv"):
        assert _digest(other)[name] != _digest(again)[name]


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


def test_tracking_files_are_byte_identical_for_a_seed(
    tiny_tracking_master: Path, tiny_tracking_cfg: SynthTrackingConfig, tmp_path: Path
) -> None:
    """The CTC sequences (TIFFs and track files) are the same bytes in another folder and a
    second later; another seed changes them."""
    time.sleep(1.1)
    again = write_tracking(tiny_tracking_cfg, tmp_path / "again")
    assert _digest(again) == _digest(tiny_tracking_master)
    assert any(k.endswith(".tif") for k in _digest(again))
    other = write_tracking(tiny_tracking_cfg.model_copy(update={"seed": 12}), tmp_path / "other")
    assert _digest(other) != _digest(again)


def _write_with_blas_kernel(kind: str, cfg, out: Path, coretype: str) -> dict[str, str]:
    """Generate in a fresh process whose OpenBLAS runs another CPU's kernels."""
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from microseg.config import SynthSpinesConfig, SynthTrackingConfig\n"
        "from microseg.data.synthesize import write_spines, write_tracking\n"
        f"cfg = json.loads({cfg.model_dump_json()!r})\n"
        f"if {kind!r} == 'spines': write_spines(SynthSpinesConfig(**cfg), Path(sys.argv[1]))\n"
        "else: write_tracking(SynthTrackingConfig(**cfg), Path(sys.argv[1]))\n"
    )
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
    return _digest(out)


def test_same_bytes_with_another_cpus_blas_kernels(
    tiny_deepd3_master: Path,
    tiny_spines_cfg: SynthSpinesConfig,
    tiny_tracking_master: Path,
    tiny_tracking_cfg: SynthTrackingConfig,
    tmp_path: Path,
) -> None:
    """Another machine is another CPU: OpenBLAS picks its kernels by CPU and their last bits
    differ. The spine coordinates once reached the CSVs in full precision, so the same seed
    wrote other bytes on a Haswell than on a SkylakeX; now every file must match."""
    for coretype in ("Haswell", "Sandybridge"):
        spines = _write_with_blas_kernel("spines", tiny_spines_cfg, tmp_path / coretype, coretype)
        assert spines == _digest(tiny_deepd3_master), coretype
        tracking = _write_with_blas_kernel(
            "tracking", tiny_tracking_cfg, tmp_path / f"t{coretype}", coretype
        )
        assert tracking == _digest(tiny_tracking_master), coretype
