"""The unet family: MONAI architectures, save/load, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microseg.errors import ConfigError, DataFormatError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import get_model
from microseg.models.unet import (
    UnetConfig,
    UnetSegmenter,
    build_unet,
    load_unet,
    model_in_channels,
    save_unet,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_dynunet_takes_planned_kernels_and_strides():
    """A plan (nnunet family) sets kernels and strides per level; the input multiple follows."""
    cfg = UnetConfig(
        arch="dynunet",
        features=(8, 16, 32),
        options={"kernel_size": [[3, 3], [3, 3], [3, 3]], "strides": [[1, 1], [2, 2], [4, 4]]},
    )
    assert cfg.size_multiple == 8
    net = build_unet(cfg)
    out = net(torch.zeros(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ConfigError, match="one kernel and one stride per level"):
        build_unet(UnetConfig(arch="dynunet", features=(8, 16), options={"strides": [[1, 1]]}))


def test_unknown_arch_and_stray_options_are_refused():
    with pytest.raises(ConfigError, match="unet arch must be one of"):
        UnetConfig(arch="nope")
    with pytest.raises(ConfigError, match="takes no options"):
        build_unet(UnetConfig(arch="unet", features=(8, 16), options={"x": 1}))
