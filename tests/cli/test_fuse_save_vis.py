"""`microseg fuse --input ... --save-vis` on a tiny stack with tiny untrained models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from microseg.cli import app
from microseg.errors import ConfigError
from microseg.io.tiff import write_stack
from microseg.models.punet import ProbUNet, save_punet
from microseg.models.yolo import YoloSpineDetector
from microseg.report.fusion_vis import COLORS

REPO = Path(__file__).resolve().parents[2]


def test_fuse_save_vis_writes_coloured_pngs_next_to_the_results(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    YoloSpineDetector.build("n").save(tmp_path / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        tmp_path / "punet.pt",
    )
    rng = np.random.default_rng(1)
    stack = rng.normal(300, 40, (4, 64, 64))
    stack[1, 20:26, 30:36] += 2000
    write_stack(
        tmp_path / "in" / "a.tif", np.clip(stack, 0, 65535).astype(np.uint16), (500, 94, 94)
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["yolo"]["convert"]["channels"] = "single"
    params["yolo"]["predict"]["conf"] = 0.0
    params["punet"]["predict"].update(n_samples=2, batch_planes=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "fusion.yaml").write_text("high_conf: 0.0\nlow_conf: 0.0\n")  # keep every box
    out = tmp_path / "fused"
    args = [
        "fuse", "--input", str(tmp_path / "in"), "--out", str(out),
        "--yolo-weights", str(tmp_path / "yolo.pt"), "--punet-weights", str(tmp_path / "punet.pt"),
        "--fusion-params", str(tmp_path / "fusion.yaml"), "--params", str(tmp_path / "params.yaml"),
        "--save-vis", "--vis-interval", "2",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "1 done" in res.output and "visualisations: 1 drawn" in res.output
    vis = out / "a" / "vis"
    names = sorted(p.name for p in vis.glob("*.png"))
    assert names == ["max_projection.png", "z000.png", "z002.png"]
    images = {n: np.asarray(Image.open(vis / n)) for n in names}
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in images.values())
    dedup = pd.read_csv(out / "a" / "predictions_dedup.csv")
    assert len(dedup) > 0
    cx = np.floor((dedup["x1"] + dedup["x2"]) / 2).astype(int).clip(0, 63)  # centre - 0.5 + 0.5
    cy = np.floor((dedup["y1"] + dedup["y2"]) / 2).astype(int).clip(0, 63)
    z = dedup["z"].round().astype(int)
    magenta = COLORS["fused"]
    for x, y, plane in zip(cx, cy, z, strict=True):
        assert tuple(images["max_projection.png"][y, x]) == magenta
        if f"z{plane:03d}.png" in images:
            assert tuple(images[f"z{plane:03d}.png"][y, x]) == magenta
    # a resumed run keeps the drawing of a result that did not change
    stamp = (vis / "vis.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert "0 done, 1 skipped" in again.output and "visualisations: 0 drawn" in again.output
    assert (vis / "vis.json").stat().st_mtime_ns == stamp
    # --save-vis needs stacks to draw
    no_input = CliRunner().invoke(
        app, ["fuse", "--save-vis", "--params", str(tmp_path / "params.yaml")]
    )
    assert isinstance(no_input.exception, ConfigError)
    assert "--save-vis" in str(no_input.exception)
