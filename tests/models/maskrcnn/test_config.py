"""Mask R-CNN configs: validation, engine resolution, the flat training config."""

from __future__ import annotations

import pytest

from microseg.errors import ConfigError
from microseg.models import get_model
from microseg.models.maskrcnn import (
    MaskRCNNConfig,
    MaskRCNNPostConfig,
    MaskRCNNSegmenter,
    resolve_engine,
)
from microseg.models.maskrcnn.train import MaskRCNNTrainConfig

TINY_MODEL = {"engine": "torchvision", "backbone": "resnet18"}


def test_registry_and_engine_resolution(monkeypatch):
    assert get_model("maskrcnn") is MaskRCNNSegmenter
    import microseg.models.maskrcnn.config as mc

    monkeypatch.setattr(mc, "detectron2_available", lambda: False)
    assert resolve_engine("auto") == "torchvision"
    with pytest.raises(ConfigError, match="detectron2 is not installed"):
        resolve_engine("detectron2")
    with pytest.raises(ConfigError, match="detectron2 is not installed"):
        MaskRCNNSegmenter.build(engine="detectron2")
    monkeypatch.setattr(mc, "detectron2_available", lambda: True)
    assert resolve_engine("auto") == "detectron2"
    with pytest.raises(ConfigError, match="engine"):
        resolve_engine("mmdet")


def test_config_validation():
    with pytest.raises(ConfigError, match="anchor_sizes"):
        MaskRCNNConfig(anchor_sizes=(8, 16))
    with pytest.raises(ConfigError, match="backbone"):
        MaskRCNNConfig(backbone="vit")
    with pytest.raises(ConfigError, match="unknown"):
        MaskRCNNConfig.from_mapping({"anchors": 3})
    with pytest.raises(ConfigError, match="tile_overlap"):
        MaskRCNNPostConfig(max_size=64, tile_overlap=40)
    assert MaskRCNNConfig().trainable_layers == 5
    assert MaskRCNNConfig(weights_path="w.pt").trainable_layers == 3


def test_architecture_leaves_out_test_time_settings():
    a = MaskRCNNConfig(box_detections_per_img=5, rpn_post_nms_top_n_test=7).architecture()
    assert a == MaskRCNNConfig().architecture()
    assert a != MaskRCNNConfig(anchor_sizes=(4, 8, 16, 32, 64)).architecture()


def test_train_config_validation_defaults_and_flat_dict():
    with pytest.raises(ConfigError, match="unknown"):
        MaskRCNNTrainConfig.from_mapping({"epochz": 3})
    with pytest.raises(ConfigError, match="optimizer"):
        MaskRCNNTrainConfig.from_mapping({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="backbone"):
        MaskRCNNTrainConfig.from_mapping({"model": {"backbone": "vgg"}})
    with pytest.raises(ConfigError, match="device"):
        MaskRCNNTrainConfig.from_mapping({"device": "gpu0"})
    cfg = MaskRCNNTrainConfig()
    # the engine's knobs with this family's defaults: auto device, full precision, clip 10
    assert cfg.device == "auto" and cfg.precision == "32-true" and cfg.grad_clip_norm == 10.0
    flat = MaskRCNNTrainConfig.from_mapping(
        {"model": TINY_MODEL, "post": {"min_size": 5}, "patch_size": 64}
    ).as_dict()
    assert flat["model.backbone"] == "resnet18" and flat["post.min_size"] == 5
    assert flat["patch_size"] == 64 and flat["model.anchor_sizes"] == [8, 16, 32, 64, 128]
    assert flat["steps_per_epoch"] == 100 and flat["optimizer"] == "sgd"
