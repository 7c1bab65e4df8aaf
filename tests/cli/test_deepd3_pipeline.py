"""The spine pipeline's first stages on DeepD3-layout folders, through the commands dvc.yaml
runs (``synth spines``, ``ingest``, ``validate``, ``convert yolo``), in-process.

Two folders: what ``synth spines`` writes (the demo's ``datasets.spines``, ``format: deepd3``)
and a copy holding only the files of DeepD3's release, as a downloaded dataset would, named by
a second ``datasets`` entry: the pipeline runs on either by pointing an entry at it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from microseg.cli import app
from microseg.config import SynthSpinesConfig
from microseg.data.manifest import read_manifest
from microseg.data.synthesize import write_spines
from microseg.io import deepd3, points, tiff

REPO = Path(__file__).resolve().parents[2]
#: DeepD3's release files, nothing of ours
RELEASE = (
    deepd3.TRAINING, deepd3.VALIDATION, deepd3.BENCHMARK, deepd3.ANNOTATIONS,
    *(f"{part}_{r}.tif" for part in ("Spine", "Dendrite") for r in "UVW"),
)  # fmt: skip


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A working folder with the repo's params.yaml, tiny synthetic spines and one more
    dataset entry, ``release``, for ``raw/deepd3`` (filled by the test)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["synth"]["spines"].update(
        n_train=1, n_val=1, shape=[8, 64, 64], benchmark_shape=[8, 96, 96], n_batch=0
    )
    p["datasets"]["release"] = {**p["datasets"]["spines"], "source": "raw/deepd3"}
    p["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root="mlruns")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(tmp_path)
        yield tmp_path


def microseg(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "-p", "params.yaml"])
    assert res.exit_code == 0, f"microseg {' '.join(args)}: {res.output}\n{res.exception!r}"
    return res.stdout


def test_synth_ingest_validate_convert_on_the_generators_folder(workdir: Path) -> None:
    """The demo's own entry: ``datasets.spines`` is ``format: deepd3`` on the generator's output."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    assert params["datasets"]["spines"]["format"] == "deepd3"
    microseg("synth", "spines")
    synthetic = Path("data/synthetic/spines")
    assert all((synthetic / name).is_file() for name in RELEASE)
    assert "3 samples" in microseg("ingest", "spines")
    microseg("validate", "spines")
    assert "YOLO dataset in data/yolo/spines" in microseg("convert", "yolo")
    assert any(Path("data/yolo/spines").rglob("*.txt"))

    prepared = Path("data/prepared/spines")
    clicks = pd.read_csv(synthetic / deepd3.ANNOTATIONS, index_col=0)
    bench = points.read_points(prepared / "points" / "benchmark.csv")
    assert len(bench) == clicks.label.nunique()  # one point per cluster
    votes = sum(tiff.read_stack(synthetic / f"Spine_{r}.tif") > 0 for r in "UVW")
    np.testing.assert_array_equal(
        tiff.read_stack(prepared / "raters" / "consensus_spines.tif"), votes >= 2
    )
    m = read_manifest(prepared)
    assert (m.points_path != "").all()  # the d3set stacks keep the generator's head points


def test_ingest_validate_convert_on_the_release_files_alone(workdir: Path) -> None:
    """Only the files DeepD3 publishes, under another entry: the same commands run on them."""
    cfg = SynthSpinesConfig(**yaml.safe_load(Path("params.yaml").read_text())["synth"]["spines"])
    full = write_spines(cfg, workdir / "full")
    raw = Path("raw/deepd3")
    raw.mkdir(parents=True)
    for name in RELEASE:
        shutil.copyfile(full / name, raw / name)
    assert "3 samples" in microseg("ingest", "release")
    microseg("validate", "release")
    microseg("convert", "yolo", "--set", "spines.dataset=release")
    assert any(Path("data/yolo/spines").rglob("*.txt"))
    m = read_manifest(Path("data/prepared/release")).set_index("sample_id")
    clicks = pd.read_csv(raw / deepd3.ANNOTATIONS, index_col=0)
    assert m.loc["benchmark"].n_instances == clicks.label.nunique()
    # DeepD3 has no points for its d3set stacks: their spine masks' 3D components stand in
    assert m.loc["val_x0"].points_path == "points/val_x0.csv"
    pts = pd.read_csv(Path("data/prepared/release") / m.loc["val_x0"].points_path)
    assert len(pts) == m.loc["val_x0"].n_instances > 0
