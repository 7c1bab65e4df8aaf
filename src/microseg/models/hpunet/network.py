"""Hierarchical Probabilistic U-Net (Kohl et al., 2019) with a spine and a dendrite head.

Where the flat Prob-UNet draws one global latent vector and appends it at the end of the
U-Net, here the decoder's coarsest ``latent_levels`` scales each carry a *spatial* latent map
``z_k`` (``latent_dim`` channels at that scale's resolution), drawn from a Gaussian predicted
from the decoder features at that scale, which already depend on ``z_<k``: a multi-scale
latent hierarchy that can model ambiguities of different sizes (a whole spine or its rim).

* The prior net is the segmentation U-Net itself: encoder, then a decoder that at each latent
  scale predicts ``p(z_k | z_<k, x)``, samples it, concatenates it to the features and goes on
  up to full resolution, where one 1x1-convolution head per structure gives logits.
* The posterior net has the same encoder/decoder structure on image + masks and stops after
  its last latent scale; it predicts ``q(z_k | z_<k, x, y)`` fed with its own samples.
* In training the prior's decoder is fed the posterior's samples, so both nets condition on
  the same ``z_<k`` and the KL of every scale is analytic: summed over channels and pixels
  per scale, then over scales (the ELBO's KL term of Kohl 2019).

Dual task as DeepD3: both heads share the latent hierarchy; with ``dual_decoder=True`` the last
up-step (to full resolution) is one per head. Blocks are MONAI ``BasicUNet`` pieces as in the
flat family. Output contract: :meth:`HierarchicalProbUNet.iter_sample_logits` yields
``{head: (B, S, H, W)}`` logits divided by the temperature, what the flat family's
``sample_heads`` yields, so its predictor's per-sample sums and files are reused unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from microseg.errors import DataFormatError, MissingFileError
from microseg.models.punet.network import HEADS, LOG_SIGMA_RANGE, _read
from microseg.utils.atomic import write_torch

log = logging.getLogger(__name__)

MODEL_FORMAT = "microseg.hpunet.model/1"

_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})


def _norm(channels: int) -> tuple[str, dict[str, Any]]:
    groups = max(g for g in range(1, 9) if channels % g == 0)
    return ("group", {"num_groups": groups})


def _up(in_ch: int, skip_ch: int, out_ch: int) -> UpCat:
    # halves=False: the latent channels make ``in_ch`` odd-sized, keep them all
    return UpCat(2, in_ch, skip_ch, out_ch, _ACT, _norm(out_ch), True, halves=False)


def _gaussian(params: torch.Tensor) -> Independent:
    """``(B, 2L, h, w)`` -> a Gaussian over ``(L, h, w)`` (three event dims)."""
    mu, log_sigma = params.chunk(2, dim=1)
    sigma = torch.exp(log_sigma.clamp(*LOG_SIGMA_RANGE))
    return Independent(Normal(mu, sigma, validate_args=False), 3, validate_args=False)


class LatentUNet(nn.Module):
    """Encoder + decoder whose ``latent_levels`` coarsest decoder scales carry latents.

    ``n_ups`` up-steps are built (the posterior needs only those between its latent scales).
    :meth:`decode` runs from the encoder's skips; at latent scale ``k`` it uses ``z[k]`` when
    given (posterior samples in training, prior draws in sampling), else the mean
    (``sample=False``) or a draw of its own Gaussian.
    """

    def __init__(
        self,
        in_channels: int,
        filters: Sequence[int],
        latent_levels: int,
        latent_dim: int,
        n_ups: int,
    ) -> None:
        super().__init__()
        f = list(filters)
        self.levels, self.latent_levels, self.latent_dim = len(f), latent_levels, latent_dim
        self.encoder = nn.ModuleList([TwoConv(2, in_channels, f[0], _ACT, _norm(f[0]), True)])
        for i in range(1, len(f)):
            self.encoder.append(Down(2, f[i - 1], f[i], _ACT, _norm(f[i]), True))
        top = len(f) - 1
        self.to_latent = nn.ModuleList(
            [nn.Conv2d(f[top - k], 2 * latent_dim, kernel_size=1) for k in range(latent_levels)]
        )
        for conv in self.to_latent:  # start near N(0, I): small KL, stable first steps
            nn.init.normal_(conv.weight, std=1e-3)
            nn.init.zeros_(conv.bias)
        self.ups = nn.ModuleList(
            [_up(self.up_in_channels(f, k), f[top - k - 1], f[top - k - 1]) for k in range(n_ups)]
        )

    def up_in_channels(self, f: Sequence[int], k: int) -> int:
        """Channels entering up-step ``k``: the scale's features plus its latent, if any."""
        return f[len(f) - 1 - k] + (self.latent_dim if k < self.latent_levels else 0)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips

    def decode(
        self,
        skips: Sequence[torch.Tensor],
        z: Sequence[torch.Tensor] | None = None,
        *,
        sample: bool = True,
        eps: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[Independent], list[torch.Tensor]]:
        """Features after the last built up-step, the Gaussians and the latents used.

        ``eps`` (standard normal, one per scale) makes draws reproducible: ``z = mu + s*eps``.
        """
        y = skips[-1]
        dists: list[Independent] = []
        used: list[torch.Tensor] = []
        for k in range(max(self.latent_levels, len(self.ups))):
            if k < self.latent_levels:
                dist = _gaussian(self.to_latent[k](y))
                dists.append(dist)
                if z is not None:
                    zk = z[k]
                elif eps is not None:
                    zk = dist.base_dist.loc + dist.base_dist.scale * eps[k]
                else:
                    zk = dist.rsample() if sample else dist.mean
                used.append(zk)
                y = torch.cat([y, zk.to(y.dtype)], dim=1)
            if k < len(self.ups):
                y = self.ups[k](y, skips[-k - 2])
        return y, dists, used


class Head(nn.Module):
    """1x1 convolutions from full-resolution features to one logit map."""

    def __init__(self, channels: int, hidden: int, n_convs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for _ in range(max(0, n_convs - 1)):
            layers += [nn.Conv2d(c, hidden, kernel_size=1), nn.ReLU(inplace=True)]
            c = hidden
        layers.append(nn.Conv2d(c, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class HpunetOutput:
    """:meth:`HierarchicalProbUNet.forward`: logits ``(B, 1, H, W)`` per head, KL ``(B,)``
    per latent scale (coarsest first; ``None`` without masks)."""

    logits: dict[str, torch.Tensor]
    prior: list[Independent]
    posterior: list[Independent] | None
    kl: list[torch.Tensor] | None


class HierarchicalProbUNet(nn.Module):
    """Hierarchical Prob-UNet with spine and dendrite heads sharing one latent hierarchy.

    Args:
        in_channels: image channels (1 = a plane; 3 = planes z-1, z, z+1).
        filters: channels per U-Net level, coarsest last.
        latent_levels: decoder scales with a latent, from the coarsest (``<= len(filters)-1``).
        latent_dim: latent channels per scale.
        head_convs, head_hidden: 1x1 convolutions per head and their width.
        dual_decoder: the last up-step once per head (DeepD3's dual decoder, cut short).
        posterior_filters: channels of the posterior net (default ``filters``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        filters: Sequence[int] = (32, 64, 128, 192),
        latent_levels: int = 3,
        latent_dim: int = 2,
        head_convs: int = 3,
        head_hidden: int | None = None,
        dual_decoder: bool = True,
        posterior_filters: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        filters = tuple(int(f) for f in filters)
        posterior_filters = tuple(int(f) for f in (posterior_filters or filters))
        if len(filters) < 2 or len(posterior_filters) != len(filters):
            raise ValueError(
                f"filters needs >= 2 levels and posterior_filters as many: {filters}, "
                f"{posterior_filters}"
            )
        if not 1 <= latent_levels <= len(filters) - 1:
            raise ValueError(
                f"latent_levels must be in [1, {len(filters) - 1}], got {latent_levels}"
            )
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "filters": list(filters),
            "latent_levels": int(latent_levels),
            "latent_dim": int(latent_dim),
            "head_convs": int(head_convs),
            "head_hidden": int(head_hidden or filters[0]),
            "dual_decoder": bool(dual_decoder),
            "posterior_filters": list(posterior_filters),
        }
        self.in_channels = int(in_channels)
        n_ups = len(filters) - 1
        shared = n_ups - 1 if dual_decoder else n_ups
        self.prior_net = LatentUNet(in_channels, filters, latent_levels, latent_dim, shared)
        self.posterior_net = LatentUNet(
            in_channels + len(HEADS),
            posterior_filters,
            latent_levels,
            latent_dim,
            latent_levels - 1,
        )
        last = n_ups - 1
        self.final_ups = nn.ModuleDict(
            {
                h: _up(self.prior_net.up_in_channels(filters, last), filters[0], filters[0])
                for h in (HEADS if dual_decoder else ())
            }
        )
        hidden = self.config["head_hidden"]
        self.heads = nn.ModuleDict({h: Head(filters[0], hidden, head_convs) for h in HEADS})

    @property
    def pad_multiple(self) -> int:
        """Image sides must be multiples of this (one halving per extra level)."""
        return 2 ** (len(self.config["filters"]) - 1)

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(latent_dim, h, w)`` of each latent scale for a (padded) ``height x width`` input."""
        top = len(self.config["filters"]) - 1
        d = self.config["latent_dim"]
        return [
            (d, height >> (top - k), width >> (top - k))
            for k in range(self.config["latent_levels"])
        ]

    def _logits(self, y: torch.Tensor, skips: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.final_ups:
            return {h: self.heads[h](self.final_ups[h](y, skips[0])) for h in HEADS}
        return {h: self.heads[h](y) for h in HEADS}

    def decode(
        self,
        skips: Sequence[torch.Tensor],
        z: Sequence[torch.Tensor] | None = None,
        *,
        sample: bool = True,
        eps: Sequence[torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[Independent]]:
        """Logits ``(B, 1, H, W)`` per head and the prior's Gaussians, from encoder skips."""
        y, dists, _ = self.prior_net.decode(skips, z, sample=sample, eps=eps)
        return self._logits(y, skips), dists

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, *, sample: bool = True
    ) -> HpunetOutput:
        """With ``masks`` ``(B, 2, H, W)`` (:data:`HEADS` order): logits from posterior samples
        and the analytic KL(q || p) per scale. Without: prior samples (or means)."""
        skips = self.prior_net.encode(x)
        if masks is None:
            logits, prior = self.decode(skips, sample=sample)
            return HpunetOutput(logits, prior, None, None)
        xm = torch.cat([x, masks.to(x.dtype)], dim=1)
        _, posterior, z = self.posterior_net.decode(self.posterior_net.encode(xm), sample=sample)
        logits, prior = self.decode(skips, z)
        kl = [kl_divergence(q, p) for q, p in zip(posterior, prior, strict=True)]
        return HpunetOutput(logits, prior, posterior, kl)

    @torch.no_grad()
    def iter_sample_logits(
        self,
        x: torch.Tensor,
        n_samples: int,
        temperature: float = 1.0,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        chunk: int = 4,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Prior draws, ``chunk`` at a time: ``{head: (B, <=chunk, H, W)}`` logits / T.

        The encoder runs once; the decoder once per sample (the latents change its input).
        ``generator``: one per image (e.g. seeded by plane) or one for the batch; noise is
        drawn on the CPU, so results do not depend on the device or on ``chunk``.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        b = x.shape[0]
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * b
        skips = self.prior_net.encode(x)
        shapes = self.latent_shapes(*x.shape[-2:])
        # per image, all its samples' noise first: independent of ``chunk``
        noise = [
            [torch.randn((n_samples, *s), generator=gens[i], dtype=torch.float32) for s in shapes]
            for i in range(b)
        ]
        step = max(1, int(chunk))
        for start in range(0, n_samples, step):
            s = min(step, n_samples - start)
            rep = [t.repeat_interleave(s, dim=0) for t in skips]
            eps = [
                torch.cat([noise[i][k][start : start + s] for i in range(b)]).to(x.device, x.dtype)
                for k in range(len(shapes))
            ]
            logits, _ = self.decode(rep, eps=eps)
            yield {h: logits[h][:, 0].reshape(b, s, *x.shape[-2:]) / temperature for h in HEADS}


def build_hpunet(config: Mapping[str, Any]) -> HierarchicalProbUNet:
    """Rebuild a model from :attr:`HierarchicalProbUNet.config` (as stored in checkpoints)."""
    return HierarchicalProbUNet(**dict(config))


def save_hpunet(
    model: HierarchicalProbUNet, path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model_config`` + weights (+ plain ``extra`` values) atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "model_config": model.config,
        "model": model.state_dict(),
        **dict(extra or {}),
    }
    write_torch(Path(path), payload)
    return Path(path)


def is_hpunet_file(path: str | Path) -> bool:
    """Whether ``path`` holds this family's model format (False for anything unreadable)."""
    try:
        ckpt = _read(Path(path), "cpu")
    except Exception:
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == MODEL_FORMAT


def load_hpunet(path: str | Path, map_location: str | torch.device = "cpu") -> HierarchicalProbUNet:
    """A model (eval mode) from :func:`save_hpunet`'s file or a training run's ``best.pt``,
    read with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a hierarchical Prob-UNet checkpoint, found nothing", path)
    try:
        ckpt = _read(path, map_location)
    except Exception as exc:
        raise DataFormatError(
            f"expected a torch checkpoint, could not load it ({type(exc).__name__}: {exc})", path
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataFormatError(f"expected a {MODEL_FORMAT} checkpoint, found {found!r}", path)
    model = build_hpunet(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model
