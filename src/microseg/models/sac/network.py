"""Transformer-encoder networks for the unet family's machinery: ``swinunetr`` and ``sam``.

Both are registered in :data:`microseg.models.unet.network.UNET_ARCHS`, so the U-Net family's
training (3-class targets, weight maps, losses), sliding-window inference and watershed
post-processing run them unchanged; ``UnetConfig.options`` carries their settings and is saved
with the weights, so a model file rebuilds its own network.

* ``swinunetr`` (the ``sac`` default) -- :class:`monai.networks.nets.SwinUNETR` in 2D, trained
  from scratch. Options: ``feature_size`` (a multiple of 12; 12 by default, small for the
  CPU), ``depths``, ``num_heads``, ``window_size``, ``dropout_path_rate``, ``use_v2``,
  ``use_checkpoint``. ``features``/``num_res_units`` are not used. Inputs must be multiples
  of 32 pixels (``patch_size ** 5`` of its 2-pixel patch embedding), which
  ``size_multiple`` tells the training config, and at least 64 (its 1/32 bottleneck is
  instance-normalised), in training and as the sliding window.
* ``sam`` -- the image encoder of Segment Anything (``segment_anything.modeling.
  ImageEncoderViT``), its weights read from a LOCAL checkpoint file (``checkpoint``; a full
  SAM state dict with ``image_encoder.`` keys or an encoder-only one; nothing is downloaded),
  followed by a light decoder (transposed-conv upsampling by 2 per stage back to the input
  resolution, widths ``features`` finest first, plus a full-resolution convolution of the
  image as the last skip) to 3-class logits. Options: ``checkpoint`` (required),
  ``model_type`` (``vit_b`` | ``vit_l`` | ``vit_h``, SAM's published sizes) or ``vit``
  (explicit dims: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
  ``global_attn_indexes``, ``window_size``, ``out_chans``, ``use_rel_pos``, ``mlp_ratio``),
  ``input_size`` (the side the encoder runs at; default the checkpoint's ``img_size``; a
  smaller one resamples the absolute and global relative position embeddings once, at
  load, as SAM adaptations to medical images do) and ``freeze_encoder``.

Input size of ``sam``: the encoder's position embedding fixes the side it sees
(``input_size``). The module resizes every tile (bilinear) to ``input_size`` and its logits
back to the tile's size, so any ``patch_size``/sliding-window ``roi`` works
(``size_multiple`` is 1); the cheapest and most faithful setting is
``patch_size == input_size`` (no resampling at all), e.g. 256 with ``input_size: 256``.
Tiles are percentile normalised to about [0, 1] by the family; the module maps them to SAM's
pixel statistics (``x * 255``, ImageNet mean/std) before the encoder, so pretrained weights
see the input range they were trained on. SAM is an RGB model: ``in_channels`` must be 3.

The SAM checkpoint initialises a *fresh* network only: :func:`load_sac_network` (what the
``sac`` façade loads ``best.pt`` with) builds the architecture without reading it, since the
trained weights replace it anyway, so evaluating needs no SAM file. Elsewhere (a plain
:func:`~microseg.models.unet.network.load_unet` of a ``sam`` model file) the checkpoint is read
first and then overwritten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.nets import SwinUNETR
from monai.utils import optional_import
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models.unet.network import UnetConfig, load_unet, register_arch

log = logging.getLogger(__name__)

#: the architectures of the ``sac`` family (registered in the unet family's UNET_ARCHS)
SAC_ARCHS: tuple[str, ...] = ("swinunetr", "sam")
#: option of either arch that records which encoder ran (set by the ``sac`` façade)
ENCODER_KEY = "encoder"

SWIN_OPTIONS = (
    "feature_size",
    "depths",
    "num_heads",
    "window_size",
    "dropout_path_rate",
    "use_v2",
    "use_checkpoint",
    ENCODER_KEY,
)
SAM_OPTIONS = ("checkpoint", "model_type", "vit", "input_size", "freeze_encoder", ENCODER_KEY)

#: SAM's published image encoders (segment_anything/build_sam.py): all 1024 px, 16 px patches
SAM_TYPES: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        "global_attn_indexes": (7, 15, 23, 31),
    },
}
SAM_COMMON: dict[str, Any] = {
    "img_size": 1024,
    "patch_size": 16,
    "window_size": 14,
    "out_chans": 256,
    "use_rel_pos": True,
    "mlp_ratio": 4.0,
}
VIT_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "global_attn_indexes",
    "window_size",
    "out_chans",
    "use_rel_pos",
    "mlp_ratio",
)
#: SAM's pixel statistics (0..255 RGB), segment_anything/build_sam.py
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

#: False while a trained model file is rebuilt: its own weights replace the SAM checkpoint's
_INIT_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("sac_init_from_checkpoint", default=True)


@contextmanager
def checkpoint_init(enabled: bool) -> Iterator[None]:
    """Build ``sam`` networks with (default) or without reading their SAM checkpoint."""
    token = _INIT_FROM_CHECKPOINT.set(enabled)
    try:
        yield
    finally:
        _INIT_FROM_CHECKPOINT.reset(token)


def encoder_name(cfg: UnetConfig) -> str:
    """Which encoder a config runs: ``swinunetr`` or ``sam (<checkpoint file name>)``."""
    if cfg.arch == "sam":
        checkpoint = cfg.options.get("checkpoint")
        return f"sam ({Path(str(checkpoint)).name})" if checkpoint else "sam (no checkpoint)"
    return cfg.arch


def _check_options(cfg: UnetConfig, known: tuple[str, ...]) -> None:
    unknown = set(cfg.options) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cfg.arch} option(s) {sorted(unknown)}; known {list(known)}")
    recorded = cfg.options.get(ENCODER_KEY)
    if recorded is not None and recorded != encoder_name(cfg):
        raise ConfigError(
            f"{cfg.arch} option {ENCODER_KEY}={recorded!r} contradicts the config, which runs "
            f"{encoder_name(cfg)!r}"
        )


# -- swinunetr --------------------------------------------------------------------------------
class SwinUNETR2d(SwinUNETR):
    """MONAI's SwinUNETR, refusing tiles its bottleneck cannot instance-normalise."""

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if min(x_in.shape[-2:]) < 64:
            raise ConfigError(
                f"swinunetr runs on tiles of at least 64 px (its 1/32 bottleneck is "
                f"instance-normalised); found {tuple(x_in.shape[-2:])}: raise patch_size/roi"
            )
        return super().forward(x_in)


@register_arch("swinunetr")
def build_swinunetr(cfg: UnetConfig) -> nn.Module:
    """MONAI's SwinUNETR in 2D, from scratch (no ``img_size``: removed from MONAI 1.5)."""
    _check_options(cfg, SWIN_OPTIONS)
    if not optional_import("einops")[1]:  # MONAI's SwinUNETR fails at its first forward without
        raise ConfigError("arch 'swinunetr' needs the einops package (MONAI's SwinUNETR uses it)")
    o = cfg.options
    feature_size = int(o.get("feature_size", 12))
    if feature_size < 12 or feature_size % 12:
        raise ConfigError(f"swinunetr feature_size must be a multiple of 12; found {feature_size}")
    depths = tuple(int(d) for d in o.get("depths", (2, 2, 2, 2)))
    heads = tuple(int(h) for h in o.get("num_heads", (3, 6, 12, 24)))
    if len(depths) != 4 or len(heads) != 4:
        raise ConfigError(
            f"swinunetr takes 4 stage depths and 4 head counts; found {depths}, {heads}"
        )
    return SwinUNETR2d(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        spatial_dims=2,
        feature_size=feature_size,
        depths=depths,
        num_heads=heads,
        window_size=int(o.get("window_size", 7)),
        drop_rate=cfg.dropout,
        dropout_path_rate=float(o.get("dropout_path_rate", 0.0)),
        use_v2=bool(o.get("use_v2", False)),
        use_checkpoint=bool(o.get("use_checkpoint", False)),
        norm_name="instance",
    )


#: 2 ** 5: SwinUNETR's 2-pixel patch embedding followed by 4 patch mergings
build_swinunetr.size_multiple = lambda cfg: 32  # type: ignore[attr-defined]


# -- sam --------------------------------------------------------------------------------------
def vit_dims(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ImageEncoderViT arguments of ``options`` (``model_type`` and/or explicit ``vit``)."""
    model_type = options.get("model_type", "vit_b" if "vit" not in options else None)
    if model_type is not None and model_type not in SAM_TYPES:
        raise ConfigError(
            f"sam model_type must be one of {sorted(SAM_TYPES)}; found {model_type!r}"
        )
    dims = {**SAM_COMMON, **(SAM_TYPES[model_type] if model_type else {})}
    explicit = dict(options.get("vit") or {})
    unknown = set(explicit) - set(VIT_KEYS)
    if unknown:
        raise ConfigError(f"unknown sam vit key(s) {sorted(unknown)}; known {list(VIT_KEYS)}")
    dims.update(explicit)
    missing = [k for k in VIT_KEYS if k not in dims]
    if missing:
        raise ConfigError(f"sam vit dims missing {missing} (give model_type or all of vit)")
    dims["global_attn_indexes"] = tuple(int(i) for i in dims["global_attn_indexes"])
    if dims["img_size"] % dims["patch_size"]:
        raise ConfigError(f"sam img_size {dims['img_size']} is not a multiple of its patch size")
    return dims


def _image_encoder_class() -> type[nn.Module]:
    try:
        from segment_anything.modeling import ImageEncoderViT
    except ImportError as exc:  # optional dependency: only the sam arch needs it
        raise ConfigError(
            "arch 'sam' needs the segment-anything package (code only; its weights are a "
            "local file given as options.checkpoint)"
        ) from exc
    return ImageEncoderViT


def build_image_encoder(dims: Mapping[str, Any], img_size: int | None = None) -> nn.Module:
    """SAM's ViT image encoder with ``dims``, running at ``img_size`` (default its own)."""
    encoder_cls = _image_encoder_class()
    return encoder_cls(
        img_size=int(img_size or dims["img_size"]),
        patch_size=int(dims["patch_size"]),
        in_chans=3,
        embed_dim=int(dims["embed_dim"]),
        depth=int(dims["depth"]),
        num_heads=int(dims["num_heads"]),
        mlp_ratio=float(dims["mlp_ratio"]),
        out_chans=int(dims["out_chans"]),
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=bool(dims["use_rel_pos"]),
        window_size=int(dims["window_size"]),
        global_attn_indexes=dims["global_attn_indexes"],
    )


def read_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The image-encoder weights of a local SAM file: a full SAM state dict (keys prefixed
    ``image_encoder.``; prompt encoder and mask decoder dropped) or an encoder-only one."""
    path = Path(path)
    if not path.is_file():
        msg = "expected a local SAM checkpoint (a state dict .pth), found nothing"
        raise MissingFileError(msg, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"not a readable torch state dict ({type(exc).__name__}: {exc})"
        raise DataFormatError(msg, path) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DataFormatError("expected a SAM state dict (parameter name -> tensor)", path)
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise DataFormatError("the SAM state dict is empty", path)
    return dict(state)


def _resample(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A position embedding resampled to ``shape`` (absolute: bilinear over the token grid;
    relative ``(2S-1, C)`` tables: linear, as SAM's own ``get_rel_pos`` does at run time)."""
    if name.endswith("pos_embed") and value.ndim == 4 and value.shape[-1] == shape[-1]:
        grid = value.permute(0, 3, 1, 2).float()
        out = F.interpolate(grid, size=tuple(shape[1:3]), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1).to(value.dtype)
    if name.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == shape[1]:
        out = F.interpolate(value.T[None].float(), size=int(shape[0]), mode="linear")
        return out[0].T.to(value.dtype)
    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, network {tuple(shape)}")


def load_encoder_weights(encoder: nn.Module, path: str | Path, what: str = "sam") -> None:
    """Copy a SAM checkpoint's encoder weights into ``encoder`` (position embeddings resampled
    when it runs at another input size); any other mismatch is a clear error naming the file."""
    state = read_encoder_state(path)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataFormatError(
            f"not an image encoder of {what}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]} (model_type/vit dims wrong?)",
            path,
        )
    try:
        state = {
            k: v if v.shape == own[k].shape else _resample(k, v, own[k].shape)
            for k, v in state.items()
        }
    except ValueError as exc:
        raise DataFormatError(f"image encoder of {what} does not fit: {exc}", path) from exc
    encoder.load_state_dict(state)


class SamSegNet(nn.Module):
    """SAM's image encoder + a light upsampling decoder -> ``out_channels`` logits per pixel."""

    def __init__(
        self,
        encoder: nn.Module,
        input_size: int,
        patch_size: int,
        features: tuple[int, ...],
        out_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_up = round(math.log2(patch_size))
        if 2**n_up != patch_size or n_up < 1:
            raise ConfigError(f"sam decoder needs a power-of-2 patch size; found {patch_size}")
        self.encoder = encoder  # registered first: its patch embedding is the first convolution
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        widths = [int(features[min(i, len(features) - 1)]) for i in range(n_up)]  # finest first
        drop = dropout or None
        block = partial(UnetBasicBlock, 2, kernel_size=3, stride=1, norm_name="instance")
        self.stem = nn.Sequential(
            block(3, widths[0], dropout=drop), block(widths[0], widths[0], dropout=drop)
        )
        ups: list[nn.Module] = []
        c_in = int(encoder.neck[0].out_channels)
        for w in reversed(widths[1:]):
            up = nn.ConvTranspose2d(c_in, w, kernel_size=2, stride=2)
            ups.append(nn.Sequential(up, block(w, w, dropout=drop)))
            c_in = w
        self.ups = nn.ModuleList(ups)
        self.last = UnetUpBlock(
            2, c_in, widths[0], kernel_size=3, stride=1, upsample_kernel_size=2,
            norm_name="instance", dropout=drop,
        )  # fmt: skip
        self.head = UnetOutBlock(2, widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        s = self.input_size
        if tuple(size) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = (x * 255.0 - self.mean) / self.std
        z = self.encoder(x)
        for up in self.ups:
            z = up(z)
        out = self.head(self.last(z, self.stem(x)))
        if tuple(size) != (s, s):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out


@register_arch("sam")
def build_sam(cfg: UnetConfig) -> nn.Module:
    """SAM's encoder (weights from ``options.checkpoint``) + light decoder, 3-class logits."""
    _check_options(cfg, SAM_OPTIONS)
    o = cfg.options
    if cfg.in_channels != 3:
        raise ConfigError(
            f"arch 'sam' is an RGB encoder: in_channels must be 3; found {cfg.in_channels}"
        )
    checkpoint = o.get("checkpoint")
    if not checkpoint:
        raise ConfigError("arch 'sam' needs options.checkpoint: a local SAM weights file")
    dims = vit_dims(o)
    input_size = int(o.get("input_size", dims["img_size"]))
    if input_size < dims["patch_size"] or input_size % dims["patch_size"]:
        raise ConfigError(
            f"sam input_size {input_size} must be a multiple of the patch size {dims['patch_size']}"
        )
    encoder = build_image_encoder(dims, input_size)
    if _INIT_FROM_CHECKPOINT.get():
        load_encoder_weights(encoder, checkpoint, o.get("model_type") or "the given vit dims")
        log.info("sam encoder initialised from %s", checkpoint)
    if o.get("freeze_encoder", False):
        encoder.requires_grad_(False)
    return SamSegNet(
        encoder, input_size, int(dims["patch_size"]), cfg.features, cfg.out_channels, cfg.dropout
    )


#: SamSegNet resizes every tile to the encoder's input size itself
build_sam.size_multiple = lambda cfg: 1  # type: ignore[attr-defined]


def load_sac_network(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, Any]:
    """:func:`load_unet` of a ``sac`` model file without reading the SAM checkpoint (the
    file's own weights replace it), so a trained model needs only its ``best.pt``."""
    with checkpoint_init(False):
        return load_unet(path, map_location)
