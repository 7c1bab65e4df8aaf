"""Probabilistic U-Net (Kohl et al., 2018) with one latent per head, DeepD3 style.

Spines and dendrites are segmented per plane (2D; 2.5D with ``in_channels=3`` for planes
``z-1, z, z+1``). The network has four parts:

* a deterministic U-Net built from MONAI's ``BasicUNet`` pieces (``TwoConv``, ``Down``,
  ``UpCat``) that turns an image into feature maps, one decoder shared by both heads or one
  per head (``dual_decoder=True``, DeepD3's layout);
* a prior net, image -> one axis-aligned Gaussian per head over that head's latent;
* a posterior net, image + ground-truth masks -> the same Gaussians (training only);
* per head, the latent ``z`` broadcast over the image, concatenated with the features and
  sent through a few 1x1 convolutions to logits.

The U-Net never sees ``z``, so features are computed once per tile and only the cheap heads
run per sample: :meth:`ProbUNet.unet_features` then :meth:`ProbUNet.sample_heads`. Within
a head the first 1x1 convolution is linear in ``[features, z]``, so it is split into a
feature part (run once) and a latent part (a per-sample bias), which makes the sampled path
cost two small matrix products per pixel and sample instead of a U-Net pass.

Differences from the DeepD3.V2 reference (``prob_unet_with_tversky.py``): one prior and one
posterior encoder emit the latents of both heads (the reference runs four encoders), the
U-Net has no extra bottleneck convolution, and the activation is MONAI's leaky ReLU rather
than swish. Temperature divides each sample's logits (``sigmoid(l / T)``); the reference
averages logits first and divides their mean.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from microseg.errors import DataFormatError, MissingFileError
from microseg.utils.atomic import write_torch

log = logging.getLogger(__name__)

#: head names, also the channel order of the ``masks`` tensor the posterior takes
HEADS: tuple[str, str] = ("spine", "dendrite")
MODEL_FORMAT = "microseg.punet.model/1"
#: rows (samples x pixels) per block in the sampled heads: a few MB, cache-sized
_HEAD_BLOCK_ROWS = 24576
#: clamp for log standard deviations of the latent Gaussians (reference: +-10)
LOG_SIGMA_RANGE = (-10.0, 10.0)

Latents = dict[str, Independent]


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (GroupNorm groups)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def _norm(channels: int) -> tuple[str, dict[str, Any]]:
    return ("group", {"num_groups": _groups(channels)})


_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})


class UNetFeatures(nn.Module):
    """Encoder-decoder from MONAI ``BasicUNet`` blocks; returns full-resolution features.

    Input sides must be divisible by ``2 ** (len(filters) - 1)``
    (see :meth:`ProbUNet.pad_multiple`).
    """

    def __init__(self, in_channels: int, filters: Sequence[int], n_decoders: int = 1) -> None:
        super().__init__()
        f = list(filters)
        self.encoder = nn.ModuleList([TwoConv(2, in_channels, f[0], _ACT, _norm(f[0]), True)])
        for i in range(1, len(f)):
            self.encoder.append(Down(2, f[i - 1], f[i], _ACT, _norm(f[i]), True))
        self.decoders = nn.ModuleList()
        for _ in range(n_decoders):
            ups = nn.ModuleList()
            for i in range(len(f) - 1, 0, -1):
                # deconv halves f[i], concatenates the f[i-1] skip, two convs to f[i-1]
                ups.append(UpCat(2, f[i], f[i - 1], f[i - 1], _ACT, _norm(f[i - 1]), True))
            self.decoders.append(ups)
        self.out_channels = f[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        outs = []
        for ups in self.decoders:
            y = skips[-1]
            for up, skip in zip(ups, reversed(skips[:-1]), strict=True):
                y = up(y, skip)
            outs.append(y)
        return outs


class GaussianNet(nn.Module):
    """Image (+ masks) -> one axis-aligned Gaussian per head (prior or posterior net).

    An encoder of MONAI ``TwoConv``/``Down`` blocks, global average pooling, and one linear
    layer to ``(mu, log_sigma)`` of every head's latent.
    """

    def __init__(
        self, in_channels: int, filters: Sequence[int], latent_dims: Mapping[str, int]
    ) -> None:
        super().__init__()
        f = list(filters)
        blocks: list[nn.Module] = [TwoConv(2, in_channels, f[0], _ACT, _norm(f[0]), True)]
        blocks += [Down(2, f[i - 1], f[i], _ACT, _norm(f[i]), True) for i in range(1, len(f))]
        self.encoder = nn.Sequential(*blocks)
        self.latent_dims = dict(latent_dims)
        self.to_params = nn.Linear(f[-1], 2 * sum(self.latent_dims.values()))
        # start near N(0, I) for prior and posterior alike: small KL and stable early steps
        nn.init.normal_(self.to_params.weight, std=1e-3)
        nn.init.zeros_(self.to_params.bias)

    def forward(self, x: torch.Tensor) -> Latents:
        h = self.encoder(x).mean(dim=(2, 3))
        params = self.to_params(h)
        out: Latents = {}
        start = 0
        for name, dim in self.latent_dims.items():
            mu = params[:, start : start + dim]
            log_sigma = params[:, start + dim : start + 2 * dim].clamp(*LOG_SIGMA_RANGE)
            out[name] = Independent(
                Normal(mu, torch.exp(log_sigma), validate_args=False), 1, validate_args=False
            )
            start += 2 * dim
        return out


class LatentHead(nn.Module):
    """Latent ``z`` tiled over the image, concatenated to features, 1x1 convs -> logits."""

    def __init__(self, feature_channels: int, latent_dim: int, hidden: int, n_convs: int) -> None:
        super().__init__()
        if n_convs < 2:
            raise ValueError(f"a latent head needs at least 2 1x1 convolutions, got {n_convs}")
        self.feature_channels, self.latent_dim = feature_channels, latent_dim
        self.first = nn.Conv2d(feature_channels + latent_dim, hidden, kernel_size=1)
        rest: list[nn.Module] = []
        for _ in range(n_convs - 2):
            rest += [nn.Conv2d(hidden, hidden, kernel_size=1), nn.ReLU(inplace=True)]
        rest.append(nn.Conv2d(hidden, 1, kernel_size=1))
        self.rest = nn.Sequential(*rest)

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Naive path: ``(B, C, H, W)`` features and ``(B, L)`` latents -> ``(B, 1, H, W)``."""
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        h = F.relu(self.first(torch.cat([features, tiled], dim=1)))
        return self.rest(h)

    def feature_part(self, features: torch.Tensor) -> torch.Tensor:
        """The first convolution's feature half plus bias, run once per tile."""
        w = self.first.weight[:, : self.feature_channels]
        return F.conv2d(features, w, self.first.bias)

    def from_feature_part(self, pre: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``pre`` ``(B, K, H, W)`` and ``z`` ``(B, S, L)`` -> logits ``(B, S, H, W)``.

        The latent half of the first convolution is a per-sample bias ``z @ W_z.T``. The
        remaining 1x1 convolutions run as matrix products on channels-last blocks of pixels
        small enough to stay in cache: the per-sample work is pure arithmetic, about 7x
        faster on CPU than 1x1 convolutions over ``(B * S, K, H, W)`` tensors.
        """
        b, s = z.shape[:2]
        k, h, w = pre.shape[1:]
        w_z = self.first.weight[:, self.feature_channels :, 0, 0]  # (K, L)
        bias = z @ w_z.T  # (B, S, K)
        pixels = pre.permute(0, 2, 3, 1).reshape(b, h * w, k)  # channels last
        layers = [(m.weight[:, :, 0, 0].T, m.bias) for m in self.rest if isinstance(m, nn.Conv2d)]
        out = pre.new_empty((b, s, h * w))
        block = max(64, _HEAD_BLOCK_ROWS // max(1, s))
        for i in range(b):
            for start in range(0, h * w, block):
                x = torch.relu(pixels[i, start : start + block][None] + bias[i][:, None])
                x = x.reshape(-1, k)
                for j, (weight_t, b_j) in enumerate(layers):
                    x = torch.addmm(b_j, x, weight_t)
                    if j < len(layers) - 1:
                        x = torch.relu_(x)
                out[i, :, start : start + block] = x.reshape(s, -1)
        return out.reshape(b, s, h, w)


@dataclass
class PunetOutput:
    """What :meth:`ProbUNet.forward` returns; logits are ``(B, 1, H, W)``, KL ``(B,)``."""

    logits: dict[str, torch.Tensor]
    prior: Latents
    posterior: Latents | None
    kl: dict[str, torch.Tensor] | None


class ProbUNet(nn.Module):
    """Probabilistic U-Net with separate latents for the spine and the dendrite head.

    Args:
        in_channels: image channels (1 = single plane; 3 = planes z-1, z, z+1).
        filters: channels per U-Net level (DeepD3: ``(32, 64, 128, 192)``).
        latent_dim_spine, latent_dim_dendrite: latent sizes per head (DeepD3.V2: 12 each).
        head_convs: 1x1 convolutions per head, the last one to logits (reference: 4).
        head_hidden: channels inside a head (default ``filters[0]``).
        dual_decoder: one decoder per head as in DeepD3, else one shared decoder.
        latent_filters: channels of the prior/posterior encoders (default ``filters``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        filters: Sequence[int] = (32, 64, 128, 192),
        latent_dim_spine: int = 12,
        latent_dim_dendrite: int = 12,
        head_convs: int = 4,
        head_hidden: int | None = None,
        dual_decoder: bool = True,
        latent_filters: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if len(filters) < 2:
            raise ValueError(f"filters needs at least two levels, got {filters}")
        latent_filters = tuple(int(f) for f in (latent_filters or filters))
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "filters": list(filters),
            "latent_dim_spine": int(latent_dim_spine),
            "latent_dim_dendrite": int(latent_dim_dendrite),
            "head_convs": int(head_convs),
            "head_hidden": int(head_hidden or filters[0]),
            "dual_decoder": bool(dual_decoder),
            "latent_filters": list(latent_filters),
        }
        self.in_channels = int(in_channels)
        self.latent_dims = {"spine": int(latent_dim_spine), "dendrite": int(latent_dim_dendrite)}
        self.unet = UNetFeatures(in_channels, filters, n_decoders=2 if dual_decoder else 1)
        self.prior_net = GaussianNet(in_channels, latent_filters, self.latent_dims)
        self.posterior_net = GaussianNet(in_channels + len(HEADS), latent_filters, self.latent_dims)
        hidden = self.config["head_hidden"]
        self.heads = nn.ModuleDict(
            {
                name: LatentHead(self.unet.out_channels, dim, hidden, head_convs)
                for name, dim in self.latent_dims.items()
            }
        )

    # -- building blocks ------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Image sides must be multiples of this (one halving per extra level)."""
        return 2 ** (len(self.config["filters"]) - 1)

    def unet_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """U-Net feature maps ``(B, C, H, W)`` per head (the same tensor when shared)."""
        outs = self.unet(x)
        return {name: outs[i % len(outs)] for i, name in enumerate(HEADS)}

    def prior(self, x: torch.Tensor) -> Latents:
        """p(z | image): one ``Independent(Normal)`` per head, batch shape ``(B,)``."""
        return self.prior_net(x)

    def posterior(self, x: torch.Tensor, masks: torch.Tensor) -> Latents:
        """q(z | image, masks); ``masks`` is ``(B, 2, H, W)`` in :data:`HEADS` order."""
        return self.posterior_net(torch.cat([x, masks.to(x.dtype)], dim=1))

    def head_logits(
        self, features: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Naive path: concatenate tiled ``z`` ``(B, L)`` to the features -> ``(B, 1, H, W)``."""
        return {name: self.heads[name](features[name], z[name]) for name in HEADS}

    # -- training -------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, *, sample: bool = True
    ) -> PunetOutput:
        """With ``masks``: logits from a posterior sample (``rsample``) and KL(q || p).

        Without: logits from a prior sample, or from the prior mean if ``sample=False``
        (deterministic validation). KL terms are analytic, per batch element, ``(B,)``.
        """
        features = self.unet_features(x)
        prior = self.prior(x)
        posterior = kl = None
        source = prior
        if masks is not None:
            posterior = self.posterior(x, masks)
            source = posterior
            kl = {name: kl_divergence(posterior[name], prior[name]) for name in HEADS}
        z = {name: d.rsample() if sample else d.mean for name, d in source.items()}
        return PunetOutput(self.head_logits(features, z), prior, posterior, kl)

    # -- efficient sampling ---------------------------------------------------------------
    @torch.no_grad()
    def sample_heads(
        self,
        features: Mapping[str, torch.Tensor],
        prior: Latents,
        n_samples: int = 24,
        temperature: float = 1.0,
        *,
        z: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        chunk: int = 8,
    ) -> dict[str, torch.Tensor]:
        """Logits of ``n_samples`` prior draws per image, divided by ``temperature``.

        ``features`` from :meth:`unet_features` and ``prior`` from :meth:`prior` are computed
        once per tile; here only the latent injection and the 1x1 head layers run, ``chunk``
        samples at a time. ``z`` (``(B, S, L)`` per head) replaces the random draws, e.g. to
        compare with the naive path. Returns ``(B, S, H, W)`` per head; ``sigmoid`` of it is
        the per-sample probability. :meth:`iter_sample_heads` yields the chunks instead, to
        reduce them without holding all samples.
        """
        parts = list(
            self.iter_sample_heads(
                features, prior, n_samples, temperature, z=z, generator=generator, chunk=chunk
            )
        )
        return {name: torch.cat([p[name] for p in parts], dim=1) for name in HEADS}

    @torch.no_grad()
    def iter_sample_heads(
        self,
        features: Mapping[str, torch.Tensor],
        prior: Latents,
        n_samples: int = 24,
        temperature: float = 1.0,
        *,
        z: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        chunk: int = 8,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`sample_heads` chunk by chunk: ``{head: (B, <=chunk, H, W)}`` logits / T."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if z is None:
            z = {}
            for name in HEADS:
                loc, scale = prior[name].base_dist.loc, prior[name].base_dist.scale
                eps = torch.randn(
                    (loc.shape[0], n_samples, loc.shape[1]), generator=generator, dtype=loc.dtype
                ).to(loc.device)
                z[name] = loc[:, None] + scale[:, None] * eps
        total = z[HEADS[0]].shape[1]
        pre = {name: self.heads[name].feature_part(features[name]) for name in HEADS}
        step = max(1, int(chunk))
        for start in range(0, total, step):
            yield {
                name: self.heads[name].from_feature_part(
                    pre[name], z[name][:, start : start + step]
                )
                / temperature
                for name in HEADS
            }


def build_punet(config: Mapping[str, Any]) -> ProbUNet:
    """Rebuild a model from :attr:`ProbUNet.config` (as stored in checkpoints)."""
    return ProbUNet(**dict(config))


def save_punet(model: ProbUNet, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_config`` + weights (+ ``extra``: plain values, e.g. the validation
    metrics of a training run) atomically; readable by :func:`load_punet`."""
    path = Path(path)
    payload = {
        "format": MODEL_FORMAT,
        "model_config": model.config,
        "model": model.state_dict(),
        **dict(extra or {}),
    }
    write_torch(path, payload)
    return path


def _legacy_globals() -> list[Any]:
    """NumPy arrays: what the pre-Lightning loop's ``best.pt`` (NumPy RNG state) adds to
    tensors and plain values. Plain data too; no other class or function is let through."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``; a file of the old loop is read with NumPy arrays
    allowed as well (MLflow models registered before the move hold one)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_punet(path: str | Path, map_location: str | torch.device = "cpu") -> ProbUNet:
    """A model (eval mode) from a file holding ``model_config`` and ``model`` (state dict):
    :func:`save_punet`'s, a training run's ``best.pt``, or the pre-Lightning loop's
    ``best.pt``/``last.pt``. Read with ``weights_only=True``: no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a Probabilistic U-Net checkpoint, found nothing", path)
    try:
        ckpt = _read(path, map_location)
    except pickle.UnpicklingError as exc:
        raise DataFormatError(
            "expected a torch checkpoint of tensors and plain values, could not load it "
            f"with weights_only=True ({str(exc).splitlines()[0]})",
            path,
        ) from exc
    except Exception as exc:
        raise DataFormatError(
            f"expected a torch checkpoint, could not load it ({type(exc).__name__}: {exc})",
            path,
        ) from exc
    if not isinstance(ckpt, dict) or not {"model_config", "model"} <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataFormatError(
            f"expected a checkpoint with keys 'model_config' and 'model', found {found}", path
        )
    model = build_punet(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    log.debug("loaded ProbUNet %s from %s", ckpt["model_config"], path)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def padded_size(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the last two axes of ``(B, C, H, W)`` up to multiples of ``multiple``.

    Crop the result back with ``[..., :H, :W]``. Falls back to replicate padding where a side
    is too short to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, multiple) - h, padded_size(w, multiple) - w
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)
