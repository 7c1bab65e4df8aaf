"""The CLI as users and dvc.yaml call it: clear errors, and the pipeline end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.tiny_segmenters import tiny_train

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path)
    proc = _run([str(BIN / "microseg"), "ingest", "nope"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run([str(BIN / "microseg"), "ingest", "dsb2018"], tmp_path, check=False)
    assert proc.returncode == 2 and "dvc pull" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """The repository's tracked and untracked-unignored files in a fresh git repo."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split()
    dst = tmp_path / "repo"
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    _run(["git", "init", "-q"], dst)
    return dst


def _trim_dsb(root: Path, keep_every: int) -> None:
    """Keep every ``keep_every``-th DSB image (30 of 536): the pipeline, not the data size, is
    what this test exercises (ingest and targets of all 536 took minutes)."""
    ids = sorted(p.stem for p in (root / "images").glob("*.png"))
    drop = set(ids) - set(ids[::keep_every])
    for sid in drop:
        (root / "images" / f"{sid}.png").unlink()
        (root / "labels" / f"{sid}.png").unlink()


@pytest.mark.heavy
def test_dvc_repro_end_to_end_then_clean(repo_copy: Path) -> None:
    """synth -> ingest -> validate for all datasets on tiny params; a second repro is a no-op."""
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["synth"]["spines"].update(
        n_train=1, n_val=1, shape=[8, 64, 64], benchmark_shape=[8, 96, 96]
    )
    params["synth"]["tracking"].update(n_frames=5, shape=[48, 48])
    params["yolo"]["train"].update(epochs=1, imgsz=64, batch=4)
    params["yolo"]["sweep"].update(confs=[0.01, 0.1], ious=[0.5])
    params["baseline_log"]["grid"] = {
        "threshold": [0.1, 0.2],
        "min_sigma": [1.5],
        "max_sigma": [3.0],
    }
    params["punet"]["train"].update(
        filters=[4, 8],
        latent_filters=[4, 8],
        epochs=1,
        val_every=1,  # params.yaml validates every second epoch
        steps_per_epoch=2,
        patch_size=32,
        batch_size=2,
    )
    params["punet"]["predict"].update(n_samples=2)
    params["hpunet"]["train"].update(
        filters=[4, 8, 16],
        posterior_filters=[4, 8, 8],
        latent_levels=2,
        latent_dim=2,
        head_convs=2,
        epochs=1,
        val_every=1,
        steps_per_epoch=2,
        patch_size=32,
        batch_size=2,
    )
    params["fusion"].update(n_trials=4)
    tiny_unet = {
        "model": {"arch": "unet", "features": [8, 16, 32]},
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 3,
        "val_max_images": 2,
        "num_threads": 1,
        "device": "cpu",
    }
    params["tracking"]["segmenters"]["unet"]["train"] = tiny_unet
    extras = {"num_threads": 1, "device": "cpu"}
    segs = params["tracking"]["segmenters"]
    segs["lstmunet"]["train"] = tiny_train("lstmunet", val_max_frames=2, **extras)
    segs["maunet"]["train"] = tiny_train("maunet", **extras)
    params["cells"]["max_images"] = 3
    params["cells"]["post_grid"] = {"t_seed": [0.5, 0.7]}
    params["cells"]["models"] = {
        "unet": {"family": "unet", "description": "tiny", "train": tiny_unet | {"patch_size": 64}}
    }
    params["registry"]["nuclei_model"] = "unet"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([str(BIN / "dvc"), "pull", "-q", "data.dvc"], repo_copy)
    _trim_dsb(repo_copy / "data" / "raw" / "dsb2018", keep_every=18)
    _run([str(BIN / "dvc"), "add", "-q", "data/raw"], repo_copy)  # the trimmed copy's data.dvc
    _run([str(BIN / "dvc"), "repro"], repo_copy)
    # the demo's pipeline; studies/dvc.yaml (make studies) is not part of `dvc repro` and is
    # stale whenever its deps change, by design
    status = _run([str(BIN / "dvc"), "status", "dvc.yaml"], repo_copy).stdout
    assert "up to date" in status, status
    again = _run([str(BIN / "dvc"), "repro"], repo_copy).stdout
    assert "Running stage" not in again
    for ds in ("spines", "dsb2018", "tracking"):
        assert (repo_copy / "data/prepared" / ds / "manifest.parquet").exists()
        assert (repo_copy / "reports/validation" / ds / "result.json").exists()
    where = _run([str(BIN / "microseg"), "where"], repo_copy).stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in where
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    stages = set(runs["tags.microseg.stage"])
    assert {"synth_spines", "synth_tracking", "ingest", "validate"} <= stages
    assert {"convert_yolo", "train_yolo", "eval_yolo", "baseline_log"} <= stages
    assert {"train_punet", "predict_punet", "uncertainty", "inter_rater"} <= stages
    assert {"train_tracking_seg", "track", "evaluate_tracking"} <= stages
    tracking = json.loads((repo_copy / "metrics" / "tracking.json").read_text())
    assert tracking["masks"] == "model"
    for name in ("unet", "lstmunet", "maunet"):  # one row per segmenter, on the same test sequence
        assert {"SEG", "DET", "TRA"} <= set(tracking[name]["03"])
    assert {"prepare_targets", "train_cells", "evaluate_cells", "report"} <= stages
    for name in ("unet", "otsu"):
        cells = json.loads((repo_copy / "metrics" / "cells" / f"{name}.json").read_text())
        assert cells["n_images"] == 3 and {"f1_50", "segm_AP", "are"} <= set(cells)
    html = (repo_copy / "reports" / "benchmark" / "index.html").read_text()
    assert "otsu" in html and "unet" in html
    # registry: both tasks registered; the first version of each became champion
    assert {"register"} <= stages
    from mlflow import MlflowClient

    client = MlflowClient()
    for task, name in (("spines", "microseg-spines"), ("nuclei", "microseg-nuclei")):
        folder = repo_copy / "reports" / "registry"
        record = json.loads((folder / f"{task}.mlflow.json").read_text())
        assert record["promotion"]["promoted"] is True, record
        what = json.loads((folder / f"{task}.json").read_text())  # the DVC output: no ids
        assert what["validated"] is True and what["sources"], what
        assert not {"version", "model_uri", "promotion"} & set(what), what
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    batch = json.loads(
        (repo_copy / "reports" / "batch_eval" / "spines" / "batch_eval.json").read_text()
    )
    s = batch["summary"]
    assert s["n_evaluated"] == 2 and s["n_bad_inputs"] == 0 and s["n_scored"] == 2, s
    assert {"tune_fusion", "fuse", "evaluate_spines"} <= stages
    table = json.loads((repo_copy / "metrics" / "spines.json").read_text())
    assert {"yolo", "punet_spots", "log_baseline", "fusion"} <= set(table)
    assert (repo_copy / "params" / "tuned_fusion.yaml").exists()
    for name in ("spines_yolo", "spines_log", "spines_punet", "spines_inter_rater"):
        assert (repo_copy / "metrics" / f"{name}.json").exists(), name
    # the flat and the hierarchical Prob-UNet, one row each, on the same benchmark planes
    prob = json.loads((repo_copy / "metrics" / "prob_models.json").read_text())
    assert set(prob) == {"punet", "hpunet"}
    assert prob["punet"]["planes"] == prob["hpunet"]["planes"] > 0
