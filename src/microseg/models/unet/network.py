"""The "unet" family: MONAI 2D U-Nets predicting background / interior / boundary, + watershed.

Architectures (``UnetConfig.arch``), all 2D with ``out_channels=3`` logits:

* ``"basic"`` -- :class:`monai.networks.nets.BasicUNet` (4 poolings; ``features`` gives the 5
  encoder widths, the last decoder width is ``features[0]``).
* ``"unet"`` -- :class:`monai.networks.nets.UNet` (strided convs, ``num_res_units`` residual
  units per level).
* ``"dynunet"`` -- :class:`monai.networks.nets.DynUNet`, nnU-Net style for 2D: 3x3 kernels
  everywhere, stride 1 at the first level and 2 after, transposed-conv upsampling.
* ``"attention"`` -- :class:`monai.networks.nets.AttentionUnet` (attention-gated skips).

``features`` are the widths per resolution level; inputs must be a multiple of
``2 ** (len(features) - 1)`` pixels (the sliding-window inferer guarantees it).

Other families plug their own 3-class networks into this family's training, inference and
post-processing by registering an architecture builder (:data:`UNET_ARCHS`,
``@register_arch("name")``, listed lazily below): ``sac`` adds transformer encoders, ``nnunet``
drives ``dynunet`` with planned kernels and strides. Architecture-specific settings travel in
``UnetConfig.options`` (saved with the weights, so a file rebuilds its own network).

Channel convention: ``in_channels=3`` by default. Greyscale images (fluorescence, brightfield)
are repeated to R = G = B, colour (H&E tissue) stays colour; with ``in_channels=1`` colour is
averaged to grey (:func:`microseg.data.targets.match_channels`). Images are percentile
normalised per channel (1..99 % -> [0, 1]) before the network sees them.

Post-processing (:func:`microseg.infer.watershed.probs_to_instances`) turns the softmax into
instances by a seeded watershed; its thresholds are saved with the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, UNet
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.utils.atomic import write_torch
from microseg.utils.fields import known_fields
from microseg.utils.registry import Registry
from microseg.utils.torchfiles import read_torch

log = logging.getLogger(__name__)

Arch = str
#: the architectures built here (others are registered by their families, see UNET_ARCHS)
ARCHS: tuple[str, ...] = ("basic", "unet", "dynunet", "attention")
MODEL_FORMAT = "microseg.unet/1"

#: arch name -> ``builder(cfg) -> nn.Module`` (3-class logits, ``cfg.in_channels`` inputs). A
#: builder may carry ``size_multiple(cfg) -> int`` when its input constraint is not
#: ``2 ** (levels - 1)``.
UNET_ARCHS: Registry[Callable[..., nn.Module]] = Registry(
    "unet arch",
    lazy={"swinunetr": "microseg.models.sac.network", "sam": "microseg.models.sac.network"},
)


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a network builder available as ``UnetConfig(arch=name)``."""
    return UNET_ARCHS.register(name)


@dataclass(frozen=True)
class UnetConfig:
    """Which network to build (see the module docstring for the architectures).

    Default: MONAI ``UNet`` with widths 16..256 and one residual unit per level, the fastest
    of the four on CPU (about 4x fewer seconds per step than ``BasicUNet`` of the same widths,
    with the same val F1@0.5 on DSB 2018 after equal wall time).
    """

    arch: Arch = "unet"
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    in_channels: int = 3
    out_channels: int = 3
    dropout: float = 0.0
    num_res_units: int = 1  # "unet" only
    #: architecture-specific settings for its builder (e.g. dynunet kernels/strides)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "options", dict(self.options or {}))
        if self.arch not in UNET_ARCHS:
            raise ConfigError(f"unet arch must be one of {UNET_ARCHS.names()}; found {self.arch!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"unet in_channels must be 1 or 3; found {self.in_channels}")
        if self.arch == "basic" and len(self.features) not in (5, 6):
            raise ConfigError(
                f"arch 'basic' takes 5 encoder widths (or MONAI's 6); found {self.features}"
            )
        if len(self.features) < 2 or min(self.features) < 1:
            raise ConfigError(f"unet features must be >= 2 positive widths; found {self.features}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"unet dropout must be in [0, 1); found {self.dropout}")

    @property
    def levels(self) -> int:
        return 5 if self.arch == "basic" else len(self.features)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        custom = getattr(UNET_ARCHS.get(self.arch), "size_multiple", None)
        if custom is not None:
            return int(custom(self))
        return 2 ** (self.levels - 1)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UnetConfig:
        return cls(**known_fields(cls, values, "unet model"))

    def as_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["options"] = dict(self.options)
        return out


def build_unet(cfg: UnetConfig | None = None) -> nn.Module:
    """A fresh (randomly initialised) network for ``cfg`` from its registered builder."""
    cfg = cfg or UnetConfig()
    return UNET_ARCHS.get(cfg.arch)(cfg)


def _common(cfg: UnetConfig) -> dict[str, Any]:
    return {"spatial_dims": 2, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels}


def _no_options(cfg: UnetConfig) -> None:
    if cfg.options:
        raise ConfigError(f"unet arch {cfg.arch!r} takes no options; found {dict(cfg.options)}")


@register_arch("basic")
def _basic(cfg: UnetConfig) -> nn.Module:
    _no_options(cfg)
    f = cfg.features
    feats = f if len(f) == 6 else (*f, f[0])
    return BasicUNet(**_common(cfg), features=feats, dropout=cfg.dropout)


@register_arch("unet")
def _monai_unet(cfg: UnetConfig) -> nn.Module:
    _no_options(cfg)
    f = cfg.features
    return UNet(
        **_common(cfg),
        channels=f,
        strides=(2,) * (len(f) - 1),
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
    )


DYNUNET_OPTIONS = ("kernel_size", "strides", "res_block")


@register_arch("dynunet")
def _dynunet(cfg: UnetConfig) -> nn.Module:
    """nnU-Net's network; ``options`` may set ``kernel_size``/``strides`` per level (a plan)."""
    unknown = set(cfg.options) - set(DYNUNET_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown dynunet option(s) {sorted(unknown)}; known {DYNUNET_OPTIONS}")
    n = len(cfg.features)
    kernels = [list(k) for k in cfg.options.get("kernel_size", [[3, 3]] * n)]
    strides = [list(s) for s in cfg.options.get("strides", [[1, 1]] + [[2, 2]] * (n - 1))]
    if len(kernels) != n or len(strides) != n:
        raise ConfigError(
            f"dynunet needs one kernel and one stride per level ({n}); found "
            f"{len(kernels)} kernels, {len(strides)} strides"
        )
    return DynUNet(
        **_common(cfg),
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=cfg.features,
        dropout=cfg.dropout or None,
        res_block=bool(cfg.options.get("res_block", False)),
        deep_supervision=False,
    )


def _dynunet_multiple(cfg: UnetConfig) -> int:
    n = len(cfg.features)
    strides = cfg.options.get("strides", [[1, 1]] + [[2, 2]] * (n - 1))
    out = 1
    for s in strides:
        out *= int(max(s))
    return out


_dynunet.size_multiple = _dynunet_multiple  # type: ignore[attr-defined]


@register_arch("attention")
def _attention(cfg: UnetConfig) -> nn.Module:
    _no_options(cfg)
    f = cfg.features
    return AttentionUnet(
        **_common(cfg), channels=f, strides=(2,) * (len(f) - 1), dropout=cfg.dropout
    )


def model_in_channels(model: nn.Module) -> int:
    """Input channels of a network: those of its first convolution."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            return int(m.in_channels)
    raise ConfigError(f"{type(model).__name__} has no 2D convolution to read in_channels from")


# -- save / load ------------------------------------------------------------------------------
def save_unet(
    model: nn.Module,
    path: str | Path,
    cfg: UnetConfig,
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


def load_unet(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, UnetConfig, PostprocessConfig]:
    """A network (eval mode) from :func:`save_unet` or a training checkpoint (best/last.pt)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a unet model file (.pt), found nothing", path)
    ckpt = read_torch(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise DataFormatError(f"expected a {MODEL_FORMAT} file with model_config/model", path)
    cfg = UnetConfig.from_mapping(ckpt["model_config"])
    post = PostprocessConfig.from_mapping(ckpt.get("post") or {})
    model = build_unet(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, post
