"""The sac networks: SwinUNETR in 2D, and SAM's image encoder loaded from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models.sac.network import (
    SAM_TYPES,
    SamSegNet,
    checkpoint_init,
    encoder_name,
    load_sac_network,
    read_encoder_state,
    vit_dims,
)
from microseg.models.unet.network import (
    UnetConfig,
    build_unet,
    load_unet,
    model_in_channels,
    save_unet,
)
from microseg.models.unet.train import UnetTrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sam_cfg(checkpoint: Path | str, vit: dict, **options) -> UnetConfig:
    return UnetConfig.from_mapping(
        {
            "arch": "sam",
            "features": [8, 16],
            "options": {"checkpoint": str(checkpoint), "vit": vit, **options},
        }
    )


# -- swinunetr --------------------------------------------------------------------------------
@pytest.mark.parametrize("in_channels", [1, 3])
def test_swinunetr_2d_gives_3_class_logits_at_input_size(in_channels):
    cfg = UnetConfig(arch="swinunetr", in_channels=in_channels, options={"feature_size": 12})
    net = build_unet(cfg)
    assert model_in_channels(net) == in_channels  # what the sliding-window predictor feeds it
    out = net(torch.rand(2, in_channels, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    assert cfg.size_multiple == 32
    with pytest.raises(ConfigError, match="at least 64"):
        net(torch.rand(2, in_channels, 32, 64))  # a 1x1 bottleneck cannot be normalised


def test_swinunetr_options_are_checked():
    with pytest.raises(ConfigError, match="multiple of 12"):
        build_unet(UnetConfig(arch="swinunetr", options={"feature_size": 16}))
    with pytest.raises(ConfigError, match="unknown swinunetr option"):
        build_unet(UnetConfig(arch="swinunetr", options={"img_size": 128}))
    with pytest.raises(ConfigError, match="contradicts"):
        build_unet(UnetConfig(arch="swinunetr", options={"encoder": "sam (x.pth)"}))


def test_training_config_asks_swinunetr_patches_in_multiples_of_32():
    model = {"arch": "swinunetr", "options": {"feature_size": 12}}
    assert UnetTrainConfig.from_mapping({"model": model, "patch_size": 64}).patch_size == 64
    with pytest.raises(ConfigError, match="multiple of 32"):
        UnetTrainConfig.from_mapping({"model": model, "patch_size": 48})


# -- sam: loading a local checkpoint ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["full", "encoder_only"])
def test_sam_encoder_weights_come_from_the_checkpoint(sam_files, tiny_vit, kind):
    net = build_unet(sam_cfg(sam_files[kind], tiny_vit))
    assert isinstance(net, SamSegNet)
    own = net.encoder.state_dict()
    saved = sam_files["state"]
    assert set(own) == set(saved)
    for k, v in saved.items():
        assert torch.equal(own[k], v), k
    # a fresh encoder would differ: the comparison can fail
    with checkpoint_init(False):
        fresh = build_unet(sam_cfg(sam_files[kind], tiny_vit)).encoder.state_dict()
    assert not torch.equal(fresh["pos_embed"], saved["pos_embed"])
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_full_sam_dict_keeps_only_the_image_encoder(sam_files):
    state = read_encoder_state(sam_files["full"])
    assert set(state) == set(sam_files["state"])
    assert not any(k.startswith(("image_encoder.", "mask_decoder.")) for k in state)


def test_sam_gives_3_class_logits_at_any_tile_size(sam_files, tiny_vit):
    cfg = sam_cfg(sam_files["full"], tiny_vit)
    net = build_unet(cfg)
    assert model_in_channels(net) == 3 and cfg.size_multiple == 1
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)  # native: no resampling
    assert net(torch.rand(1, 3, 40, 56)).shape == (1, 3, 40, 56)  # resized in and out


def test_sam_at_a_smaller_input_size_resamples_position_embeddings(sam_files, tiny_vit):
    net = build_unet(sam_cfg(sam_files["full"], tiny_vit, input_size=32))
    enc, saved = net.encoder, sam_files["state"]
    assert enc.pos_embed.shape == (1, 4, 4, 32)  # 8x8 tokens -> 4x4
    pooled = torch.nn.functional.avg_pool2d(saved["pos_embed"].permute(0, 3, 1, 2), 2)
    # bilinear halving of a grid is the mean of each 2x2 block
    assert torch.allclose(enc.pos_embed.permute(0, 3, 1, 2), pooled, atol=1e-6)
    assert enc.blocks[1].attn.rel_pos_h.shape == (7, 16)  # global block: 2*4-1 positions
    assert torch.equal(enc.blocks[0].attn.rel_pos_h, saved["blocks.0.attn.rel_pos_h"])  # window
    assert torch.equal(enc.blocks[1].attn.qkv.weight, saved["blocks.1.attn.qkv.weight"])
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_frozen_encoder_gets_no_gradients(sam_files, tiny_vit):
    net = build_unet(sam_cfg(sam_files["full"], tiny_vit, freeze_encoder=True))
    net(torch.rand(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in net.encoder.parameters())
    decoder = [p for n, p in net.named_parameters() if not n.startswith("encoder.")]
    assert decoder and all(p.grad is not None for p in decoder)


def test_missing_checkpoint_is_a_clear_error_naming_the_file(tmp_path, tiny_vit):
    path = tmp_path / "nowhere" / "sam_vit_b.pth"
    with pytest.raises(MissingFileError, match=r"sam_vit_b\.pth"):
        build_unet(sam_cfg(path, tiny_vit))
    with checkpoint_init(False):  # rebuilding a trained model does not read it
        assert isinstance(build_unet(sam_cfg(path, tiny_vit)), SamSegNet)


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path, sam_files, tiny_vit, make_encoder):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(DataFormatError, match=r"notes\.pth"):
        build_unet(sam_cfg(text, tiny_vit))
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 3}, nested)
    with pytest.raises(DataFormatError, match="state dict"):
        build_unet(sam_cfg(nested, tiny_vit))
    wider = tmp_path / "wider.pth"  # another encoder size than the config says
    torch.save(make_encoder(embed_dim=48).state_dict(), wider)
    with pytest.raises(DataFormatError, match=r"wider\.pth"):
        build_unet(sam_cfg(wider, tiny_vit))
    deeper = tmp_path / "deeper.pth"
    torch.save(make_encoder(depth=3, global_attn_indexes=[2]).state_dict(), deeper)
    with pytest.raises(DataFormatError, match="unexpected"):
        build_unet(sam_cfg(deeper, tiny_vit))


def test_sam_options_are_checked(sam_files, tiny_vit):
    with pytest.raises(ConfigError, match=r"needs options\.checkpoint"):
        build_unet(UnetConfig(arch="sam", options={"vit": tiny_vit}))
    with pytest.raises(ConfigError, match="in_channels must be 3"):
        build_unet(
            UnetConfig(arch="sam", in_channels=1, options={"checkpoint": "x", "vit": tiny_vit})
        )
    with pytest.raises(ConfigError, match="model_type"):
        build_unet(sam_cfg(sam_files["full"], tiny_vit, model_type="vit_xl"))
    with pytest.raises(ConfigError, match="unknown sam vit key"):
        build_unet(sam_cfg(sam_files["full"], {**tiny_vit, "depht": 2}))
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        build_unet(sam_cfg(sam_files["full"], tiny_vit, input_size=36))


@pytest.mark.parametrize("model_type", sorted(SAM_TYPES))
def test_published_sam_sizes_match_segment_anything(model_type):
    """Our vit_b/l/h dims build the very encoder segment_anything's registry builds (on the
    meta device: shapes only, no memory, no weights)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        theirs = sam_model_registry[model_type]().image_encoder.state_dict()
        cfg = UnetConfig(arch="sam", options={"checkpoint": "sam.pth", "model_type": model_type})
        with checkpoint_init(False):
            ours = build_unet(cfg).encoder.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert vit_dims({"model_type": model_type})["img_size"] == 1024


def test_encoder_name_says_which_encoder_runs(tiny_vit):
    assert encoder_name(UnetConfig(arch="swinunetr")) == "swinunetr"
    cfg = UnetConfig(arch="sam", options={"checkpoint": "/ckpt/sam_vit_b_01ec64.pth"})
    assert encoder_name(cfg) == "sam (sam_vit_b_01ec64.pth)"


def test_a_saved_sam_model_loads_without_its_sam_checkpoint(tmp_path, sam_files, tiny_vit):
    ckpt = tmp_path / "sam_copy.pth"
    ckpt.write_bytes(sam_files["encoder_only"].read_bytes())
    cfg = sam_cfg(ckpt, tiny_vit)
    net = build_unet(cfg)
    with torch.no_grad():
        net.head.conv.conv.weight.add_(1.0)  # "trained": differs from any fresh build
    save_unet(net, tmp_path / "best.pt", cfg)
    ckpt.unlink()
    loaded, loaded_cfg, _ = load_sac_network(tmp_path / "best.pt")
    assert loaded_cfg == cfg
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(MissingFileError, match=r"sam_copy\.pth"):
        load_unet(tmp_path / "best.pt")  # the generic loader initialises from it first
