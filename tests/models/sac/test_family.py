"""The sac façade: trains, saves, loads and predicts through the unet family's machinery, and
says which encoder ran; and the nuclei stages run it like any family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models import InstanceSegmenter, get_model
from microseg.models.sac import ENCODER_INFO, SacSegmenter, sac_model_section
from microseg.models.unet import UnetConfig, UnetSegmenter, build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_SWIN = {"arch": "swinunetr", "options": {"feature_size": 12, "depths": [1, 1, 1, 1]}}


def train_section(model: dict, **kw) -> dict:
    return {
        "model": model,
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 2,
        "steps_per_epoch": 2,
        "warmup_steps": 0,
        "num_threads": 1,
        "device": "cpu",
        "seed": 3,
        **kw,
    }


def raw_image(seed: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(30, 5, (50, 70))
    image[10:25, 10:30] += 150
    return np.clip(image, 0, 255).astype(np.uint8)


def test_sac_is_a_registered_family():
    family = get_model("sac")
    assert family is SacSegmenter and issubclass(family, UnetSegmenter)
    assert family.trainable


def test_model_section_defaults_and_the_encoder_record(sam_files):
    assert sac_model_section(None)["arch"] == "swinunetr"
    assert sac_model_section({})["options"] == {"encoder": "swinunetr"}
    sam = sac_model_section({"options": {"checkpoint": str(sam_files["full"])}})
    assert sam["arch"] == "sam"
    assert sam["options"]["encoder"] == "sam (tiny_sam_full.pth)"
    with pytest.raises(ConfigError, match="sac family runs"):
        sac_model_section({"arch": "unet"})


def test_swinunetr_trains_saves_loads_and_predicts(toy_targets, tmp_path):
    out = tmp_path / "swin"
    result = SacSegmenter.train(toy_targets, out, train_section(TINY_SWIN, patch_size=64))
    assert result.epochs_completed == 2
    assert "val_f1_50" in result.best
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["model_config"]["arch"] == "swinunetr"
    assert ckpt["model_config"]["options"]["encoder"] == "swinunetr"  # recorded in the file
    assert json.loads((out / ENCODER_INFO).read_text())["encoder"] == "swinunetr"

    model = SacSegmenter.load(out / "best.pt", train={"patch_size": 64}, infer={"overlap": 0.5})
    assert isinstance(model, InstanceSegmenter)
    assert model.encoder == "swinunetr"
    fresh = build_unet(UnetConfig.from_mapping(TINY_SWIN))
    assert model.describe()["n_params"] == sum(p.numel() for p in fresh.parameters())
    image = raw_image()
    labels, fg, scores = model.as_predictor()(image)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert fg.shape == image.shape and fg.min() >= 0.0 and fg.max() <= 1.0
    assert set(scores) == set(np.unique(labels[labels > 0]).tolist())
    probs = model.probabilities(image)  # what tune_postprocess searches on
    assert probs.shape == (3, *image.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert model.infer.roi == 64 and model.infer.overlap == 0.5  # train's window, infer's keys
    assert model.infer.post is not None


def test_sam_trains_with_a_frozen_local_encoder_and_loads_without_the_checkpoint(
    toy_targets, tmp_path, sam_files, tiny_vit
):
    ckpt_file = tmp_path / "my_sam.pth"
    ckpt_file.write_bytes(sam_files["full"].read_bytes())
    model_section = {
        "options": {"checkpoint": str(ckpt_file), "vit": tiny_vit, "freeze_encoder": True},
        "features": [8, 16],
    }
    out = tmp_path / "sam"
    SacSegmenter.train(toy_targets, out, train_section(model_section))
    info = json.loads((out / ENCODER_INFO).read_text())
    assert info["encoder"] == "sam (my_sam.pth)" and info["freeze_encoder"] is True
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["model_config"]["options"]["encoder"] == "sam (my_sam.pth)"

    ckpt_file.unlink()  # a trained model needs only its best.pt
    model = SacSegmenter.load(out / "best.pt", train=train_section(model_section))
    assert model.encoder == "sam (my_sam.pth)"
    assert model.describe()["checkpoint"] == str(ckpt_file)
    # the trained weights are loaded; frozen, the encoder is still exactly the checkpoint's
    for k, v in model.network.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    encoder = model.network.encoder.state_dict()
    for k, v in sam_files["state"].items():
        assert torch.equal(encoder[k], v), k
    labels, _, _ = model.as_predictor()(raw_image())
    assert labels.shape == (50, 70)


def test_sam_encoder_is_fine_tuned_unless_frozen(toy_targets, tmp_path, sam_files, tiny_vit):
    model_section = {
        "options": {"checkpoint": str(sam_files["encoder_only"]), "vit": tiny_vit},
        "features": [8, 16],
    }
    out = tmp_path / "sam_ft"
    SacSegmenter.train(toy_targets, out, train_section(model_section, epochs=1))
    trained = torch.load(out / "best.pt", weights_only=True)["model"]
    before = sam_files["state"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(trained["encoder.blocks.0.attn.qkv.weight"], before)


def test_load_refuses_what_is_not_a_sac_model(tmp_path):
    with pytest.raises(MissingFileError):
        SacSegmenter.load(tmp_path / "best.pt")
    unet = UnetSegmenter.build(arch="unet", features=[4, 8], num_res_units=0)
    unet.save(tmp_path / "unet.pt")
    with pytest.raises(DataFormatError, match="not a sac model"):
        SacSegmenter.load(tmp_path / "unet.pt")


def test_train_keys_are_checked_like_the_unet_family():
    SacSegmenter.check_train_keys(["lr", "model.options", "patch_size"])
    with pytest.raises(ConfigError, match="unknown SacSegmenter training knob"):
        SacSegmenter.check_train_keys(["model.encoder_depth"])


def test_same_seed_same_weights(toy_targets, tmp_path, same_weights):
    """Two SwinUNETR runs on the same data and config end with the same tensors (issue 16)."""
    section = train_section(TINY_SWIN, patch_size=64, epochs=1)
    a = SacSegmenter.train(toy_targets, tmp_path / "a", section)
    b = SacSegmenter.train(toy_targets, tmp_path / "b", section)
    assert same_weights(a.best_path, b.best_path) > 10
