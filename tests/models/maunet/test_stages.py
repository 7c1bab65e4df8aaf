"""maunet through the nuclei stages: train_cells, the val post-processing search, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from microseg.config import CellModelConfig
from microseg.data.manifest import write_manifest
from microseg.io.tiff import write_stack
from microseg.stages import cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"features": [4, 8, 8, 16], "decoder_channels": [8, 8, 4, 4, 4]}


@pytest.fixture()
def toy_params(params):
    prepared = params.paths.prepared / "toyds"
    rows = []
    for i, split in enumerate(["train"] * 3 + ["val"] * 2 + ["test"] * 2):
        rng = np.random.default_rng(i)
        labels = np.zeros((64, 64), np.uint16)
        for k in range(1, 6):
            labels[disk(rng.uniform(8, 56, 2), rng.uniform(4, 7), shape=labels.shape)] = k
        image = np.clip(30 + 150 * (labels > 0) + rng.normal(0, 10, labels.shape), 0, 255)
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
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, prepared)
    params.cells.dataset = "toyds"
    params.cells.n_overlays = 1
    params.cells.post_grid = {
        "t_seed": [0.3, 0.5],
        "elevation": ["prob", "predicted_distance"],
        "min_size": [5],
    }
    params.cells.post_grids = {}  # the shared grid above, not params.yaml's MAUNet grid
    train = {"model": {**TINY, "backbones": ["resnet18", "resnet10"]}, "patch_size": 32}
    params.cells.models = {
        "maunet_ensemble": CellModelConfig(
            family="maunet",
            train={**train, "batch_size": 2, "epochs": 1, "steps_per_epoch": 3},
            infer={"tta": True},
        )
    }
    return params


def test_maunet_runs_the_train_and_evaluate_stages(toy_params):
    params = toy_params
    params.cells.post_by_modality.min_images = 2  # the two val images: their kind searches
    cells.prepare_targets_stage(params)
    out = cells.train_cell_model(params, "maunet_ensemble")
    assert out["epochs"] == 1 and out["n_params"] > 0
    metrics = cells.evaluate_cell_model(params, "maunet_ensemble")
    assert metrics["n_images"] == 2 and 0.0 <= metrics["f1_50"] <= 1.0
    folder = cells.REPORTS_ROOT / "maunet_ensemble"
    search = pd.read_csv(folder / "postprocess_search.csv")
    assert len(search) == 1 + 4  # the trained post-processing, then the grid
    assert set(search["elevation"]) == {"prob", "predicted_distance"}
    assert set(search["seeds"]) == {"distance"}
    chosen = json.loads((folder / "postprocess.json").read_text())
    assert chosen["seeds"] == "distance" and chosen["min_size"] in (5, 20)
    by_kind = pd.read_csv(folder / "postprocess_search_by_modality.csv")
    assert set(by_kind["modality"]) == {"fluorescence"} and set(by_kind["n_images"]) == {2}
    assert set(chosen["by_modality"]) <= {"fluorescence"}
