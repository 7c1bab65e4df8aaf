"""The unet family: MONAI architectures, watershed post-processing, save/load, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.data.targets import instances_to_classes
from microseg.errors import ConfigError, DataFormatError
from microseg.models import get_model
from microseg.models.unet import (
    PostprocessConfig,
    UnetConfig,
    UnetSegmenter,
    build_unet,
    load_unet,
    model_in_channels,
    probs_to_instances,
    remove_small_and_relabel,
    save_unet,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one thread avoids thread-pool overhead on a busy machine (10x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {
    "basic": (4, 4, 8, 8, 16),
    "unet": (4, 8, 16),
    "dynunet": (4, 8, 16),
    "attention": (4, 8, 16),
}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("channels", [1, 3])
def test_architectures_build_and_keep_shape(arch, channels):
    cfg = UnetConfig(arch=arch, features=TINY[arch], in_channels=channels, dropout=0.1)
    model = build_unet(cfg).eval()
    assert model_in_channels(model) == channels
    size = 2 * cfg.size_multiple * 2
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 3, size, size)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="arch"):
        UnetConfig(arch="resnet")
    with pytest.raises(ConfigError, match="in_channels"):
        UnetConfig(in_channels=2)
    with pytest.raises(ConfigError, match="basic"):
        UnetConfig(arch="basic", features=(4, 8, 16))
    with pytest.raises(ConfigError, match="unknown"):
        UnetConfig.from_mapping({"arch": "basic", "width": 3})


def two_touching_discs() -> np.ndarray:
    labels = np.zeros((64, 64), np.uint16)
    labels[disk((32, 22), 10.5, shape=labels.shape)] = 1
    labels[disk((32, 43), 10.5, shape=labels.shape)] = 2
    return labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("elevation", ["prob", "distance"])
def test_watershed_recovers_touching_discs_from_perfect_map(elevation):
    truth = two_touching_discs()
    classes = instances_to_classes(truth)
    probs = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    labels = probs_to_instances(probs, PostprocessConfig(elevation=elevation, min_size=5))
    assert labels.dtype == np.uint16
    assert labels.max() == 2
    for i in (1, 2):
        best = max(iou(truth == i, labels == j) for j in (1, 2))
        assert best > 0.95
    # the foreground is exactly the truth's
    assert np.array_equal(labels > 0, truth > 0)


def test_unseeded_components_and_small_objects():
    probs = np.zeros((3, 32, 32), np.float32)
    probs[0] = 1.0
    # a blob of boundary only (no interior seed) and a 2-pixel speck
    probs[:, 5:12, 5:12] = np.array([0, 0, 1], np.float32)[:, None, None]
    probs[:, 20, 20:22] = np.array([0, 1, 0], np.float32)[:, None]
    keep = probs_to_instances(probs, PostprocessConfig(seed_min_size=1, min_size=1))
    assert keep.max() == 2
    strict = probs_to_instances(probs, PostprocessConfig(min_size=5, keep_unseeded=False))
    assert strict.max() == 0


def test_remove_small_and_relabel():
    labels = np.zeros((10, 10), np.int32)
    labels[0, :3] = 7
    labels[5:8, 5:8] = 3
    labels[9, 9] = 12
    out = remove_small_and_relabel(labels, min_size=3)
    assert out.dtype == np.uint16
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert out[9, 9] == 0


def test_probs_shape_is_checked():
    with pytest.raises(DataFormatError):
        probs_to_instances(np.zeros((2, 8, 8), np.float32))


def test_save_load_roundtrip_and_registry(tmp_path):
    cfg = UnetConfig(arch="unet", features=(4, 8, 16))
    post = PostprocessConfig(t_seed=0.6, min_size=3)
    model = build_unet(cfg).eval()
    path = save_unet(model, tmp_path / "m.pt", cfg, post)
    loaded, cfg2, post2 = load_unet(path)
    assert cfg2 == cfg and post2 == post
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    family = get_model("unet")
    assert family is UnetSegmenter
    seg = family.load(path)
    labels, probs = seg.predict([np.zeros((40, 36), np.uint8)], roi=32)[0]
    assert labels.shape == (40, 36) and probs.shape == (3, 40, 36)
    built = family.build(arch="unet", features=[4, 8, 16], post={"min_size": 2})
    assert built.post.min_size == 2
    with pytest.raises(DataFormatError):
        (tmp_path / "bad.pt").write_text("nope")
        load_unet(tmp_path / "bad.pt")
