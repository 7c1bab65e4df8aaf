"""``train_cells@<name>`` / ``evaluate_cells@<name>`` run a ``family: sac`` entry of
``cells.models`` like any other family (training, post-processing search on val, scoring)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk

from microseg.config import CellModelConfig
from microseg.data.manifest import write_manifest
from microseg.io.tiff import write_stack
from microseg.stages import cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def sac_params(params, sam_files, tiny_vit):
    prepared = params.paths.prepared / "toyds"
    rows = []
    for i, split in enumerate(["train"] * 3 + ["val"] * 2 + ["test"] * 2):
        rng = np.random.default_rng(i)
        labels = np.zeros((64, 64), np.uint16)
        for k in range(1, 5):
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
    params.cells.post_grid = {"t_seed": [0.5, 0.7], "t_mask": [0.5]}
    common = {"batch_size": 2, "epochs": 1, "steps_per_epoch": 2, "num_threads": 1}
    sam_options = {"checkpoint": str(sam_files["full"]), "vit": tiny_vit}
    params.cells.models = {
        "sac": CellModelConfig(
            family="sac",
            train={"model": {"options": {"feature_size": 12}}, "patch_size": 64, **common},
        ),
        "sac_sam": CellModelConfig(
            family="sac",
            train={"model": {"options": sam_options}, "patch_size": 32, **common},
        ),
    }
    return params


@pytest.mark.parametrize(
    ("name", "encoder"), [("sac", "swinunetr"), ("sac_sam", "sam (tiny_sam_full.pth)")]
)
def test_sac_entry_trains_and_evaluates_through_the_nuclei_stages(sac_params, name, encoder):
    cells.prepare_targets_stage(sac_params)
    out = cells.train_cell_model(sac_params, name)
    assert out["epochs"] == 1 and out["n_params"] > 0, out
    model_dir = cells.MODELS_ROOT / name
    assert json.loads((model_dir / "encoder.json").read_text())["encoder"] == encoder
    metrics = cells.evaluate_cell_model(sac_params, name)
    assert metrics["n_images"] == 2 and 0.0 <= metrics["f1_50"] <= 1.0
    report = cells.REPORTS_ROOT / name
    assert (report / "postprocess_search.csv").is_file()  # probabilities + infer.post searched
    assert (report / "per_image.csv").is_file()
    model = cells.load_model(sac_params.cells.models[name], model_dir)
    assert model.encoder == encoder
