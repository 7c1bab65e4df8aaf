"""``predict`` and ``fuse --input`` with ``--engine ray`` on a real local Ray cluster (two
worker processes, no network): the same files as ``--engine local``, a summary row per input
in input order, failures named, and a rerun that skips what is finished."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from microseg.cli import app
from microseg.io.tiff import read_stack, write_stack
from microseg.models.punet import ProbUNet, save_punet
from microseg.models.yolo import YoloSpineDetector

pytestmark = pytest.mark.slow  # a Ray cluster starts in about 20 s on 2 cores

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny untrained YOLO and Prob-UNet, three stacks (one broken), four nuclei images."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("predict_ray")
    YoloSpineDetector.build("n").save(root / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        root / "punet.pt",
    )
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        stack = rng.normal(300, 40, (4, 64, 64))
        stack[1, 20:26, 30:36] += 2000
        write_stack(root / "stacks" / f"{name}.tif", stack.clip(0, 65535).astype(np.uint16),
                    (500.0, 94.0, 94.0))  # fmt: skip
    (root / "stacks" / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    (root / "images").mkdir()
    for i in range(4):
        image = rng.normal(20, 3, (64, 64))
        image[10 + 8 * i : 18 + 8 * i, 20:30] = 200
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"n{i}.png")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["yolo"]["convert"]["channels"] = "single"
    params["yolo"]["predict"]["conf"] = 0.0
    params["punet"]["predict"].update(n_samples=2, batch_planes=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "fusion.yaml").write_text("high_conf: 0.0\nlow_conf: 0.0\n")
    return root


def _invoke(args: list[str]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def test_predict_on_ray_writes_what_local_writes(cluster, setup: Path) -> None:
    def run(out: str, *engine: str):
        return _invoke(["predict", str(setup / "images"), "--out", str(setup / out), "-m",
                        "otsu", "--params", str(setup / "params.yaml"), *engine])  # fmt: skip

    run("local")
    res = run("ray", "--engine", "ray")
    assert "4 of 4 images predicted (4 now, 0 earlier)" in res.output
    for i in range(4):
        np.testing.assert_array_equal(
            read_stack(setup / "ray" / f"n{i}_labels.tif"),
            read_stack(setup / "local" / f"n{i}_labels.tif"),
        )
    summary = pd.read_csv(setup / "ray" / "summary.csv")
    assert summary["input"].tolist() == [f"n{i}.png" for i in range(4)]
    assert set(summary["status"]) == {"done"}
    again = run("ray", "--engine", "ray")
    assert "(0 now, 4 earlier)" in again.output


def test_fuse_on_ray_writes_what_local_writes_and_resumes(cluster, setup: Path) -> None:
    def run(out: str, *engine: str):
        return _invoke([
            "fuse", "--input", str(setup / "stacks"), "--out", str(setup / out),
            "--yolo-weights", str(setup / "yolo.pt"), "--punet-weights", str(setup / "punet.pt"),
            "--fusion-params", str(setup / "fusion.yaml"), "--params", str(setup / "params.yaml"),
            *engine,
        ])  # fmt: skip

    run("fused_local")
    res = run("fused_ray", "--engine", "ray")
    assert "2 done, 0 skipped, 1 failed" in res.output and "broken.tif" in res.output
    for stem in ("a", "b"):
        for name in ("predictions_raw.csv", "predictions_dedup.csv"):
            ray_bytes = (setup / "fused_ray" / stem / name).read_bytes()
            assert ray_bytes == (setup / "fused_local" / stem / name).read_bytes()
    summary = pd.read_csv(setup / "fused_ray" / "summary.csv")
    assert summary["stack"].tolist() == ["a.tif", "b.tif", "broken.tif"]
    assert summary["status"].tolist() == ["done", "done", "failed"]
    again = run("fused_ray", "--engine", "ray")
    assert "0 done, 2 skipped, 1 failed" in again.output
    summary = pd.read_csv(setup / "fused_ray" / "summary.csv")
    assert summary["status"].tolist() == ["skipped", "skipped", "failed"]
