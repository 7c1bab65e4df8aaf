"""The maunet network: shapes per backbone, probabilities, ensemble averaging, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import get_model
from microseg.models.maunet import (
    DEFAULT_POST,
    MaunetConfig,
    MaunetSegmenter,
    build_maunet,
    load_maunet,
    save_maunet,
)
from microseg.models.maunet.network import DualDecoderUNet, activate
from microseg.models.unet import UnetConfig, build_unet, save_unet
from microseg.models.unet.network import model_in_channels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"features": (4, 8, 8, 16), "decoder_channels": (8, 8, 4, 4, 4)}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_keep_shape_and_give_probabilities(backbone, channels):
    cfg = MaunetConfig(backbone=backbone, in_channels=channels, **TINY)
    net = build_maunet(cfg).eval()
    assert model_in_channels(net) == channels
    x = torch.rand(2, channels, 64, 96)
    with torch.no_grad():
        raw = net.raw(x)
        probs = net(x)
    assert len(raw) == 1 and raw[0].shape == (2, 4, 64, 96)
    assert probs.shape == (2, 4, 64, 96)
    assert torch.allclose(probs[:, :3].sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert float(probs[:, 3].min()) >= 0 and float(probs[:, 3].max()) <= 1


def test_activation_is_softmax_and_a_clipped_distance():
    raw = torch.zeros(1, 4, 1, 3)
    raw[0, 0] = torch.tensor([2.0, 0.0, -1.0])
    raw[0, 3] = torch.tensor([-0.5, 0.3, 1.7])
    probs = activate(raw)
    assert torch.allclose(probs[:, :3], torch.softmax(raw[:, :3], dim=1))
    assert torch.allclose(probs[0, 3, 0], torch.tensor([0.0, 0.3, 1.0]))


def test_backbones_differ_in_depth():
    sizes = {
        b: sum(p.numel() for p in build_maunet(MaunetConfig(backbone=b, **TINY)).parameters())
        for b in ("resnet18", "resnet34")
    }
    assert sizes["resnet34"] > sizes["resnet18"]
    layers = build_maunet(MaunetConfig(backbone="resnet34", **TINY)).members[0].encoder
    assert [len(layer) for layer in (layers.resnet.layer1, layers.resnet.layer3)] == [3, 6]


def test_the_ensemble_averages_its_members_outputs():
    cfg = MaunetConfig(backbones=("resnet18", "resnet34"), **TINY)
    assert cfg.members == ("resnet18", "resnet34")
    net = build_maunet(cfg).eval()
    # each member alone, with the ensemble's weights
    singles = []
    for member, backbone in zip(net.members, cfg.members, strict=True):
        single = DualDecoderUNet(backbone, cfg).eval()
        single.load_state_dict(member.state_dict())
        singles.append(single)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        probs = [activate(s(x)) for s in singles]
        both = net(x)
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # the members really differ
    assert torch.allclose(both, (probs[0] + probs[1]) / 2, atol=1e-6)
    # softmax averaged, not logits: the classes still sum to one
    assert torch.allclose(both[:, :3].sum(1), torch.ones(1, 64, 64), atol=1e-5)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="resnet19"):
        MaunetConfig(backbone="resnet19")
    with pytest.raises(ConfigError, match="vgg"):
        MaunetConfig(backbones=("resnet18", "vgg"))
    with pytest.raises(ConfigError, match="features"):
        MaunetConfig(features=(4, 8, 16))
    with pytest.raises(ConfigError, match="decoder_channels"):
        MaunetConfig(decoder_channels=(8, 4))
    with pytest.raises(ConfigError, match="in_channels"):
        MaunetConfig(in_channels=2)
    with pytest.raises(ConfigError, match="unknown"):
        MaunetConfig.from_mapping({"backbone": "resnet18", "width": 3})


@pytest.mark.parametrize("backbones", [(), ("resnet18", "resnet10")])
def test_save_load_roundtrip(tmp_path, backbones):
    cfg = MaunetConfig(backbones=backbones, **TINY)
    post = PostprocessConfig(seeds="distance", elevation="predicted_distance", t_seed=0.4)
    net = build_maunet(cfg).eval()
    path = save_maunet(net, tmp_path / "m.pt", cfg, post, {"metrics": {"val_f1_50": 0.5}})
    loaded, cfg2, post2 = load_maunet(path)
    assert cfg2 == cfg and post2 == post and not loaded.training
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "microseg.maunet/1" and ckpt["metrics"] == {"val_f1_50": 0.5}


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(MissingFileError):
        load_maunet(tmp_path / "none.pt")
    unet = save_unet(build_unet(UnetConfig(features=(4, 8))), tmp_path / "u.pt", UnetConfig())
    with pytest.raises(DataFormatError, match=r"microseg\.maunet/1"):
        load_maunet(unet)
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataFormatError, match="readable"):
        load_maunet(tmp_path / "junk.pt")


def test_registry_and_facade(tmp_path):
    family = get_model("maunet")
    assert family is MaunetSegmenter and family.trainable
    seg = family.build(**TINY, post={"min_size": 3})
    assert seg.post.seeds == "distance" and seg.post.min_size == 3
    path = seg.save(tmp_path / "m.pt")
    train = {"patch_size": 64, "overlap": 0.5}
    loaded = family.load(path, train=train, infer={"post": {"t_mask": 0.4}}, post={"t_seed": 0.7})
    assert loaded.infer.roi == 64 and loaded.infer.overlap == 0.5
    # the saved post-processing, then infer's, then the chosen one
    assert loaded.post == PostprocessConfig(
        **{**DEFAULT_POST.__dict__, "min_size": 3, "t_mask": 0.4, "t_seed": 0.7}
    )
    image = (np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)
    probs = loaded.probabilities(image)
    assert probs.shape == (4, 50, 70)
    labels, fg, scores = loaded.as_predictor()(image)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert np.allclose(fg, 1 - probs[0], atol=1e-6)
    assert set(scores) == set(np.unique(labels[labels > 0]).tolist())
    with pytest.raises(ConfigError, match="multiple of 32"):
        family.load(path, train={"patch_size": 48})
    with pytest.raises(MissingFileError):
        family.load(tmp_path / "missing.pt")
