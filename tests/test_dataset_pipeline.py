"""A lab's own nuclei dataset through the real ``dvc.yaml``: ``microseg dataset add``, then
``dvc repro`` trains and scores on it, and DVC watches its files (not DSB's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage import io as skio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "stages"))
from test_datasets import make_png_pairs  # noqa: E402

#: a U-Net small enough to train in seconds: the test is about the pipeline, not the model
TINY = {
    "family": "unet",
    "description": "tiny U-Net (pipeline test)",
    "infer": {"tta": False},
    "train": {"model": {"arch": "unet", "features": [4, 8, 16, 32, 64]}, "epochs": 1,
              "steps_per_epoch": 2, "batch_size": 2, "patch_size": 32, "val_max_images": 2,
              "num_threads": 1},
}  # fmt: skip


BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MICROSEG_LOG": "WARNING"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # dvc.yaml calls `microseg`
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def changed_stages(repo: Path) -> set[str]:
    out = run([str(BIN / "dvc"), "status", "--json"], repo).stdout
    return set(json.loads(out or "{}"))


@pytest.mark.slow
def test_own_png_dataset_trains_and_scores_and_dvc_watches_its_files(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("src", "profiles", "params"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "metrics").mkdir()
    shutil.copy(ROOT / "metrics" / "seeds.json", repo / "metrics" / "seeds.json")
    run([str(BIN / "dvc"), "init", "--no-scm", "-q"], repo)
    make_png_pairs(repo / "lab" / "nuclei", n=16)

    dvc, microseg = BIN / "dvc", BIN / "microseg"
    run([str(microseg), "dataset", "add", "mine", "--task", "nuclei", "--format", "png_pairs",
         "--source", "lab/nuclei", "--mask-kind", "binary", "--split", "0.5,0.25,0.25",
         "--use"], repo)  # fmt: skip
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["cells"]["dataset"] == "mine"
    params["cells"]["models"] = {"tiny": TINY}
    params["cells"]["post_grid"] = {"t_seed": [0.5], "t_mask": [0.5]}
    params["cells"]["post_grids"] = {}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stages = ["evaluate_cells@tiny", "evaluate_baseline@otsu", "validate@mine"]
    proc = run([str(dvc), "repro", "-q", *stages], repo)
    ran = {s for s in ("ingest@mine", "prepare_targets", "train_cells@tiny")
           if f"'{s}'" in proc.stdout + proc.stderr} or None  # fmt: skip
    assert (repo / "data/prepared/mine/manifest.parquet").is_file()
    assert not (repo / "data/prepared/dsb2018").exists()  # DSB was never touched
    assert (repo / "models/cells/tiny/best.pt").is_file()
    metrics = json.loads((repo / "metrics/cells/tiny.json").read_text())
    assert metrics["n_images"] == 4 and 0 <= metrics["f1_50"] <= 1, metrics
    assert 0 <= json.loads((repo / "metrics/cells/otsu.json").read_text())["f1_50"] <= 1
    assert ran is None or "train_cells@tiny" in ran

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    done = set(lock)
    assert {"ingest@mine", "validate@mine", "prepare_targets", "train_cells@tiny"} <= done
    assert not changed_stages(repo) & done  # everything that ran is up to date

    image = repo / "lab/nuclei/images/img03.png"
    skio.imsave(image, (skio.imread(image) // 2).astype(np.uint8), check_contrast=False)
    assert changed_stages(repo) & done == {"ingest@mine"}  # exactly the stage reading it
