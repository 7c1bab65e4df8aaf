"""Synthetic-data study: arms' training sets (synthetic share, real validation, no test
images) and the whole command at tiny scale (2 arms x 2 seeds, a tiny U-Net, 2 training steps).
The paired statistics are cross-checked against scipy in tests/evaluate/test_arm_comparison.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk
from typer.testing import CliRunner

from microseg.config import CellModelConfig
from microseg.data.manifest import read_manifest, write_manifest
from microseg.errors import ConfigError
from microseg.io.tiff import write_stack
from microseg.stages import synth_study as study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_UNET = {
    "model": {"arch": "unet", "features": [4, 8, 16], "num_res_units": 0},
    "patch_size": 32,
    "batch_size": 2,
    "epochs": 1,
    "steps_per_epoch": 1,
    "warmup_steps": 0,
    "progress": False,
    "num_threads": 1,
}


def _index(n: int, split: str, prefix: str, modalities: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": [f"{prefix}{i:03d}" for i in range(n)],
            "split": split,
            "modality": [modalities[i % len(modalities)] for i in range(n)],
            **{c: [f"{c}/{prefix}{i:03d}.tif" for i in range(n)] for c in study.TARGET_COLS},
        }
    )


@pytest.mark.parametrize(
    ("arm", "n_real", "n_synth"),
    [("R", 40, 0), ("S", 0, 40), ("R+S@10", 40, 4), ("R+S@25", 40, 13), ("R+S@50", 40, 40)],
)
def test_arm_training_sets_have_the_synthetic_share_and_real_val_only(arm, n_real, n_synth):
    real = pd.concat(
        [
            _index(40, "train", "r", ["fluorescence"]),
            _index(7, "val", "v", ["fluorescence"]),
            _index(9, "test", "t", ["fluorescence"]),
        ]
    )
    synth = _index(40, "train", "synth_", ["fluorescence", "fluorescence", "tissue", "brightfield"])
    index = study.arm_index(real, synth, study.parse_arm(arm))
    train = index[index["split"] == "train"]
    assert (train["source"] == "real").sum() == n_real
    assert (train["source"] == "synthetic").sum() == n_synth
    if arm.startswith("R+S"):  # p % of the training set is synthetic (rounded)
        p = float(arm.split("@")[1]) / 100
        assert abs(n_synth / len(train) - p) <= 1 / len(train)
    # the synthetic rows are a prefix per modality, in the rendered modality shares
    picked = train[train["source"] == "synthetic"]
    if n_synth:
        shares = picked["modality"].value_counts(normalize=True)
        assert abs(shares.get("fluorescence", 0) - 0.5) <= 1 / n_synth + 1e-9
    # validation is the real val split, never synthetic; no test image trains or validates
    val = index[index["split"] == "val"]
    assert sorted(val["sample_id"]) == [f"v{i:03d}" for i in range(7)]
    assert (val["source"] == "real").all()
    assert not index["sample_id"].str.startswith("t").any()
    assert set(index["split"]) <= {"train", "val"}


def test_arms_are_nested_and_bad_arms_are_refused():
    synth = _index(30, "train", "synth_", ["fluorescence", "tissue"])
    ten, fifty = (set(study.take_stratified(synth, k)["sample_id"]) for k in (3, 15))
    assert len(ten) == 3 and len(fifty) == 15 and ten < fifty
    with pytest.raises(ConfigError, match="R\\+S@<percent>"):
        study.parse_arm("R+S")
    with pytest.raises(ConfigError, match="percentage"):
        study.parse_arm("R+S@100")
    with pytest.raises(ConfigError, match="rendered"):
        study.take_stratified(synth, 31)


@pytest.fixture()
def tiny_dataset(params):
    """A tiny real nuclei dataset (4 train, 2 val, 3 test images of disks) and a tiny study."""
    prepared = params.paths.prepared / "tinyds"
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 3):
        rng = np.random.default_rng(i)
        labels = np.zeros((64, 64), np.uint16)
        for k in range(1, 7):
            labels[disk(rng.uniform(8, 56, 2), rng.uniform(4, 7), shape=labels.shape)] = k
        image = np.clip(25 + 160 * (labels > 0) + rng.normal(0, 8, labels.shape), 0, 255)
        write_stack(prepared / "images" / f"s{i}.tif", image.astype(np.uint8))
        write_stack(prepared / "labels" / f"s{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"s{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/s{i}.tif",
                "label_path": f"labels/s{i}.tif",
                "label_kind": "instance",
                "axes": "YX",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, prepared)
    params.cells.dataset = "tinyds"
    params.cells.n_overlays = 1
    params.cells.post_grid = {}
    params.cells.max_area = None
    params.cells.models = {"tiny": CellModelConfig(family="unet", train=TINY_UNET)}
    params.synth_study = {
        "model": "tiny",
        "train": {"steps_per_epoch": 2},
        "seeds": [1, 2],
        "arms": ["R", "R+S@50"],
        "n_resamples": 200,
    }
    return params


def test_study_runs_end_to_end_and_writes_its_summary(tiny_dataset):
    import mlflow
    import yaml

    from microseg.cli import app

    params = tiny_dataset
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    res = CliRunner().invoke(app, ["synth-study", "--jobs", "1", "--params", "params.yaml"])
    assert res.exit_code == 0, res.output
    assert "synthetic data" in res.output

    summary = json.loads((params.paths.metrics / study.METRICS_NAME).read_text())
    assert list(summary["arms"]) == ["R", "R+S@50"]
    assert all(a["seeds"] == [1, 2] for a in summary["arms"].values())
    assert list(summary["vs_R"]) == ["R+S@50"]
    assert summary["sizes"]["R"] == {"n_train_real": 4, "n_train_synthetic": 0, "n_val_real": 2}
    assert summary["sizes"]["R+S@50"] == {
        "n_train_real": 4,
        "n_train_synthetic": 4,
        "n_val_real": 2,
    }
    assert any(v in summary["sentence"] for v in ("helped", "did not help", "hurt"))
    table = pd.read_csv(params.paths.reports / "synth_study" / "summary.csv")
    assert table["arm"].tolist() == ["R", "R+S@50"]
    assert (params.paths.reports / "synth_study" / "arms.png").stat().st_size > 0

    # fitted on the real train split only; every score is of the real test images
    record = json.loads(Path("data/synth/tinyds/prepared/synth_nuclei.json").read_text())
    assert record["stats"]["split"] == "train"
    test_ids = sorted(
        read_manifest(params.paths.prepared / "tinyds").query("split == 'test'")["sample_id"]
    )
    for arm in ("R", "R_S50"):
        for seed in (1, 2):
            per_image = pd.read_csv(
                params.paths.reports / "synth_study" / arm / f"seed{seed}" / "per_image.csv"
            )
            assert sorted(per_image["image_id"]) == test_ids
            assert Path(f"models/synth_study/tinyds/{arm}/seed{seed}/best.pt").is_file()
    arm_index = pd.read_parquet("data/synth/tinyds/arms/R_S50/index.parquet")
    assert (arm_index.loc[arm_index["split"] == "val", "source"] == "real").all()

    # one MLflow run per (arm, seed), nested under the study's run
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    children = runs[runs["tags.microseg.synth_arm"].notna()]
    assert sorted(
        zip(children["tags.microseg.synth_arm"], children["tags.microseg.seed"], strict=True)
    ) == [
        ("R", "1"),
        ("R", "2"),
        ("R+S@50", "1"),
        ("R+S@50", "2"),
    ]
    parent = runs[runs["tags.mlflow.runName"] == "synth-study"]["run_id"].item()
    assert (children["tags.mlflow.parentRunId"] == parent).all()

    # a second call reuses every finished run (no training): same numbers
    res = CliRunner().invoke(app, ["synth-study", "--jobs", "1", "--params", "params.yaml"])
    assert res.exit_code == 0, res.output
    again = json.loads((params.paths.metrics / study.METRICS_NAME).read_text())
    assert again["arms"] == summary["arms"]


def test_variant_arms_train_on_their_data_arm_with_their_overrides(params):
    variants = {"R+shapes": study.ArmVariant(data="R", train={"shapes": {"prob": 0.5}})}
    arm = study.parse_arm("R+shapes", variants)
    assert (arm.real, arm.percent, arm.slug) == (True, 0.0, "R_shapes")
    assert arm.train == {"shapes": {"prob": 0.5}}
    with pytest.raises(ConfigError, match="variants"):
        study.parse_arm("R+blur", variants)
    with pytest.raises(ConfigError, match="data arm"):
        study.parse_arm("V", {"V": study.ArmVariant(data="V")})

    params.cells.models = {"tiny": CellModelConfig(family="unet", train=TINY_UNET)}
    params.synth_study = {"model": "tiny", "arms": ["R", "R+shapes"], "variants": variants}
    cfg, arms = study.study_config(params)
    assert [a.name for a in arms] == ["R", "R+shapes"]
    plain = study.study_params(params, cfg, 3, arms[0]).cells.models["tiny"].train
    shaped = study.study_params(params, cfg, 3, arms[1]).cells.models["tiny"].train
    assert "shapes" not in plain and shaped["shapes"] == {"prob": 0.5}
    assert shaped["seed"] == plain["seed"] == 3
    # the same images as R: the training sets are equal, so only the overrides differ
    real = _index(6, "train", "r", ["fluorescence"])
    synth = _index(6, "train", "s", ["fluorescence"])
    pd.testing.assert_frame_equal(
        study.arm_index(real, synth, arms[0]), study.arm_index(real, synth, arms[1])
    )
