import hashlib
import time
from pathlib import Path

import flammkuchen as fl

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synthesize import write_spines, write_tracking
from microseg.io import ctc, points, tiff


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
    """Same params, same bytes: in another folder and at another time (HDF5 object times are
    not written), so DVC hashes the same output on every machine."""
    time.sleep(1.1)  # HDF5 stores times in seconds: a second later would show in the bytes
    again = write_spines(tiny_spines_cfg, tmp_path / "again")
    assert _digest(again) == _digest(tiny_spines_master)
    assert any(k.endswith(".d3set") for k in _digest(again))
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
    tiny_spines_master: Path,
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
        assert spines == _digest(tiny_spines_master), coretype
        tracking = _write_with_blas_kernel(
            "tracking", tiny_tracking_cfg, tmp_path / f"t{coretype}", coretype
        )
        assert tracking == _digest(tiny_tracking_master), coretype
