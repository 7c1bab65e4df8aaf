"""`microseg predict` and `microseg fuse --input` on folders, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from microseg.cli import app
from microseg.io.tiff import write_stack
from microseg.models.punet import ProbUNet, save_punet
from microseg.models.yolo import YoloSpineDetector


def write_noise_stack(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stack = rng.normal(300, 40, (4, 64, 64))
    stack[1, 20:26, 30:36] += 2000  # a bright blob, so the nets' outputs vary
    write_stack(path, np.clip(stack, 0, 65535).astype(np.uint16), (500.0, 94.0, 94.0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cli_predict")
    YoloSpineDetector.build("n").save(root / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        root / "punet.pt",
    )
    stacks = root / "stacks"
    write_noise_stack(stacks / "a.tif", seed=1)
    write_noise_stack(stacks / "b.tif", seed=2)
    (stacks / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["yolo"]["convert"]["channels"] = "single"
    params["yolo"]["predict"]["conf"] = 0.0
    params["punet"]["predict"].update(n_samples=2, batch_planes=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # fusion thresholds that keep every box: the pipeline's outputs are then non-empty
    (root / "fusion.yaml").write_text("high_conf: 0.0\nlow_conf: 0.0\n")
    return root


def test_predict_folder_reports_the_bad_stack_and_predicts_the_rest(setup: Path) -> None:
    out = setup / "pred"
    res = CliRunner().invoke(
        app,
        ["predict", str(setup / "stacks"), "--out", str(out), "--weights", str(setup / "yolo.pt"),
         "--params", str(setup / "params.yaml")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "2 of 3 stacks predicted" in res.output and "broken.tif" in res.output
    for stem in ("a", "b"):
        boxes = pd.read_csv(out / stem / "detections.csv")
        assert {"z", "x1", "y1", "x2", "y2", "score"} <= set(boxes.columns) and len(boxes) > 0
        assert (out / stem / "spines.csv").exists()
    assert not (out / "broken").exists()


def test_fuse_folder_writes_one_result_per_stack_and_resumes(setup: Path) -> None:
    out = setup / "fused"
    args = [
        "fuse", "--input", str(setup / "stacks"), "--out", str(out),
        "--yolo-weights", str(setup / "yolo.pt"), "--punet-weights", str(setup / "punet.pt"),
        "--fusion-params", str(setup / "fusion.yaml"), "--params", str(setup / "params.yaml"),
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 done, 0 skipped, 1 failed" in res.output and "broken.tif" in res.output
    for stem in ("a", "b"):
        dedup = pd.read_csv(out / stem / "predictions_dedup.csv")
        assert list(dedup.columns) == ["z", "x1", "y1", "x2", "y2", "score", "status"]
        assert len(dedup) > 0 and set(dedup["status"]) <= {"high", "validated"}
    again = CliRunner().invoke(app, args)
    assert "0 done, 2 skipped, 1 failed" in again.output
