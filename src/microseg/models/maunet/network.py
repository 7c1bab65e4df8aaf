"""MAUNet's network: one ResNet encoder, two U-Net decoders (3-class map and distance).

After the NeurIPS 2022 Cell Segmentation challenge entry (MAUNet): a shared residual encoder
feeds two decoders of the same shape. One predicts the background / interior / boundary logits
that the ``unet`` family learns (same targets, same losses); the other regresses each nucleus'
distance transform normalised to 1 at its centre (falling towards its edge, 0 outside), whose
peaks make better watershed seeds between touching nuclei than a thresholded interior.

Built from MONAI: the encoder is :class:`monai.networks.nets.resnet.ResNet` in 2D with the
stage layout of the named backbone (``resnet10``/``18``/``34`` basic blocks, ``resnet50``...
bottlenecks; MONAI's ``resnet_params``) and our own stage widths (``features``, small for a CPU
demo; never pretrained weights). Every stage downsamples with a 1x1 convolution shortcut
(type "B"): MONAI's zero-padding shortcut "A" (its resnet18/34 default) concatenates
``tensor.data``, which would stop gradients along the identity path. Its five feature maps (at
1/2 .. 1/32 resolution) feed two :class:`monai.networks.nets.flexible_unet.UNetDecoder` (the
decoder of MONAI's ``FlexibleUNet``) with a ``SegmentationHead`` each. Inputs must be a multiple
of 32 pixels (the sliding-window inferer pads to its window).

Ensembles (the challenge's ``maunet_ensemble``): ``backbones: [resnet18, resnet34]`` builds one
such network per backbone inside one :class:`Maunet`; training sums their losses and
:meth:`Maunet.forward` averages their softmax and distance outputs.

:meth:`Maunet.forward` returns *probabilities* ``(B, 4, H, W)``: softmax of the 3 classes and
the distance channel clipped to [0, 1], averaged over members; :meth:`Maunet.raw` gives each
member's raw outputs for the losses. The distance is regressed linearly, not through a sigmoid:
with a sigmoid, the 97 % background pixels (target 0) keep pushing the logits towards minus
infinity, and on DSB 2018 the distance head collapsed within 500 steps (its output never
exceeded 0.5, so no seed survived ``t_seed = 0.5``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from monai.networks.nets.resnet import ResNet, resnet_params
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.utils.atomic import write_torch
from microseg.utils.fields import known_fields
from microseg.utils.torchfiles import read_torch

MODEL_FORMAT = "microseg.maunet/1"
#: the backbones MONAI's ResNet knows (layer counts and block type per name)
BACKBONES: tuple[str, ...] = tuple(resnet_params)
N_CLASSES = 3
#: input height and width must be multiples of this (stem stride 2, max-pool, 3 strided stages)
SIZE_MULTIPLE = 32
NORM = ("batch", {"eps": 1e-3, "momentum": 0.1})  # FlexibleUNet's decoder norm
ACT = ("relu", {"inplace": True})


@dataclass(frozen=True)
class MaunetConfig:
    """Which network to build. ``backbones`` (two or more names) makes an ensemble and then
    replaces ``backbone``. Defaults: resnet18 layout with stage widths 16..128 and decoder
    widths 64..8, sized for training on one CPU thread."""

    backbone: str = "resnet18"
    backbones: tuple[str, ...] = ()
    #: ResNet stage widths (the stem has ``features[0]``); bottlenecks output 4x these
    features: tuple[int, int, int, int] = (16, 32, 64, 128)
    #: decoder widths from the deepest level to full resolution (5 levels)
    decoder_channels: tuple[int, int, int, int, int] = (64, 32, 16, 16, 8)
    in_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("backbones", "features", "decoder_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "decoder_channels", tuple(int(f) for f in self.decoder_channels))
        bad = [b for b in self.members if b not in BACKBONES]
        if bad:
            raise ConfigError(f"maunet backbone(s) {bad} unknown; known {list(BACKBONES)}")
        if len(self.features) != 4 or min(self.features) < 1:
            raise ConfigError(f"maunet features must be 4 positive widths; found {self.features}")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ConfigError(
                f"maunet decoder_channels must be 5 positive widths; found {self.decoder_channels}"
            )
        if self.in_channels not in (1, 3):
            raise ConfigError(f"maunet in_channels must be 1 or 3; found {self.in_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"maunet dropout must be in [0, 1); found {self.dropout}")

    @property
    def members(self) -> tuple[str, ...]:
        """The backbone of every network (one, or the ensemble's)."""
        return self.backbones or (self.backbone,)

    @property
    def size_multiple(self) -> int:
        return SIZE_MULTIPLE

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaunetConfig:
        return cls(**known_fields(cls, values, "maunet model"))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ResNetEncoder2d(nn.Module):
    """MONAI's 2D ResNet cut into its five feature maps (1/2, 1/4, 1/8, 1/16, 1/32)."""

    def __init__(self, backbone: str, features: Sequence[int], in_channels: int) -> None:
        super().__init__()
        block, layers, *_ = resnet_params[backbone]
        self.resnet = ResNet(
            block=block,
            layers=layers,
            block_inplanes=list(features),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        expansion = 4 if block == "bottleneck" else 1
        #: channels of the five feature maps
        self.channels = (features[0], *(f * expansion for f in features))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet
        stem = r.act(r.bn1(r.conv1(x)))
        out = [stem]
        x = r.maxpool(stem)
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
            out.append(x)
        return out


def _decoder(encoder_channels: Sequence[int], cfg: MaunetConfig) -> UNetDecoder:
    return UNetDecoder(
        spatial_dims=2,
        encoder_channels=encoder_channels,
        decoder_channels=cfg.decoder_channels,
        act=ACT,
        norm=NORM,
        dropout=cfg.dropout,
        bias=False,
        upsample="nontrainable",
        pre_conv="default",
        interp_mode="nearest",
        align_corners=None,
        is_pad=True,
    )


class DualDecoderUNet(nn.Module):
    """One encoder, a 3-class decoder and a distance decoder: logits ``(B, 4, H, W)``
    (channels 0..2 the classes, 3 the distance, unbounded)."""

    def __init__(self, backbone: str, cfg: MaunetConfig) -> None:
        super().__init__()
        self.encoder = ResNetEncoder2d(backbone, cfg.features, cfg.in_channels)
        channels = (cfg.in_channels, *self.encoder.channels)
        self.seg_decoder = _decoder(channels, cfg)
        self.dist_decoder = _decoder(channels, cfg)
        width = cfg.decoder_channels[-1]
        self.seg_head = SegmentationHead(2, width, N_CLASSES, kernel_size=3)
        self.dist_head = SegmentationHead(2, width, 1, kernel_size=3)
        self.skips = len(channels) - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        seg = self.seg_head(self.seg_decoder(feats, self.skips))
        dist = self.dist_head(self.dist_decoder(feats, self.skips))
        return torch.cat([seg, dist], dim=1)


def activate(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 4, H, W)`` raw outputs -> softmax of the classes and the distance in [0, 1]."""
    return torch.cat(
        [torch.softmax(logits[:, :N_CLASSES], dim=1), logits[:, N_CLASSES:].clamp(0.0, 1.0)], dim=1
    )


class Maunet(nn.Module):
    """One dual-decoder network per backbone; outputs averaged probabilities."""

    def __init__(self, cfg: MaunetConfig) -> None:
        super().__init__()
        self.members = nn.ModuleList(DualDecoderUNet(b, cfg) for b in cfg.members)

    def raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits ``(B, 4, H, W)`` (what the losses read)."""
        return [m(x) for m in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 4, H, W)``: class softmax and distance, averaged over the members."""
        probs = [activate(out) for out in self.raw(x)]
        return torch.stack(probs).mean(dim=0) if len(probs) > 1 else probs[0]


def build_maunet(cfg: MaunetConfig | None = None) -> Maunet:
    """A fresh (randomly initialised) network for ``cfg``."""
    return Maunet(cfg or MaunetConfig())


# -- save / load ------------------------------------------------------------------------------
def save_maunet(
    model: Maunet,
    path: str | Path,
    cfg: MaunetConfig,
    post: PostprocessConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Weights + model config (+ post-processing) in one file, written atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "model_config": cfg.as_dict(),
        "post": asdict(post or PostprocessConfig()),
        "model": model.state_dict(),
        **dict(extra or {}),
    }
    write_torch(path, payload)
    return Path(path)


def load_maunet(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Maunet, MaunetConfig, PostprocessConfig]:
    """A network (eval mode), its config and post-processing from :func:`save_maunet`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a maunet model file (.pt), found nothing", path)
    ckpt = read_torch(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT or "model" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataFormatError(f"expected a {MODEL_FORMAT} file; found {found!r}", path)
    cfg = MaunetConfig.from_mapping(ckpt["model_config"])
    post = PostprocessConfig.from_mapping(ckpt.get("post") or {})
    model = build_maunet(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, post
