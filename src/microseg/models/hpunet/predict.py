"""Hierarchical Prob-UNet inference on ZYX stacks: the flat family's output, plane by plane.

The result dict, its per-sample sums (``sum_p``, ``sum_p2``, ``sum_entropy``), the
``on_plane``/``on_samples`` callbacks and the files (``write_predictions``) are the flat
Prob-UNet's (:mod:`microseg.models.punet.predict`), so ``uncertainty``, ``inter_rater``,
``predict`` and the fusion read either family's samples unchanged. Only the sampling differs:
the latents are spatial maps at several decoder scales, so the decoder runs per sample
(:meth:`HierarchicalProbUNet.iter_sample_logits`). Noise of plane ``z`` is drawn from a
generator seeded by ``(seed, z)``: results do not depend on ``batch_planes``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from microseg.data.patches import DEFAULT_PERCENTILES
from microseg.models.hpunet.network import HierarchicalProbUNet
from microseg.models.punet.network import HEADS, pad_to_multiple
from microseg.models.punet.predict import (
    STATS,
    PlaneCallback,
    _plane_generator,
    _plane_stats,
    stream_stack,
)


def _accumulate(
    out: dict[str, dict[str, torch.Tensor]], logits: dict[str, torch.Tensor], h: int, w: int
) -> None:
    for k in HEADS:
        for name, value in _plane_stats(logits[k][..., :h, :w]).items():
            out[k][name] = out[k][name] + value if name in out[k] else value


@torch.no_grad()
def _stats_whole(
    model: HierarchicalProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    samples: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, model.pad_multiple)
    gens = [_plane_generator(seed, z) for z in zs]
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    for logits in model.iter_sample_logits(xp, n_samples, temperature, generator=gens, chunk=chunk):
        _accumulate(out, logits, h, w)
        if samples is not None:
            for k in HEADS:
                samples[k].append(torch.sigmoid(logits[k][..., :h, :w]))
    return out


@torch.no_grad()
def _stats_tiled(
    model: HierarchicalProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    tile: tuple[int, int],
    sw_batch: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Window means of the sums, blended by MONAI's sliding window (as the flat family)."""
    size, overlap = (int(v) for v in tile)
    if size % model.pad_multiple or not 0 <= overlap < size:
        raise ValueError(
            f"tile {tile}: size a multiple of {model.pad_multiple}, 0 <= overlap < size"
        )
    gen = _plane_generator(seed, zs[0])

    def window_net(win: torch.Tensor) -> torch.Tensor:
        sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
        for logits in model.iter_sample_logits(
            win, n_samples, temperature, generator=gen, chunk=chunk
        ):
            _accumulate(sums, logits, *win.shape[-2:])
        return torch.stack([sums[k][s] / n_samples for k in HEADS for s in STATS], dim=1)

    inferer = SlidingWindowInferer(
        roi_size=(size, size),
        sw_batch_size=sw_batch,
        overlap=overlap / size,
        mode="gaussian",
        padding_mode="reflect",
    )
    means = inferer(x, window_net)
    names = [(k, s) for k in HEADS for s in STATS]
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    for i, (k, s) in enumerate(names):
        out[k][s] = means[:, i] * n_samples
    return out


def predict_stack_hpunet(
    model: HierarchicalProbUNet,
    stack: Any,
    *,
    n_samples: int = 24,
    temperature: float = 1.4,
    tile: tuple[int, int] | None = None,
    batch_planes: int = 4,
    sample_chunk: int = 4,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    intensity: tuple[float, float] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    collect: bool = True,
    on_plane: PlaneCallback | None = None,
    on_samples: PlaneCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`microseg.models.punet.predict.predict_stack_punet`'s arguments and result for
    the hierarchical model (see there): ``prob_<head>`` and ``<stat>_<head>`` per plane."""
    return stream_stack(
        model, stack, _stats_whole, _stats_tiled,
        n_samples=n_samples, temperature=temperature, tile=tile, batch_planes=batch_planes,
        sample_chunk=sample_chunk, percentiles=percentiles, intensity=intensity, seed=seed,
        device=device, collect=collect, on_plane=on_plane, on_samples=on_samples,
        progress=progress, desc="hpunet planes",
    )  # fmt: skip
