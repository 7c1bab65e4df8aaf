"""Mask R-CNN networks: build without downloads, local weights, the model file, detectron2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models.maskrcnn import (
    MODEL_FORMAT,
    MaskRCNNConfig,
    MaskRCNNSegmenter,
    build_network,
    load_local_weights,
    load_maskrcnn,
    weights_digest,
)

#: resnet18-FPN with few proposals/detections: a CPU forward pass of a 64 px image in ~1 s
TINY = {
    "engine": "torchvision",
    "backbone": "resnet18",
    "box_batch_size_per_image": 16,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_detections_per_img": 10,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_r50_fpn_v2_builds_without_any_download(monkeypatch):
    from torchvision.models._api import WeightsEnum

    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: calls.append(a))
    model = build_network(MaskRCNNConfig(engine="torchvision"))
    assert not calls
    # the guard inside the builder: a weight enum asking for its file is refused
    from torchvision.models import ResNet50_Weights

    from microseg.models.maskrcnn import no_weight_downloads

    with no_weight_downloads(), pytest.raises(ConfigError, match="never downloads"):
        ResNet50_Weights.IMAGENET1K_V1.get_state_dict()
    assert WeightsEnum.get_state_dict.__name__ == "get_state_dict"  # restored afterwards
    # nuclei-sized anchors, 2 classes, enough detections for dense images, no resizing
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.detections_per_img >= 300
    x = torch.rand(3, 70, 90)
    assert model.transform.resize(x)[0] is x
    assert model.rpn.head.cls_logits.out_channels == 3


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(1)
    seg = MaskRCNNSegmenter.build(**TINY, post={"score_thresh": 0.0, "min_size": 0})
    image = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    before = seg.predict([image])[0]
    path = seg.save(tmp_path / "m" / "model.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # atomic, no temp
    # the model file holds plain data only: it loads without unpickling code
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == MODEL_FORMAT and payload["model_config"]["backbone"] == "resnet18"
    again = MaskRCNNSegmenter.load(path)
    assert again.config == seg.config and again.post == seg.post
    assert weights_digest(again.network) == weights_digest(seg.network)
    after = again.predict([image])[0]
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[0].max() > 0
    # the stages' infer keys override the stored post-processing, then a chosen post
    strict = MaskRCNNSegmenter.load(path, infer={"score_thresh": 1.0, "device": "cpu"})
    assert strict.post.score_thresh == 1.0 and strict.post.min_size == 0
    assert strict.predict([image])[0][0].max() == 0
    chosen = MaskRCNNSegmenter.load(path, infer={"min_size": 3}, post={"min_size": 7})
    assert chosen.post.min_size == 7
    with pytest.raises(ConfigError, match="unknown"):
        MaskRCNNSegmenter.load(path, infer={"roi": 128})
    with pytest.raises(MissingFileError):
        MaskRCNNSegmenter.load(tmp_path / "nope.pt")
    net, cfg, post = load_maskrcnn(path)
    assert cfg.backbone == "resnet18" and post.min_size == 0 and not net.training


def test_load_refuses_a_file_of_another_format(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "microseg.unet/1", "model": {}}, path)
    with pytest.raises(DataFormatError, match=MODEL_FORMAT):
        load_maskrcnn(path)
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(DataFormatError, match="readable"):
        load_maskrcnn(tmp_path / "junk.pt")


def test_local_weights_are_loaded_by_name_and_shape(tmp_path):
    torch.manual_seed(2)
    a = build_network(MaskRCNNConfig(**TINY))
    path = tmp_path / "w.pt"
    state = a.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, 1024)  # COCO head
    torch.save({"model": state}, path)
    b = build_network(MaskRCNNConfig(**TINY, weights_path=str(path)))
    loaded, skipped = load_local_weights(build_network(MaskRCNNConfig(**TINY)), path)
    assert skipped == 1 and loaded == len(state) - 1
    sb = b.state_dict()
    assert torch.equal(
        sb["backbone.body.conv1.weight"], a.state_dict()["backbone.body.conv1.weight"]
    )
    assert not torch.equal(
        sb["roi_heads.box_predictor.cls_score.weight"],
        a.state_dict()["roi_heads.box_predictor.cls_score.weight"],
    )
    # with weights, 3 trainable stages by default: conv1 and layer1 are frozen
    frozen = {n for n, p in b.backbone.body.named_parameters() if not p.requires_grad}
    assert any(n.startswith("layer1") for n in frozen) and "conv1.weight" in frozen
    assert not any(n.startswith("layer2") for n in frozen)
    with pytest.raises(MissingFileError):
        build_network(MaskRCNNConfig(**TINY, weights_path=str(tmp_path / "nope.pt")))


# -- detectron2 (only where it is installed) --------------------------------------------------
def test_detectron2_engine_builds_and_predicts_the_same_type(tmp_path):
    pytest.importorskip("detectron2")
    tiny = {**TINY, "engine": "detectron2"}
    seg = MaskRCNNSegmenter.build(**tiny, post={"score_thresh": 0.0, "min_size": 0})
    assert seg.engine == "detectron2"
    image = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    labels, scores = seg.predict([image])[0]
    assert labels.dtype == np.uint16 and labels.shape == (64, 80)
    assert scores.shape == (labels.max(),) and np.all(np.diff(scores) <= 0)
    assert labels.max() > 0
    path = seg.save(tmp_path / "d2.pt")
    again = MaskRCNNSegmenter.load(path, infer={"device": "cpu"})
    assert again.engine == "detectron2"
    l2, s2 = again.predict([image])[0]
    assert np.array_equal(labels, l2) and np.array_equal(scores, s2)


def test_detectron2_config_comes_from_the_model_zoo_file():
    pytest.importorskip("detectron2")
    from microseg.models.maskrcnn import detectron2_cfg

    c = detectron2_cfg(MaskRCNNConfig(engine="detectron2"), "cpu")
    assert c.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and c.MODEL.MASK_ON
    assert c.MODEL.RESNETS.DEPTH == 50 and c.MODEL.WEIGHTS == ""
    assert c.MODEL.ROI_HEADS.NUM_CLASSES == 1 and c.INPUT.MIN_SIZE_TEST == 0
    assert c.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]
