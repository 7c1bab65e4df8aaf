"""The nnunet family end to end on a toy targets cache: plan, train, load, predict, tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from microseg.errors import ConfigError, DataFormatError
from microseg.io.tiff import read_stack
from microseg.models import get_model
from microseg.models.nnunet import NnunetSegmenter, read_plans, saved_plan
from microseg.models.unet import UnetConfig, build_unet, save_unet
from microseg.models.unet.network import model_in_channels
from microseg.tune.postprocess import search_postprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "plan": {"base_features": 4, "max_features": 16, "max_patch": 32},
    "epochs": 1,
    "steps_per_epoch": 3,
    "warmup_steps": 0,
    "val_max_images": 1,
    "seed": 3,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def trained(toy_targets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nnunet_model")
    result = get_model("nnunet").train(toy_targets, out, TINY)
    assert result.epochs_completed == 1 and "val_f1_50" in result.best
    return out


def test_training_writes_fingerprint_plans_and_a_planned_model(trained: Path):
    fp = json.loads((trained / "fingerprint.json").read_text())
    assert fp["n_images"] == 4 and fp["source"] == "targets"
    plan, planner = read_plans(trained / "plans.json")
    assert planner.base_features == 4
    # toy: median 64x64 capped at 32 px -> 3 poolings (4 px bottleneck), widths 4..16;
    # 4 small images -> the batch is the minimum of 2; all grey -> one input channel
    assert (plan.patch_size, plan.batch_size, plan.in_channels) == (32, 2, 1)
    assert plan.features == (4, 8, 16, 16) and plan.bottleneck == (4, 4)
    assert saved_plan(trained / "best.pt") == plan
    state = json.loads((trained / "train_state.json").read_text())
    assert state["model_config"]["arch"] == "dynunet"
    assert state["model_config"]["patch_size"] == 32


def test_load_and_predict_through_the_family(trained: Path, toy_prepared: Path):
    model = get_model("nnunet").load(trained / "best.pt", train=TINY, infer={"device": "cpu"})
    assert isinstance(model, NnunetSegmenter)
    assert model.infer.roi == 32 and model.infer.percentiles == (1.0, 99.0)
    assert model_in_channels(model.network) == 1
    image = read_stack(toy_prepared / "images" / "t5.tif")  # raw, unseen, 128x128
    labels, fg, scores = model.as_predictor()(image)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert fg.shape == image.shape and fg.min() >= 0 and fg.max() <= 1
    assert set(scores) == set(np.unique(labels[labels > 0]).tolist())
    probs = model.probabilities(image)
    assert probs.shape == (3, *image.shape)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # post-processing chosen on validation (stages/cells.py) needs probabilities + infer.post
    gt = read_stack(toy_prepared / "labels" / "t5.tif")
    chosen, table = search_postprocess([probs], [gt], model.infer.post, {"t_seed": [0.5, 0.7]})
    assert len(table) == 3 and chosen.t_seed in (model.infer.post.t_seed, 0.5, 0.7)
    again = NnunetSegmenter.load(trained / "best.pt", infer={"roi": 64, "device": "cpu"})
    assert again.infer.roi == 64  # infer overrides the planned window
    saved = again.save(trained / "copy.pt")
    assert saved_plan(saved) == again.plan


def test_planned_keys_and_replanning_on_resume_are_refused(trained: Path, toy_targets: Path):
    family = get_model("nnunet")
    with pytest.raises(ConfigError, match="plans \\['patch_size'\\] itself"):
        family.train(toy_targets, trained, {**TINY, "patch_size": 64})
    before = (trained / "plans.json").read_text()
    other = {**TINY, "plan": {**TINY["plan"], "base_features": 8}}
    with pytest.raises(ConfigError, match="another plan"):
        family.train(toy_targets, trained, other)
    assert (trained / "plans.json").read_text() == before
    family.check_train_keys(["plan.base_features", "lr", "dropout"])
    with pytest.raises(ConfigError, match=r"plan\.base_feature"):
        family.check_train_keys(["plan.base_feature"])
    with pytest.raises(ConfigError, match="plans"):
        family.check_train_keys(["model.features"])


def test_a_unet_model_file_is_not_an_nnunet_one(tmp_path: Path):
    cfg = UnetConfig(arch="dynunet", features=(4, 8, 8))
    path = save_unet(build_unet(cfg), tmp_path / "unet.pt", cfg)
    with pytest.raises(DataFormatError, match="no nnunet plan"):
        NnunetSegmenter.load(path)
    assert torch.load(path, weights_only=True)["format"] == "microseg.unet/1"


def test_same_seed_same_weights(trained: Path, toy_targets: Path, tmp_path, same_weights):
    """A second run of the same plan and config ends with the module fixture's tensors."""
    again = get_model("nnunet").train(toy_targets, tmp_path / "again", TINY)
    assert same_weights(trained / "best.pt", again.best_path) > 10
